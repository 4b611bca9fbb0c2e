//! Controller metrics: reconciles, probes, connected sidecars, leadership.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use provider_proxy_dataplane::probe::ProbeOutcome;

pub struct ControllerMetrics {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_duration: HistogramVec,
    probes: IntCounterVec,
    probe_latency: HistogramVec,
    pub sidecars: IntGaugeVec,
    pub pushes: IntCounterVec,
    pub push_rejections: IntCounterVec,
    pub leader: IntGauge,
    pub providers: IntGaugeVec,
    pub snapshot_version: IntGaugeVec,
    pub push_latency: HistogramVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl ControllerMetrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                labels,
            ));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let leader = must(IntGauge::new(
            "provider_proxy_controller_leader",
            "1 while this replica holds the leader lease.",
        ));
        must(registry.register(Box::new(leader.clone())));
        Arc::new(Self {
            reconciles: counter(
                "provider_proxy_controller_reconciles_total",
                "Reconciles by result (ok or the failing step).",
                &["result"],
            ),
            reconcile_duration: histogram(
                "provider_proxy_controller_reconcile_duration_seconds",
                "Reconcile duration.",
                &[],
                buckets.clone(),
            ),
            probes: counter(
                "provider_proxy_controller_probes_total",
                "Connection tests by provider and result (ok or the error class).",
                &["namespace", "provider", "result"],
            ),
            probe_latency: histogram(
                "provider_proxy_controller_probe_duration_seconds",
                "Connection test latency by provider.",
                &["namespace", "provider"],
                buckets,
            ),
            sidecars: gauge_vec(
                "provider_proxy_controller_connected_sidecars",
                "Sidecars streaming snapshots, by namespace.",
                &["namespace"],
            ),
            pushes: counter(
                "provider_proxy_controller_snapshot_pushes_total",
                "Snapshots sent to sidecars, by namespace.",
                &["namespace"],
            ),
            push_rejections: counter(
                "provider_proxy_controller_snapshot_rejections_total",
                "Snapshot stream requests refused, by reason.",
                &["reason"],
            ),
            leader,
            providers: gauge_vec(
                "provider_proxy_controller_providers",
                "ProviderProxies by their Ready condition (true|false).",
                &["ready"],
            ),
            snapshot_version: gauge_vec(
                "provider_proxy_controller_snapshot_version",
                "Latest snapshot version published, by namespace (sidecars log the version they run).",
                &["namespace"],
            ),
            push_latency: histogram(
                "provider_proxy_controller_push_latency_seconds",
                "From a snapshot's publication to its write into a sidecar's stream.",
                &[],
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            ),
            registry,
        })
    }

    pub fn reconciled(&self, took: Duration, error: Option<&str>) {
        self.reconciles
            .with_label_values(&[error.unwrap_or("ok")])
            .inc();
        self.reconcile_duration
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
    }

    pub fn probed(&self, ns: &str, name: &str, o: &ProbeOutcome) {
        let result = o.error.map_or("ok", |e| e.as_str());
        self.probes.with_label_values(&[ns, name, result]).inc();
        self.probe_latency
            .with_label_values(&[ns, name])
            .observe(o.latency.as_secs_f64());
    }

    /// Export how many log lines the binary's log queue dropped.
    pub fn register_log_drops(&self, count: Arc<dyn Fn() -> u64 + Send + Sync>) {
        let _ = self
            .registry
            .register(provider_proxy_dataplane::metrics::log_drops_collector(
                count,
            ));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
