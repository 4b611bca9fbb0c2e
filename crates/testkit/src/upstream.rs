//! An AI-provider stand-in: a hyper 1 server on `127.0.0.1:0`, plain HTTP or
//! TLS (with the [`TestPki`] leaf), serving HTTP/1.1 and HTTP/2 on one
//! listener, recording every request.
//!
//! Endpoints (any method unless noted):
//!
//! | path | behaviour |
//! |---|---|
//! | `/v1/messages` and any unknown path | reads the whole body, answers `200` JSON `{"ok":true,"method","path","query","host","version","body_len","headers"}` |
//! | `GET /v1/sse?events=N&interval_ms=M` | `text/event-stream`: N events `data: {"i":k}\n\n`, the first at once, then one every M ms, each flushed on its own (defaults N=3, M=50) |
//! | `/v1/stall-headers` | never answers |
//! | `/v1/stall-body` | `200` headers and one chunk (`data: {"stalled":true}\n\n`), then nothing, forever |
//! | `GET /v1/big?bytes=N` | streams N bytes (`content-length: N`) in 16 KiB chunks; byte `i` is `b'a' + i % 26` |
//! | `POST /v1/echo` | streams the request body back as it arrives |
//! | `/v1/status/NNN` | answers status NNN with the JSON body above |
//! | `/v1/delay?ms=M` | waits M ms, then the JSON body above |
//!
//! Every response carries `server: provider-proxy-testkit-upstream`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::certs::TestPki;
use crate::util::Detached;

/// Error type of the response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// How to run an [`Upstream`].
#[derive(Clone, Debug, Default)]
pub struct UpstreamOptions {
    /// Serve TLS with this PKI's `localhost` leaf; plain HTTP when `None`.
    pub tls: Option<Arc<TestPki>>,
    /// With TLS: offer `h2` via ALPN alongside `http/1.1`. (Plain HTTP always
    /// accepts both HTTP/1.1 and h2 prior knowledge.)
    pub h2: bool,
}

impl UpstreamOptions {
    /// Plain HTTP (h1 and h2c prior knowledge).
    pub fn plain() -> Self {
        Self::default()
    }

    /// TLS, ALPN `http/1.1` only.
    pub fn tls(pki: Arc<TestPki>) -> Self {
        Self {
            tls: Some(pki),
            h2: false,
        }
    }

    /// TLS, ALPN `h2` and `http/1.1`.
    pub fn tls_h2(pki: Arc<TestPki>) -> Self {
        Self {
            tls: Some(pki),
            h2: true,
        }
    }
}

/// One request as the upstream saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// `Host` header, or the `:authority` of an h2 request.
    pub host: Option<String>,
    /// All headers in order, names lowercase, values lossily decoded.
    pub headers: Vec<(String, String)>,
    /// Bytes of request body received (for `/v1/echo`: updated as the body
    /// streams, final once the response body has ended).
    pub body_len: usize,
    /// `"HTTP/1.1"` or `"HTTP/2.0"`.
    pub version: String,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<RecordedRequest>>,
    per_path: Mutex<HashMap<String, usize>>,
    connections: AtomicUsize,
}

impl State {
    fn record(&self, rec: RecordedRequest) -> usize {
        *lock(&self.per_path).entry(rec.path.clone()).or_insert(0) += 1;
        let mut reqs = lock(&self.requests);
        reqs.push(rec);
        reqs.len() - 1
    }

    fn set_body_len(&self, idx: usize, len: usize) {
        if let Some(r) = lock(&self.requests).get_mut(idx) {
            r.body_len = len;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running upstream; stops (listener closed, all tasks aborted) on drop.
pub struct Upstream {
    addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
    detached: Option<Detached>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Binds `127.0.0.1:0` and starts serving. Must be called within a tokio
    /// runtime (e.g. from a `#[tokio::test]`); the server runs on that runtime.
    pub fn start(opts: UpstreamOptions) -> Upstream {
        let std_listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).expect("upstream: bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("upstream: set_nonblocking");
        let addr = std_listener.local_addr().expect("upstream: local_addr");
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .expect("upstream: must be started inside a tokio runtime");
        let state = Arc::new(State::default());
        let tls = opts.tls.as_ref().map(|pki| {
            let alpn: &[&[u8]] = if opts.h2 {
                &[b"h2", b"http/1.1"]
            } else {
                &[b"http/1.1"]
            };
            tokio_rustls::TlsAcceptor::from(pki.rustls_server_config(alpn))
        });
        let is_tls = tls.is_some();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _peer)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        st.connections.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(serve_conn(tcp, tls.clone(), st.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Upstream {
            addr,
            tls: is_tls,
            state,
            task: Some(task),
            detached: None,
        }
    }

    /// Like [`Upstream::start`], but on a dedicated thread with its own
    /// runtime: keeps serving while the caller blocks (blocking clients,
    /// `std::process::Command`, a current-thread test runtime stuck in sync
    /// code), and needs no runtime in the caller. Dropping it stops the thread.
    pub fn start_detached(opts: UpstreamOptions) -> Upstream {
        let ((addr, tls, state), detached) = Detached::spawn("testkit-upstream", move || {
            let up = Upstream::start(opts);
            ((up.addr, up.tls, up.state.clone()), up)
        });
        Upstream {
            addr,
            tls,
            state,
            task: None,
            detached: Some(detached),
        }
    }

    /// The listening address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Whether this upstream serves TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `https://localhost:PORT` with TLS (the leaf is for `localhost`),
    /// `http://127.0.0.1:PORT` otherwise. No trailing slash.
    pub fn base_url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://127.0.0.1:{}", self.addr.port())
        }
    }

    /// `base_url() + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// Number of requests received for `path` (without query).
    pub fn requests(&self, path: &str) -> usize {
        lock(&self.state.per_path).get(path).copied().unwrap_or(0)
    }

    /// Number of requests received in total.
    pub fn total_requests(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// Number of TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The most recent request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.state.requests).last().cloned()
    }

    /// Every request so far, oldest first.
    pub fn all_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// Stops the server and waits until the listener is closed and every
    /// connection task is gone (new connections are then refused).
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(d) = self.detached.take() {
            let _ = tokio::task::spawn_blocking(move || drop(d)).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve_conn(tcp: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>, state: Arc<State>) {
    let _ = tcp.set_nodelay(true);
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, state).await) }
    });
    match tls {
        None => {
            let builder = auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        }
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let builder = auto::Builder::new(TokioExecutor::new());
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
}

fn query_param<T: std::str::FromStr>(query: Option<&str>, name: &str) -> Option<T> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn streaming(
    status: StatusCode,
    content_type: &'static str,
    stream: impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync + 'static,
) -> Response<Body> {
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A body fed by a channel: each `send` becomes one flushed frame.
fn channel_stream(
    mut rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))))
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let host = req
        .headers()
        .get(header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let version = format!("{:?}", req.version());
    let idx = state.record(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        host: host.clone(),
        headers: headers.clone(),
        body_len: 0,
        version: version.clone(),
    });
    let q = query.as_deref();

    let mut resp = match path.as_str() {
        "/v1/sse" => {
            let events: u64 = query_param(q, "events").unwrap_or(3);
            let interval = Duration::from_millis(query_param(q, "interval_ms").unwrap_or(50));
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                for i in 0..events {
                    if i > 0 {
                        tokio::time::sleep(interval).await;
                    }
                    let ev = Bytes::from(format!("data: {{\"i\":{i}}}\n\n"));
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = streaming(StatusCode::OK, "text/event-stream", channel_stream(rx));
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        "/v1/stall-headers" => {
            std::future::pending::<()>().await;
            unreachable!("pending never resolves")
        }
        "/v1/stall-body" => {
            let first: Result<Frame<Bytes>, BoxError> = Ok(Frame::data(Bytes::from_static(
                b"data: {\"stalled\":true}\n\n",
            )));
            let stream = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
            streaming(StatusCode::OK, "text/event-stream", stream)
        }
        "/v1/big" => {
            let total: u64 = query_param(q, "bytes").unwrap_or(1024 * 1024);
            const CHUNK: u64 = 16 * 1024;
            let chunks = total.div_ceil(CHUNK);
            let stream = futures_util::stream::iter((0..chunks).map(move |c| {
                let start = c * CHUNK;
                let end = (start + CHUNK).min(total);
                let data: Vec<u8> = (start..end).map(|i| b'a' + (i % 26) as u8).collect();
                Ok::<_, BoxError>(Frame::data(Bytes::from(data)))
            }));
            let mut r = streaming(StatusCode::OK, "application/octet-stream", stream);
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
            r
        }
        "/v1/echo" if method == Method::POST => {
            let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            let mut body = req.into_body();
            let st = state.clone();
            tokio::spawn(async move {
                let mut len = 0usize;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    if let Ok(data) = frame.into_data() {
                        len += data.len();
                        st.set_body_len(idx, len);
                        if tx.send(data).await.is_err() {
                            break;
                        }
                    }
                }
                st.set_body_len(idx, len);
            });
            let mut r = streaming(
                StatusCode::OK,
                "application/octet-stream",
                channel_stream(rx),
            );
            if let Some(ct) = content_type {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            r
        }
        _ => {
            let status = path
                .strip_prefix("/v1/status/")
                .and_then(|s| s.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
            if path == "/v1/delay" {
                let ms: u64 = query_param(q, "ms").unwrap_or(100);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let body_len = match req.into_body().collect().await {
                Ok(c) => c.to_bytes().len(),
                Err(_) => 0,
            };
            state.set_body_len(idx, body_len);
            let header_map: serde_json::Map<String, serde_json::Value> = headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let json = serde_json::json!({
                "ok": status.is_success(),
                "method": method.as_str(),
                "path": path,
                "query": query,
                "host": host,
                "version": version,
                "body_len": body_len,
                "headers": header_map,
            });
            full(status, "application/json", json.to_string())
        }
    };
    resp.headers_mut().insert(
        header::SERVER,
        HeaderValue::from_static("provider-proxy-testkit-upstream"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client;
    use std::time::Instant;

    #[tokio::test]
    async fn plain_h1_json_and_recording() {
        let up = Upstream::start(UpstreamOptions::plain());
        assert!(up.base_url().starts_with("http://127.0.0.1:"));
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::post(format!("{}/v1/messages?x=1", up.base_url()))
            .header("host", up.addr().to_string())
            .header("x-test", "yes")
            .body(Full::new(Bytes::from_static(b"hello")))
            .expect("req");
        let (parts, body) = client::send_h1(tcp, req).await.expect("send");
        assert_eq!(parts.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["ok"], true);
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/v1/messages");
        assert_eq!(v["query"], "x=1");
        assert_eq!(v["version"], "HTTP/1.1");
        assert_eq!(v["body_len"], 5);
        assert_eq!(v["host"], up.addr().to_string());
        assert_eq!(up.requests("/v1/messages"), 1);
        assert_eq!(up.total_requests(), 1);
        assert_eq!(up.connections(), 1);
        let last = up.last_request().expect("last");
        assert_eq!(last.body_len, 5);
        assert_eq!(last.header("X-Test"), Some("yes"));
        assert_eq!(last.query.as_deref(), Some("x=1"));
    }

    #[test]
    fn detached_serves_blocking_clients_without_a_runtime() {
        use std::io::{Read, Write};
        let up = Upstream::start_detached(UpstreamOptions::plain());
        let mut s = std::net::TcpStream::connect(up.addr()).expect("connect");
        s.write_all(b"GET /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(up.requests("/v1/messages"), 1);
        let addr = up.addr();
        drop(up);
        assert!(crate::util::refused_soon(addr), "stopped on drop");
    }

    #[tokio::test]
    async fn tls_serves_h1_and_h2() {
        let pki = Arc::new(TestPki::new());
        let up = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
        assert!(up.base_url().starts_with("https://localhost:"));

        for (alpn, want) in [(&b"h2"[..], "HTTP/2.0"), (&b"http/1.1"[..], "HTTP/1.1")] {
            let tcp = TcpStream::connect(up.addr()).await.expect("connect");
            let tls = client::tls_connect(tcp, &pki, "localhost", &[alpn])
                .await
                .expect("tls");
            let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            assert_eq!(negotiated.as_deref(), Some(alpn));
            let req = Request::get(up.url("/v1/messages"))
                .header("host", format!("localhost:{}", up.port()))
                .body(Full::new(Bytes::new()))
                .expect("req");
            let (parts, body) = if alpn == b"h2" {
                let mut req = req;
                req.headers_mut().remove("host");
                client::send_h2(tls, req).await.expect("h2")
            } else {
                client::send_h1(tls, req).await.expect("h1")
            };
            assert_eq!(parts.status, 200);
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["version"], want);
            assert_eq!(v["host"], format!("localhost:{}", up.port()));
        }
        assert_eq!(up.requests("/v1/messages"), 2);
        assert_eq!(up.connections(), 2);

        // h2 not offered when h2 == false.
        let up1 = Upstream::start(UpstreamOptions::tls(pki.clone()));
        let tcp = TcpStream::connect(up1.addr()).await.expect("connect");
        let tls = client::tls_connect(tcp, &pki, "localhost", &[b"h2", b"http/1.1"])
            .await
            .expect("tls");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

        // A client trusting another CA fails.
        let other = TestPki::new();
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let err = client::tls_connect(tcp, &other, "localhost", &[b"http/1.1"])
            .await
            .expect_err("untrusted");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn plain_h2_prior_knowledge() {
        let up = Upstream::start(UpstreamOptions::plain());
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::get(up.url("/v1/messages"))
            .body(Full::new(Bytes::new()))
            .expect("req");
        let (parts, body) = client::send_h2(tcp, req).await.expect("h2c");
        assert_eq!(parts.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["version"], "HTTP/2.0");
    }

    #[tokio::test]
    async fn sse_events_arrive_spaced() {
        let up = Upstream::start(UpstreamOptions::plain());
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::get(up.url("/v1/sse?events=4&interval_ms=150"))
            .header("host", up.addr().to_string())
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = client::send_h1_streaming(tcp, req).await.expect("send");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut body = resp.into_body();
        let start = Instant::now();
        let mut arrivals = Vec::new();
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            if let Ok(data) = frame.into_data() {
                arrivals.push(start.elapsed());
                text.push_str(std::str::from_utf8(&data).expect("utf8"));
            }
        }
        assert_eq!(
            text,
            "data: {\"i\":0}\n\ndata: {\"i\":1}\n\ndata: {\"i\":2}\n\ndata: {\"i\":3}\n\n"
        );
        assert_eq!(arrivals.len(), 4, "each event is its own chunk");
        for w in arrivals.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(100), "{arrivals:?}");
        }
    }

    #[tokio::test]
    async fn big_echo_and_stalls() {
        let up = Upstream::start(UpstreamOptions::plain());
        // big
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::get(up.url("/v1/big?bytes=100000"))
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let (parts, body) = client::send_h1(tcp, req).await.expect("big");
        assert_eq!(parts.headers["content-length"], "100000");
        assert_eq!(body.len(), 100_000);
        assert_eq!(body[27], b'b');

        // echo
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let payload = Bytes::from(vec![7u8; 70_000]);
        let req = Request::post(up.url("/v1/echo"))
            .header("host", "x")
            .header("content-type", "application/x-test")
            .body(Full::new(payload.clone()))
            .expect("req");
        let (parts, body) = client::send_h1(tcp, req).await.expect("echo");
        assert_eq!(parts.headers["content-type"], "application/x-test");
        assert_eq!(body, payload);
        assert_eq!(up.last_request().expect("last").body_len, 70_000);

        // status
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::get(up.url("/v1/status/429"))
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let (parts, _) = client::send_h1(tcp, req).await.expect("status");
        assert_eq!(parts.status, 429);

        // stall-headers: nothing within 300 ms
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::get(up.url("/v1/stall-headers"))
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            client::send_h1_streaming(tcp, req),
        )
        .await;
        assert!(r.is_err(), "stall-headers must not answer");

        // stall-body: headers + one chunk, then nothing
        let tcp = TcpStream::connect(up.addr()).await.expect("connect");
        let req = Request::get(up.url("/v1/stall-body"))
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = client::send_h1_streaming(tcp, req).await.expect("headers");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.expect("first").expect("ok");
        assert!(first.is_data());
        let next = tokio::time::timeout(Duration::from_millis(300), body.frame()).await;
        assert!(next.is_err(), "stall-body must stall after one chunk");

        assert_eq!(up.requests("/v1/stall-headers"), 1);
        assert_eq!(up.requests("/v1/stall-body"), 1);
        assert_eq!(up.total_requests(), 5);

        // stop closes the listener
        let addr = up.addr();
        up.stop().await;
        assert!(crate::util::refused_soon(addr), "stopped");
    }
}
