//! Every setting of every role, from flags or env, in one typed layer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use provider_proxy_api::Timeouts;
use provider_proxy_dataplane::{FileLoader, PoolSettings, Sidecar, SidecarSettings, TrustRoots};

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
}

pub fn init_logging(args: &LogArgs) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
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
}

impl PoolArgs {
    pub fn settings(&self) -> Result<PoolSettings, String> {
        if self.pool_max_agents == 0 || self.pool_sweep_interval == 0 {
            return Err(
                "--pool-max-agents and --pool-sweep-interval must be greater than 0".into(),
            );
        }
        Ok(PoolSettings {
            max_agents: self.pool_max_agents,
            agent_ttl: Duration::from_secs(self.pool_agent_ttl),
            idle_timeout: Duration::from_secs(self.pool_idle_timeout),
            sweep_interval: Duration::from_secs(self.pool_sweep_interval),
            max_lifetime: Duration::from_secs(self.pool_max_lifetime),
        })
    }
}

#[derive(Args)]
pub struct SidecarArgs {
    /// ProviderProxy and Secret manifests: a YAML file or a folder of them (multi-document
    /// YAML, the files `kubectl apply` takes). Re-read on change.
    #[arg(long, env = "PROVIDER_PROXY_CONFIG", value_name = "PATH")]
    pub config: PathBuf,
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
    /// Seconds open requests may take to finish on shutdown.
    #[arg(
        long,
        env = "PROVIDER_PROXY_SHUTDOWN_GRACE",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub shutdown_grace: u64,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
    #[command(flatten)]
    pub pool: PoolArgs,
}

pub async fn run_sidecar(args: SidecarArgs) -> Result<(), String> {
    let roots = TrustRoots::from_env()?;
    let sidecar = Sidecar::new(
        SidecarSettings {
            listen: args.listen,
            admin: args.admin,
            pool: args.pool.settings()?,
            grace: Duration::from_secs(args.shutdown_grace),
        },
        roots,
    );
    let mut loader = FileLoader::new(
        args.config.clone(),
        args.timeouts.timeouts()?,
        Arc::clone(&sidecar.config),
    );
    if let Err(e) = loader.reload() {
        // Keep running, not ready, and keep watching: the file may be fixed.
        sidecar.metrics.config_reload_errors.inc();
        tracing::error!(error = %e, "initial config not loaded; not ready until it is fixed");
    }
    let running = sidecar.start().await?;
    let watcher = tokio::spawn(loader.watch(Duration::from_millis(args.reload_interval.max(50))));
    shutdown_signal().await;
    tracing::info!("shutting down: finishing open requests");
    watcher.abort();
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
    /// Manifests with the ProviderProxies (and their Secrets) to test.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    pub file: PathBuf,
    /// Test only this provider.
    pub name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub timeouts: TimeoutArgs,
}
