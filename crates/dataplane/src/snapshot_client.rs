//! The sidecar's side of the push: hold `GET /v1/snapshots` open to the controller, apply
//! each snapshot atomically, reconnect with jittered backoff, and keep serving the last good
//! snapshot (also across restarts, from the cache file) while the controller is away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use provider_proxy_api::{UpstreamUrl, WireSnapshot};
use rand::Rng;

use crate::config::ConfigStore;
use crate::connector::{Connector, NoObserver};
use crate::pool::RequestBody;
use crate::tls::TrustRoots;

/// Header with the version the sidecar runs (the controller skips re-sending it).
pub const VERSION_HEADER: &str = "x-provider-proxy-version";
/// With no byte (snapshot or heartbeat) for this long, the stream is presumed dead.
pub const IDLE_LIMIT: Duration = Duration::from_secs(35);

#[derive(Clone, Debug)]
pub struct SnapshotClientSettings {
    /// `http://provider-proxy.ns.svc:15443` or `https://…`.
    pub controller: String,
    /// The projected ServiceAccount token, re-read at every connect (kubelet rotates it).
    pub token_file: PathBuf,
    /// Where the last good snapshot is kept (mode 0600).
    pub cache: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("controller URL {0:?} is not http(s)://HOST[:PORT]")]
    BadUrl(String),
    #[error("reading token file {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the controller: {0}")]
    Connect(String),
    #[error("controller answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("stream ended")]
    Ended,
    #[error("no data from the controller for {} s", IDLE_LIMIT.as_secs())]
    Idle,
}

pub struct SnapshotClient {
    settings: SnapshotClientSettings,
    store: Arc<ConfigStore>,
    /// One connection per stream: the stream lives for hours, pooling buys nothing.
    connector: Connector,
    host: header::HeaderValue,
    /// `<base path>/v1/snapshots`
    path: Uri,
    base: String,
}

impl SnapshotClient {
    pub fn new(
        settings: SnapshotClientSettings,
        store: Arc<ConfigStore>,
        roots: &TrustRoots,
    ) -> Result<Self, ClientError> {
        let url = UpstreamUrl::parse(&settings.controller)
            .map_err(|_| ClientError::BadUrl(settings.controller.clone()))?;
        let tls = if url.is_https() {
            Some(
                roots
                    .client_config(None, false)
                    .map_err(ClientError::Connect)?,
            )
        } else {
            None
        };
        let connector = Connector::new(
            url.clone(),
            tls,
            None,
            Duration::from_secs(10),
            Arc::new(NoObserver),
        )
        .map_err(|e| ClientError::Connect(e.to_string()))?;
        let host = header::HeaderValue::try_from(url.authority())
            .map_err(|_| ClientError::BadUrl(settings.controller.clone()))?;
        let path = Uri::try_from(format!("{}/v1/snapshots", url.base_path))
            .map_err(|_| ClientError::BadUrl(settings.controller.clone()))?;
        Ok(Self {
            base: url.to_string(),
            settings,
            store,
            connector,
            host,
            path,
        })
    }

    /// Load the cached snapshot, if any: the sidecar serves before the controller answers.
    pub fn load_cache(&self) {
        let Some(path) = &self.settings.cache else {
            return;
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                match WireSnapshot::from_json(&bytes).and_then(WireSnapshot::into_snapshot) {
                    Ok(snap) => {
                        tracing::info!(version = snap.version, path = %path.display(), "serving the cached snapshot until the controller answers");
                        self.store.apply(snap);
                    }
                    Err(e) => {
                        self.store.metrics().config_reload_errors.inc();
                        tracing::warn!(path = %path.display(), error = %e, "ignoring a corrupt snapshot cache");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the snapshot cache")
            }
        }
    }

    /// Follow the controller forever.
    pub async fn run(self) {
        let mut failures: u32 = 0;
        loop {
            match self.follow().await {
                Ok(()) | Err(ClientError::Ended) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, attempt = failures, "snapshot stream failed; serving the last good config");
                }
            }
            tokio::time::sleep(backoff(failures)).await;
        }
    }

    async fn open(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, ClientError> {
        let conn = self
            .connector
            .connect()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut sender, driver) = http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "snapshot connection ended");
            }
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))
    }

    async fn follow(&self) -> Result<(), ClientError> {
        let token = std::fs::read_to_string(&self.settings.token_file).map_err(|source| {
            ClientError::Token {
                path: self.settings.token_file.display().to_string(),
                source,
            }
        })?;
        let current = self.store.snapshot().version;
        let mut req = Request::new(RequestBody::Right(Empty::new()));
        *req.uri_mut() = self.path.clone();
        req.headers_mut().insert(header::HOST, self.host.clone());
        let bearer = header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map(|mut v| {
                v.set_sensitive(true);
                v
            })
            .map_err(|_| {
                ClientError::Connect("token file holds characters not allowed in a header".into())
            })?;
        req.headers_mut().insert(header::AUTHORIZATION, bearer);
        if let Ok(v) = header::HeaderValue::from_str(&current.to_string()) {
            req.headers_mut().insert(VERSION_HEADER, v);
        }
        let resp = tokio::time::timeout(Duration::from_secs(15), self.open(req))
            .await
            .map_err(|_| ClientError::Connect("no answer within 15 s".into()))??;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let text = tokio::time::timeout(Duration::from_secs(5), body.collect())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|c| {
                    String::from_utf8_lossy(&c.to_bytes())
                        .chars()
                        .take(200)
                        .collect()
                })
                .unwrap_or_default();
            return Err(ClientError::Refused {
                status: status.as_u16(),
                body: text,
            });
        }
        tracing::info!(controller = %self.base, "snapshot stream connected");
        let mut buf = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(IDLE_LIMIT, body.frame()).await {
                Err(_) => return Err(ClientError::Idle),
                Ok(None) => return Err(ClientError::Ended),
                Ok(Some(Err(e))) => return Err(ClientError::Connect(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.store.touch();
            buf.extend_from_slice(&data);
            if buf.len() > provider_proxy_api::wire::MAX_WIRE_SNAPSHOT {
                return Err(ClientError::Connect("snapshot line too large".into()));
            }
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(pos + 1);
                let line = &line[..pos];
                if !line.iter().all(u8::is_ascii_whitespace) {
                    self.apply(line);
                }
            }
        }
    }

    /// Apply one pushed snapshot: only a valid, newer one replaces what runs.
    fn apply(&self, line: &[u8]) {
        let parsed = WireSnapshot::from_json(line)
            .and_then(|w| Ok((w.namespace.clone(), w.into_snapshot()?)));
        let (namespace, mut snapshot) = match parsed {
            Ok(s) => s,
            Err(e) => {
                self.store.metrics().config_reload_errors.inc();
                tracing::error!(error = %e, "rejected a snapshot; the last good config stays in force");
                return;
            }
        };
        let current = self.store.snapshot().version;
        if snapshot.version < current {
            self.store.metrics().config_reload_errors.inc();
            tracing::warn!(
                received = snapshot.version,
                running = current,
                "rejected an older snapshot"
            );
            return;
        }
        if snapshot.version == current && self.store.is_loaded() {
            return;
        }
        // The controller keeps a provider's last good config too, but a restarted one has
        // never seen it valid (its Secret went missing meanwhile); the sidecar has.
        let kept = snapshot.keep_last_good(&self.store.snapshot());
        for (name, issues) in &kept {
            tracing::warn!(
                provider = %name,
                issues = %crate::config::join(issues),
                "the controller reports this provider invalid; keeping its last good config"
            );
        }
        if let Some(path) = &self.settings.cache {
            // What runs, so a restart during the controller's outage keeps it too.
            let merged;
            let bytes = if kept.is_empty() {
                line
            } else {
                merged = WireSnapshot::from_snapshot(&namespace, &snapshot).to_json();
                merged.as_bytes()
            };
            if let Err(e) = write_cache(path, bytes) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the snapshot cache");
            }
        }
        tracing::info!(
            version = snapshot.version,
            providers = ?snapshot.providers.keys().collect::<Vec<_>>(),
            "snapshot applied"
        );
        self.store.apply(snapshot);
    }
}

/// Atomically replace the cache file, readable by its owner only (it holds credentials).
fn write_cache(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// 100 ms doubling to 10 s, with ±50 % jitter so a controller restart is not met by every
/// sidecar at once.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::from_millis(100);
    }
    let base = 100u64.saturating_mul(1 << failures.min(7)).min(10_000);
    let jitter = rand::rng().random_range(base / 2..=base + base / 2);
    Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for f in 1..20 {
            let d = backoff(f).as_millis() as u64;
            let base = 100u64.saturating_mul(1 << f.min(7)).min(10_000);
            assert!(d >= base / 2 && d <= base + base / 2, "{f}: {d}");
        }
        assert!(backoff(30) <= Duration::from_secs(15));
    }
}
