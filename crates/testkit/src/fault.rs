//! Small in-process tokio proxies on `127.0.0.1:0` for what nothing packaged
//! does: misbehave on purpose, or speak SOCKS4a.
//!
//! Client input is parsed with hard bounds (request heads at most 16 KiB,
//! SOCKS4 user id at most 1 KiB, hostname at most 255 bytes) and never makes
//! the server panic: bad input gets a `400` (or a SOCKS rejection) and a
//! close. Tunnel and forward targets must resolve to loopback addresses;
//! anything else is refused (`403` / SOCKS `0x5B`), so a test can never reach
//! out of the machine through these proxies.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};

use crate::util::Detached;

/// Maximum size of a request head (request line + headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// What a [`FaultProxy`] does with each connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// A correct HTTP proxy: `CONNECT host:port` tunnels, and absolute-form
    /// requests (`GET http://127.0.0.1:PORT/path HTTP/1.1`) are forwarded by
    /// rewriting the request line to origin-form, dropping
    /// `Proxy-Authorization`/`Proxy-Connection`, then splicing bytes both ways
    /// (so later requests on that client connection go to the same origin).
    /// With `users` non-empty, Basic auth is required: a missing or wrong
    /// `Proxy-Authorization` gets `407` with
    /// `Proxy-Authenticate: Basic realm="test"` and the connection stays open
    /// for a retry. With `users` empty, no auth.
    Connect { users: Vec<(String, String)> },
    /// Answers every request with this status (e.g. 407, 403, 502), then
    /// closes. A 407 carries `Proxy-Authenticate: Basic realm="test"`.
    Status(u16),
    /// Accepts, reads and discards everything, never answers (closes only
    /// after the client has closed).
    Stall,
    /// Answers the `CONNECT` with 200, waits for the first tunnel bytes (the
    /// TLS ClientHello) and then resets the connection (SO_LINGER 0 → RST).
    ResetAfterRequest,
    /// A working tunnel/forwarder without auth (like `Connect { users: [] }`)
    /// that resets the client connection (RST) after relaying this many bytes
    /// upstream→client.
    ResetAfterBytes(u64),
    /// A SOCKS4/SOCKS4a server (no auth, CONNECT only). With a destination
    /// of `0.0.0.x` (x ≠ 0) the hostname after the user id is used.
    Socks4a,
    /// Answers any input with junk (`HTTP/1.1 xyz ...` plus binary bytes) and
    /// closes.
    Garbage,
    /// A correct HTTP proxy without auth (like `Connect { users: [] }`) whose every
    /// handshake takes this long: a proxy checking passwords slowly. Counts how many
    /// handshakes were in progress at once ([`FaultProxy::peak_handshakes`]).
    SlowConnect(Duration),
}

#[derive(Default)]
struct Stats {
    connections: AtomicUsize,
    tunnels: AtomicUsize,
    forwards: AtomicUsize,
    tunnel_users: Mutex<Vec<String>>,
    targets: Mutex<Vec<String>>,
    socks_targets: Mutex<Vec<String>>,
    handshaking: AtomicUsize,
    peak_handshaking: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fault proxy; stops (listener closed, all tasks aborted) on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    behavior: Behavior,
    stats: Arc<Stats>,
    task: Option<JoinHandle<()>>,
    detached: Option<Detached>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("behavior", &self.behavior)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and serves `behavior`. Must be called inside a
    /// tokio runtime; the proxy runs on that runtime.
    pub fn start(behavior: Behavior) -> FaultProxy {
        let std_listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).expect("fault proxy: bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("fault proxy: set_nonblocking");
        let addr = std_listener.local_addr().expect("fault proxy: local_addr");
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .expect("fault proxy: must be started inside a tokio runtime");
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let b = behavior.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        st.connections.fetch_add(1, Ordering::SeqCst);
                        let _ = tcp.set_nodelay(true);
                        conns.spawn(handle(tcp, b.clone(), st.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        FaultProxy {
            addr,
            behavior,
            stats,
            task: Some(task),
            detached: None,
        }
    }

    /// Like [`FaultProxy::start`], but on a dedicated thread with its own
    /// runtime (see [`crate::upstream::Upstream::start_detached`]).
    pub fn start_detached(behavior: Behavior) -> FaultProxy {
        let b = behavior.clone();
        let ((addr, stats), detached) = Detached::spawn("testkit-fault", move || {
            let p = FaultProxy::start(b);
            ((p.addr, p.stats.clone()), p)
        });
        FaultProxy {
            addr,
            behavior,
            stats,
            task: None,
            detached: Some(detached),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` (or `socks4a://...` for [`Behavior::Socks4a`]).
    pub fn url(&self) -> String {
        let scheme = if self.behavior == Behavior::Socks4a {
            "socks4a"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// Tunnels established (`CONNECT` answered 200, or SOCKS4 granted).
    pub fn tunnels(&self) -> usize {
        self.stats.tunnels.load(Ordering::SeqCst)
    }

    /// For [`Behavior::SlowConnect`]: the most handshakes in progress at once.
    pub fn peak_handshakes(&self) -> usize {
        self.stats.peak_handshaking.load(Ordering::SeqCst)
    }

    /// Absolute-form requests forwarded.
    pub fn forwards(&self) -> usize {
        self.stats.forwards.load(Ordering::SeqCst)
    }

    /// The authenticated user of each `CONNECT` tunnel and forward, in order
    /// (`""` when the proxy has no users).
    pub fn tunnel_users(&self) -> Vec<String> {
        lock(&self.stats.tunnel_users).clone()
    }

    /// `host:port` of each established tunnel or forward, in order.
    pub fn targets(&self) -> Vec<String> {
        lock(&self.stats.targets).clone()
    }

    /// For [`Behavior::Socks4a`]: the requested host of each request, in
    /// order — the hostname for SOCKS4a, the dotted IP for plain SOCKS4.
    pub fn socks_targets(&self) -> Vec<String> {
        lock(&self.stats.socks_targets).clone()
    }

    /// Stops the proxy and waits until its listener and tasks are gone.
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

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A port on 127.0.0.1 with nothing listening (bound, then released).
pub fn closed_port() -> u16 {
    crate::util::free_port()
}

async fn handle(tcp: TcpStream, behavior: Behavior, stats: Arc<Stats>) {
    let _ = match behavior {
        Behavior::Connect { users } => http_proxy(tcp, &users, &stats, None).await,
        Behavior::ResetAfterBytes(n) => http_proxy(tcp, &[], &stats, Some(n)).await,
        Behavior::Status(code) => status_only(tcp, code).await,
        Behavior::Stall => stall(tcp).await,
        Behavior::ResetAfterRequest => reset_after_request(tcp, &stats).await,
        Behavior::Socks4a => socks4a(tcp, &stats).await,
        Behavior::Garbage => garbage(tcp).await,
        Behavior::SlowConnect(delay) => {
            let now = stats.handshaking.fetch_add(1, Ordering::SeqCst) + 1;
            stats.peak_handshaking.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            stats.handshaking.fetch_sub(1, Ordering::SeqCst);
            http_proxy(tcp, &[], &stats, None).await
        }
    };
}

// ---------------------------------------------------------------- parsing

#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum ReadHead {
    Head(Head),
    Eof,
    Bad,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads one request head from `tcp`, using and refilling `buf`; on success
/// the head is removed from `buf` and whatever followed it stays there.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<ReadHead> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_head_end(buf) {
            let head_bytes: Vec<u8> = buf.drain(..end).collect();
            return Ok(match parse_head(&head_bytes) {
                Some(h) => ReadHead::Head(h),
                None => ReadHead::Bad,
            });
        }
        if buf.len() > MAX_HEAD {
            return Ok(ReadHead::Bad);
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                ReadHead::Eof
            } else {
                ReadHead::Bad
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(bytes: &[u8]) -> Option<Head> {
    if bytes.len() > MAX_HEAD + 4 {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let version = parts.next()?.to_string();
    if parts.next().is_some()
        || method.is_empty()
        || target.is_empty()
        || !version.starts_with("HTTP/1.")
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once(':')?;
        if k.is_empty() || k.contains(' ') {
            return None;
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Some(Head {
        method,
        target,
        version,
        headers,
    })
}

/// Splits `host:port` / `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// Parses `http://authority/path?query` into (host, port, origin-form).
fn split_absolute(target: &str) -> Option<(String, u16, String)> {
    let rest = target.strip_prefix("http://")?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        (authority.trim_start_matches('[').trim_end_matches(']'), 80)
    } else {
        let (h, p) = split_host_port(authority)?;
        return Some((h, p, path));
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port, path))
}

fn check_basic(head: &Head, users: &[(String, String)]) -> Option<String> {
    let value = head.header("proxy-authorization")?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (u, p) = decoded.split_once(':')?;
    users
        .iter()
        .find(|(uu, pp)| uu == u && pp == p)
        .map(|(uu, _)| uu.clone())
}

// ------------------------------------------------------------- behaviours

/// Connects to `host:port` if it resolves to loopback only.
async fn connect_loopback(host: &str, port: u16) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await?
        .filter(|a| a.ip().is_loopback())
        .collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "target is not a loopback address",
        ));
    }
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addrs[..]))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn reason(code: u16) -> &'static str {
    http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

fn simple_response(code: u16, close: bool) -> String {
    let mut r = format!("HTTP/1.1 {code} {}\r\n", reason(code));
    if code == 407 {
        r.push_str("Proxy-Authenticate: Basic realm=\"test\"\r\n");
    }
    r.push_str("Content-Length: 0\r\n");
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r
}

/// Writes `bytes`, half-closes, and drains the peer briefly so the reply is
/// not destroyed by an RST caused by unread input.
async fn reply_and_close(mut tcp: TcpStream, bytes: &[u8]) -> io::Result<()> {
    tcp.write_all(bytes).await?;
    tcp.flush().await?;
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

async fn http_proxy(
    mut client: TcpStream,
    users: &[(String, String)],
    stats: &Stats,
    reset_after: Option<u64>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head = match read_head(&mut client, &mut buf).await? {
            ReadHead::Eof => return Ok(()),
            ReadHead::Bad => {
                return reply_and_close(client, simple_response(400, true).as_bytes()).await;
            }
            ReadHead::Head(h) => h,
        };
        let user = if users.is_empty() {
            Some(String::new())
        } else {
            check_basic(&head, users)
        };
        let Some(user) = user else {
            let has_body = head
                .header("content-length")
                .is_some_and(|v| v.trim() != "0")
                || head.header("transfer-encoding").is_some();
            if has_body {
                // Don't bother draining request bodies: close instead.
                return reply_and_close(client, simple_response(407, true).as_bytes()).await;
            }
            client
                .write_all(simple_response(407, false).as_bytes())
                .await?;
            continue;
        };

        if head.method == "CONNECT" {
            let Some((host, port)) = split_host_port(&head.target) else {
                return reply_and_close(client, simple_response(400, true).as_bytes()).await;
            };
            let mut upstream = match connect_loopback(&host, port).await {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return reply_and_close(client, simple_response(403, true).as_bytes()).await;
                }
                Err(_) => {
                    return reply_and_close(client, simple_response(502, true).as_bytes()).await;
                }
            };
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            stats.tunnels.fetch_add(1, Ordering::SeqCst);
            lock(&stats.tunnel_users).push(user);
            lock(&stats.targets).push(format!("{host}:{port}"));
            if !buf.is_empty() {
                upstream.write_all(&buf).await?;
            }
            return relay(client, upstream, reset_after).await;
        }

        let Some((host, port, origin_form)) = split_absolute(&head.target) else {
            return reply_and_close(client, simple_response(400, true).as_bytes()).await;
        };
        let mut upstream = match connect_loopback(&host, port).await {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return reply_and_close(client, simple_response(403, true).as_bytes()).await;
            }
            Err(_) => return reply_and_close(client, simple_response(502, true).as_bytes()).await,
        };
        let mut out = format!("{} {} {}\r\n", head.method, origin_form, head.version);
        for (k, v) in &head.headers {
            if k.eq_ignore_ascii_case("proxy-authorization")
                || k.eq_ignore_ascii_case("proxy-connection")
            {
                continue;
            }
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        upstream.write_all(out.as_bytes()).await?;
        if !buf.is_empty() {
            upstream.write_all(&buf).await?;
        }
        stats.forwards.fetch_add(1, Ordering::SeqCst);
        lock(&stats.tunnel_users).push(user);
        lock(&stats.targets).push(format!("{host}:{port}"));
        return relay(client, upstream, reset_after).await;
    }
}

/// Splices both ways. With `reset_after = Some(n)`, resets `client` once `n`
/// bytes went upstream→client.
async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    reset_after: Option<u64>,
) -> io::Result<()> {
    let Some(limit) = reset_after else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return Ok(());
    };
    enum Ev {
        Client(io::Result<usize>),
        Upstream(io::Result<usize>),
    }
    let mut sent: u64 = 0;
    let mut client_done = false;
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    if limit == 0 {
        reset(client);
        return Ok(());
    }
    loop {
        let ev = tokio::select! {
            r = client.read(&mut cbuf), if !client_done => Ev::Client(r),
            r = upstream.read(&mut ubuf) => Ev::Upstream(r),
        };
        match ev {
            Ev::Client(Ok(0)) | Ev::Client(Err(_)) => {
                client_done = true;
                let _ = upstream.shutdown().await;
            }
            Ev::Client(Ok(n)) => upstream.write_all(&cbuf[..n]).await?,
            Ev::Upstream(Ok(0)) | Ev::Upstream(Err(_)) => {
                let _ = client.shutdown().await;
                return Ok(());
            }
            Ev::Upstream(Ok(n)) => {
                let remaining = limit - sent;
                let take = (n as u64).min(remaining) as usize;
                client.write_all(&ubuf[..take]).await?;
                client.flush().await?;
                sent += take as u64;
                if sent >= limit {
                    reset(client);
                    return Ok(());
                }
            }
        }
    }
}

async fn status_only(mut tcp: TcpStream, code: u16) -> io::Result<()> {
    let mut buf = Vec::new();
    match read_head(&mut tcp, &mut buf).await? {
        ReadHead::Eof => Ok(()),
        _ => reply_and_close(tcp, simple_response(code, true).as_bytes()).await,
    }
}

async fn stall(mut tcp: TcpStream) -> io::Result<()> {
    // Read and discard until the client gives up; never write a byte.
    let mut sink = [0u8; 4096];
    while tcp.read(&mut sink).await? > 0 {}
    Ok(())
}

async fn reset_after_request(mut tcp: TcpStream, stats: &Stats) -> io::Result<()> {
    let mut buf = Vec::new();
    match read_head(&mut tcp, &mut buf).await? {
        ReadHead::Eof => return Ok(()),
        ReadHead::Bad => {
            return reply_and_close(tcp, simple_response(400, true).as_bytes()).await;
        }
        ReadHead::Head(_) => {}
    }
    tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    stats.tunnels.fetch_add(1, Ordering::SeqCst);
    if buf.is_empty() {
        let mut b = [0u8; 1];
        let _ = tcp.read(&mut b).await;
    }
    reset(tcp);
    Ok(())
}

/// Reads bytes up to (not including) a NUL, at most `max` bytes.
async fn read_until_nul(tcp: &mut TcpStream, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let b = tcp.read_u8().await?;
        if b == 0 {
            return Ok(Some(out));
        }
        if out.len() >= max {
            return Ok(None);
        }
        out.push(b);
    }
}

async fn socks4a(mut tcp: TcpStream, stats: &Stats) -> io::Result<()> {
    const GRANTED: u8 = 0x5A;
    const REJECTED: u8 = 0x5B;
    let mut req = [0u8; 8];
    tcp.read_exact(&mut req[..1]).await?;
    if req[0] != 4 {
        return reply_and_close(tcp, &[0, REJECTED, 0, 0, 0, 0, 0, 0]).await;
    }
    tcp.read_exact(&mut req[1..]).await?;
    let port = u16::from_be_bytes([req[2], req[3]]);
    let ip = [req[4], req[5], req[6], req[7]];
    let Some(_user_id) = read_until_nul(&mut tcp, 1024).await? else {
        return reply_and_close(tcp, &[0, REJECTED, 0, 0, 0, 0, 0, 0]).await;
    };
    let host = if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] != 0 {
        match read_until_nul(&mut tcp, 255).await? {
            Some(h) if !h.is_empty() => match String::from_utf8(h) {
                Ok(h) => h,
                Err(_) => return reply_and_close(tcp, &[0, REJECTED, 0, 0, 0, 0, 0, 0]).await,
            },
            _ => return reply_and_close(tcp, &[0, REJECTED, 0, 0, 0, 0, 0, 0]).await,
        }
    } else {
        std::net::Ipv4Addr::from(ip).to_string()
    };
    lock(&stats.socks_targets).push(host.clone());
    let reply = |code: u8| {
        let p = port.to_be_bytes();
        [0, code, p[0], p[1], ip[0], ip[1], ip[2], ip[3]]
    };
    if req[1] != 1 {
        return reply_and_close(tcp, &reply(REJECTED)).await;
    }
    let upstream = match connect_loopback(&host, port).await {
        Ok(s) => s,
        Err(_) => return reply_and_close(tcp, &reply(REJECTED)).await,
    };
    tcp.write_all(&reply(GRANTED)).await?;
    stats.tunnels.fetch_add(1, Ordering::SeqCst);
    lock(&stats.targets).push(format!("{host}:{port}"));
    relay(tcp, upstream, None).await
}

async fn garbage(mut tcp: TcpStream) -> io::Result<()> {
    let mut first = [0u8; 4096];
    // Answer whatever arrives first (or answer anyway after 1 s of silence).
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut first)).await;
    let mut junk: Vec<u8> =
        b"HTTP/1.1 xyz garbage\r\n\x00\xff\xfe\x05\x01\x16\x03\x03 not a proxy \x7f\r\n".to_vec();
    junk.extend((0u8..=255).rev());
    junk.extend_from_slice(b"\r\n\r\n");
    reply_and_close(tcp, &junk).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{self, http_connect, raw_get, read_head_exact};
    use crate::upstream::{Upstream, UpstreamOptions};

    async fn connect(p: &FaultProxy) -> TcpStream {
        TcpStream::connect(p.addr())
            .await
            .expect("connect to fault proxy")
    }

    #[test]
    fn parsing_is_bounded_and_total() {
        assert!(parse_head(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n").is_some());
        assert!(parse_head(b"\xff\xfe\r\n\r\n").is_none());
        assert!(parse_head(b"CONNECT  HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"GET / HTTP/1.1\r\nbad header\r\n\r\n").is_none());
        assert!(parse_head(b"\r\n\r\n").is_none());
        assert_eq!(split_host_port("[::1]:443"), Some(("::1".into(), 443)));
        assert_eq!(split_host_port("localhost:99999"), None);
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(
            split_absolute("http://127.0.0.1:8080/a?b=1"),
            Some(("127.0.0.1".into(), 8080, "/a?b=1".into()))
        );
        assert_eq!(
            split_absolute("http://localhost"),
            Some(("localhost".into(), 80, "/".into()))
        );
        assert_eq!(
            split_absolute("http://h:1?q"),
            Some(("h".into(), 1, "/?q".into()))
        );
        assert_eq!(split_absolute("https://x/"), None);
        assert_eq!(split_absolute("http:///x"), None);
    }

    #[tokio::test]
    async fn connect_with_auth_tunnels_and_counts() {
        let up = Upstream::start(UpstreamOptions::plain());
        let p = FaultProxy::start(Behavior::Connect {
            users: vec![
                ("alice".into(), "s3cret".into()),
                ("bob".into(), "pw".into()),
            ],
        });
        let target = up.addr().to_string();

        // no auth → 407, same connection retried with auth → 200
        let mut s = connect(&p).await;
        let r = http_connect(&mut s, &target, None).await.expect("connect");
        assert_eq!(r.status, 407);
        assert!(
            r.head.contains("Proxy-Authenticate: Basic realm=\"test\""),
            "{}",
            r.head
        );
        let r = http_connect(&mut s, &target, Some(("alice", "wrong")))
            .await
            .expect("connect");
        assert_eq!(r.status, 407);
        let r = http_connect(&mut s, &target, Some(("bob", "pw")))
            .await
            .expect("connect");
        assert_eq!(r.status, 200);
        let resp = raw_get(&mut s, &target, "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("\"path\":\"/v1/messages\""), "{resp}");

        // absolute-form forwarding, Proxy-Authorization stripped
        let mut s = connect(&p).await;
        let req = format!(
            "GET http://{target}/v1/fwd?x=1 HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            client::basic_auth("alice", "s3cret")
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let last = up.last_request().expect("last");
        assert_eq!(last.path, "/v1/fwd");
        assert_eq!(last.query.as_deref(), Some("x=1"));
        assert_eq!(last.header("proxy-authorization"), None);

        // refused target → 502; non-loopback → 403
        let mut s = connect(&p).await;
        let closed = format!("127.0.0.1:{}", closed_port());
        let r = http_connect(&mut s, &closed, Some(("bob", "pw")))
            .await
            .expect("connect");
        assert_eq!(r.status, 502);
        let mut s = connect(&p).await;
        let r = http_connect(&mut s, "192.0.2.1:443", Some(("bob", "pw")))
            .await
            .expect("connect");
        assert_eq!(r.status, 403);

        // garbage head → 400, never a panic
        let mut s = connect(&p).await;
        s.write_all(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
            .await
            .expect("write");
        let head = read_head_exact(&mut s).await.expect("head");
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        // oversized head → 400
        let mut s = connect(&p).await;
        let big = format!("CONNECT a:1 HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
        let _ = s.write_all(big.as_bytes()).await;
        let head = read_head_exact(&mut s).await.expect("head");
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");

        assert_eq!(p.tunnels(), 1);
        assert_eq!(p.forwards(), 1);
        assert_eq!(
            p.tunnel_users(),
            vec!["bob".to_string(), "alice".to_string()]
        );
        assert_eq!(p.targets(), vec![target.clone(), target.clone()]);
        assert_eq!(p.connections(), 6);
    }

    #[tokio::test]
    async fn connect_without_users_tunnels_tls() {
        let pki = Arc::new(crate::certs::TestPki::new());
        let up = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
        let p = FaultProxy::start(Behavior::Connect { users: vec![] });
        let mut s = connect(&p).await;
        let r = http_connect(&mut s, &format!("localhost:{}", up.port()), None)
            .await
            .expect("connect");
        assert_eq!(r.status, 200);
        let tls = client::tls_connect(s, &pki, "localhost", &[b"h2"])
            .await
            .expect("tls");
        let req = http::Request::get(up.url("/v1/messages"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let (parts, body) = client::send_h2(tls, req).await.expect("h2");
        assert_eq!(parts.status, 200);
        assert!(String::from_utf8_lossy(&body).contains("HTTP/2.0"));
        assert_eq!(p.tunnel_users(), vec![String::new()]);
    }

    #[tokio::test]
    async fn status_behaviour() {
        for code in [407u16, 403, 502] {
            let p = FaultProxy::start(Behavior::Status(code));
            let mut s = connect(&p).await;
            let r = http_connect(&mut s, "127.0.0.1:1", Some(("u", "p")))
                .await
                .expect("reply");
            assert_eq!(r.status, code);
            assert_eq!(r.head.contains("Proxy-Authenticate"), code == 407);
            let mut rest = Vec::new();
            let n = s.read_to_end(&mut rest).await.expect("eof");
            assert_eq!(n, 0, "closed after the reply");
            assert_eq!(p.tunnels(), 0);
        }
    }

    #[tokio::test]
    async fn stall_never_answers() {
        let p = FaultProxy::start(Behavior::Stall);
        let mut s = connect(&p).await;
        let r = tokio::time::timeout(
            Duration::from_millis(300),
            http_connect(&mut s, "127.0.0.1:1", None),
        )
        .await;
        assert!(r.is_err(), "stall must not answer");
        assert_eq!(p.connections(), 1);
    }

    #[tokio::test]
    async fn reset_after_request_resets() {
        let p = FaultProxy::start(Behavior::ResetAfterRequest);
        let mut s = connect(&p).await;
        let r = http_connect(&mut s, "127.0.0.1:1", None)
            .await
            .expect("reply");
        assert_eq!(r.status, 200);
        s.write_all(b"\x16\x03\x01 fake client hello")
            .await
            .expect("write");
        let mut buf = [0u8; 16];
        let err = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("bounded")
            .expect_err("must be reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert_eq!(p.tunnels(), 1);
    }

    #[tokio::test]
    async fn reset_after_bytes_kills_sse_midway() {
        let up = Upstream::start(UpstreamOptions::plain());
        let p = FaultProxy::start(Behavior::ResetAfterBytes(300));
        let mut s = connect(&p).await;
        let target = up.addr().to_string();
        let r = http_connect(&mut s, &target, None).await.expect("reply");
        assert_eq!(r.status, 200);
        let req =
            format!("GET /v1/sse?events=50&interval_ms=10 HTTP/1.1\r\nHost: {target}\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("bounded")
            {
                Ok(0) => panic!("clean EOF, expected reset"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(got.len() <= 300, "got {}", got.len());
        assert!(String::from_utf8_lossy(&got).contains("data: {\"i\":0}"));
    }

    #[tokio::test]
    async fn socks4a_and_socks4() {
        use tokio_socks::tcp::socks4::Socks4Stream;
        let up = Upstream::start(UpstreamOptions::plain());
        let p = FaultProxy::start(Behavior::Socks4a);
        assert!(p.url().starts_with("socks4a://"));
        // SOCKS4a with hostname
        let mut s = Socks4Stream::connect(p.addr(), ("localhost", up.port()))
            .await
            .expect("socks4a");
        let resp = raw_get(&mut s, "localhost", "/v1/messages")
            .await
            .expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        // plain SOCKS4 with IP
        let mut s = Socks4Stream::connect(p.addr(), up.addr())
            .await
            .expect("socks4");
        let resp = raw_get(&mut s, "x", "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        // refused target
        let r = Socks4Stream::connect(p.addr(), ("127.0.0.1", closed_port())).await;
        assert!(r.is_err());
        // junk input: no panic, connection closed
        let mut s = connect(&p).await;
        s.write_all(b"\x05\x01\x00").await.expect("write");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("bounded");
        // endless user id: rejected, bounded
        let mut s = connect(&p).await;
        let mut req = vec![4u8, 1, 0, 80, 127, 0, 0, 1];
        req.extend(std::iter::repeat_n(b'a', 2000));
        let _ = s.write_all(&req).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("bounded");
        assert_eq!(rest.get(1), Some(&0x5B));

        assert_eq!(p.tunnels(), 2);
        assert_eq!(
            p.socks_targets(),
            vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "127.0.0.1".to_string()
            ]
        );
    }

    #[tokio::test]
    async fn garbage_answers_junk() {
        let p = FaultProxy::start(Behavior::Garbage);
        let mut s = connect(&p).await;
        s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("bounded")
            .expect("read");
        assert!(out.starts_with(b"HTTP/1.1 xyz"));
        assert!(out.len() > 256);
    }

    #[test]
    fn detached_fault_proxy_works_without_a_runtime() {
        use std::io::{Read, Write};
        let p = FaultProxy::start_detached(Behavior::Status(502));
        let mut s = std::net::TcpStream::connect(p.addr()).expect("connect");
        s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("HTTP/1.1 502 Bad Gateway"), "{out}");
        assert_eq!(p.connections(), 1);
    }

    #[tokio::test]
    async fn closed_port_refuses() {
        let port = closed_port();
        assert!(crate::util::refused_soon(([127, 0, 0, 1], port).into()));
    }
}
