//! `make demo`: the whole data plane on one machine, no cluster, no internet.
//!
//! Starts a TLS upstream stand-in (an "AI provider" speaking h1 and h2), a real Squid with
//! Basic auth, and the real `provider-proxy sidecar` binary on a demo config; then sends a
//! JSON request and an SSE stream through the proxy, one direct, and one whose proxy is
//! down with fallback enabled, and prints what happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use provider_proxy_testkit::{
    ChildGuard, Squid, SquidOptions, TestPki, Upstream, UpstreamOptions, closed_port, free_port,
};

#[tokio::main]
async fn main() {
    let bin = std::env::var("PROVIDER_PROXY_BIN")
        .unwrap_or_else(|_| "target/debug/provider-proxy".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} not found: run `cargo build -p provider-proxy` first (make demo does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(TestPki::new());
    let (ca, _, _) = pki.write_to(dir.path());
    let upstream = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
    let password = "dem0:p@ss/word";
    let squid = Squid::start(SquidOptions {
        users: vec![("demo".into(), password.into())],
        https: None,
    });
    println!(
        "upstream stand-in   {}  (TLS, h1 + h2)",
        upstream.base_url()
    );
    println!(
        "squid               http://127.0.0.1:{}  (Basic auth, user demo)",
        squid.http_port()
    );

    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let base = upstream.base_url();
    std::fs::write(
        config.join("demo.yaml"),
        format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: squid-login, namespace: demo}}
stringData: {{username: demo, password: "{password}"}}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {{name: anthropic, namespace: demo}}
spec:
  upstream: {base}
  http2: true
  proxy:
    url: http://127.0.0.1:{squid}
    credentialsSecretRef: {{name: squid-login}}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {{name: gemini, namespace: demo}}
spec:
  upstream: {base}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {{name: openai, namespace: demo}}
spec:
  upstream: {base}
  fallbackToDirect: true
  proxy:
    url: http://127.0.0.1:{down}
"#,
            squid = squid.http_port(),
            down = closed_port(),
        ),
    )
    .unwrap();

    let (listen, admin) = (free_port(), free_port());
    let mut child = Command::new(&bin)
        .args(["sidecar", "--config"])
        .arg(&config)
        .args([
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .env("SSL_CERT_FILE", &ca)
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sidecar");
    let stderr = child.stderr.take().unwrap();
    let _sidecar = ChildGuard(child);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("  sidecar | {line}");
        }
    });
    println!(
        "sidecar             http://127.0.0.1:{listen}/<provider>/...  admin http://127.0.0.1:{admin}\n"
    );

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let ready = Instant::now();
    loop {
        let req = Request::get(format!("http://127.0.0.1:{admin}/readyz"))
            .body(Full::default())
            .unwrap();
        if let Ok(r) = client.request(req).await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(10),
            "the sidecar did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut rows = Vec::new();
    for (provider, what) in [
        ("anthropic", "JSON via Squid (h2)"),
        ("gemini", "JSON direct"),
        ("openai", "JSON, proxy down, fallback on"),
    ] {
        let started = Instant::now();
        let req = Request::post(format!("http://127.0.0.1:{listen}/{provider}/v1/messages"))
            .header("content-type", "application/json")
            .header("x-api-key", "sk-demo")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"demo","messages":[]}"#,
            )))
            .unwrap();
        let resp = client.request(req).await.expect("sidecar answers");
        let route = resp
            .headers()
            .get("x-provider-proxy-route")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let version = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|j| j["version"].as_str().map(str::to_owned))
            .unwrap_or_default();
        rows.push((
            what,
            provider,
            status.as_u16(),
            route,
            version,
            started.elapsed(),
        ));
    }

    // SSE through Squid: events arrive as the upstream sends them.
    let started = Instant::now();
    let req = Request::get(format!(
        "http://127.0.0.1:{listen}/anthropic/v1/sse?events=5&interval_ms=200"
    ))
    .body(Full::default())
    .unwrap();
    let resp = client.request(req).await.unwrap();
    let route = resp
        .headers()
        .get("x-provider-proxy-route")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            for line in String::from_utf8_lossy(d)
                .lines()
                .filter(|l| l.starts_with("data:"))
            {
                arrivals.push(format!("{} @{}ms", line, started.elapsed().as_millis()));
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    println!(
        "\n{:<32} {:<10} {:>6} {:<9} {:<9} {:>8}",
        "REQUEST", "PROVIDER", "STATUS", "ROUTE", "UPSTREAM", "LATENCY"
    );
    for (what, provider, status, route, version, took) in &rows {
        println!(
            "{what:<32} {provider:<10} {status:>6} {route:<9} {version:<9} {:>6}ms",
            took.as_millis()
        );
    }
    println!("\nSSE via {route} (5 events, 200 ms apart, streamed as they come):");
    for a in &arrivals {
        println!("  {a}");
    }
    let req = Request::get(format!("http://127.0.0.1:{admin}/metrics"))
        .body(Full::default())
        .unwrap();
    let metrics = client
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    println!("\nselected metrics (http://127.0.0.1:{admin}/metrics):");
    for line in String::from_utf8_lossy(&metrics).lines().filter(|l| {
        l.starts_with("provider_proxy_requests_total")
            || l.starts_with("provider_proxy_fallbacks_total")
            || l.starts_with("provider_proxy_pool_")
    }) {
        println!("  {line}");
    }
    let leaked = String::from_utf8_lossy(&metrics).contains(password);
    println!(
        "\nproxy password in /metrics: {}",
        if leaked { "YES (bug!)" } else { "no" }
    );
    drop(squid);
}
