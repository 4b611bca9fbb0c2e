//! Wiring of the sidecar role: metrics, pool, config store, forwarder, and the two ports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ConfigStore;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::pool::{AgentPool, PoolSettings};
use crate::server::{
    Admin, AdminToken, LogControl, LogLevelEndpoint, bind, serve_admin, serve_data,
};
use crate::tls::TrustRoots;
use crate::workers::Workers;

#[derive(Clone, Debug)]
pub struct SidecarSettings {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub pool: PoolSettings,
    /// How long open connections may take to finish at shutdown.
    pub grace: Duration,
    /// Token for the admin port's mutating endpoints (`PUT /loglevel`); None disables them.
    pub admin_token: Option<AdminToken>,
    /// Data-plane event loops, each a thread with its own single-threaded runtime (see
    /// [`crate::workers`]). 0 serves requests on the runtime that calls `start`.
    pub workers: usize,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 15080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15090)),
            pool: PoolSettings::default(),
            grace: Duration::from_secs(30),
            admin_token: None,
            workers: 0,
        }
    }
}

/// The sidecar's parts. Feed `config` snapshots; `start` opens the ports.
pub struct Sidecar {
    pub config: Arc<ConfigStore>,
    /// Set by the binary to let `/loglevel` change the log filter.
    pub log_control: Option<LogControl>,
    pub pool: Arc<AgentPool>,
    pub metrics: Arc<Metrics>,
    settings: SidecarSettings,
}

impl Sidecar {
    pub fn new(settings: SidecarSettings, roots: TrustRoots) -> Self {
        let metrics = Metrics::new();
        // One connection shard per worker, and shard 0 for the calling runtime's own use
        // (probes, or every request when there are no workers).
        let pool = Arc::new(
            AgentPool::new(settings.pool.clone(), roots, metrics.clone())
                .with_shards(settings.workers + 1),
        );
        metrics.register_pool(&pool);
        let config = Arc::new(ConfigStore::new(pool.clone(), metrics.clone()));
        Self {
            config,
            log_control: None,
            pool,
            metrics,
            settings,
        }
    }

    /// Bind both ports and serve until [`Running::shutdown`].
    pub async fn start(&self) -> Result<Running, String> {
        let data = bind(self.settings.listen, "data").await?;
        let admin = bind(self.settings.admin, "admin").await?;
        let data_addr = data.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = watch::channel(false);
        let forwarder = Arc::new(Forwarder::new(
            self.config.clone(),
            self.pool.clone(),
            self.metrics.clone(),
        ));
        let sweeper = self.pool.spawn_sweeper();
        let data_task = if self.settings.workers == 0 {
            tokio::spawn(serve_data(
                data,
                forwarder,
                wait_for(stopped.clone()),
                self.settings.grace,
            ))
        } else {
            let workers = Workers::start(
                self.settings.workers,
                &forwarder,
                &self.metrics,
                self.settings.grace,
            )?;
            tokio::spawn(workers.serve(data, wait_for(stopped.clone())))
        };
        if let Some(count) = self
            .log_control
            .as_ref()
            .and_then(LogControl::dropped_lines)
        {
            self.metrics.register_log_drops(count);
        }
        let admin_state = Admin {
            config: self.config.clone(),
            log_level: LogLevelEndpoint {
                control: self.log_control.clone(),
                token: self.settings.admin_token.clone(),
            },
        };
        let admin_task = tokio::spawn(serve_admin(admin, admin_state, wait_for(stopped)));
        tracing::info!(%data_addr, %admin_addr, workers = self.settings.workers, "sidecar listening");
        Ok(Running {
            data_addr,
            admin_addr,
            stop,
            tasks: vec![data_task, admin_task],
            sweeper,
        })
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A started sidecar.
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    sweeper: JoinHandle<()>,
}

impl Running {
    /// Stop accepting, let open requests finish (up to the grace period), return.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.sweeper.abort();
    }
}
