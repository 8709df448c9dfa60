//! What callers need of HTTP besides the client: query escaping.

/// Percent-escape `s` for a query value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_escaped() {
        assert_eq!(super::escape("a b/c=d&e"), "a%20b%2Fc%3Dd%26e");
        assert_eq!(super::escape("k8s:test=e2e"), "k8s%3Atest%3De2e");
    }
}
