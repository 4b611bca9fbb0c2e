//! Micro-benchmarks of the sidecar's per-request hot functions (divan).
//!
//! `cargo bench -p provider-proxy-bench --bench hot` measures; `cargo test --benches -p
//! provider-proxy-bench` (CI) runs each once as a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use provider_proxy_api::{Manifests, Provider, ProxyUrl, Snapshot, Timeouts};
use provider_proxy_dataplane::forward::{split_provider, strip_hop_by_hop, upstream_path};
use provider_proxy_dataplane::metrics::Metrics;
use provider_proxy_dataplane::pool::Path;
use provider_proxy_dataplane::{AgentPool, ConfigStore, PoolSettings, TrustRoots};

fn main() {
    divan::main();
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: corp, namespace: ai}
stringData: {username: ai-gateway, password: "s3cr3t:with@odd chars"}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {name: anthropic, namespace: ai}
spec:
  upstream: https://api.anthropic.com
  proxy: {url: "http://proxy.corp.example:3128", credentialsSecretRef: {name: corp}}
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {name: openai, namespace: ai}
spec:
  upstream: https://api.openai.com
  proxy: {url: "socks5h://socks.corp.example:1080", credentialsSecretRef: {name: corp}}
  http2: true
---
apiVersion: providerproxy.dev/v1alpha1
kind: ProviderProxy
metadata: {name: gemini, namespace: ai}
spec:
  upstream: https://generativelanguage.googleapis.com/v1beta
"#;

fn snapshot(version: u64) -> Snapshot {
    let mut m = Manifests::default();
    m.parse_yaml("bench.yaml", MANIFESTS).unwrap();
    let s = m.build_snapshot(version, &Timeouts::default());
    assert_eq!(s.providers.len(), 3, "invalid: {:?}", s.invalid);
    s
}

fn provider(name: &str) -> Arc<Provider> {
    snapshot(1).provider(name).unwrap().clone()
}

fn pool() -> AgentPool {
    AgentPool::new(
        PoolSettings::default(),
        TrustRoots::with_extra(Vec::new()),
        Metrics::new(),
    )
}

// ------------------------------------------------------------------ routing

#[divan::bench]
fn route_split_provider() -> (&'static str, &'static str) {
    split_provider(black_box("/anthropic/v1/messages"))
}

#[divan::bench]
fn route_upstream_path(b: divan::Bencher) {
    let p = provider("gemini");
    b.bench(|| {
        upstream_path(
            black_box(&p.upstream),
            black_box("/models/gemini-pro:streamGenerateContent"),
            black_box(Some("alt=sse")),
        )
        .unwrap()
    });
}

/// A route lookup as the forwarder does it: load the table in force, split, find.
#[divan::bench]
fn route_table_lookup(b: divan::Bencher) {
    let store = ConfigStore::new(Arc::new(pool()), Metrics::new());
    store.apply(snapshot(1));
    b.bench(|| {
        let routes = store.routes();
        let (name, _) = split_provider(black_box("/openai/v1/chat/completions"));
        routes.get(name).cloned()
    });
}

// ------------------------------------------------------------------ headers

fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:15080"),
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("x-api-key", "sk-ant-api03-0000000000000000000000000000"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "prompt-caching-2024-07-31"),
        ("user-agent", "claude-cli/1.0.0 (external, cli)"),
        ("content-length", "2048"),
        ("connection", "keep-alive"),
        ("x-stainless-lang", "js"),
        ("x-stainless-runtime", "node"),
    ] {
        h.insert(
            header::HeaderName::from_static(k),
            HeaderValue::from_static(v),
        );
    }
    h
}

#[divan::bench]
fn headers_strip_hop_by_hop(b: divan::Bencher) {
    let template = client_headers();
    b.with_inputs(|| template.clone())
        .bench_local_refs(strip_hop_by_hop);
}

/// The per-attempt copy the forwarder makes of the request headers.
#[divan::bench]
fn headers_clone(b: divan::Bencher) {
    let template = client_headers();
    b.bench(|| black_box(&template).clone());
}

// ------------------------------------------------------------------ pool

/// The path a request of `p` takes when all is well.
fn usual_path(p: &Provider) -> Path {
    if p.proxy.is_some() {
        Path::Proxy
    } else {
        Path::Direct
    }
}

#[divan::bench(args = ["gemini", "anthropic"])]
fn pool_key(b: divan::Bencher, name: &str) {
    let pool = pool();
    let p = provider(name);
    let path = usual_path(&p);
    b.bench(|| pool.key(black_box(&p), path));
}

#[divan::bench(args = ["gemini", "anthropic"])]
fn pool_checkout_hit(b: divan::Bencher, name: &str) {
    let pool = pool();
    let p = provider(name);
    let path = usual_path(&p);
    drop(pool.checkout(&p, path).unwrap());
    b.bench(|| pool.checkout(black_box(&p), path).unwrap());
}

/// What the forwarder does: the key comes from the route table, worked out per snapshot.
#[divan::bench(args = ["gemini", "anthropic"])]
fn pool_checkout_keyed_hit(b: divan::Bencher, name: &str) {
    let pool = pool();
    let p = provider(name);
    let path = usual_path(&p);
    let key = pool.key(&p, path);
    drop(pool.checkout_keyed(&key, &p, path).unwrap());
    b.bench(|| pool.checkout_keyed(black_box(&key), &p, path).unwrap());
}

// ------------------------------------------------------------------ proxy URLs

#[divan::bench]
fn proxy_url_parse() -> ProxyUrl {
    ProxyUrl::parse(black_box(
        "http://ai-gateway:s3cr3t%3Awith%40odd%20chars@proxy.corp.example:3128",
    ))
    .unwrap()
}

#[divan::bench]
fn proxy_url_display_masked(b: divan::Bencher) {
    let u = ProxyUrl::parse("socks5h://sg-egress:change-me-too@[2001:db8::1]:1080").unwrap();
    b.bench(|| black_box(&u).to_string());
}

// ------------------------------------------------------------------ snapshots

#[divan::bench]
fn snapshot_load(b: divan::Bencher) {
    let store = ConfigStore::new(Arc::new(pool()), Metrics::new());
    store.apply(snapshot(1));
    b.bench(|| store.snapshot());
}

#[divan::bench]
fn snapshot_apply(b: divan::Bencher) {
    let store = ConfigStore::new(Arc::new(pool()), Metrics::new());
    let next = snapshot(2);
    b.with_inputs(|| next.clone())
        .bench_local_values(|s| store.apply(s));
}
