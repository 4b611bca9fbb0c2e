//! Structural-schema pruning, null handling and defaulting for custom
//! resources, as the apiextensions-apiserver does on every write.
//! (Validation — types, required, enums, CEL rules — is not done.)

use serde_json::{Map, Value};

fn flag(s: &Value, key: &str) -> bool {
    s.get(key).and_then(Value::as_bool) == Some(true)
}

/// Prunes unknown fields, drops `null` for non-nullable fields (or replaces it
/// by the default) and fills in defaults, for a whole custom resource.
pub(crate) fn prune_and_default(obj: &mut Value, schema: &Value) {
    walk(obj, schema, true);
}

fn walk(v: &mut Value, s: &Value, root: bool) {
    match v {
        Value::Object(m) => walk_object(m, s, root),
        Value::Array(items) => {
            if let Some(item_schema) = s.get("items") {
                for e in items.iter_mut() {
                    walk(e, item_schema, false);
                }
            }
        }
        _ => {}
    }
}

fn walk_object(m: &mut Map<String, Value>, s: &Value, root: bool) {
    let preserve = flag(s, "x-kubernetes-preserve-unknown-fields");
    let embedded = root || flag(s, "x-kubernetes-embedded-resource");
    let props = s.get("properties").and_then(Value::as_object);
    let additional = s.get("additionalProperties");
    if let Some(ap) = additional.filter(|a| a.is_object()) {
        // A map: every value follows the same schema.
        let nullable = flag(ap, "nullable");
        m.retain(|_, val| !val.is_null() || nullable);
        for val in m.values_mut() {
            walk(val, ap, false);
        }
        return;
    }
    let keep_all = preserve || additional.and_then(Value::as_bool) == Some(true);
    m.retain(|k, _| {
        keep_all
            || props.is_some_and(|p| p.contains_key(k))
            || (embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
    });
    let Some(props) = props else {
        return;
    };
    for (k, ps) in props {
        if embedded && k == "metadata" {
            continue;
        }
        match m.get_mut(k) {
            Some(Value::Null) if !flag(ps, "nullable") => match ps.get("default") {
                Some(d) => {
                    m.insert(k.clone(), d.clone());
                }
                None => {
                    m.remove(k);
                }
            },
            Some(val) => walk(val, ps, false),
            None => {
                if let Some(d) = ps.get("default") {
                    let mut d = d.clone();
                    walk(&mut d, ps, false);
                    m.insert(k.clone(), d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prunes_and_defaults() {
        let schema = json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "a": {"type": "boolean", "default": false},
                    "b": {"type": "string", "nullable": true},
                    "c": {"type": "string"},
                    "d": {"type": "string", "default": "x"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "list": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "string"}}}}
                }},
                "status": {"type": "object", "properties": {"ok": {"type": "boolean"}}}
            }
        });
        let mut o = json!({
            "apiVersion": "g/v1", "kind": "K", "metadata": {"name": "x", "anything": 1},
            "spec": {"b": null, "c": null, "d": null, "unknown": 1,
                     "labels": {"k": "v"}, "free": {"any": {"thing": 1}},
                     "list": [{"n": "a", "junk": 2}]},
            "status": {"ok": true, "extra": "dropped"},
            "top": "dropped"
        });
        prune_and_default(&mut o, &schema);
        assert_eq!(
            o,
            json!({
                "apiVersion": "g/v1", "kind": "K", "metadata": {"name": "x", "anything": 1},
                "spec": {"a": false, "b": null, "d": "x",
                         "labels": {"k": "v"}, "free": {"any": {"thing": 1}},
                         "list": [{"n": "a"}]},
                "status": {"ok": true}
            })
        );
    }
}
