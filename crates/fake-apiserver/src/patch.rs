//! Patch formats: JSON merge patch (RFC 7386), a strategic-merge-patch
//! approximation, JSON patch (RFC 6902) and a server-side-apply approximation.

use serde_json::{Map, Value};

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Merge key of a list of objects, if the list looks keyed.
fn list_merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let all_have =
        |k: &str| !items.is_empty() && items.iter().all(|i| i.get(k).is_some_and(|v| !v.is_null()));
    match field {
        "ownerReferences" if all_have("uid") => Some("uid"),
        "conditions" if all_have("type") => Some("type"),
        "ports" if all_have("containerPort") && !all_have("name") => Some("containerPort"),
        _ if all_have("name") => Some("name"),
        _ => None,
    }
}

/// Strategic merge patch, approximated: a JSON merge patch where lists of
/// objects carrying a merge key (`name`, `uid` for ownerReferences, `type` for
/// conditions) are merged element-wise, `finalizers` lists are unioned, and the
/// `$patch`, `$retainKeys`, `$setElementOrder/…` and
/// `$deleteFromPrimitiveList/…` directives are honoured or dropped.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut clean = p.clone();
            clean.remove("$patch");
            *target = Value::Object(clean);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch type: {other}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(existing)), Some(remove)) = (t.get_mut(field), v.as_array()) {
                existing.retain(|e| !remove.contains(e));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(existing)), Value::Array(items)) => {
                merge_list(k, existing, items)?;
            }
            (Some(existing @ Value::Object(_)), Value::Object(_)) => {
                strategic_merge(existing, v)?;
                if existing.is_null() {
                    t.remove(k);
                }
            }
            _ => {
                let mut fresh = Value::Null;
                strategic_merge(&mut fresh, v)?;
                if fresh.is_null() {
                    t.remove(k);
                } else {
                    t.insert(k.clone(), strip_directives(fresh));
                }
            }
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn merge_list(field: &str, existing: &mut Vec<Value>, items: &[Value]) -> Result<(), String> {
    if items.iter().all(Value::is_object)
        && !items.is_empty()
        && let Some(key) = list_merge_key(field, items)
    {
        {
            for item in items {
                let id = item.get(key).cloned();
                let pos = existing.iter().position(|e| e.get(key) == id.as_ref());
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        existing.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic_merge(&mut existing[i], item)?,
                    (None, false) => existing.push(strip_directives(item.clone())),
                }
            }
            return Ok(());
        }
    }
    if field == "finalizers" && items.iter().all(Value::is_string) {
        for item in items {
            if !existing.contains(item) {
                existing.push(item.clone());
            }
        }
        return Ok(());
    }
    *existing = items.iter().cloned().map(strip_directives).collect();
    Ok(())
}

fn strip_directives(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k, strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_directives).collect()),
        other => other,
    }
}

/// Why a JSON patch failed.
#[derive(Debug)]
pub(crate) struct JsonPatchError {
    pub(crate) message: String,
}

fn perr<T>(message: String) -> Result<T, JsonPatchError> {
    Err(JsonPatchError { message })
}

fn parse_pointer(p: &str) -> Result<Vec<String>, JsonPatchError> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = p.strip_prefix('/') else {
        return perr(format!("invalid JSON pointer {p:?}: must start with '/'"));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn resolve<'a>(doc: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get(t)?,
            Value::Array(a) => a.get(parse_index(t)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn resolve_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => a.get_mut(parse_index(t)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn parse_index(t: &str) -> Option<usize> {
    if t.is_empty() || (t.len() > 1 && t.starts_with('0')) || !t.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    t.parse().ok()
}

fn op_add(doc: &mut Value, path: &str, value: Value) -> Result<(), JsonPatchError> {
    let tokens = parse_pointer(path)?;
    let Some((last, parent)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match resolve_mut(doc, parent) {
        Some(Value::Object(m)) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            match parse_index(last) {
                Some(i) if i <= a.len() => {
                    a.insert(i, value);
                    Ok(())
                }
                _ => perr(format!(
                    "add operation does not apply: index out of bounds: {path}"
                )),
            }
        }
        _ => perr(format!(
            "add operation does not apply: doc is missing path: \"{path}\": missing value"
        )),
    }
}

fn op_remove(doc: &mut Value, path: &str, what: &str) -> Result<Value, JsonPatchError> {
    let tokens = parse_pointer(path)?;
    let Some((last, parent)) = tokens.split_last() else {
        return perr(format!(
            "{what} operation does not apply: cannot remove the root"
        ));
    };
    let removed = match resolve_mut(doc, parent) {
        Some(Value::Object(m)) => m.remove(last),
        Some(Value::Array(a)) => match parse_index(last) {
            Some(i) if i < a.len() => Some(a.remove(i)),
            _ => None,
        },
        _ => None,
    };
    match removed {
        Some(v) => Ok(v),
        None => perr(format!(
            "{what} operation does not apply: doc is missing path: \"{path}\": missing value"
        )),
    }
}

/// Applies an RFC 6902 JSON patch. A failed `test` says "test failed".
pub(crate) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), JsonPatchError> {
    let Some(ops) = ops.as_array() else {
        return perr("json patch must be a JSON array of operations".into());
    };
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let Some(path) = op.get("path").and_then(Value::as_str) else {
            return perr(format!("operation {op} is missing path"));
        };
        let value = || -> Result<Value, JsonPatchError> {
            op.get("value").cloned().ok_or_else(|| JsonPatchError {
                message: format!("operation {op} is missing value"),
            })
        };
        let from = || -> Result<&str, JsonPatchError> {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| JsonPatchError {
                    message: format!("operation {op} is missing from"),
                })
        };
        match kind {
            "add" => op_add(doc, path, value()?)?,
            "remove" => {
                op_remove(doc, path, "remove")?;
            }
            "replace" => {
                let v = value()?;
                let tokens = parse_pointer(path)?;
                match resolve_mut(doc, &tokens) {
                    Some(slot) => *slot = v,
                    None => {
                        return perr(format!(
                            "replace operation does not apply: doc is missing key: {path}: missing value"
                        ));
                    }
                }
            }
            "move" => {
                let from = from()?;
                if path.starts_with(&format!("{from}/")) {
                    return perr(format!(
                        "move operation does not apply: {from} is a prefix of {path}"
                    ));
                }
                let v = op_remove(doc, from, "move")?;
                op_add(doc, path, v)?;
            }
            "copy" => {
                let from = from()?;
                let tokens = parse_pointer(from)?;
                let Some(v) = resolve(doc, &tokens).cloned() else {
                    return perr(format!(
                        "copy operation does not apply: doc is missing from path: {from}"
                    ));
                };
                op_add(doc, path, v)?;
            }
            "test" => {
                let expected = op.get("value").cloned().unwrap_or(Value::Null);
                let tokens = parse_pointer(path)?;
                let actual = match tokens.split_last() {
                    None => Some(doc.clone()),
                    Some((last, parent)) => match resolve(doc, parent) {
                        // Like evanphx/json-patch: a missing key in an existing
                        // container reads as null.
                        Some(Value::Object(m)) => Some(m.get(last).cloned().unwrap_or(Value::Null)),
                        Some(Value::Array(a)) => parse_index(last).and_then(|i| a.get(i).cloned()),
                        _ => None,
                    },
                };
                match actual {
                    Some(actual) if actual == expected => {}
                    Some(_) => {
                        return perr(format!("testing value {path} failed: test failed"));
                    }
                    None => {
                        return perr(format!(
                            "test operation does not apply: doc is missing path: {path}: missing value"
                        ));
                    }
                }
            }
            other => return perr(format!("Unexpected kind: {other}")),
        }
    }
    Ok(())
}

/// Leaf paths of an applied configuration (arrays and scalars are leaves).
pub(crate) fn leaf_paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                leaf_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

/// Deep merge for server-side apply: objects merge recursively, everything
/// else (scalars, lists) is replaced by the applied value.
pub(crate) fn apply_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        apply_merge(existing, v);
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// Removes a path from a document; prunes maps left empty by the removal.
pub(crate) fn remove_path(doc: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Value::Object(m) = doc else {
        return;
    };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            m.remove(first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        let mut doc = json!({"a": [1, 2]});
        merge_patch(&mut doc, &json!({"a": [3]}));
        assert_eq!(doc, json!({"a": [3]}));
    }

    #[test]
    fn strategic_merges_keyed_lists() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]},
                             "metadata": {"finalizers": ["one"]}});
        strategic_merge(
            &mut doc,
            &json!({"spec": {"$setElementOrder/containers": [{"name": "a"}],
                             "containers": [{"name": "a", "image": "z"}, {"name": "b", "$patch": "delete"}]},
                    "metadata": {"finalizers": ["two"]}}),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"spec": {"containers": [{"name": "a", "image": "z"}]}, "metadata": {"finalizers": ["one", "two"]}})
        );
        strategic_merge(
            &mut doc,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["one"]}}),
        )
        .unwrap();
        assert_eq!(doc["metadata"]["finalizers"], json!(["two"]));
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"metadata": {"name": "x"}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["a"]},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "b"},
                {"op": "copy", "from": "/metadata/name", "path": "/metadata/n2"},
                {"op": "move", "from": "/metadata/n2", "path": "/metadata/n3"},
                {"op": "replace", "path": "/metadata/n3", "value": "y"},
                {"op": "test", "path": "/metadata/finalizers/1", "value": "b"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"name": "x", "finalizers": ["b"], "n3": "y"}})
        );
        let err = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": ["zzz"]}]),
        )
        .unwrap_err();
        assert!(err.message.contains("test failed"));
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/a/b", "value": null}])
            )
            .is_err()
        );
    }

    #[test]
    fn apply_merge_and_removal() {
        let mut doc = json!({"spec": {"a": 1, "b": {"c": 2}}, "status": {"x": [1]}});
        apply_merge(
            &mut doc,
            &json!({"spec": {"b": {"d": 3}}, "status": {"x": [2, 3]}}),
        );
        assert_eq!(
            doc,
            json!({"spec": {"a": 1, "b": {"c": 2, "d": 3}}, "status": {"x": [2, 3]}})
        );
        remove_path(&mut doc, &["spec".into(), "b".into(), "c".into()]);
        remove_path(&mut doc, &["spec".into(), "b".into(), "d".into()]);
        assert_eq!(doc["spec"], json!({"a": 1}));
        let mut out = Vec::new();
        leaf_paths(&json!({"a": {"b": 1, "c": []}}), &mut Vec::new(), &mut out);
        assert_eq!(out.len(), 2);
    }
}
