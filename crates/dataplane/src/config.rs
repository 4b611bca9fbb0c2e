//! The snapshot in force, swapped atomically, and the standalone loader that builds
//! snapshots from manifest files and hot-reloads them.
//!
//! Each request loads the snapshot (with its [`Routes`]) once and keeps that `Arc` to its
//! end, so in-flight requests finish on the config they started with while new ones see
//! the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use provider_proxy_api::{Manifests, Snapshot, Timeouts};

use crate::metrics::Metrics;
use crate::pool::AgentPool;
use crate::route::Routes;

/// The current snapshot, and what depends on it changing.
pub struct ConfigStore {
    current: ArcSwap<Routes>,
    loaded: AtomicBool,
    /// Unix seconds of the last contact with the config source (staleness).
    last_contact: std::sync::atomic::AtomicU64,
    pool: Arc<AgentPool>,
    metrics: Arc<Metrics>,
}

impl ConfigStore {
    pub fn new(pool: Arc<AgentPool>, metrics: Arc<Metrics>) -> Self {
        Self {
            current: ArcSwap::from_pointee(Routes::build(Arc::default(), &pool)),
            loaded: AtomicBool::new(false),
            last_contact: std::sync::atomic::AtomicU64::new(0),
            pool,
            metrics,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load().snapshot.clone()
    }

    /// The snapshot in force with its routes: what a request holds until it ends.
    pub fn routes(&self) -> Arc<Routes> {
        self.current.load_full()
    }

    /// Whether any snapshot was loaded yet (readiness).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Put `next` in force. Agents that no provider of `next` would use are retired at
    /// once, so a rotated password or CA is used by the very next request.
    pub fn apply(&self, next: Snapshot) {
        let routes = Routes::build(Arc::new(next), &self.pool);
        let keep: std::collections::HashSet<_> = routes.pool_keys().cloned().collect();
        let next = &routes.snapshot;
        self.metrics.config_version.set(next.version as i64);
        self.metrics
            .providers
            .with_label_values(&["valid"])
            .set(next.providers.len() as i64);
        self.metrics
            .providers
            .with_label_values(&["invalid"])
            .set(next.invalid.len() as i64);
        self.metrics.config_last_update.set(unix_now());
        self.current.store(Arc::new(routes));
        self.loaded.store(true, Ordering::Release);
        self.touch();
        self.pool.retain(|k| keep.contains(k));
    }

    /// The config source was heard from (a snapshot, a heartbeat, a successful poll).
    pub fn touch(&self) {
        let now = unix_now();
        self.last_contact.store(now as u64, Ordering::Relaxed);
        self.metrics.config_last_contact.set(now);
    }

    /// Seconds since the config source was last heard from, if ever.
    pub fn seconds_since_contact(&self) -> Option<u64> {
        match self.last_contact.load(Ordering::Relaxed) {
            0 => None,
            t => Some((unix_now() as u64).saturating_sub(t)),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Why a load from disk was rejected. The last good config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] provider_proxy_api::ManifestError),
    #[error("{0}: no YAML files found")]
    Empty(String),
}

/// The YAML files under `path` (a file, or a folder read non-recursively), sorted, with
/// their contents. Dot-files are skipped (ConfigMap mounts keep `..data` links there).
pub fn read_sources(path: &Path) -> Result<Vec<(PathBuf, String)>, LoadError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| LoadError::Io { path: p, source }
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let files = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && p.is_file()
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).map_err(io(&f))?;
            Ok((f, text))
        })
        .collect()
}

/// How long a changed file must stay unchanged before it is read as the new config.
const SETTLE: Duration = Duration::from_millis(50);

/// Loads manifests from disk into a [`ConfigStore`], and keeps them current.
pub struct FileLoader {
    path: PathBuf,
    defaults: Timeouts,
    store: Arc<ConfigStore>,
    version: u64,
    last_sources: Option<Vec<(PathBuf, String)>>,
}

impl FileLoader {
    pub fn new(path: PathBuf, defaults: Timeouts, store: Arc<ConfigStore>) -> Self {
        Self {
            path,
            defaults,
            store,
            version: 0,
            last_sources: None,
        }
    }

    /// Read, validate and apply if anything changed. Returns whether a new snapshot was
    /// applied. On error nothing changes and the error says which file and why.
    pub fn reload(&mut self) -> Result<bool, LoadError> {
        let sources = read_sources(&self.path)?;
        if self.last_sources.as_ref() == Some(&sources) {
            if self.store.is_loaded() {
                self.store.touch();
            }
            return Ok(false);
        }
        // A file caught mid-write (truncated, half written) must not become the config:
        // act only on content that reads the same twice in a row.
        std::thread::sleep(SETTLE);
        if read_sources(&self.path)? != sources {
            return Ok(false);
        }
        let result = self.build(&sources);
        // Remember even a bad set, so one broken edit is reported once, not every poll.
        self.last_sources = Some(sources);
        let mut snapshot = result?;
        for (name, issues) in snapshot.keep_last_good(&self.store.snapshot()) {
            tracing::error!(
                provider = %name,
                issues = %join(&issues),
                "provider config invalid; keeping its last good config"
            );
        }
        for (name, issues) in &snapshot.invalid {
            tracing::error!(provider = %name, issues = %join(issues), "provider config invalid");
        }
        for p in snapshot.providers.values() {
            for w in &p.warnings {
                tracing::warn!(provider = %p.name, warning = %w, "provider config warning");
            }
        }
        tracing::info!(
            version = snapshot.version,
            providers = ?snapshot.providers.keys().collect::<Vec<_>>(),
            invalid = ?snapshot.invalid.keys().collect::<Vec<_>>(),
            "config loaded from {}",
            self.path.display()
        );
        self.store.apply(snapshot);
        Ok(true)
    }

    fn build(&mut self, sources: &[(PathBuf, String)]) -> Result<Snapshot, LoadError> {
        if sources.is_empty() {
            return Err(LoadError::Empty(self.path.display().to_string()));
        }
        let mut manifests = Manifests::default();
        for (path, text) in sources {
            manifests.parse_yaml(&path.display().to_string(), text)?;
        }
        self.version += 1;
        Ok(manifests.build_snapshot(self.version, &self.defaults))
    }

    /// Poll for changes every `every` until the task is dropped. Polling (not inotify)
    /// also sees ConfigMap symlink swaps and network filesystems.
    pub async fn watch(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // File I/O and the settle pause run off the async workers: the data plane
            // never waits on the disk.
            let (loader, result) = match tokio::task::spawn_blocking(move || {
                let r = self.reload();
                (self, r)
            })
            .await
            {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "config loader stopped");
                    return;
                }
            };
            self = loader;
            if let Err(e) = result {
                self.store.metrics().config_reload_errors.inc();
                tracing::error!(error = %e, "config not reloaded; the last good config stays in force");
            }
        }
    }
}

pub(crate) fn join(issues: &[provider_proxy_api::FieldIssue]) -> String {
    issues
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Providers by name with their masked proxy, for `/config` on the admin port.
pub fn describe(snapshot: &Snapshot) -> serde_json::Value {
    let providers: BTreeMap<_, _> = snapshot
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                serde_json::json!({
                    "upstream": p.upstream.to_string(),
                    "proxy": p.proxy_display(),
                    "fallbackToDirect": p.fallback_to_direct,
                    "http2": p.http2,
                }),
            )
        })
        .collect();
    let invalid: BTreeMap<_, _> = snapshot
        .invalid
        .iter()
        .map(|(name, issues)| {
            (
                name.clone(),
                issues.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            )
        })
        .collect();
    serde_json::json!({"version": snapshot.version, "providers": providers, "invalid": invalid})
}
