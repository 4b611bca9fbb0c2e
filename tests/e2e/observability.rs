//! Metrics move by exactly what happened, stay low-cardinality, and carry no secret.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use http::StatusCode;
use provider_proxy_testkit::{Behavior, FaultProxy, Upstream, UpstreamOptions};

use crate::support::*;

/// `name{labels}` → value, from the Prometheus text format.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_what_happened() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
    let tunnel = FaultProxy::start(Behavior::Connect {
        users: vec![("user".into(), PASSWORD.into())],
    });
    let refuses = FaultProxy::start(Behavior::Status(407));
    let base = upstream.base_url();
    let yaml = secret("login", "user", PASSWORD)
        + &format!(
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: h2p, namespace: ai}}\nspec:\n  upstream: {base}\n  http2: true\n  proxy:\n    url: http://127.0.0.1:{}\n    credentialsSecretRef: {{name: login}}\n",
            tunnel.port()
        )
        + &provider(
            "fb",
            &base,
            Some(&format!("http://127.0.0.1:{}", refuses.port())),
            "  fallbackToDirect: true\n",
        )
        + &provider(
            "nofb",
            &base,
            Some(&format!("http://127.0.0.1:{}", refuses.port())),
            "",
        )
        + &provider("direct", &base, None, "");
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    for _ in 0..3 {
        sc.post("/h2p/v1/messages", "{}").await.assert_ok("proxy");
    }
    sc.post("/fb/v1/messages", "{}").await.assert_ok("fallback");
    assert_eq!(
        sc.post("/nofb/v1/messages", "{}").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for _ in 0..2 {
        sc.get("/direct/v1/messages").await.assert_ok("direct");
    }
    let m = parse(&sc.metrics().await);
    let requests = |p: &str, route: &str, class: &str, proto: &str| {
        get(
            &m,
            &format!(
                "provider_proxy_requests_total{{protocol=\"{proto}\",provider=\"{p}\",route=\"{route}\",status_class=\"{class}\"}}"
            ),
        )
    };
    assert_eq!(requests("h2p", "proxy", "2xx", "h2"), 3.0);
    assert_eq!(requests("fb", "fallback", "2xx", "h1"), 1.0);
    assert_eq!(requests("nofb", "proxy", "5xx", "none"), 1.0);
    assert_eq!(requests("direct", "direct", "2xx", "h1"), 2.0);
    assert_eq!(
        get(
            &m,
            "provider_proxy_fallbacks_total{class=\"proxy_auth\",provider=\"fb\"}"
        ),
        1.0,
        "a fallback counts once"
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_proxy_failures_total{class=\"proxy_auth\",provider=\"fb\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_proxy_failures_total{class=\"proxy_auth\",provider=\"nofb\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_unavailable_total{class=\"proxy_auth\",provider=\"nofb\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_unavailable_total{class=\"proxy_auth\",provider=\"fb\"}"
        ),
        0.0
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_request_duration_seconds_count{provider=\"direct\",route=\"direct\"}"
        ),
        2.0
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_response_first_byte_seconds_count{provider=\"h2p\",route=\"proxy\"}"
        ),
        3.0
    );
    assert_eq!(
        get(&m, "provider_proxy_in_flight_requests{provider=\"h2p\"}"),
        0.0
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_upstream_connections_total{path=\"proxy\",result=\"ok\"}"
        ),
        1.0,
        "one tunnel for three h2 requests"
    );
    assert_eq!(
        get(
            &m,
            "provider_proxy_upstream_connections_total{path=\"proxy\",result=\"proxy_auth\"}"
        ),
        2.0
    );
    // h2p: 1 miss + 2 hits; fb: proxy miss + direct miss; nofb shares fb's proxy agent (same
    // upstream, proxy and login): hit; direct shares fb's direct agent: 2 hits.
    assert_eq!(get(&m, "provider_proxy_pool_hits_total"), 5.0);
    assert_eq!(get(&m, "provider_proxy_pool_misses_total"), 3.0);
    assert_eq!(get(&m, "provider_proxy_config_version"), 1.0);
    assert_eq!(get(&m, "provider_proxy_providers{state=\"valid\"}"), 4.0);
    assert_eq!(
        get(
            &m,
            "provider_proxy_connect_stage_duration_seconds_count{path=\"proxy\",stage=\"proxy_handshake\"}"
        ),
        1.0
    );
    assert!(get(&m, "provider_proxy_response_bytes_total{provider=\"h2p\"}") > 0.0);
    assert_eq!(
        get(&m, "provider_proxy_request_bytes_total{provider=\"h2p\"}"),
        6.0
    );

    // Cardinality: random paths and unknown providers add no series.
    let series = |m: &BTreeMap<String, f64>| m.keys().cloned().collect::<BTreeSet<_>>();
    let before = series(&parse(&sc.metrics().await));
    for i in 0..50 {
        sc.get(&format!("/direct/v1/{i}/{}", i * 7919)).await;
        sc.get(&format!("/nope-{i}/v1/models")).await;
    }
    let after = series(&parse(&sc.metrics().await));
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        new.iter().all(|k| k.contains("provider=\"unknown\"")),
        "new series beyond the single unknown-provider one: {new:?}"
    );
    assert!(new.len() <= 1, "{new:?}");

    // No secret in any form.
    let text = sc.metrics().await;
    let config = reqwest(&sc.admin_url("/config")).await;
    for (what, s) in [("metrics", &text), ("config", &config)] {
        for needle in secret_forms("user", PASSWORD) {
            assert!(!s.contains(&needle), "{what} contains {needle:?}");
        }
    }
    assert!(config.contains("user:***@"), "{config}");
}

async fn reqwest(url: &str) -> String {
    use http_body_util::{BodyExt, Full};
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = client
        .request(http::Request::get(url).body(Full::default()).unwrap())
        .await
        .unwrap();
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

/// The password in every form it could leak in: plain, percent-encoded, and inside a
/// Basic authorization value.
pub fn secret_forms(user: &str, password: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let pct: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    vec![
        password.to_owned(),
        pct,
        b64.encode(format!("{user}:{password}")),
        b64.encode(password),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_runtime_only_with_the_admin_token() {
    let pki = pki();
    let sc = TestSidecar::start(&pki, Default::default()).await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let put = |token: Option<&str>| {
        let mut b = http::Request::put(sc.admin_url("/loglevel"));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"debug",
        )))
        .unwrap()
    };
    assert_eq!(
        client.request(put(None)).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client
            .request(put(Some("wrong-token")))
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    // In-process there is no log control installed: authorized, but nothing to change.
    assert_eq!(
        client
            .request(put(Some("test-admin-token")))
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

/// Both binaries, for real: `GET /loglevel` shows the filter in force; `PUT` replaces it
/// at runtime only with the token of `--admin-token-file`, and the new filter takes effect:
/// a broken client connection logs its debug line only after the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_runtime_in_both_binaries() {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use provider_proxy_testkit::{ChildGuard, free_port};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::controller::{Cluster, raw_get, wait_until};
    use crate::hygiene::binary;

    const TOKEN: &str = "a-test-admin-token-0123";
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = dir.path().join("providers.yaml");
    std::fs::write(
        &config,
        provider("p", "https://api.example.invalid", None, ""),
    )
    .unwrap();

    let (sidecar_admin, controller_admin) = (free_port(), free_port());
    let mut sidecar = Command::new(binary());
    sidecar
        .arg("sidecar")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--admin")
        .arg(format!("127.0.0.1:{sidecar_admin}"));
    let mut controller = Command::new(binary());
    controller
        .arg("controller")
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .arg("--admin")
        .arg(format!("127.0.0.1:{controller_admin}"))
        .arg("--snapshot-listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    for (name, mut cmd, admin) in [
        ("sidecar", sidecar, sidecar_admin),
        ("controller", controller, controller_admin),
    ] {
        cmd.arg("--admin-token-file")
            .arg(&token_file)
            .env("RUST_LOG", "warn")
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::null());
        let (process, logs) = ChildGuard::spawn_capturing_stderr(&mut cmd).unwrap();
        let url = format!("http://127.0.0.1:{admin}/loglevel");
        wait_until(Duration::from_secs(20), "admin port up", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", admin))
                .await
                .is_ok()
        })
        .await;
        let (status, body) = raw_get(&url, None).await;
        assert_eq!((status, body.trim()), (StatusCode::OK, "warn"), "{name}");
        // Both binaries log through the bounded queue and say how many lines it dropped.
        let metrics = raw_get(&format!("http://127.0.0.1:{admin}/metrics"), None)
            .await
            .1;
        assert_eq!(
            parse(&metrics).get("provider_proxy_log_lines_dropped_total"),
            Some(&0.0),
            "{name}: {metrics}"
        );
        // Not HTTP: the connection ends with an error, logged at debug level.
        let broken_client = || async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin))
                .await
                .unwrap();
            s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        };
        broken_client().await;

        let put = |token: Option<&'static str>, filter: &'static str| {
            let url = url.clone();
            async move {
                let client: hyper_util::client::legacy::Client<
                    _,
                    http_body_util::Full<bytes::Bytes>,
                > = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http();
                let mut req = http::Request::put(url);
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let req = req
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        filter.as_bytes(),
                    )))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (status, String::from_utf8_lossy(&body).trim().to_owned())
            }
        };
        assert_eq!(
            put(None, "debug").await.0,
            StatusCode::UNAUTHORIZED,
            "{name}"
        );
        assert_eq!(
            put(Some("a-wrong-token-of-length"), "debug").await.0,
            StatusCode::UNAUTHORIZED,
            "{name}"
        );
        let (status, body) = put(Some(TOKEN), "not a [filter").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        let (status, body) = put(Some(TOKEN), "debug").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "debug"), "{name}");
        assert_eq!(raw_get(&url, None).await.1.trim(), "debug", "{name}");
        broken_client().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(process);
        let logs = logs.finish();
        assert!(
            logs.contains("log level changed through the admin port"),
            "{name}: {logs}"
        );
        assert_eq!(
            logs.matches("connection ended with an error").count(),
            1,
            "{name}: the broken connection is logged after the change only: {logs}"
        );
        assert!(!logs.contains(TOKEN), "{name}: the token was logged");
    }
}

/// Every request writes an access-log line; the lines reach stderr from a thread of their
/// own through a bounded queue. With stderr a pipe nobody reads (a stuck container log
/// driver: the pipe fills after 64 KiB, ~130 lines), the one data-plane worker keeps
/// serving; lines past the queue are dropped and counted, and the queued ones all come out
/// once the pipe drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_pipe_never_stalls_requests() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use http_body_util::{BodyExt, Full};
    use provider_proxy_testkit::{ChildGuard, free_port};

    use crate::hygiene::binary;

    const REQUESTS: usize = 3000;
    const QUEUE: usize = 1000;
    let upstream = Upstream::start(UpstreamOptions::plain());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("providers.yaml"),
        provider("ok", &upstream.base_url(), None, ""),
    )
    .unwrap();
    let (listen, admin) = (free_port(), free_port());
    let mut sidecar = ChildGuard(
        Command::new(binary())
            .args(["sidecar", "--config"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env("RUST_LOG", "info")
            .env("LOG_QUEUE_LINES", QUEUE.to_string())
            .env("LOG_FORMAT", "json")
            .env("WORKER_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Held open, not read: the pipe fills and stays full.
    let mut stderr = sidecar.0.stderr.take().unwrap();

    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url = format!("http://127.0.0.1:{listen}/ok/v1/messages");
    let request = || async {
        let req = http::Request::get(&url).body(Full::default()).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
        match resp {
            Ok(Ok(r)) => {
                let status = r.status();
                let _ = r.into_body().collect().await;
                Some(status)
            }
            _ => None,
        }
    };
    let started = Instant::now();
    while request().await != Some(http::StatusCode::OK) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sidecar not up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..REQUESTS {
        let status = request().await;
        assert_eq!(
            status,
            Some(http::StatusCode::OK),
            "request {i} of {REQUESTS} stalled or failed behind a full log pipe"
        );
    }

    // The lines that found the queue full were dropped, and the metric says how many.
    let metrics = reqwest(&format!("http://127.0.0.1:{admin}/metrics")).await;
    let dropped = get(&parse(&metrics), "provider_proxy_log_lines_dropped_total") as usize;
    assert!(
        dropped > 0,
        "nothing dropped with a queue of {QUEUE}: {metrics}"
    );

    // Drain the pipe: the queued lines all arrive.
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let lines = || {
        text.lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains("provider_proxy::access"))
            .count()
    };
    // Every request's line either arrives or is counted as dropped (the first request,
    // which found the sidecar up, makes one more).
    let drained = Instant::now();
    while lines() + dropped <= REQUESTS && drained.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        lines() + dropped > REQUESTS && lines() >= QUEUE,
        "{} access lines arrived and {dropped} were dropped, for {} requests",
        lines(),
        REQUESTS + 1
    );
}
