//! The in-memory object store, its history and the write rules.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::RecordedRequest;
use crate::errors::ApiError;
use crate::patch;
use crate::resources::{ResourceDef, builtins, crd_status, defs_from_crd};
use crate::select::{FieldSelector, LabelSelector};
use crate::util::{new_uid, now_rfc3339, random_suffix};

/// Storage key of a resource type: (group, plural).
pub(crate) type ResKey = (String, String);
/// Key of an object inside a resource type: (namespace or "", name).
pub(crate) type ObjKey = (String, String);

pub(crate) fn res_key(def: &ResourceDef) -> ResKey {
    (def.group.clone(), def.plural.clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// One change, kept in the history and broadcast to open watches.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) rv: u64,
    pub(crate) res: ResKey,
    pub(crate) kind: EventKind,
    pub(crate) object: Value,
    /// The object before a modification (for selector transitions).
    pub(crate) old: Option<Value>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct WriteOpts {
    pub(crate) dry_run: bool,
    pub(crate) field_manager: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct DeleteOpts {
    pub(crate) dry_run: bool,
    pub(crate) uid: Option<String>,
    pub(crate) resource_version: Option<String>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    Main,
    Status,
}

pub(crate) struct ListPage {
    pub(crate) items: Vec<Value>,
    pub(crate) rv: u64,
    pub(crate) cont: Option<String>,
    pub(crate) remaining: Option<usize>,
}

type ApplyKey = (ResKey, ObjKey, String, bool);

const MAX_RECORDED_REQUESTS: usize = 20_000;

pub(crate) struct State {
    pub(crate) defs: Vec<ResourceDef>,
    objects: HashMap<ResKey, BTreeMap<ObjKey, Value>>,
    pub(crate) rv: u64,
    /// Watches from a resourceVersion below this get 410 Expired.
    pub(crate) floor: u64,
    pub(crate) history: VecDeque<Arc<Event>>,
    history_limit: usize,
    applied: HashMap<ApplyKey, Value>,
    pub(crate) requests: VecDeque<RecordedRequest>,
    pub(crate) events_tx: broadcast::Sender<Arc<Event>>,
}

/// Sets `apiVersion`/`kind` for the version being served.
pub(crate) fn present(def: &ResourceDef, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        m.insert("apiVersion".into(), json!(def.api_version()));
        m.insert("kind".into(), json!(def.kind));
    }
    o
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj).and_then(|m| m.get(field)).and_then(Value::as_str)
}

fn take_meta(obj: &mut Value) -> Map<String, Value> {
    match obj.as_object_mut().and_then(|m| m.remove("metadata")) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn put_meta(obj: &mut Value, md: Map<String, Value>) {
    if let Value::Object(m) = obj {
        m.insert("metadata".into(), Value::Object(md));
    }
}

fn set_meta(obj: &mut Value, key: &str, v: Value) {
    let mut md = take_meta(obj);
    md.insert(key.into(), v);
    put_meta(obj, md);
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn is_subdomain(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_label(n: &str) -> bool {
    n.len() <= 63 && !n.contains('.') && is_subdomain(n)
}

/// Everything but metadata/status/apiVersion/kind: what `generation` tracks.
fn spec_part(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn encode_continue(rv: u64, key: &ObjKey) -> String {
    URL_SAFE_NO_PAD
        .encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [key.0, key.1]}).to_string())
}

fn decode_continue(token: &str) -> Option<(u64, ObjKey)> {
    let raw = URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')).ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    let rv = v.get("rv")?.as_u64()?;
    let start = v.get("start")?.as_array()?;
    Some((
        rv,
        (
            start.first()?.as_str()?.to_string(),
            start.get(1)?.as_str()?.to_string(),
        ),
    ))
}

/// Checks `kind`/`apiVersion` of a request body against the resource and
/// normalises them.
fn check_type(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    let Value::Object(m) = obj else {
        return Err(ApiError::bad_request(
            "the body of the request was not a JSON object",
        ));
    };
    let body = || Value::Object(m.clone()).to_string();
    let kind = m.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{}'",
            body()
        )));
    }
    let api_version = m
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'apiVersion' is missing in '{}'",
            body()
        )));
    }
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    if group != def.group || kind != def.kind {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            def.api_version()
        ))
        .with_kind_hint(kind, &def.kind));
    }
    m.insert("apiVersion".into(), json!(def.api_version()));
    m.insert("kind".into(), json!(def.kind));
    Ok(())
}

impl ApiError {
    fn with_kind_hint(self, got: &str, want: &str) -> ApiError {
        if got == want {
            self
        } else {
            ApiError::bad_request(format!(
                "the kind of the object ({got}) does not match the expected kind ({want})"
            ))
        }
    }
}

/// Folds `stringData` into `data` and checks base64.
fn prepare_secret(def: &ResourceDef, name: &str, obj: &mut Value) -> Result<(), ApiError> {
    let Value::Object(m) = obj else {
        return Ok(());
    };
    if let Some(sd) = m.remove("stringData") {
        match sd {
            Value::Object(sd) => {
                let data = m.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                if let Value::Object(data) = data {
                    for (k, v) in sd {
                        let raw = match v {
                            Value::String(s) => s,
                            Value::Null => String::new(),
                            other => other.to_string(),
                        };
                        data.insert(k, json!(STANDARD.encode(raw)));
                    }
                }
            }
            Value::Null => {}
            _ => {
                return Err(ApiError::bad_request(
                    "Secret in version \"v1\" cannot be handled as a Secret: stringData must be an object",
                ));
            }
        }
    }
    match m.get("data") {
        Some(Value::Null) => {
            m.remove("data");
        }
        Some(Value::Object(data)) => {
            for (k, v) in data {
                let ok = v.as_str().is_some_and(|s| STANDARD.decode(s).is_ok());
                if !ok {
                    return Err(ApiError::bad_request(format!(
                        "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data in data[{k:?}]"
                    )));
                }
                if !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    || k.is_empty()
                {
                    return Err(ApiError::invalid(
                        def,
                        name,
                        &format!("data[{k}]"),
                        "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                    ));
                }
            }
            if data.is_empty() {
                m.remove("data");
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "Secret in version \"v1\" cannot be handled as a Secret: data must be an object",
            ));
        }
        None => {}
    }
    if m.get("type")
        .is_none_or(|t| t.is_null() || t.as_str() == Some(""))
    {
        m.insert("type".into(), json!("Opaque"));
    }
    Ok(())
}

fn is_crd(def: &ResourceDef) -> bool {
    def.group == "apiextensions.k8s.io" && def.plural == "customresourcedefinitions"
}

fn is_core(def: &ResourceDef, plural: &str) -> bool {
    def.group.is_empty() && def.plural == plural
}

impl State {
    pub(crate) fn new(events_tx: broadcast::Sender<Arc<Event>>) -> State {
        State {
            defs: builtins(),
            objects: HashMap::new(),
            rv: 0,
            floor: 0,
            history: VecDeque::new(),
            history_limit: 5000,
            applied: HashMap::new(),
            requests: VecDeque::new(),
            events_tx,
        }
    }

    pub(crate) fn record(&mut self, r: RecordedRequest) {
        if self.requests.len() >= MAX_RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(r);
    }

    pub(crate) fn find_def(&self, group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.version == version && d.plural == plural)
            .cloned()
    }

    pub(crate) fn def_for(&self, api_version: &str, kind: &str) -> Option<ResourceDef> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.defs
            .iter()
            .find(|d| d.group == group && d.version == version && d.kind == kind)
            .cloned()
    }

    pub(crate) fn register(&mut self, def: ResourceDef) {
        match self
            .defs
            .iter_mut()
            .find(|d| d.group == def.group && d.version == def.version && d.plural == def.plural)
        {
            Some(existing) => *existing = def,
            None => self.defs.push(def),
        }
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, rv: u64, res: ResKey, kind: EventKind, object: Value, old: Option<Value>) {
        let e = Arc::new(Event {
            rv,
            res,
            kind,
            object,
            old,
        });
        self.history.push_back(e.clone());
        while self.history.len() > self.history_limit {
            if let Some(gone) = self.history.pop_front() {
                self.floor = gone.rv;
            }
        }
        // No receivers is fine.
        let _ = self.events_tx.send(e);
    }

    /// Forget the history: every resourceVersion handed out so far becomes too old.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        let rv = self.bump();
        self.floor = rv;
    }

    pub(crate) fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&res_key(def))?
            .get(&(ns.to_string(), name.to_string()))
    }

    /// Objects of a resource (optionally one namespace), in key order.
    pub(crate) fn iter_objects<'a>(
        &'a self,
        def: &ResourceDef,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> + 'a {
        self.objects
            .get(&res_key(def))
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(move |((ons, _), _)| ns.is_none_or(|n| n == ons))
    }

    pub(crate) fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let (rv, start) = match cont.filter(|c| !c.is_empty()) {
            Some(token) => {
                let (rv, key) = decode_continue(token).ok_or_else(|| {
                    ApiError::bad_request("continue key is not valid: illegal base64 data")
                })?;
                if rv < self.floor {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some(key))
            }
            None => (self.rv, None),
        };
        let matching: Vec<(&ObjKey, &Value)> = self
            .iter_objects(def, ns)
            .filter(|(k, _)| start.as_ref().is_none_or(|s| *k > s))
            .filter(|(_, v)| labels.matches(v) && fields.matches(v))
            .collect();
        let mut page = ListPage {
            items: Vec::new(),
            rv,
            cont: None,
            remaining: None,
        };
        let take = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        page.items = matching
            .iter()
            .take(take)
            .map(|(_, v)| present(def, v))
            .collect();
        if matching.len() > take
            && let Some((last, _)) = take.checked_sub(1).and_then(|i| matching.get(i))
        {
            page.cont = Some(encode_continue(rv, last));
            page.remaining = Some(matching.len() - take);
        }
        Ok(page)
    }

    /// Type-specific defaulting/validation shared by create and update.
    fn prepare(
        &self,
        def: &ResourceDef,
        name: &str,
        obj: &mut Value,
        create: bool,
    ) -> Result<(), ApiError> {
        if is_core(def, "secrets") {
            prepare_secret(def, name, obj)?;
        }
        if is_core(def, "namespaces") {
            if !is_label(name) {
                return Err(ApiError::invalid(
                    def,
                    name,
                    "metadata.name",
                    &format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
                    ),
                ));
            }
            if create {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
            }
        }
        if is_crd(def) {
            defs_from_crd(obj).map_err(|e| ApiError::invalid(def, name, "spec", &e))?;
            let created = meta_str(obj, "creationTimestamp")
                .map(str::to_string)
                .unwrap_or_else(now_rfc3339);
            obj["status"] = crd_status(obj, &created);
        }
        Ok(())
    }

    /// Runs after an object was stored or removed.
    fn after_write(&mut self, def: &ResourceDef, obj: &Value, deleted: bool) {
        if is_crd(def) {
            let Ok(defs) = defs_from_crd(obj) else {
                return;
            };
            let (group, plural) = (defs[0].group.clone(), defs[0].plural.clone());
            self.defs
                .retain(|d| !(d.group == group && d.plural == plural));
            if deleted {
                let key = (group, plural);
                if let Some(objs) = self.objects.remove(&key) {
                    for (_, mut o) in objs {
                        let rv = self.bump();
                        set_meta(&mut o, "resourceVersion", json!(rv.to_string()));
                        self.emit(rv, key.clone(), EventKind::Deleted, o, None);
                    }
                }
            } else {
                for d in defs {
                    self.register(d);
                }
            }
        }
        if deleted && is_core(def, "namespaces") {
            let ns = meta_str(obj, "name").unwrap_or_default().to_string();
            let keys: Vec<(ResourceDef, String)> = self
                .defs
                .iter()
                .filter(|d| d.namespaced)
                .flat_map(|d| {
                    self.iter_objects(d, Some(&ns))
                        .map(|((_, name), _)| (d.clone(), name.clone()))
                        .collect::<Vec<_>>()
                })
                .collect();
            let mut seen = std::collections::HashSet::new();
            for (d, name) in keys {
                if seen.insert((res_key(&d), name.clone())) {
                    let _ = self.delete(&d, &ns, &name, &DeleteOpts::default());
                }
            }
        }
    }

    pub(crate) fn create(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        check_type(def, &mut obj)?;
        let mut md = take_meta(&mut obj);
        if def.namespaced {
            match md.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    md.insert("namespace".into(), json!(ns));
                }
            }
        } else {
            md.remove("namespace");
        }
        if md
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut name = md
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let gen_name = md
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if gen_name.is_empty() {
                return Err(ApiError::invalid(
                    def,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
            name = format!("{gen_name}{}", random_suffix());
            md.insert("name".into(), json!(name));
        }
        if !is_subdomain(&name) {
            return Err(ApiError::invalid(
                def,
                &name,
                "metadata.name",
                &format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                ),
            ));
        }
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "selfLink",
            "resourceVersion",
        ] {
            md.remove(k);
        }
        md.insert("uid".into(), json!(new_uid()));
        md.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if def.track_generation {
            md.insert("generation".into(), json!(1));
        }
        put_meta(&mut obj, md);
        if self.get(def, ns, &name).is_some() {
            return Err(ApiError::already_exists(def, &name));
        }
        if def.status_subresource
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        self.prepare(def, &name, &mut obj, true)?;
        if let Some(schema) = &def.schema {
            crate::schema::prune_and_default(&mut obj, schema);
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let rv = self.bump();
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        self.objects
            .entry(res_key(def))
            .or_default()
            .insert((ns.to_string(), name), obj.clone());
        self.emit(rv, res_key(def), EventKind::Added, obj.clone(), None);
        self.after_write(def, &obj, false);
        Ok(obj)
    }

    /// PUT on the object or its status.
    pub(crate) fn update(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        mut new: Value,
        sub: Sub,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        check_type(def, &mut new)?;
        let old = self
            .get(def, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        if meta_str(&new, "resourceVersion")
            .unwrap_or_default()
            .is_empty()
            && !def.allow_unconditional_update
        {
            return Err(ApiError::invalid(
                def,
                name,
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            ));
        }
        self.commit_update(def, ns, name, &old, new, sub, opts)
    }

    /// The common tail of update and patch.
    #[allow(clippy::too_many_arguments)]
    fn commit_update(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        old: &Value,
        mut new: Value,
        sub: Sub,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        if !new.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        if let Some(n) = meta_str(&new, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        if def.namespaced
            && let Some(n) = meta_str(&new, "namespace")
            && !n.is_empty()
            && n != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let old_rv = meta_str(old, "resourceVersion")
            .unwrap_or_default()
            .to_string();
        let new_rv = meta_str(&new, "resourceVersion")
            .unwrap_or_default()
            .to_string();
        if !new_rv.is_empty() && new_rv != old_rv {
            return Err(ApiError::conflict(def, name));
        }
        if let Some(uid) = meta_str(&new, "uid")
            && !uid.is_empty()
            && Some(uid) != meta_str(old, "uid")
        {
            return Err(ApiError::conflict_msg(
                def,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(old, "uid").unwrap_or_default()
                ),
            ));
        }
        match sub {
            Sub::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                if let Value::Object(m) = &mut new {
                    match status {
                        Some(s) if !s.is_null() => {
                            m.insert("status".into(), s);
                        }
                        _ => {
                            m.remove("status");
                        }
                    }
                }
            }
            Sub::Main if def.status_subresource => {
                if let Value::Object(m) = &mut new {
                    match old.get("status") {
                        Some(s) => {
                            m.insert("status".into(), s.clone());
                        }
                        None => {
                            m.remove("status");
                        }
                    }
                }
            }
            Sub::Main => {}
        }
        // System fields come from the stored object.
        {
            let old_md = meta(old).cloned().unwrap_or_default();
            let mut md = take_meta(&mut new);
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
                "resourceVersion",
                "generateName",
            ] {
                match old_md.get(k) {
                    Some(v) => {
                        md.insert(k.into(), v.clone());
                    }
                    None => {
                        md.remove(k);
                    }
                }
            }
            md.remove("managedFields");
            md.remove("selfLink");
            for k in ["labels", "annotations", "finalizers", "ownerReferences"] {
                if md.get(k).is_some_and(Value::is_null) {
                    md.remove(k);
                }
            }
            put_meta(&mut new, md);
        }
        if let Value::Object(m) = &mut new {
            m.insert("apiVersion".into(), json!(def.api_version()));
            m.insert("kind".into(), json!(def.kind));
        }
        if sub == Sub::Main {
            self.prepare(def, name, &mut new, false)?;
            if is_core(def, "namespaces")
                && let Some(s) = old.get("status")
            {
                new["status"] = s.clone();
            }
        }
        if let Some(schema) = &def.schema {
            crate::schema::prune_and_default(&mut new, schema);
        }
        if is_core(def, "secrets") && new.get("type") != old.get("type") {
            return Err(ApiError::invalid(
                def,
                name,
                "type",
                "Invalid value: field is immutable",
            ));
        }
        if meta_str(old, "deletionTimestamp").is_some() {
            let before = finalizers(old);
            if let Some(f) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    def,
                    name,
                    "metadata.finalizers",
                    &format!(
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{f:?}}}"
                    ),
                ));
            }
        }
        if sub == Sub::Main && def.track_generation && spec_part(&new) != spec_part(old) {
            let generation = meta(old)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            set_meta(&mut new, "generation", json!(generation + 1));
        }
        if new == *old {
            // No-op writes do not bump resourceVersion and send no event.
            return Ok(old.clone());
        }
        if opts.dry_run {
            return Ok(new);
        }
        let rv = self.bump();
        set_meta(&mut new, "resourceVersion", json!(rv.to_string()));
        let key = (ns.to_string(), name.to_string());
        if meta_str(&new, "deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            if let Some(m) = self.objects.get_mut(&res_key(def)) {
                m.remove(&key);
            }
            self.forget_applied(def, &key);
            self.emit(rv, res_key(def), EventKind::Deleted, new.clone(), None);
            self.after_write(def, &new, true);
            return Ok(new);
        }
        self.objects
            .entry(res_key(def))
            .or_default()
            .insert(key, new.clone());
        self.emit(
            rv,
            res_key(def),
            EventKind::Modified,
            new.clone(),
            Some(old.clone()),
        );
        self.after_write(def, &new, false);
        Ok(new)
    }

    fn forget_applied(&mut self, def: &ResourceDef, key: &ObjKey) {
        let rk = res_key(def);
        self.applied
            .retain(|(r, k, _, _), _| !(r == &rk && k == key));
    }

    /// PATCH; returns the HTTP code (201 when server-side apply created the object).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &[u8],
        sub: Sub,
        opts: &WriteOpts,
    ) -> Result<(u16, Value), ApiError> {
        let ct = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let existing = self.get(def, ns, name).cloned();
        let parse_json = || -> Result<Value, ApiError> {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
        };
        let not_found = || ApiError::not_found(def, name);
        let new = match ct.as_str() {
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                return self.apply(def, ns, name, body, sub, existing, opts);
            }
            "application/merge-patch+json" => {
                let p = parse_json()?;
                if !p.is_object() {
                    return Err(ApiError::bad_request(
                        "error decoding patch: the merge patch must be a JSON object",
                    ));
                }
                let mut doc = existing.clone().ok_or_else(not_found)?;
                patch::merge_patch(&mut doc, &p);
                doc
            }
            "application/strategic-merge-patch+json" => {
                if !def.strategic_merge_patch {
                    return Err(ApiError::unsupported_media_type(format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (strategic merge patch is not supported for {})",
                        def.qualified()
                    )));
                }
                let p = parse_json()?;
                if !p.is_object() {
                    return Err(ApiError::bad_request(
                        "error decoding patch: the strategic merge patch must be a JSON object",
                    ));
                }
                let mut doc = existing.clone().ok_or_else(not_found)?;
                patch::strategic_merge(&mut doc, &p).map_err(ApiError::bad_request)?;
                doc
            }
            "application/json-patch+json" => {
                let p = parse_json()?;
                if !p.is_array() {
                    return Err(ApiError::bad_request(
                        "error decoding patch: json: cannot unmarshal object into Go value of type jsonpatch.Patch",
                    ));
                }
                let mut doc = existing.clone().ok_or_else(not_found)?;
                patch::json_patch(&mut doc, &p).map_err(|e| {
                    ApiError::new(422, "Invalid", e.message).with_details_of(def, name)
                })?;
                doc
            }
            other => {
                return Err(ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml{} (got {other:?})",
                    if def.strategic_merge_patch {
                        ", application/strategic-merge-patch+json"
                    } else {
                        ""
                    }
                )));
            }
        };
        let old = existing.ok_or_else(not_found)?;
        if new.get("kind") != old.get("kind") {
            return Err(ApiError::bad_request("a patch may not change the kind"));
        }
        let v = self.commit_update(def, ns, name, &old, new, sub, opts)?;
        Ok((200, v))
    }

    /// Server-side apply, approximated (see the crate README).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        body: &[u8],
        sub: Sub,
        existing: Option<Value>,
        opts: &WriteOpts,
    ) -> Result<(u16, Value), ApiError> {
        let mut applied: Value = serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "error decoding YAML: the applied configuration must be an object",
            ));
        }
        strip_nulls(&mut applied);
        let Some(manager) = opts.field_manager.clone().filter(|m| !m.is_empty()) else {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
            ));
        };
        check_type(def, &mut applied)?;
        match meta_str(&applied, "name") {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            Some(_) => {}
            None => {
                set_meta(&mut applied, "name", json!(name));
            }
        }
        let akey: ApplyKey = (
            res_key(def),
            (ns.to_string(), name.to_string()),
            manager,
            sub == Sub::Status,
        );
        let Some(old) = existing else {
            if sub == Sub::Status {
                return Err(ApiError::not_found(def, name));
            }
            let created = self.create(def, ns, applied.clone(), opts)?;
            if !opts.dry_run {
                self.applied.insert(akey, applied);
            }
            return Ok((201, created));
        };
        let mut merged = old.clone();
        if let Some(prev) = self.applied.get(&akey) {
            let (mut before, mut now) = (Vec::new(), Vec::new());
            patch::leaf_paths(prev, &mut Vec::new(), &mut before);
            patch::leaf_paths(&applied, &mut Vec::new(), &mut now);
            for path in before {
                let removable = match path.first().map(String::as_str) {
                    Some("apiVersion" | "kind") | None => false,
                    Some("metadata") => matches!(
                        path.get(1).map(String::as_str),
                        Some("labels" | "annotations" | "finalizers" | "ownerReferences")
                    ),
                    Some(_) => true,
                };
                let still_there = now
                    .iter()
                    .any(|p| p.starts_with(&path) || path.starts_with(p));
                if removable && !still_there {
                    patch::remove_path(&mut merged, &path);
                }
            }
        }
        patch::apply_merge(&mut merged, &applied);
        let v = self.commit_update(def, ns, name, &old, merged, sub, opts)?;
        if !opts.dry_run {
            self.applied.insert(akey, applied);
        }
        Ok((200, v))
    }

    pub(crate) fn delete(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        let old = self
            .get(def, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def, name))?;
        if let Some(uid) = opts.uid.as_deref()
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict_msg(
                def,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = opts.resource_version.as_deref()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict_msg(
                def,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
        let key = (ns.to_string(), name.to_string());
        if !finalizers(&old).is_empty() {
            if meta_str(&old, "deletionTimestamp").is_some() || opts.dry_run {
                return Ok(old);
            }
            let mut new = old.clone();
            let rv = self.bump();
            let mut md = take_meta(&mut new);
            md.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            md.insert("deletionGracePeriodSeconds".into(), json!(0));
            md.insert("resourceVersion".into(), json!(rv.to_string()));
            put_meta(&mut new, md);
            self.objects
                .entry(res_key(def))
                .or_default()
                .insert(key, new.clone());
            self.emit(
                rv,
                res_key(def),
                EventKind::Modified,
                new.clone(),
                Some(old),
            );
            return Ok(new);
        }
        if opts.dry_run {
            return Ok(old);
        }
        if let Some(m) = self.objects.get_mut(&res_key(def)) {
            m.remove(&key);
        }
        self.forget_applied(def, &key);
        let rv = self.bump();
        let mut gone = old;
        set_meta(&mut gone, "resourceVersion", json!(rv.to_string()));
        self.emit(rv, res_key(def), EventKind::Deleted, gone.clone(), None);
        self.after_write(def, &gone, true);
        Ok(gone)
    }
}

impl ApiError {
    fn with_details_of(mut self, def: &ResourceDef, name: &str) -> ApiError {
        let mut d = json!({"name": name, "kind": def.kind});
        if !def.group.is_empty() {
            d["group"] = json!(def.group);
        }
        self.details = Some(d);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(broadcast::channel(16).0)
    }

    fn secrets(s: &State) -> ResourceDef {
        s.find_def("", "v1", "secrets").unwrap()
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(7, &("ns".into(), "a".into()));
        assert_eq!(decode_continue(&t), Some((7, ("ns".into(), "a".into()))));
        assert_eq!(decode_continue("garbage!"), None);
    }

    #[test]
    fn create_update_generation_and_noop() {
        let mut s = state();
        let def = secrets(&s);
        let o = s
            .create(
                &def,
                "ns",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}, "stringData": {"k": "v"}}),
                &WriteOpts::default(),
            )
            .unwrap();
        assert_eq!(o["data"]["k"], "dg==");
        assert_eq!(o["type"], "Opaque");
        assert!(
            o["metadata"].get("generation").is_none(),
            "secrets have no generation"
        );
        let rv = s.rv;
        let same = s
            .update(&def, "ns", "a", o.clone(), Sub::Main, &WriteOpts::default())
            .unwrap();
        assert_eq!(s.rv, rv, "no-op update must not bump resourceVersion");
        assert_eq!(same, o);
        let mut changed = o.clone();
        changed["data"]["k"] = json!("dw==");
        let c = s
            .update(&def, "ns", "a", changed, Sub::Main, &WriteOpts::default())
            .unwrap();
        assert_ne!(
            c["metadata"]["resourceVersion"],
            o["metadata"]["resourceVersion"]
        );
        let err = s
            .update(&def, "ns", "a", o, Sub::Main, &WriteOpts::default())
            .unwrap_err();
        assert_eq!(err.code, 409);
        let bad = s
            .create(
                &def,
                "ns",
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "b"}, "data": {"k": "%%%"}}),
                &WriteOpts::default(),
            )
            .unwrap_err();
        assert_eq!(bad.code, 400);
    }
}
