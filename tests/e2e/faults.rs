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
    name: &'static str,
    proxy_url: String,
    extra: String,
    class: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_path_failures_with_and_without_fallback() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let stall = FaultProxy::start(Behavior::Stall);
    let s407 = FaultProxy::start(Behavior::Status(407));
    let s403 = FaultProxy::start(Behavior::Status(403));
    let s502 = FaultProxy::start(Behavior::Status(502));
    let garbage = FaultProxy::start(Behavior::Garbage);
    let reset = FaultProxy::start(Behavior::ResetAfterRequest);
    let micro = Microsocks::start("micro", "right-password");
    // An HTTPS proxy whose certificate no configured CA signed.
    let other_pki = std::sync::Arc::new(TestPki::new());
    let squid_tls = Squid::start(SquidOptions {
        users: vec![],
        https: Some(other_pki),
    });
    let closed = closed_port();
    let cells = vec![
        Cell {
            name: "refused",
            proxy_url: format!("http://127.0.0.1:{closed}"),
            extra: String::new(),
            class: "refused",
        },
        Cell {
            name: "refused-socks",
            proxy_url: format!("socks5://127.0.0.1:{closed}"),
            extra: String::new(),
            class: "refused",
        },
        Cell {
            name: "dns",
            proxy_url: "http://no-such-proxy.invalid:3128".into(),
            extra: String::new(),
            class: "dns",
        },
        Cell {
            name: "stall",
            proxy_url: format!("http://127.0.0.1:{}", stall.port()),
            extra: String::new(),
            class: "connect_timeout",
        },
        Cell {
            name: "auth407",
            proxy_url: format!("http://127.0.0.1:{}", s407.port()),
            extra: String::new(),
            class: "proxy_auth",
        },
        Cell {
            name: "forbidden403",
            proxy_url: format!("http://127.0.0.1:{}", s403.port()),
            extra: String::new(),
            class: "tunnel_refused",
        },
        Cell {
            name: "bad502",
            proxy_url: format!("http://127.0.0.1:{}", s502.port()),
            extra: String::new(),
            class: "tunnel_refused",
        },
        Cell {
            name: "garbage",
            proxy_url: format!("http://127.0.0.1:{}", garbage.port()),
            extra: String::new(),
            class: "proxy_protocol",
        },
        Cell {
            name: "reset",
            proxy_url: format!("http://127.0.0.1:{}", reset.port()),
            extra: String::new(),
            class: "proxy_protocol",
        },
        Cell {
            name: "socksauth",
            proxy_url: format!("socks5://127.0.0.1:{}", micro.port()),
            extra: "    credentialsSecretRef: {name: wrong-login}\n".into(),
            class: "proxy_auth",
        },
        Cell {
            name: "proxytls",
            proxy_url: format!("https://localhost:{}", squid_tls.https_port().unwrap()),
            extra: String::new(),
            class: "proxy_tls",
        },
    ];
    let mut yaml = secret("wrong-login", "micro", "wrong-password");
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
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    for c in &cells {
        // Without fallback: 503 naming provider, masked proxy and cause; nothing sent.
        let before = upstream.total_requests();
        let name = format!("{}-nofb", c.name);
        let started = Instant::now();
        let r = sc.post(&format!("/{name}/v1/messages"), r#"{"n":1}"#).await;
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
            upstream.total_requests(),
            before,
            "{name}: nothing reached the upstream"
        );

        // With fallback: the request goes direct, exactly once, body intact.
        let name = format!("{}-fb", c.name);
        let r = sc.post(&format!("/{name}/v1/messages"), r#"{"n":1}"#).await;
        r.assert_ok("fallback");
        assert_eq!(r.json()["body_len"], 7, "{name}");
        assert_eq!(
            upstream.total_requests(),
            before + 1,
            "{name}: sent exactly once"
        );
    }
    let m = sc.metrics().await;
    assert!(
        m.contains(
            "provider_proxy_fallbacks_total{class=\"proxy_auth\",provider=\"auth407-fb\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "provider_proxy_unavailable_total{class=\"connect_timeout\",provider=\"stall-nofb\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("provider_proxy_requests_total{protocol=\"h1\",provider=\"dns-fb\",route=\"fallback\",status_class=\"2xx\"} 1"), "{m}");
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
