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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::RequestBody;
use crate::connector::Connector;
use crate::error::{ConnectError, ErrorClass};

/// Sends on a connection that was already used may find it closed by the server at that
/// very moment; hyper hands such a request back unsent, and it is tried on another one.
const SEND_ATTEMPTS: usize = 3;

/// How a request failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: nothing was sent, another path may be tried.
    Connect(ConnectError),
    /// The connection failed after the request was (partly) written.
    Http(hyper::Error),
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
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

struct IdleConn {
    sender: http1::SendRequest<RequestBody>,
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
pub struct ConnLease {
    h1: Option<(Arc<ConnSet>, usize, http1::SendRequest<RequestBody>)>,
}

impl Drop for ConnLease {
    fn drop(&mut self) {
        if let Some((set, shard, sender)) = self.h1.take() {
            set.put_back(shard, sender);
        }
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

    /// Send `req` (origin-form URI: path and query) to the upstream.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, ConnLease), SendError> {
        let shard = self.current_shard();
        for _ in 0..SEND_ATTEMPTS {
            match self.checkout(shard).await.map_err(SendError::Connect)? {
                Sender::H1(mut sender) => {
                    if !sender.is_ready() && sender.ready().await.is_err() {
                        continue; // closed before use: nothing sent
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
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let lease = ConnLease {
                                h1: Some((self.clone(), shard, sender)),
                            };
                            return Ok((resp, lease));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(back) => req = back,
                            None => return Err(SendError::Http(e.into_error())),
                        },
                    }
                }
                Sender::H2(mut sender) => {
                    *req.uri_mut() = self.absolute(req.uri());
                    req.headers_mut().remove(header::HOST);
                    match sender.try_send_request(req).await {
                        Ok(resp) => return Ok((resp, ConnLease { h1: None })),
                        Err(mut e) => match e.take_message() {
                            Some(back) => req = back,
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
    /// up or gets built, whichever comes first, within the connect timeout.
    async fn checkout(self: &Arc<Self>, shard: usize) -> Result<Sender, ConnectError> {
        let rx = {
            let mut st = self.lock(shard);
            if let Some(s) = self.take_usable(&mut st) {
                return Ok(s);
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            self.start_connects(shard, &mut st);
            rx
        };
        match tokio::time::timeout(self.settings.connect_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ConnectError::new(
                ErrorClass::ConnectIo,
                "the connection pool shut down",
            )),
            Err(_) => Err(ConnectError::new(
                ErrorClass::ConnectTimeout,
                format!(
                    "no connection to the upstream within the connect timeout ({} ms)",
                    self.settings.connect_timeout.as_millis()
                ),
            )),
        }
    }

    fn take_usable(&self, st: &mut State) -> Option<Sender> {
        if let Some(h2) = &st.h2 {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
            st.h2 = None;
        }
        while let Some(conn) = st.idle.pop() {
            if conn.since.elapsed() >= self.settings.idle_timeout {
                // The rest are older still.
                st.idle.clear();
                break;
            }
            // Not `is_ready`: a new connection whose task has not run yet is not ready but
            // perfectly usable (`send` waits for it). Dropping those cost the single-threaded
            // sidecar 462 connections for 256 clients in the benchmark.
            if !conn.sender.is_closed() {
                return Some(Sender::H1(conn.sender));
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
                    drive(driver, "h2");
                    Sender::H2(sender)
                })
                .map_err(|e| handshake_failed("HTTP/2", &e)),
            Ok(conn) => http1::Builder::new()
                .handshake(TokioIo::new(conn))
                .await
                .map(|(sender, driver)| {
                    drive(driver, "h1");
                    Sender::H1(sender)
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
            Ok(Sender::H1(sender)) => {
                if self.settings.want_h2 {
                    st.saw_h1 = true;
                }
                self.hand_over(&mut st, sender);
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
    fn hand_over(&self, st: &mut State, mut sender: http1::SendRequest<RequestBody>) {
        while let Some(w) = st.waiters.pop_front() {
            match w.send(Ok(Sender::H1(sender))) {
                Ok(()) => return,
                Err(Ok(Sender::H1(back))) => sender = back,
                Err(_) => return,
            }
        }
        if !self.retired.load(Ordering::Relaxed) {
            st.idle.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// An HTTP/1.1 connection whose response ended. Ready now in the common case (hyper
    /// saw the end of the body before we did); otherwise once it is, or never if it closes.
    fn put_back(self: Arc<Self>, shard: usize, mut sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            let mut st = self.lock(shard);
            self.hand_over(&mut st, sender);
            return;
        }
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut st = self.lock(shard);
                self.hand_over(&mut st, sender);
            }
        });
    }

    /// Close idle connections past the idle timeout and ones the upstream closed.
    pub fn reap_idle(&self) {
        let timeout = self.settings.idle_timeout;
        for shard in 0..self.shards.len() {
            self.lock(shard)
                .idle
                .retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
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

/// Run a connection's I/O until it closes.
fn drive(driver: impl Future<Output = hyper::Result<()>> + Send + 'static, protocol: &'static str) {
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(protocol, error = %e, "upstream connection ended");
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
        let url = UpstreamUrl::parse(&upstream.base_url()).unwrap();
        let authority = url.authority();
        let connector = Connector::new(
            url,
            None,
            None,
            Duration::from_secs(5),
            Arc::new(NoObserver),
        )
        .unwrap();
        Arc::new(ConnSet::new(
            connector,
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
        let mut req = Request::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
        *req.uri_mut() = Uri::from_static("/v1/messages");
        req
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
        let (resp, lease) = set.send(get()).await.unwrap();
        assert!(resp.status().is_success());
        resp.into_body().collect().await.unwrap();
        drop(lease);
        assert_eq!(upstream.connections(), 1, "the parked connection served it");
    }
}
