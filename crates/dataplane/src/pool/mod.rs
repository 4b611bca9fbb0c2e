//! The agent pool: one agent (a connector for one path and the connections it made, see
//! [`conns`]) per (upstream origin, proxy origin, credential/CA fingerprint, h1/h2).
//!
//! Unlike the reference, credentials are part of the key: two providers that log in to the
//! same proxy as different users never share an authenticated tunnel. Agents are evicted by
//! LRU, TTL (unused), hard lifetime, health and config change; eviction only removes an agent
//! from the map, so requests already on it, streaming ones included, finish undisturbed and
//! its idle connections close at once, the busy ones when their response ends.

mod conns;
mod gate;

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// tokio's clock, so TTL and lifetime can be tested on paused virtual time.
use tokio::time::Instant;

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body_util::{Either, Empty};
use provider_proxy_api::{Provider, ProxyScheme};

use crate::connector::{ConnectObserver, Connector, ProxyHop};
use crate::error::{ConnectError, ErrorClass};
use crate::tls::TrustRoots;
use conns::{ConnSet, ConnSettings, Target};
pub use conns::{SendError, UpstreamBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body every upstream request is sent with: the client's, forwarded, or none (probes,
/// snapshot fetches). Not boxed: one allocation less per request.
pub type RequestBody = Either<crate::body::OnceBody, Empty<Bytes>>;

/// Pool limits. Defaults are the reference's, plus a hard lifetime.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Most agents kept; the least recently used is evicted beyond it.
    pub max_agents: usize,
    /// An agent unused this long is removed.
    pub agent_ttl: Duration,
    /// A pooled connection idle this long is closed.
    pub idle_timeout: Duration,
    /// How often TTL and lifetime are checked.
    pub sweep_interval: Duration,
    /// After this an agent takes no new requests (fresh DNS, fresh TLS, bounded drift).
    pub max_lifetime: Duration,
    /// Most connects one agent runs at once on one worker; further requests wait for one
    /// of them or for a connection to free up (a slow proxy handshake never becomes a
    /// storm).
    pub max_connecting: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_agents: 100,
            agent_ttl: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(3600),
            max_connecting: 32,
        }
    }
}

/// Which path an agent takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    Proxy,
    Direct,
}

/// What identifies an agent. `Debug` shows no credentials: only origins and a keyed hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PoolKey {
    upstream: String,
    proxy: Option<String>,
    /// Keyed hash of everything that makes a connection what it is (upstream, proxy with
    /// its credentials, CAs, connect timeout, h2), without keeping the secret in the key.
    fingerprint: u64,
    h2: bool,
}

/// By the fingerprint alone: it already covers every field, and hashing the key's
/// strings again on every checkout cost more than the map lookup itself.
impl Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.fingerprint);
    }
}

/// Passes a [`PoolKey`]'s fingerprint through (it is a keyed hash already).
#[derive(Default)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `PoolKey`; anything else still spreads.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type AgentMap = HashMap<PoolKey, Arc<Agent>, BuildHasherDefault<FingerprintHasher>>;

impl fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PoolKey({} via {} #{:016x} {})",
            self.upstream,
            self.proxy.as_deref().unwrap_or("direct"),
            self.fingerprint,
            if self.h2 { "h2" } else { "h1" }
        )
    }
}

/// Why an agent left the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictReason {
    Lru,
    Ttl,
    Lifetime,
    Unhealthy,
    Config,
}

impl EvictReason {
    pub const ALL: [EvictReason; 5] = [
        Self::Lru,
        Self::Ttl,
        Self::Lifetime,
        Self::Unhealthy,
        Self::Config,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Ttl => "ttl",
            Self::Lifetime => "lifetime",
            Self::Unhealthy => "unhealthy",
            Self::Config => "config",
        }
    }
}

/// Counters for the metrics layer.
#[derive(Default)]
pub struct PoolStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub unhealthy_marks: AtomicU64,
    evictions: [AtomicU64; 5],
}

impl PoolStats {
    pub fn evictions(&self, reason: EvictReason) -> u64 {
        self.evictions[reason as usize].load(Ordering::Relaxed)
    }
    fn evicted(&self, reason: EvictReason) {
        self.evictions[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// One path to one upstream, with its own connections.
pub struct Agent {
    id: u64,
    key: PoolKey,
    conns: Arc<ConnSet>,
    created: Instant,
    last_used_ms: AtomicU64,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
}

impl Agent {
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn key(&self) -> &PoolKey {
        &self.key
    }
    /// Send `req` (origin-form URI) on one of this agent's connections; its response
    /// headers must be in by `deadline` ([`deadline`]). The response body holds an
    /// HTTP/1.1 connection until it is done with.
    pub fn send(
        &self,
        req: Request<RequestBody>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + '_ {
        // The connection set's future as it is: an `async fn` around it would hold `req`
        // once more.
        self.conns.send(req, deadline)
    }
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// `timeout` after `from`, or as good as never when that is beyond what an `Instant` holds
/// (a timeout configured in the billions of years must not panic the data plane).
pub fn deadline(from: Instant, timeout: Duration) -> Instant {
    from.checked_add(timeout)
        .unwrap_or_else(|| from + Duration::from_secs(86_400 * 365 * 30))
}

/// Held while a request uses an agent, until its response body ends or is dropped.
pub struct AgentLease {
    agent: Arc<Agent>,
}

impl AgentLease {
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }
}

impl Drop for AgentLease {
    fn drop(&mut self) {
        self.agent.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Agent states, for a gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounts {
    pub active: usize,
    pub idle: usize,
}

pub struct AgentPool {
    agents: Mutex<AgentMap>,
    settings: PoolSettings,
    roots: TrustRoots,
    observer: Arc<dyn ConnectObserver>,
    hasher: RandomState,
    epoch: Instant,
    next_id: AtomicU64,
    stats: PoolStats,
    shards: usize,
}

impl AgentPool {
    pub fn new(
        settings: PoolSettings,
        roots: TrustRoots,
        observer: Arc<dyn ConnectObserver>,
    ) -> Self {
        Self {
            agents: Mutex::new(AgentMap::default()),
            settings,
            roots,
            observer,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            stats: PoolStats::default(),
            shards: 1,
        }
    }

    /// Keep each agent's connections in `shards` sets, one per data-plane worker thread
    /// plus one for other threads (see [`crate::workers`]).
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    fn lock(&self) -> MutexGuard<'_, AgentMap> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The key of `provider`'s agent for `path`.
    pub fn key(&self, provider: &Provider, path: Path) -> PoolKey {
        let proxy = match path {
            Path::Proxy => provider.proxy.as_ref(),
            Path::Direct => None,
        };
        let mut h = self.hasher.build_hasher();
        let upstream = provider.upstream.origin();
        upstream.hash(&mut h);
        provider.http2.hash(&mut h);
        if let Some(p) = proxy {
            p.url.to_credentialed_string().hash(&mut h);
            p.ca.as_ref().map(|c| c.pem()).hash(&mut h);
        }
        provider.upstream_ca.as_ref().map(|c| c.pem()).hash(&mut h);
        provider.timeouts.connect.hash(&mut h);
        PoolKey {
            upstream,
            proxy: proxy.map(|p| p.url.origin()),
            fingerprint: h.finish(),
            h2: provider.http2,
        }
    }

    /// Check out the agent for `provider` along `path`, creating it if needed.
    pub fn checkout(&self, provider: &Provider, path: Path) -> Result<AgentLease, ConnectError> {
        self.checkout_keyed(&self.key(provider, path), provider, path)
    }

    /// [`checkout`](Self::checkout) with the key already worked out (the route table keeps
    /// it per snapshot): the hot path.
    pub fn checkout_keyed(
        &self,
        key: &PoolKey,
        provider: &Provider,
        path: Path,
    ) -> Result<AgentLease, ConnectError> {
        // One clock read for both the LRU stamp and the lifetime check.
        let now = Instant::now();
        let mut agents = self.lock();
        let reusable = agents.get(key).filter(|a| {
            a.is_healthy() && now.duration_since(a.created) < self.settings.max_lifetime
        });
        let agent = match reusable {
            Some(a) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                a.clone()
            }
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                if let Some(old) = agents.remove(key) {
                    old.conns.retire();
                    let reason = if old.is_healthy() {
                        EvictReason::Lifetime
                    } else {
                        EvictReason::Unhealthy
                    };
                    self.stats.evicted(reason);
                }
                let agent = Arc::new(self.build(key.clone(), provider, path)?);
                if agents.len() >= self.settings.max_agents {
                    self.evict_lru(&mut agents);
                }
                agents.insert(key.clone(), agent.clone());
                agent
            }
        };
        let now_ms = now.duration_since(self.epoch).as_millis() as u64;
        agent.last_used_ms.store(now_ms, Ordering::Relaxed);
        agent.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(AgentLease { agent })
    }

    /// Evict the least recently used agent, preferring idle ones. A busy agent can be
    /// evicted too (the pool is never "full"): its requests finish on it regardless.
    fn evict_lru(&self, agents: &mut AgentMap) {
        let victim = agents
            .values()
            .min_by_key(|a| (a.in_flight() > 0, a.last_used_ms.load(Ordering::Relaxed)))
            .map(|a| a.key.clone());
        if let Some(old) = victim.and_then(|k| agents.remove(&k)) {
            old.conns.retire();
            self.stats.evicted(EvictReason::Lru);
        }
    }

    fn build(&self, key: PoolKey, provider: &Provider, path: Path) -> Result<Agent, ConnectError> {
        let tls_err = |class| move |m: String| ConnectError::new(class, m);
        let upstream_tls = if provider.upstream.is_https() {
            Some(
                self.roots
                    .client_config(provider.upstream_ca.as_ref(), provider.http2)
                    .map_err(tls_err(ErrorClass::UpstreamTls))?,
            )
        } else {
            None
        };
        let proxy = match (path, &provider.proxy) {
            (Path::Proxy, Some(p)) => Some(ProxyHop {
                url: p.url.clone(),
                tls: match p.url.scheme() {
                    ProxyScheme::Https => Some(
                        self.roots
                            .client_config(p.ca.as_ref(), false)
                            .map_err(tls_err(ErrorClass::ProxyTls))?,
                    ),
                    _ => None,
                },
            }),
            _ => None,
        };
        // An http upstream behind an HTTP proxy: the proxy takes absolute-form requests.
        let absolute_form = !provider.upstream.is_https()
            && proxy
                .as_ref()
                .is_some_and(|p| matches!(p.url.scheme(), ProxyScheme::Http | ProxyScheme::Https));
        let authority = provider.upstream.authority();
        let bad_authority = |e: &dyn std::fmt::Display| {
            ConnectError::new(
                ErrorClass::ConnectIo,
                format!("upstream authority {authority:?}: {e}"),
            )
        };
        let target = Target {
            scheme: if provider.upstream.is_https() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            authority: Authority::try_from(authority.as_str()).map_err(|e| bad_authority(&e))?,
            host: HeaderValue::try_from(authority.as_str()).map_err(|e| bad_authority(&e))?,
            absolute_form,
        };
        let connector = Connector::new(
            provider.upstream.clone(),
            upstream_tls,
            proxy,
            provider.timeouts.connect,
            self.observer.clone(),
        )?;
        let conns = ConnSet::new(
            connector,
            target,
            ConnSettings {
                connect_timeout: provider.timeouts.connect,
                idle_timeout: self.settings.idle_timeout,
                max_connecting: self.settings.max_connecting,
                want_h2: provider.http2 && provider.upstream.is_https(),
            },
            self.shards,
        );
        Ok(Agent {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            key,
            conns: Arc::new(conns),
            created: Instant::now(),
            last_used_ms: AtomicU64::new(self.now_ms()),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
        })
    }

    /// Take `agent` out of service after a TLS or HTTP/2 connection error. Only that very
    /// agent: if it was already replaced, the replacement is left alone.
    pub fn mark_unhealthy(&self, agent: &Arc<Agent>) {
        if !agent.healthy.swap(false, Ordering::Relaxed) {
            return;
        }
        self.stats.unhealthy_marks.fetch_add(1, Ordering::Relaxed);
        let mut agents = self.lock();
        if agents
            .get(&agent.key)
            .is_some_and(|a| Arc::ptr_eq(a, agent))
        {
            agents.remove(&agent.key);
            self.stats.evicted(EvictReason::Unhealthy);
        }
        agent.conns.retire();
    }

    /// Drop every agent whose key `keep` rejects (a config change retired it).
    pub fn retain(&self, keep: impl Fn(&PoolKey) -> bool) {
        let mut agents = self.lock();
        agents.retain(|k, a| {
            if keep(k) {
                return true;
            }
            a.conns.retire();
            self.stats.evicted(EvictReason::Config);
            false
        });
    }

    /// Remove agents unused for the TTL and agents past their lifetime.
    pub fn sweep(&self) {
        let now = self.now_ms();
        let ttl = self.settings.agent_ttl.as_millis() as u64;
        let mut agents = self.lock();
        agents.retain(|_, a| {
            let reason = if a.created.elapsed() >= self.settings.max_lifetime {
                EvictReason::Lifetime
            } else if a.in_flight() == 0
                && now.saturating_sub(a.last_used_ms.load(Ordering::Relaxed)) >= ttl
            {
                EvictReason::Ttl
            } else {
                a.conns.reap_idle();
                return true;
            };
            a.conns.retire();
            self.stats.evicted(reason);
            false
        });
    }

    /// Run [`sweep`](Self::sweep) every sweep interval (or half the idle timeout, if that
    /// is shorter, so idle connections close close to on time) until the pool is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = self
            .settings
            .sweep_interval
            .min(self.settings.idle_timeout / 2)
            .max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => return,
                }
            }
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn counts(&self) -> AgentCounts {
        let agents = self.lock();
        let active = agents.values().filter(|a| a.in_flight() > 0).count();
        AgentCounts {
            active,
            idle: agents.len() - active,
        }
    }

    /// Whether `key` currently has an agent (tests, diagnostics).
    pub fn contains(&self, key: &PoolKey) -> bool {
        self.lock().contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use provider_proxy_api::Manifests;

    use super::*;
    use crate::connector::NoObserver;

    fn providers(names: &[&str]) -> Vec<Provider> {
        let mut m = Manifests::default();
        for n in names {
            m.parse_yaml(
                n,
                &format!("apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {n}}}\nspec: {{upstream: \"https://{n}.example\"}}\n"),
            )
            .unwrap();
        }
        let s = m.build_snapshot(1, &Default::default());
        names.iter().map(|n| (*s.providers[*n]).clone()).collect()
    }

    fn pool(settings: PoolSettings) -> Arc<AgentPool> {
        Arc::new(AgentPool::new(
            settings,
            TrustRoots::with_extra(vec![]),
            Arc::new(NoObserver),
        ))
    }

    async fn advance(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_removes_unused_agents_but_never_busy_ones() {
        let pool = pool(PoolSettings::default());
        let [a, b] = <[Provider; 2]>::try_from(providers(&["a", "b"])).unwrap();
        drop(pool.checkout(&a, Path::Direct).unwrap());
        let busy = pool.checkout(&b, Path::Direct).unwrap();
        advance(Duration::from_secs(299)).await;
        pool.sweep();
        assert_eq!(pool.len(), 2, "not expired before the TTL");
        advance(Duration::from_secs(2)).await;
        pool.sweep();
        assert!(
            !pool.contains(&pool.key(&a, Path::Direct)),
            "unused past the TTL"
        );
        assert!(
            pool.contains(&pool.key(&b, Path::Direct)),
            "an agent with a request in flight stays"
        );
        assert_eq!(pool.stats().evictions(EvictReason::Ttl), 1);
        drop(busy);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_runs_on_its_interval() {
        let pool = pool(PoolSettings {
            agent_ttl: Duration::from_secs(70),
            sweep_interval: Duration::from_secs(30),
            ..PoolSettings::default()
        });
        let sweeper = pool.spawn_sweeper();
        let [a] = <[Provider; 1]>::try_from(providers(&["a"])).unwrap();
        drop(pool.checkout(&a, Path::Direct).unwrap());
        for _ in 0..2 {
            advance(Duration::from_secs(30)).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(
            pool.len(),
            1,
            "60 s unused is not yet over the 70 s TTL at the 60 s sweep"
        );
        advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert!(pool.is_empty(), "the 90 s sweep removed it");
        sweeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn hard_lifetime_replaces_even_a_busy_agent() {
        let pool = pool(PoolSettings {
            max_lifetime: Duration::from_secs(600),
            ..PoolSettings::default()
        });
        let [a] = <[Provider; 1]>::try_from(providers(&["a"])).unwrap();
        let first = pool.checkout(&a, Path::Direct).unwrap();
        let first_id = first.agent().id();
        for _ in 0..5 {
            advance(Duration::from_secs(100)).await;
            let l = pool.checkout(&a, Path::Direct).unwrap();
            assert_eq!(l.agent().id(), first_id, "reused within its lifetime");
        }
        advance(Duration::from_secs(101)).await;
        let next = pool.checkout(&a, Path::Direct).unwrap();
        assert_ne!(
            next.agent().id(),
            first_id,
            "past its lifetime it takes no new requests"
        );
        // The old agent still serves what it already had.
        assert_eq!(first.agent().in_flight(), 1);
        assert_eq!(pool.stats().evictions(EvictReason::Lifetime), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lru_evicts_the_least_recently_used_idle_agent() {
        let pool = pool(PoolSettings {
            max_agents: 2,
            ..PoolSettings::default()
        });
        let [a, b, c] = <[Provider; 3]>::try_from(providers(&["a", "b", "c"])).unwrap();
        let busy_a = pool.checkout(&a, Path::Direct).unwrap();
        advance(Duration::from_secs(1)).await;
        drop(pool.checkout(&b, Path::Direct).unwrap());
        advance(Duration::from_secs(1)).await;
        // a is older but busy: b (idle) goes.
        drop(pool.checkout(&c, Path::Direct).unwrap());
        assert!(pool.contains(&pool.key(&a, Path::Direct)));
        assert!(!pool.contains(&pool.key(&b, Path::Direct)));
        assert_eq!(pool.stats().evictions(EvictReason::Lru), 1);
        drop(busy_a);
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_marks_only_that_agent() {
        let pool = pool(PoolSettings::default());
        let [a] = <[Provider; 1]>::try_from(providers(&["a"])).unwrap();
        let old = pool.checkout(&a, Path::Direct).unwrap();
        pool.mark_unhealthy(old.agent());
        let fresh = pool.checkout(&a, Path::Direct).unwrap();
        assert_ne!(fresh.agent().id(), old.agent().id());
        // A late error from the old agent does not harm its replacement.
        pool.mark_unhealthy(old.agent());
        let again = pool.checkout(&a, Path::Direct).unwrap();
        assert_eq!(again.agent().id(), fresh.agent().id());
        assert_eq!(pool.stats().unhealthy_marks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn keys_separate_credentials_without_holding_them() {
        let mut m = Manifests::default();
        m.parse_yaml(
            "t",
            "apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {name: a}\nspec: {upstream: \"https://x.example\", proxy: {url: \"http://alice:pw1@p:1\"}}\n---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {name: b}\nspec: {upstream: \"https://x.example\", proxy: {url: \"http://bob:pw2@p:1\"}}\n",
        )
        .unwrap();
        let s = m.build_snapshot(1, &Default::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let pool = pool(PoolSettings::default());
        let (ka, kb) = (
            pool.key(&s.providers["a"], Path::Proxy),
            pool.key(&s.providers["b"], Path::Proxy),
        );
        assert_ne!(ka, kb);
        assert_eq!(
            pool.key(&s.providers["a"], Path::Direct),
            pool.key(&s.providers["b"], Path::Direct)
        );
        let shown = format!("{ka:?}");
        assert!(
            !shown.contains("pw1") && !shown.contains("alice"),
            "{shown}"
        );
    }
}
