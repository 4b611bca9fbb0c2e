//! The data port and the admin port: accept loops on hyper, with graceful shutdown.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ConfigStore, describe};
use crate::forward::{Forwarder, ResponseBody};
use crate::metrics::GaugeGuard;

/// Serve `forwarder` on `listener` until `shutdown` resolves, then let open connections
/// finish for up to `grace`.
pub async fn serve_data(
    listener: TcpListener,
    forwarder: Arc<Forwarder>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve(listener, data_service(forwarder), None, shutdown, grace).await;
}

/// The data port's service: every request to the forwarder.
pub(crate) fn data_service(forwarder: Arc<Forwarder>) -> impl HttpService<ResponseBody> {
    service_fn(move |req: Request<Incoming>| {
        // `map`, not an async block: awaiting the answer inside one would keep it twice
        // (as captured and as awaited), and this future is every request's state.
        forwarder.clone().handle(req).map(Ok::<_, Infallible>)
    })
}

type LogFilterFn = dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync;

/// Changes (or, with `None`, reads) the process's log filter; the binary supplies it,
/// and, when its lines go through a queue that may drop them, how many it dropped.
#[derive(Clone)]
pub struct LogControl {
    filter: Arc<LogFilterFn>,
    dropped: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
}

impl LogControl {
    pub fn new(f: impl Fn(Option<&str>) -> Result<String, String> + Send + Sync + 'static) -> Self {
        Self {
            filter: Arc::new(f),
            dropped: None,
        }
    }

    /// Lines dropped so far because the log queue was full (a monotonic count).
    pub fn with_dropped_lines(mut self, count: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.dropped = Some(Arc::new(count));
        self
    }

    pub fn dropped_lines(&self) -> Option<Arc<dyn Fn() -> u64 + Send + Sync>> {
        self.dropped.clone()
    }
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogControl")
    }
}

/// Bearer token of the admin port's mutating endpoints. `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// At least 16 characters: it guards a port every container of the pod can reach.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.len() < 16 {
            return Err("the admin token must be at least 16 characters".into());
        }
        Ok(Self(Arc::from(token)))
    }

    fn matches(&self, given: &str) -> bool {
        let (a, b) = (given.trim().as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// `/loglevel` on the admin port of both roles: GET shows the filter in force; PUT, with
/// the admin token, replaces it until the next PUT or restart.
#[derive(Clone, Debug, Default)]
pub struct LogLevelEndpoint {
    pub control: Option<LogControl>,
    /// Without one, PUT is disabled.
    pub token: Option<AdminToken>,
}

impl LogLevelEndpoint {
    pub async fn handle(&self, req: Request<Incoming>) -> (StatusCode, &'static str, String) {
        let text = |status, body: String| (status, "text/plain", body);
        match *req.method() {
            http::Method::GET => match self.control.as_ref().map(|c| (c.filter)(None)) {
                Some(Ok(current)) => text(StatusCode::OK, format!("{current}\n")),
                Some(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                None => not_available(),
            },
            http::Method::PUT => self.set(req).await,
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET or PUT /loglevel\n".into(),
            ),
        }
    }

    /// Mutating, so it needs the admin token: the admin port is reachable by anything in
    /// the pod (and by the kubelet), the token only by whoever mounted it.
    async fn set(&self, req: Request<Incoming>) -> (StatusCode, &'static str, String) {
        let text = |status, body: &str| (status, "text/plain", body.to_owned());
        let Some(expected) = &self.token else {
            return text(
                StatusCode::FORBIDDEN,
                "changing the log level is disabled; start with --admin-token-file\n",
            );
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| expected.matches(g)) {
            return text(StatusCode::UNAUTHORIZED, "admin token required\n");
        }
        let Some(control) = &self.control else {
            return not_available();
        };
        let body = match tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::BodyExt::collect(req.into_body()),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            _ => return text(StatusCode::BAD_REQUEST, "could not read the body\n"),
        };
        let filter = String::from_utf8_lossy(&body).trim().to_owned();
        if filter.is_empty() || filter.len() > 1024 {
            return text(
                StatusCode::BAD_REQUEST,
                "send a log filter such as `debug` or `info,hyper=warn`\n",
            );
        }
        match (control.filter)(Some(&filter)) {
            Ok(now) => {
                tracing::warn!(filter = %now, "log level changed through the admin port");
                (StatusCode::OK, "text/plain", format!("{now}\n"))
            }
            Err(e) => (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        }
    }
}

fn not_available() -> (StatusCode, &'static str, String) {
    (
        StatusCode::NOT_FOUND,
        "text/plain",
        "log level control not available\n".into(),
    )
}

/// What the admin port serves from.
#[derive(Clone)]
pub struct Admin {
    pub config: Arc<ConfigStore>,
    pub log_level: LogLevelEndpoint,
}

/// `/metrics`, `/healthz`, `/readyz`, `/config` (providers with masked proxies) and
/// `/loglevel` (GET; PUT with the admin token).
pub async fn serve_admin(
    listener: TcpListener,
    admin_state: Admin,
    shutdown: impl Future<Output = ()>,
) {
    let svc = move |req: Request<Incoming>| {
        let state = admin_state.clone();
        async move { Ok::<_, Infallible>(admin(req, &state).await) }
    };
    serve(
        listener,
        service_fn(svc),
        None,
        shutdown,
        Duration::from_secs(1),
    )
    .await;
}

async fn admin(req: Request<Incoming>, state: &Admin) -> Response<Full<Bytes>> {
    let config = &state.config;
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (_, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            config.metrics().render(),
        ),
        (_, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        (_, "/readyz") => {
            let snap = config.snapshot();
            let contact = config
                .seconds_since_contact()
                .map_or_else(|| "never".to_owned(), |s| format!("{s}s ago"));
            if config.is_loaded() {
                (
                    StatusCode::OK,
                    "text/plain",
                    format!(
                        "ready: config version {}, {} providers, last contact with the config source {contact}\n",
                        snap.version,
                        snap.providers.len()
                    ),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no config loaded yet\n".to_owned(),
                )
            }
        }
        (_, "/config") => (
            StatusCode::OK,
            "application/json",
            describe(&config.snapshot()).to_string(),
        ),
        (_, "/loglevel") => state.log_level.handle(req).await,
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// What the accept loops serve: a cloneable hyper service with a sendable future.
pub trait HttpService<B>:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
}

/// The response body of an [`HttpService`].
pub trait ResponseBodyOf:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> ResponseBodyOf for B
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
}

/// Serve `svc` on `listener` (TLS first when `tls` is given) until `shutdown` resolves,
/// then give open connections up to `grace` to finish. The accept loop of every port of
/// every role, except the data port with dedicated workers (see [`serve_handed`]).
pub async fn serve<S, B>(
    listener: TcpListener,
    svc: S,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: HttpService<B>,
    B: ResponseBodyOf,
{
    let conns = Connections::new(svc, tls);
    accept_until(&listener, shutdown, |stream, peer| {
        conns.spawn(stream, peer)
    })
    .await;
    drop(listener);
    conns.finish(grace).await;
}

/// Serve `svc` on the connections an acceptor hands over (see `workers`) until it stops
/// handing, then give open connections up to `grace` to finish.
/// `open` counts the connections open.
pub async fn serve_handed<S, B>(
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    svc: S,
    grace: Duration,
    open: prometheus::IntGauge,
) where
    S: HttpService<B>,
    B: ResponseBodyOf,
{
    let mut conns = Connections::new(svc, None);
    conns.open = Some(open);
    while let Some((stream, peer)) = inbox.recv().await {
        match TcpStream::from_std(stream) {
            Ok(stream) => conns.spawn(stream, peer),
            Err(e) => tracing::warn!(%peer, error = %e, "cannot take over a connection"),
        }
    }
    conns.finish(grace).await;
}

/// Accept on `listener` until `shutdown` resolves, handing each connection to `handle`.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        handle(stream, peer);
    }
}

/// Graceful shutdown of an accept loop's connections. A connection checks the signal
/// with one atomic load per poll; hyper-util's `GracefulShutdown` polled a watch channel
/// (a mutex and a waker comparison) on every poll of every connection, ~1.5 % of a
/// proxied request's instructions (callgrind).
struct Drain {
    signal: Arc<DrainSignal>,
    /// Each connection holds a receiver, never polled: `closed()` once all are gone.
    alive: tokio::sync::watch::Sender<()>,
}

struct DrainSignal {
    draining: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Drain {
    fn new() -> Self {
        Self {
            signal: Arc::new(DrainSignal {
                draining: AtomicBool::new(false),
                notify: tokio::sync::Notify::new(),
            }),
            alive: tokio::sync::watch::channel(()).0,
        }
    }

    fn watcher(&self) -> DrainWatcher {
        DrainWatcher {
            signal: self.signal.clone(),
            alive: self.alive.subscribe(),
        }
    }

    /// Ask every connection to finish after its current request; wait until all did.
    async fn shutdown(self) {
        self.signal.draining.store(true, Ordering::Release);
        self.signal.notify.notify_waiters();
        self.alive.closed().await;
    }
}

/// One connection's hold on a [`Drain`].
struct DrainWatcher {
    signal: Arc<DrainSignal>,
    alive: tokio::sync::watch::Receiver<()>,
}

impl DrainWatcher {
    /// `conn`, asked to finish gracefully once [`Drain::shutdown`] is called. Must run as
    /// a task of its own: it registers the task's waker once, on its first poll, and
    /// relies on it staying the same (a tokio task's waker does).
    async fn watch<C: GracefulConnection>(self, conn: C) -> Result<(), C::Error> {
        // `alive` is held, unpolled, until the connection ends.
        let Self {
            signal,
            alive: _alive,
        } = self;
        let mut conn = std::pin::pin!(conn);
        let mut notified = Some(std::pin::pin!(signal.notify.notified()));
        let mut asked = false;
        std::future::poll_fn(|cx| {
            // Registered (with this task's waker) on the first poll only.
            if let Some(n) = notified.take() {
                let _ = n.poll(cx);
            }
            if !asked && signal.draining.load(Ordering::Acquire) {
                asked = true;
                conn.as_mut().graceful_shutdown();
            }
            conn.as_mut().poll(cx)
        })
        .await
    }
}

/// The HTTP connections of one accept loop: each on a task of the runtime that spawns it,
/// all of them watched for a graceful shutdown.
struct Connections<S> {
    svc: S,
    tls: Option<tokio_rustls::TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    drain: Drain,
    /// Counts the connections open, if set.
    open: Option<prometheus::IntGauge>,
}

impl<S> Connections<S> {
    fn new(svc: S, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        Self {
            svc,
            tls,
            builder: auto::Builder::new(TokioExecutor::new()),
            drain: Drain::new(),
            open: None,
        }
    }

    fn spawn<B>(&self, stream: TcpStream, peer: SocketAddr)
    where
        S: HttpService<B>,
        B: ResponseBodyOf,
    {
        let (svc, builder, watcher, tls) = (
            self.svc.clone(),
            self.builder.clone(),
            self.drain.watcher(),
            self.tls.clone(),
        );
        let open = self.open.clone().map(GaugeGuard::new);
        tokio::spawn(async move {
            let _open = open;
            let result = match tls {
                None => {
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), svc)
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    // A client that never finishes its handshake must not hold a task.
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(tls), svc)
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    /// Ask every connection to finish after its current request; wait up to `grace`.
    async fn finish(self, grace: Duration) {
        if tokio::time::timeout(grace, self.drain.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open after {} s; closing them",
                grace.as_secs()
            );
        }
    }
}

/// Bind, with an error that names the address.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for the {what} port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At shutdown a request in flight still gets its whole answer, an idle keep-alive
    /// connection is closed at once, and the accept loop returns when both are gone, long
    /// before the grace period.
    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_finishes_requests_in_flight_and_closes_idle_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let slow = service_fn(|_req: Request<Incoming>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        });
        let server = tokio::spawn(serve(
            listener,
            slow,
            None,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(30),
        ));
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 512];
        let n = idle.read(&mut first).await.unwrap();
        assert!(
            first[..n].ends_with(b"done"),
            "{:?}",
            String::from_utf8_lossy(&first[..n])
        );
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        stop.send(()).unwrap();
        let within = Duration::from_secs(5);
        let mut answer = Vec::new();
        tokio::time::timeout(within, busy.read_to_end(&mut answer))
            .await
            .expect("the busy connection closes after its answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
            "{answer}"
        );
        let closed = tokio::time::timeout(within, idle.read(&mut first)).await;
        assert_eq!(closed.expect("the idle connection is closed").unwrap(), 0);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the accept loop waits for its connections, not for the grace period")
            .unwrap();
    }

    /// hyper keeps each connection's request future in memory of that connection's own, so
    /// with many connections it is cold whenever its next request comes and every byte
    /// written into it costs a cache miss (measured: `make bench-instructions`). It was
    /// 4 KiB until `async fn` wrappers stopped keeping their arguments twice; one wrapper
    /// too many doubles it again, and this fails.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_future_stays_small() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const MOST: usize = 3 * 1024;
        let sidecar = crate::Sidecar::new(
            crate::SidecarSettings::default(),
            crate::tls::TrustRoots::with_extra(Vec::new()),
        );
        let forwarder = Arc::new(Forwarder::new(
            sidecar.config.clone(),
            sidecar.pool.clone(),
            sidecar.metrics.clone(),
        ));
        let inner = std::sync::Mutex::new(data_service(forwarder));
        let size = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = size.clone();
        let probe = service_fn(move |req: Request<Incoming>| {
            let fut = hyper::service::HttpService::call(
                &mut *inner.lock().unwrap_or_else(|p| p.into_inner()),
                req,
            );
            seen.store(std::mem::size_of_val(&fut), Ordering::Relaxed);
            fut
        });
        let (mut client, server) = tokio::io::duplex(4096);
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), probe);
        let talk = async {
            client
                .write_all(
                    b"GET /nosuch/v1/messages HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                )
                .await
                .unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let (served, answer) = tokio::join!(conn, talk);
        served.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 404"), "{answer:?}");
        let size = size.load(Ordering::Relaxed);
        assert!(size > 0, "the service was not called");
        assert!(
            size <= MOST,
            "a request's future is {size} bytes, more than {MOST}: look for an async fn \
             that wraps another one's future, or a local that lives across an await"
        );
    }

    #[test]
    fn admin_tokens_are_long_and_never_shown() {
        assert!(AdminToken::new("short").is_err());
        let token = AdminToken::new("  sixteen-chars-token\n").unwrap();
        assert!(token.matches("sixteen-chars-token"));
        assert!(!token.matches("sixteen-chars-tokem"));
        let endpoint = LogLevelEndpoint {
            control: None,
            token: Some(token),
        };
        let settings = crate::SidecarSettings {
            admin_token: endpoint.token.clone(),
            ..Default::default()
        };
        for shown in [format!("{endpoint:?}"), format!("{settings:?}")] {
            assert!(!shown.contains("sixteen"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }
}
