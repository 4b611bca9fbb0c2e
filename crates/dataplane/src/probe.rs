//! "Test proxy connection": one request through exactly the path real requests take
//! (same connectors, same TLS), reporting status, latency and whether the proxy was used.

use std::time::{Duration, Instant};

use http::{Method, Request, header};
use http_body_util::Empty;
use provider_proxy_api::Provider;

use crate::error::{ConnectError, ErrorClass};
use crate::forward::upstream_path;
use crate::pool::{AgentPool, Path, RequestBody, SendError};

/// What a probe found. `proxy` is masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub success: bool,
    pub http_status: Option<u16>,
    pub latency: Duration,
    pub used_proxy: bool,
    pub proxy: Option<String>,
    pub error: Option<ErrorClass>,
    pub message: Option<String>,
}

impl ProbeOutcome {
    /// One line for humans and `kubectl get`: `200 in 41ms via proxy`.
    pub fn summary(&self) -> String {
        let via = if self.used_proxy {
            "via proxy"
        } else {
            "direct"
        };
        match (self.http_status, self.error) {
            (Some(s), _) => format!("{s} in {}ms {via}", self.latency.as_millis()),
            (None, Some(e)) => format!("failed: {e}"),
            (None, None) => "failed".to_owned(),
        }
    }
}

/// Probe `provider` (via its proxy when it has one; no fallback: a probe tests the proxy).
/// Any HTTP answer from the upstream counts as success: the path works.
pub async fn probe(pool: &AgentPool, provider: &Provider) -> ProbeOutcome {
    let path = if provider.proxy.is_some() {
        Path::Proxy
    } else {
        Path::Direct
    };
    let started = Instant::now();
    let result = run(pool, provider, path).await;
    let latency = started.elapsed();
    let proxy = provider.proxy.as_ref().map(|p| p.url.to_string());
    match result {
        Ok(status) => ProbeOutcome {
            success: true,
            http_status: Some(status),
            latency,
            used_proxy: path == Path::Proxy,
            proxy,
            error: None,
            message: None,
        },
        Err(e) => ProbeOutcome {
            success: false,
            http_status: None,
            latency,
            used_proxy: false,
            proxy,
            error: Some(e.class),
            message: Some(e.message),
        },
    }
}

async fn run(pool: &AgentPool, provider: &Provider, path: Path) -> Result<u16, ConnectError> {
    let uri = upstream_path(&provider.upstream, &provider.probe_path, None)
        .map_err(|m| ConnectError::new(ErrorClass::ConnectIo, m))?;
    let lease = pool.checkout(provider, path)?;
    let mut req = Request::new(RequestBody::Right(Empty::new()));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        header::USER_AGENT,
        header::HeaderValue::from_static("provider-proxy-probe"),
    );
    if path == Path::Proxy
        && !provider.upstream.is_https()
        && let Some(auth) = provider
            .proxy
            .as_ref()
            .and_then(|p| crate::connector::proxy_authorization(&p.url))
    {
        req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth);
    }
    let budget = provider.timeouts.connect + provider.timeouts.headers.min(Duration::from_secs(30));
    let deadline = crate::pool::deadline(tokio::time::Instant::now(), budget);
    match lease.agent().send(req, deadline).await {
        Ok(resp) => Ok(resp.status().as_u16()),
        Err(SendError::Connect(e)) => Err(e),
        Err(SendError::Http(e)) => Err(ConnectError::new(
            ErrorClass::UpstreamReset,
            format!("probe request failed: {e}"),
        )),
        Err(SendError::HeadersTimeout) => Err(ConnectError::new(
            ErrorClass::HeadersTimeout,
            format!("no answer within {} ms", budget.as_millis()),
        )),
    }
}
