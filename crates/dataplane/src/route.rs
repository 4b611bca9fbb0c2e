//! The routing table in force: what a request needs about its provider, worked out once per
//! config version instead of on every request. Building a pool key hashes the credentials
//! and CA bundles, and each `with_label_values` hashes its labels under a lock; both are
//! done here once, then reused by every request of that snapshot.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use http::StatusCode;
use prometheus::{Histogram, IntCounter, IntGauge};
use provider_proxy_api::{Provider, Snapshot};

use crate::metrics::Metrics;
use crate::pool::{AgentPool, Path, PoolKey};

/// The way a request reached its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Proxy,
    Direct,
    Fallback,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Direct => "direct",
            Self::Fallback => "fallback",
        }
    }
}

/// A snapshot with its routes.
pub struct Routes {
    pub snapshot: Arc<Snapshot>,
    by_name: HashMap<String, Arc<ProviderRoute>>,
}

impl Routes {
    pub fn build(snapshot: Arc<Snapshot>, pool: &AgentPool) -> Self {
        let by_name = snapshot
            .providers
            .iter()
            .map(|(name, p)| (name.clone(), Arc::new(ProviderRoute::new(p.clone(), pool))))
            .collect();
        Self { snapshot, by_name }
    }

    pub fn get(&self, provider: &str) -> Option<&Arc<ProviderRoute>> {
        self.by_name.get(provider)
    }

    /// Every pool key a request of this snapshot may use.
    pub fn pool_keys(&self) -> impl Iterator<Item = &PoolKey> {
        self.by_name.values().flat_map(|r| {
            let direct = (r.provider.proxy.is_none() || r.provider.fallback_to_direct)
                .then_some(&r.direct_key);
            r.proxy_key.iter().chain(direct)
        })
    }
}

/// One provider of the snapshot in force.
pub struct ProviderRoute {
    pub provider: Arc<Provider>,
    proxy_key: Option<PoolKey>,
    direct_key: PoolKey,
    pub metrics: ProviderMetrics,
}

impl ProviderRoute {
    fn new(provider: Arc<Provider>, pool: &AgentPool) -> Self {
        Self {
            proxy_key: provider
                .proxy
                .is_some()
                .then(|| pool.key(&provider, Path::Proxy)),
            direct_key: pool.key(&provider, Path::Direct),
            metrics: ProviderMetrics::new(&provider.name),
            provider,
        }
    }

    /// The agent key for `path` (a provider without a proxy only goes direct).
    pub fn key(&self, path: Path) -> &PoolKey {
        match (path, &self.proxy_key) {
            (Path::Proxy, Some(k)) => k,
            _ => &self.direct_key,
        }
    }
}

/// One provider's metric handles, each looked up on first use (so the exposition shows
/// only series that moved) and kept for the life of the snapshot.
pub struct ProviderMetrics {
    name: String,
    in_flight: OnceLock<IntGauge>,
    response_bytes: OnceLock<IntCounter>,
    request_bytes: OnceLock<IntCounter>,
    first_byte: [OnceLock<Histogram>; 3],
    duration: [OnceLock<Histogram>; 3],
    /// route × status class × protocol (h1, h2, none)
    requests: [[[OnceLock<IntCounter>; 3]; 5]; 3],
}

/// `protocol` label values, in the order of [`ProviderMetrics::requests`].
pub const PROTOCOLS: [&str; 3] = ["h1", "h2", "none"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl ProviderMetrics {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            in_flight: OnceLock::new(),
            response_bytes: OnceLock::new(),
            request_bytes: OnceLock::new(),
            first_byte: Default::default(),
            duration: Default::default(),
            requests: Default::default(),
        }
    }

    pub fn in_flight(&self, m: &Metrics) -> &IntGauge {
        self.in_flight
            .get_or_init(|| m.in_flight.with_label_values(&[&self.name]))
    }

    pub fn response_bytes(&self, m: &Metrics) -> &IntCounter {
        self.response_bytes
            .get_or_init(|| m.response_bytes.with_label_values(&[&self.name]))
    }

    pub fn request_bytes(&self, m: &Metrics) -> &IntCounter {
        self.request_bytes
            .get_or_init(|| m.request_bytes.with_label_values(&[&self.name]))
    }

    pub fn first_byte(&self, m: &Metrics, route: Route) -> &Histogram {
        self.first_byte[route as usize].get_or_init(|| {
            m.first_byte
                .with_label_values(&[&self.name, route.as_str()])
        })
    }

    pub fn duration(&self, m: &Metrics, route: Route) -> &Histogram {
        self.duration[route as usize].get_or_init(|| {
            m.request_duration
                .with_label_values(&[&self.name, route.as_str()])
        })
    }

    /// `protocol` indexes [`PROTOCOLS`].
    pub fn requests(
        &self,
        m: &Metrics,
        route: Route,
        status: StatusCode,
        protocol: usize,
    ) -> &IntCounter {
        let class = status_class_index(status);
        let protocol = protocol.min(PROTOCOLS.len() - 1);
        self.requests[route as usize][class][protocol].get_or_init(|| {
            m.requests.with_label_values(&[
                &self.name,
                route.as_str(),
                STATUS_CLASSES[class],
                PROTOCOLS[protocol],
            ])
        })
    }
}

fn status_class_index(s: StatusCode) -> usize {
    match s.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}
