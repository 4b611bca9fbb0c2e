//! validate + resolve: a pure function from a `ProviderProxy` and the Secrets it names to
//! a [`Provider`] the data plane can run, or every problem found, each with its field path.
//!
//! Shared by the controller, the standalone loader and `provider-proxy check`, so all three
//! accept and reject exactly the same things.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use crate::crd::{CaSecretRef, ProviderProxy};
use crate::proxy_url::{Credentials, Password, ProxyUrl, mask_url};
use crate::snapshot::{CaBundle, Provider, ResolvedProxy, Timeouts, UpstreamUrl};

/// Why a provider is not (fully) usable. Also the `reason` of its `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidUpstream,
    InvalidProxyUrl,
    SecretNotFound,
    SecretKeyMissing,
    CredentialsConflict,
    InvalidCaBundle,
    InvalidTimeout,
    InvalidProbe,
    /// Two manifests define a provider of the same name (standalone mode).
    DuplicateProvider,
    /// A warning, not an error: the URL embeds credentials instead of naming a Secret.
    CredentialsInUrl,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidUpstream => "InvalidUpstream",
            Self::InvalidProxyUrl => "InvalidProxyUrl",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretKeyMissing => "SecretKeyMissing",
            Self::CredentialsConflict => "CredentialsConflict",
            Self::InvalidCaBundle => "InvalidCaBundle",
            Self::InvalidTimeout => "InvalidTimeout",
            Self::InvalidProbe => "InvalidProbe",
            Self::DuplicateProvider => "DuplicateProvider",
            Self::CredentialsInUrl => "CredentialsInUrl",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem with one field. Messages never contain a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldIssue {
    pub path: String,
    pub reason: Reason,
    pub message: String,
}

impl FieldIssue {
    fn new(path: impl Into<String>, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Secrets of the ProviderProxy's namespace, by name.
pub trait SecretLookup {
    fn secret(&self, name: &str) -> Option<&Secret>;
}

impl SecretLookup for BTreeMap<String, Secret> {
    fn secret(&self, name: &str) -> Option<&Secret> {
        self.get(name)
    }
}

impl SecretLookup for HashMap<String, Secret> {
    fn secret(&self, name: &str) -> Option<&Secret> {
        self.get(name)
    }
}

impl SecretLookup for BTreeMap<String, Arc<Secret>> {
    fn secret(&self, name: &str) -> Option<&Secret> {
        self.get(name).map(|s| s.as_ref())
    }
}

/// The names of the Secrets a ProviderProxy depends on (for watches and lookups).
pub fn referenced_secrets(pp: &ProviderProxy) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(proxy) = &pp.spec.proxy {
        names.extend(
            proxy
                .credentials_secret_ref
                .as_ref()
                .map(|r| r.name.clone()),
        );
        names.extend(proxy.ca_secret_ref.as_ref().map(|r| r.name.clone()));
    }
    if let Some(tls) = &pp.spec.tls {
        names.extend(tls.ca_secret_ref.as_ref().map(|r| r.name.clone()));
    }
    names.sort();
    names.dedup();
    names
}

/// The result of resolving one ProviderProxy: the provider, with warnings; or the errors.
pub type Resolution = Result<Provider, Vec<FieldIssue>>;

/// Validate `pp` and resolve everything it references.
pub fn resolve(pp: &ProviderProxy, secrets: &dyn SecretLookup, defaults: &Timeouts) -> Resolution {
    let spec = &pp.spec;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    let upstream = UpstreamUrl::parse(&spec.upstream)
        .map_err(|m| {
            errors.push(FieldIssue::new(
                "spec.upstream",
                Reason::InvalidUpstream,
                format!("{:?} {m}", mask_url(&spec.upstream)),
            ))
        })
        .ok();

    let proxy = spec.proxy.as_ref().and_then(|p| {
        let url = match ProxyUrl::parse(&p.url) {
            Ok(u) => u,
            Err(e) => {
                errors.push(FieldIssue::new(
                    "spec.proxy.url",
                    Reason::InvalidProxyUrl,
                    e.to_string(),
                ));
                return None;
            }
        };
        if url.has_credentials() {
            if p.credentials_secret_ref.is_some() {
                errors.push(FieldIssue::new(
                    "spec.proxy.url",
                    Reason::CredentialsConflict,
                    "has embedded credentials and spec.proxy.credentialsSecretRef is set too; keep only the Secret",
                ));
            } else {
                warnings.push(FieldIssue::new(
                    "spec.proxy.url",
                    Reason::CredentialsInUrl,
                    "embeds credentials; move them to a Secret and name it in spec.proxy.credentialsSecretRef",
                ));
            }
        }
        let credentials = match &p.credentials_secret_ref {
            None => url.credentials().cloned(),
            Some(r) => {
                let path = "spec.proxy.credentialsSecretRef";
                match secrets.secret(&r.name) {
                    None => {
                        errors.push(secret_not_found(path, &r.name));
                        None
                    }
                    Some(secret) => {
                        let user = secret_value(secret, r.username_key());
                        let pass = secret_value(secret, r.password_key());
                        match (user, pass) {
                            (Some(u), Some(p)) => Some(Credentials {
                                username: u,
                                password: Some(Password::new(p)),
                            }),
                            (u, p) => {
                                for (key, missing) in [
                                    (r.username_key(), u.is_none()),
                                    (r.password_key(), p.is_none()),
                                ] {
                                    if missing {
                                        errors.push(key_missing(path, &r.name, key));
                                    }
                                }
                                None
                            }
                        }
                    }
                }
            }
        };
        if credentials.as_ref().is_some_and(|c| c.password.is_some())
            && !url.scheme().supports_password()
        {
            errors.push(FieldIssue::new(
                "spec.proxy.url",
                Reason::InvalidProxyUrl,
                format!(
                    "{} proxies have no password authentication; remove the password or use socks5",
                    url.scheme()
                ),
            ));
        }
        let ca = p.ca_secret_ref.as_ref().and_then(|r| {
            ca_bundle(
                "spec.proxy.caSecretRef",
                r,
                secrets,
                &mut errors,
            )
        });
        if ca.is_some() && url.scheme() != crate::proxy_url::ProxyScheme::Https {
            warnings.push(FieldIssue::new(
                "spec.proxy.caSecretRef",
                Reason::InvalidCaBundle,
                format!("is only used for https:// proxies; this proxy is {}://", url.scheme()),
            ));
        }
        Some(ResolvedProxy {
            url: url.with_credentials(credentials),
            ca,
        })
    });

    let upstream_ca = spec
        .tls
        .as_ref()
        .and_then(|t| t.ca_secret_ref.as_ref())
        .and_then(|r| ca_bundle("spec.tls.caSecretRef", r, secrets, &mut errors));

    let mut timeouts = defaults.clone();
    if let Some(t) = &spec.timeouts {
        for (name, value, slot) in [
            ("connect", &t.connect, &mut timeouts.connect),
            ("headers", &t.headers, &mut timeouts.headers),
            ("body", &t.body, &mut timeouts.body),
        ] {
            if let Some(v) = value {
                match parse_duration(v) {
                    Ok(d) => *slot = d,
                    Err(m) => errors.push(FieldIssue::new(
                        format!("spec.timeouts.{name}"),
                        Reason::InvalidTimeout,
                        m,
                    )),
                }
            }
        }
    }

    let mut probe_interval = None;
    let mut probe_path = "/".to_owned();
    if let Some(p) = &spec.probe {
        if let Some(i) = &p.interval {
            match parse_duration(i) {
                Ok(d) if d >= Duration::from_secs(1) => probe_interval = Some(d),
                Ok(_) => errors.push(FieldIssue::new(
                    "spec.probe.interval",
                    Reason::InvalidProbe,
                    "must be at least 1s",
                )),
                Err(m) => errors.push(FieldIssue::new(
                    "spec.probe.interval",
                    Reason::InvalidProbe,
                    m,
                )),
            }
        }
        if let Some(path) = &p.path {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace()) {
                errors.push(FieldIssue::new(
                    "spec.probe.path",
                    Reason::InvalidProbe,
                    format!("{path:?} must start with / and contain no whitespace"),
                ));
            } else {
                probe_path = path.clone();
            }
        }
    }

    match upstream {
        Some(upstream) if errors.is_empty() => Ok(Provider {
            name: pp.name_any(),
            namespace: pp.namespace().unwrap_or_else(|| "default".to_owned()),
            upstream,
            proxy,
            upstream_ca,
            fallback_to_direct: spec.fallback_to_direct,
            http2: spec.http2,
            timeouts,
            probe_interval,
            probe_path,
            warnings,
        }),
        _ => Err(errors),
    }
}

fn secret_not_found(path: &str, name: &str) -> FieldIssue {
    FieldIssue::new(
        path,
        Reason::SecretNotFound,
        format!("Secret {name:?} not found in this namespace"),
    )
}

fn key_missing(path: &str, name: &str, key: &str) -> FieldIssue {
    FieldIssue::new(
        path,
        Reason::SecretKeyMissing,
        format!("Secret {name:?} has no key {key:?}"),
    )
}

/// A Secret's value by key, from `data` or (in manifests not yet applied) `stringData`.
fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    secret.data.as_ref().and_then(|d| d.get(key)).map(|b| {
        String::from_utf8_lossy(&b.0)
            .trim_end_matches(['\n', '\r'])
            .to_owned()
    })
}

fn ca_bundle(
    path: &str,
    r: &CaSecretRef,
    secrets: &dyn SecretLookup,
    errors: &mut Vec<FieldIssue>,
) -> Option<CaBundle> {
    let Some(secret) = secrets.secret(&r.name) else {
        errors.push(secret_not_found(path, &r.name));
        return None;
    };
    let Some(pem) = secret_value(secret, r.key()) else {
        errors.push(key_missing(path, &r.name, r.key()));
        return None;
    };
    match CaBundle::from_pem(&pem) {
        Ok(ca) => Some(ca),
        Err(m) => {
            errors.push(FieldIssue::new(
                path,
                Reason::InvalidCaBundle,
                format!("Secret {:?} key {:?} {m}", r.name, r.key()),
            ));
            None
        }
    }
}

/// `500ms`, `30s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration; use e.g. 500ms, 30s, 10m or 1h");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be greater than zero"));
    }
    Ok(d)
}
