//! reconcile = fetch → validate/resolve (pure) → probe → publish → status.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use provider_proxy_api::{ProviderProxy, Timeouts, referenced_secrets, resolve};
use provider_proxy_dataplane::connector::NoObserver;
use provider_proxy_dataplane::probe::{ProbeOutcome, probe};
use provider_proxy_dataplane::{AgentPool, PoolSettings, TrustRoots};

use crate::hub::SnapshotHub;
use crate::metrics::ControllerMetrics;
use crate::status::{build_status, ready_of};

pub const FIELD_MANAGER: &str = "provider-proxy-controller";

/// Errors, typed per step. None carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ProviderProxy has no namespace")]
    NoNamespace,
    #[error("fetching Secret {name:?}: {source}")]
    FetchSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status: {0}")]
    WriteStatus(#[source] kube::Error),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoNamespace => "no_namespace",
            Self::FetchSecret { .. } => "fetch_secret",
            Self::WriteStatus(_) => "write_status",
        }
    }
}

/// What reconcile needs, shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub hub: Arc<SnapshotHub>,
    pub defaults: Timeouts,
    pub roots: TrustRoots,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    /// Default probe period when `spec.probe.interval` is not set; zero disables.
    pub probe_interval: Duration,
    /// Bounds concurrent probes.
    pub probe_slots: Arc<tokio::sync::Semaphore>,
    /// Only the leader probes and writes; every replica resolves and serves snapshots.
    pub is_leader: Arc<dyn Fn() -> bool + Send + Sync>,
    memo: Mutex<HashMap<(String, String), Memo>>,
    /// Ready per provider, for the providers-by-condition gauge.
    ready: Mutex<HashMap<(String, String), bool>>,
}

/// What the last probe saw, to probe again only on change or when due.
#[derive(Clone)]
struct Memo {
    inputs: u64,
    probed_at: Instant,
    outcome: ProbeOutcome,
    time: String,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        hub: Arc<SnapshotHub>,
        defaults: Timeouts,
        roots: TrustRoots,
        recorder: Recorder,
        metrics: Arc<ControllerMetrics>,
        probe_interval: Duration,
        probe_concurrency: usize,
        is_leader: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Self {
            client,
            hub,
            defaults,
            roots,
            recorder,
            metrics,
            probe_interval,
            probe_slots: Arc::new(tokio::sync::Semaphore::new(probe_concurrency.max(1))),
            is_leader,
            memo: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
        }
    }

    pub fn forget(&self, ns: &str, name: &str) {
        let key = (ns.to_owned(), name.to_owned());
        self.memo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.set_ready(key, None);
    }

    fn set_ready(&self, key: (String, String), ready: Option<bool>) {
        let mut map = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        match ready {
            Some(r) => map.insert(key, r),
            None => map.remove(&key),
        };
        let ready_count = map.values().filter(|r| **r).count() as i64;
        self.metrics
            .providers
            .with_label_values(&["true"])
            .set(ready_count);
        self.metrics
            .providers
            .with_label_values(&["false"])
            .set(map.len() as i64 - ready_count);
    }
}

pub async fn reconcile(pp: Arc<ProviderProxy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&pp, &ctx).await;
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::kind));
    result
}

async fn reconcile_inner(pp: &ProviderProxy, ctx: &Context) -> Result<Action, Error> {
    let ns = pp.namespace().ok_or(Error::NoNamespace)?;
    let name = pp.name_any();

    // fetch
    let secrets = fetch_secrets(&ctx.client, &ns, &referenced_secrets(pp)).await?;
    // validate + resolve (pure)
    let resolution = resolve(pp, &secrets, &ctx.defaults);
    let masked_proxy = match (&resolution, &pp.spec.proxy) {
        (Ok(p), _) => Some(p.proxy_display()),
        (Err(_), Some(p)) => Some(provider_proxy_api::mask_url(&p.url)),
        (Err(_), None) => Some("direct".to_owned()),
    };
    // publish to this namespace's sidecars
    if ctx.hub.upsert(&ns, &name, resolution.clone()) {
        let version = ctx.hub.current(&ns).version;
        ctx.metrics
            .snapshot_version
            .with_label_values(&[&ns])
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        tracing::info!(namespace = %ns, provider = %name, version = ctx.hub.current(&ns).version, "snapshot published");
    }

    let interval = resolution
        .as_ref()
        .ok()
        .and_then(|p| p.probe_interval)
        .unwrap_or(ctx.probe_interval);
    if !(ctx.is_leader)() {
        return Ok(Action::requeue(Duration::from_secs(60)));
    }

    // probe, on change or when due
    let key = (ns.clone(), name.clone());
    let inputs = input_fingerprint(pp, &secrets);
    let memo = ctx
        .memo
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let due = match &memo {
        None => true,
        Some(m) => m.inputs != inputs || (!interval.is_zero() && m.probed_at.elapsed() >= interval),
    };
    let probe_result = match (&resolution, due) {
        (Ok(provider), true) => {
            let _slot = ctx.probe_slots.acquire().await;
            // A fresh pool per probe: the probe tests establishing the path, not a
            // pooled tunnel that was opened long ago.
            let pool = AgentPool::new(
                PoolSettings::default(),
                ctx.roots.clone(),
                Arc::new(NoObserver),
            );
            let outcome = probe(&pool, provider).await;
            ctx.metrics.probed(&ns, &name, &outcome);
            let m = Memo {
                inputs,
                probed_at: Instant::now(),
                outcome,
                time: now_rfc3339(),
            };
            ctx.memo
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, m.clone());
            Some(m)
        }
        (Ok(_), false) => memo,
        (Err(_), _) => {
            ctx.forget(&ns, &name);
            None
        }
    };

    // status
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = build_status(
        pp.metadata.generation,
        &resolution,
        probe_result.as_ref().map(|m| &m.outcome),
        probe_result.as_ref().map(|m| m.time.as_str()),
        pp.status.as_ref(),
        &now,
        masked_proxy,
    );
    ctx.set_ready(
        (ns.clone(), name.clone()),
        ready_of(Some(&status)).map(|(s, _)| s == "True"),
    );
    if pp.status.as_ref() != Some(&status) {
        let api: Api<ProviderProxy> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": "providerproxy.dev/v1alpha1",
            "kind": "ProviderProxy",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::WriteStatus)?;
        publish_transition(ctx, pp, &status).await;
    }

    Ok(if interval.is_zero() {
        Action::await_change()
    } else {
        Action::requeue(interval)
    })
}

/// An Event when Ready changes (status or reason), and one for each warning once.
async fn publish_transition(
    ctx: &Context,
    pp: &ProviderProxy,
    status: &provider_proxy_api::ProviderProxyStatus,
) {
    let before = ready_of(pp.status.as_ref());
    let after = ready_of(Some(status));
    if before == after {
        return;
    }
    let Some(ready) = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::status::READY)
    else {
        return;
    };
    let event = Event {
        type_: if ready.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: ready.reason.clone(),
        note: Some(ready.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pp.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

async fn fetch_secrets(
    client: &Client,
    ns: &str,
    names: &[String],
) -> Result<BTreeMap<String, Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut out = BTreeMap::new();
    for name in names {
        match api.get_opt(name).await {
            Ok(Some(s)) => {
                out.insert(name.clone(), s);
            }
            Ok(None) => {}
            Err(source) => {
                return Err(Error::FetchSecret {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    Ok(out)
}

/// Changes whenever anything the probe depends on changes: the spec (generation) and the
/// Secrets' versions. Hashes resourceVersions, never Secret data.
fn input_fingerprint(pp: &ProviderProxy, secrets: &BTreeMap<String, Secret>) -> u64 {
    let mut h = DefaultHasher::new();
    pp.metadata.generation.hash(&mut h);
    pp.metadata.uid.hash(&mut h);
    for (name, s) in secrets {
        name.hash(&mut h);
        s.metadata.resource_version.hash(&mut h);
    }
    h.finish()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Back off on errors; the next watch event retries sooner anyway.
pub fn error_policy(pp: Arc<ProviderProxy>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        namespace = pp.namespace().unwrap_or_default(),
        provider = %pp.name_any(),
        error = %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}
