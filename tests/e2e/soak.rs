//! Soak: the release sidecar binary as a subprocess, a real Squid with Basic auth, the TLS
//! upstream stand-in; `SOAK_STREAMS` (1000) long-lived SSE streams plus steady JSON POSTs
//! for `SOAK_SECONDS` (600). Samples the sidecar's RSS and open fds from /proc, its pool
//! size and in-flight gauge from `/metrics`, and the client's errors; prints a time series
//! and a verdict. A leak is growth: RSS or fds rising from the warmed-up level beyond a
//! bound while the load is flat, or fds not coming back down once the load stops and the
//! idle timeout has passed.
//!
//! Not in the default run (`#[ignore]`): `make soak` builds the release binary and runs
//! it. Knobs (env): SOAK_SECONDS (600), SOAK_STREAMS (1000), SOAK_JSON_RPS (50),
//! SOAK_SAMPLE_SECONDS (SOAK_SECONDS / 60, within 2..=10), SOAK_POOL_MAX_LIFETIME (20 s:
//! agents retire and are rebuilt under load all the time), SOAK_SIDECAR_BIN
//! (target/release/provider-proxy), SOAK_REPORT (also write the report to this file).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use provider_proxy_testkit::{
    ChildGuard, Squid, SquidOptions, TestPki, Upstream, UpstreamOptions, free_port,
};

use crate::support::{PASSWORD, pki, provider, secret};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Knobs of one soak run.
struct Plan {
    seconds: u64,
    streams: u64,
    json_rps: u64,
    sample_every: Duration,
    /// SSE stream shape: `events` events `interval_ms` apart, then the client reconnects.
    sse_events: u64,
    sse_interval_ms: u64,
    /// Pool settings given to the sidecar: short, so a soak of minutes sees agents
    /// retire and idle connections close many times.
    pool_idle_timeout: u64,
    pool_sweep_interval: u64,
    pool_max_lifetime: u64,
}

impl Plan {
    fn from_env() -> Self {
        let seconds = env_u64("SOAK_SECONDS", 600).max(20);
        Self {
            seconds,
            streams: env_u64("SOAK_STREAMS", 1000),
            json_rps: env_u64("SOAK_JSON_RPS", 50),
            sample_every: Duration::from_secs(
                env_u64("SOAK_SAMPLE_SECONDS", (seconds / 60).clamp(2, 10)).max(1),
            ),
            sse_events: 30,
            sse_interval_ms: 500,
            pool_idle_timeout: 15,
            pool_sweep_interval: 5,
            pool_max_lifetime: env_u64("SOAK_POOL_MAX_LIFETIME", 20).max(1),
        }
    }

    /// Streams open gradually, so Squid's auth helper and the accept queues are not hit
    /// by 1000 handshakes in the same millisecond.
    fn ramp(&self) -> Duration {
        Duration::from_secs((self.seconds / 8).clamp(5, 20))
    }
}

/// What the load generator saw.
#[derive(Default)]
struct ClientStats {
    streams_open: AtomicU64,
    streams_done: AtomicU64,
    events: AtomicU64,
    json_ok: AtomicU64,
    errors: AtomicU64,
    /// error kind → count, for the report.
    kinds: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl ClientStats {
    fn error(&self, kind: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.into())
            .or_insert(0) += 1;
    }
}

/// One row of the time series.
struct Sample {
    t: Duration,
    rss_kib: u64,
    fds: u64,
    cpu_pct: f64,
    agents: i64,
    in_flight: i64,
    streams_open: u64,
    events: u64,
    json_ok: u64,
    errors: u64,
}

struct SidecarProcess {
    /// Killed and reaped on drop.
    child: ChildGuard,
    data: String,
    admin: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn sidecar_bin() -> PathBuf {
    let bin = std::env::var_os("SOAK_SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/provider-proxy"));
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p provider-proxy` (make soak does)",
        bin.display()
    );
    bin
}

fn start_sidecar(plan: &Plan, config_dir: &Path, ca_file: &Path, log: &Path) -> SidecarProcess {
    let (data, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let log_file = std::fs::File::create(log).expect("sidecar log file");
    let child = Command::new(sidecar_bin())
        .arg("sidecar")
        .arg("--config")
        .arg(config_dir)
        .args(["--listen", &data, "--admin", &admin])
        .env("SSL_CERT_FILE", ca_file)
        .env("RUST_LOG", "warn")
        .env("POOL_IDLE_TIMEOUT", plan.pool_idle_timeout.to_string())
        .env("POOL_SWEEP_INTERVAL", plan.pool_sweep_interval.to_string())
        .env("POOL_MAX_LIFETIME", plan.pool_max_lifetime.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn the sidecar");
    SidecarProcess {
        child: ChildGuard(child),
        data,
        admin,
    }
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// utime + stime, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the ")" that ends the command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Sum of every series of `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> i64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as i64
}

async fn get_text(client: &HttpClient, url: &str) -> Option<(StatusCode, String)> {
    let req = Request::get(url).body(Full::default()).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .ok()?
        .ok()?;
    Some((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// One SSE client: stream, count events, reconnect when the stream ends, until `stop`.
async fn sse_loop(
    client: HttpClient,
    url: String,
    stats: Arc<ClientStats>,
    stop: tokio_util_like::Stop,
) {
    while !stop.is_set() {
        let req = Request::get(&url)
            .header("accept", "text/event-stream")
            .body(Full::default())
            .expect("request");
        let resp = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), client.request(req)) => r,
            _ = stop.wait() => return,
        };
        let mut body = match resp {
            Ok(Ok(r)) if r.status() == StatusCode::OK => r.into_body(),
            Ok(Ok(r)) => {
                stats.error(format!("sse status {}", r.status().as_u16()));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Ok(Err(e)) => {
                stats.error(format!("sse request: {}", short(&e)));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                stats.error("sse headers timeout (30 s)");
                continue;
            }
        };
        stats.streams_open.fetch_add(1, Ordering::Relaxed);
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(Duration::from_secs(10), body.frame()) => f,
                _ = stop.wait() => break,
            };
            match frame {
                Ok(Some(Ok(f))) => {
                    if let Some(data) = f.data_ref() {
                        let n = data.windows(6).filter(|w| w == b"data: ").count() as u64;
                        stats.events.fetch_add(n, Ordering::Relaxed);
                    }
                }
                Ok(None) => {
                    stats.streams_done.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Some(Err(e))) => {
                    stats.error(format!("sse body: {}", short(&e)));
                    break;
                }
                Err(_) => {
                    stats.error("sse silent for 10 s");
                    break;
                }
            }
        }
        stats.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Steady JSON POSTs at `rps`, each on its own task (at most 256 in flight).
async fn json_loop(
    client: HttpClient,
    url: String,
    rps: u64,
    stats: Arc<ClientStats>,
    stop: tokio_util_like::Stop,
) {
    if rps == 0 {
        return;
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = Bytes::from_static(
        br#"{"model":"claude-soak","max_tokens":16,"messages":[{"role":"user","content":"ping"}]}"#,
    );
    while !stop.is_set() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait() => break,
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            stats.error("json: 256 requests in flight");
            continue;
        };
        let req = Request::post(&url)
            .header("content-type", "application/json")
            .header("x-api-key", "sk-soak")
            .body(Full::new(body.clone()))
            .expect("request");
        let (client, stats) = (client.clone(), stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let result = tokio::time::timeout(Duration::from_secs(30), async {
                let resp = client.request(req).await.map_err(|e| short(&e))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| short(&e))?
                    .to_bytes();
                Ok::<_, String>((status, body))
            })
            .await;
            match result {
                Ok(Ok((StatusCode::OK, b))) if b.starts_with(b"{") => {
                    stats.json_ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok((s, _))) => stats.error(format!("json status {}", s.as_u16())),
                Ok(Err(e)) => stats.error(format!("json: {e}")),
                Err(_) => stats.error("json: no answer in 30 s"),
            }
        });
    }
}

fn short(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    s.chars().take(80).collect()
}

/// A tiny cancellation flag with an async wait (tokio-util is not a dependency here).
mod tokio_util_like {
    use std::sync::Arc;
    use tokio::sync::watch;

    #[derive(Clone)]
    pub struct Stop(Arc<watch::Sender<bool>>, watch::Receiver<bool>);

    impl Stop {
        pub fn new() -> Self {
            let (tx, rx) = watch::channel(false);
            Self(Arc::new(tx), rx)
        }
        pub fn set(&self) {
            self.0.send_replace(true);
        }
        pub fn is_set(&self) -> bool {
            *self.1.borrow()
        }
        pub async fn wait(&self) {
            let mut rx = self.1.clone();
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

fn table(samples: &[Sample]) -> String {
    let mut out = String::from(
        "|    t |  RSS MiB |  fds |  CPU % | agents | in-flight | SSE open | events/s | JSON ok/s | errors |\n\
         |-----:|---------:|-----:|-------:|-------:|----------:|---------:|---------:|----------:|-------:|\n",
    );
    let mut prev: Option<&Sample> = None;
    for s in samples {
        let dt = prev
            .map_or(s.t.as_secs_f64(), |p| (s.t - p.t).as_secs_f64())
            .max(0.001);
        let rate = |now: u64, before: Option<u64>| (now - before.unwrap_or(0)) as f64 / dt;
        let _ = writeln!(
            out,
            "| {:>4} | {:>8.1} | {:>4} | {:>6.1} | {:>6} | {:>9} | {:>8} | {:>8.0} | {:>9.1} | {:>6} |",
            s.t.as_secs(),
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.cpu_pct,
            s.agents,
            s.in_flight,
            s.streams_open,
            rate(s.events, prev.map(|p| p.events)),
            rate(s.json_ok, prev.map(|p| p.json_ok)),
            s.errors,
        );
        prev = Some(s);
    }
    out
}

/// Least-squares slope of `y` over `t` seconds, per minute.
fn slope_per_min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (t, y)| {
        (num + (t - mt) * (y - my), den + (t - mt) * (t - mt))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes of load; run with `make soak`"]
async fn soak_sse_and_json_through_squid() {
    let plan = Plan::from_env();
    let pki: Arc<TestPki> = pki();
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let squid = Squid::start(SquidOptions {
        users: vec![("soak".into(), PASSWORD.into())],
        https: None,
    });

    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, pki.ca_pem()).expect("write CA");
    let config = dir.path().join("config");
    std::fs::create_dir(&config).expect("config dir");
    let proxy = format!("http://127.0.0.1:{}", squid.http_port());
    let creds = "    credentialsSecretRef: {name: squid-login}\n";
    let yaml = [
        secret("squid-login", "soak", PASSWORD),
        // SSE over HTTP/1.1: one CONNECT tunnel per concurrent stream.
        provider(
            "sse",
            &upstream.base_url(),
            Some(&proxy),
            &format!("{creds}  http2: false\n"),
        ),
        // JSON over h2 through the same Squid: one multiplexed tunnel.
        provider(
            "json",
            &upstream.base_url(),
            Some(&proxy),
            &format!("{creds}  http2: true\n"),
        ),
    ]
    // `provider` ends with `proxy:` / `url:`; the 4-space credentials line continues it.
    .concat();
    std::fs::write(config.join("providers.yaml"), &yaml).expect("write manifests");

    let log = dir.path().join("sidecar.log");
    let sidecar = start_sidecar(&plan, &config, &ca_file, &log);
    let pid = sidecar.child.0.id();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build_http();

    // Ready and routing: both providers answer through Squid before the load starts.
    let ready_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = get_text(&client, &format!("http://{}/readyz", sidecar.admin)).await;
        let probe = get_text(
            &client,
            &format!("http://{}/json/v1/messages", sidecar.data),
        )
        .await;
        if matches!(ready, Some((StatusCode::OK, _))) && matches!(probe, Some((StatusCode::OK, _)))
        {
            break;
        }
        assert!(
            Instant::now() < ready_deadline,
            "sidecar not serving within 20 s: readyz {ready:?}, probe {probe:?}\nlog:\n{}\nmanifests:\n{yaml}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let baseline_fds = proc_fds(pid);
    let baseline_rss = proc_rss_kib(pid);
    println!(
        "soak: {} s, {} SSE streams ({} events {} ms apart, then reconnect), {} JSON req/s; \
         sidecar pid {pid} (baseline RSS {:.1} MiB, {} fds); pool idle {} s, sweep {} s, \
         agent lifetime {} s",
        plan.seconds,
        plan.streams,
        plan.sse_events,
        plan.sse_interval_ms,
        plan.json_rps,
        baseline_rss as f64 / 1024.0,
        baseline_fds,
        plan.pool_idle_timeout,
        plan.pool_sweep_interval,
        plan.pool_max_lifetime,
    );

    let stats = Arc::new(ClientStats::default());
    let stop = tokio_util_like::Stop::new();
    let mut tasks = Vec::new();
    let sse_url = format!(
        "http://{}/sse/v1/sse?events={}&interval_ms={}",
        sidecar.data, plan.sse_events, plan.sse_interval_ms
    );
    let ramp = plan.ramp();
    tasks.push(tokio::spawn(json_loop(
        client.clone(),
        format!("http://{}/json/v1/messages", sidecar.data),
        plan.json_rps,
        stats.clone(),
        stop.clone(),
    )));
    {
        // Open the streams evenly over the ramp.
        let (client, stats, stop, sse_url) =
            (client.clone(), stats.clone(), stop.clone(), sse_url.clone());
        let n = plan.streams;
        tasks.push(tokio::spawn(async move {
            let gap = ramp / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
            let mut streams = Vec::new();
            for _ in 0..n {
                if stop.is_set() {
                    break;
                }
                streams.push(tokio::spawn(sse_loop(
                    client.clone(),
                    sse_url.clone(),
                    stats.clone(),
                    stop.clone(),
                )));
                tokio::time::sleep(gap).await;
            }
            for s in streams {
                let _ = s.await;
            }
        }));
    }

    let started = Instant::now();
    let total = Duration::from_secs(plan.seconds);
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut samples = Vec::new();
    let mut last_cpu = (Instant::now(), proc_cpu_ticks(pid));
    let sample = |t: Duration, last_cpu: &mut (Instant, u64), metrics: &str| {
        let ticks = proc_cpu_ticks(pid);
        let cpu_pct = (ticks - last_cpu.1) as f64
            / ticks_per_sec
            / last_cpu.0.elapsed().as_secs_f64().max(0.001)
            * 100.0;
        *last_cpu = (Instant::now(), ticks);
        Sample {
            t,
            rss_kib: proc_rss_kib(pid),
            fds: proc_fds(pid),
            cpu_pct,
            agents: metric_sum(metrics, "provider_proxy_pool_agents"),
            in_flight: metric_sum(metrics, "provider_proxy_in_flight_requests"),
            streams_open: stats.streams_open.load(Ordering::Relaxed),
            events: stats.events.load(Ordering::Relaxed),
            json_ok: stats.json_ok.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
        }
    };
    let metrics_url = format!("http://{}/metrics", sidecar.admin);
    while started.elapsed() < total {
        tokio::time::sleep(
            plan.sample_every
                .min(total.saturating_sub(started.elapsed())),
        )
        .await;
        let metrics = get_text(&client, &metrics_url)
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        let s = sample(started.elapsed(), &mut last_cpu, &metrics);
        println!(
            "soak: t={:>4}s rss={:.1}MiB fds={} cpu={:.0}% agents={} in_flight={} sse_open={} events={} json_ok={} errors={}",
            s.t.as_secs(),
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.cpu_pct,
            s.agents,
            s.in_flight,
            s.streams_open,
            s.events,
            s.json_ok,
            s.errors
        );
        samples.push(s);
        assert!(
            sidecar_alive(pid),
            "sidecar exited during the soak; log:\n{}",
            tail(&log)
        );
    }

    // Stop the load; every client connection closes, and pooled upstream connections
    // close after the idle timeout: the sidecar must come back to its baseline of fds.
    stop.set();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    drop(client);
    let metrics_client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let drain_deadline = Instant::now()
        + Duration::from_secs(plan.pool_idle_timeout + 3 * plan.pool_sweep_interval + 10);
    // The baseline was taken with the readiness probe's pooled connection open; a few more
    // for the admin scrapes.
    let fd_slack = 4;
    let drain_started = Instant::now();
    let drained = loop {
        let fds = proc_fds(pid);
        if fds <= baseline_fds + fd_slack || Instant::now() >= drain_deadline {
            break fds;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let drain_took = drain_started.elapsed();
    let metrics = get_text(&metrics_client, &metrics_url)
        .await
        .map(|(_, t)| t)
        .unwrap_or_default();
    let after = sample(started.elapsed(), &mut last_cpu, &metrics);

    // Every request has ended (the clients hung up): the in-flight gauge must say so.
    let gauge_deadline = Instant::now() + Duration::from_secs(15);
    let mut after = after;
    while after.in_flight != 0 && Instant::now() < gauge_deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let metrics = get_text(&metrics_client, &metrics_url)
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        after = sample(started.elapsed(), &mut last_cpu, &metrics);
    }

    // Verdict. The pool retires every agent after `pool_max_lifetime`; until the streams
    // on a retired agent end, two agents' connections exist at once, so RSS and fds
    // oscillate with a period of lifetime + stream length. Growth is judged on peaks: the
    // peak of the last period against the peak of the first period after warm-up (ramp
    // done, one rotation completed). A leak raises every later peak; the oscillation
    // does not.
    let stream_secs = plan.sse_events * plan.sse_interval_ms / 1000;
    // Without rotations during the run (lifetime ≥ run) there is no such period: compare
    // quarters of the run instead.
    let period = if plan.pool_max_lifetime >= plan.seconds {
        Duration::from_secs((plan.seconds / 4).max(stream_secs))
    } else {
        Duration::from_secs(plan.pool_max_lifetime + stream_secs)
    };
    let warm_at = ramp + period;
    let end = samples.last().map_or(Duration::ZERO, |s| s.t);
    let window = |from: Duration, to: Duration| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.t >= from && s.t <= to)
            .collect()
    };
    let first = window(warm_at, warm_at + period);
    let last = window(end.saturating_sub(period), end);
    let peak = |w: &[&Sample], f: fn(&Sample) -> u64| w.iter().map(|s| f(s)).max().unwrap_or(0);
    let mut verdict = Vec::new();
    let mut leak = false;
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let steady: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.t >= warm_at)
        .map(|s| (s.t.as_secs_f64(), s.rss_kib as f64 / 1024.0))
        .collect();
    verdict.push(format!(
        "RSS: baseline {:.1} MiB, peak {:.1} MiB, end of load {:.1} MiB; slope after warm-up {:+.2} MiB/min",
        baseline_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        samples.last().map_or(0, |s| s.rss_kib) as f64 / 1024.0,
        slope_per_min(&steady),
    ));
    verdict.push(format!(
        "fds: baseline {baseline_fds}, peak {peak_fds}, end of load {}; {drained} open {} s after the load stopped (bound {})",
        samples.last().map_or(0, |s| s.fds),
        drain_took.as_secs(),
        baseline_fds + fd_slack,
    ));
    if first.is_empty()
        || last.is_empty()
        || warm_at + period > end.saturating_sub(period) + plan.sample_every
    {
        verdict.push(format!(
            "growth: run too short to compare peaks (warm-up ends at {} s, then two {} s periods are needed)",
            warm_at.as_secs(),
            period.as_secs()
        ));
    } else {
        let (rss_a, rss_b) = (peak(&first, |s| s.rss_kib), peak(&last, |s| s.rss_kib));
        let (fds_a, fds_b) = (peak(&first, |s| s.fds), peak(&last, |s| s.fds));
        verdict.push(format!(
            "growth: peak RSS {:.1} MiB in t={}..{} s vs {:.1} MiB in t={}..{} s; peak fds {fds_a} vs {fds_b}",
            rss_a as f64 / 1024.0,
            warm_at.as_secs(),
            (warm_at + period).as_secs(),
            rss_b as f64 / 1024.0,
            end.saturating_sub(period).as_secs(),
            end.as_secs(),
        ));
        // Bounds: allocator noise and buffer high-water marks, not a leak.
        if rss_b as f64 > rss_a as f64 * 1.15 + 16.0 * 1024.0 {
            leak = true;
            verdict.push("LEAK? peak RSS grew beyond 1.15x + 16 MiB under flat load".into());
        }
        if fds_b as f64 > fds_a as f64 * 1.10 + 100.0 {
            leak = true;
            verdict.push("LEAK? peak fds grew beyond 1.10x + 100 under flat load".into());
        }
    }
    if drained > baseline_fds + fd_slack {
        leak = true;
        verdict.push(format!(
            "LEAK: {drained} fds still open after the load stopped and the pool's idle timeout passed (baseline {baseline_fds})"
        ));
    }
    verdict.push(format!(
        "after the load: pool agents {}, in-flight gauge {}, RSS {:.1} MiB",
        after.agents,
        after.in_flight,
        after.rss_kib as f64 / 1024.0
    ));
    if after.in_flight != 0 {
        leak = true;
        verdict.push(format!(
            "LEAK: provider_proxy_in_flight_requests stuck at {} with no client connected \
             (requests cancelled before their response headers are never counted down)",
            after.in_flight
        ));
    }
    let total_events = stats.events.load(Ordering::Relaxed);
    let json_ok = stats.json_ok.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let kinds = stats
        .kinds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    verdict.push(format!(
        "client: {total_events} SSE events, {} streams completed, {json_ok} JSON responses, {errors} errors {kinds:?}",
        stats.streams_done.load(Ordering::Relaxed)
    ));
    verdict.push(format!(
        "squid: {} CONNECT lines logged (tunnels are logged when they close); upstream saw {} connections",
        squid.connect_count(),
        upstream.connections()
    ));
    // Errors: none expected at all; allow a hair (0.1 % of requests) for the machine
    // being shared, and report every kind.
    let attempts = json_ok + stats.streams_done.load(Ordering::Relaxed) + plan.streams;
    let error_budget = attempts / 1000;
    let too_many_errors = errors > error_budget;
    if too_many_errors {
        verdict.push(format!(
            "FAIL: {errors} client errors (budget {error_budget})"
        ));
    }
    let ok = !leak && !too_many_errors;
    verdict.push(
        if ok {
            "VERDICT: PASS (no growth beyond the bounds, fds and in-flight back to baseline, errors within budget)"
        } else {
            "VERDICT: FAIL"
        }
        .into(),
    );

    let table = table(&samples);
    let report = format!(
        "{} s, {} SSE streams + {} JSON req/s through Squid (Basic auth), release sidecar pid {pid}\n\n{table}\n{}\n",
        plan.seconds,
        plan.streams,
        plan.json_rps,
        verdict
            .iter()
            .map(|v| format!("- {v}\n"))
            .collect::<String>()
    );
    println!("\n{report}");
    if let Some(path) = std::env::var_os("SOAK_REPORT") {
        std::fs::write(&path, &report).expect("write SOAK_REPORT");
    }
    assert!(
        ok,
        "soak failed:\n{report}\nsidecar log tail:\n{}",
        tail(&log)
    );
}

fn sidecar_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}/status")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .contains("State:\tZ")
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
