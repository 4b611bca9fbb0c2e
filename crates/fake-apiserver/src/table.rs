//! `meta.k8s.io/v1` Table output (what `kubectl get` asks for) and the small
//! JSONPath subset printer columns use.

use serde_json::{Value, json};

use crate::resources::{PrinterColumn, ResourceDef};
use crate::util::{human_duration, now_secs, parse_rfc3339};

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    Wildcard,
    Filter {
        path: Vec<String>,
        op: Option<(bool, Value)>,
    },
}

fn parse_path(path: &str) -> Option<Vec<Step>> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(p);
    let p = p.strip_prefix('$').unwrap_or(p);
    let chars: Vec<char> = p.chars().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && chars[j] != '.' && chars[j] != '[' {
                    j += 1;
                }
                if j > start {
                    steps.push(Step::Field(chars[start..j].iter().collect()));
                }
                i = j;
            }
            '[' => {
                let mut depth = 0;
                let mut j = i;
                let mut quote: Option<char> = None;
                while j < chars.len() {
                    let c = chars[j];
                    match quote {
                        Some(q) if c == q => quote = None,
                        Some(_) => {}
                        None if c == '"' || c == '\'' => quote = Some(c),
                        None if c == '[' => depth += 1,
                        None if c == ']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        None => {}
                    }
                    j += 1;
                }
                if j >= chars.len() {
                    return None;
                }
                let inner: String = chars[i + 1..j].iter().collect();
                steps.push(parse_bracket(inner.trim())?);
                i = j + 1;
            }
            _ => {
                // A leading bare identifier (`spec.x`).
                let start = i;
                let mut j = i;
                while j < chars.len() && chars[j] != '.' && chars[j] != '[' {
                    j += 1;
                }
                steps.push(Step::Field(chars[start..j].iter().collect()));
                i = j;
            }
        }
    }
    Some(steps)
}

fn unquote(s: &str) -> Option<&str> {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .or_else(|| s.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
}

fn parse_bracket(inner: &str) -> Option<Step> {
    if inner == "*" {
        return Some(Step::Wildcard);
    }
    if let Ok(n) = inner.parse::<usize>() {
        return Some(Step::Index(n));
    }
    if let Some(key) = unquote(inner) {
        return Some(Step::Field(key.to_string()));
    }
    let expr = inner.strip_prefix("?(")?.strip_suffix(')')?.trim();
    let (lhs, op) = if let Some((l, r)) = expr.split_once("==") {
        (l, Some((false, r)))
    } else if let Some((l, r)) = expr.split_once("!=") {
        (l, Some((true, r)))
    } else {
        (expr, None)
    };
    let path: Vec<String> = lhs
        .trim()
        .strip_prefix("@.")?
        .split('.')
        .map(str::to_string)
        .collect();
    let op = match op {
        None => None,
        Some((negate, r)) => {
            let lit = match unquote(r) {
                Some(s) => Value::String(s.to_string()),
                None => serde_json::from_str(r.trim()).ok()?,
            };
            Some((negate, lit))
        }
    };
    Some(Step::Filter { path, op })
}

/// Evaluates a printer-column JSONPath; returns all matches in order.
pub(crate) fn jsonpath(obj: &Value, path: &str) -> Vec<Value> {
    let Some(steps) = parse_path(path) else {
        return Vec::new();
    };
    let mut cur: Vec<&Value> = vec![obj];
    for step in &steps {
        let mut next = Vec::new();
        for v in cur {
            match step {
                Step::Field(f) => {
                    if let Some(x) = v.get(f.as_str()) {
                        next.push(x);
                    }
                }
                Step::Index(n) => {
                    if let Some(x) = v.get(*n) {
                        next.push(x);
                    }
                }
                Step::Wildcard => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(m) => next.extend(m.values()),
                    _ => {}
                },
                Step::Filter { path, op } => {
                    if let Value::Array(a) = v {
                        for item in a {
                            let mut field = Some(item);
                            for p in path {
                                field = field.and_then(|f| f.get(p.as_str()));
                            }
                            let keep = match (field, op) {
                                (None, _) => false,
                                (Some(_), None) => true,
                                (Some(f), Some((negate, lit))) => (f == lit) != *negate,
                            };
                            if keep {
                                next.push(item);
                            }
                        }
                    }
                }
            }
        }
        cur = next;
    }
    cur.into_iter().cloned().collect()
}

fn cell(col: &PrinterColumn, obj: &Value) -> Value {
    let Some(v) = jsonpath(obj, &col.json_path).into_iter().next() else {
        return Value::Null;
    };
    match col.type_.as_str() {
        "date" => match v.as_str().and_then(parse_rfc3339) {
            Some(t) => Value::String(human_duration(now_secs() - t)),
            None => Value::Null,
        },
        "integer" => match &v {
            Value::Object(m) => json!(m.len()),
            Value::Array(a) => json!(a.len()),
            Value::String(s) => s.parse::<i64>().map(|n| json!(n)).unwrap_or(v),
            _ => v,
        },
        "string" => match v {
            Value::String(_) => v,
            Value::Null => Value::Null,
            other => Value::String(other.to_string()),
        },
        _ => v,
    }
}

/// How much of each object a Table row carries (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    None,
    Metadata,
    Object,
}

pub(crate) fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// Builds a Table for `objs` (already presented with apiVersion/kind).
pub(crate) fn table(
    def: &ResourceDef,
    objs: &[Value],
    metadata: Value,
    include: IncludeObject,
) -> Value {
    let default_cols = [PrinterColumn::age()];
    let cols: &[PrinterColumn] = if def.printer_columns.is_empty() {
        &default_cols
    } else {
        &def.printer_columns
    };
    let mut defs = vec![json!({
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
        "priority": 0,
    })];
    defs.extend(cols.iter().map(|c| {
        json!({
            "name": c.name,
            "type": c.type_,
            "format": c.format,
            "description": c.description,
            "priority": c.priority,
        })
    }));
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            cells.extend(cols.iter().map(|c| cell(c, o)));
            let mut row = json!({"cells": cells});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(o),
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"spec": {"x": 3, "list": [{"n": "a"}, {"n": "b"}]},
                       "status": {"conditions": [
                           {"type": "Other", "status": "False"},
                           {"type": "Ready", "status": "True"}]}});
        assert_eq!(jsonpath(&o, ".spec.x"), vec![json!(3)]);
        assert_eq!(jsonpath(&o, "{.spec.list[1].n}"), vec![json!("b")]);
        assert_eq!(
            jsonpath(&o, ".spec.list[*].n"),
            vec![json!("a"), json!("b")]
        );
        assert_eq!(
            jsonpath(&o, r#".status.conditions[?(@.type=="Ready")].status"#),
            vec![json!("True")]
        );
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type!='Ready')].type"),
            vec![json!("Other")]
        );
        assert_eq!(jsonpath(&o, ".spec['x']"), vec![json!(3)]);
        assert!(jsonpath(&o, ".nope.deeper").is_empty());
    }

    #[test]
    fn cells_by_type() {
        let o = json!({"data": {"a": "", "b": ""}, "flag": true});
        assert_eq!(
            cell(&PrinterColumn::new("D", "integer", ".data"), &o),
            json!(2)
        );
        assert_eq!(
            cell(&PrinterColumn::new("F", "string", ".flag"), &o),
            json!("true")
        );
        assert_eq!(
            cell(&PrinterColumn::new("M", "string", ".missing"), &o),
            Value::Null
        );
    }
}
