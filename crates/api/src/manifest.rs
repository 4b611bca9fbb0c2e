//! Reading the manifests users `kubectl apply`: multi-document YAML with ProviderProxies and
//! Secrets (other kinds are skipped), and turning a set of them into a [`Snapshot`].

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use serde::Deserialize;

use crate::crd::{GROUP, KIND, ProviderProxy};
use crate::resolve::{FieldIssue, resolve};
use crate::snapshot::{Snapshot, Timeouts};

/// The objects found in one or more YAML sources.
#[derive(Default)]
pub struct Manifests {
    pub providers: Vec<ProviderProxy>,
    pub secrets: Vec<Secret>,
    /// Kinds present but ignored (`Namespace`, `Deployment`, …), for a debug log.
    pub skipped: Vec<String>,
}

/// A document that could not be read. Messages never quote Secret values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {document}: {message}")]
pub struct ManifestError {
    pub source_name: String,
    /// 1-based index of the YAML document.
    pub document: usize,
    pub message: String,
}

impl Manifests {
    /// Parse one YAML stream. All-or-nothing: one bad document fails the whole source, so a
    /// half-edited file never replaces a good one piecemeal.
    pub fn parse_yaml(&mut self, source_name: &str, yaml: &str) -> Result<(), ManifestError> {
        let mut found = Manifests::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let err = |message: String| ManifestError {
                source_name: source_name.to_owned(),
                document: i + 1,
                message,
            };
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(yaml_error(&e)))?;
            if value.is_null() {
                continue;
            }
            let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
            let (api_version, kind) = (field("apiVersion"), field("kind"));
            if api_version.is_empty() || kind.is_empty() {
                return Err(err(
                    "not a Kubernetes object: apiVersion and kind are required".into(),
                ));
            }
            match (api_version.split_once('/').map_or("", |(g, _)| g), kind) {
                (GROUP, KIND) => {
                    let pp: ProviderProxy = serde_yaml::from_value(value)
                        .map_err(|e| err(format!("invalid ProviderProxy: {}", yaml_error(&e))))?;
                    if pp.metadata.name.as_deref().unwrap_or("").is_empty() {
                        return Err(err("ProviderProxy has no metadata.name".into()));
                    }
                    found.providers.push(pp);
                }
                ("", "Secret") => {
                    // Secret errors must not echo the value serde choked on.
                    let secret: Secret = serde_yaml::from_value(value).map_err(|_| {
                        err("invalid Secret: data values must be base64 strings, stringData values strings".into())
                    })?;
                    if secret.metadata.name.as_deref().unwrap_or("").is_empty() {
                        return Err(err("Secret has no metadata.name".into()));
                    }
                    found.secrets.push(secret);
                }
                _ => found.skipped.push(format!("{api_version}/{kind}")),
            }
        }
        self.providers.append(&mut found.providers);
        self.secrets.append(&mut found.secrets);
        self.skipped.append(&mut found.skipped);
        Ok(())
    }

    /// Resolve every provider. Manifests without a namespace are in `default`, as `kubectl
    /// apply` would put them; Secrets are looked up in the provider's namespace only.
    pub fn build_snapshot(&self, version: u64, defaults: &Timeouts) -> Snapshot {
        let mut by_namespace: BTreeMap<String, BTreeMap<String, Secret>> = BTreeMap::new();
        for s in &self.secrets {
            by_namespace
                .entry(namespace_of(s.namespace()))
                .or_default()
                .insert(s.name_any(), s.clone());
        }
        let empty = BTreeMap::new();
        let mut snapshot = Snapshot {
            version,
            ..Snapshot::default()
        };
        for pp in &self.providers {
            let name = pp.name_any();
            let secrets = by_namespace
                .get(&namespace_of(pp.namespace()))
                .unwrap_or(&empty);
            if snapshot.providers.contains_key(&name) || snapshot.invalid.contains_key(&name) {
                snapshot.invalid.insert(
                    name.clone(),
                    vec![FieldIssue {
                        path: "metadata.name".into(),
                        reason: crate::resolve::Reason::DuplicateProvider,
                        message: format!("provider {name:?} is defined more than once"),
                    }],
                );
                snapshot.providers.remove(&name);
                continue;
            }
            match resolve(pp, secrets, defaults) {
                Ok(p) => {
                    snapshot.providers.insert(name, Arc::new(p));
                }
                Err(issues) => {
                    snapshot.invalid.insert(name, issues);
                }
            }
        }
        snapshot
    }
}

fn namespace_of(ns: Option<String>) -> String {
    ns.unwrap_or_else(|| "default".to_owned())
}

/// serde_yaml errors can quote the offending scalar; keep only the location and the kind.
fn yaml_error(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(l) => format!(
            "line {} column {}: {}",
            l.line(),
            l.column(),
            msg.split(" at line ").next().unwrap_or(&msg)
        ),
        None => msg,
    }
}
