//! Cilium's HTTP rules (`toPorts[].rules.http[]`) and how a request is
//! judged by them, as Cilium's Envoy configuration does:
//! - `method`, `path`, `host`: regular expressions that must match the
//!   whole method, request target (path and query, as Envoy's `:path`)
//!   and `Host` (`:authority`);
//! - `headers`: `"Name"` (present) or `"Name: value"` (present with that
//!   exact value);
//! - `headerMatches`: a header with an exact value; on a mismatch the rule
//!   fails unless `mismatch` says otherwise: `LOG` (the rule still
//!   matches, the mismatch is logged), `ADD` (the value is added to the
//!   header's values), `DELETE` (the header is removed), `REPLACE` (the
//!   header is set to the value, added if missing).
//!
//! A request is allowed when any rule matches (an empty rule matches all);
//! the header changes of the first matching rule are made before it goes
//! upstream.

use http::{HeaderName, HeaderValue, request::Parts};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// One HTTP rule as a policy writes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRule {
    /// A regular expression the whole method must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A regular expression the whole path (with its query) must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A regular expression the whole Host header must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Headers that must be present: `Name` or `Name: value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_matches: Vec<HeaderMatch>,
}

/// `headerMatches[]`: a header's exact value, and what a mismatch does.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default)]
    pub value: String,
    /// "", LOG, ADD, DELETE or REPLACE.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mismatch: String,
    /// A Kubernetes secret holding the value (not supported: refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
}

/// A Kubernetes secret a header value would come from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    #[serde(default)]
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mismatch {
    Fail,
    Log,
    Add,
    Delete,
    Replace,
}

#[derive(Clone, Debug)]
struct CompiledMatch {
    name: HeaderName,
    value: HeaderValue,
    mismatch: Mismatch,
}

/// An [`HttpRule`] ready to judge requests.
#[derive(Clone, Debug)]
pub struct Rule {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    matches: Vec<CompiledMatch>,
}

fn anchored(what: &str, re: &Option<String>) -> Result<Option<Regex>, String> {
    re.as_ref()
        .map(|r| Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("{what} {r:?}: {e}")))
        .transpose()
}

fn header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(s.trim()).map_err(|_| format!("{s:?} is not a header name"))
}

fn header_value(s: &str) -> Result<HeaderValue, String> {
    HeaderValue::try_from(s.trim()).map_err(|_| format!("{s:?} is not a header value"))
}

impl Rule {
    /// Check `r` and compile it; the error names the bad field.
    pub fn compile(r: &HttpRule) -> Result<Self, String> {
        let headers = r
            .headers
            .iter()
            .map(|h| match h.split_once(' ') {
                Some((name, value)) => {
                    Ok((header_name(name.trim_end_matches(':'))?, Some(header_value(value)?)))
                }
                None => Ok((header_name(h.trim_end_matches(':'))?, None)),
            })
            .collect::<Result<_, String>>()
            .map_err(|e| format!("headers: {e}"))?;
        let matches = r
            .header_matches
            .iter()
            .map(|m| {
                if m.secret.is_some() {
                    return Err(format!(
                        "{}: secret values are not supported (give the value)",
                        m.name
                    ));
                }
                let mismatch = match m.mismatch.as_str() {
                    "" => Mismatch::Fail,
                    "LOG" => Mismatch::Log,
                    "ADD" => Mismatch::Add,
                    "DELETE" => Mismatch::Delete,
                    "REPLACE" => Mismatch::Replace,
                    other => {
                        return Err(format!(
                            "{}: mismatch {other:?} is not LOG, ADD, DELETE or REPLACE",
                            m.name
                        ));
                    }
                };
                Ok(CompiledMatch {
                    name: header_name(&m.name)?,
                    value: header_value(&m.value)?,
                    mismatch,
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|e| format!("headerMatches: {e}"))?;
        Ok(Self {
            method: anchored("method", &r.method)?,
            path: anchored("path", &r.path)?,
            host: anchored("host", &r.host)?,
            headers,
            matches,
        })
    }

    /// Does `req` match? `Some(changes)`: yes, with the header changes
    /// (and mismatches to log) the rule asks for.
    fn judge(&self, req: &Parts) -> Option<Vec<Change>> {
        let target = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))
            .unwrap_or_default();
        let ok = |re: &Option<Regex>, s: &str| re.as_ref().is_none_or(|r| r.is_match(s));
        if !ok(&self.method, req.method.as_str())
            || !ok(&self.path, target)
            || !ok(&self.host, host)
        {
            return None;
        }
        for (name, value) in &self.headers {
            let mut values = req.headers.get_all(name).iter();
            let present = match value {
                None => values.next().is_some(),
                Some(v) => values.any(|x| x == v),
            };
            if !present {
                return None;
            }
        }
        let mut changes = Vec::new();
        for m in &self.matches {
            if req.headers.get_all(&m.name).iter().any(|x| x == m.value) {
                continue;
            }
            changes.push(match m.mismatch {
                Mismatch::Fail => return None,
                Mismatch::Log => Change::Log(m.name.clone()),
                Mismatch::Add => Change::Add(m.name.clone(), m.value.clone()),
                Mismatch::Delete => Change::Delete(m.name.clone()),
                Mismatch::Replace => Change::Replace(m.name.clone(), m.value.clone()),
            });
        }
        Some(changes)
    }
}

/// What a matching rule does to a request's headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A mismatch noted in the request's event only.
    Log(HeaderName),
    Add(HeaderName, HeaderValue),
    Delete(HeaderName),
    Replace(HeaderName, HeaderValue),
}

/// The rules of one redirect (one policy entry's L7 rules): a request is
/// allowed when any matches.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

/// A request's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded, after these changes were made to it; the mismatches
    /// logged are named.
    Allowed {
        logged: Vec<String>,
    },
    Denied,
}

impl RuleSet {
    pub fn compile(rules: &[HttpRule]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(r).map_err(|e| format!("http[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Judge `req`, making the header changes of the rule that allows it.
    pub fn judge(&self, req: &mut Parts) -> Verdict {
        let Some(changes) = self.rules.iter().find_map(|r| r.judge(req)) else {
            return Verdict::Denied;
        };
        let mut logged = Vec::new();
        for c in changes {
            match c {
                Change::Log(n) => logged.push(n.to_string()),
                Change::Add(n, v) => {
                    req.headers.append(n, v);
                }
                Change::Delete(n) => {
                    req.headers.remove(n);
                }
                Change::Replace(n, v) => {
                    req.headers.insert(n, v);
                }
            }
        }
        Verdict::Allowed { logged }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn set(yaml: &str) -> RuleSet {
        let rules: Vec<HttpRule> = serde_json::from_str(yaml).unwrap();
        RuleSet::compile(&rules).unwrap()
    }

    #[test]
    fn method_path_and_host_match_whole() {
        let s =
            set(r#"[{"method": "GET", "path": "/public(/.*)?", "host": "api\\.example\\.test"}]"#);
        let host = [("host", "api.example.test")];
        let allowed = Verdict::Allowed { logged: vec![] };
        assert_eq!(s.judge(&mut req("GET", "/public", &host)), allowed);
        assert_eq!(s.judge(&mut req("GET", "/public/a/b", &host)), allowed);
        assert_eq!(s.judge(&mut req("GET", "/publicity", &host)), Verdict::Denied);
        assert_eq!(s.judge(&mut req("GET", "/x/public", &host)), Verdict::Denied, "anchored");
        assert_eq!(s.judge(&mut req("GET", "/public?x=1", &host)), Verdict::Denied, "as :path");
        assert_eq!(s.judge(&mut req("GETX", "/public", &host)), Verdict::Denied);
        assert_eq!(s.judge(&mut req("POST", "/public", &host)), Verdict::Denied);
        let other = [("host", "api.example.test.evil")];
        assert_eq!(s.judge(&mut req("GET", "/public", &other)), Verdict::Denied);
        // Any rule allows; an empty rule allows everything.
        let s = set(r#"[{"method": "POST"}, {"path": "/open"}]"#);
        assert_eq!(s.judge(&mut req("POST", "/x", &[])), allowed);
        assert_eq!(s.judge(&mut req("PUT", "/open", &[])), allowed);
        assert_eq!(s.judge(&mut req("PUT", "/x", &[])), Verdict::Denied);
        assert_eq!(set("[{}]").judge(&mut req("DELETE", "/any", &[])), allowed);
        assert_eq!(set("[]").judge(&mut req("GET", "/", &[])), Verdict::Denied);
    }

    #[test]
    fn headers_must_be_present_or_equal() {
        let s = set(r#"[{"headers": ["X-Token", "X-Env: prod"]}]"#);
        let allowed = Verdict::Allowed { logged: vec![] };
        assert_eq!(s.judge(&mut req("GET", "/", &[("x-token", "1"), ("x-env", "prod")])), allowed);
        assert_eq!(s.judge(&mut req("GET", "/", &[("x-env", "prod")])), Verdict::Denied);
        assert_eq!(
            s.judge(&mut req("GET", "/", &[("x-token", "1"), ("x-env", "dev")])),
            Verdict::Denied
        );
    }

    #[test]
    fn header_match_mismatch_actions() {
        let m = |action: &str| {
            set(&format!(
                r#"[{{"headerMatches": [{{"name": "X-Team", "value": "a", "mismatch": "{action}"}}]}}]"#
            ))
        };
        let mut ok = req("GET", "/", &[("x-team", "a")]);
        assert_eq!(m("").judge(&mut ok), Verdict::Allowed { logged: vec![] });
        assert_eq!(m("").judge(&mut req("GET", "/", &[("x-team", "b")])), Verdict::Denied);
        assert_eq!(m("").judge(&mut req("GET", "/", &[])), Verdict::Denied);
        let mut r = req("GET", "/", &[("x-team", "b")]);
        assert_eq!(m("LOG").judge(&mut r), Verdict::Allowed { logged: vec!["x-team".into()] });
        assert_eq!(r.headers.get("x-team").unwrap(), "b", "LOG changes nothing");
        let mut r = req("GET", "/", &[("x-team", "b")]);
        m("ADD").judge(&mut r);
        let all: Vec<_> = r.headers.get_all("x-team").iter().collect();
        assert_eq!(all, ["b", "a"]);
        let mut r = req("GET", "/", &[("x-team", "b")]);
        m("DELETE").judge(&mut r);
        assert!(r.headers.get("x-team").is_none());
        let mut r = req("GET", "/", &[("x-team", "b"), ("x-team", "c")]);
        m("REPLACE").judge(&mut r);
        let all: Vec<_> = r.headers.get_all("x-team").iter().collect();
        assert_eq!(all, ["a"]);
        let mut r = req("GET", "/", &[]);
        m("REPLACE").judge(&mut r);
        assert_eq!(r.headers.get("x-team").unwrap(), "a", "added when missing");
    }

    #[test]
    fn bad_rules_are_refused_by_field() {
        let bad = |json: &str, needle: &str| {
            let rules: Vec<HttpRule> = serde_json::from_str(json).unwrap();
            let e = RuleSet::compile(&rules).unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        bad(r#"[{"path": "/a("}]"#, "http[0]: path \"/a(\"");
        bad(r#"[{}, {"method": "[x"}]"#, "http[1]: method");
        bad(r#"[{"headers": ["b(d"]}]"#, "headers: \"b(d\"");
        bad(r#"[{"headerMatches": [{"name": "x", "mismatch": "DROP"}]}]"#, "\"DROP\"");
        bad(
            r#"[{"headerMatches": [{"name": "x", "secret": {"name": "s"}}]}]"#,
            "secret values are not supported",
        );
        assert!(serde_json::from_str::<Vec<HttpRule>>(r#"[{"pathx": "/"}]"#).is_err());
    }
}
