//! The fault matrix: every way establishing the proxy path can fail × fallback on/off,
//! plus failures after the request went out (never retried, never sent twice).

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use provider_proxy_testkit::{
    Behavior, FaultProxy, Microsocks, Squid, SquidOptions, TestPki, Upstream, UpstreamOptions,
    closed_port,
};

use crate::support::*;

struct Cell {
    name: String,
    proxy_url: String,
    extra: String,
    class: &'static str,
}

fn cell(name: &str, proxy_url: String, extra: &str, class: &'static str) -> Cell {
    Cell {
        name: name.to_owned(),
        proxy_url,
        extra: extra.to_owned(),
        class,
    }
}

/// Every proxy type × every way its path can fail × fallback off/on. Each cell asserts
/// the client's status and JSON error, the route, that the upstream got the request
/// exactly once (fallback) or not at all, and the metrics that moved. No cell hangs past
/// its connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_path_failures_with_and_without_fallback() {
    let pki = pki();
    let upstream = std::sync::Arc::new(Upstream::start(UpstreamOptions::tls(pki.clone())));
    let stall = FaultProxy::start(Behavior::Stall);
    let s407 = FaultProxy::start(Behavior::Status(407));
    let s403 = FaultProxy::start(Behavior::Status(403));
    let s502 = FaultProxy::start(Behavior::Status(502));
    let garbage = FaultProxy::start(Behavior::Garbage);
    let reset = FaultProxy::start(Behavior::ResetAfterRequest);
    let micro = Microsocks::start("micro", "right-password");
    // An HTTPS proxy whose certificate no configured CA signed, and one with Basic auth.
    let other_pki = std::sync::Arc::new(TestPki::new());
    let squid_untrusted = Squid::start(SquidOptions {
        users: vec![],
        https: Some(other_pki),
    });
    let squid_auth = Squid::start(SquidOptions {
        users: vec![("alice".into(), "right-password".into())],
        https: Some(pki.clone()),
    });
    let closed = closed_port();
    let ca = "    caSecretRef: {name: proxy-ca}\n";
    let wrong = "    credentialsSecretRef: {name: wrong-login}\n";
    let mut cells = Vec::new();
    for scheme in ["http", "https", "socks5", "socks5h", "socks4", "socks4a"] {
        let extra = if scheme == "https" { ca } else { "" };
        cells.push(cell(
            &format!("{scheme}-refused"),
            format!("{scheme}://127.0.0.1:{closed}"),
            extra,
            "refused",
        ));
        cells.push(cell(
            &format!("{scheme}-dns"),
            format!("{scheme}://no-such-proxy.invalid:3128"),
            extra,
            "dns",
        ));
        cells.push(cell(
            &format!("{scheme}-stall"),
            format!("{scheme}://127.0.0.1:{}", stall.port()),
            extra,
            "connect_timeout",
        ));
        let garbage_class = if scheme == "https" {
            "proxy_tls"
        } else {
            "proxy_protocol"
        };
        cells.push(cell(
            &format!("{scheme}-garbage"),
            format!("{scheme}://127.0.0.1:{}", garbage.port()),
            extra,
            garbage_class,
        ));
    }
    cells.extend([
        cell(
            "http-auth407",
            format!("http://127.0.0.1:{}", s407.port()),
            "",
            "proxy_auth",
        ),
        cell(
            "http-forbidden403",
            format!("http://127.0.0.1:{}", s403.port()),
            "",
            "tunnel_refused",
        ),
        cell(
            "http-bad502",
            format!("http://127.0.0.1:{}", s502.port()),
            "",
            "tunnel_refused",
        ),
        cell(
            "http-reset",
            format!("http://127.0.0.1:{}", reset.port()),
            "",
            "proxy_protocol",
        ),
        cell(
            "https-auth407",
            format!("https://localhost:{}", squid_auth.https_port().unwrap()),
            &format!("{ca}{wrong}"),
            "proxy_auth",
        ),
        cell(
            "https-untrusted",
            format!(
                "https://localhost:{}",
                squid_untrusted.https_port().unwrap()
            ),
            "",
            "proxy_tls",
        ),
        cell(
            "socks5-auth",
            format!("socks5://127.0.0.1:{}", micro.port()),
            wrong,
            "proxy_auth",
        ),
    ]);
    let mut yaml =
        secret("wrong-login", "alice", "wrong-password") + &ca_secret("proxy-ca", &pki.ca_pem());
    for c in &cells {
        for fallback in [false, true] {
            yaml += &format!(
                "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {}-{}, namespace: ai}}\nspec:\n  upstream: {}\n  fallbackToDirect: {fallback}\n  timeouts: {{connect: 1s}}\n  proxy:\n    url: \"{}\"\n{}",
                c.name,
                if fallback { "fb" } else { "nofb" },
                upstream.base_url(),
                c.proxy_url,
                c.extra,
            );
        }
    }
    let sc = std::sync::Arc::new(TestSidecar::with_config(&pki, &yaml).await);
    // Cells run concurrently; each uses its own upstream path for exact counting.
    let mut runs = Vec::new();
    for c in cells {
        let (sc, upstream) = (sc.clone(), upstream.clone());
        let upstream_requests = move |p: &str| upstream.requests(p);
        runs.push(tokio::spawn(async move {
            let path = format!("/v1/messages/{}", c.name);
            // Without fallback: 503 naming provider, masked proxy and cause; nothing sent.
            let name = format!("{}-nofb", c.name);
            let started = Instant::now();
            let r = sc.post(&format!("/{name}{path}"), r#"{"n":1}"#).await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{name} took {:?}",
                started.elapsed()
            );
            assert_eq!(
                r.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{name}: {}",
                r.text
            );
            assert_eq!(r.route.as_deref(), Some("proxy"), "{name}");
            let e = &r.json()["error"];
            assert_eq!(e["type"], "proxy_unavailable", "{name}");
            assert_eq!(e["provider"], name.as_str());
            assert_eq!(e["class"], c.class, "{name}: {}", r.text);
            assert!(
                e["proxy"]
                    .as_str()
                    .unwrap()
                    .starts_with(c.proxy_url.split("://").next().unwrap())
            );
            assert_eq!(
                upstream_requests(&path),
                0,
                "{name}: nothing reached the upstream"
            );

            // With fallback: the request goes direct, exactly once, body intact.
            let name = format!("{}-fb", c.name);
            let r = sc.post(&format!("/{name}{path}"), r#"{"n":1}"#).await;
            r.assert_ok("fallback");
            assert_eq!(r.json()["body_len"], 7, "{name}");
            assert_eq!(upstream_requests(&path), 1, "{name}: sent exactly once");
            (c.name, c.class)
        }));
    }
    let mut done = Vec::new();
    for r in runs {
        done.push(r.await.unwrap());
    }
    let m = sc.metrics().await;
    for (name, class) in done {
        for (what, provider) in [
            ("fallbacks", format!("{name}-fb")),
            ("unavailable", format!("{name}-nofb")),
        ] {
            let series = format!(
                "provider_proxy_{what}_total{{class=\"{class}\",provider=\"{provider}\"}} 1"
            );
            assert!(m.contains(&series), "missing {series}");
        }
        let ok = format!(
            "provider_proxy_requests_total{{protocol=\"h1\",provider=\"{name}-fb\",route=\"fallback\",status_class=\"2xx\"}} 1"
        );
        assert!(m.contains(&ok), "missing {ok}");
    }
}

/// A certificate failure on the upstream is not a proxy-path failure: no fallback, ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_failure_never_falls_back() {
    let pki = pki();
    let untrusted = std::sync::Arc::new(TestPki::new());
    let upstream = Upstream::start(UpstreamOptions::tls(untrusted));
    let proxy = FaultProxy::start(Behavior::Connect { users: vec![] });
    let yaml = provider(
        "p",
        &upstream.base_url(),
        Some(&format!("http://127.0.0.1:{}", proxy.port())),
        "  fallbackToDirect: true\n",
    );
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    let r = sc.get("/p/v1/messages").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(r.json()["error"]["class"], "upstream_tls");
    assert_eq!(r.json()["error"]["type"], "upstream_tls_failed");
    assert_eq!(r.route.as_deref(), Some("proxy"));
    assert_eq!(upstream.total_requests(), 0);
}

/// A proxy that dies mid-response: the client sees a broken stream, nothing is resent,
/// no fallback even though it is enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_dying_mid_stream_is_not_retried() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let proxy = FaultProxy::start(Behavior::ResetAfterBytes(6000));
    let yaml = provider(
        "p",
        &upstream.base_url(),
        Some(&format!("http://127.0.0.1:{}", proxy.port())),
        "  fallbackToDirect: true\n",
    );
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    let req = Request::get(sc.url("/p/v1/sse?events=200&interval_ms=5"))
        .body(Full::default())
        .unwrap();
    let resp = sc.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[ROUTE_HEADER], "proxy");
    let result = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("no hang");
    assert!(
        result.is_err(),
        "the client sees the stream break, not a clean end"
    );
    assert_eq!(upstream.requests("/v1/sse"), 1, "sent exactly once");
    let m = sc.metrics().await;
    assert!(!m.contains("provider_proxy_fallbacks_total{"), "{m}");
    assert!(m.contains("route=\"proxy\",status_class=\"2xx\"} 1"), "{m}");
}
