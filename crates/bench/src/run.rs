//! `provider-proxy-bench run`: set up, sanity-check every path, then for each scenario run
//! rounds in which every peer gets one cell (warm-up, then the measured window), the order
//! rotating each round; print a table per scenario and the targets, write them to
//! `$BENCH_OUT/latest.md`. Ctrl-C or SIGTERM stops at once and kills every process started.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::time::Instant;

use crate::load::{self, Expect, RequestTemplate, Target, Via};
use crate::procs;
use crate::report::{self, Cell, Peer, Scenario, ScenarioResult};
use crate::setup::{self, Bench, Group, Path3, SetupOptions, SidecarRun};

/// Settings from the environment.
pub struct Config {
    pub seconds: f64,
    pub warmup: f64,
    pub rounds: usize,
    pub scenarios: Vec<Scenario>,
    pub peers: Vec<Peer>,
    pub out: Option<PathBuf>,
    pub setup: SetupOptions,
}

pub(crate) fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

pub(crate) fn env_num(name: &str, default: f64, min: f64, max: f64) -> Result<f64, String> {
    let raw = env_or(name, &default.to_string());
    let v: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{name}={raw:?} is not a number"))?;
    if !(min..=max).contains(&v) {
        return Err(format!("{name}={v} is outside {min}..={max}"));
    }
    Ok(v)
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let scenarios = env_or("BENCH_SCENARIOS", "json-32,json-256,sse-32,sse-256")
            .split(',')
            .map(|s| {
                let s = s.trim();
                let (kind, n) = s
                    .split_once('-')
                    .ok_or_else(|| format!("BENCH_SCENARIOS: {s:?} is not KIND-CONNS"))?;
                let conns: usize = n
                    .parse()
                    .ok()
                    .filter(|c| (1..=4096).contains(c))
                    .ok_or_else(|| format!("BENCH_SCENARIOS: bad connection count in {s:?}"))?;
                match kind {
                    "json" => Ok(Scenario { sse: false, conns }),
                    "sse" => Ok(Scenario { sse: true, conns }),
                    _ => Err(format!("BENCH_SCENARIOS: {s:?}: kind is json or sse")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let with_b = std::env::var_os("BENCH_SIDECAR_B_BIN").is_some();
        let default_peers: Vec<&str> = Peer::defaults(with_b).iter().map(|p| p.key()).collect();
        let peer_keys = env_or("BENCH_PEERS", &default_peers.join(","));
        let mut peers = Vec::new();
        for k in peer_keys.split(',').map(str::trim) {
            let p = Peer::ALL
                .into_iter()
                .find(|p| p.key() == k)
                .ok_or_else(|| {
                    format!(
                        "BENCH_PEERS: unknown peer {k:?}; known: {}",
                        Peer::ALL.map(Peer::key).join(",")
                    )
                })?;
            if !peers.contains(&p) {
                peers.push(p);
            }
        }
        if peers.contains(&Peer::SidecarB) && std::env::var_os("BENCH_SIDECAR_B_BIN").is_none() {
            return Err(
                "BENCH_PEERS: sidecar-b runs the build in BENCH_SIDECAR_B_BIN, which is not set"
                    .into(),
            );
        }
        // Ratios need the floors: add any floor a chosen peer is compared with.
        for p in peers.clone() {
            if !peers.contains(&p.floor()) {
                peers.insert(0, p.floor());
            }
        }
        Ok(Config {
            seconds: env_num("BENCH_SECONDS", 2.0, 0.2, 600.0)?,
            warmup: env_num("BENCH_WARMUP", 0.75, 0.0, 60.0)?,
            rounds: env_num("BENCH_ROUNDS", 3.0, 1.0, 100.0)? as usize,
            scenarios,
            peers,
            out: std::env::var_os("BENCH_OUT").map(PathBuf::from),
            setup: setup_options(),
        })
    }
}

/// What shapes the processes, from `BENCH_SIDECAR_BIN` and friends.
pub(crate) fn setup_options() -> SetupOptions {
    let default_bin = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("provider-proxy")))
        .unwrap_or_else(|| PathBuf::from("target/release/provider-proxy"));
    SetupOptions {
        sidecar_bin: std::env::var_os("BENCH_SIDECAR_BIN")
            .map(PathBuf::from)
            .unwrap_or(default_bin),
        sidecar_b_bin: std::env::var_os("BENCH_SIDECAR_B_BIN").map(PathBuf::from),
        sidecar_log: env_or("BENCH_SIDECAR_LOG", "warn"),
        nginx_workers: env_or("BENCH_NGINX_WORKERS", "auto"),
        cheap_dante_hash: env_or("BENCH_DANTE_CRYPT", "sha512") != "system",
    }
}

/// Run the whole benchmark; interrupted by Ctrl-C / SIGTERM.
pub fn main() -> Result<(), String> {
    let cfg = Config::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let result = rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM handler: {e}"))?;
        tokio::select! {
            r = run(cfg) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted (Ctrl-C); every process started was killed".to_owned()),
            _ = term.recv() => Err("terminated (SIGTERM); every process started was killed".to_owned()),
        }
    });
    // Dropping the runtime waits for a setup still running on a blocking thread; its
    // guards then drop too.
    drop(rt);
    result
}

async fn run(cfg: Config) -> Result<(), String> {
    let setup_opts = SetupOptions {
        sidecar_bin: cfg.setup.sidecar_bin.clone(),
        sidecar_b_bin: cfg.setup.sidecar_b_bin.clone(),
        sidecar_log: cfg.setup.sidecar_log.clone(),
        nginx_workers: cfg.setup.nginx_workers.clone(),
        cheap_dante_hash: cfg.setup.cheap_dante_hash,
    };
    eprintln!(
        "bench: starting nginx (upstream + reverse proxy), SSE upstream, Squid, Dante, sidecar …"
    );
    let mut bench = tokio::task::spawn_blocking(move || Bench::start(&setup_opts))
        .await
        .map_err(|e| format!("setup panicked: {e}"))??;
    let ticks = procs::clock_ticks();
    let per_cell = cfg.warmup + cfg.seconds + 0.3;
    let total = per_cell * (cfg.rounds * cfg.peers.len() * cfg.scenarios.len()) as f64;
    eprintln!(
        "bench: {} scenarios × {} peers × {} rounds, {:.1} s warm-up + {:.1} s measured per cell: about {:.0} s",
        cfg.scenarios.len(),
        cfg.peers.len(),
        cfg.rounds,
        cfg.warmup,
        cfg.seconds,
        total
    );
    sanity(&mut bench, &cfg).await?;

    let mut results = Vec::new();
    for &sc in &cfg.scenarios {
        let mut rows: Vec<(Peer, Vec<Cell>)> = cfg.peers.iter().map(|p| (*p, Vec::new())).collect();
        for round in 0..cfg.rounds {
            for i in 0..rows.len() {
                let idx = (i + round) % rows.len();
                let peer = rows[idx].0;
                if peer.is_sidecar() {
                    bench.start_sidecar(match peer {
                        Peer::SidecarOneWorker => SidecarRun::OneWorker,
                        Peer::SidecarB => SidecarRun::BuildB,
                        _ => SidecarRun::Default,
                    })?;
                }
                let cell = run_cell(&bench, peer, sc, &cfg, ticks).await;
                if peer.is_sidecar() {
                    bench.check_alive()?;
                    bench.stop_sidecar();
                }
                eprintln!(
                    "  {:<9} round {}/{} {:<28} {:>8.0} /s  {} errors",
                    sc.name(),
                    round + 1,
                    cfg.rounds,
                    peer.label(),
                    cell.rps(),
                    cell.load.errors
                );
                rows[idx].1.push(cell);
                bench.check_alive()?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let r = ScenarioResult { scenario: sc, rows };
        println!("\n### {}\n\n{}", sc.title(), r.table());
        results.push(r);
    }

    let md = render(&cfg, &results);
    println!("\n{md}");
    if let Some(dir) = &cfg.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("latest.md");
        std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

fn expect_for(sc: Scenario) -> Expect {
    if sc.sse {
        Expect::Sse {
            events: crate::sse::EVENTS,
        }
    } else {
        Expect::Json {
            len: setup::json_answer().len(),
        }
    }
}

fn target_for(b: &Bench, peer: Peer, sc: Scenario) -> Result<Target, String> {
    let kind = if sc.sse { "sse" } else { "json" };
    let upstream = if sc.sse { b.sse_up_addr } else { b.json_up };
    let tls = || {
        Some((
            b.pki.rustls_client_config(&[b"http/1.1"]),
            ServerName::try_from("localhost").map_err(|e| e.to_string()),
        ))
    };
    let (connect, via, tls, path) = match peer {
        Peer::Floor(p) => {
            let (connect, via) = match p {
                Path3::Direct => (upstream, Via::Direct),
                Path3::Squid => (
                    b.squid_addr,
                    Via::HttpConnect {
                        auth: b.squid_auth.clone(),
                    },
                ),
                Path3::Dante => (
                    b.dante_addr,
                    Via::Socks5 {
                        user: b.dante_user.0.clone(),
                        pass: b.dante_user.1.clone(),
                    },
                ),
            };
            (connect, via, tls(), "/v1/messages".to_owned())
        }
        Peer::Nginx => (
            b.nginx_rp_addr,
            Via::Direct,
            None,
            format!("/{kind}/v1/messages"),
        ),
        Peer::Sidecar(p) => (
            b.sidecar_addr,
            Via::Direct,
            None,
            format!("/{kind}-{}/v1/messages", p.as_str()),
        ),
        Peer::SidecarH2 => (
            b.sidecar_addr,
            Via::Direct,
            None,
            format!("/{kind}-direct-h2/v1/messages"),
        ),
        Peer::SidecarOneWorker | Peer::SidecarB => (
            b.sidecar_addr,
            Via::Direct,
            None,
            format!("/{kind}-direct/v1/messages"),
        ),
    };
    let tls = match tls {
        Some((cfg, name)) => Some((cfg, name?)),
        None => None,
    };
    let host = match peer {
        Peer::Floor(_) => upstream.to_string(),
        _ => connect.to_string(),
    };
    Ok(Target {
        connect,
        via,
        upstream,
        tls,
        path: path.parse().map_err(|e| format!("path {path}: {e}"))?,
        host: host.parse().map_err(|e| format!("host {host}: {e}"))?,
    })
}

fn fwd_group(b: &Bench, peer: Peer) -> Option<Group> {
    match peer {
        Peer::Floor(_) => None,
        Peer::Nginx => Some(b.nginx_rp_group()),
        Peer::Sidecar(_) | Peer::SidecarH2 | Peer::SidecarOneWorker | Peer::SidecarB => {
            b.sidecar_group()
        }
    }
}

fn proxy_group(b: &Bench, peer: Peer) -> Option<Group> {
    match peer {
        Peer::Floor(Path3::Squid) | Peer::Sidecar(Path3::Squid) => Some(b.squid_group),
        Peer::Floor(Path3::Dante) | Peer::Sidecar(Path3::Dante) => Some(b.dante_group),
        _ => None,
    }
}

fn up_group(b: &Bench, sc: Scenario) -> Group {
    if sc.sse {
        b.sse_up_group()
    } else {
        b.nginx_up_group()
    }
}

/// CPU ticks of (forwarder, proxy, upstream, load generator, forwarder in the kernel);
/// the forwarder's two from one read of its processes.
fn cpu_now(fwd: Option<Group>, proxy: Option<Group>, up: Group) -> [Option<u64>; 5] {
    let fwd = fwd.map(|g| procs::group_user_sys_ticks(g.pgid));
    [
        fwd.map(|(user, sys)| user + sys),
        proxy.map(|g| procs::group_cpu_ticks(g.pgid)),
        Some(procs::group_cpu_ticks(up.pgid)),
        Some(procs::self_cpu_ticks()),
        fwd.map(|(_, sys)| sys),
    ]
}

async fn run_cell(b: &Bench, peer: Peer, sc: Scenario, cfg: &Config, ticks: f64) -> Cell {
    let target = match target_for(b, peer, sc) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            return Cell::load_only(load::LoadResult::failed(e), cfg.seconds);
        }
    };
    let (fwd, proxy, up) = (fwd_group(b, peer), proxy_group(b, peer), up_group(b, sc));
    if let Some(g) = fwd {
        procs::reset_peak_rss(g.pgid);
    }
    let template = Arc::new(RequestTemplate::new(sc.sse));
    let begin = Instant::now();
    let start = begin + Duration::from_secs_f64(cfg.warmup);
    let end = start + Duration::from_secs_f64(cfg.seconds);
    let contention = move || {
        (
            fwd.map(|g| procs::group_sched(g.pgid)),
            procs::machine_cpu_ticks(),
        )
    };
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(start).await;
        let a = (cpu_now(fwd, proxy, up), Instant::now(), contention());
        tokio::time::sleep_until(end).await;
        let b = (cpu_now(fwd, proxy, up), Instant::now(), contention());
        (a, b)
    });
    // Connections open spread over the first half of the warm-up, as clients would.
    let ramp = Duration::from_secs_f64(cfg.warmup / 2.0);
    let load = load::run(target, template, expect_for(sc), sc.conns, ramp, start, end).await;
    let window_and_cpu = sampler.await.ok();
    let fwd_rss_kib = fwd.map(|g| procs::group_peak_rss_kib(g.pgid));
    let upstream_conns = if peer.is_sidecar() {
        b.sidecar_connections()
    } else {
        None
    };
    let (window, d, fwd_sched, machine_busy) = match window_and_cpu {
        Some(((a, ta, (wa, ma)), (z, tz, (wz, mz)))) => {
            let d: Vec<Option<f64>> = a
                .iter()
                .zip(z.iter())
                .map(|(a, z)| Some(z.as_ref()?.saturating_sub(*a.as_ref()?) as f64 / ticks))
                .collect();
            let sched = wa.zip(wz).map(|(a, z)| FwdSched {
                wait: z.wait_ns.saturating_sub(a.wait_ns) as f64 / 1e9,
                runs: z.runs.saturating_sub(a.runs) as f64,
            });
            let busy = ma.zip(mz).and_then(|((ba, ta), (bz, tz))| {
                let total = tz.saturating_sub(ta);
                (total > 0).then(|| bz.saturating_sub(ba) as f64 / total as f64)
            });
            ((tz - ta).as_secs_f64(), d, sched, busy)
        }
        None => (cfg.seconds, vec![None; 5], None, None),
    };
    Cell {
        load,
        window,
        fwd_cpu: d[0],
        proxy_cpu: d[1],
        up_cpu: d[2].unwrap_or(0.0),
        gen_cpu: d[3].unwrap_or(0.0),
        fwd_rss_kib,
        upstream_conns,
        fwd_sched_wait: fwd_sched.map(|s| s.wait),
        fwd_runs: fwd_sched.map(|s| s.runs),
        fwd_sys: d[4],
        machine_busy,
    }
}

/// The forwarder's scheduling over a cell's window.
#[derive(Clone, Copy)]
struct FwdSched {
    /// Seconds runnable but not running.
    wait: f64,
    /// Times its threads got a CPU.
    runs: f64,
}

/// One connection, a fraction of a second, per peer and kind: a broken path fails the run
/// at once with what went wrong, and the sidecar's agents exist before measuring.
async fn sanity(b: &mut Bench, cfg: &Config) -> Result<(), String> {
    if cfg.peers.iter().any(|p| p.is_sidecar()) {
        b.start_sidecar(SidecarRun::Default)?;
    }
    let r = sanity_checks(b, cfg).await;
    b.stop_sidecar();
    r
}

async fn sanity_checks(b: &Bench, cfg: &Config) -> Result<(), String> {
    for sse in [false, true] {
        if !cfg.scenarios.iter().any(|s| s.sse == sse) {
            continue;
        }
        let sc = Scenario { sse, conns: 1 };
        for &peer in &cfg.peers {
            let target = Arc::new(target_for(b, peer, sc)?);
            // Up to 5 s for a first answer (a forwarder under valgrind is slow), then stop.
            let mut r = load::LoadResult::default();
            for _ in 0..10 {
                let start = Instant::now();
                let end = start + Duration::from_millis(500);
                r = load::run(
                    target.clone(),
                    Arc::new(RequestTemplate::new(sse)),
                    expect_for(sc),
                    1,
                    Duration::ZERO,
                    start,
                    end,
                )
                .await;
                if r.ok > 0 || r.errors > 0 {
                    break;
                }
            }
            if r.ok == 0 || r.errors > 0 {
                return Err(format!(
                    "sanity check failed for {} ({}): {} good, errors: {:?}\n--- sidecar log (tail) ---\n{}",
                    peer.label(),
                    sc.name(),
                    r.ok,
                    r.error_kinds,
                    b.sidecar_log_tail()
                ));
            }
        }
    }
    eprintln!("bench: every path answers correctly");
    Ok(())
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

fn render(cfg: &Config, results: &[ScenarioResult]) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    md.push_str("## Results\n\n");
    md.push_str(&format!(
        "Machine: {cores} cores ({cpu}), {}; everything (load generator, forwarders, proxies, upstreams) \
         shares these cores, so absolute req/s are not stable — ratios and CPU per request are the figures that count.\n\
         Run: {} rounds × {:.1} s measured after {:.1} s warm-up per cell, peers interleaved (order rotates each round). \
         {}; {}; {}.\n\n",
        cmd_out("uname", &["-sr"]),
        cfg.rounds,
        cfg.seconds,
        cfg.warmup,
        cmd_out("nginx", &["-v"]),
        cmd_out("squid", &["-v"]),
        cmd_out("danted", &["-v"]),
    ));
    md.push_str(
        "Columns: req/s median of rounds and its spread ((max−min)/median); × floor: median over rounds of \
         req/s ÷ the floor's in the same round (sidecar/nginx direct vs straight to upstream, via Squid/Dante \
         vs straight through that proxy); latencies pooled over rounds; first byte p99 × floor: median over rounds \
         of the cell's first-byte p99 ÷ the floor's in the same round, and its spread (one burst of the \
         host's noise in one cell moves the pooled p99, not the median ratio); fwd CPU: utime+stime of the forwarder \
         from /proc over the measured window ÷ requests; fwd peak RSS: VmHWM (summed over nginx's processes); \
         proxy CPU: Squid's / Dante's; upstream CPU: % of one core; upstream conns: connections the sidecar \
         (started fresh for each of its cells) opened; fwd kernel: share of the forwarder's CPU time in \
         the kernel (stime); fwd runs: times its threads got a CPU (/proc/PID/task/*/schedstat), its \
         wake-ups, ÷ requests; fwd sched wait: time the forwarder's threads were \
         runnable but not running (/proc/PID/task/*/schedstat: woken, then waiting for a CPU held by another \
         process or for an idle vCPU to wake) ÷ requests, latency the machine adds, not the forwarder's work; machine busy: all CPUs, from /proc/stat, median of rounds; errors: failed requests or \
         broken/reordered streams, warm-up included.\n\n",
    );
    for r in results {
        md.push_str(&format!("### {}\n\n{}\n", r.scenario.title(), r.table()));
    }
    md.push_str("### Upstream keeps up\n\n");
    for r in results {
        if let Some(f) = r.stats(Peer::Floor(Path3::Direct)) {
            if r.scenario.sse {
                md.push_str(&format!(
                    "- {}: straight to the SSE upstream, whole stream p50 {:.1} ms / p99 {:.1} ms against the \
                     95 ms schedule, first byte p50 {:.2} ms; upstream at {:.0}% of one core.\n",
                    r.scenario.name(),
                    f.p50_ms,
                    f.p99_ms,
                    f.ttfb_p50_ms,
                    f.up_pct
                ));
            } else {
                let best = r
                    .all_stats()
                    .iter()
                    .filter(|s| s.peer == Peer::Nginx || s.peer.is_sidecar())
                    .map(|s| s.rps)
                    .fold(0.0, f64::max);
                md.push_str(&format!(
                    "- {}: nginx upstream served {:.0} req/s straight (TLS), {:.2}× the fastest forwarder's {:.0}; \
                     upstream at {:.0}% of one core.\n",
                    r.scenario.name(),
                    f.rps,
                    f.rps / best.max(1.0),
                    best,
                    f.up_pct
                ));
            }
        }
    }
    let ab = report::build_b_lines(results);
    if !ab.is_empty() {
        md.push_str(&format!(
            "\n### Build B ({}) against build A ({})\n\n{ab}",
            cfg.setup
                .sidecar_b_bin
                .as_ref()
                .map_or_else(String::new, |b| b.display().to_string()),
            cfg.setup.sidecar_bin.display()
        ));
    }
    md.push_str("\n### Targets\n\n");
    md.push_str(&report::targets_table(&report::targets(results)));
    md
}
