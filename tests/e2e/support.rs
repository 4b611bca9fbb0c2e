//! Shared set-up: a sidecar running in this process on a given config, and a client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use provider_proxy_api::{Manifests, Snapshot, Timeouts};
use provider_proxy_dataplane::server::AdminToken;
use provider_proxy_dataplane::{PoolSettings, Running, Sidecar, SidecarSettings, TrustRoots};
use provider_proxy_testkit::TestPki;

pub use provider_proxy_dataplane::ROUTE_HEADER;

/// A password with every character that URL handling tends to get wrong.
pub const PASSWORD: &str = "p@ss:w/rd%41!";

pub fn init_tracing() {}

/// Build a snapshot from manifest YAML, with `timeouts` as the defaults.
pub fn snapshot(yaml: &str, version: u64, timeouts: &Timeouts) -> Snapshot {
    let mut m = Manifests::default();
    m.parse_yaml("test.yaml", yaml)
        .expect("test manifests parse");
    let snap = m.build_snapshot(version, timeouts);
    assert!(
        snap.invalid.is_empty(),
        "test config invalid: {:?}",
        snap.invalid
    );
    snap
}

/// Short timeouts so failure tests finish fast.
pub fn quick_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(1500),
        headers: Duration::from_secs(10),
        body: Duration::from_secs(10),
    }
}

pub struct TestSidecar {
    pub sidecar: Sidecar,
    pub running: Option<Running>,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

impl TestSidecar {
    pub async fn start(pki: &TestPki, pool: PoolSettings) -> Self {
        Self::start_with_workers(pki, pool, 0).await
    }

    /// `workers` data-plane threads of its own (0: requests run on the test's runtime).
    pub async fn start_with_workers(pki: &TestPki, pool: PoolSettings, workers: usize) -> Self {
        init_tracing();
        let sidecar = Sidecar::new(
            SidecarSettings {
                listen: "127.0.0.1:0".parse().unwrap(),
                admin: "127.0.0.1:0".parse().unwrap(),
                pool,
                grace: Duration::from_secs(2),
                admin_token: Some(AdminToken::new("test-admin-token").unwrap()),
                workers,
            },
            TrustRoots::with_extra(vec![pki.ca_der()]),
        );
        let running = sidecar.start().await.expect("sidecar starts");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            sidecar,
            running: Some(running),
            client,
        }
    }

    pub async fn with_config(pki: &TestPki, yaml: &str) -> Self {
        let s = Self::start(pki, PoolSettings::default()).await;
        s.apply(yaml, 1);
        s
    }

    /// Stop serving and drop the pool, closing every pooled connection.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub fn apply(&self, yaml: &str, version: u64) {
        self.sidecar
            .config
            .apply(snapshot(yaml, version, &quick_timeouts()));
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.running.as_ref().unwrap().data_addr,
            path
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.running.as_ref().unwrap().admin_addr,
            path
        )
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .expect("sidecar answers within 30 s")
            .expect("request to the sidecar")
    }

    /// GET, whole body, with the route header.
    pub async fn get(&self, path: &str) -> Reply {
        let req = Request::get(self.url(path)).body(Full::default()).unwrap();
        Reply::read(self.send(req).await).await
    }

    pub async fn post(&self, path: &str, body: &'static str) -> Reply {
        let req = Request::post(self.url(path))
            .header("content-type", "application/json")
            .header("x-api-key", "sk-test-key")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        Reply::read(self.send(req).await).await
    }

    pub async fn metrics(&self) -> String {
        let req = Request::get(self.admin_url("/metrics"))
            .body(Full::default())
            .unwrap();
        Reply::read(self.send(req).await).await.text
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub route: Option<String>,
    pub text: String,
}

impl Reply {
    pub async fn read(resp: Response<Incoming>) -> Reply {
        let (parts, body) = resp.into_parts();
        let bytes = tokio::time::timeout(Duration::from_secs(30), body.collect())
            .await
            .expect("body within 30 s")
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Reply {
            status: parts.status,
            route: parts
                .headers
                .get(ROUTE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    #[track_caller]
    pub fn assert_ok(&self, route: &str) {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.text);
        assert_eq!(self.route.as_deref(), Some(route), "body: {}", self.text);
    }
}

pub fn pki() -> Arc<TestPki> {
    Arc::new(TestPki::new())
}

/// A ProviderProxy manifest.
pub fn provider(name: &str, upstream: &str, proxy: Option<&str>, extra: &str) -> String {
    let proxy = proxy
        .map(|p| format!("  proxy:\n    url: \"{p}\"\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {name}, namespace: ai}}\nspec:\n  upstream: {upstream}\n{proxy}{extra}"
    )
}

/// A credentials Secret manifest.
pub fn secret(name: &str, user: &str, pass: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: ai}}\nstringData:\n  username: \"{user}\"\n  password: \"{pass}\"\n"
    )
}

/// A CA Secret manifest.
pub fn ca_secret(name: &str, pem: &str) -> String {
    let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: ai}}\nstringData:\n  ca.crt: |\n{indented}"
    )
}
