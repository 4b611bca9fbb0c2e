//! The resolved configuration the data plane runs on: a versioned `Snapshot` of providers.
//!
//! Built by the standalone loader from files, or by the controller from the cluster, and
//! swapped into the sidecar atomically. Nothing here refers to Kubernetes clients.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::proxy_url::{ProxyHost, ProxyUrl, parse_host_port};
use crate::resolve::FieldIssue;

/// Request timeouts. Defaults are the reference's: 30 s connect, 600 s headers, 600 s body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect plus the whole proxy handshake plus TLS.
    pub connect: Duration,
    /// From the request sent to the response headers.
    pub headers: Duration,
    /// The longest gap between two response body chunks.
    pub body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(30_000),
            headers: Duration::from_millis(600_000),
            body: Duration::from_millis(600_000),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamScheme {
    Http,
    Https,
}

/// A provider's base URL: `https://api.anthropic.com[:port][/base/path]`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    pub scheme: UpstreamScheme,
    /// Host name or IP, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Base path without a trailing slash; empty for the root.
    pub base_path: String,
}

/// RFC 3986 `pchar`, `/` and `%` (percent-encoding is checked no further: the upstream
/// judges it).
fn is_uri_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(c)
}

impl UpstreamUrl {
    /// The error is a phrase to follow the URL in a message.
    pub fn parse(input: &str) -> Result<Self, String> {
        let input = input.trim();
        let (scheme, rest) = input
            .split_once("://")
            .ok_or("is not a URL; expected https://HOST[:PORT][/PATH]")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "https" => UpstreamScheme::Https,
            "http" => UpstreamScheme::Http,
            _ => return Err(format!("has scheme {scheme:?}; use https:// or http://")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("contains credentials; API keys belong in request headers".into());
        }
        if path.contains(['?', '#']) {
            return Err("has a query or fragment; give only the base URL".into());
        }
        // Every request's URI starts with this path: a space, a control character or a
        // non-ASCII one would make each of them fail (and a trailing newline would not
        // survive the trip to the sidecars; found by fuzzing the snapshot wire format).
        if let Some(c) = path.chars().find(|c| !is_uri_path_char(*c)) {
            return Err(format!(
                "has {c:?} in its path; percent-encode it (e.g. %20 for a space)"
            ));
        }
        if authority.is_empty() {
            return Err("has no host".into());
        }
        let (host, port) = parse_host_port(authority).map_err(|e| e.to_string())?;
        let port = port.unwrap_or(match scheme {
            UpstreamScheme::Https => 443,
            UpstreamScheme::Http => 80,
        });
        Ok(Self {
            scheme,
            host: match host {
                ProxyHost::Ip(ip) => ip.to_string(),
                ProxyHost::Name(n) => n,
            },
            port,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }

    pub fn is_https(&self) -> bool {
        self.scheme == UpstreamScheme::Https
    }

    fn default_port(&self) -> u16 {
        match self.scheme {
            UpstreamScheme::Https => 443,
            UpstreamScheme::Http => 80,
        }
    }

    /// `host[:port]` as the `Host` header carries it (port only when not the default).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `scheme://host:port`: the upstream's identity in pool keys.
    pub fn origin(&self) -> String {
        let scheme = match self.scheme {
            UpstreamScheme::Https => "https",
            UpstreamScheme::Http => "http",
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}", self.port)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            UpstreamScheme::Https => "https",
            UpstreamScheme::Http => "http",
        };
        write!(f, "{scheme}://{}{}", self.authority(), self.base_path)
    }
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamUrl({self})")
    }
}

/// A validated PEM bundle of one or more CA certificates.
#[derive(Clone, PartialEq, Eq)]
pub struct CaBundle {
    pem: Arc<str>,
    certs: Arc<[CertificateDer<'static>]>,
}

impl CaBundle {
    /// The error is a phrase to follow the bundle's name in a message.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("is not valid PEM: {e}"))?;
        if certs.is_empty() {
            return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        let mut roots = rustls::RootCertStore::empty();
        let (_, bad) = roots.add_parsable_certificates(certs.iter().cloned());
        if bad > 0 {
            return Err(format!(
                "holds {bad} certificate(s) that could not be parsed"
            ));
        }
        Ok(Self {
            pem: pem.into(),
            certs: certs.into(),
        })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaBundle({} certificates)", self.certs.len())
    }
}

/// The outbound proxy of a provider, with resolved credentials and CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedProxy {
    pub url: ProxyUrl,
    /// Trust for an `https://` proxy's certificate, beyond the process-wide roots.
    pub ca: Option<CaBundle>,
}

/// One provider, ready to serve. `Debug` masks the proxy password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub namespace: String,
    pub upstream: UpstreamUrl,
    pub proxy: Option<ResolvedProxy>,
    pub upstream_ca: Option<CaBundle>,
    pub fallback_to_direct: bool,
    pub http2: bool,
    pub timeouts: Timeouts,
    pub probe_interval: Option<Duration>,
    pub probe_path: String,
    pub warnings: Vec<FieldIssue>,
}

impl Provider {
    /// The proxy for logs, status and metrics: masked URL, or `direct`.
    pub fn proxy_display(&self) -> String {
        self.proxy
            .as_ref()
            .map_or_else(|| "direct".to_owned(), |p| p.url.to_string())
    }
}

/// Everything a sidecar serves at one moment. Immutable; replaced whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Monotonically increasing within one source (file loader or controller).
    pub version: u64,
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// Providers that are configured but unusable, with why: the router answers 503 with
    /// the reason instead of a bare 404.
    pub invalid: BTreeMap<String, Vec<FieldIssue>>,
}

impl Snapshot {
    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }

    /// A provider invalid here that `previous` served keeps `previous`'s config: an edit
    /// that breaks one provider, or a controller restarted while a Secret is missing (it has
    /// never seen the provider valid), must not take it away from running apps. Returns the
    /// providers kept so, with what is wrong with them now.
    pub fn keep_last_good(&mut self, previous: &Snapshot) -> Vec<(String, Vec<FieldIssue>)> {
        let names: Vec<String> = self
            .invalid
            .keys()
            .filter(|n| previous.providers.contains_key(*n))
            .cloned()
            .collect();
        let mut kept = Vec::with_capacity(names.len());
        for name in names {
            if let (Some(issues), Some(good)) =
                (self.invalid.remove(&name), previous.providers.get(&name))
            {
                self.providers.insert(name.clone(), good.clone());
                kept.push((name, issues));
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use crate::Manifests;

    fn snapshot(yaml: &str) -> super::Snapshot {
        let mut m = Manifests::default();
        m.parse_yaml("t", yaml).unwrap();
        m.build_snapshot(1, &Default::default())
    }

    fn pp(name: &str, secret: &str) -> String {
        format!(
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {name}}}\nspec:\n  upstream: https://{name}.example\n  proxy: {{url: \"http://proxy:3128\", credentialsSecretRef: {{name: {secret}}}}}\n"
        )
    }

    const SECRET: &str = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: login}\nstringData: {username: u, password: p}\n";

    #[test]
    fn a_provider_that_turns_invalid_keeps_its_last_good_config() {
        let before = snapshot(&(pp("a", "login") + &pp("gone", "login") + SECRET));
        assert!(before.providers.contains_key("a"));
        // The Secret is gone: a turns invalid, b was never valid, `gone` was deleted.
        let mut after = snapshot(&(pp("a", "login") + &pp("b", "login")));
        assert!(after.invalid.contains_key("a") && after.invalid.contains_key("b"));
        let kept = after.keep_last_good(&before);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, "a");
        assert!(
            kept[0].1[0].to_string().contains("login"),
            "{:?}",
            kept[0].1
        );
        assert_eq!(after.providers["a"], before.providers["a"]);
        assert!(!after.invalid.contains_key("a"));
        assert!(
            after.invalid.contains_key("b"),
            "never valid: stays invalid"
        );
        assert!(
            !after.providers.contains_key("gone"),
            "deleted: stays deleted"
        );
    }
}
