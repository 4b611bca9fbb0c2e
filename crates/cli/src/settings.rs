//! Every setting of every role, from flags or env, in one typed layer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use provider_proxy_api::Timeouts;
use provider_proxy_dataplane::server::{AdminToken, LogControl, LogLevelEndpoint};
use provider_proxy_dataplane::snapshot_client::{SnapshotClient, SnapshotClientSettings};
use provider_proxy_dataplane::{FileLoader, PoolSettings, Sidecar, SidecarSettings, TrustRoots};
use tracing_appender::non_blocking::WorkerGuard;

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `info,provider_proxy::access=warn`.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Log lines that may wait for stderr; past them lines are dropped (and counted in
    /// provider_proxy_log_lines_dropped_total), never requests delayed. ~0.5 KiB each.
    #[arg(long, global = true, env = "LOG_QUEUE_LINES", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub log_queue_lines: u32,
}

/// Install the subscriber. The control changes the filter at runtime; the guard writes out
/// the lines still queued when it drops, so keep it until the process exits.
pub fn init_logging(args: &LogArgs) -> Result<(LogControl, WorkerGuard), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt, reload};

    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", args.log_level))?;
    let (filter, handle) = reload::Layer::new(filter);
    // Lines reach stderr from a thread of their own, through a bounded queue: a log pipe
    // that backs up (a slow container log driver) must not stall a data-plane worker, and
    // every request writes an access-log line. Should the queue fill, lines are dropped,
    // not requests delayed (as Envoy's access log does); its bound keeps a stuck pipe from
    // costing more than a few MiB.
    let (stderr, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(args.log_queue_lines as usize)
        .thread_name("pp-log")
        .finish(std::io::stderr());
    let drops = stderr.error_counter();
    let registry = tracing_subscriber::registry().with(filter);
    let result = match args.log_format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(stderr)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_writer(stderr))
            .try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))?;
    let control = LogControl::new(move |new: Option<&str>| {
        if let Some(new) = new {
            let f = EnvFilter::try_new(new).map_err(|e| format!("invalid filter {new:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())?;
        }
        handle
            .with_current(|f| f.to_string())
            .map_err(|e| e.to_string())
    })
    .with_dropped_lines(move || drops.dropped_lines() as u64);
    Ok((control, guard))
}

/// Defaults for every provider's timeouts, in milliseconds, as in the reference.
#[derive(Args, Clone)]
pub struct TimeoutArgs {
    /// Connect timeout (TCP + proxy handshake + TLS), ms.
    #[arg(
        long,
        env = "FETCH_CONNECT_TIMEOUT",
        default_value_t = 30_000,
        value_name = "MS"
    )]
    pub connect_timeout: u64,
    /// Time to the response headers, ms.
    #[arg(
        long,
        env = "FETCH_HEADERS_TIMEOUT",
        default_value_t = 600_000,
        value_name = "MS"
    )]
    pub headers_timeout: u64,
    /// Longest silence between response body chunks, ms.
    #[arg(
        long,
        env = "FETCH_BODY_TIMEOUT",
        default_value_t = 600_000,
        value_name = "MS"
    )]
    pub body_timeout: u64,
}

impl TimeoutArgs {
    pub fn timeouts(&self) -> Result<Timeouts, String> {
        for (name, v) in [
            ("FETCH_CONNECT_TIMEOUT", self.connect_timeout),
            ("FETCH_HEADERS_TIMEOUT", self.headers_timeout),
            ("FETCH_BODY_TIMEOUT", self.body_timeout),
        ] {
            if v == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        Ok(Timeouts {
            connect: Duration::from_millis(self.connect_timeout),
            headers: Duration::from_millis(self.headers_timeout),
            body: Duration::from_millis(self.body_timeout),
        })
    }
}

/// Agent pool limits (defaults are the reference's).
#[derive(Args, Clone)]
pub struct PoolArgs {
    /// Most agents (upstream × proxy × credentials × protocol) kept; LRU beyond.
    #[arg(long, env = "POOL_MAX_AGENTS", default_value_t = 100)]
    pub pool_max_agents: usize,
    /// Remove an agent unused this long, seconds.
    #[arg(
        long,
        env = "POOL_AGENT_TTL",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    pub pool_agent_ttl: u64,
    /// Close a pooled connection idle this long, seconds.
    #[arg(
        long,
        env = "POOL_IDLE_TIMEOUT",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub pool_idle_timeout: u64,
    /// How often expired agents are swept, seconds.
    #[arg(
        long,
        env = "POOL_SWEEP_INTERVAL",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub pool_sweep_interval: u64,
    /// Hard lifetime of an agent, after which it takes no new requests, seconds.
    #[arg(
        long,
        env = "POOL_MAX_LIFETIME",
        default_value_t = 3600,
        value_name = "SECONDS"
    )]
    pub pool_max_lifetime: u64,
    /// Most connects one agent runs at once on each worker; more requests wait for one of
    /// them or for a busy connection to free up, so a slow proxy handshake never becomes a
    /// storm.
    #[arg(long, env = "POOL_MAX_CONNECTING", default_value_t = 32)]
    pub pool_max_connecting: usize,
}

impl PoolArgs {
    pub fn settings(&self) -> Result<PoolSettings, String> {
        if self.pool_max_agents == 0
            || self.pool_sweep_interval == 0
            || self.pool_max_connecting == 0
        {
            return Err("--pool-max-agents, --pool-sweep-interval and --pool-max-connecting must be greater than 0".into());
        }
        Ok(PoolSettings {
            max_agents: self.pool_max_agents,
            agent_ttl: Duration::from_secs(self.pool_agent_ttl),
            idle_timeout: Duration::from_secs(self.pool_idle_timeout),
            sweep_interval: Duration::from_secs(self.pool_sweep_interval),
            max_lifetime: Duration::from_secs(self.pool_max_lifetime),
            max_connecting: self.pool_max_connecting,
        })
    }
}

#[derive(Args)]
pub struct SidecarArgs {
    /// Standalone: ProviderProxy and Secret manifests, a YAML file or a folder of them
    /// (multi-document YAML, the files `kubectl apply` takes). Re-read on change.
    #[arg(
        long,
        env = "PROVIDER_PROXY_CONFIG",
        value_name = "PATH",
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    pub config: Option<PathBuf>,
    /// In a cluster: the controller's snapshot service, e.g.
    /// `http://provider-proxy.provider-proxy.svc:15443`. Plain HTTP is for in-cluster
    /// traffic only; give the controller a certificate and use https:// elsewhere.
    #[arg(long, env = "PROVIDER_PROXY_CONTROLLER", value_name = "URL")]
    pub controller: Option<String>,
    /// The pod's projected ServiceAccount token (audience: the controller's), re-read at
    /// every connect.
    #[arg(
        long,
        env = "PROVIDER_PROXY_TOKEN_FILE",
        default_value = "/var/run/secrets/provider-proxy/token"
    )]
    pub token_file: PathBuf,
    /// Keep the last good snapshot here (an emptyDir) to serve across restarts while the
    /// controller is unreachable. Written with mode 0600.
    #[arg(long, env = "PROVIDER_PROXY_SNAPSHOT_CACHE", value_name = "PATH")]
    pub snapshot_cache: Option<PathBuf>,
    /// Address apps send requests to (`http://ADDR/<provider>/<path>`).
    #[arg(long, env = "PROVIDER_PROXY_LISTEN", default_value = "127.0.0.1:15080")]
    pub listen: SocketAddr,
    /// Address of /metrics, /healthz, /readyz and /config.
    #[arg(long, env = "PROVIDER_PROXY_ADMIN", default_value = "127.0.0.1:15090")]
    pub admin: SocketAddr,
    /// How often the config path is checked for changes, ms.
    #[arg(
        long,
        env = "PROVIDER_PROXY_RELOAD_INTERVAL",
        default_value_t = 500,
        value_name = "MS"
    )]
    pub reload_interval: u64,
    /// File with a bearer token that unlocks the admin port's mutating endpoints
    /// (`PUT /loglevel`); without it they are disabled.
    #[arg(long, env = "PROVIDER_PROXY_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Seconds open requests may take to finish on shutdown.
    #[arg(
        long,
        env = "PROVIDER_PROXY_SHUTDOWN_GRACE",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub shutdown_grace: u64,
    /// Data-plane event loops, each a thread of its own (like nginx's workers); 0 = one per
    /// CPU the container may use. Client connections are dealt round-robin and each keeps
    /// its upstream connections on its worker, so a request never wakes another thread.
    /// The admin port, config source and probes run on a separate, mostly idle thread.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0, value_name = "N")]
    pub worker_threads: usize,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    #[command(flatten)]
    pub pool: PoolArgs,
}

/// The token of `--admin-token-file`, if given.
fn read_admin_token(path: Option<&std::path::Path>) -> Result<Option<AdminToken>, String> {
    let Some(p) = path else {
        return Ok(None);
    };
    let t = std::fs::read_to_string(p)
        .map_err(|e| format!("--admin-token-file {}: {e}", p.display()))?;
    AdminToken::new(&t)
        .map(Some)
        .map_err(|e| format!("--admin-token-file {}: {e}", p.display()))
}

pub async fn run_sidecar(args: SidecarArgs, log_control: LogControl) -> Result<(), String> {
    let roots = TrustRoots::from_env()?;
    let admin_token = read_admin_token(args.admin_token_file.as_deref())?;
    let mut sidecar = Sidecar::new(
        SidecarSettings {
            listen: args.listen,
            admin: args.admin,
            pool: args.pool.settings()?,
            grace: Duration::from_secs(args.shutdown_grace),
            admin_token,
            workers: match args.worker_threads {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
        },
        roots,
    );
    sidecar.log_control = Some(log_control);
    let running = sidecar.start().await?;
    let source = match (&args.config, &args.controller) {
        (Some(path), _) => {
            let mut loader = FileLoader::new(
                path.clone(),
                args.timeouts.timeouts()?,
                Arc::clone(&sidecar.config),
            );
            if let Err(e) = loader.reload() {
                // Keep running, not ready, and keep watching: the file may be fixed.
                sidecar.metrics.config_reload_errors.inc();
                tracing::error!(error = %e, "initial config not loaded; not ready until it is fixed");
            }
            tokio::spawn(loader.watch(Duration::from_millis(args.reload_interval.max(50))))
        }
        (None, Some(url)) => {
            let client = SnapshotClient::new(
                SnapshotClientSettings {
                    controller: url.clone(),
                    token_file: args.token_file.clone(),
                    cache: args.snapshot_cache.clone(),
                },
                Arc::clone(&sidecar.config),
                &TrustRoots::from_env()?,
            )
            .map_err(|e| e.to_string())?;
            client.load_cache();
            tokio::spawn(client.run())
        }
        (None, None) => return Err("give --config PATH (standalone) or --controller URL".into()),
    };
    shutdown_signal().await;
    tracing::info!("shutting down: finishing open requests");
    source.abort();
    running.shutdown().await;
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[derive(Args)]
pub struct CheckArgs {
    /// Manifests with the ProviderProxies (and their Secrets) to test. Without it, the
    /// ProviderProxies are read from the cluster (kubeconfig or in-cluster config).
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Namespace to read ProviderProxies and Secrets from (cluster mode).
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// kubeconfig to use instead of $KUBECONFIG / ~/.kube/config (cluster mode).
    #[arg(long, env = "KUBECONFIG_PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Test only this provider.
    pub name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

#[derive(Args)]
pub struct ControllerArgs {
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "PROVIDER_PROXY_ADMIN", default_value = "0.0.0.0:15091")]
    pub admin: SocketAddr,
    /// Address of the snapshot service sidecars stream their config from.
    #[arg(
        long,
        env = "PROVIDER_PROXY_SNAPSHOT_LISTEN",
        default_value = "0.0.0.0:15443"
    )]
    pub snapshot_listen: SocketAddr,
    /// Namespaces to watch, comma-separated; empty watches all.
    #[arg(
        long,
        env = "WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub watch_namespaces: Vec<String>,
    /// Re-probe every provider this often (seconds) unless its spec.probe.interval says
    /// otherwise; 0 probes only on change.
    #[arg(
        long,
        env = "PROBE_INTERVAL",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    pub probe_interval: u64,
    /// Probes running at once.
    #[arg(long, env = "PROBE_CONCURRENCY", default_value_t = 4)]
    pub probe_concurrency: usize,
    /// Elect one writer among replicas with a Lease.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false)]
    pub leader_election: bool,
    /// Seconds a leader's lease lasts without renewal (it renews every fifth of that).
    #[arg(
        long,
        env = "LEASE_DURATION",
        default_value_t = 15,
        value_name = "SECONDS"
    )]
    pub lease_duration: u64,
    #[arg(long, env = "LEASE_NAME", default_value = "provider-proxy-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "provider-proxy")]
    pub lease_namespace: String,
    /// This replica's name in the Lease and in Events.
    #[arg(long, env = "POD_NAME", default_value = "provider-proxy-controller")]
    pub identity: String,
    /// Audience sidecar tokens must be issued for.
    #[arg(long, env = "TOKEN_AUDIENCE", default_value = "provider-proxy")]
    pub token_audience: String,
    /// Certificate (PEM) for the snapshot service; with --tls-key, it serves TLS.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// kubeconfig to use instead of in-cluster config / $KUBECONFIG.
    #[arg(long, env = "KUBECONFIG_PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// File with a bearer token that unlocks the admin port's mutating endpoints
    /// (`PUT /loglevel`); without it they are disabled.
    #[arg(long, env = "PROVIDER_PROXY_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}

pub async fn run_controller(args: ControllerArgs, log_control: LogControl) -> Result<(), String> {
    let log_level = LogLevelEndpoint {
        control: Some(log_control),
        token: read_admin_token(args.admin_token_file.as_deref())?,
    };
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let settings = provider_proxy_controller::ControllerSettings {
        admin: args.admin,
        snapshot_listen: args.snapshot_listen,
        watch_namespaces: args
            .watch_namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        probe_interval: Duration::from_secs(args.probe_interval),
        probe_concurrency: args.probe_concurrency,
        leader_election: args.leader_election,
        lease_duration: Duration::from_secs(args.lease_duration.max(1)),
        lease_name: args.lease_name,
        lease_namespace: args.lease_namespace,
        identity: args.identity,
        token_audience: args.token_audience,
        tls: args.tls_cert.zip(args.tls_key),
        defaults: args.timeouts.timeouts()?,
        log_level,
    };
    let running = provider_proxy_controller::start(client, settings, TrustRoots::from_env()?)
        .await
        .map_err(|e| e.to_string())?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// A Kubernetes client from the given kubeconfig, or $KUBECONFIG / in-cluster config.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| e.to_string())?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes config: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}
