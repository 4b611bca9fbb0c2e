//! The data plane's event loops: `n` threads, each with its own single-threaded runtime,
//! like nginx's worker processes.
//!
//! One acceptor deals the data port's connections round-robin. A client connection, its
//! requests and the upstream connections they use then stay on one worker: the pool keeps
//! a shard of connections per worker ([`shard`]), so forwarding a request never wakes
//! another thread. On one work-stealing runtime the client side and the upstream side of a
//! request ran on different threads much of the time, and the cross-thread wake-ups made
//! a JSON request cost 42 µs of CPU instead of 30 (benchmark A/B, README).
//!
//! Everything else (admin port, config source, probes, pool sweeper) runs on the caller's
//! runtime, so a metrics scrape or a config push never queues behind requests.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::server::{accept_until, data_service, serve_handed};

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The pool shard of the calling thread: `i` on worker `i` (1-based), 0 on any other
/// thread. Connections are made and reused on the shard of the thread that needs them.
pub(crate) fn shard() -> usize {
    SHARD.with(Cell::get)
}

type Inbox = mpsc::UnboundedSender<(std::net::TcpStream, std::net::SocketAddr)>;

/// Running worker threads.
pub(crate) struct Workers {
    inboxes: Vec<Inbox>,
    done: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Start `n` workers serving `forwarder`; at shutdown each gives its connections up to
    /// `grace` to finish.
    pub fn start(
        n: usize,
        forwarder: &Arc<Forwarder>,
        metrics: &Metrics,
        grace: Duration,
    ) -> Result<Self, String> {
        let mut workers = Self {
            inboxes: Vec::with_capacity(n),
            done: Vec::with_capacity(n),
        };
        for index in 1..=n {
            let (inbox, handed) = mpsc::unbounded_channel();
            let (finished, done) = oneshot::channel();
            let forwarder = forwarder.clone();
            // Set now, so every worker's series exists from the start.
            let open = metrics
                .worker_connections
                .with_label_values(&[&index.to_string()]);
            open.set(0);
            std::thread::Builder::new()
                .name(format!("pp-worker-{index}"))
                .spawn(move || {
                    SHARD.set(index);
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(serve_handed(handed, data_service(forwarder), grace, open)),
                        Err(e) => tracing::error!(worker = index, error = %e, "cannot start a worker's runtime"),
                    }
                    let _ = finished.send(());
                })
                .map_err(|e| format!("cannot start data-plane worker {index}: {e}"))?;
            workers.inboxes.push(inbox);
            workers.done.push(done);
        }
        Ok(workers)
    }

    /// Accept on `listener` and deal connections round-robin until `shutdown`; then let the
    /// workers finish (each within its grace period) and return.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let Self { inboxes, done } = self;
        let mut next = 0;
        accept_until(&listener, shutdown, |stream, peer| {
            let mut conn = match stream.into_std() {
                Ok(s) => (s, peer),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot hand over a connection");
                    return;
                }
            };
            // A worker that died (its inbox is closed) is skipped.
            for _ in 0..inboxes.len() {
                let inbox = &inboxes[next % inboxes.len()];
                next = next.wrapping_add(1);
                match inbox.send(conn) {
                    Ok(()) => return,
                    Err(back) => conn = back.0,
                }
            }
            tracing::error!(%peer, "no data-plane worker is running; connection dropped");
        })
        .await;
        drop(listener);
        // Closing the inboxes tells each worker to finish.
        drop(inboxes);
        for d in done {
            let _ = d.await;
        }
    }
}
