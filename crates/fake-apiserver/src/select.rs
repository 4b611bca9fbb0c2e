//! Label and field selectors.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct LabelReq {
    key: String,
    op: LabelOp,
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0_i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "unable to parse requirement: unbalanced ')' in {s:?}"
                    ));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!(
            "unable to parse requirement: unbalanced '(' in {s:?}"
        ));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 316
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_key(key: &str) -> Result<String, String> {
    if valid_key(key) {
        Ok(key.to_string())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label key {key:?}"
        ))
    }
}

fn check_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if valid_value(v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label value: {v:?}"
        ))
    }
}

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for term in split_top_level(s)? {
            let term = term.trim();
            if term.is_empty() {
                return Err(format!("unable to parse requirement: empty term in {s:?}"));
            }
            reqs.push(Self::parse_term(term)?);
        }
        Ok(LabelSelector(reqs))
    }

    fn parse_term(term: &str) -> Result<LabelReq, String> {
        if let Some(rest) = term.strip_prefix('!') {
            return Ok(LabelReq {
                key: check_key(rest.trim())?,
                op: LabelOp::NotExists,
            });
        }
        if let Some(open) = term.find('(') {
            let close = term
                .rfind(')')
                .filter(|c| *c > open && term[*c + 1..].trim().is_empty())
                .ok_or_else(|| format!("unable to parse requirement: {term:?}"))?;
            let head: Vec<&str> = term[..open].split_whitespace().collect();
            let values = term[open + 1..close]
                .split(',')
                .map(check_value)
                .collect::<Result<Vec<_>, _>>()?;
            return match head.as_slice() {
                [key, "in"] => Ok(LabelReq {
                    key: check_key(key)?,
                    op: LabelOp::In(values),
                }),
                [key, "notin"] => Ok(LabelReq {
                    key: check_key(key)?,
                    op: LabelOp::NotIn(values),
                }),
                _ => Err(format!("unable to parse requirement: {term:?}")),
            };
        }
        for (sep, kind) in [("!=", 0), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
            if let Some((k, v)) = term.split_once(sep) {
                let key = check_key(k.trim())?;
                let op = match kind {
                    0 => LabelOp::NotIn(vec![check_value(v)?]),
                    1 => LabelOp::In(vec![check_value(v)?]),
                    2 => LabelOp::Gt(v.trim().parse().map_err(|_| {
                        format!("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {term:?}")
                    })?),
                    _ => LabelOp::Lt(v.trim().parse().map_err(|_| {
                        format!("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {term:?}")
                    })?),
                };
                return Ok(LabelReq { key, op });
            }
        }
        if term.split_whitespace().count() != 1 {
            return Err(format!("unable to parse requirement: {term:?}"));
        }
        Ok(LabelReq {
            key: check_key(term)?,
            op: LabelOp::Exists,
        })
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.0.iter().all(|r| {
            let v = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match &r.op {
                LabelOp::In(vals) => v.is_some_and(|v| vals.iter().any(|x| x == v)),
                LabelOp::NotIn(vals) => v.is_none_or(|v| !vals.iter().any(|x| x == v)),
                LabelOp::Exists => v.is_some(),
                LabelOp::NotExists => v.is_none(),
                LabelOp::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

/// A parsed `fieldSelector`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    /// `allowed` lists the fields besides `metadata.name`/`metadata.namespace`
    /// that this resource supports (without a leading dot).
    pub(crate) fn parse(s: &str, allowed: &[String]) -> Result<FieldSelector, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for term in s.split(',') {
            let term = term.trim();
            let (path, value, negate) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let path = path.trim();
            let known = path == "metadata.name"
                || path == "metadata.namespace"
                || allowed.iter().any(|a| a.trim_start_matches('.') == path);
            if !known {
                return Err(format!(
                    "field label not supported: {path} (supported: \"metadata.name\", \"metadata.namespace\"{})",
                    allowed
                        .iter()
                        .map(|a| format!(", {:?}", a.trim_start_matches('.')))
                        .collect::<String>()
                ));
            }
            reqs.push(FieldReq {
                path: path.to_string(),
                value: value.trim().to_string(),
                negate,
            });
        }
        Ok(FieldSelector(reqs))
    }

    /// Both selectors must match.
    pub(crate) fn merge(mut a: FieldSelector, b: FieldSelector) -> FieldSelector {
        a.0.extend(b.0);
        a
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let mut cur = Some(obj);
            for part in r.path.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let actual = match cur {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == r.value) != r.negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "type": "Opaque"})
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({"app": "web", "tier": "front", "n": "5"}));
        let t = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(t(""));
        assert!(t("app=web"));
        assert!(t("app==web,tier"));
        assert!(!t("app!=web"));
        assert!(t("app in (web, db),tier notin (back)"));
        assert!(!t("app notin (web)"));
        assert!(t("!missing"));
        assert!(!t("!app"));
        assert!(t("n>4,n<6"));
        assert!(t("other!=x"));
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let allowed = vec!["type".to_string()];
        let t = |s: &str| FieldSelector::parse(s, &allowed).unwrap().matches(&o);
        assert!(t("metadata.name=a"));
        assert!(t("metadata.name==a,metadata.namespace=ns"));
        assert!(!t("metadata.name!=a"));
        assert!(t("type=Opaque"));
        assert!(FieldSelector::parse("spec.x=1", &allowed).is_err());
        assert!(FieldSelector::parse("nonsense", &allowed).is_err());
    }
}
