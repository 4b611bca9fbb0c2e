//! Just enough Kubernetes protobuf decoding for the request bodies kubectl's
//! typed clients send (`kubectl create secret|configmap|namespace|serviceaccount`):
//! the `k8s\0` + `runtime.Unknown` envelope, ObjectMeta and those kinds.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut out = 0_u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        out |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err("varint too long".into())
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, String> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(b, &mut pos)?),
            1 => {
                pos += 8;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(b, &mut pos)?).map_err(|_| "length too large")?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= b.len())
                    .ok_or("truncated field")?;
                let bytes = &b[pos..end];
                pos = end;
                Wire::Bytes(bytes)
            }
            5 => {
                pos += 4;
                Wire::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        if pos > b.len() {
            return Err("truncated field".into());
        }
        out.push((key >> 3, wire));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
}

/// `map<string, string>` / `map<string, bytes>` entry.
fn map_entry(b: &[u8]) -> Result<(String, Vec<u8>), String> {
    let (mut k, mut v) = (String::new(), Vec::new());
    for (f, w) in fields(b)? {
        match (f, w) {
            (1, Wire::Bytes(x)) => k = string(x)?,
            (2, Wire::Bytes(x)) => v = x.to_vec(),
            _ => {}
        }
    }
    Ok((k, v))
}

fn insert_str_entry(m: &mut Map<String, Value>, field: &str, b: &[u8]) -> Result<(), String> {
    let (k, v) = map_entry(b)?;
    let entry = m.entry(field).or_insert_with(|| json!({}));
    entry[k] = Value::String(string(&v)?);
    Ok(())
}

fn insert_bytes_entry(m: &mut Map<String, Value>, field: &str, b: &[u8]) -> Result<(), String> {
    let (k, v) = map_entry(b)?;
    let entry = m.entry(field).or_insert_with(|| json!({}));
    entry[k] = Value::String(STANDARD.encode(v));
    Ok(())
}

fn owner_reference(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    for (f, w) in fields(b)? {
        match (f, w) {
            (1, Wire::Bytes(x)) => {
                m.insert("kind".into(), json!(string(x)?));
            }
            (3, Wire::Bytes(x)) => {
                m.insert("name".into(), json!(string(x)?));
            }
            (4, Wire::Bytes(x)) => {
                m.insert("uid".into(), json!(string(x)?));
            }
            (5, Wire::Bytes(x)) => {
                m.insert("apiVersion".into(), json!(string(x)?));
            }
            (6, Wire::Varint(v)) => {
                m.insert("controller".into(), json!(v != 0));
            }
            (7, Wire::Varint(v)) => {
                m.insert("blockOwnerDeletion".into(), json!(v != 0));
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    let mut owners = Vec::new();
    let mut finalizers = Vec::new();
    for (f, w) in fields(b)? {
        let Wire::Bytes(x) = w else { continue };
        let key = match f {
            1 => "name",
            2 => "generateName",
            3 => "namespace",
            6 => "resourceVersion",
            11 => {
                insert_str_entry(&mut m, "labels", x)?;
                continue;
            }
            12 => {
                insert_str_entry(&mut m, "annotations", x)?;
                continue;
            }
            13 => {
                owners.push(owner_reference(x)?);
                continue;
            }
            14 => {
                finalizers.push(json!(string(x)?));
                continue;
            }
            _ => continue,
        };
        let s = string(x)?;
        if !s.is_empty() {
            m.insert(key.into(), json!(s));
        }
    }
    if !owners.is_empty() {
        m.insert("ownerReferences".into(), Value::Array(owners));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    Ok(Value::Object(m))
}

/// Decodes a `application/vnd.kubernetes.protobuf` body into JSON.
pub(crate) fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(b"k8s\x00")
        .ok_or("missing the k8s protobuf magic prefix")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (f, w) in fields(rest)? {
        match (f, w) {
            (1, Wire::Bytes(tm)) => {
                for (tf, tw) in fields(tm)? {
                    match (tf, tw) {
                        (1, Wire::Bytes(x)) => api_version = string(x)?,
                        (2, Wire::Bytes(x)) => kind = string(x)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    for (f, w) in fields(raw)? {
        match (kind.as_str(), f, w) {
            (_, 1, Wire::Bytes(x)) => {
                obj.insert("metadata".into(), object_meta(x)?);
            }
            ("Secret", 2, Wire::Bytes(x)) => insert_bytes_entry(&mut obj, "data", x)?,
            ("Secret", 3, Wire::Bytes(x)) => {
                obj.insert("type".into(), json!(string(x)?));
            }
            ("Secret", 4, Wire::Bytes(x)) => insert_str_entry(&mut obj, "stringData", x)?,
            ("Secret", 5, Wire::Varint(v)) | ("ConfigMap", 4, Wire::Varint(v)) => {
                obj.insert("immutable".into(), json!(v != 0));
            }
            ("ConfigMap", 2, Wire::Bytes(x)) => insert_str_entry(&mut obj, "data", x)?,
            ("ConfigMap", 3, Wire::Bytes(x)) => insert_bytes_entry(&mut obj, "binaryData", x)?,
            ("Namespace", 2, Wire::Bytes(x)) => {
                let mut fins = Vec::new();
                for (sf, sw) in fields(x)? {
                    if let (1, Wire::Bytes(s)) = (sf, sw) {
                        fins.push(json!(string(s)?));
                    }
                }
                if !fins.is_empty() {
                    obj.insert("spec".into(), json!({"finalizers": fins}));
                }
            }
            ("ServiceAccount", 4, Wire::Varint(v)) => {
                obj.insert("automountServiceAccountToken".into(), json!(v != 0));
            }
            ("Secret" | "ConfigMap" | "Namespace" | "ServiceAccount", _, _) => {}
            (other, _, _) => {
                return Err(format!(
                    "the fake API server decodes protobuf only for Secret, ConfigMap, Namespace and ServiceAccount, not {other}; send JSON"
                ));
            }
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_kubectl_create_secret() {
        // Captured from `kubectl create secret generic s2 --from-literal=a=b`.
        let body: &[u8] = b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x2b\x0a\x19\x0a\x02s2\x12\x00\x1a\x07default\x22\x00\x2a\x00\x32\x00\x38\x00\x42\x00\x12\x06\x0a\x01a\x12\x01b\x1a\x06Opaque\x1a\x00\x22\x00";
        let v = decode(body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s2", "namespace": "default"},
                   "data": {"a": "Yg=="}, "type": "Opaque"})
        );
        assert!(decode(b"nope").is_err());
        assert!(decode(b"k8s\x00\x0a\xff").is_err());
    }
}
