//! The connections of one agent: idle HTTP/1.1 connections (most recently used first) or
//! one shared HTTP/2 connection, built on `hyper::client::conn`; a set of them per
//! data-plane worker (shard), so a connection is driven and used on one thread.
//!
//! Why not hyper-util's pooling client: it races a fresh connect against the idle list for
//! every request that finds no idle connection, and lets every connect it started run to
//! the end. Under load that opened 272–958 connections for 256 clients, and when the
//! proxy's handshake was slow (Dante checking a password) it piled thousands of SOCKS
//! handshakes onto the proxy. Here a request that finds nothing idle waits in line; a
//! connect starts only while fewer connects are pending than requests waiting (and no more
//! than `max_connecting` at once), and whichever comes first, a returned connection or a
//! new one, goes to the oldest waiter. An HTTP/1.1 connection goes back the moment its
//! response body ends, without a task hop, so the next request finds it.
//!
//! An HTTP/1.1 connection's I/O is not a task of its own: the request that holds the
//! connection polls it, while waiting for the response head and then from its response
//! body ([`UpstreamBody`]). A request and every chunk of its answer thus cost one task
//! wake-up, not two (the client connection's, then the upstream connection's, each queued
//! behind the others), which is what nginx pays: measured by the benchmark. hyper's
//! connection and the body channel still signal each other; [`WakeGate`] keeps those
//! signals from waking the task again (one task poll per streamed chunk, not two). Idle
//! connections are not polled at all; one the upstream closed meanwhile is found when it
//! is taken (polled once, without a waker) or by the idle reaper. HTTP/2 connections are
//! shared by many requests and keep a task each.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::RequestBody;
use super::gate::{Quiet, WakeGate};
use crate::connector::{Conn, Connector};
use crate::error::{ConnectError, ErrorClass};

/// Sends on a connection that was already used may find it closed by the server at that
/// very moment; hyper hands such a request back unsent, and it is tried on another one.
const SEND_ATTEMPTS: usize = 3;

/// An idle connection parked more recently than this is taken without asking whether the
/// upstream closed it (see [`ConnSet::take_usable`]).
const FRESH: Duration = Duration::from_millis(1);

/// How a request failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: nothing was sent, another path may be tried.
    Connect(ConnectError),
    /// The connection failed after the request was (partly) written.
    Http(hyper::Error),
    /// No response headers by the deadline (a connection may not have been found either).
    HeadersTimeout,
}

/// What the upstream is called on the wire.
pub(crate) struct Target {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The `Host` header for HTTP/1.1 (port only when not the default).
    pub host: HeaderValue,
    /// HTTP/1.1 requests go in absolute form (an http upstream behind an HTTP proxy).
    pub absolute_form: bool,
}

pub(crate) struct ConnSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connecting: usize,
    /// Offer h2 in ALPN; until the upstream answers h1, one connection is enough.
    pub want_h2: bool,
}

enum Sender {
    H1(H1),
    H2(http2::SendRequest<RequestBody>),
}

/// An HTTP/1.1 connection: the handle requests go in by, and its I/O, driven by whoever
/// holds the connection.
struct H1 {
    sender: http1::SendRequest<RequestBody>,
    io: H1Io,
    timer: HeadersTimer,
    /// The request's task polls `io` together with what waits on it, through this.
    gate: WakeGate,
}

/// The connection's I/O future; `None` once it ended (it must not be polled again, and
/// dropping it is what fails the requests it never took, handing them back unsent).
struct H1Io(Option<Pin<Box<H1Connection>>>);

type H1Connection = http1::Connection<TokioIo<Conn>, RequestBody>;

impl H1Io {
    /// Read and write what is due; `Ready` once the connection is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(conn) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        let result = ready!(conn.as_mut().poll(cx));
        if let Err(e) = result {
            tracing::debug!(protocol = "h1", error = %e, "upstream connection ended");
        }
        self.0 = None;
        Poll::Ready(())
    }
}

impl H1 {
    /// For a connection nobody polls (idle): did the upstream close it meanwhile?
    fn closed_while_idle(&mut self) -> bool {
        self.sender.is_closed()
            || self
                .io
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_ready()
    }
}

/// Await `fut` while driving the connection's I/O, which it depends on. If the
/// connection ends first, hyper fails `fut` (or hands its request back).
async fn with_io<F: Future>(io: &mut H1Io, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        let _ = io.poll(cx);
        fut.as_mut().poll(cx)
    })
    .await
}

/// [`with_io`] until `deadline`, behind the connection's gate: `None` if it passes first.
///
/// `fut` comes pinned by the caller, and this is no `async fn`: an `async fn` keeps a
/// future argument twice (as passed and as pinned), and this future is part of every
/// request's, which lives in the client connection's memory; a smaller one is fewer
/// cache lines per request.
fn with_io_until<'a, F: Future>(
    io: &'a mut H1Io,
    timer: &'a mut HeadersTimer,
    gate: &'a WakeGate,
    deadline: Instant,
    mut fut: Pin<&'a mut F>,
) -> impl Future<Output = Option<F::Output>> + 'a {
    let mut quiet = Quiet::default();
    poll_fn(move |cx| {
        gate.poll(cx, &mut quiet, |cx| {
            let _ = io.poll(cx);
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            timer.poll_passed(deadline, cx).map(|()| None)
        })
    })
}

/// The headers deadline of the request on an HTTP/1.1 connection: one tokio timer for the
/// connection's life, not one per request (arming and cancelling a timer for every
/// request cost ~1 % of a JSON request's CPU: perf). The timer stays where it was set
/// while later requests, with later deadlines, come and go; if it fires before the
/// current request's deadline, it moves there. Deadlines only move back when the timeout
/// was shortened (a new config), and then the timer does too.
#[derive(Default)]
struct HeadersTimer(Option<Pin<Box<Sleep>>>);

impl HeadersTimer {
    /// `Ready` once `deadline` has passed.
    fn poll_passed(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            ready!(sleep.as_mut().poll(cx));
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired for an earlier request's deadline.
            sleep.as_mut().reset(deadline);
        }
    }
}

struct IdleConn {
    conn: H1,
    since: Instant,
}

type Waiter = oneshot::Sender<Result<Sender, ConnectError>>;

#[derive(Default)]
struct State {
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<IdleConn>,
    h2: Option<http2::SendRequest<RequestBody>>,
    connecting: usize,
    waiters: VecDeque<Waiter>,
    /// The upstream answered h1 to an h2 offer: it needs one connection per request.
    saw_h1: bool,
}

/// The connections of one agent.
pub(crate) struct ConnSet {
    connector: Connector,
    target: Target,
    settings: ConnSettings,
    h2: http2::Builder<TokioExecutor>,
    /// One per shard (see [`crate::workers::shard`]); a connection lives in the shard of
    /// the thread whose runtime drives it.
    shards: Box<[Mutex<State>]>,
    retired: AtomicBool,
}

/// Holds an HTTP/1.1 connection while its response body streams; returns it on drop.
struct ConnLease {
    h1: Option<(Arc<ConnSet>, usize, H1)>,
}

impl ConnLease {
    /// `f` (what waits on the connection) after driving the connection's I/O, both behind
    /// its gate; just `f` for HTTP/2, whose connection has a task of its own.
    fn poll_with_io<T>(
        &mut self,
        cx: &mut Context<'_>,
        quiet: &mut Quiet,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        match self.h1.as_mut() {
            Some((_, _, conn)) => {
                let H1 { io, gate, .. } = conn;
                gate.poll(cx, quiet, |cx| {
                    let _ = io.poll(cx);
                    f(cx)
                })
            }
            None => f(cx),
        }
    }

    fn release(&mut self) {
        if let Some((set, shard, conn)) = self.h1.take() {
            set.put_back(shard, conn);
        }
    }
}

impl Drop for ConnLease {
    fn drop(&mut self) {
        self.release();
    }
}

/// An upstream response body and, for HTTP/1.1, the connection it arrives on: polling the
/// body drives the connection, and the connection goes back to the pool the moment the
/// body ends (or closes, if the body was dropped half read or failed).
pub struct UpstreamBody {
    body: Incoming,
    conn: ConnLease,
    quiet: Quiet,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let body = &mut this.body;
        let frame = this.conn.poll_with_io(cx, &mut this.quiet, |cx| {
            Pin::new(&mut *body).poll_frame(cx)
        });
        match &frame {
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.conn.release(),
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
            // The end of a body without a known length, or a failure (after which hyper has
            // closed the connection, and `release` drops it rather than parking it).
            Poll::Ready(Some(Err(_)) | None) => this.conn.release(),
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl ConnSet {
    pub fn new(
        connector: Connector,
        target: Target,
        settings: ConnSettings,
        shards: usize,
    ) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false)
            // Large fixed windows, not the adaptive one: h2 budgets small DATA frames
            // against half the connection window, and SSE events are small frames; with a
            // 64 KiB window 256 concurrent streams trip ENHANCE_YOUR_CALM (found by the
            // benchmark: 1202 broken streams at 256 SSE streams over h2).
            .adaptive_window(false)
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024);
        Self {
            connector,
            target,
            settings,
            h2,
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(State::default()))
                .collect(),
            retired: AtomicBool::new(false),
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent at each step.
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current_shard(&self) -> usize {
        crate::workers::shard() % self.shards.len()
    }

    /// Send `req` (origin-form URI: path and query) to the upstream; the response headers
    /// must be in by `deadline`, finding a connection included.
    ///
    /// An `async` block rather than an `async fn`, which would keep `req` twice (see
    /// [`with_io_until`]).
    #[allow(clippy::manual_async_fn)] // see above: the async fn would be bigger
    pub fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + '_ {
        async move {
            let shard = self.current_shard();
            // After a connection turned out closed, look at every idle one (see `take_usable`).
            let mut careful = false;
            for _ in 0..SEND_ATTEMPTS {
                match self.checkout(shard, deadline, careful).await? {
                    Sender::H1(mut conn) => {
                        // A new connection is ready once its I/O ran.
                        if !conn.sender.is_ready() {
                            let ready = pin!(conn.sender.ready());
                            match with_io_until(
                                &mut conn.io,
                                &mut conn.timer,
                                &conn.gate,
                                deadline,
                                ready,
                            )
                            .await
                            {
                                None => return Err(SendError::HeadersTimeout),
                                Some(Err(_)) => continue, // closed before use: nothing sent
                                Some(Ok(())) => {}
                            }
                        }
                        // The forwarder's origin-form URI goes out as it is (no copy); only
                        // absolute form, or a request handed back by an h2 connection, needs
                        // a new one.
                        if self.target.absolute_form {
                            *req.uri_mut() = self.absolute(req.uri());
                        } else if req.uri().scheme().is_some() {
                            *req.uri_mut() = Uri::from(origin_form(req.uri()));
                        }
                        req.headers_mut()
                            .insert(header::HOST, self.target.host.clone());
                        let sent = pin!(conn.sender.try_send_request(req));
                        match with_io_until(
                            &mut conn.io,
                            &mut conn.timer,
                            &conn.gate,
                            deadline,
                            sent,
                        )
                        .await
                        {
                            None => return Err(SendError::HeadersTimeout),
                            Some(Ok(resp)) => {
                                let conn = ConnLease {
                                    h1: Some((self.clone(), shard, conn)),
                                };
                                return Ok(resp.map(|body| UpstreamBody {
                                    body,
                                    conn,
                                    quiet: Quiet::default(),
                                }));
                            }
                            Some(Err(mut e)) => match e.take_message() {
                                Some(back) => {
                                    req = back;
                                    careful = true;
                                }
                                None => return Err(SendError::Http(e.into_error())),
                            },
                        }
                    }
                    Sender::H2(mut sender) => {
                        *req.uri_mut() = self.absolute(req.uri());
                        req.headers_mut().remove(header::HOST);
                        let sent = tokio::time::timeout_at(deadline, sender.try_send_request(req));
                        match sent.await.map_err(|_| SendError::HeadersTimeout)? {
                            Ok(resp) => {
                                let conn = ConnLease { h1: None };
                                return Ok(resp.map(|body| UpstreamBody {
                                    body,
                                    conn,
                                    quiet: Quiet::default(),
                                }));
                            }
                            Err(mut e) => match e.take_message() {
                                Some(back) => {
                                    req = back;
                                    careful = true;
                                }
                                None => return Err(SendError::Http(e.into_error())),
                            },
                        }
                    }
                }
            }
            Err(SendError::Connect(ConnectError::new(
                ErrorClass::ConnectIo,
                format!(
                    "{SEND_ATTEMPTS} connections to the upstream closed before the request could be sent"
                ),
            )))
        }
    }

    /// `uri`'s path and query on the upstream's scheme and authority.
    fn absolute(&self, uri: &Uri) -> Uri {
        let path = origin_form(uri);
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.target.scheme.clone());
        parts.authority = Some(self.target.authority.clone());
        parts.path_and_query = Some(path.clone());
        // Scheme, authority and path were each valid on their own.
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from(path))
    }

    /// A usable connection: idle or shared if there is one, else the next one that frees
    /// up or gets built, whichever comes first, within the connect timeout (and before the
    /// request's `deadline`).
    async fn checkout(
        self: &Arc<Self>,
        shard: usize,
        deadline: Instant,
        careful: bool,
    ) -> Result<Sender, SendError> {
        let rx = {
            let mut st = self.lock(shard);
            if let Some(s) = self.take_usable(&mut st, careful) {
                return Ok(s);
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            self.start_connects(shard, &mut st);
            rx
        };
        let connect_by = Instant::now() + self.settings.connect_timeout;
        match tokio::time::timeout_at(connect_by.min(deadline), rx).await {
            Ok(Ok(result)) => result.map_err(SendError::Connect),
            Ok(Err(_)) => Err(SendError::Connect(ConnectError::new(
                ErrorClass::ConnectIo,
                "the connection pool shut down",
            ))),
            Err(_) if deadline < connect_by => Err(SendError::HeadersTimeout),
            Err(_) => Err(SendError::Connect(ConnectError::new(
                ErrorClass::ConnectTimeout,
                format!(
                    "no connection to the upstream within the connect timeout ({} ms)",
                    self.settings.connect_timeout.as_millis()
                ),
            ))),
        }
    }

    /// The shared h2 connection, or the most recently parked idle h1 connection that is
    /// still open. Whether the upstream closed an idle connection is only asked of those
    /// idle for at least [`FRESH`], or of all when `careful`: asking means polling the
    /// connection's I/O, ~2 % of a request's instructions, for a connection handed back
    /// microseconds ago; and if one the upstream closed slips through, its first poll in
    /// `send` finds it closed and hands the request back unsent, and the next try is careful.
    fn take_usable(&self, st: &mut State, careful: bool) -> Option<Sender> {
        if let Some(h2) = &st.h2 {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
            st.h2 = None;
        }
        while let Some(mut idle) = st.idle.pop() {
            let idle_for = idle.since.elapsed();
            if idle_for >= self.settings.idle_timeout {
                // The rest are older still.
                st.idle.clear();
                break;
            }
            // Not `is_ready`: a new connection whose I/O has not run yet is not ready but
            // perfectly usable (`send` waits for it). Dropping those cost the single-threaded
            // sidecar 462 connections for 256 clients in the benchmark.
            if (idle_for < FRESH && !careful) || !idle.conn.closed_while_idle() {
                return Some(Sender::H1(idle.conn));
            }
        }
        None
    }

    /// Start connects while fewer are pending than requests waiting, up to the limit.
    fn start_connects(self: &Arc<Self>, shard: usize, st: &mut State) {
        st.waiters.retain(|w| !w.is_closed());
        let limit = if self.settings.want_h2 && !st.saw_h1 {
            1
        } else {
            self.settings.max_connecting.max(1)
        };
        while st.connecting < st.waiters.len() && st.connecting < limit {
            st.connecting += 1;
            let set = self.clone();
            tokio::spawn(async move { set.connect(shard).await });
        }
    }

    async fn connect(self: Arc<Self>, shard: usize) {
        let result = match self.connector.connect().await {
            Ok(conn) if conn.is_h2() => self
                .h2
                .handshake(TokioIo::new(conn))
                .await
                .map(|(sender, driver)| {
                    drive_h2(driver);
                    Sender::H2(sender)
                })
                .map_err(|e| handshake_failed("HTTP/2", &e)),
            Ok(conn) => http1::Builder::new()
                .handshake(TokioIo::new(conn))
                .await
                .map(|(sender, io)| {
                    Sender::H1(H1 {
                        sender,
                        io: H1Io(Some(Box::pin(io))),
                        timer: HeadersTimer::default(),
                        gate: WakeGate::default(),
                    })
                })
                .map_err(|e| handshake_failed("HTTP/1.1", &e)),
            Err(e) => Err(e),
        };
        let mut st = self.lock(shard);
        st.connecting -= 1;
        match result {
            Ok(Sender::H2(sender)) => {
                // Every waiter shares it.
                while let Some(w) = st.waiters.pop_front() {
                    let _ = w.send(Ok(Sender::H2(sender.clone())));
                }
                if !self.retired.load(Ordering::Relaxed) {
                    st.h2 = Some(sender);
                }
            }
            Ok(Sender::H1(conn)) => {
                if self.settings.want_h2 {
                    st.saw_h1 = true;
                }
                self.hand_over(&mut st, conn);
            }
            Err(e) => {
                // One failed connect fails one request, as if it had connected itself;
                // the others get connects of their own.
                while let Some(w) = st.waiters.pop_front() {
                    if w.send(Err(e.clone())).is_ok() {
                        break;
                    }
                }
            }
        }
        self.start_connects(shard, &mut st);
    }

    /// To the oldest waiter, else to the idle list (unless retired: then it closes).
    fn hand_over(&self, st: &mut State, mut conn: H1) {
        while let Some(w) = st.waiters.pop_front() {
            match w.send(Ok(Sender::H1(conn))) {
                Ok(()) => return,
                Err(Ok(Sender::H1(back))) => conn = back,
                Err(_) => return,
            }
        }
        if !self.retired.load(Ordering::Relaxed) {
            st.idle.push(IdleConn {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// An HTTP/1.1 connection whose response ended. Ready now in the common case (its I/O
    /// saw the end of the body before the body's reader did); otherwise once it is (a task
    /// drives it until then: the body may have been dropped half read), or never if it
    /// closes.
    fn put_back(self: Arc<Self>, shard: usize, mut conn: H1) {
        if conn.sender.is_closed() || conn.io.0.is_none() {
            return;
        }
        // Everything inside the connection holds the gate's waker, not the task's: let go
        // of the finished request's task, so a parked connection keeps no task alive.
        conn.gate.forget_task();
        if conn.sender.is_ready() {
            let mut st = self.lock(shard);
            self.hand_over(&mut st, conn);
            return;
        }
        tokio::spawn(async move {
            let ready = with_io(&mut conn.io, conn.sender.ready()).await;
            if ready.is_ok() && conn.io.0.is_some() {
                let mut st = self.lock(shard);
                self.hand_over(&mut st, conn);
            }
        });
    }

    /// Close idle connections past the idle timeout and ones the upstream closed.
    pub fn reap_idle(&self) {
        let timeout = self.settings.idle_timeout;
        for shard in 0..self.shards.len() {
            self.lock(shard)
                .idle
                .retain_mut(|c| c.since.elapsed() < timeout && !c.conn.closed_while_idle());
        }
    }

    /// The agent left the pool: close what is idle now; connections in use close when
    /// their response ends. Requests already waiting are still served.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        for shard in 0..self.shards.len() {
            let mut st = self.lock(shard);
            st.idle.clear();
            st.h2 = None;
        }
    }
}

fn origin_form(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// Run a shared HTTP/2 connection's I/O until it closes.
fn drive_h2(driver: impl Future<Output = hyper::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(protocol = "h2", error = %e, "upstream connection ended");
        }
    });
}

fn handshake_failed(protocol: &str, e: &hyper::Error) -> ConnectError {
    ConnectError::new(
        ErrorClass::ConnectIo,
        format!("{protocol} handshake with the upstream failed: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Empty};
    use provider_proxy_api::UpstreamUrl;
    use provider_proxy_testkit::{Upstream, UpstreamOptions};

    use super::*;
    use crate::connector::NoObserver;

    fn conns(upstream: &Upstream) -> Arc<ConnSet> {
        conns_to(&upstream.base_url())
    }

    /// A direct connector to `base_url`, trusting `tls` for https.
    fn connector(base_url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Connector {
        let url = UpstreamUrl::parse(base_url).unwrap();
        Connector::new(url, tls, None, Duration::from_secs(5), Arc::new(NoObserver)).unwrap()
    }

    fn conns_to(base_url: &str) -> Arc<ConnSet> {
        let authority = UpstreamUrl::parse(base_url).unwrap().authority();
        Arc::new(ConnSet::new(
            connector(base_url, None),
            Target {
                scheme: Scheme::HTTP,
                authority: Authority::try_from(authority.as_str()).unwrap(),
                host: HeaderValue::try_from(authority.as_str()).unwrap(),
                absolute_form: false,
            },
            ConnSettings {
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(60),
                max_connecting: 4,
                want_h2: false,
            },
            1,
        ))
    }

    fn get() -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::Right(Empty::new()));
        *req.uri_mut() = Uri::from_static("/v1/messages");
        req
    }

    fn in_a_minute() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_new_connection_parked_before_its_task_ran_is_used_not_dropped() {
        let upstream = Upstream::start_detached(UpstreamOptions::plain());
        let set = conns(&upstream);
        // A connect nobody waits for any more (a freed connection served its request):
        // the new connection is parked before its task ever ran.
        set.lock(0).connecting += 1;
        set.clone().connect(0).await;
        assert_eq!(set.lock(0).idle.len(), 1);
        let resp = set.send(get(), in_a_minute()).await.unwrap();
        assert!(resp.status().is_success());
        resp.into_body().collect().await.unwrap();
        assert_eq!(upstream.connections(), 1, "the parked connection served it");
    }

    /// An HTTP/1.1 server that answers one request per connection and keeps the
    /// connections open (keep-alive) until `close_all`: an upstream whose idle timeout
    /// fires while our connections sit idle.
    struct ClosingUpstream {
        addr: std::net::SocketAddr,
        open: Arc<Mutex<Vec<tokio::net::TcpStream>>>,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl ClosingUpstream {
        async fn start() -> Self {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let open = Arc::new(Mutex::new(Vec::new()));
            let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (o, a) = (open.clone(), accepted.clone());
            tokio::spawn(async move {
                while let Ok((mut tcp, _)) = listener.accept().await {
                    a.fetch_add(1, Ordering::SeqCst);
                    let o = o.clone();
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(answer).await.is_ok() {
                            o.lock().unwrap().push(tcp);
                        }
                    });
                }
            });
            Self {
                addr,
                open,
                accepted,
            }
        }

        fn close_all(&self) {
            self.open.lock().unwrap().clear();
        }
    }

    async fn ok(set: &Arc<ConnSet>) -> Result<Bytes, String> {
        let resp = set
            .send(get(), in_a_minute())
            .await
            .map_err(|e| format!("{e:?}"))?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.to_bytes())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_the_upstream_closed_are_never_sent_on_and_get_reaped() {
        let upstream = ClosingUpstream::start().await;
        let set = conns_to(&format!("http://{}", upstream.addr));
        // Four connections, idle now (nobody polls their I/O).
        let (a, b, c, d) = tokio::join!(ok(&set), ok(&set), ok(&set), ok(&set));
        for r in [a, b, c, d] {
            assert_eq!(r.unwrap(), "ok");
        }
        assert_eq!(set.lock(0).idle.len(), 4);
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 4);

        // The upstream closes them all while idle. A request must not be written into
        // one of them (it would fail as sent, with a 502): it gets a new connection.
        upstream.close_all();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(ok(&set).await.unwrap(), "ok");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 5);
        assert_eq!(set.lock(0).idle.len(), 1, "only the new one is parked");

        // The reaper finds the ones the upstream closed without anyone polling them.
        upstream.close_all();
        tokio::time::sleep(Duration::from_millis(50)).await;
        set.reap_idle();
        assert_eq!(set.lock(0).idle.len(), 0);
    }

    /// Connections parked a moment ago are taken without the idle check; when the upstream
    /// did close one, the request comes back unsent and the next try checks every idle
    /// connection, so even a pool full of closed fresh connections costs no 502.
    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_connection_taken_fresh_hands_the_request_back_and_the_retry_checks() {
        let upstream = ClosingUpstream::start().await;
        let set = conns_to(&format!("http://{}", upstream.addr));
        let (a, b, c, d) = tokio::join!(ok(&set), ok(&set), ok(&set), ok(&set));
        for r in [a, b, c, d] {
            assert_eq!(r.unwrap(), "ok");
        }
        upstream.close_all();
        // Let the reactor see the closes, then make the connections look just parked.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for idle in &mut set.lock(0).idle {
            idle.since = Instant::now();
        }
        assert_eq!(ok(&set).await.unwrap(), "ok");
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 5);
        assert_eq!(set.lock(0).idle.len(), 1, "the closed ones are gone");
    }

    /// The headers timer lives as long as the connection. Armed for one request's deadline,
    /// it must neither cut a later request short (it fires early: it moves on) nor let a
    /// shortened timeout run long (a new config: it moves back).
    #[tokio::test(flavor = "current_thread")]
    async fn every_request_on_a_connection_gets_its_own_headers_deadline() {
        // Answers the first request of each connection and never the second.
        let upstream = ClosingUpstream::start().await;
        let set = conns_to(&format!("http://{}", upstream.addr));
        let timeout = Duration::from_millis(300);
        let resp = set.send(get(), Instant::now() + timeout).await.unwrap();
        resp.into_body().collect().await.unwrap();
        tokio::time::sleep(timeout / 2).await;

        let start = Instant::now();
        let second = set.send(get(), start + timeout).await;
        assert!(
            matches!(second, Err(SendError::HeadersTimeout)),
            "{:?}",
            second.map(|r| r.status())
        );
        assert!(
            start.elapsed() >= timeout,
            "timed out after {:?}, at the first request's deadline",
            start.elapsed()
        );
        assert_eq!(
            upstream.accepted.load(Ordering::SeqCst),
            1,
            "same connection"
        );

        // The timed-out connection is gone; a new one serves a request with a long
        // timeout, then one with a short timeout that gets no answer.
        let resp = set.send(get(), in_a_minute()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let start = Instant::now();
        let short = Duration::from_millis(200);
        let second = tokio::time::timeout(Duration::from_secs(10), set.send(get(), start + short))
            .await
            .expect("the short timeout must not wait for the long one");
        assert!(
            matches!(second, Err(SendError::HeadersTimeout)),
            "{:?}",
            second.map(|r| r.status())
        );
        assert!(start.elapsed() >= short);
        assert_eq!(
            upstream.accepted.load(Ordering::SeqCst),
            2,
            "same connection"
        );
    }

    /// A streamed answer (SSE) costs one poll of the reading task per chunk: the
    /// connection and the body channel must not wake the task for each other (see
    /// [`WakeGate`]); without the gate it took two.
    #[tokio::test(flavor = "current_thread")]
    async fn a_streamed_answer_costs_one_task_poll_per_chunk() {
        use std::io::{Read, Write};
        const CHUNKS: usize = 30;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A thread of its own, so that only the reading side runs on the test's runtime.
        let upstream = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut tcp, _) = listener.accept()?;
            tcp.set_nodelay(true)?;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut buf)? {
                    0 => return Ok(()),
                    n => head.extend_from_slice(&buf[..n]),
                }
            }
            tcp.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")?;
            for i in 0..CHUNKS {
                let event = format!("data: {i}\n\n");
                tcp.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
                std::thread::sleep(Duration::from_millis(3));
            }
            tcp.write_all(b"0\r\n\r\n")?;
            // Keep the connection open until the reader is done.
            let _ = tcp.read(&mut buf);
            Ok(())
        });
        let set = conns_to(&format!("http://{addr}"));
        let resp = set.send(get(), in_a_minute()).await.unwrap();
        let mut body = resp.into_body();
        let (mut polls, mut bytes) = (0, 0);
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| {
                polls += 1;
                // Like hyper's server: take frames until the body is pending.
                loop {
                    match ready!(Pin::new(&mut body).poll_frame(cx)) {
                        Some(Ok(frame)) => bytes += frame.data_ref().map_or(0, |d| d.len()),
                        Some(Err(e)) => return Poll::Ready(Err(e)),
                        None => return Poll::Ready(Ok(())),
                    }
                }
            }),
        )
        .await;
        assert!(matches!(end, Ok(Ok(()))), "{end:?}");
        let sent: usize = (0..CHUNKS).map(|i| format!("data: {i}\n\n").len()).sum();
        assert_eq!(bytes, sent);
        // One per chunk, plus a few where the upstream's pauses and the reads line up
        // differently; two per chunk without the gate.
        assert!(
            polls <= CHUNKS + CHUNKS / 3,
            "{polls} task polls for {CHUNKS} chunks"
        );
        drop(set);
        drop(body);
        upstream.join().unwrap().unwrap();
    }

    /// hyper writes a request as headers + body; over TLS it must hand rustls one buffer
    /// (rustls allocates to gather several), over plain TCP it may use writev.
    #[tokio::test(flavor = "current_thread")]
    async fn tls_connections_take_flat_writes_plain_ones_vectored() {
        use tokio::io::AsyncWrite;

        let pki = Arc::new(provider_proxy_testkit::TestPki::new());
        let tls_upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
        let tls_config = pki.rustls_client_config(&[b"http/1.1"]);
        let tls = connector(&tls_upstream.base_url(), Some(tls_config))
            .connect()
            .await
            .unwrap();
        assert!(!tls.is_write_vectored());

        let plain_upstream = Upstream::start(UpstreamOptions::plain());
        let plain = connector(&plain_upstream.base_url(), None)
            .connect()
            .await
            .unwrap();
        assert!(plain.is_write_vectored());
    }
}
