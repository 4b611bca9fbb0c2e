//! The `ProviderProxy` custom resource (`providerproxy.dev/v1alpha1`).
//!
//! Field docs here become the CRD's descriptions, so they are written for
//! `kubectl explain providerproxy.spec`.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::proxy_url::mask_url;

pub const GROUP: &str = "providerproxy.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "ProviderProxy";

/// The `upstream` URLs the CRD admits: what `UpstreamUrl::parse` accepts, but for the
/// host and port, which the controller checks (status `Ready=False` with the reason). http
/// or https, a host, no credentials, query or fragment, a path of URI characters only.
/// RE2 syntax, as CEL's `matches` takes it; a test holds it to the parser.
pub const UPSTREAM_URL_PATTERN: &str =
    r"^\s*(?i:https?)://[^/?#@\s]+(/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*)?\s*$";

/// `kubectl apply` refuses a bad upstream at once, with this message, instead of the
/// provider going not-ready after the fact.
fn upstream_rule() -> kube::core::Rule {
    // In a CEL string literal a backslash is written twice.
    kube::core::Rule::new(format!(
        "self.matches(\"{}\")",
        UPSTREAM_URL_PATTERN.replace('\\', "\\\\")
    ))
    .message(
        "upstream must be an http:// or https:// URL without credentials, query or fragment, \
         with only URI characters in its path (percent-encode the rest)",
    )
}

/// Where one AI provider is reached, and how: through which outbound proxy, with which
/// credentials, and whether a proxy failure may fall back to a direct connection.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, PartialEq, Default)]
#[kube(
    group = "providerproxy.dev",
    version = "v1alpha1",
    kind = "ProviderProxy",
    namespaced,
    shortname = "pp",
    category = "all",
    doc = "ProviderProxy: how one AI provider is reached, through which outbound proxy, and what happens when that proxy fails.",
    status = "ProviderProxyStatus",
    printcolumn = r#"{"name":"Upstream","type":"string","description":"Provider endpoint","jsonPath":".spec.upstream"}"#,
    printcolumn = r#"{"name":"Proxy","type":"string","description":"Outbound proxy, password masked","jsonPath":".status.proxy"}"#,
    printcolumn = r#"{"name":"Fallback","type":"boolean","description":"Falls back to a direct connection when the proxy fails","jsonPath":".spec.fallbackToDirect"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"Whether the provider is usable","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Last Probe","type":"string","description":"Result of the last connection test","jsonPath":".status.lastProbe.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProviderProxySpec {
    /// Base URL of the provider's API, e.g. `https://api.anthropic.com`. Requests to
    /// `http://127.0.0.1:15080/<name>/<path>` go to `<upstream>/<path>`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = upstream_rule())]
    pub upstream: String,

    /// Outbound proxy for this provider. Omit it for a direct connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySpec>,

    /// Extra trust for the upstream's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,

    /// When establishing the proxy path fails (refused, DNS failure, connect timeout,
    /// handshake or CONNECT refused), send the request directly instead of answering 503.
    /// Never happens once a request byte reached the upstream. Bypassing the proxy may
    /// violate your network policy: enable it only where that is acceptable.
    #[serde(default)]
    pub fallback_to_direct: bool,

    /// Offer HTTP/2 to the upstream by ALPN, over every proxy type including SOCKS.
    #[serde(default)]
    pub http2: bool,

    /// Per-provider timeouts; each one left out takes the sidecar's default
    /// (`FETCH_CONNECT_TIMEOUT`, `FETCH_HEADERS_TIMEOUT`, `FETCH_BODY_TIMEOUT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,

    /// Connection test ("test proxy connection") settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeSpec>,
}

/// The outbound proxy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// Proxy URL: `http://`, `https://`, `socks5://`, `socks5h://` (name resolved by the proxy),
    /// `socks4://` or `socks4a://`, then `host[:port]`; IPv6 hosts in brackets
    /// (`http://[2001:db8::1]:8080`). At most 512 characters. Credentials embedded as
    /// `user:password@` are accepted but discouraged: use `credentialsSecretRef`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.size() <= 512").message("proxy.url must be at most 512 characters"))]
    #[x_kube(validation = Rule::new("self.matches('^(?i)(https?|socks5h?|socks4a?)://')").message("proxy.url must start with http://, https://, socks5://, socks5h://, socks4:// or socks4a://"))]
    pub url: String,

    /// Secret in the same namespace holding the proxy username and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,

    /// Secret holding the PEM CA bundle that signed an `https://` proxy's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

/// Debug masks the password a user may have embedded in the URL.
impl fmt::Debug for ProxySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxySpec")
            .field("url", &mask_url(&self.url))
            .field("credentials_secret_ref", &self.credentials_secret_ref)
            .field("ca_secret_ref", &self.ca_secret_ref)
            .finish()
    }
}

impl fmt::Debug for ProviderProxySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderProxySpec")
            .field("upstream", &mask_url(&self.upstream))
            .field("proxy", &self.proxy)
            .field("tls", &self.tls)
            .field("fallback_to_direct", &self.fallback_to_direct)
            .field("http2", &self.http2)
            .field("timeouts", &self.timeouts)
            .field("probe", &self.probe)
            .finish()
    }
}

/// A Secret with proxy credentials.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the ProviderProxy's namespace.
    pub name: String,
    /// Key holding the username. Default `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_key: Option<String>,
    /// Key holding the password. Default `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_key: Option<String>,
}

impl CredentialsSecretRef {
    pub fn username_key(&self) -> &str {
        self.username_key.as_deref().unwrap_or("username")
    }
    pub fn password_key(&self) -> &str {
        self.password_key.as_deref().unwrap_or("password")
    }
}

/// A Secret with a PEM CA bundle.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of the Secret, in the ProviderProxy's namespace.
    pub name: String,
    /// Key holding the PEM bundle. Default `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl CaSecretRef {
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or("ca.crt")
    }
}

/// Trust for the upstream's certificate beyond the public web roots.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// Secret with extra CA certificates (PEM) to trust for the upstream, e.g. the CA of a
    /// TLS-intercepting corporate proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

/// Timeouts as durations: `500ms`, `30s`, `10m`, `1h`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Establishing the connection, including the whole proxy handshake and TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')").message("use a duration such as 500ms, 30s, 10m or 1h"))]
    pub connect: Option<String>,
    /// Waiting for the response headers once the request is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')").message("use a duration such as 500ms, 30s, 10m or 1h"))]
    pub headers: Option<String>,
    /// The longest silence between two chunks of the response body (not the total).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')").message("use a duration such as 500ms, 30s, 10m or 1h"))]
    pub body: Option<String>,
}

/// How the controller tests the connection to the provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Probe again this often (`5m`); left out, the provider is probed only when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')").message("use a duration such as 30s, 5m or 1h"))]
    pub interval: Option<String>,
    /// Path requested on the upstream, default `/`. Any HTTP answer counts as reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
}

/// Observed state, written by the controller.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProviderProxyStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` says whether the provider can be used, and if not, why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The proxy in use, password masked (`http://user:***@proxy:8080`), or `direct`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// The last connection test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeResult>,
}

/// Outcome of one connection test through the provider's proxy to its upstream.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// When the probe ran (RFC 3339).
    pub time: String,
    /// Whether the upstream answered over HTTP.
    pub success: bool,
    /// The upstream's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Time to the response headers, in milliseconds.
    pub latency_ms: u64,
    /// Whether the answer came through the proxy (false: direct or fallback).
    pub used_proxy: bool,
    /// The proxy tried, password masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Error class on failure (refused, dns, timeout, proxy_auth, tunnel_refused, tls, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Short, human summary for `kubectl get`, e.g. `200 in 41ms via proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}
