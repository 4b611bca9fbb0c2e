//! Resource types known to the fake: definitions, built-ins, CRD parsing and
//! the discovery documents built from them.

use serde_json::{Value, json};

/// One column of `kubectl get` output (a CRD `additionalPrinterColumns` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrinterColumn {
    /// Column header, e.g. `Ready`.
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: String,
    /// OpenAPI format hint (may be empty).
    pub format: String,
    /// Human description.
    pub description: String,
    /// 0 = shown by default, >0 = only with `-o wide`.
    pub priority: i64,
    /// Simple JSONPath: `.spec.x`, `.a[0].b`, `.status.conditions[?(@.type=="Ready")].status`.
    pub json_path: String,
}

impl PrinterColumn {
    /// A priority-0 column.
    pub fn new(name: &str, type_: &str, json_path: &str) -> PrinterColumn {
        PrinterColumn {
            name: name.to_string(),
            type_: type_.to_string(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: json_path.to_string(),
        }
    }

    /// The usual `Age` column (`.metadata.creationTimestamp`, type `date`).
    pub fn age() -> PrinterColumn {
        PrinterColumn::new("Age", "date", ".metadata.creationTimestamp")
    }
}

/// A resource type served by the fake (one group/version/plural).
///
/// Objects are stored per group and plural, so several versions of one
/// resource share storage (conversion only rewrites `apiVersion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group, `""` for the core group.
    pub group: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `Secret`.
    pub kind: String,
    /// Kind of lists, normally `<Kind>List`.
    pub list_kind: String,
    /// Plural resource name used in URLs, e.g. `secrets`.
    pub plural: String,
    /// Singular name, e.g. `secret`.
    pub singular: String,
    /// Short names accepted by kubectl, e.g. `cm`.
    pub short_names: Vec<String>,
    /// Categories, e.g. `all`.
    pub categories: Vec<String>,
    /// Namespaced (`true`) or cluster-scoped.
    pub namespaced: bool,
    /// Whether a `/status` subresource exists (main-resource writes then ignore `.status`
    /// and status writes change only `.status`).
    pub status_subresource: bool,
    /// Verbs advertised in discovery and allowed on the resource.
    pub verbs: Vec<String>,
    /// Columns for `kubectl get` (Table output). Empty means `Name` + `Age`.
    pub printer_columns: Vec<PrinterColumn>,
    /// Extra field-selector fields besides `metadata.name`/`metadata.namespace`
    /// (dotted paths such as `type` or `spec.color`).
    pub selectable_fields: Vec<String>,
    /// Whether `PUT` without `metadata.resourceVersion` is allowed (custom
    /// resources: no; most built-ins: yes).
    pub allow_unconditional_update: bool,
    /// Whether `application/strategic-merge-patch+json` is accepted (built-ins
    /// yes, custom resources no: 415 like a real server).
    pub strategic_merge_patch: bool,
    /// Structural `openAPIV3Schema` (custom resources): when set, writes are
    /// pruned of unknown fields and defaulted like a real server does.
    pub schema: Option<Value>,
    /// Whether `metadata.generation` is kept (1 on create, +1 when anything but
    /// metadata/status changes). True for custom resources and by default;
    /// false for the built-ins that have none (Secret, ConfigMap, Lease, ...).
    pub track_generation: bool,
}

const STANDARD_VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl ResourceDef {
    /// A namespaced resource with the standard verbs, no subresources, singular
    /// = lowercased kind, list kind = `<Kind>List`.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str) -> ResourceDef {
        ResourceDef {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            list_kind: format!("{kind}List"),
            plural: plural.to_string(),
            singular: kind.to_lowercase(),
            short_names: Vec::new(),
            categories: Vec::new(),
            namespaced: true,
            status_subresource: false,
            verbs: STANDARD_VERBS.iter().map(|s| s.to_string()).collect(),
            printer_columns: Vec::new(),
            selectable_fields: Vec::new(),
            allow_unconditional_update: true,
            strategic_merge_patch: true,
            schema: None,
            track_generation: true,
        }
    }

    /// Makes the resource cluster-scoped.
    pub fn cluster_scoped(mut self) -> ResourceDef {
        self.namespaced = false;
        self
    }

    /// Adds the `/status` subresource.
    pub fn with_status_subresource(mut self) -> ResourceDef {
        self.status_subresource = true;
        self
    }

    /// Sets the short names.
    pub fn with_short_names(mut self, names: &[&str]) -> ResourceDef {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Appends a printer column.
    pub fn with_printer_column(mut self, c: PrinterColumn) -> ResourceDef {
        self.printer_columns.push(c);
        self
    }

    /// Replaces the verbs.
    pub fn with_verbs(mut self, verbs: &[&str]) -> ResourceDef {
        self.verbs = verbs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Keeps no `metadata.generation` (like Secrets, ConfigMaps, Leases).
    pub fn without_generation(mut self) -> ResourceDef {
        self.track_generation = false;
        self
    }

    /// Sets the structural schema used for pruning and defaulting.
    pub fn with_schema(mut self, schema: Value) -> ResourceDef {
        self.schema = Some(schema);
        self
    }

    /// Behaves like a custom resource: no strategic merge patch, no
    /// unconditional update.
    pub fn as_custom_resource(mut self) -> ResourceDef {
        self.allow_unconditional_update = false;
        self.strategic_merge_patch = false;
        self
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` or `plural.group`, as used in error messages.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub(crate) fn has_verb(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == verb)
    }

    pub(crate) fn discovery_entries(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

/// The resources every fake serves from the start.
pub(crate) fn builtins() -> Vec<ResourceDef> {
    let age = PrinterColumn::age;
    let mut defs = vec![
        ResourceDef::new("", "v1", "Namespace", "namespaces")
            .cluster_scoped()
            .with_status_subresource()
            .with_short_names(&["ns"])
            .with_printer_column(PrinterColumn::new("Status", "string", ".status.phase"))
            .with_printer_column(age()),
        ResourceDef {
            selectable_fields: vec!["type".into()],
            ..ResourceDef::new("", "v1", "Secret", "secrets")
                .with_printer_column(PrinterColumn::new("Type", "string", ".type"))
                .with_printer_column(PrinterColumn::new("Data", "integer", ".data"))
                .with_printer_column(age())
        },
        ResourceDef::new("", "v1", "ConfigMap", "configmaps")
            .with_short_names(&["cm"])
            .with_printer_column(PrinterColumn::new("Data", "integer", ".data"))
            .with_printer_column(age()),
        ResourceDef::new("", "v1", "ServiceAccount", "serviceaccounts")
            .with_short_names(&["sa"])
            .with_printer_column(age()),
        ResourceDef {
            selectable_fields: [
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..ResourceDef::new("", "v1", "Event", "events")
                .with_short_names(&["ev"])
                .with_printer_column(PrinterColumn::new("Type", "string", ".type"))
                .with_printer_column(PrinterColumn::new("Reason", "string", ".reason"))
                .with_printer_column(PrinterColumn::new(
                    "Object",
                    "string",
                    ".involvedObject.name",
                ))
                .with_printer_column(PrinterColumn::new("Message", "string", ".message"))
        },
        ResourceDef {
            selectable_fields: [
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "reason",
                "reportingController",
                "type",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..ResourceDef::new("events.k8s.io", "v1", "Event", "events")
                .with_short_names(&["ev"])
                .with_printer_column(PrinterColumn::new("Type", "string", ".type"))
                .with_printer_column(PrinterColumn::new("Reason", "string", ".reason"))
                .with_printer_column(PrinterColumn::new("Object", "string", ".regarding.name"))
                .with_printer_column(PrinterColumn::new("Note", "string", ".note"))
        },
        ResourceDef::new("coordination.k8s.io", "v1", "Lease", "leases")
            .with_printer_column(PrinterColumn::new(
                "Holder",
                "string",
                ".spec.holderIdentity",
            ))
            .with_printer_column(age()),
        ResourceDef::new("authentication.k8s.io", "v1", "TokenReview", "tokenreviews")
            .cluster_scoped()
            .with_verbs(&["create"]),
        ResourceDef {
            categories: vec!["api-extensions".into()],
            ..ResourceDef::new(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
            )
            .cluster_scoped()
            .with_status_subresource()
            .with_short_names(&["crd", "crds"])
            .with_printer_column(PrinterColumn {
                description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
                ..PrinterColumn::new("Created At", "date", ".metadata.creationTimestamp")
            })
        },
    ];
    // Only CRDs among the built-ins keep metadata.generation.
    for d in &mut defs {
        d.track_generation = d.group == "apiextensions.k8s.io";
    }
    defs
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the served versions of an `apiextensions.k8s.io/v1` CustomResourceDefinition.
pub(crate) fn defs_from_crd(crd: &Value) -> Result<Vec<ResourceDef>, String> {
    if str_at(crd, "/kind") != Some("CustomResourceDefinition") {
        return Err("not a CustomResourceDefinition".into());
    }
    let group = str_at(crd, "/spec/group").ok_or("spec.group is required")?;
    let kind = str_at(crd, "/spec/names/kind").ok_or("spec.names.kind is required")?;
    let plural = str_at(crd, "/spec/names/plural").ok_or("spec.names.plural is required")?;
    let singular = str_at(crd, "/spec/names/singular")
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let list_kind = str_at(crd, "/spec/names/listKind")
        .map(str::to_string)
        .unwrap_or_else(|| format!("{kind}List"));
    let namespaced = match str_at(crd, "/spec/scope") {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => {
            return Err(format!(
                "spec.scope must be Namespaced or Cluster, got {other:?}"
            ));
        }
    };
    let expected_name = format!("{plural}.{group}");
    if let Some(name) = str_at(crd, "/metadata/name")
        && name != expected_name
    {
        return Err(format!(
            "metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group ({expected_name:?})"
        ));
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions is required")?;
    let mut defs = Vec::new();
    for v in versions {
        let name = str_at(v, "/name").ok_or("spec.versions[].name is required")?;
        if !v.get("served").and_then(Value::as_bool).unwrap_or(false) {
            continue;
        }
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: str_at(c, "/name").unwrap_or_default().to_string(),
                        type_: str_at(c, "/type").unwrap_or("string").to_string(),
                        format: str_at(c, "/format").unwrap_or_default().to_string(),
                        description: str_at(c, "/description").unwrap_or_default().to_string(),
                        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        json_path: str_at(c, "/jsonPath").unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let selectable_fields = v
            .get("selectableFields")
            .and_then(Value::as_array)
            .map(|f| {
                f.iter()
                    .filter_map(|x| str_at(x, "/jsonPath"))
                    .map(|p| p.trim_start_matches('.').to_string())
                    .collect()
            })
            .unwrap_or_default();
        defs.push(ResourceDef {
            group: group.to_string(),
            version: name.to_string(),
            kind: kind.to_string(),
            list_kind: list_kind.clone(),
            plural: plural.to_string(),
            singular: singular.clone(),
            short_names: str_list(crd.pointer("/spec/names/shortNames")),
            categories: str_list(crd.pointer("/spec/names/categories")),
            namespaced,
            status_subresource: v.pointer("/subresources/status").is_some(),
            verbs: STANDARD_VERBS.iter().map(|s| s.to_string()).collect(),
            printer_columns,
            selectable_fields,
            allow_unconditional_update: false,
            strategic_merge_patch: false,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            track_generation: true,
        });
    }
    if defs.is_empty() {
        return Err("the CustomResourceDefinition serves no version".into());
    }
    Ok(defs)
}

/// The status a real apiextensions-apiserver writes for an accepted CRD.
pub(crate) fn crd_status(crd: &Value, now: &str) -> Value {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names.clone();
    if let Some(kind) = names.get("kind").and_then(Value::as_str) {
        if accepted.get("singular").is_none() {
            accepted["singular"] = json!(kind.to_lowercase());
        }
        if accepted.get("listKind").is_none() {
            accepted["listKind"] = json!(format!("{kind}List"));
        }
    }
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now,
             "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": now,
             "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
        ],
        "storedVersions": stored,
    })
}

/// Sort key following Kubernetes version priority: GA > beta > alpha, then
/// higher numbers first; non-matching versions last, alphabetically.
fn version_priority(v: &str) -> (u8, i64, i64, String) {
    let parse = || -> Option<(u8, i64, i64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: i64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((0, -major, 0));
        }
        for (label, rank) in [("beta", 1_u8), ("alpha", 2_u8)] {
            if let Some(n) = tail.strip_prefix(label) {
                let minor: i64 = if n.is_empty() { 0 } else { n.parse().ok()? };
                return Some((rank, -major, -minor));
            }
        }
        None
    };
    match parse() {
        Some((rank, major, minor)) => (rank, major, minor, String::new()),
        None => (3, 0, 0, v.to_string()),
    }
}

/// `/api`.
pub(crate) fn api_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}],
    })
}

fn group_versions(defs: &[ResourceDef], group: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for d in defs.iter().filter(|d| d.group == group) {
        if !versions.contains(&d.version) {
            versions.push(d.version.clone());
        }
    }
    versions.sort_by_key(|v| version_priority(v));
    versions
}

/// One `APIGroup` document, or `None` if the group is unknown.
pub(crate) fn api_group(defs: &[ResourceDef], group: &str) -> Option<Value> {
    let versions = group_versions(defs, group);
    let preferred = versions.first()?;
    let gv = |v: &String| json!({"groupVersion": format!("{group}/{v}"), "version": v});
    Some(json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions.iter().map(gv).collect::<Vec<_>>(),
        "preferredVersion": gv(preferred),
    }))
}

/// `/apis` as a legacy `APIGroupList`.
pub(crate) fn api_group_list(defs: &[ResourceDef]) -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for d in defs.iter().filter(|d| !d.group.is_empty()) {
        if !groups.contains(&d.group.as_str()) {
            groups.push(&d.group);
        }
    }
    let groups: Vec<Value> = groups
        .iter()
        .filter_map(|g| {
            let mut v = api_group(defs, g)?;
            if let Some(m) = v.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            Some(v)
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/api/v1` or `/apis/<group>/<version>` as an `APIResourceList`.
pub(crate) fn api_resource_list(defs: &[ResourceDef], group: &str, version: &str) -> Option<Value> {
    let matching: Vec<&ResourceDef> = defs
        .iter()
        .filter(|d| d.group == group && d.version == version)
        .collect();
    if matching.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = matching
        .iter()
        .flat_map(|d| d.discovery_entries())
        .collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

fn resource_v2(d: &ResourceDef) -> Value {
    let kind = json!({"group": d.group, "version": d.version, "kind": d.kind});
    let mut r = json!({
        "resource": d.plural,
        "responseKind": kind,
        "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": d.singular,
        "verbs": d.verbs,
    });
    if !d.short_names.is_empty() {
        r["shortNames"] = json!(d.short_names);
    }
    if !d.categories.is_empty() {
        r["categories"] = json!(d.categories);
    }
    if d.status_subresource {
        r["subresources"] = json!([{
            "subresource": "status",
            "responseKind": kind,
            "verbs": ["get", "patch", "update"],
        }]);
    }
    r
}

/// `/api` (`core`) or `/apis` as an aggregated `APIGroupDiscoveryList`
/// (`api_version` is `apidiscovery.k8s.io/v2` or `.../v2beta1`).
pub(crate) fn aggregated_discovery(defs: &[ResourceDef], core: bool, api_version: &str) -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for d in defs.iter().filter(|d| d.group.is_empty() == core) {
        if !groups.contains(&d.group.as_str()) {
            groups.push(&d.group);
        }
    }
    let items: Vec<Value> = groups
        .iter()
        .map(|g| {
            let versions: Vec<Value> = group_versions(defs, g)
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = defs
                        .iter()
                        .filter(|d| d.group == *g && &d.version == v)
                        .map(resource_v2)
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let mut md = json!({"creationTimestamp": null});
            if !g.is_empty() {
                md["name"] = json!(g);
            }
            json!({"metadata": md, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": api_version,
        "metadata": {},
        "items": items,
    })
}

/// `/version`.
pub(crate) fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0",
        "gitCommit": "60a317eadfcb839692a68eab88b2096f4d708f4f",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T13:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ordering() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "v1beta1", "foo"];
        v.sort_by_key(|x| version_priority(x));
        assert_eq!(v, vec!["v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }

    #[test]
    fn crd_parsing() {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"kind": "Widget", "plural": "widgets", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                     "additionalPrinterColumns": [{"name": "Ready", "type": "string", "jsonPath": ".status.ready"}]},
                    {"name": "v0", "served": false, "storage": false}
                ]}
        });
        let defs = defs_from_crd(&crd).unwrap();
        assert_eq!(defs.len(), 1);
        assert_eq!(defs[0].singular, "widget");
        assert!(defs[0].status_subresource);
        assert_eq!(defs[0].printer_columns[0].json_path, ".status.ready");
        let list = api_resource_list(&defs, "example.com", "v1").unwrap();
        assert_eq!(list["resources"][1]["name"], "widgets/status");
    }
}
