//! The agent pool, counted at real proxies and upstreams.

use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use provider_proxy_dataplane::PoolSettings;
use provider_proxy_testkit::{Behavior, FaultProxy, TestPki, Upstream, UpstreamOptions};

use crate::support::*;

fn via_proxy(
    name: &str,
    upstream: &Upstream,
    proxy: &FaultProxy,
    secret: Option<&str>,
    extra: &str,
) -> String {
    let creds = secret
        .map(|s| format!("    credentialsSecretRef: {{name: {s}}}\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {name}, namespace: ai}}\nspec:\n  upstream: {}\n{extra}  proxy:\n    url: http://127.0.0.1:{}\n{creds}",
        upstream.base_url(),
        proxy.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_tunnel() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let proxy = FaultProxy::start(Behavior::Connect {
        users: vec![("u".into(), PASSWORD.into())],
    });
    let yaml =
        secret("login", "u", PASSWORD) + &via_proxy("p", &upstream, &proxy, Some("login"), "");
    let sc = TestSidecar::with_config(&pki, &yaml).await;
    for _ in 0..100 {
        sc.post("/p/v1/messages", "{}").await.assert_ok("proxy");
    }
    assert_eq!(proxy.tunnels(), 1, "100 sequential requests, one tunnel");
    assert_eq!(upstream.connections(), 1);
    let m = sc.metrics().await;
    assert!(m.contains("provider_proxy_pool_hits_total 99"), "{m}");
    assert!(m.contains("provider_proxy_pool_misses_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_h2_requests_multiplex_on_one_connection() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
    let proxy = FaultProxy::start(Behavior::Connect { users: vec![] });
    let yaml = via_proxy("p", &upstream, &proxy, None, "  http2: true\n");
    let sc = std::sync::Arc::new(TestSidecar::with_config(&pki, &yaml).await);
    // Cold: the burst arrives before any connection exists. Until the upstream has
    // answered h1 to the h2 offer, one connect serves them all.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let sc = sc.clone();
        tasks.push(tokio::spawn(async move {
            sc.get("/p/v1/sse?events=3&interval_ms=20").await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        r.assert_ok("proxy");
        assert_eq!(r.text.matches("data:").count(), 3);
    }
    let r = sc.get("/p/v1/messages").await;
    r.assert_ok("proxy");
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(
        upstream.connections(),
        1,
        "50 concurrent h2 streams on one connection"
    );
    assert_eq!(proxy.tunnels(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_slow_proxy_never_becomes_a_connect_storm() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let proxy = FaultProxy::start(Behavior::SlowConnect(Duration::from_millis(150)));
    let settings = PoolSettings {
        max_connecting: 4,
        ..PoolSettings::default()
    };
    let sc = std::sync::Arc::new(TestSidecar::start(&pki, settings).await);
    sc.apply(&via_proxy("p", &upstream, &proxy, None, ""), 1);
    for wave in 0..2 {
        let tasks: Vec<_> = (0..24)
            .map(|_| {
                let sc = sc.clone();
                tokio::spawn(async move { sc.get("/p/v1/messages").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().assert_ok("proxy");
        }
        assert!(
            proxy.peak_handshakes() <= 4,
            "wave {wave}: {} handshakes at once; at most max_connecting",
            proxy.peak_handshakes()
        );
    }
    // A pool that connects for every request that finds nothing idle opens 24 tunnels in
    // the first wave alone. Here requests wait for the first connections, which serve
    // them one after another; only a few more connects start before everyone is served.
    assert!(
        proxy.connections() <= 16,
        "{} tunnels for 2 waves of 24 requests",
        proxy.connections()
    );
    assert_eq!(upstream.total_requests(), 48, "every request exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_logins_never_share_a_tunnel_and_rotation_applies_at_once() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let proxy = FaultProxy::start(Behavior::Connect {
        users: vec![
            ("alice".into(), "a-pass".into()),
            ("bob".into(), "b-pass".into()),
            ("bob".into(), "b-new".into()),
        ],
    });
    let yaml = |bob_pass: &str| {
        secret("alice-login", "alice", "a-pass")
            + &secret("bob-login", "bob", bob_pass)
            + &via_proxy("a", &upstream, &proxy, Some("alice-login"), "")
            + &via_proxy("b", &upstream, &proxy, Some("bob-login"), "")
    };
    let sc = TestSidecar::with_config(&pki, &yaml("b-pass")).await;
    for _ in 0..5 {
        sc.get("/a/v1/messages").await.assert_ok("proxy");
        sc.get("/b/v1/messages").await.assert_ok("proxy");
    }
    let mut users = proxy.tunnel_users();
    users.sort();
    assert_eq!(users, vec!["alice", "bob"], "one tunnel per login");

    // Rotate bob's password: the very next request opens a tunnel with the new one.
    sc.apply(&yaml("b-new"), 2);
    sc.get("/b/v1/messages").await.assert_ok("proxy");
    assert_eq!(proxy.tunnels(), 3);
    let m = sc.metrics().await;
    assert!(
        m.contains("provider_proxy_pool_evictions_total{reason=\"config\"} 1"),
        "{m}"
    );
    // Alice's agent was untouched by bob's rotation.
    sc.get("/a/v1/messages").await.assert_ok("proxy");
    assert_eq!(proxy.tunnels(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failure_marks_the_agent_unhealthy() {
    let pki = pki();
    let untrusted = std::sync::Arc::new(TestPki::new());
    let upstream = Upstream::start(UpstreamOptions::tls(untrusted));
    let sc = TestSidecar::with_config(&pki, &provider("p", &upstream.base_url(), None, "")).await;
    for _ in 0..2 {
        let r = sc.get("/p/v1/messages").await;
        assert_eq!(r.json()["error"]["class"], "upstream_tls");
    }
    let m = sc.metrics().await;
    assert!(m.contains("provider_proxy_pool_unhealthy_total 2"), "{m}");
    assert!(
        m.contains("provider_proxy_pool_misses_total 2"),
        "each request built a fresh agent: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_sweep_ttl_lifetime_and_lru_storm() {
    let pki = pki();
    let upstreams: Vec<Upstream> = (0..6)
        .map(|_| Upstream::start(UpstreamOptions::tls(pki.clone())))
        .collect();
    let proxy = FaultProxy::start(Behavior::Connect { users: vec![] });
    let mut yaml = String::new();
    for (i, u) in upstreams.iter().enumerate() {
        yaml += &via_proxy(&format!("p{i}"), u, &proxy, None, "");
    }
    let settings = PoolSettings {
        max_agents: 2,
        agent_ttl: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(50),
        max_lifetime: Duration::from_millis(300),
        ..PoolSettings::default()
    };
    let sc = TestSidecar::start(&pki, settings).await;
    sc.apply(&yaml, 1);
    let req = Request::get(sc.url("/p0/v1/sse?events=40&interval_ms=50"))
        .body(Full::default())
        .unwrap();
    let stream = sc.send(req).await;
    // A storm of other providers while the stream runs: LRU evicts, sweeps run, TTL and
    // lifetime expire — the stream's agent among them.
    for round in 0..10 {
        for i in 1..6 {
            sc.get(&format!("/p{i}/v1/messages"))
                .await
                .assert_ok("proxy");
        }
        let _ = round;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let body = stream
        .into_body()
        .collect()
        .await
        .expect("stream intact")
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("data:").count(), 40, "whole stream arrived");
    let m = sc.metrics().await;
    assert!(
        m.contains("provider_proxy_pool_evictions_total{reason=\"lru\"}"),
        "{m}"
    );
    assert!(sc.sidecar.pool.len() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_the_idle_timeout() {
    let pki = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let sc = TestSidecar::start(
        &pki,
        PoolSettings {
            idle_timeout: Duration::from_millis(300),
            ..PoolSettings::default()
        },
    )
    .await;
    sc.apply(&provider("p", &upstream.base_url(), None, ""), 1);
    sc.get("/p/v1/messages").await.assert_ok("direct");
    sc.get("/p/v1/messages").await.assert_ok("direct");
    assert_eq!(upstream.connections(), 1, "reused while fresh");
    tokio::time::sleep(Duration::from_millis(900)).await;
    sc.get("/p/v1/messages").await.assert_ok("direct");
    assert_eq!(
        upstream.connections(),
        2,
        "the idle connection was closed, a new one opened"
    );
    assert_eq!(
        sc.sidecar.pool.len(),
        1,
        "the agent itself stays (its TTL is longer)"
    );
}

/// On a single-threaded runtime a new connection is parked before its task ever ran, so
/// hyper does not call it ready yet; the pool took that for closed and dropped it, and the
/// 1-thread sidecar opened 462 connections for 256 clients in the benchmark. Few connects
/// at a time make requests queue, so some connects finish after everyone was served.
#[tokio::test(flavor = "current_thread")]
async fn keep_alive_clients_on_one_thread_reuse_their_connections() {
    let pki = pki();
    let upstream = Upstream::start_detached(UpstreamOptions::tls(pki.clone()));
    let settings = PoolSettings {
        max_connecting: 2,
        ..PoolSettings::default()
    };
    let sc = std::sync::Arc::new(TestSidecar::start(&pki, settings).await);
    sc.apply(&provider("p", &upstream.base_url(), None, ""), 1);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let sc = sc.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    sc.post("/p/v1/messages", "{}").await.assert_ok("direct");
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(upstream.total_requests(), 320);
    assert!(
        upstream.connections() <= 16,
        "{} upstream connections for 16 keep-alive clients",
        upstream.connections()
    );
}
