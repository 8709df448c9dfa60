//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and
//! strategic merge patch and apply patch taken as merge patches.
//!
//! Strategic merge patch differs from a merge patch only in lists with a
//! patch merge key (a pod's containers, say), which it merges by key where a
//! merge patch replaces them; nothing Ciliate or its tests patch has such a
//! list, and a body using the strategic directives (`$patch`,
//! `$setElementOrder`, ...) is refused rather than misread.

use serde_json::Value;

pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Does a strategic merge patch use directives a merge patch cannot honour?
pub fn strategic_directive(patch: &Value) -> Option<String> {
    match patch {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            if k.starts_with('$') { Some(k.clone()) } else { strategic_directive(v) }
        }),
        Value::Array(a) => a.iter().find_map(strategic_directive),
        _ => None,
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_parts(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path.strip_prefix('/').ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, parts: &[String]) -> Result<&'a mut Value, String> {
    let mut v = doc;
    for p in parts {
        v = match v {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path element {p:?} does not exist"))?;
    }
    Ok(v)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let parts = pointer_parts(path)?;
    let Some((last, parents)) = parts.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>().map_err(|_| format!("invalid array index {last:?}"))?
            };
            if i > a.len() {
                return Err(format!("array index {i} out of bounds in {path:?}"));
            }
            a.insert(i, value);
        }
        _ => return Err(format!("cannot add at {path:?}: the parent is not a container")),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let parts = pointer_parts(path)?;
    let (last, parents) = parts.split_last().ok_or("cannot remove the whole document")?;
    match parent_mut(doc, parents)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| format!("{path:?} does not exist")),
        Value::Array(a) => {
            let i = last.parse::<usize>().map_err(|_| format!("invalid array index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("array index {i} out of bounds in {path:?}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("{path:?} does not exist")),
    }
}

/// Apply an RFC 6902 patch, all or nothing.
pub fn json_patch(doc: &Value, ops: &Value) -> Result<Value, String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array of operations")?;
    let mut out = doc.clone();
    for op in ops {
        let s = |k: &str| {
            op.get(k).and_then(Value::as_str).ok_or_else(|| format!("operation lacks {k:?}: {op}"))
        };
        let value =
            || op.get("value").cloned().ok_or_else(|| format!("operation lacks \"value\": {op}"));
        let path = s("path")?;
        match s("op")? {
            "add" => add(&mut out, path, value()?)?,
            "remove" => {
                remove(&mut out, path)?;
            }
            "replace" => {
                remove(&mut out, path)?;
                add(&mut out, path, value()?)?;
            }
            "move" => {
                let v = remove(&mut out, s("from")?)?;
                add(&mut out, path, v)?;
            }
            "copy" => {
                let v = out.pointer(s("from")?).cloned().ok_or("\"from\" does not exist")?;
                add(&mut out, path, v)?;
            }
            "test" => {
                if out.pointer(path) != Some(&value()?) {
                    return Err(format!("test failed at {path:?}"));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_is_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_all_or_nothing() {
        let d = json!({"metadata": {"labels": {"a": "1"}}, "l": [1, 2]});
        let p = json!([
            {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
            {"op": "replace", "path": "/l/0", "value": 9},
            {"op": "add", "path": "/l/-", "value": 3},
            {"op": "test", "path": "/metadata/labels/a", "value": "1"}
        ]);
        let out = json_patch(&d, &p).unwrap();
        assert_eq!(out, json!({"metadata": {"labels": {"a": "1", "b/c": "2"}}, "l": [9, 2, 3]}));
        let failing =
            json!([{"op": "remove", "path": "/l/0"}, {"op": "test", "path": "/l/0", "value": 7}]);
        assert!(json_patch(&d, &failing).is_err());
        assert!(json_patch(&d, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }

    #[test]
    fn strategic_directives_are_found() {
        assert_eq!(
            strategic_directive(&json!({"spec": {"x": [{"$patch": "delete"}]}})).as_deref(),
            Some("$patch")
        );
        assert_eq!(strategic_directive(&json!({"metadata": {"labels": {"a": "b"}}})), None);
    }
}
