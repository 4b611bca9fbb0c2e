//! Config faults: corrupt and older pushes, rotation under load.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use provider_proxy_dataplane::snapshot_client::{SnapshotClient, SnapshotClientSettings};
use provider_proxy_dataplane::{PoolSettings, TrustRoots};
use provider_proxy_testkit::{Behavior, FaultProxy, Upstream, UpstreamOptions};

use crate::support::*;

fn wire(version: u64, provider: &str, upstream: &str, proxy: Option<&str>) -> String {
    let proxy = proxy
        .map(|p| format!(",\"proxyUrl\":\"{p}\""))
        .unwrap_or_default();
    format!(
        "{{\"version\":{version},\"namespace\":\"ai\",\"providers\":[{{\"name\":\"{provider}\",\"upstream\":\"{upstream}\"{proxy},\"connectTimeoutMs\":1000,\"headersTimeoutMs\":5000,\"bodyTimeoutMs\":5000}}]}}\n"
    )
}

/// A stand-in controller that streams the given lines 30 ms apart, then holds the stream.
async fn fake_controller(lines: Vec<String>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lines = Arc::new(lines);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let lines = lines.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let lines = lines.clone();
                    async move {
                        let frames = futures_util::stream::unfold(0usize, move |i| {
                            let lines = lines.clone();
                            async move {
                                if i > 0 {
                                    tokio::time::sleep(Duration::from_millis(30)).await;
                                }
                                match lines.get(i) {
                                    Some(l) => Some((
                                        Ok::<_, Infallible>(Frame::data(Bytes::from(l.clone()))),
                                        i + 1,
                                    )),
                                    None => {
                                        tokio::time::sleep(Duration::from_secs(60)).await;
                                        None
                                    }
                                }
                            }
                        });
                        Ok::<_, Infallible>(Response::new(StreamBody::new(frames).boxed()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_older_snapshots_are_rejected_and_counted() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let base = upstream.base_url();
    let addr = fake_controller(vec![
        wire(10, "p", &base, None),
        "{this is not json\n".into(),
        wire(5, "older", &base, None),
        wire(11, "bad", &base, Some("ftp://proxy:21")),
        "{\"version\":12,\"namespace\":\"ai\",\"unexpected\":true}\n".into(),
        wire(13, "r", &base, None),
    ])
    .await;
    let sc = TestSidecar::start(&pki, PoolSettings::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "token").unwrap();
    let client = SnapshotClient::new(
        SnapshotClientSettings {
            controller: format!("http://{addr}"),
            token_file: dir.path().join("token"),
            cache: Some(dir.path().join("cache.json")),
        },
        sc.sidecar.config.clone(),
        &TrustRoots::with_extra(vec![pki.ca_der()]),
    )
    .unwrap();
    let task = tokio::spawn(client.run());
    // p arrives and serves; the bad ones in between change nothing.
    let started = Instant::now();
    while sc.sidecar.config.snapshot().version != 10 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sc.get("/p/v1/messages").await.assert_ok("direct");
    while sc.sidecar.config.snapshot().version != 13 {
        assert_eq!(
            sc.sidecar.config.snapshot().version,
            10,
            "only 13 may replace 10"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sc.get("/r/v1/messages").await.assert_ok("direct");
    assert!(
        sc.metrics()
            .await
            .contains("provider_proxy_config_reload_errors_total 4")
    );
    // The cache holds the last good snapshot, and a restarted sidecar serves it at once.
    let cached = std::fs::read_to_string(dir.path().join("cache.json")).unwrap();
    assert!(cached.contains("\"version\":13"), "{cached}");
    task.abort();
    let sc2 = TestSidecar::start(&pki, PoolSettings::default()).await;
    let offline = SnapshotClient::new(
        SnapshotClientSettings {
            controller: format!("http://127.0.0.1:{}", provider_proxy_testkit::closed_port()),
            token_file: dir.path().join("token"),
            cache: Some(dir.path().join("cache.json")),
        },
        sc2.sidecar.config.clone(),
        &TrustRoots::with_extra(vec![pki.ca_der()]),
    )
    .unwrap();
    offline.load_cache();
    let t2 = tokio::spawn(offline.run());
    sc2.get("/r/v1/messages").await.assert_ok("direct");
    let ready = reqwest_text(&sc2.admin_url("/readyz")).await;
    assert!(ready.starts_with("ready: config version 13"), "{ready}");
    t2.abort();
}

async fn reqwest_text(url: &str) -> String {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = client
        .request(
            http::Request::get(url)
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

/// A password rotated while requests run: none fails, new tunnels use the new login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let proxy = FaultProxy::start(Behavior::Connect {
        users: vec![
            ("alice".into(), "old-pass".into()),
            ("bob".into(), "new-pass".into()),
        ],
    });
    let yaml = |user: &str, pass: &str| {
        secret("login", user, pass)
            + &format!(
                "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: p, namespace: ai}}\nspec:\n  upstream: {}\n  proxy:\n    url: http://127.0.0.1:{}\n    credentialsSecretRef: {{name: login}}\n",
                upstream.base_url(),
                proxy.port()
            )
    };
    let sc = Arc::new(TestSidecar::with_config(&pki, &yaml("alice", "old-pass")).await);
    let ok = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (sc, ok, stop) = (sc.clone(), ok.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = sc.post("/p/v1/messages", "{}").await;
                if r.status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push(r.text);
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sc.apply(&yaml("bob", "new-pass"), 2);
    let at_rotation = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let failures = w.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during rotation: {failures:?}"
        );
    }
    assert!(
        ok.load(Ordering::Relaxed) > at_rotation + 10,
        "traffic kept flowing after the rotation"
    );
    let users = proxy.tunnel_users();
    assert!(
        users.contains(&"alice".to_owned()) && users.contains(&"bob".to_owned()),
        "{users:?}"
    );
    let last = users.last().unwrap();
    assert_eq!(
        last, "bob",
        "tunnels opened after the rotation use the new login: {users:?}"
    );
}
