//! Wiring of the controller role: watches, reconciler, leader election, snapshot service,
//! admin port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use provider_proxy_api::{ProviderProxy, Timeouts, referenced_secrets};
use provider_proxy_dataplane::TrustRoots;
use tokio::net::TcpListener;
use tokio::sync::watch;

use provider_proxy_dataplane::server::LogLevelEndpoint;

use crate::hub::SnapshotHub;
use crate::leader::{LeaderElection, lease_api};
use crate::metrics::ControllerMetrics;
use crate::push::{Authenticator, PushService};
use crate::reconcile::{Context, error_policy, reconcile};

/// How long after the initial list the controller waits for every provider to reconcile
/// before it serves snapshots anyway.
const COMPLETE_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ControllerSettings {
    pub admin: SocketAddr,
    pub snapshot_listen: SocketAddr,
    /// Empty: all namespaces.
    pub watch_namespaces: Vec<String>,
    pub probe_interval: Duration,
    pub probe_concurrency: usize,
    pub leader_election: bool,
    /// How long a lease holds without renewal; renewed every fifth of it.
    pub lease_duration: Duration,
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    pub token_audience: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub defaults: Timeouts,
    /// `/loglevel` on the admin port (the binary supplies the control).
    pub log_level: LogLevelEndpoint,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS for the snapshot service: {0}")]
    Tls(String),
}

/// A started controller: its bound addresses and a way to stop it.
pub struct RunningController {
    pub admin_addr: SocketAddr,
    pub snapshot_addr: SocketAddr,
    pub hub: Arc<SnapshotHub>,
    pub metrics: Arc<ControllerMetrics>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningController {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Wait until every task ended (they end at shutdown).
    pub async fn wait(&mut self) {
        for t in &mut self.tasks {
            let _ = t.await;
        }
    }
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, what, source })
}

pub async fn start(
    client: Client,
    settings: ControllerSettings,
    roots: TrustRoots,
) -> Result<RunningController, RunError> {
    let metrics = ControllerMetrics::new();
    if let Some(count) = settings
        .log_level
        .control
        .as_ref()
        .and_then(|c| c.dropped_lines())
    {
        metrics.register_log_drops(count);
    }
    let hub = Arc::new(SnapshotHub::new());
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();

    let leader = Arc::new(AtomicBool::new(!settings.leader_election));
    metrics.leader.set(i64::from(!settings.leader_election));
    // Becoming leader re-reconciles everything: only the leader probes and writes status.
    let (became_leader, leadership) = watch::channel(());
    if settings.leader_election {
        let election = LeaderElection {
            api: lease_api(client.clone(), &settings.lease_namespace),
            name: settings.lease_name.clone(),
            identity: settings.identity.clone(),
            lease_duration: settings.lease_duration,
            renew_every: (settings.lease_duration / 5).max(Duration::from_millis(100)),
        };
        let m = metrics.clone();
        tasks.push(tokio::spawn(election.run(leader.clone(), move |held| {
            m.leader.set(i64::from(held));
            if held {
                became_leader.send_replace(());
            }
        })));
    }

    let admin = bind(settings.admin, "admin").await?;
    let snapshot = bind(settings.snapshot_listen, "snapshots").await?;
    let admin_addr = admin.local_addr().map_err(|source| RunError::Bind {
        addr: settings.admin,
        what: "admin",
        source,
    })?;
    let snapshot_addr = snapshot.local_addr().map_err(|source| RunError::Bind {
        addr: settings.snapshot_listen,
        what: "snapshots",
        source,
    })?;

    let tls = match &settings.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    // True once every watch has listed and every listed ProviderProxy is in the hub: a
    // restarted controller must not push a half-built snapshot over a sidecar's good one.
    let (complete_tx, complete) = watch::channel(false);
    let push = Arc::new(PushService {
        complete: complete.clone(),
        hub: hub.clone(),
        auth: Authenticator {
            client: client.clone(),
            audience: settings.token_audience.clone(),
        },
        metrics: metrics.clone(),
    });
    tasks.push(tokio::spawn(crate::push::serve(
        snapshot,
        push,
        tls,
        wait_for(stopped.clone()),
    )));

    let is_leader: Arc<dyn Fn() -> bool + Send + Sync> = {
        let l = leader.clone();
        Arc::new(move || l.load(Ordering::Acquire))
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "provider-proxy-controller".into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        hub.clone(),
        settings.defaults.clone(),
        roots,
        recorder,
        metrics.clone(),
        settings.probe_interval,
        settings.probe_concurrency,
        is_leader,
    ));

    let scopes: Vec<Option<String>> = if settings.watch_namespaces.is_empty() {
        vec![None]
    } else {
        settings
            .watch_namespaces
            .iter()
            .cloned()
            .map(Some)
            .collect()
    };
    let mut stores = Vec::new();
    for scope in scopes {
        let (pps, secrets): (Api<ProviderProxy>, Api<Secret>) = match &scope {
            None => (Api::all(client.clone()), Api::all(client.clone())),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        };
        let controller = Controller::new(pps, watcher::Config::default().any_semantic());
        let store = controller.store();
        stores.push(store.clone());
        let ctx = ctx.clone();
        let shutdown = wait_for(stopped.clone());
        let run = controller
            .watches(
                secrets,
                watcher::Config::default(),
                move |secret: Secret| providers_using(&store, &secret),
            )
            .reconcile_all_on(leadership_changes(leadership.clone()))
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            });
        tasks.push(tokio::spawn(run));
    }

    let synced = Arc::new(AtomicBool::new(false));
    {
        let synced = synced.clone();
        let stores = stores.clone();
        tasks.push(tokio::spawn(async move {
            for s in stores {
                // Re-poll on a timer: the store's readiness wakes only its latest waiter,
                // and the controller's own applier waits on it too.
                loop {
                    match tokio::time::timeout(Duration::from_millis(100), s.wait_until_ready())
                        .await
                    {
                        Ok(Ok(())) => break,
                        Ok(Err(_)) => return,
                        Err(_) => continue,
                    }
                }
            }
            synced.store(true, Ordering::Release);
        }));
    }

    // Deletions: a ProviderProxy gone from the watch is gone from its namespace's
    // snapshot within a tick (the reconciler never sees deleted objects). The same tick
    // notices when the initial state is complete.
    {
        let synced = synced.clone();
        let mut synced_at = None;
        let hub = hub.clone();
        let ctx = ctx.clone();
        let stores = stores.clone();
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => {},
                    _ = stopped.wait_for(|s| *s) => return,
                }
                hub.retain(|ns, name| {
                    let key = ObjectRef::<ProviderProxy>::new(name).within(ns);
                    let present = stores.iter().any(|s| s.get(&key).is_some());
                    if !present {
                        ctx.forget(ns, name);
                        tracing::info!(namespace = %ns, provider = %name, "provider deleted; removed from snapshot");
                    }
                    present
                });
                if !*complete_tx.borrow() && synced.load(Ordering::Acquire) {
                    let synced_at = *synced_at.get_or_insert_with(tokio::time::Instant::now);
                    let missing: Vec<String> = stores
                        .iter()
                        .flat_map(|s| s.state())
                        .filter(|pp| !hub.contains(&pp.namespace().unwrap_or_default(), &pp.name_any()))
                        .map(|pp| format!("{}/{}", pp.namespace().unwrap_or_default(), pp.name_any()))
                        .collect();
                    if missing.is_empty() {
                        tracing::info!("initial state complete; serving snapshots");
                        complete_tx.send_replace(true);
                    } else if synced_at.elapsed() > COMPLETE_WAIT {
                        // Reconciles keep failing for these (API errors): serve what we
                        // have rather than nothing; they join as soon as they reconcile.
                        tracing::warn!(?missing, "serving snapshots without providers that have not reconciled yet");
                        complete_tx.send_replace(true);
                    }
                }
            }
        }));
    }

    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        complete,
        leader,
        log_level: settings.log_level.clone(),
    });
    tasks.push(tokio::spawn(serve_admin(
        admin,
        admin_state,
        wait_for(stopped),
    )));
    tracing::info!(%admin_addr, %snapshot_addr, "controller started");
    Ok(RunningController {
        admin_addr,
        snapshot_addr,
        hub,
        metrics,
        stop,
        tasks,
    })
}

/// The ProviderProxies in the Secret's namespace that name it.
fn providers_using(store: &Store<ProviderProxy>, secret: &Secret) -> Vec<ObjectRef<ProviderProxy>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    store
        .state()
        .iter()
        .filter(|pp| pp.namespace() == ns && referenced_secrets(pp).contains(&name))
        .map(|pp| ObjectRef::from(pp.as_ref()))
        .collect()
}

/// One item each time this replica becomes leader.
fn leadership_changes(rx: watch::Receiver<()>) -> impl futures_util::Stream<Item = ()> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> Result<tokio_rustls::TlsAcceptor, RunError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| RunError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| RunError::Tls(format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| RunError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| RunError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

struct AdminState {
    metrics: Arc<ControllerMetrics>,
    complete: watch::Receiver<bool>,
    leader: Arc<AtomicBool>,
    log_level: LogLevelEndpoint,
}

async fn serve_admin(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(admin(req, &state).await) }
    });
    provider_proxy_dataplane::server::serve(listener, svc, None, shutdown, Duration::from_secs(1))
        .await;
}

async fn admin(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/loglevel" => {
            let (status, _, body) = state.log_level.handle(req).await;
            (status, body)
        }
        "/metrics" => (StatusCode::OK, state.metrics.render()),
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => {
            // Ready once every watch has listed: snapshots served before then would be partial.
            let synced = *state.complete.borrow();
            let leader = state.leader.load(Ordering::Acquire);
            if synced {
                (StatusCode::OK, format!("ready (leader: {leader})\n"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: initial list not done\n".to_owned(),
                )
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
