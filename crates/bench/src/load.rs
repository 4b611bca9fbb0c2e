//! The load generator: a fixed number of keep-alive HTTP/1.1 connections, each a task that
//! sends one request after another (closed loop) until the end of the measured window.
//! Connections go plain to a forwarder, or over TLS straight to the upstream, optionally
//! through an HTTP CONNECT (Basic auth) or SOCKS5 (username/password) proxy: the floors.
//!
//! The generator shares the two cores with everything it measures, so what it spends is
//! taken from them: it runs as the sidecar's workers do, [`THREADS`] threads each with its
//! own single-threaded runtime, and a connection's I/O is driven in the task that sends on
//! it ([`Conn::drive`]), so an answer is read and consumed by one task on one thread
//! instead of waking a second task, often on the other thread. That took a quarter off its
//! CPU per JSON request (16.4 → 12.2 µs at 32 connections); per SSE stream, where the
//! kernel's receive path is most of its cost, it changed nothing measurable.
//!
//! Only requests that *complete* inside the measured window count; every wait is bounded
//! by the window's end, and a connection is dropped with its worker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;

/// How a connection reaches the server that answers.
#[derive(Clone)]
pub enum Via {
    /// Straight to `Target::connect`.
    Direct,
    /// `CONNECT upstream` through the HTTP proxy at `Target::connect`, with this
    /// `Proxy-Authorization` value.
    HttpConnect { auth: String },
    /// SOCKS5 to `upstream` through the proxy at `Target::connect`.
    Socks5 { user: String, pass: String },
}

/// Where the load goes.
#[derive(Clone)]
pub struct Target {
    /// The TCP peer: forwarder, upstream, or proxy.
    pub connect: SocketAddr,
    pub via: Via,
    /// Where a proxy tunnels to.
    pub upstream: SocketAddr,
    /// TLS to the upstream (floors); `None` for plain HTTP to a forwarder.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Request path, e.g. `/json-direct/v1/messages`.
    pub path: Uri,
    pub host: HeaderValue,
}

/// What a good response looks like.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// 200 and exactly this many body bytes.
    Json { len: usize },
    /// 200 and `events` SSE events with `"seq":0..events` in order, nothing else.
    Sse { events: u32 },
}

/// The raw figures of one cell (one peer, one scenario, one round).
#[derive(Default)]
pub struct LoadResult {
    /// Requests (streams) completed good inside the window.
    pub ok: u64,
    /// Failed requests, broken or reordered streams, failed connects (warm-up included).
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// Whole-response latency of each good request in the window, µs.
    pub latency_us: Vec<u32>,
    /// SSE: time to the first body byte, µs.
    pub ttfb_us: Vec<u32>,
}

impl LoadResult {
    /// A result that is one error, kept whole: the cell (or a thread of it) could not run.
    pub fn failed(what: String) -> Self {
        Self {
            errors: 1,
            error_kinds: [(what, 1)].into(),
            ..Self::default()
        }
    }

    /// Count an error; its first 120 bytes (cut at a character boundary) group it with
    /// others of its kind.
    fn error(&mut self, what: String) {
        self.errors += 1;
        let mut key = what;
        let mut cut = key.len().min(120);
        while !key.is_char_boundary(cut) {
            cut -= 1;
        }
        key.truncate(cut);
        *self.error_kinds.entry(key).or_default() += 1;
    }

    fn merge(&mut self, mut o: LoadResult) {
        self.ok += o.ok;
        self.errors += o.errors;
        for (k, v) in o.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
        self.latency_us.append(&mut o.latency_us);
        self.ttfb_us.append(&mut o.ttfb_us);
    }
}

/// The request every connection sends: an Anthropic-style `POST /v1/messages`.
pub struct RequestTemplate {
    pub body: Bytes,
    pub headers: HeaderMap,
}

impl RequestTemplate {
    pub fn new(stream: bool) -> Self {
        let body = format!(
            "{{\"model\":\"claude-bench-1\",\"max_tokens\":256,\"stream\":{stream},\
             \"messages\":[{{\"role\":\"user\",\"content\":\"Benchmark request: answer with \
             a short JSON message so the forwarding path, not the model, is measured.\"}}]}}"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(if stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        headers.insert("x-api-key", HeaderValue::from_static("sk-ant-bench-0000"));
        headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("provider-proxy-bench/0.1"),
        );
        Self {
            body: Bytes::from(body),
            headers,
        }
    }
}

/// Threads of the load generator: one per core of the development machine.
pub const THREADS: usize = 2;

/// Run `conns` connections against `target` until `end`, counting what completes in
/// `[start, end]`. Connection `i` starts at `i / conns` of `ramp` from now, on thread
/// `i % THREADS`.
pub async fn run(
    target: Arc<Target>,
    template: Arc<RequestTemplate>,
    expect: Expect,
    conns: usize,
    ramp: Duration,
    start: Instant,
    end: Instant,
) -> LoadResult {
    let plan = Plan {
        target,
        template,
        expect,
        conns,
        ramp,
        began: Instant::now(),
        start,
        end,
    };
    let mut threads = Vec::with_capacity(THREADS);
    for t in 0..THREADS.min(conns) {
        let plan = plan.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || {
                let r = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(plan.run_share(t)),
                    Err(e) => LoadResult::failed(format!("load runtime: {e}")),
                };
                let _ = done.send(r);
            });
        match spawned {
            Ok(_) => threads.push(result),
            Err(e) => return LoadResult::failed(format!("load thread: {e}")),
        }
    }
    let mut total = LoadResult::default();
    for t in threads {
        total.merge(
            t.await
                .unwrap_or_else(|_| LoadResult::failed("load thread panicked".to_owned())),
        );
    }
    total
}

/// One [`run`], as each of its threads sees it.
#[derive(Clone)]
struct Plan {
    target: Arc<Target>,
    template: Arc<RequestTemplate>,
    expect: Expect,
    conns: usize,
    ramp: Duration,
    /// When the run was called: the ramp counts from here.
    began: Instant,
    start: Instant,
    end: Instant,
}

impl Plan {
    /// Connections `t`, `t + THREADS`, … of the run, on the calling thread's runtime.
    async fn run_share(self, t: usize) -> LoadResult {
        let mut tasks = tokio::task::JoinSet::new();
        for i in (t..self.conns).step_by(THREADS) {
            let (target, template) = (self.target.clone(), self.template.clone());
            let (expect, start, end) = (self.expect, self.start, self.end);
            let at = self.began + self.ramp.mul_f64(i as f64 / self.conns as f64);
            tasks.spawn(async move {
                tokio::time::sleep_until(at.min(end)).await;
                worker(target, template, expect, start, end).await
            });
        }
        let mut total = LoadResult::default();
        while let Some(r) = tasks.join_next().await {
            total.merge(r.unwrap_or_else(|e| LoadResult::failed(format!("load task failed: {e}"))));
        }
        total
    }
}

/// The future that does a connection's I/O: hyper's `Connection`, polled by [`Conn::drive`].
type ConnIo = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended.
    io: Option<ConnIo>,
}

impl Conn {
    /// Run `fut`, an exchange on a connection's `sender`, with that connection's `io`
    /// polled in the same task before it, so the bytes a wake-up brings are read and then
    /// consumed in one poll. (It takes the two halves apart because `fut` borrows
    /// `sender`.)
    async fn drive<F: Future>(io: &mut Option<ConnIo>, fut: F) -> Result<F::Output, String> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let mut ended = None;
            if let Some(c) = io.as_mut()
                && let Poll::Ready(r) = c.as_mut().poll(cx)
            {
                *io = None;
                ended = Some(r);
            }
            // Polled even after the connection ended: hyper has then failed the request,
            // and `fut` says how.
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            match (ended, io.is_none()) {
                (Some(Err(e)), _) => Poll::Ready(Err(format!("connection failed: {e}"))),
                (_, true) => Poll::Ready(Err("connection closed".to_owned())),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

async fn worker(
    target: Arc<Target>,
    template: Arc<RequestTemplate>,
    expect: Expect,
    start: Instant,
    end: Instant,
) -> LoadResult {
    let mut out = LoadResult::default();
    let mut conn: Option<Conn> = None;
    while Instant::now() < end {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match timeout_at(end, connect(&target)).await {
                Err(_) => break,
                Ok(Ok(c)) => conn.insert(c),
                Ok(Err(e)) => {
                    out.error(e);
                    // Back off a little rather than spin on a refusing peer.
                    let _ = timeout_at(end, tokio::time::sleep(Duration::from_millis(20))).await;
                    continue;
                }
            },
        };
        let req = request(&target, &template);
        let sent = Instant::now();
        let done = Conn::drive(&mut c.io, exchange(&mut c.sender, req, expect, sent));
        match timeout_at(end, done).await.map(|r| r.and_then(|r| r)) {
            Err(_) => break,
            Ok(Ok(ttfb)) => {
                let done = Instant::now();
                if done >= start {
                    out.ok += 1;
                    out.latency_us.push(micros(done - sent));
                    if let Some(t) = ttfb {
                        out.ttfb_us.push(micros(t));
                    }
                }
            }
            Ok(Err(e)) => {
                out.error(e);
                conn = None;
            }
        }
    }
    out
}

fn request(target: &Target, template: &RequestTemplate) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(template.body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = target.path.clone();
    *req.headers_mut() = template.headers.clone();
    req.headers_mut().insert(header::HOST, target.host.clone());
    req
}

/// One keep-alive connection for [`Sequential::run`].
pub struct Sequential {
    conn: Conn,
}

impl Sequential {
    pub async fn connect(target: &Target) -> Result<Self, String> {
        Ok(Self {
            conn: connect(target).await?,
        })
    }

    /// `n` requests one after another on this connection, each checked; the first
    /// failure ends the run. Without concurrency nothing is batched, so the forwarder does
    /// the same work for every request: what instruction counts need.
    pub async fn run(
        &mut self,
        target: &Target,
        template: &RequestTemplate,
        expect: Expect,
        n: u64,
    ) -> Result<(), String> {
        let c = &mut self.conn;
        for i in 0..n {
            let req = request(target, template);
            Conn::drive(
                &mut c.io,
                exchange(&mut c.sender, req, expect, Instant::now()),
            )
            .await
            .and_then(|r| r)
            .map_err(|e| format!("request {} of {n}: {e}", i + 1))?;
        }
        Ok(())
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One request/response; returns the time to the first body byte for SSE.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    expect: Expect,
    sent: Instant,
) -> Result<Option<Duration>, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection closed: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("status {}", resp.status().as_u16()));
    }
    let mut body = resp.into_body();
    match expect {
        Expect::Json { len } => {
            let mut n = 0;
            while let Some(f) = body.frame().await {
                let f = f.map_err(|e| format!("body failed: {e}"))?;
                if let Some(d) = f.data_ref() {
                    n += d.len();
                }
            }
            if n != len {
                return Err(format!("body of {n} bytes, expected {len}"));
            }
            Ok(None)
        }
        Expect::Sse { events } => {
            let mut check = SseCheck::new(events);
            let mut ttfb = None;
            while let Some(f) = body.frame().await {
                // The count of events seen varies; keep it out of the message so that the
                // error table groups by cause.
                let f = f.map_err(|e| format!("stream broken before its end: {e}"))?;
                if let Some(d) = f.data_ref() {
                    if ttfb.is_none() && !d.is_empty() {
                        ttfb = Some(sent.elapsed());
                    }
                    check.feed(d)?;
                }
            }
            check.finish()?;
            Ok(ttfb)
        }
    }
}

/// Checks that a stream is whole and in order: events separated by a blank line, each
/// carrying `"seq":N` with N = 0, 1, 2, … `events - 1`, nothing after.
pub struct SseCheck {
    buf: Vec<u8>,
    seen: u32,
    events: u32,
}

impl SseCheck {
    pub fn new(events: u32) -> Self {
        Self {
            buf: Vec::with_capacity(512),
            seen: 0,
            events,
        }
    }

    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        let mut consumed = 0;
        while let Some(pos) = find(&self.buf[consumed..], b"\n\n") {
            let ev = &self.buf[consumed..consumed + pos];
            let seq = find(ev, b"\"seq\":")
                .and_then(|i| {
                    let digits: Vec<u8> = ev[i + 6..]
                        .iter()
                        .take_while(|b| b.is_ascii_digit())
                        .copied()
                        .collect();
                    std::str::from_utf8(&digits).ok()?.parse::<u32>().ok()
                })
                .ok_or_else(|| format!("event {} has no sequence number", self.seen))?;
            if seq != self.seen {
                return Err(format!(
                    "stream out of order: event {seq} where {} was due",
                    self.seen
                ));
            }
            self.seen += 1;
            consumed += pos + 2;
        }
        self.buf.drain(..consumed);
        Ok(())
    }

    pub fn finish(&self) -> Result<(), String> {
        if self.seen != self.events || !self.buf.is_empty() {
            return Err(format!(
                "stream cut short: {} of {} events{}",
                self.seen,
                self.events,
                if self.buf.is_empty() {
                    ""
                } else {
                    " and a partial one"
                }
            ));
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(t: &Target) -> Result<Conn, String> {
    let mut tcp = TcpStream::connect(t.connect)
        .await
        .map_err(|e| format!("connect {}: {e}", t.connect))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match &t.via {
        Via::Direct => Box::new(tcp),
        Via::HttpConnect { auth } => {
            http_connect(&mut tcp, t.upstream, auth).await?;
            Box::new(tcp)
        }
        Via::Socks5 { user, pass } => {
            let s = tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                tcp, t.upstream, user, pass,
            )
            .await
            .map_err(|e| format!("SOCKS5 handshake: {e}"))?;
            Box::new(s.into_inner())
        }
    };
    let io: Box<dyn Io> = match &t.tls {
        Some((cfg, name)) => Box::new(
            TlsConnector::from(cfg.clone())
                .connect(name.clone(), io)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?,
        ),
        None => io,
    };
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    Ok(Conn {
        sender,
        io: Some(Box::pin(conn)),
    })
}

async fn http_connect(tcp: &mut TcpStream, to: SocketAddr, auth: &str) -> Result<(), String> {
    let req = format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\nProxy-Authorization: {auth}\r\n\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("CONNECT write: {e}"))?;
    // Byte by byte, so no tunnelled byte is read past the head (once per connection).
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        let b = tcp
            .read_u8()
            .await
            .map_err(|e| format!("CONNECT reply: {e}"))?;
        head.push(b);
        if head.len() > 16 * 1024 {
            return Err("CONNECT reply head too long".into());
        }
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "CONNECT refused: {}",
            line.lines().next().unwrap_or("")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_check_accepts_whole_ordered_streams_split_anywhere() {
        let all: Vec<u8> = (0..5).flat_map(|i| crate::sse::event(i).to_vec()).collect();
        for cut in [1, 7, 50, 200] {
            let mut c = SseCheck::new(5);
            for chunk in all.chunks(cut) {
                c.feed(chunk).unwrap();
            }
            c.finish().unwrap();
        }
    }

    /// A plain HTTP/1.1 server: `/json` answers 1000 bytes, `/short` 999, `/sse` five
    /// events 1 ms apart. Returns its address and a count of the connections it accepted.
    async fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use http_body_util::combinators::BoxBody;
        use hyper::body::Incoming;
        use std::convert::Infallible;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body: BoxBody<Bytes, Infallible> = match req.uri().path() {
                        "/sse" => crate::sse::SseBody::new(5, Duration::from_millis(1)).boxed(),
                        "/short" => Full::new(Bytes::from(vec![b'x'; 999])).boxed(),
                        _ => Full::new(Bytes::from(vec![b'x'; 1000])).boxed(),
                    };
                    Ok::<_, Infallible>(hyper::Response::new(body))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        (addr, accepted)
    }

    fn target(addr: SocketAddr, path: &'static str) -> Arc<Target> {
        Arc::new(Target {
            connect: addr,
            via: Via::Direct,
            upstream: addr,
            tls: None,
            path: Uri::from_static(path),
            host: HeaderValue::from_static("bench.test"),
        })
    }

    async fn load(t: Arc<Target>, stream: bool, expect: Expect, conns: usize) -> LoadResult {
        let start = Instant::now();
        let end = start + Duration::from_millis(300);
        let template = Arc::new(RequestTemplate::new(stream));
        run(t, template, expect, conns, Duration::ZERO, start, end).await
    }

    #[tokio::test]
    async fn load_keeps_its_connections_alive_and_counts_good_answers() {
        let (addr, accepted) = server().await;
        let r = load(target(addr, "/json"), false, Expect::Json { len: 1000 }, 5).await;
        assert_eq!(r.errors, 0, "{:?}", r.error_kinds);
        assert!(r.ok >= 5, "{} requests", r.ok);
        assert_eq!(r.latency_us.len() as u64, r.ok);
        // One connection each, reused: the I/O is driven between and during requests.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);

        let r = load(target(addr, "/sse"), true, Expect::Sse { events: 5 }, 3).await;
        assert_eq!(r.errors, 0, "{:?}", r.error_kinds);
        assert!(r.ok >= 3, "{} streams", r.ok);
        assert_eq!(r.ttfb_us.len() as u64, r.ok);
        // Five events 1 ms apart: a whole stream takes at least 4 ms, its first byte less.
        assert!(
            r.latency_us.iter().all(|&l| l >= 4000),
            "{:?}",
            r.latency_us
        );
    }

    #[tokio::test]
    async fn load_counts_wrong_answers_as_errors() {
        let (addr, _) = server().await;
        let r = load(target(addr, "/short"), false, Expect::Json { len: 1000 }, 2).await;
        assert_eq!(r.ok, 0);
        assert!(r.errors >= 2);
        assert!(
            r.error_kinds
                .keys()
                .all(|k| k == "body of 999 bytes, expected 1000"),
            "{:?}",
            r.error_kinds
        );
        let r = load(target(addr, "/json"), true, Expect::Sse { events: 5 }, 1).await;
        assert_eq!(r.ok, 0);
        assert!(r.errors >= 1, "{:?}", r.error_kinds);
    }

    #[test]
    fn error_kinds_are_cut_at_a_character_boundary() {
        let mut r = LoadResult::default();
        // 119 ASCII bytes, then a 3-byte character across byte 120.
        r.error(format!("{}→ and more", "x".repeat(119)));
        assert_eq!(r.error_kinds.keys().next().map(String::len), Some(119));
        assert_eq!(r.errors, 1);
    }

    #[test]
    fn sse_check_rejects_reordered_and_short_streams() {
        let mut c = SseCheck::new(3);
        c.feed(&crate::sse::event(0)).unwrap();
        assert!(c.feed(&crate::sse::event(2)).is_err());
        let mut c = SseCheck::new(3);
        c.feed(&crate::sse::event(0)).unwrap();
        assert!(c.finish().is_err());
    }
}
