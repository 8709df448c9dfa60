//! Label and field selectors as the API server parses them
//! (`labelSelector=app=web,tier in (a,b),!legacy`,
//! `fieldSelector=spec.nodeName=node1`).

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty one selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

fn valid_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253)
}

fn valid_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Split on commas outside parentheses.
fn terms(s: &str) -> Result<Vec<&str>, String> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unable to parse requirement: unbalanced parentheses in {s:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unable to parse requirement: unbalanced parentheses in {s:?}"));
    }
    out.push(s[start..].trim());
    Ok(out)
}

fn set_values(rest: &str, term: &str) -> Result<Vec<String>, String> {
    let inner =
        rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| {
            format!("unable to parse requirement: {term:?}: expected a (value, ...) set")
        })?;
    let vals: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if let Some(v) = vals.iter().find(|v| !valid_value(v)) {
        return Err(format!("unable to parse requirement: {term:?}: invalid label value {v:?}"));
    }
    Ok(vals)
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for term in terms(s)? {
            let bad = || format!("unable to parse requirement: {term:?}");
            let key_of = |k: &str| -> Result<String, String> {
                let k = k.trim();
                if valid_key(k) {
                    Ok(k.to_string())
                } else {
                    Err(format!("unable to parse requirement: invalid label key {k:?}"))
                }
            };
            let value_of = |v: &str| -> Result<String, String> {
                let v = v.trim();
                if valid_value(v) {
                    Ok(v.to_string())
                } else {
                    Err(format!("unable to parse requirement: invalid label value {v:?}"))
                }
            };
            let req = if let Some(k) = term.strip_prefix('!') {
                Req::NotExists(key_of(k)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                Req::NotEq(key_of(k)?, value_of(v)?)
            } else if let Some((k, v)) = term.split_once("==") {
                Req::Eq(key_of(k)?, value_of(v)?)
            } else if let Some((k, v)) = term.split_once('=') {
                Req::Eq(key_of(k)?, value_of(v)?)
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Req::NotIn(key_of(k)?, set_values(rest, term)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Req::In(key_of(k)?, set_values(rest, term)?)
            } else if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
                return Err(bad());
            } else {
                Req::Exists(key_of(term)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Does an object whose `metadata.labels` is `labels` match?
    pub fn matches(&self, labels: Option<&Value>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v),
            Req::NotEq(k, v) => get(k) != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector: `path=value` / `path!=value` terms over the
/// fields a resource supports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// `supported`: the field paths this resource can be selected by (as the
    /// real server, `metadata.name` and `metadata.namespace` always).
    pub fn parse(s: &str, supported: &[&str]) -> Result<Self, String> {
        let mut out = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(out));
        }
        for term in s.split(',') {
            let (path, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{term}'"));
            };
            let path = path.trim();
            if !["metadata.name", "metadata.namespace"].contains(&path)
                && !supported.contains(&path)
            {
                return Err(format!("field label not supported: {path}"));
            }
            out.push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut v = obj;
            for part in path.split('.') {
                v = v.get(part).unwrap_or(&Value::Null);
            }
            let have = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (have == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_as_the_api_reads_them() {
        let l = json!({"app": "web", "tier": "front"});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(Some(&l));
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (db, web)"));
        assert!(!m("app notin (web)"));
        assert!(m("missing notin (x)"), "notin selects objects without the key");
        assert!(m("!legacy"));
        assert!(!m("!app"));
        assert!(!m("app=web,tier=back"));
        assert!(!LabelSelector::parse("app=web").unwrap().matches(None));
        for bad in ["a b", "app=we b", "app in web", "-app=x", "app in (x", "=x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn field_selectors_only_on_supported_fields() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let f = |s: &str| FieldSelector::parse(s, &["spec.nodeName"]).unwrap().matches(&pod);
        assert!(f("spec.nodeName=n1"));
        assert!(!f("spec.nodeName=n2"));
        assert!(f("spec.nodeName!=n2,metadata.name=p"));
        assert!(f("metadata.namespace==ns"));
        let e = FieldSelector::parse("spec.hostname=x", &["spec.nodeName"]).unwrap_err();
        assert_eq!(e, "field label not supported: spec.hostname");
    }
}
