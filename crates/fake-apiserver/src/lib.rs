//! A **test double**: an in-memory fake Kubernetes API server on
//! `http://127.0.0.1:<port>` for tests that need a real `kube::Client` or a real
//! `kubectl` but cannot run a cluster.
//!
//! It is generic over JSON objects, keeps one global resourceVersion counter and
//! a bounded change history, and serves discovery, CRUD, the `/status`
//! subresource, merge / strategic-merge / JSON / apply patches, label and field
//! selectors, paging, watches (with bookmarks and 410 Expired), Table and
//! PartialObjectMetadata output, and TokenReview through a test hook.
//! See the crate README for what it deliberately does not do.
//!
//! ```no_run
//! # async fn demo() {
//! use provider_proxy_fake_apiserver::FakeApiServer;
//! let server = FakeApiServer::start().await;
//! let client = kube::Client::try_from(server.kube_config()).unwrap();
//! # let _ = client;
//! server.shutdown().await;
//! # }
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod errors;
mod patch;
mod proto;
mod resources;
mod schema;
mod select;
mod server;
mod store;
mod table;
mod util;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub use resources::{PrinterColumn, ResourceDef};

use server::Shared;
use store::{State, WriteOpts, present};

/// What the fake got for a `TokenReview`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenReviewRequest {
    /// `spec.token`.
    pub token: String,
    /// `spec.audiences`.
    pub audiences: Vec<String>,
}

/// What the fake answers to a `TokenReview` (becomes its `status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenReviewAnswer {
    /// `status.authenticated`.
    pub authenticated: bool,
    /// `status.user.username`.
    pub username: String,
    /// `status.user.uid`.
    pub uid: String,
    /// `status.user.groups`.
    pub groups: Vec<String>,
    /// `status.user.extra`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// `status.audiences`.
    pub audiences: Vec<String>,
    /// `status.error`.
    pub error: Option<String>,
}

impl TokenReviewAnswer {
    /// An authenticated user with the given groups.
    pub fn authenticated(username: &str, groups: &[&str]) -> TokenReviewAnswer {
        TokenReviewAnswer {
            authenticated: true,
            username: username.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..TokenReviewAnswer::default()
        }
    }

    /// Not authenticated, with an error text.
    pub fn unauthenticated(error: &str) -> TokenReviewAnswer {
        TokenReviewAnswer {
            error: Some(error.to_string()),
            ..TokenReviewAnswer::default()
        }
    }

    /// Sets `status.audiences`.
    pub fn with_audiences(mut self, audiences: &[&str]) -> TokenReviewAnswer {
        self.audiences = audiences.iter().map(|a| a.to_string()).collect();
        self
    }
}

/// One HTTP request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query, e.g. `/api/v1/namespaces/default/secrets`.
    pub path: String,
    /// Raw query string (still percent-encoded), empty if none.
    pub query: String,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// `Accept` header.
    pub accept: Option<String>,
    /// All headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// A decoded query parameter.
    pub fn query_param(&self, key: &str) -> Option<String> {
        util::Query::parse(Some(&self.query))
            .get(key)
            .map(str::to_string)
    }

    /// The body parsed as JSON (or YAML for apply patches), if it parses.
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body)
            .ok()
            .or_else(|| serde_yaml::from_slice(&self.body).ok())
    }

    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// True for `?watch=true|1` requests.
    pub fn is_watch(&self) -> bool {
        util::Query::parse(Some(&self.query)).flag("watch")
    }
}

/// Errors of the fake's own helpers (not API errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The fake API server. Dropping it stops serving; [`FakeApiServer::shutdown`]
/// also waits for the accept loop to end.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url())
            .finish()
    }
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and serves core v1 (namespaces, secrets, configmaps,
    /// serviceaccounts, events), `events.k8s.io/v1` events,
    /// `coordination.k8s.io/v1` leases, `authentication.k8s.io/v1` tokenreviews
    /// and `apiextensions.k8s.io/v1` customresourcedefinitions. The namespaces
    /// `default`, `kube-system`, `kube-public` and `kube-node-lease` exist.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake apiserver: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake apiserver: local address");
        let (events_tx, _) = broadcast::channel(16_384);
        let mut state = State::new(events_tx);
        if let Some(ns_def) = state.find_def("", "v1", "namespaces") {
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let obj = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                state
                    .create(&ns_def, "", obj, &WriteOpts::default())
                    .expect("fake apiserver: seed namespace");
            }
        }
        let default_hook: Arc<server::TokenHook> =
            Arc::new(|_: &TokenReviewRequest| TokenReviewAnswer::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            token_review: Mutex::new(default_hook),
            drop_tx: watch::channel(0).0,
            shutdown_tx: watch::channel(false).0,
            addr,
            open_watches: AtomicUsize::new(0),
            aggregated_discovery: AtomicBool::new(false),
        });
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        FakeApiServer {
            shared,
            task: Some(task),
        }
    }

    /// Adds (or replaces, by group/version/plural) a resource type.
    pub fn register(&self, r: ResourceDef) {
        self.shared.lock().register(r);
    }

    /// Creates (or replaces) the CustomResourceDefinition(s) in a YAML text
    /// (several documents allowed) and registers their served versions with
    /// names, scope, short names, categories, status subresource, printer
    /// columns and selectable fields. Returns the registered definitions.
    pub fn register_crd_yaml(&self, yaml: &str) -> Result<Vec<ResourceDef>, Error> {
        use serde::Deserialize as _;
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = Value::deserialize(doc).map_err(|e| Error(format!("invalid YAML: {e}")))?;
            if v.is_null() {
                continue;
            }
            out.extend(self.register_crd(v)?);
        }
        if out.is_empty() {
            return Err(Error("no CustomResourceDefinition in the YAML".into()));
        }
        Ok(out)
    }

    /// Like [`FakeApiServer::register_crd_yaml`] for one CRD as JSON.
    pub fn register_crd(&self, crd: Value) -> Result<Vec<ResourceDef>, Error> {
        let defs = resources::defs_from_crd(&crd).map_err(Error)?;
        let mut st = self.shared.lock();
        let def = st
            .find_def("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .ok_or_else(|| Error("CRD resource missing".into()))?;
        let name = format!("{}.{}", defs[0].plural, defs[0].group);
        let mut crd = crd;
        if !crd.get("metadata").is_some_and(Value::is_object) {
            crd["metadata"] = serde_json::json!({});
        }
        crd["metadata"]["name"] = Value::String(name.clone());
        let opts = WriteOpts::default();
        let result = match st.get(&def, "", &name).cloned() {
            None => st.create(&def, "", crd, &opts),
            Some(old) => {
                if let Some(rv) = old.pointer("/metadata/resourceVersion") {
                    crd["metadata"]["resourceVersion"] = rv.clone();
                }
                st.update(&def, "", &name, crd, store::Sub::Main, &opts)
            }
        };
        result.map_err(|e| Error(e.message))?;
        Ok(defs)
    }

    /// The resource types currently served.
    pub fn resources(&self) -> Vec<ResourceDef> {
        self.shared.lock().defs.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kubeconfig with one cluster, context (namespace `default`) and user
    /// (token `test-token`), current-context set.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user:\n    token: test-token\n\
             preferences: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`FakeApiServer::kubeconfig_yaml`] to `path` (panics on I/O errors).
    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(path, self.kubeconfig_yaml())
            .unwrap_or_else(|e| panic!("fake apiserver: write kubeconfig {}: {e}", path.display()));
    }

    /// A `kube::Config` for `kube::Client::try_from` (namespace `default`,
    /// bearer token `test-token`).
    pub fn kube_config(&self) -> kube::Config {
        let uri: http::Uri = self.url().parse().expect("fake apiserver: url");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_string();
        config.auth_info.token = Some("test-token".to_string().into());
        config
    }

    /// Sets the TokenReview answer hook (default: unauthenticated).
    pub fn set_token_review(
        &self,
        f: impl Fn(&TokenReviewRequest) -> TokenReviewAnswer + Send + Sync + 'static,
    ) {
        *self
            .shared
            .token_review
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(f);
    }

    /// Whether `/api` and `/apis` answer aggregated discovery
    /// (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`) when the Accept
    /// header prefers it, as a real 1.33 server does. Off by default: then the
    /// legacy `APIVersions`/`APIGroupList` documents are always answered (kubectl
    /// falls back to per-group discovery; kube's `Discovery::run` works, but
    /// `Discovery::run_aggregated` sees no resources).
    pub fn set_aggregated_discovery(&self, on: bool) {
        self.shared.aggregated_discovery.store(on, Ordering::SeqCst);
    }

    /// Closes every open watch stream (clients see the stream end).
    pub fn drop_watches(&self) {
        self.shared.drop_tx.send_modify(|v| *v += 1);
    }

    /// Forgets the change history: every resourceVersion handed out so far is
    /// now too old, so a watch or continue token from before gets 410 Expired.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Every request received so far (the last 20 000), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// One stored object as served at `group/version` (group `""` = core), or
    /// `None`. `namespace` is `None` for cluster-scoped resources.
    pub fn get_json(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.shared.lock();
        let def = st.find_def(group, version, plural)?;
        st.get(&def, namespace.unwrap_or_default(), name)
            .map(|v| present(&def, v))
    }

    /// All stored objects of a resource (one namespace, or all with `None`).
    pub fn list_json(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: Option<&str>,
    ) -> Vec<Value> {
        let st = self.shared.lock();
        let Some(def) = st.find_def(group, version, plural) else {
            return Vec::new();
        };
        st.iter_objects(&def, namespace)
            .map(|(_, v)| present(&def, v))
            .collect()
    }

    /// Creates an object directly (resource found by `apiVersion` + `kind`),
    /// with the same rules as a POST. The error is the `Status` JSON.
    pub fn create_json(&self, obj: Value) -> Result<Value, Value> {
        let mut st = self.shared.lock();
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let Some(def) = st.def_for(api_version, kind) else {
            return Err(errors::ApiError::resource_not_found().to_status());
        };
        let ns = if def.namespaced {
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        st.create(&def, &ns, obj, &WriteOpts::default())
            .map(|v| present(&def, &v))
            .map_err(|e| e.to_status())
    }

    /// Stops serving: closes watches and connections and waits for the accept loop.
    pub async fn shutdown(mut self) {
        let _ = self.shared.shutdown_tx.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.shared.shutdown_tx.send(true);
    }
}
