//! Prometheus metrics of the sidecar. Labels are low-cardinality by construction: provider
//! names come from the config (requests for unknown providers count as `provider="unknown"`),
//! routes and error classes are enums. No URL, host or path is ever a label.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::connector::{ConnectObserver, ConnectTimings};
use crate::error::ConnectError;
use crate::pool::{AgentPool, EvictReason};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Holds a gauge one higher from creation until it is dropped, however the thing it counts
/// ends (a future dropped mid-way included).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub first_byte: HistogramVec,
    pub proxy_failures: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub unavailable: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub request_bytes: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub worker_connections: IntGaugeVec,
    pub connect_stage: HistogramVec,
    pub connections: IntCounterVec,
    pub config_version: IntGauge,
    pub config_last_update: Gauge,
    pub config_last_contact: Gauge,
    pub config_reload_errors: IntCounter,
    pub providers: IntGaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; an error here is a programming error caught by tests.
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            ));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let m = Self {
            requests: counter(
                "provider_proxy_requests_total",
                "Requests answered, by provider, route (proxy|direct|fallback|none), status class and protocol.",
                &["provider", "route", "status_class", "protocol"],
            ),
            request_duration: histogram(
                "provider_proxy_request_duration_seconds",
                "Whole exchange, until the response body ended.",
                &["provider", "route"],
            ),
            first_byte: histogram(
                "provider_proxy_response_first_byte_seconds",
                "Time to the upstream's response headers.",
                &["provider", "route"],
            ),
            proxy_failures: counter(
                "provider_proxy_proxy_failures_total",
                "Failures on the proxy path, by class.",
                &["provider", "class"],
            ),
            fallbacks: counter(
                "provider_proxy_fallbacks_total",
                "Requests that went direct after the proxy path failed, by the failure class.",
                &["provider", "class"],
            ),
            unavailable: counter(
                "provider_proxy_unavailable_total",
                "Requests answered 503 because the proxy failed and fallback is off.",
                &["provider", "class"],
            ),
            response_bytes: counter(
                "provider_proxy_response_bytes_total",
                "Response body bytes relayed to clients.",
                &["provider"],
            ),
            request_bytes: counter(
                "provider_proxy_request_bytes_total",
                "Request body bytes relayed to upstreams.",
                &["provider"],
            ),
            in_flight: gauge(
                "provider_proxy_in_flight_requests",
                "Requests in progress, streams included.",
                &["provider"],
            ),
            worker_connections: gauge(
                "provider_proxy_worker_connections",
                "Client connections open on each data-plane worker (dealt round-robin).",
                &["worker"],
            ),
            connect_stage: histogram(
                "provider_proxy_connect_stage_duration_seconds",
                "Connection setup time by stage (tcp, proxy_handshake, tls) and path (proxy|direct).",
                &["path", "stage"],
            ),
            connections: counter(
                "provider_proxy_upstream_connections_total",
                "Connections opened to upstreams, by path and result (ok or the error class).",
                &["path", "result"],
            ),
            config_version: {
                let g = must(IntGauge::new(
                    "provider_proxy_config_version",
                    "Version of the config snapshot in force.",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            config_last_update: {
                let g = must(Gauge::new(
                    "provider_proxy_config_last_update_timestamp_seconds",
                    "Unix time the config in force was loaded (staleness = time() - this).",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            config_last_contact: {
                let g = must(Gauge::new(
                    "provider_proxy_config_last_contact_timestamp_seconds",
                    "Unix time the config source (controller or files) was last heard from.",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            config_reload_errors: {
                let c = must(IntCounter::new(
                    "provider_proxy_config_reload_errors_total",
                    "Config loads rejected (bad file, bad snapshot); the last good config stays.",
                ));
                must(registry.register(Box::new(c.clone())));
                c
            },
            providers: gauge(
                "provider_proxy_providers",
                "Configured providers by state (valid|invalid).",
                &["state"],
            ),
            registry,
        };
        Arc::new(m)
    }

    /// Export the pool's own counters at scrape time.
    pub fn register_pool(&self, pool: &Arc<AgentPool>) {
        must(
            self.registry
                .register(Box::new(PoolCollector::new(Arc::downgrade(pool)))),
        );
    }

    /// Export how many log lines the binary's log queue dropped (counted at scrape time).
    pub fn register_log_drops(&self, count: Arc<dyn Fn() -> u64 + Send + Sync>) {
        // A second `start` of the same sidecar finds it registered already: keep that one.
        let _ = self.registry.register(log_drops_collector(count));
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl ConnectObserver for Metrics {
    fn connected(&self, proxied: bool, t: &ConnectTimings) {
        let path = if proxied { "proxy" } else { "direct" };
        self.connections.with_label_values(&[path, "ok"]).inc();
        self.connect_stage
            .with_label_values(&[path, "tcp"])
            .observe(t.tcp.as_secs_f64());
        if proxied {
            self.connect_stage
                .with_label_values(&[path, "proxy_handshake"])
                .observe(t.proxy_handshake.as_secs_f64());
        }
        if !t.tls.is_zero() {
            self.connect_stage
                .with_label_values(&[path, "tls"])
                .observe(t.tls.as_secs_f64());
        }
    }

    fn failed(&self, proxied: bool, e: &ConnectError) {
        let path = if proxied { "proxy" } else { "direct" };
        self.connections
            .with_label_values(&[path, e.class.as_str()])
            .inc();
    }
}

/// `provider_proxy_log_lines_dropped_total`, read from `count` at scrape time; both
/// binaries export it.
pub fn log_drops_collector(count: Arc<dyn Fn() -> u64 + Send + Sync>) -> Box<dyn Collector> {
    let counter = must(IntCounter::new(
        "provider_proxy_log_lines_dropped_total",
        "Log lines dropped because the log queue was full (stderr not drained fast enough); work never waits for logging.",
    ));
    Box::new(LogDropsCollector { count, counter })
}

struct LogDropsCollector {
    count: Arc<dyn Fn() -> u64 + Send + Sync>,
    counter: IntCounter,
}

impl Collector for LogDropsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = &self.counter;
        c.inc_by((self.count)().saturating_sub(c.get()));
        c.collect()
    }
}

/// Reads the pool's atomics when Prometheus scrapes. Holds the pool weakly: the pool
/// holds these metrics (as its connect observer), and a cycle would leak both.
struct PoolCollector {
    pool: std::sync::Weak<AgentPool>,
    agents: IntGaugeVec,
    hits: IntCounter,
    misses: IntCounter,
    unhealthy: IntCounter,
    evictions: IntCounterVec,
    descs: Vec<Desc>,
}

impl PoolCollector {
    fn new(pool: std::sync::Weak<AgentPool>) -> Self {
        let agents = must(IntGaugeVec::new(
            Opts::new(
                "provider_proxy_pool_agents",
                "Agents in the pool by state (active|idle).",
            ),
            &["state"],
        ));
        let hits = must(IntCounter::new(
            "provider_proxy_pool_hits_total",
            "Requests that reused an agent.",
        ));
        let misses = must(IntCounter::new(
            "provider_proxy_pool_misses_total",
            "Requests that had to create an agent.",
        ));
        let unhealthy = must(IntCounter::new(
            "provider_proxy_pool_unhealthy_total",
            "Agents marked unhealthy after a TLS or HTTP/2 connection error.",
        ));
        let evictions = must(IntCounterVec::new(
            Opts::new(
                "provider_proxy_pool_evictions_total",
                "Agents removed from the pool, by reason (lru|ttl|lifetime|unhealthy|config).",
            ),
            &["reason"],
        ));
        let descs = [
            agents.desc(),
            hits.desc(),
            misses.desc(),
            unhealthy.desc(),
            evictions.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Self {
            pool,
            agents,
            hits,
            misses,
            unhealthy,
            evictions,
            descs,
        }
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(pool) = self.pool.upgrade() else {
            return Vec::new();
        };
        let stats = pool.stats();
        let counts = pool.counts();
        self.agents
            .with_label_values(&["active"])
            .set(counts.active as i64);
        self.agents
            .with_label_values(&["idle"])
            .set(counts.idle as i64);
        // Counters mirror the pool's monotonic atomics.
        let sync = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        sync(&self.hits, stats.hits.load(Ordering::Relaxed));
        sync(&self.misses, stats.misses.load(Ordering::Relaxed));
        sync(
            &self.unhealthy,
            stats.unhealthy_marks.load(Ordering::Relaxed),
        );
        for r in EvictReason::ALL {
            sync(
                &self.evictions.with_label_values(&[r.as_str()]),
                stats.evictions(r),
            );
        }
        let mut out = Vec::new();
        out.extend(self.agents.collect());
        out.extend(self.hits.collect());
        out.extend(self.misses.collect());
        out.extend(self.unhealthy.collect());
        out.extend(self.evictions.collect());
        out
    }
}
