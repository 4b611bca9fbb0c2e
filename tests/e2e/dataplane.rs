//! The forwarding path through every proxy type, h1 and h2, against real proxies.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use provider_proxy_dataplane::PoolSettings;
use provider_proxy_testkit::client::{send_h1, send_h1_streaming};
use provider_proxy_testkit::{
    Behavior, Dante, DanteOptions, FaultProxy, Microsocks, Squid, SquidOptions, Upstream,
    UpstreamOptions,
};
use tokio::net::TcpStream;

use crate::support::*;

fn creds(secret: &str) -> String {
    format!("    credentialsSecretRef: {{name: {secret}}}\n")
}

/// Every proxy protocol × h1/h2, through real Squid (HTTP and HTTPS proxy), Dante (SOCKS5
/// with a login, SOCKS4), microsocks (SOCKS5) and the in-repo SOCKS4a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_protocol_h1_and_h2() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
    let base = upstream.base_url();
    let squid = Squid::start(SquidOptions {
        users: vec![("alice".into(), PASSWORD.into())],
        https: Some(pki.clone()),
    });
    let dante = Dante::start(DanteOptions {
        user: Some(("ppsocks".into(), PASSWORD.into())),
    });
    let (dante_user, _) = dante.user().unwrap();
    let dante4 = Dante::start(DanteOptions { user: None });
    let micro = Microsocks::start("micro", PASSWORD);
    let socks4a = FaultProxy::start(Behavior::Socks4a);

    let mut yaml = secret("squid-login", "alice", PASSWORD)
        + &secret("dante-login", &dante_user, PASSWORD)
        + &secret("micro-login", "micro", PASSWORD)
        + &ca_secret("proxy-ca", &pki.ca_pem());
    let with = |name: &str, url: String, proxy_extra: String, h2: bool| {
        let spec_extra = if h2 { "  http2: true\n" } else { "" };
        format!(
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {name}, namespace: ai}}\nspec:\n  upstream: {base}\n  proxy:\n    url: \"{url}\"\n{proxy_extra}{spec_extra}"
        )
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "squid",
            format!("http://127.0.0.1:{}", squid.http_port()),
            creds("squid-login"),
        ),
        (
            "squid-tls",
            format!("https://localhost:{}", squid.https_port().unwrap()),
            creds("squid-login") + "    caSecretRef: {name: proxy-ca}\n",
        ),
        (
            "dante5",
            format!("socks5://127.0.0.1:{}", dante.port()),
            creds("dante-login"),
        ),
        (
            "dante5h",
            format!("socks5h://127.0.0.1:{}", dante.port()),
            creds("dante-login"),
        ),
        (
            "dante4",
            format!("socks4://127.0.0.1:{}", dante4.port()),
            String::new(),
        ),
        (
            "micro",
            format!("socks5://127.0.0.1:{}", micro.port()),
            creds("micro-login"),
        ),
        (
            "socks4a",
            format!("socks4a://127.0.0.1:{}", socks4a.port()),
            String::new(),
        ),
    ];
    for (name, url, extra) in &cases {
        yaml += &with(&format!("{name}-h1"), url.clone(), extra.clone(), false);
        yaml += &with(&format!("{name}-h2"), url.clone(), extra.clone(), true);
    }
    yaml += &provider("direct-h1", &base, None, "");
    yaml += &provider("direct-h2", &base, None, "  http2: true\n");

    let sc = TestSidecar::with_config(&pki, &yaml).await;
    let mut names: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    names.push("direct".into());
    for name in &names {
        for (suffix, version) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
            let provider = format!("{name}-{suffix}");
            let r = sc
                .post(
                    &format!("/{provider}/v1/messages?beta=true"),
                    r#"{"model":"x"}"#,
                )
                .await;
            let route = if name == "direct" { "direct" } else { "proxy" };
            assert_eq!(r.status, StatusCode::OK, "{provider}: {}", r.text);
            assert_eq!(r.route.as_deref(), Some(route), "{provider}");
            let j = r.json();
            assert_eq!(j["version"], version, "{provider}: {j}");
            assert_eq!(j["path"], "/v1/messages", "{provider}");
            assert_eq!(j["query"], "beta=true", "{provider}");
            assert_eq!(j["body_len"], 13, "{provider}");
            assert_eq!(
                j["host"],
                format!("localhost:{}", upstream.port()),
                "{provider}"
            );
        }
    }
    // The API key went through untouched; no proxy credentials leaked upstream.
    let last = upstream.last_request().unwrap();
    assert_eq!(last.header("x-api-key"), Some("sk-test-key"));
    assert!(last.header("proxy-authorization").is_none());
    // Each proxy really carried traffic.
    assert!(
        socks4a
            .socks_targets()
            .iter()
            .any(|t| t.starts_with("localhost")),
        "{:?}",
        socks4a.socks_targets()
    );
    // Squid logs a tunnel when it closes: stop the sidecar, then count them.
    sc.stop().await;
    let n = squid.wait_tunnel_count(4, Duration::from_secs(5)).await;
    assert!(
        n >= 4,
        "tunnels {n}; access log:\n{}\ncache log:\n{}",
        squid.access_log(),
        squid.cache_log()
    );
}

/// An http:// upstream behind an HTTP proxy goes in absolute form with Proxy-Authorization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_through_http_proxy_uses_absolute_form() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::plain());
    let proxy = FaultProxy::start(Behavior::Connect {
        users: vec![("bob".into(), PASSWORD.into())],
    });
    let yaml = secret("login", "bob", PASSWORD)
        + &format!(
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: plain, namespace: ai}}\nspec:\n  upstream: {}\n  proxy:\n    url: http://127.0.0.1:{}\n    credentialsSecretRef: {{name: login}}\n",
            upstream.base_url(),
            proxy.port()
        );
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    for _ in 0..3 {
        sc.get("/plain/v1/models").await.assert_ok("proxy");
    }
    assert_eq!(proxy.tunnels(), 0, "no CONNECT for an http upstream");
    assert!(proxy.forwards() >= 1);
    assert_eq!(upstream.total_requests(), 3);
}

/// SSE events reach the client as the upstream sends them, not at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_through_unbuffered() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
    let squid = Squid::start(SquidOptions::default());
    let yaml = provider(
        "sse",
        &upstream.base_url(),
        Some(&format!("http://127.0.0.1:{}", squid.http_port())),
        "",
    );
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    let req = Request::get(sc.url("/sse/v1/sse?events=5&interval_ms=200"))
        .body(Full::default())
        .unwrap();
    let started = Instant::now();
    let resp = sc.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[ROUTE_HEADER], "proxy");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("stream intact");
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
            arrivals.push(started.elapsed());
        }
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 5, "{text}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(*e, format!("data: {{\"i\":{i}}}"));
    }
    // The first event arrived long before the last was sent (~800 ms later).
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(
        last - first >= Duration::from_millis(500),
        "arrivals {arrivals:?}"
    );
}

/// With worker threads (the binary's default), client connections are dealt round-robin
/// and each worker keeps its own upstream connections, so a request never uses one that
/// another thread drives; a gauge shows each worker's open connections. At shutdown the
/// port stops taking connections at once, and every worker lets its open streams finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_their_own_upstream_connections_and_drain_at_shutdown() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let mut sc = TestSidecar::start_with_workers(&pki, PoolSettings::default(), 2).await;
    sc.apply(&provider("p", &upstream.base_url(), None, ""), 1);
    let addr = sc.running.as_ref().unwrap().data_addr;
    let get = |path: &str| {
        Request::get(path)
            .header("host", addr.to_string())
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    // Six client connections, one after another: three land on each worker.
    for i in 0..6 {
        let io = TcpStream::connect(addr).await.unwrap();
        let (parts, _) = send_h1(io, get("/p/v1/messages")).await.unwrap();
        assert_eq!(parts.status, StatusCode::OK, "request {i}");
    }
    assert_eq!(
        upstream.connections(),
        2,
        "one upstream connection per worker, each reused by its own worker only"
    );

    // Four streams, two on each worker, then shutdown.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let io = TcpStream::connect(addr).await.unwrap();
        let resp = send_h1_streaming(io, get("/p/v1/sse?events=8&interval_ms=100"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        streams.push(tokio::spawn(async move {
            let rest = body.collect().await.expect("stream intact").to_bytes();
            [first, rest].concat()
        }));
    }
    // The metric shows the balance: two open connections on each worker (the six before
    // have closed).
    let want = [
        "provider_proxy_worker_connections{worker=\"1\"} 2",
        "provider_proxy_worker_connections{worker=\"2\"} 2",
    ];
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = sc.metrics().await;
        if want.iter().all(|w| metrics.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in want {
        assert!(metrics.contains(w), "{w} in:\n{metrics}");
    }
    let running = sc.running.take().unwrap();
    let started = Instant::now();
    let stopping = tokio::spawn(running.shutdown());
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "the data port still takes connections after shutdown began"
    );
    for s in streams {
        let text = String::from_utf8(s.await.unwrap()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 8, "every open stream finished whole: {text}");
    }
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the workers finished when their streams did, not at the grace period"
    );
}

/// A client that hangs up mid-stream cancels the upstream request and frees the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_upstream() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let sc = TestSidecar::with_config(&pki, &provider("p", &upstream.base_url(), None, "")).await;
    let req = Request::get(sc.url("/p/v1/sse?events=1000&interval_ms=50"))
        .body(Full::default())
        .unwrap();
    let resp = sc.send(req).await;
    let mut body = resp.into_body();
    let _ = body.frame().await;
    assert!(
        sc.metrics()
            .await
            .contains("provider_proxy_in_flight_requests{provider=\"p\"} 1")
    );
    drop(body);
    let mut gone = false;
    for _ in 0..100 {
        if sc
            .metrics()
            .await
            .contains("provider_proxy_in_flight_requests{provider=\"p\"} 0")
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the in-flight request ended when the client left");
    // The upstream connection was closed, not kept streaming into the void: the next
    // request needs a new connection.
    sc.get("/p/v1/messages").await.assert_ok("direct");
    assert_eq!(upstream.connections(), 2);
}

/// Unknown providers, CONNECT and absolute-form requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_errors_and_no_open_proxy() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let sc = TestSidecar::with_config(
        &pki,
        &(provider("anthropic", &upstream.base_url(), None, "")
            + &provider("openai", &upstream.base_url(), None, "")),
    )
    .await;
    let r = sc.get("/gemini/v1/models").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.json()["error"]["providers"],
        serde_json::json!(["anthropic", "openai"])
    );

    // Absolute-form and CONNECT are refused: the data port is not an open proxy.
    let mut tcp = tokio::net::TcpStream::connect(sc.running.as_ref().unwrap().data_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!(
            "GET {}/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
            upstream.base_url()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let mut tcp = tokio::net::TcpStream::connect(sc.running.as_ref().unwrap().data_addr)
        .await
        .unwrap();
    tcp.write_all(b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n")
        .await
        .unwrap();
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(upstream.total_requests(), 0);
}

/// Standalone mode: files edited while requests run apply within a second; a broken
/// file keeps the last good config; in-flight streams finish on the config they began with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_files_hot_reload() {
    use provider_proxy_dataplane::FileLoader;
    let pki = pki();
    let a = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let b = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("providers.yaml");
    std::fs::write(&file, provider("p", &a.base_url(), None, "")).unwrap();
    let sc = TestSidecar::start(&pki, Default::default()).await;
    let mut loader = FileLoader::new(
        dir.path().to_path_buf(),
        quick_timeouts(),
        sc.sidecar.config.clone(),
    );
    loader.reload().unwrap();
    let watcher = tokio::spawn(loader.watch(Duration::from_millis(100)));
    sc.get("/p/v1/messages").await.assert_ok("direct");
    assert_eq!(a.total_requests(), 1);

    // A stream that starts on the old config.
    let req = Request::get(sc.url("/p/v1/sse?events=10&interval_ms=100"))
        .body(Full::default())
        .unwrap();
    let stream = sc.send(req).await;

    std::fs::write(&file, provider("p", &b.base_url(), None, "")).unwrap();
    let switched = Instant::now();
    loop {
        let r = sc.get("/p/v1/messages").await;
        r.assert_ok("direct");
        if b.total_requests() > 0 {
            break;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(2),
            "change not applied within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = stream
        .into_body()
        .collect()
        .await
        .expect("old stream completes")
        .to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&events).matches("data:").count(),
        10
    );

    // A broken file: reported, last good config stays.
    std::fs::write(
        &file,
        "apiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nspec: [",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    sc.get("/p/v1/messages").await.assert_ok("direct");
    assert!(
        sc.metrics()
            .await
            .contains("provider_proxy_config_reload_errors_total 1")
    );
    // A provider made invalid keeps its last good config.
    std::fs::write(
        &file,
        provider("p", &b.base_url(), Some("ftp://nope:1"), ""),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    sc.get("/p/v1/messages").await.assert_ok("direct");
    watcher.abort();
}

/// Headers and body timeouts give clean errors, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_body_timeouts() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let sc = TestSidecar::with_config(
        &pki,
        &provider(
            "slow",
            &upstream.base_url(),
            None,
            "  timeouts: {headers: 300ms, body: 300ms}\n",
        ),
    )
    .await;
    let started = Instant::now();
    let r = sc.get("/slow/v1/stall-headers").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text);
    assert_eq!(r.json()["error"]["class"], "headers_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));

    let req = Request::get(sc.url("/slow/v1/stall-body"))
        .body(Full::default())
        .unwrap();
    let resp = sc.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let started = Instant::now();
    let collected = resp.into_body().collect().await;
    assert!(
        collected.is_err(),
        "a stalled body ends in an error, not a clean end"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A client that hangs up before the response headers: the request leaves the in-flight
/// gauge (found by the soak: the gauge used to stay up for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_before_headers_leaves_no_in_flight_request() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let sc = TestSidecar::with_config(&pki, &provider("p", &upstream.base_url(), None, "")).await;
    for _ in 0..3 {
        let req = Request::get(sc.url("/p/v1/stall-headers"))
            .body(Full::default())
            .unwrap();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(200), sc.client.request(req)).await;
        assert!(gave_up.is_err(), "the upstream never answers");
    }
    let mut zero = false;
    for _ in 0..100 {
        if sc
            .metrics()
            .await
            .contains("provider_proxy_in_flight_requests{provider=\"p\"} 0")
        {
            zero = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(zero, "{}", sc.metrics().await);
}
