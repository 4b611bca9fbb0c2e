//! Small shared helpers: unique names, free ports, waiting for a listener.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A short random lowercase hex string (unique within the process, and
/// random across processes).
pub(crate) fn unique_suffix(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::new();
    while out.len() < len {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}

/// A TCP port on 127.0.0.1 that was free a moment ago (nothing listens on it). Ports are never handed
/// out twice within one process, so concurrent tests don't collide with each
/// other (another process could still grab it: callers retry on failure).
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..1000 {
        // Bind without listen(): the port is reserved for a moment but never
        // accepts, so no stray connection can land on it meanwhile.
        let socket = tokio::net::TcpSocket::new_v4().expect("create TCP socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        let port = socket.local_addr().expect("local_addr").port();
        drop(socket);
        let mut set = handed.lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("could not find a free port on 127.0.0.1");
}

/// Whether something LISTENs on 127.0.0.1:`port` (or 0.0.0.0:`port`),
/// according to `/proc/net/tcp`. Checking the kernel table instead of
/// connecting keeps stray "probe" connections out of the proxies' logs.
/// Falls back to a connect when `/proc/net/tcp` cannot be read.
pub(crate) fn is_listening(port: u16) -> bool {
    match std::fs::read_to_string("/proc/net/tcp") {
        Ok(table) => {
            let wanted = [
                format!("0100007F:{port:04X}"),
                format!("00000000:{port:04X}"),
            ];
            table.lines().skip(1).any(|line| {
                let mut cols = line.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                state == "0A" && wanted.iter().any(|w| w == local)
            })
        }
        Err(_) => std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_ok(),
    }
}

/// Outcome of [`wait_until_listening`].
pub(crate) enum WaitOutcome {
    Listening,
    Exited(String),
    TimedOut,
}

/// Polls until all `ports` listen, the process exits (`exited` returns
/// `Some(status)`), or `timeout` passes.
pub(crate) fn wait_until_listening(
    ports: &[u16],
    timeout: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> WaitOutcome {
    let deadline = Instant::now() + timeout;
    loop {
        if ports.iter().all(|p| is_listening(*p)) {
            return WaitOutcome::Listening;
        }
        if let Some(status) = exited() {
            return WaitOutcome::Exited(status);
        }
        if Instant::now() >= deadline {
            return WaitOutcome::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Whether connecting to `addr` is refused within a few tries. Parallel
/// tests (and children forked by them, which briefly hold copies of every
/// fd) can make a just-closed port accept for an instant, so "refused once
/// within ~0.5 s" is the robust check.
#[cfg(test)]
pub(crate) fn refused_soon(addr: std::net::SocketAddr) -> bool {
    (0..25).any(|_| {
        let refused =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err();
        if !refused {
            std::thread::sleep(Duration::from_millis(20));
        }
        refused
    })
}

/// A dedicated thread running a current-thread tokio runtime until dropped.
/// Servers started on it keep serving while the test's own runtime is
/// blocked (e.g. by `std::process::Command::output` or a blocking client).
pub(crate) struct Detached {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Detached {
    /// Runs `start` inside the new runtime; its first value is sent back to
    /// the caller, its second is kept alive on the thread until `Detached`
    /// drops (then the runtime shuts down, aborting every task).
    pub(crate) fn spawn<R, G>(
        name: &str,
        start: impl FnOnce() -> (R, G) + Send + 'static,
    ) -> (R, Detached)
    where
        R: Send + 'static,
        G: 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build detached tokio runtime");
                rt.block_on(async move {
                    let (r, guard) = start();
                    if tx.send(r).is_err() {
                        return;
                    }
                    let _ = stop_rx.await;
                    drop(guard);
                });
            })
            .expect("spawn detached server thread");
        let r = rx.recv().expect("detached server failed to start");
        (
            r,
            Detached {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
        )
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn suffixes_are_unique_hex() {
        let a = unique_suffix(10);
        let b = unique_suffix(10);
        assert_eq!(a.len(), 10);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn listening_detection() {
        let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(is_listening(port));
        drop(l);
        // Another test may bind the freed port at once: retry a little.
        assert!((0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            !is_listening(port)
        }));
        let p1 = free_port();
        let p2 = free_port();
        assert_ne!(p1, p2);
    }
}
