//! The controller and the push, end to end: fake API server (real kube client and real
//! kubectl talk to it), controller in-process, sidecars in-process, real Squid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use provider_proxy_controller::{ControllerSettings, RunningController};
use provider_proxy_dataplane::snapshot_client::{SnapshotClient, SnapshotClientSettings};
use provider_proxy_dataplane::{PoolSettings, TrustRoots};
use provider_proxy_fake_apiserver::{FakeApiServer, RecordedRequest, TokenReviewAnswer};
use provider_proxy_testkit::{Squid, SquidOptions, TestPki, Upstream, UpstreamOptions};
use serde_json::Value;

use crate::helm::{ApiCall, CONTROLLER_API_CALLS, DEFAULT_LEASE, NAMESPACE, Scope};
use crate::support::*;

const AUDIENCE: &str = "provider-proxy";

/// The controller's own bearer token (its ServiceAccount's, in a cluster). Everyone else
/// connects as the kubeconfig's user (kubectl sends this plain-HTTP server no token at all),
/// so the fake's recorded requests tell the controller's API calls from the others the way
/// RBAC does: by who sends them.
const CONTROLLER_TOKEN: &str = "controller-serviceaccount-token";

pub(crate) struct Cluster {
    pub(crate) api: FakeApiServer,
    dir: tempfile::TempDir,
    pub(crate) kubeconfig: PathBuf,
}

impl Cluster {
    pub(crate) async fn start() -> Self {
        let api = FakeApiServer::start().await;
        let crd = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crd/providerproxy.yaml"
        ))
        .unwrap();
        api.register_crd_yaml(&crd).unwrap();
        api.set_token_review(|req| {
            let sa = |ns: &str| {
                TokenReviewAnswer::authenticated(
                    &format!("system:serviceaccount:{ns}:app"),
                    &["system:serviceaccounts"],
                )
                .with_audiences(&[AUDIENCE])
            };
            if !req.audiences.iter().any(|a| a == AUDIENCE) {
                return TokenReviewAnswer::unauthenticated("audience not requested");
            }
            match req.token.as_str() {
                "token-ai" => sa("ai"),
                "token-other" => sa("other"),
                "token-wrong-audience" => {
                    TokenReviewAnswer::authenticated("system:serviceaccount:ai:app", &[])
                        .with_audiences(&["vault"])
                }
                "token-user" => TokenReviewAnswer::authenticated("alice@example.com", &[])
                    .with_audiences(&[AUDIENCE]),
                _ => TokenReviewAnswer::unauthenticated("invalid bearer token"),
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Cluster {
            api,
            dir,
            kubeconfig,
        }
    }

    /// A client with the controller's credentials ([`CONTROLLER_TOKEN`]).
    fn controller_client(&self) -> kube::Client {
        let mut config = self.api.kube_config();
        config.auth_info.token = Some(CONTROLLER_TOKEN.to_owned().into());
        kube::Client::try_from(config).unwrap()
    }

    /// Run real kubectl against the fake API server.
    fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .output()
            .expect("kubectl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    #[track_caller]
    pub(crate) fn apply(&self, path: &Path) {
        let (ok, out) = self.kubectl(&["apply", "--validate=false", "-f", path.to_str().unwrap()]);
        assert!(ok, "kubectl apply failed: {out}");
    }

    fn write(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    }

    fn pp(&self, ns: &str, name: &str) -> Option<Value> {
        self.api.get_json(
            "providerproxy.dev",
            "v1alpha1",
            "providerproxies",
            Some(ns),
            name,
        )
    }

    /// Wait until `ns/name`'s Ready condition has `reason`; returns the object.
    pub(crate) async fn wait_ready_reason(&self, ns: &str, name: &str, reason: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let obj = self.pp(ns, name);
            let ready = obj
                .as_ref()
                .and_then(|o| o["status"]["conditions"].as_array().cloned())
                .and_then(|cs| cs.into_iter().find(|c| c["type"] == "Ready"));
            if let Some(c) = &ready
                && c["reason"] == reason
            {
                return obj.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{ns}/{name} never reached reason {reason}; last: {obj:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) async fn start_controller(cluster: &Cluster, pki: &TestPki) -> RunningController {
    start_controller_with(cluster, pki, "controller-0", Duration::from_secs(15), None).await
}

async fn start_controller_with(
    cluster: &Cluster,
    pki: &TestPki,
    identity: &str,
    lease_duration: Duration,
    tls: Option<(PathBuf, PathBuf)>,
) -> RunningController {
    provider_proxy_controller::start(
        cluster.controller_client(),
        ControllerSettings {
            admin: "127.0.0.1:0".parse().unwrap(),
            snapshot_listen: "127.0.0.1:0".parse().unwrap(),
            watch_namespaces: vec![],
            probe_interval: Duration::ZERO,
            probe_concurrency: 4,
            leader_election: true,
            lease_duration,
            lease_name: "provider-proxy-controller".into(),
            lease_namespace: "provider-proxy".into(),
            identity: identity.into(),
            token_audience: AUDIENCE.into(),
            tls,
            defaults: quick_timeouts(),
            log_level: Default::default(),
        },
        TrustRoots::with_extra(vec![pki.ca_der()]),
    )
    .await
    .expect("controller starts")
}

/// The example manifests, pointed at the test's upstream and Squid.
fn examples(upstream: &Upstream, squid: &Squid, user: &str, password: &str, ns: &str) -> String {
    let ex = |f: &str| {
        std::fs::read_to_string(format!(
            "{}/../deploy/examples/{f}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let yaml = ex("10-proxy-credentials.yaml") + "---\n" + &ex("20-providers.yaml");
    yaml.replace("https://api.anthropic.com", &upstream.base_url())
        .replace("https://api.openai.com", &upstream.base_url())
        .replace(
            "https://generativelanguage.googleapis.com",
            &upstream.base_url(),
        )
        .replace(
            "http://proxy.corp.example:3128",
            &format!("http://127.0.0.1:{}", squid.http_port()),
        )
        .replace(
            "socks5h://socks.sg.corp.example:1080",
            &format!("http://127.0.0.1:{}", squid.http_port()),
        )
        .replace("username: ai-gateway", &format!("username: {user}"))
        .replace(
            "password: change-me\n",
            &format!("password: \"{password}\"\n"),
        )
        .replace("username: sg-egress", &format!("username: {user}"))
        .replace(
            "password: change-me-too",
            &format!("password: \"{password}\""),
        )
        .replace("namespace: ai", &format!("namespace: {ns}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reports_status_probes_and_reacts_to_secrets() {
    let pki = pki();
    let cluster = Cluster::start().await;
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let squid = Squid::start(SquidOptions {
        users: vec![("alice".into(), PASSWORD.into())],
        https: None,
    });
    let controller = start_controller(&cluster, &pki).await;

    let good = cluster.write(
        "good.yaml",
        &examples(&upstream, &squid, "alice", PASSWORD, "ai"),
    );
    cluster.apply(&good);
    let pp = cluster.wait_ready_reason("ai", "anthropic", "Ready").await;
    // Ready once its watches listed and every provider reconciled (the chart probes this).
    wait_ready(&controller).await;
    let status = &pp["status"];
    assert_eq!(status["observedGeneration"], pp["metadata"]["generation"]);
    assert_eq!(status["lastProbe"]["success"], true, "{status:#}");
    assert_eq!(status["lastProbe"]["usedProxy"], true);
    assert_eq!(status["lastProbe"]["httpStatus"], 200);
    assert_eq!(
        status["proxy"],
        format!("http://alice:***@127.0.0.1:{}", squid.http_port())
    );
    assert!(
        upstream.total_requests() >= 1,
        "the probe reached the upstream"
    );

    // `provider-proxy check NAME -n NS` runs the same probe against the cluster.
    let (ca, _, _) = pki.write_to(cluster.dir.path());
    let out = Command::new(crate::hygiene::binary())
        .args(["check", "anthropic", "-n", "ai", "--json", "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rows[0]["provider"], "anthropic");
    assert_eq!(rows[0]["success"], true);
    assert_eq!(rows[0]["usedProxy"], true);
    assert_eq!(
        rows[0]["proxy"],
        format!("http://alice:***@127.0.0.1:{}", squid.http_port())
    );

    // `kubectl get pp` shows the printer columns.
    let (ok, table) = cluster.kubectl(&["get", "pp", "-n", "ai"]);
    assert!(ok, "{table}");
    for col in ["UPSTREAM", "PROXY", "FALLBACK", "READY", "LAST PROBE"] {
        assert!(table.contains(col), "missing column {col}:\n{table}");
    }
    assert!(table.contains("alice:***@"), "{table}");

    // A wrong password: ProbeFailed with the 407 cause.
    let wrong = cluster.write(
        "wrong.yaml",
        &examples(&upstream, &squid, "alice", "not-the-password", "ai"),
    );
    cluster.apply(&wrong);
    let pp = cluster
        .wait_ready_reason("ai", "anthropic", "ProbeFailed")
        .await;
    let msg = pp["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("proxy_auth") && msg.contains("407"), "{msg}");
    assert_eq!(pp["status"]["lastProbe"]["error"], "proxy_auth");

    // Deleting the Secret: SecretNotFound. Restoring it: Ready again.
    let (ok, out) =
        cluster.kubectl(&["delete", "secret", "corp-proxy", "-n", "ai", "--wait=false"]);
    assert!(ok, "{out}");
    let pp = cluster
        .wait_ready_reason("ai", "anthropic", "SecretNotFound")
        .await;
    assert!(
        pp["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.proxy.credentialsSecretRef: Secret \"corp-proxy\" not found")
    );
    cluster.apply(&good);
    cluster.wait_ready_reason("ai", "anthropic", "Ready").await;

    // An invalid URL is rejected with its field path; the others keep reconciling.
    let bad = cluster.write(
        "bad.yaml",
        "apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {name: broken, namespace: ai}\nspec:\n  upstream: https://api.example\n  proxy: {url: \"ftp://user:hunter2@proxy:21\"}\n",
    );
    cluster.apply(&bad);
    let pp = cluster
        .wait_ready_reason("ai", "broken", "InvalidProxyUrl")
        .await;
    let msg = pp["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("spec.proxy.url: unsupported scheme \"ftp\""),
        "{msg}"
    );
    assert_eq!(pp["status"]["proxy"], "ftp://user:***@proxy:21");
    cluster.wait_ready_reason("ai", "gemini", "Ready").await;

    // Status was written by server-side apply, by one field manager.
    let patches: Vec<_> = cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        .collect();
    assert!(!patches.is_empty());
    for p in &patches {
        assert_eq!(
            p.query_param("fieldManager").as_deref(),
            Some("provider-proxy-controller")
        );
        assert_eq!(p.query_param("force").as_deref(), Some("true"));
        assert!(
            p.content_type
                .as_deref()
                .unwrap_or("")
                .starts_with("application/apply-patch"),
            "{p:?}"
        );
    }

    // Events on transitions; and nothing anywhere carries a password.
    // (An Event follows its status write; give the last one a moment.)
    let wanted = ["Ready", "ProbeFailed", "SecretNotFound", "InvalidProxyUrl"];
    let reasons_now = || -> Vec<String> {
        cluster
            .api
            .list_json("events.k8s.io", "v1", "events", Some("ai"))
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    wait_until(Duration::from_secs(5), "transition events", || {
        let r = reasons_now();
        async move { wanted.iter().all(|w| r.iter().any(|x| x == w)) }
    })
    .await;
    let events = cluster
        .api
        .list_json("events.k8s.io", "v1", "events", Some("ai"));
    // (The spec of "broken" holds the password its author typed; our output must not.)
    let statuses: Vec<Value> = cluster
        .api
        .list_json("providerproxy.dev", "v1alpha1", "providerproxies", None)
        .into_iter()
        .map(|o| o["status"].clone())
        .collect();
    let everything = serde_json::to_string(&(statuses, events)).unwrap();
    for secret in [PASSWORD, "not-the-password", "hunter2"] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked into status or events"
        );
    }
    let metrics = reqwest_get(&format!("http://{}/metrics", controller.admin_addr))
        .await
        .1;
    assert!(
        metrics.contains("provider_proxy_controller_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "provider_proxy_controller_leader 1"),
        "{metrics}"
    );
    // anthropic, openai and gemini Ready; broken not.
    assert!(
        metrics
            .lines()
            .any(|l| l == "provider_proxy_controller_providers{ready=\"true\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "provider_proxy_controller_providers{ready=\"false\"} 1"),
        "{metrics}"
    );
    controller.shutdown().await;
}

/// GET with the test client: (status, body).
async fn reqwest_get(url: &str) -> (StatusCode, String) {
    raw_get(url, None).await
}

pub(crate) async fn raw_get(url: &str, token: Option<&str>) -> (StatusCode, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Full::default()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let status = resp.status();
    // Streams (200) are read for a moment only.
    let body =
        match tokio::time::timeout(Duration::from_millis(500), resp.into_body().collect()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            _ => String::new(),
        };
    (status, body)
}

struct PodSidecar {
    sc: TestSidecar,
    task: tokio::task::JoinHandle<()>,
    cache: PathBuf,
}

async fn start_pod_sidecar(
    pki: &TestPki,
    dir: &Path,
    ns: &str,
    token: &str,
    controller: &str,
) -> PodSidecar {
    let sc = TestSidecar::start(pki, PoolSettings::default()).await;
    let token_file = dir.join(format!("{ns}-token"));
    std::fs::write(&token_file, token).unwrap();
    let cache = dir.join(format!("{ns}-snapshot.json"));
    let client = SnapshotClient::new(
        SnapshotClientSettings {
            controller: controller.to_owned(),
            token_file,
            cache: Some(cache.clone()),
        },
        sc.sidecar.config.clone(),
        &TrustRoots::with_extra(vec![pki.ca_der()]),
    )
    .unwrap();
    client.load_cache();
    let task = tokio::spawn(client.run());
    PodSidecar { sc, task, cache }
}

/// Until the controller's `/readyz` answers 200, at most 5 s.
async fn wait_ready(controller: &RunningController) {
    let admin = controller.admin_addr;
    wait_until(Duration::from_secs(5), "controller /readyz", || async move {
        raw_get(&format!("http://{admin}/readyz"), None).await.0 == StatusCode::OK
    })
    .await;
}

pub(crate) async fn wait_until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    loop {
        if f().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_reaches_sidecars_isolated_by_namespace_and_survives_controller_restart() {
    let pki = pki();
    let cluster = Cluster::start().await;
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let squid = Squid::start(SquidOptions {
        users: vec![
            ("alice".into(), PASSWORD.into()),
            ("bob".into(), "bobs-password".into()),
        ],
        https: None,
    });
    let controller = start_controller(&cluster, &pki).await;
    let url = format!("http://{}", controller.snapshot_addr);
    let a = start_pod_sidecar(&pki, cluster.dir.path(), "ai", "token-ai", &url).await;
    let b = start_pod_sidecar(&pki, cluster.dir.path(), "other", "token-other", &url).await;

    // Authentication and isolation at the snapshot service.
    let snapshots = format!("{url}/v1/snapshots");
    assert_eq!(raw_get(&snapshots, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        raw_get(&snapshots, Some("forged")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        raw_get(&snapshots, Some("token-wrong-audience")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        raw_get(&snapshots, Some("token-user")).await.0,
        StatusCode::FORBIDDEN
    );
    for trick in [
        "?namespace=other",
        "?namespace=*",
        "?namespace=ai&namespace=other",
        "?namespace=ai%2Fother",
    ] {
        let (status, body) = raw_get(&format!("{snapshots}{trick}"), Some("token-ai")).await;
        assert!(
            status == StatusCode::FORBIDDEN || !body.contains("\"namespace\":\"other\""),
            "{trick}: {status} {body}"
        );
    }

    // Path tricks reach nothing: only the exact stream path exists.
    for path in [
        "/v1/snapshots/",
        "/v1/snapshots/other",
        "//v1/snapshots",
        "/v1/snapshots/../snapshots",
        "/v1/namespaces/other/snapshots",
    ] {
        let (status, body) = raw_get(&format!("{url}{path}"), Some("token-ai")).await;
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST,
            "{path}: {status} {body}"
        );
    }

    // kubectl apply → the sidecar in "ai" routes through Squid.
    cluster.apply(&cluster.write(
        "ai.yaml",
        &examples(&upstream, &squid, "alice", PASSWORD, "ai"),
    ));
    wait_until(
        Duration::from_secs(10),
        "the ai sidecar to get anthropic",
        || async { a.sc.get("/anthropic/v1/messages").await.status == StatusCode::OK },
    )
    .await;
    let r = a.sc.get("/anthropic/v1/messages").await;
    r.assert_ok("proxy");
    // The other namespace's sidecar never sees ai's providers.
    let r = b.sc.get("/anthropic/v1/messages").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let cache_b = std::fs::read_to_string(&b.cache).unwrap_or_default();
    assert!(
        !cache_b.contains(PASSWORD) && !cache_b.contains("anthropic"),
        "{cache_b}"
    );

    // Rotating the proxy login: the next request uses the new one, no restart. Measure
    // apply → first request through the new config, over several rotations.
    let mut took = Vec::new();
    for (i, (user, pass)) in [
        ("bob", "bobs-password"),
        ("alice", PASSWORD),
        ("bob", "bobs-password"),
    ]
    .iter()
    .enumerate()
    {
        let before = a.sc.sidecar.config.snapshot().version;
        let started = Instant::now();
        cluster.apply(&cluster.write(
            &format!("rot{i}.yaml"),
            &examples(&upstream, &squid, user, pass, "ai"),
        ));
        wait_until(Duration::from_secs(5), "the rotated snapshot", || async {
            a.sc.sidecar.config.snapshot().version > before
                && a.sc.sidecar.config.snapshot().providers["anthropic"]
                    .proxy
                    .as_ref()
                    .unwrap()
                    .url
                    .credentials()
                    .unwrap()
                    .username
                    == *user
        })
        .await;
        a.sc.get("/anthropic/v1/messages").await.assert_ok("proxy");
        took.push(started.elapsed());
    }
    eprintln!("propagation kubectl apply -> request on new config: {took:?}");
    let cm = raw_get(&format!("http://{}/metrics", controller.admin_addr), None)
        .await
        .1;
    assert!(
        cm.contains("provider_proxy_controller_push_latency_seconds_count"),
        "{cm}"
    );
    assert!(
        cm.lines()
            .any(|l| l == "provider_proxy_controller_connected_sidecars{namespace=\"ai\"} 1"),
        "{cm}"
    );
    assert!(took.iter().all(|t| *t < Duration::from_secs(3)), "{took:?}");
    // Squid saw the other login on the new tunnels (its log names the user).
    a.task.abort();
    a.sc.stop().await;
    let log = {
        squid.wait_tunnel_count(2, Duration::from_secs(5)).await;
        squid.access_log()
    };
    assert!(log.contains(" bob ") && log.contains(" alice "), "{log}");
    let a = start_pod_sidecar(&pki, cluster.dir.path(), "ai", "token-ai", &url).await;
    wait_until(
        Duration::from_secs(5),
        "the restarted sidecar to load",
        || async { a.sc.sidecar.config.is_loaded() },
    )
    .await;

    // The snapshot cache is 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a.cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The Secret deleted while requests run: status says SecretNotFound, the sidecar keeps
    // the last good config and requests keep flowing through the proxy.
    let (ok, out) =
        cluster.kubectl(&["delete", "secret", "corp-proxy", "-n", "ai", "--wait=false"]);
    assert!(ok, "{out}");
    cluster
        .wait_ready_reason("ai", "anthropic", "SecretNotFound")
        .await;
    for _ in 0..5 {
        a.sc.get("/anthropic/v1/messages").await.assert_ok("proxy");
    }

    // Deleting the ProviderProxy makes the route 404.
    let (ok, out) = cluster.kubectl(&["delete", "pp", "openai", "-n", "ai", "--wait=false"]);
    assert!(ok, "{out}");
    wait_until(Duration::from_secs(5), "openai to disappear", || async {
        a.sc.get("/openai/v1/messages").await.status == StatusCode::NOT_FOUND
    })
    .await;

    // The controller dies: both sidecars keep serving their last snapshot.
    controller.shutdown().await;
    a.sc.get("/anthropic/v1/messages").await.assert_ok("proxy");
    assert_eq!(
        b.sc.get("/anthropic/v1/messages").await.status,
        StatusCode::NOT_FOUND
    );
    // A restarted controller resyncs them (it listens on a new port here, so point a
    // fresh sidecar for "other" at it and check a change reaches "ai" via a new client).
    let controller = start_controller(&cluster, &pki).await;
    let url2 = format!("http://{}", controller.snapshot_addr);
    let a2 = start_pod_sidecar(&pki, cluster.dir.path(), "ai", "token-ai", &url2).await;
    // It starts from the pod's cached snapshot, then the restarted controller's first push
    // arrives. That push says anthropic is invalid (its Secret is still gone and this
    // controller never saw it valid); the sidecar keeps its last good config regardless.
    let cached = a2.sc.sidecar.config.snapshot().version;
    wait_until(Duration::from_secs(10), "resync after restart", || async {
        a2.sc.sidecar.config.snapshot().version > cached
    })
    .await;
    a2.sc.get("/anthropic/v1/messages").await.assert_ok("proxy");
    // And its cache says so: a pod restarted now, with no controller to reach, still
    // serves anthropic.
    let a3 = start_pod_sidecar(
        &pki,
        cluster.dir.path(),
        "ai",
        "token-ai",
        "http://127.0.0.1:9",
    )
    .await;
    a3.sc.get("/anthropic/v1/messages").await.assert_ok("proxy");
    a3.task.abort();
    assert_eq!(
        a2.sc.get("/openai/v1/messages").await.status,
        StatusCode::NOT_FOUND
    );
    a.task.abort();
    a2.task.abort();
    b.task.abort();
    controller.shutdown().await;
}

/// Propagation, measured: `kubectl apply` of a changed ProviderProxy → the first request
/// that uses the new config, over many changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_from_kubectl_apply_to_first_request() {
    let pki = pki();
    let cluster = Arc::new(Cluster::start().await);
    let ups = [
        Upstream::start(UpstreamOptions::tls(pki.clone())),
        Upstream::start(UpstreamOptions::tls(pki.clone())),
    ];
    let controller = start_controller(&cluster, &pki).await;
    let url = format!("http://{}", controller.snapshot_addr);
    let pod = start_pod_sidecar(&pki, cluster.dir.path(), "ai", "token-ai", &url).await;
    let manifest = |i: usize| {
        format!(
            "apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: p, namespace: ai}}\nspec:\n  upstream: {}\n",
            ups[i % 2].base_url()
        )
    };
    let mut samples = Vec::new();
    for i in 0..21 {
        if i == 10 {
            // The API server drops every watch and forgets its history: the controller
            // re-lists (410 Gone) and changes keep flowing.
            cluster.api.drop_watches();
            cluster.api.compact();
        }
        let path = cluster.write(&format!("p{i}.yaml"), &manifest(i));
        let before = ups[i % 2].total_requests();
        let started = Instant::now();
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.apply(&path))
            .await
            .unwrap();
        loop {
            let r = pod.sc.get("/p/v1/messages").await;
            if r.status == StatusCode::OK && ups[i % 2].total_requests() > before {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "change {i} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if i == 10 {
            // Not a propagation sample: it includes the watcher's re-list backoff.
            eprintln!(
                "change after dropped watches + 410 re-list arrived in {:?}",
                started.elapsed()
            );
        } else if i > 0 {
            samples.push(started.elapsed());
        }
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "propagation over {} changes (kubectl apply included): p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        p(0.5),
        p(0.99),
        samples.last().unwrap()
    );
    // Reported, not asserted: speed is measured, never a pass/fail timing in a test (each
    // change above is bounded at 10 s so a lost update still fails).
    pod.task.abort();
    controller.shutdown().await;
}

/// Two replicas: one leader writes status, both serve snapshots (here over TLS); when the
/// leader goes, the other takes over within the lease duration and catches up.
/// The leader `a` goes: `b` must take the Lease over (the one the chart's Role names) and
/// reconcile a ProviderProxy applied after. Returns the Lease as the API server has it.
async fn fail_over(
    cluster: &Cluster,
    a: RunningController,
    b: &RunningController,
    upstream: &Upstream,
) -> serde_json::Value {
    a.shutdown().await;
    wait_until(Duration::from_secs(8), "replica b to take over", || async {
        b.metrics.leader.get() == 1
    })
    .await;
    cluster.apply(&cluster.write(
        "second.yaml",
        &provider("second", &upstream.base_url(), None, ""),
    ));
    cluster.wait_ready_reason("ai", "second", "Ready").await;
    let lease = cluster
        .api
        .get_json(
            "coordination.k8s.io",
            "v1",
            "leases",
            Some(NAMESPACE),
            DEFAULT_LEASE,
        )
        .expect("the Lease the chart's Role names");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    lease
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_failover_and_tls_snapshots() {
    let pki = pki();
    let cluster = Cluster::start().await;
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let (_, cert, key) = pki.write_to(cluster.dir.path());
    let lease = Duration::from_secs(2);
    let a = start_controller_with(
        &cluster,
        &pki,
        "replica-a",
        lease,
        Some((cert.clone(), key.clone())),
    )
    .await;
    let leader = |c: &RunningController| {
        let addr = c.admin_addr;
        async move {
            raw_get(&format!("http://{addr}/metrics"), None)
                .await
                .1
                .lines()
                .any(|l| l == "provider_proxy_controller_leader 1")
        }
    };
    wait_until(Duration::from_secs(5), "replica a to lead", || leader(&a)).await;
    let b = start_controller_with(&cluster, &pki, "replica-b", lease, Some((cert, key))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!leader(&b).await, "only one leader");

    cluster.apply(&cluster.write(
        "first.yaml",
        &provider("first", &upstream.base_url(), None, ""),
    ));
    cluster.wait_ready_reason("ai", "first", "Ready").await;

    // The non-leader serves snapshots too, over TLS.
    let pod = start_pod_sidecar(
        &pki,
        cluster.dir.path(),
        "ai",
        "token-ai",
        &format!("https://localhost:{}", b.snapshot_addr.port()),
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "a snapshot over TLS from the non-leader",
        || async { pod.sc.get("/first/v1/messages").await.status == StatusCode::OK },
    )
    .await;

    // The leader goes; b takes over and reconciles what changed meanwhile.
    let lease = fail_over(&cluster, a, &b, &upstream).await;
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    pod.task.abort();
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The controller's API calls, as the API server authorizes them.

/// What the API server's request-info makes of a request, for authorization
/// (`k8s.io/apiserver/pkg/endpoints/request.RequestInfoFactory`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RequestInfo {
    /// Discovery, `/version`, `/openapi`: not a resource.
    NonResource(String),
    Resource(ResourceRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ResourceRequest {
    verb: String,
    /// `""` for core.
    group: String,
    /// `plural`, or `plural/subresource` as RBAC names it.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl ResourceRequest {
    /// The entry of [`CONTROLLER_API_CALLS`] (as the chart renders it with default values:
    /// every namespace watched, the Lease limited to its name in the release namespace)
    /// that allows this request.
    fn granted_by(&self) -> Option<&'static ApiCall> {
        CONTROLLER_API_CALLS.iter().find(|call| {
            call.group == self.group
                && call.resource == self.resource
                && call.verbs.contains(&self.verb.as_str())
                && match call.scope {
                    // Watching all namespaces: a ClusterRole, any namespace or all of them.
                    Scope::Watched => true,
                    Scope::Cluster => self.namespace.is_none(),
                    // create cannot be limited to a name; everything else is.
                    Scope::Own => {
                        self.namespace.as_deref() == Some(NAMESPACE)
                            && (self.verb == "create"
                                || self.name.as_deref() == Some(DEFAULT_LEASE))
                    }
                }
        })
    }
}

/// Method + path (+ `watch` and `fieldSelector`) → verb, group, resource, namespace, name,
/// the way the API server's request-info does it: `/api/v1/...` and
/// `/apis/GROUP/VERSION/...` name resources (anything shorter is discovery), the legacy
/// `/watch/` prefix is a verb, `namespaces/NS/` introduces a namespace unless followed by
/// one of a namespace's own subresources, the third part is a subresource, and a GET
/// without a name is a list, or a watch with `watch=true`.
fn request_info(r: &RecordedRequest) -> RequestInfo {
    let parts: Vec<&str> = r.path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, mut rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return RequestInfo::NonResource(r.path.clone()),
    };
    let mut verb = match r.method.as_str() {
        "POST" => "create",
        "GET" | "HEAD" => "get",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        other => panic!("{other} {}: no verb for this method", r.path),
    };
    if let [special @ ("watch" | "proxy"), tail @ ..] = rest {
        verb = special;
        rest = tail;
    }
    let mut namespace = None;
    if let ["namespaces", ns, tail @ ..] = rest {
        namespace = Some((*ns).to_owned());
        if !tail.is_empty() && !matches!(tail[0], "status" | "finalize") {
            rest = tail;
        }
    }
    let [plural, ..] = rest else {
        panic!("{} {}: no resource in the path", r.method, r.path);
    };
    let mut name = rest.get(1).map(|n| (*n).to_owned());
    let resource = match rest.get(2) {
        Some(sub) if verb != "proxy" => format!("{plural}/{sub}"),
        _ => (*plural).to_owned(),
    };
    if name.is_none() && verb == "get" {
        verb = if r.is_watch() { "watch" } else { "list" };
        // A list or watch of one object by `metadata.name` counts as that name.
        name = r.query_param("fieldSelector").and_then(|fs| {
            fs.split(',').find_map(|term| {
                term.strip_prefix("metadata.name==")
                    .or_else(|| term.strip_prefix("metadata.name="))
                    .map(str::to_owned)
            })
        });
    }
    if name.is_none() && verb == "delete" {
        verb = "deletecollection";
    }
    RequestInfo::Resource(ResourceRequest {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource,
        namespace,
        name,
    })
}

/// Non-resource paths every authenticated identity may GET (the built-in
/// `system:discovery` and `system:public-info-viewer` roles): no RBAC of ours needed.
fn is_discovery(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    matches!(p, "/api" | "/apis" | "/version" | "/openapi")
        || p.starts_with("/api/")
        || p.starts_with("/apis/")
        || p.starts_with("/openapi/")
}

/// Entries of [`CONTROLLER_API_CALLS`] (group, resource, verb) the run below does not
/// exercise, each with the reason. Empty: every grant is used.
const NOT_EXERCISED: &[(&str, &str, &str, &str)] = &[];

/// The chart's RBAC grants exactly [`CONTROLLER_API_CALLS`] (helm.rs); this proves the list
/// is what the controller really calls. Two replicas go through the whole life cycle
/// against the fake API server (leader election and a failover, reconciles, probes, status
/// by server-side apply, an Event per transition and a repeated one, the Secrets watch,
/// TokenReviews for a sidecar's push); every request they sent, as the API server's
/// request-info maps it, must be allowed by the list, and every entry must be used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_makes_exactly_the_api_calls_its_rbac_grants() {
    let pki = pki();
    let cluster = Cluster::start().await;
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let squid = Squid::start(SquidOptions {
        users: vec![("alice".into(), PASSWORD.into())],
        https: None,
    });

    // Two replicas on a short lease: a creates it, renews it; b reads it.
    let lease = Duration::from_secs(2);
    let a = start_controller_with(&cluster, &pki, "replica-a", lease, None).await;
    wait_until(Duration::from_secs(5), "replica a to lead", || async {
        a.metrics.leader.get() == 1
    })
    .await;
    let b = start_controller_with(&cluster, &pki, "replica-b", lease, None).await;

    // Reconcile: Secrets fetched, probes through Squid, status applied, Events.
    let good = cluster.write(
        "good.yaml",
        &examples(&upstream, &squid, "alice", PASSWORD, "ai"),
    );
    cluster.apply(&good);
    cluster.wait_ready_reason("ai", "anthropic", "Ready").await;
    wait_ready(&a).await;

    // A sidecar's push: the controller reviews its token (and a forged one).
    let url = format!("http://{}", a.snapshot_addr);
    assert_eq!(
        raw_get(&format!("{url}/v1/snapshots"), Some("forged"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let pod = start_pod_sidecar(&pki, cluster.dir.path(), "ai", "token-ai", &url).await;
    wait_until(
        Duration::from_secs(10),
        "the ai sidecar to get anthropic",
        || async { pod.sc.get("/anthropic/v1/messages").await.status == StatusCode::OK },
    )
    .await;

    // A failing probe, the Secret deleted (a 404 on its get) and restored: Ready again is
    // the same Event as the first, which the recorder patches into a series.
    cluster.apply(&cluster.write(
        "wrong.yaml",
        &examples(&upstream, &squid, "alice", "not-the-password", "ai"),
    ));
    cluster
        .wait_ready_reason("ai", "anthropic", "ProbeFailed")
        .await;
    let (ok, out) =
        cluster.kubectl(&["delete", "secret", "corp-proxy", "-n", "ai", "--wait=false"]);
    assert!(ok, "{out}");
    cluster
        .wait_ready_reason("ai", "anthropic", "SecretNotFound")
        .await;
    cluster.apply(&good);
    cluster.wait_ready_reason("ai", "anthropic", "Ready").await;
    wait_until(Duration::from_secs(5), "the repeated Ready Event", || {
        let repeated = cluster
            .api
            .list_json("events.k8s.io", "v1", "events", Some("ai"))
            .iter()
            .any(|e| {
                e["reason"] == "Ready"
                    && e["regarding"]["name"] == "anthropic"
                    && e["series"]["count"].as_i64() >= Some(2)
            });
        async move { repeated }
    })
    .await;

    // An invalid spec, and a deleted ProviderProxy leaving the snapshot.
    cluster.apply(&cluster.write(
        "bad.yaml",
        "apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {name: broken, namespace: ai}\nspec:\n  upstream: https://api.example\n  proxy: {url: \"ftp://user:hunter2@proxy:21\"}\n",
    ));
    cluster
        .wait_ready_reason("ai", "broken", "InvalidProxyUrl")
        .await;
    let (ok, out) = cluster.kubectl(&["delete", "pp", "openai", "-n", "ai", "--wait=false"]);
    assert!(ok, "{out}");
    wait_until(
        Duration::from_secs(5),
        "openai to leave the snapshot",
        || async { pod.sc.get("/openai/v1/messages").await.status == StatusCode::NOT_FOUND },
    )
    .await;

    // Failover: a goes, b takes the Lease over and writes status from then on.
    fail_over(&cluster, a, &b, &upstream).await;
    pod.task.abort();
    b.shutdown().await;

    // Every request, sorted by who sent it: the controller's token, or kubectl (the test's
    // only other client of the API server; it names itself in its user-agent).
    let recorded = cluster.api.requests();
    assert!(
        recorded.len() < 20_000,
        "the fake's request log is full: the oldest requests were dropped"
    );
    let header = |r: &RecordedRequest, name: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let (controller, others): (Vec<_>, Vec<_>) = recorded.iter().partition(|r| {
        header(r, "authorization").as_deref() == Some(&format!("Bearer {CONTROLLER_TOKEN}"))
    });
    for r in &others {
        assert!(
            header(r, "user-agent").is_some_and(
                |ua| ua.starts_with("kubectl/") || ua.starts_with("kubectl-dispatcher/")
            ),
            "a request from neither the controller nor kubectl: {} {} {:?}",
            r.method,
            r.path,
            r.headers
        );
    }

    // Each of the controller's requests, allowed by the list.
    let mut calls: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
    let mut used: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    let mut denied = Vec::new();
    let mut non_resource = BTreeSet::new();
    for r in &controller {
        match request_info(r) {
            RequestInfo::NonResource(path) => {
                assert!(
                    r.method == "GET" && is_discovery(&path),
                    "{} {path}: a non-resource URL nothing grants",
                    r.method
                );
                non_resource.insert(path);
            }
            RequestInfo::Resource(req) => {
                // Where, for the report: the Lease by name (its Role names it).
                let scope = match (&req.namespace, &req.name) {
                    (None, _) => "cluster-wide".to_owned(),
                    (Some(ns), Some(name)) if req.group == "coordination.k8s.io" => {
                        format!("{ns}/{name}")
                    }
                    (Some(ns), _) => format!("namespace {ns}"),
                };
                *calls
                    .entry((
                        req.group.clone(),
                        req.resource.clone(),
                        req.verb.clone(),
                        scope,
                    ))
                    .or_default() += 1;
                match req.granted_by() {
                    Some(call) => {
                        let verb = call.verbs.iter().find(|v| **v == req.verb).unwrap();
                        used.insert((call.group, call.resource, verb));
                    }
                    None => denied.push(format!("{} {}?{} -> {req:?}", r.method, r.path, r.query)),
                }
            }
        }
    }
    eprintln!("the controller's API calls (group, resource, verb, where) and how many:");
    for (call, n) in &calls {
        eprintln!("  {call:?} x{n}");
    }
    eprintln!("non-resource: {non_resource:?}");
    assert!(
        denied.is_empty(),
        "the controller made calls CONTROLLER_API_CALLS (and so the chart's RBAC) does not \
         allow:\n{}",
        denied.join("\n")
    );

    // And the other way: every grant was needed.
    let mut unused = Vec::new();
    for call in CONTROLLER_API_CALLS {
        for verb in call.verbs {
            let key = (call.group, call.resource, *verb);
            let excused = NOT_EXERCISED.iter().any(|(g, r, v, _)| (*g, *r, *v) == key);
            assert!(
                !(excused && used.contains(&key)),
                "{key:?} is listed in NOT_EXERCISED but was used: drop it from there"
            );
            if !excused && !used.contains(&key) {
                unused.push(key);
            }
        }
    }
    assert!(
        unused.is_empty(),
        "CONTROLLER_API_CALLS grants calls the controller never made: {unused:?}"
    );
}
