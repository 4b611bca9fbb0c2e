//! The forwarder: `/<provider>/<rest>` → the provider's upstream, through its proxy, with
//! fallback, timeouts, streaming, one log line and metrics per request.

use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use provider_proxy_api::{Provider, ProxyScheme, Snapshot, UpstreamUrl};

use crate::body::{BodySlot, Finish, ObservedBody, Outcome};
use crate::config::ConfigStore;
use crate::error::{ConnectError, ErrorClass};
use crate::metrics::{GaugeGuard, Metrics};
use crate::pool::{AgentLease, AgentPool, Path, RequestBody, SendError, UpstreamBody};
pub use crate::route::Route;
use crate::route::{PROTOCOLS, ProviderRoute};

/// Index of `none` in [`PROTOCOLS`]: answered by the sidecar, no upstream protocol.
const NO_PROTOCOL: usize = 2;

/// Response header telling the caller which way the request went.
pub const ROUTE_HEADER: &str = "x-provider-proxy-route";
/// [`ROUTE_HEADER`] as a name: inserting by `&str` would copy a custom name every time.
const ROUTE_HEADER_NAME: HeaderName = HeaderName::from_static(ROUTE_HEADER);

/// The sidecar's response body: a short JSON error, or the upstream's stream.
// The stream is the common case, and boxing it would bring back the allocation per
// request that `Completion` saves; the body is moved a few times, not copied per chunk.
#[allow(clippy::large_enum_variant)]
pub enum ResponseBody {
    Full(Full<Bytes>),
    Stream(ObservedBody<Completion>),
}

/// What a proxied request's metrics and log line need once its response body is over.
/// A named type rather than a boxed closure: no allocation per request.
pub struct Completion {
    metrics: Arc<Metrics>,
    pool: Arc<AgentPool>,
    sent: BodySlot,
    entry: Arc<ProviderRoute>,
    lease: AgentLease,
    in_flight: GaugeGuard,
    route: Route,
    status: StatusCode,
    /// Index into [`PROTOCOLS`].
    protocol: usize,
    method: Method,
    log_uri: Uri,
    fallback_cause: Option<ErrorClass>,
    started: Instant,
}

impl Finish for Completion {
    fn finish(self, outcome: Outcome, bytes: u64) {
        let Self {
            metrics,
            pool,
            sent,
            entry,
            lease,
            in_flight,
            route,
            status,
            protocol,
            method,
            log_uri,
            fallback_cause,
            started,
        } = self;
        let class = match outcome {
            Outcome::Failed(c) => Some(c),
            _ => None,
        };
        if let Outcome::Failed(ErrorClass::Http2) = outcome {
            pool.mark_unhealthy(lease.agent());
        }
        let provider = &entry.provider;
        // A stream that broke on the proxy path is a proxy failure too (counted, never
        // retried: bytes already reached the upstream).
        if let (Some(c), Route::Proxy) = (class, route) {
            metrics
                .proxy_failures
                .with_label_values(&[&provider.name, c.as_str()])
                .inc();
        }
        drop(lease);
        drop(in_flight);
        let pm = &entry.metrics;
        pm.requests(&metrics, route, status, protocol).inc();
        pm.duration(&metrics, route)
            .observe(started.elapsed().as_secs_f64());
        pm.response_bytes(&metrics).inc_by(bytes);
        let sent = sent.bytes_sent();
        pm.request_bytes(&metrics).inc_by(sent);
        log_line(
            provider,
            &method,
            split_provider(log_uri.path()).1,
            status,
            route,
            fallback_cause,
            class,
            outcome == Outcome::ClientGone,
            PROTOCOLS[protocol],
            bytes,
            sent,
            started,
        );
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = crate::pool::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Full(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            Self::Stream(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_end_stream(),
            Self::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Full(b) => b.size_hint(),
            Self::Stream(b) => b.size_hint(),
        }
    }
}

pub struct Forwarder {
    config: Arc<ConfigStore>,
    pool: Arc<AgentPool>,
    metrics: Arc<Metrics>,
}

/// What one attempt produced.
// Returned once per attempt and taken apart at once; boxing the response would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Ok(Response<UpstreamBody>, AgentLease),
    /// Failed before the request went out: another path may be tried.
    NotSent(ConnectError),
    /// Failed after (part of) the request went out, or timed out waiting for headers.
    Failed(ErrorClass, String),
}

impl Forwarder {
    pub fn new(config: Arc<ConfigStore>, pool: Arc<AgentPool>, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            pool,
            metrics,
        }
    }

    /// Forward one client request. The future holds no borrow (it is all of a request's
    /// state, kept in the client connection's memory) and is no `async fn`: that would
    /// keep `req` twice, as passed and as moved in.
    #[allow(clippy::manual_async_fn)] // see above: the async fn would be bigger
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        async move {
            let started = Instant::now();
            // No open proxy: only origin-form requests to a provider prefix are served.
            if req.method() == Method::CONNECT || req.uri().scheme().is_some() {
                return json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    serde_json::json!({"error": {"type": "not_a_forward_proxy",
                    "message": "this sidecar serves /<provider>/<path> only; CONNECT and absolute-form requests are refused"}}),
                );
            }
            let routes = self.config.routes();
            let (name, rest) = split_provider(req.uri().path());
            let Some(entry) = routes.get(name).cloned() else {
                return self.unknown_provider(&routes.snapshot, name);
            };
            drop(routes);
            let provider = entry.provider.clone();
            let method = req.method().clone();
            // The log line's path is read back from the URI when it is written (a reference
            // count, not a copy of the path, per request).
            let log_uri = req.uri().clone();
            let mut target = match upstream_path(&provider.upstream, rest, req.uri().query()) {
                Ok(u) => u,
                Err(m) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": {"type": "bad_request", "provider": provider.name, "message": m}}),
                    );
                }
            };
            let (mut parts, body) = req.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(header::HOST);
            let slot = BodySlot::new(body);
            // A guard, not inc/dec: hyper drops this future when the client hangs up before the
            // response headers, and the gauge must come down then too (found by the soak).
            let in_flight = GaugeGuard::new(entry.metrics.in_flight(&self.metrics).clone());

            let mut route = if provider.proxy.is_some() {
                Route::Proxy
            } else {
                Route::Direct
            };
            let mut fallback_cause = None;
            // Keep a copy of the headers and target only when a second attempt is possible.
            let (first_target, first_headers) =
                if provider.proxy.is_some() && provider.fallback_to_direct {
                    (target.clone(), parts.headers.clone())
                } else {
                    (
                        std::mem::take(&mut target),
                        std::mem::take(&mut parts.headers),
                    )
                };
            let mut attempt = self
                .attempt(
                    &entry,
                    route_path(route),
                    &parts.method,
                    first_target,
                    first_headers,
                    &slot,
                    started.into(),
                )
                .await;
            if let Attempt::NotSent(e) = &attempt
                && route == Route::Proxy
            {
                self.metrics
                    .proxy_failures
                    .with_label_values(&[&provider.name, e.class.as_str()])
                    .inc();
                if provider.fallback_to_direct && e.class.proxy_path_failure() && slot.untouched() {
                    tracing::warn!(
                        provider = %provider.name,
                        proxy = %provider.proxy_display(),
                        class = e.class.as_str(),
                        error = %e,
                        "proxy failed; falling back to a direct connection"
                    );
                    self.metrics
                        .fallbacks
                        .with_label_values(&[&provider.name, e.class.as_str()])
                        .inc();
                    fallback_cause = Some(e.class);
                    route = Route::Fallback;
                    attempt = self
                        .attempt(
                            &entry,
                            Path::Direct,
                            &parts.method,
                            target,
                            std::mem::take(&mut parts.headers),
                            &slot,
                            tokio::time::Instant::now(),
                        )
                        .await;
                }
            }

            // A request answered by the sidecar itself (no upstream response): count it and
            // write its log line.
            let record_failure = |status: StatusCode, class: ErrorClass| {
                entry
                    .metrics
                    .requests(&self.metrics, route, status, NO_PROTOCOL)
                    .inc();
                log_line(
                    &provider,
                    &method,
                    split_provider(log_uri.path()).1,
                    status,
                    route,
                    fallback_cause,
                    Some(class),
                    false,
                    PROTOCOLS[NO_PROTOCOL],
                    0,
                    slot.bytes_sent(),
                    started,
                );
            };

            match attempt {
                Attempt::Ok(resp, lease) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    let protocol = usize::from(rparts.version == Version::HTTP_2);
                    strip_hop_by_hop(&mut rparts.headers);
                    rparts
                        .headers
                        .insert(ROUTE_HEADER_NAME, HeaderValue::from_static(route.as_str()));
                    let status = rparts.status;
                    entry
                        .metrics
                        .first_byte(&self.metrics, route)
                        .observe(started.elapsed().as_secs_f64());
                    // Everything the log line needs moves into the body, whose end (or failure,
                    // or the client going away) completes the request.
                    let done = Completion {
                        metrics: self.metrics.clone(),
                        pool: self.pool.clone(),
                        sent: slot,
                        entry,
                        lease,
                        in_flight,
                        route,
                        status,
                        protocol,
                        method,
                        log_uri,
                        fallback_cause,
                        started,
                    };
                    let body = ObservedBody::new(rbody, provider.timeouts.body, done);
                    Response::from_parts(rparts, ResponseBody::Stream(body))
                }
                Attempt::NotSent(e) => {
                    drop(in_flight);
                    let (status, kind) = match (route, e.class) {
                        (Route::Proxy, c) if c.proxy_path_failure() => {
                            self.metrics
                                .unavailable
                                .with_label_values(&[&provider.name, e.class.as_str()])
                                .inc();
                            (StatusCode::SERVICE_UNAVAILABLE, "proxy_unavailable")
                        }
                        (_, ErrorClass::ConnectTimeout) => {
                            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
                        }
                        // Its own type: an untrusted certificate needs a CA, not a retry.
                        (_, ErrorClass::UpstreamTls) => {
                            (StatusCode::BAD_GATEWAY, "upstream_tls_failed")
                        }
                        _ => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
                    };
                    record_failure(status, e.class);
                    self.error_response(
                        &provider,
                        route,
                        status,
                        kind,
                        e.class,
                        &e.message,
                        fallback_cause,
                    )
                }
                Attempt::Failed(class, message) => {
                    drop(in_flight);
                    let status = match class {
                        ErrorClass::HeadersTimeout => StatusCode::GATEWAY_TIMEOUT,
                        _ => StatusCode::BAD_GATEWAY,
                    };
                    record_failure(status, class);
                    self.error_response(
                        &provider,
                        route,
                        status,
                        "upstream_error",
                        class,
                        &message,
                        fallback_cause,
                    )
                }
            }
        }
    }

    /// One try along `path`; the headers timeout counts from `started`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        entry: &ProviderRoute,
        path: Path,
        method: &Method,
        uri: Uri,
        headers: HeaderMap,
        slot: &BodySlot,
        started: tokio::time::Instant,
    ) -> Attempt {
        let provider = &entry.provider;
        let lease = match self.pool.checkout_keyed(entry.key(path), provider, path) {
            Ok(l) => l,
            Err(e) => return Attempt::NotSent(e),
        };
        let deadline = crate::pool::deadline(started, provider.timeouts.headers);
        // The request is built in a block of its own: a local that lives on past the await
        // keeps its bytes in this future beside the send's copy of it. The send is pinned
        // where it is built rather than moved into the await (a copy of all its bytes).
        let sent = {
            let send = pin!({
                let mut req = Request::new(RequestBody::Left(slot.attempt()));
                *req.method_mut() = method.clone();
                *req.uri_mut() = uri;
                *req.headers_mut() = headers;
                if path == Path::Proxy
                    && !provider.upstream.is_https()
                    && let Some(p) = &provider.proxy
                    && matches!(p.url.scheme(), ProxyScheme::Http | ProxyScheme::Https)
                    && let Some(auth) = crate::connector::proxy_authorization(&p.url)
                {
                    // Absolute-form through an HTTP proxy: credentials ride on each request.
                    req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth);
                }
                lease.agent().send(req, deadline)
            });
            send.await
        };
        match sent {
            Ok(resp) => Attempt::Ok(resp, lease),
            Err(SendError::Connect(e)) => {
                if e.class.marks_unhealthy() {
                    self.pool.mark_unhealthy(lease.agent());
                }
                Attempt::NotSent(e)
            }
            Err(SendError::Http(e)) => {
                let class = if is_h2_connection_error(&e) {
                    self.pool.mark_unhealthy(lease.agent());
                    ErrorClass::Http2
                } else {
                    ErrorClass::UpstreamReset
                };
                Attempt::Failed(
                    class,
                    format!("upstream request failed: {}", error_chain(&e)),
                )
            }
            Err(SendError::HeadersTimeout) => Attempt::Failed(
                ErrorClass::HeadersTimeout,
                format!(
                    "no response headers within {} ms (headers timeout)",
                    provider.timeouts.headers.as_millis()
                ),
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn error_response(
        &self,
        provider: &Provider,
        route: Route,
        status: StatusCode,
        kind: &str,
        class: ErrorClass,
        message: &str,
        fallback: Option<ErrorClass>,
    ) -> Response<ResponseBody> {
        let mut body = serde_json::json!({"error": {
            "type": kind,
            "provider": provider.name,
            "route": route.as_str(),
            "proxy": provider.proxy_display(),
            "class": class.as_str(),
            "message": message,
        }});
        if let Some(f) = fallback {
            body["error"]["fallbackFrom"] = serde_json::Value::String(f.as_str().to_owned());
        }
        let mut resp = json_error(status, body);
        resp.headers_mut()
            .insert(ROUTE_HEADER_NAME, HeaderValue::from_static(route.as_str()));
        resp
    }

    fn unknown_provider(&self, snapshot: &Snapshot, name: &str) -> Response<ResponseBody> {
        if let Some(issues) = snapshot.invalid.get(name) {
            self.metrics
                .requests
                .with_label_values(&[name, "none", "5xx", "none"])
                .inc();
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": {"type": "provider_invalid", "provider": name,
                    "message": "the provider's configuration is invalid",
                    "issues": issues.iter().map(|i| i.to_string()).collect::<Vec<_>>()}}),
            );
        }
        self.metrics
            .requests
            .with_label_values(&["unknown", "none", "4xx", "none"])
            .inc();
        json_error(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": {"type": "unknown_provider",
                "message": "no provider by that name; call /<provider>/<path>",
                "providers": snapshot.providers.keys().collect::<Vec<_>>()}}),
        )
    }
}

fn route_path(route: Route) -> Path {
    match route {
        Route::Proxy => Path::Proxy,
        _ => Path::Direct,
    }
}

#[allow(clippy::too_many_arguments)]
fn log_line(
    provider: &Provider,
    method: &Method,
    path: &str,
    status: StatusCode,
    route: Route,
    fallback: Option<ErrorClass>,
    class: Option<ErrorClass>,
    client_gone: bool,
    protocol: &str,
    bytes_out: u64,
    bytes_in: u64,
    started: Instant,
) {
    tracing::info!(
        target: "provider_proxy::access",
        provider = %provider.name,
        method = %method,
        path = %path,
        status = status.as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_in,
        bytes_out,
        route = route.as_str(),
        used_proxy = route == Route::Proxy,
        fallback = fallback.is_some(),
        fallback_cause = fallback.map(|c| c.as_str()),
        proxy = %provider.proxy_display(),
        protocol,
        error = class.map(|c| c.as_str()),
        client_gone,
        "request"
    );
}

fn json_error(status: StatusCode, body: serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::Full(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `/anthropic/v1/messages` → (`anthropic`, `/v1/messages`).
pub fn split_provider(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    // A byte scan: `str::find(char)` goes through the generic `CharSearcher` (memchr
    // set-up and UTF-8 bookkeeping), ~180 instructions per call on a path this short. `/`
    // is ASCII, so the index found is a character boundary.
    match trimmed.bytes().position(|b| b == b'/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, ""),
    }
}

/// `<base path><rest>?<query>`: the origin-form target on the upstream. The agent adds
/// scheme and authority where the wire needs them (h2, absolute form via an HTTP proxy).
pub fn upstream_path(
    upstream: &UpstreamUrl,
    rest: &str,
    query: Option<&str>,
) -> Result<Uri, String> {
    // Exactly the length: a `Bytes` made from a full `Vec` takes the buffer over, one with
    // spare capacity costs another allocation.
    let mut s = String::with_capacity(
        upstream.base_path.len() + rest.len().max(1) + query.map_or(0, |q| q.len() + 1),
    );
    s.push_str(&upstream.base_path);
    if rest.is_empty() {
        s.push('/');
    } else {
        s.push_str(rest);
    }
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    // From the string's own buffer, not a copy of it.
    Uri::from_maybe_shared(Bytes::from(s))
        .map_err(|e| format!("cannot build the upstream URL: {e}"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the legacy ones clients still send;
/// `Connection` first (its bit is read on its own). The client's own
/// `Proxy-Authorization` never leaves the pod.
const HOP_BY_HOP_NAMES: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
const HOP_BY_HOP: [HeaderName; 9] = {
    let n = HOP_BY_HOP_NAMES;
    [
        HeaderName::from_static(n[0]),
        HeaderName::from_static(n[1]),
        HeaderName::from_static(n[2]),
        HeaderName::from_static(n[3]),
        HeaderName::from_static(n[4]),
        HeaderName::from_static(n[5]),
        HeaderName::from_static(n[6]),
        HeaderName::from_static(n[7]),
        HeaderName::from_static(n[8]),
    ]
};

/// Bit `n` set: some name in [`HOP_BY_HOP`] is `n` bytes long.
const HOP_BY_HOP_LENGTHS: u32 = {
    let mut bits = 0u32;
    let mut i = 0;
    while i < HOP_BY_HOP_NAMES.len() {
        bits |= 1 << HOP_BY_HOP_NAMES[i].len();
        i += 1;
    }
    bits
};

/// Remove the hop-by-hop headers, plus any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names notes which are present, so that only those are looked up
    // again: most requests carry none, most responses only `Connection: keep-alive`
    // (removing all nine by name cost ten hash lookups per response).
    let mut present = 0u16;
    for name in headers.keys() {
        // Most names are ruled out by their length alone.
        let len = name.as_str().len();
        if len < 32
            && HOP_BY_HOP_LENGTHS & (1 << len) != 0
            && let Some(i) = HOP_BY_HOP.iter().position(|h| h == name)
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // The usual message has one `Connection` line, cloned by refcount.
        let mut lines = headers.get_all(header::CONNECTION).iter();
        match (lines.next().cloned(), lines.next()) {
            (None, _) => {}
            (Some(only), None) => remove_listed(headers, &only),
            (Some(_), Some(_)) => {
                let all: Vec<HeaderValue> = headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .cloned()
                    .collect();
                for v in &all {
                    remove_listed(headers, v);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Remove the headers a `Connection` value names (invalid names are ignored). Hop-by-hop
/// names are skipped: [`strip_hop_by_hop`] removes those that are present anyway.
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(names) = connection.to_str() else {
        return;
    };
    let hop_by_hop = |name: &str| {
        HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().eq_ignore_ascii_case(name))
    };
    // The usual value, `keep-alive`, without splitting.
    if hop_by_hop(names) {
        return;
    }
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !hop_by_hop(name) {
            // By `&str`: looked up without building a `HeaderName` (no allocation).
            headers.remove(name);
        }
    }
}

/// The first error of type `T` in `e`'s source chain.
pub(crate) fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// GOAWAY and other connection-level HTTP/2 errors: the agent's connection is unusable.
fn is_h2_connection_error(e: &hyper::Error) -> bool {
    find_source::<hyper::Error>(e).is_some_and(|h| {
        let m = h.to_string();
        m.contains("connection error") || m.contains("GOAWAY")
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_prefix() {
        assert_eq!(
            split_provider("/anthropic/v1/messages"),
            ("anthropic", "/v1/messages")
        );
        assert_eq!(split_provider("/anthropic"), ("anthropic", ""));
        assert_eq!(split_provider("/"), ("", ""));
    }

    #[test]
    fn upstream_paths_keep_base_path_and_query() {
        let u = UpstreamUrl::parse("https://generativelanguage.googleapis.com/v1beta").unwrap();
        assert_eq!(
            upstream_path(&u, "/models/x:generate", Some("alt=sse"))
                .unwrap()
                .to_string(),
            "/v1beta/models/x:generate?alt=sse"
        );
        let u = UpstreamUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(upstream_path(&u, "", None).unwrap().to_string(), "/");
        assert!(
            upstream_path(&u, "/a b", None).is_err(),
            "a space is no URI"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("x-api-key", HeaderValue::from_static("sk-test"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-api-key"], "sk-test");

        // Names in any case, over several `Connection` lines, junk ignored.
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-One , ,bad name"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive,x-TWO"),
        );
        for n in ["x-one", "x-two", "keep-alive", "x-kept"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);

        // Every hop-by-hop name goes, in any case, among names of the same lengths that stay.
        let mut h = HeaderMap::new();
        for n in HOP_BY_HOP_NAMES {
            h.insert(
                HeaderName::from_bytes(n.to_uppercase().as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
            let same_length = "x".repeat(n.len());
            h.insert(
                HeaderName::from_bytes(same_length.as_bytes()).unwrap(),
                HeaderValue::from_static("kept"),
            );
        }
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        let mut want: Vec<String> = HOP_BY_HOP_NAMES
            .iter()
            .map(|n| "x".repeat(n.len()))
            .collect();
        want.push("anthropic-version".into());
        want.sort_unstable();
        want.dedup();
        assert_eq!(left, want);
    }
}
