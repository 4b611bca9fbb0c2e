//! The snapshot wire format: what the controller pushes to sidecars and what a sidecar
//! caches on disk. It carries credentials, so it has no `Debug`, it is only ever
//! serialized into the authenticated push stream or a 0600 cache file, and decoding
//! re-validates everything (a corrupt snapshot is rejected, never half-applied).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proxy_url::{Credentials, Password, ProxyUrl};
use crate::resolve::{FieldIssue, Reason};
use crate::snapshot::{CaBundle, Provider, ResolvedProxy, Snapshot, Timeouts, UpstreamUrl};

/// Largest snapshot a sidecar accepts (bytes of JSON).
pub const MAX_WIRE_SNAPSHOT: usize = 16 * 1024 * 1024;

#[derive(Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireSnapshot {
    pub version: u64,
    pub namespace: String,
    #[serde(default)]
    pub providers: Vec<WireProvider>,
    /// Provider name → human-readable problems.
    #[serde(default)]
    pub invalid: BTreeMap<String, Vec<String>>,
}

#[derive(Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireProvider {
    pub name: String,
    pub upstream: String,
    /// `scheme://host:port`, no credentials (those follow apart: a Secret's password has
    /// no length limit, unlike the URL a user writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_ca_pem: Option<String>,
    #[serde(default)]
    pub fallback_to_direct: bool,
    #[serde(default)]
    pub http2: bool,
    pub connect_timeout_ms: u64,
    pub headers_timeout_ms: u64,
    pub body_timeout_ms: u64,
}

/// Why a wire snapshot was rejected. Never contains a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("snapshot is not valid JSON for this version of provider-proxy: {0}")]
    Json(String),
    #[error("snapshot larger than {MAX_WIRE_SNAPSHOT} bytes")]
    TooLarge,
    #[error("provider {name:?}: {message}")]
    Provider { name: String, message: String },
}

impl WireSnapshot {
    pub fn from_snapshot(namespace: &str, s: &Snapshot) -> Self {
        Self {
            version: s.version,
            namespace: namespace.to_owned(),
            providers: s
                .providers
                .values()
                .map(|p| WireProvider::from_provider(p))
                .collect(),
            invalid: s
                .invalid
                .iter()
                .map(|(n, issues)| (n.clone(), issues.iter().map(|i| i.to_string()).collect()))
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_WIRE_SNAPSHOT {
            return Err(WireError::TooLarge);
        }
        // serde_json messages quote at most a few bytes of input, never whole strings, but
        // keep only the position to be safe: the input holds passwords.
        serde_json::from_slice(bytes).map_err(|e| {
            WireError::Json(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }

    /// Validate and build the snapshot the data plane runs on.
    pub fn into_snapshot(self) -> Result<Snapshot, WireError> {
        let mut providers = BTreeMap::new();
        for p in self.providers {
            let name = p.name.clone();
            let provider =
                p.into_provider(&self.namespace)
                    .map_err(|message| WireError::Provider {
                        name: name.clone(),
                        message,
                    })?;
            providers.insert(name, Arc::new(provider));
        }
        let invalid = self
            .invalid
            .into_iter()
            .map(|(n, msgs)| {
                let issues = msgs
                    .into_iter()
                    .map(|m| FieldIssue {
                        path: "spec".into(),
                        reason: Reason::InvalidUpstream,
                        message: m,
                    })
                    .collect();
                (n, issues)
            })
            .collect();
        Ok(Snapshot {
            version: self.version,
            providers,
            invalid,
        })
    }
}

impl WireProvider {
    fn from_provider(p: &Provider) -> Self {
        Self {
            name: p.name.clone(),
            upstream: p.upstream.to_string(),
            proxy_url: p.proxy.as_ref().map(|x| x.url.origin()),
            proxy_username: p
                .proxy
                .as_ref()
                .and_then(|x| x.url.credentials())
                .map(|c| c.username.clone()),
            proxy_password: p
                .proxy
                .as_ref()
                .and_then(|x| x.url.credentials())
                .and_then(|c| c.password.as_ref())
                .map(|pw| pw.expose().to_owned()),
            proxy_ca_pem: p
                .proxy
                .as_ref()
                .and_then(|x| x.ca.as_ref())
                .map(|c| c.pem().to_owned()),
            upstream_ca_pem: p.upstream_ca.as_ref().map(|c| c.pem().to_owned()),
            fallback_to_direct: p.fallback_to_direct,
            http2: p.http2,
            connect_timeout_ms: p.timeouts.connect.as_millis() as u64,
            headers_timeout_ms: p.timeouts.headers.as_millis() as u64,
            body_timeout_ms: p.timeouts.body.as_millis() as u64,
        }
    }

    fn into_provider(self, namespace: &str) -> Result<Provider, String> {
        let upstream = UpstreamUrl::parse(&self.upstream).map_err(|m| format!("upstream {m}"))?;
        let ca = |pem: Option<String>, what: &str| {
            pem.map(|p| CaBundle::from_pem(&p).map_err(|m| format!("{what} {m}")))
                .transpose()
        };
        let proxy =
            match self.proxy_url {
                Some(u) => Some(ResolvedProxy {
                    url: ProxyUrl::parse(&u)
                        .map_err(|e| format!("proxy URL {e}"))
                        .and_then(|url| {
                            if url.has_credentials() {
                                return Err(
                                    "proxy URL carries credentials; they travel apart".to_owned()
                                );
                            }
                            Ok(url.with_credentials(
                                match (self.proxy_username, self.proxy_password) {
                                    (None, None) => None,
                                    (u, p) => Some(Credentials {
                                        username: u.unwrap_or_default(),
                                        password: p.map(Password::new),
                                    }),
                                },
                            ))
                        })?,
                    ca: ca(self.proxy_ca_pem, "proxy CA")?,
                }),
                None => None,
            };
        let ms = |v: u64, what: &str| {
            if v == 0 {
                Err(format!("{what} timeout must be greater than 0"))
            } else {
                Ok(Duration::from_millis(v))
            }
        };
        Ok(Provider {
            name: self.name,
            namespace: namespace.to_owned(),
            upstream,
            proxy,
            upstream_ca: ca(self.upstream_ca_pem, "upstream CA")?,
            fallback_to_direct: self.fallback_to_direct,
            http2: self.http2,
            timeouts: Timeouts {
                connect: ms(self.connect_timeout_ms, "connect")?,
                headers: ms(self.headers_timeout_ms, "headers")?,
                body: ms(self.body_timeout_ms, "body")?,
            },
            probe_interval: None,
            probe_path: "/".into(),
            warnings: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifests;

    #[test]
    fn round_trip_keeps_credentials_and_rejects_corruption() {
        let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: s, namespace: ai}
stringData: {username: "u@x", password: "p@ss:w/rd%"}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {name: a, namespace: ai}
spec:
  upstream: https://api.anthropic.com/v1
  fallbackToDirect: true
  http2: true
  timeouts: {connect: 2s}
  proxy: {url: "socks5h://[::1]:1080", credentialsSecretRef: {name: s}}
"#;
        let mut m = Manifests::default();
        m.parse_yaml("t", yaml).unwrap();
        let snap = m.build_snapshot(42, &Timeouts::default());
        let wire = WireSnapshot::from_snapshot("ai", &snap);
        let json = wire.to_json();
        let back = WireSnapshot::from_json(json.as_bytes())
            .unwrap()
            .into_snapshot()
            .unwrap();
        let (a, b) = (&snap.providers["a"], &back.providers["a"]);
        assert_eq!(back.version, 42);
        assert_eq!(a.proxy, b.proxy);
        assert_eq!(a.upstream, b.upstream);
        assert_eq!(a.timeouts, b.timeouts);
        assert_eq!(
            b.proxy
                .as_ref()
                .unwrap()
                .url
                .credentials()
                .unwrap()
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "p@ss:w/rd%"
        );

        // Credentials travel apart from the URL: a 2000-character Secret password (no
        // user-facing length limit applies to it) survives the wire (found by fuzzing).
        let long = "p@ss/".repeat(400);
        let mut m2 = Manifests::default();
        m2.parse_yaml("t", &yaml.replace("p@ss:w/rd%", &long))
            .unwrap();
        let snap2 = m2.build_snapshot(43, &Timeouts::default());
        let back2 = WireSnapshot::from_json(
            WireSnapshot::from_snapshot("ai", &snap2)
                .to_json()
                .as_bytes(),
        )
        .unwrap()
        .into_snapshot()
        .unwrap();
        assert_eq!(back2.providers["a"].proxy, snap2.providers["a"].proxy);
        assert!(
            !json.contains("u%40x:"),
            "no credentialed URL on the wire: {json}"
        );

        // Corrupt: bad JSON, unknown field, invalid proxy URL, zero timeout.
        assert!(matches!(
            WireSnapshot::from_json(b"{not json"),
            Err(WireError::Json(_))
        ));
        assert!(WireSnapshot::from_json(br#"{"version":1,"namespace":"a","x":1}"#).is_err());
        let bad = json.replace("socks5h://", "ftp://");
        let e = WireSnapshot::from_json(bad.as_bytes())
            .unwrap()
            .into_snapshot()
            .unwrap_err();
        assert!(e.to_string().contains("unsupported scheme"), "{e}");
        assert!(!e.to_string().contains("p%40ss"), "{e}");
        let zero = json.replace("\"connectTimeoutMs\":2000", "\"connectTimeoutMs\":0");
        assert!(
            WireSnapshot::from_json(zero.as_bytes())
                .unwrap()
                .into_snapshot()
                .is_err()
        );
    }
}
