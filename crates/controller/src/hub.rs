//! The controller's output: one resolved, versioned [`Snapshot`] per namespace, and a
//! channel per namespace that the push service streams to that namespace's sidecars.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use provider_proxy_api::{FieldIssue, Provider, Snapshot};
use tokio::sync::watch;

struct Namespace {
    providers: BTreeMap<String, Result<Arc<Provider>, Vec<FieldIssue>>>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// When the current version was published (push latency).
    published_at: std::time::Instant,
}

/// Per-namespace snapshots. Versions are unique and increasing across all namespaces and
/// across controller restarts (they start from the wall clock in microseconds), so a
/// sidecar can always tell newer from older.
pub struct SnapshotHub {
    namespaces: Mutex<BTreeMap<String, Namespace>>,
    version: AtomicU64,
}

impl Default for SnapshotHub {
    fn default() -> Self {
        Self::new()
    }
}

impl SnapshotHub {
    pub fn new() -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Self {
            namespaces: Mutex::new(BTreeMap::new()),
            version: AtomicU64::new(start),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Namespace>> {
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn namespace<'a>(map: &'a mut BTreeMap<String, Namespace>, ns: &str) -> &'a mut Namespace {
        map.entry(ns.to_owned()).or_insert_with(|| Namespace {
            providers: BTreeMap::new(),
            tx: watch::Sender::new(Arc::new(Snapshot::default())),
            published_at: std::time::Instant::now(),
        })
    }

    /// Record one provider's resolution; publishes a new version if anything changed.
    ///
    /// A provider that was good and turns invalid (its Secret deleted, a typo in an edit)
    /// keeps its last good config in the sidecars: its status says what is wrong, and
    /// running apps lose nothing. Only a provider that was never valid is published as
    /// invalid (and answered 503 with the reason).
    pub fn upsert(
        &self,
        ns: &str,
        name: &str,
        resolution: Result<Provider, Vec<FieldIssue>>,
    ) -> bool {
        let mut map = self.lock();
        let entry = Self::namespace(&mut map, ns);
        if resolution.is_err() && matches!(entry.providers.get(name), Some(Ok(_))) {
            return false;
        }
        let new = resolution.map(Arc::new);
        let unchanged = match (entry.providers.get(name), &new) {
            (Some(Ok(a)), Ok(b)) => same_provider(a, b),
            (Some(Err(a)), Err(b)) => a == b,
            _ => false,
        };
        if unchanged {
            return false;
        }
        entry.providers.insert(name.to_owned(), new);
        self.publish(entry);
        true
    }

    /// Forget a deleted provider.
    pub fn remove(&self, ns: &str, name: &str) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(ns) else {
            return false;
        };
        if entry.providers.remove(name).is_none() {
            return false;
        }
        self.publish(entry);
        true
    }

    /// Drop every provider `keep` rejects (after a re-list, deletions we never saw).
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut map = self.lock();
        for (ns, entry) in map.iter_mut() {
            let before = entry.providers.len();
            entry.providers.retain(|name, _| keep(ns, name));
            if entry.providers.len() != before {
                self.publish(entry);
            }
        }
    }

    fn publish(&self, entry: &mut Namespace) {
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let mut snap = Snapshot {
            version,
            ..Snapshot::default()
        };
        for (name, r) in &entry.providers {
            match r {
                Ok(p) => {
                    snap.providers.insert(name.clone(), p.clone());
                }
                Err(issues) => {
                    snap.invalid.insert(name.clone(), issues.clone());
                }
            }
        }
        entry.published_at = std::time::Instant::now();
        entry.tx.send_replace(Arc::new(snap));
    }

    /// Follow `ns`'s snapshots (the current one first).
    pub fn subscribe(&self, ns: &str) -> watch::Receiver<Arc<Snapshot>> {
        let mut map = self.lock();
        Self::namespace(&mut map, ns).tx.subscribe()
    }

    /// When `version` was published in `ns`, if it is still the current one.
    pub fn published_at(&self, ns: &str, version: u64) -> Option<std::time::Instant> {
        let map = self.lock();
        let entry = map.get(ns)?;
        (entry.tx.borrow().version == version).then_some(entry.published_at)
    }

    pub fn current(&self, ns: &str) -> Arc<Snapshot> {
        self.subscribe(ns).borrow().clone()
    }

    /// Whether `ns/name` was reconciled (valid or not).
    pub fn contains(&self, ns: &str, name: &str) -> bool {
        self.lock()
            .get(ns)
            .is_some_and(|e| e.providers.contains_key(name))
    }

    /// Whether `ns` has been seen at all (a provider was ever reconciled there).
    pub fn provider_names(&self, ns: &str) -> Vec<String> {
        self.lock()
            .get(ns)
            .map(|e| e.providers.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// Providers are compared by what the data plane uses; warnings and probe settings do not
/// change what a sidecar does.
fn same_provider(a: &Provider, b: &Provider) -> bool {
    a.upstream == b.upstream
        && a.proxy == b.proxy
        && a.upstream_ca == b.upstream_ca
        && a.fallback_to_direct == b.fallback_to_direct
        && a.http2 == b.http2
        && a.timeouts == b.timeouts
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_proxy_api::Manifests;

    fn provider(url: &str) -> Provider {
        let mut m = Manifests::default();
        m.parse_yaml(
            "t",
            &format!(
                "apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: a, namespace: ns}}\nspec: {{upstream: \"{url}\"}}\n"
            ),
        )
        .unwrap();
        let s = m.build_snapshot(1, &Default::default());
        (*s.providers["a"]).clone()
    }

    #[test]
    fn versions_increase_and_namespaces_are_separate() {
        let hub = SnapshotHub::new();
        let mut rx = hub.subscribe("a");
        assert!(hub.upsert("a", "p", Ok(provider("https://one.example"))));
        let v1 = rx.borrow_and_update().version;
        assert!(
            !hub.upsert("a", "p", Ok(provider("https://one.example"))),
            "no-op change publishes nothing"
        );
        assert!(!rx.has_changed().unwrap());
        assert!(hub.upsert("a", "p", Ok(provider("https://two.example"))));
        let v2 = rx.borrow_and_update().version;
        assert!(v2 > v1);
        hub.upsert("b", "q", Ok(provider("https://three.example")));
        // Turning invalid keeps the last good config; a never-valid one is published invalid.
        let issue = FieldIssue {
            path: "spec.proxy.credentialsSecretRef".into(),
            reason: provider_proxy_api::Reason::SecretNotFound,
            message: "gone".into(),
        };
        assert!(!hub.upsert("b", "q", Err(vec![issue.clone()])));
        assert!(hub.current("b").providers.contains_key("q"));
        assert!(hub.upsert("b", "new", Err(vec![issue])));
        assert!(hub.current("b").invalid.contains_key("new"));
        assert_eq!(
            hub.current("a").providers.keys().collect::<Vec<_>>(),
            vec!["p"]
        );
        assert_eq!(
            hub.current("b").providers.keys().collect::<Vec<_>>(),
            vec!["q"]
        );
        assert!(hub.remove("a", "p"));
        assert!(hub.current("a").providers.is_empty());
        assert!(hub.current("a").version > v2);
        // A second hub (a restarted controller) starts above the first one's versions.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let hub2 = SnapshotHub::new();
        hub2.upsert("a", "p", Ok(provider("https://one.example")));
        assert!(hub2.current("a").version > hub.current("b").version);
    }
}
