//! `provider-proxy-bench instructions` (`make bench-instructions`): user-space instructions
//! per request of each forwarder, counted by callgrind.
//!
//! The load benchmark's CPU per request moves by 10–20 % between runs on a shared 2-core
//! machine; an instruction count does not. Each forwarder runs under
//! `valgrind --tool=callgrind` on the same upstream as the load benchmark, gets a warm-up
//! (connections, TLS sessions, lazy set-up), then the counters are zeroed, `n` requests go
//! one after another on one keep-alive connection, and the counters are dumped; then the
//! same for SSE streams (per stream and per event: a streamed answer's cost is its
//! events). One connection, so nothing is batched and every request costs the same:
//! repeated runs agree to a fraction of a percent. Instructions are not time (the
//! kernel's share, 60 % of a request here, and cache behaviour are not in them) but they
//! show what a change in user space is worth, and how our user space compares with
//! nginx's.
//!
//! A third count covers what one connection cannot show: JSON over many connections at
//! once (256) with callgrind's cache simulation on, for nginx and the sidecar direct, so
//! that per-connection state gone cold shows as L1d and L2 misses per request, and code
//! that does not fit the instruction cache as L1i misses.
//!
//! With `BENCH_SIDECAR_B_BIN` a second build is counted on the direct route as well (`make
//! bench-instructions`: the build without PGO, to show what the profile is worth).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::load::{Expect, RequestTemplate, Sequential, Target, Via};
use crate::procs::ProcGuard;
use crate::run::{env_num, setup_options};
use crate::setup::{self, Bench, Path3, SidecarRun};

/// valgrind starts a program 20–50× slower than it runs natively.
const START: Duration = Duration::from_secs(90);

/// A forwarder whose instructions are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Nginx,
    Sidecar(Path3),
    /// The build in `BENCH_SIDECAR_B_BIN`, direct.
    SidecarB,
}

impl Counted {
    /// The B build last, when there is one.
    fn all(with_b: bool) -> Vec<Counted> {
        let mut all = vec![
            Counted::Nginx,
            Counted::Sidecar(Path3::Direct),
            Counted::Sidecar(Path3::Squid),
            Counted::Sidecar(Path3::Dante),
        ];
        if with_b {
            all.push(Counted::SidecarB);
        }
        all
    }

    fn label(self) -> String {
        match self {
            Counted::Nginx => "nginx reverse proxy, direct".into(),
            Counted::Sidecar(Path3::Direct) => "sidecar, direct".into(),
            Counted::Sidecar(Path3::Squid) => "sidecar via Squid".into(),
            Counted::Sidecar(Path3::Dante) => "sidecar via Dante".into(),
            Counted::SidecarB => crate::report::sidecar_b_label(),
        }
    }

    fn key(self) -> String {
        match self {
            Counted::Nginx => "nginx".into(),
            Counted::Sidecar(p) => format!("sidecar-{}", p.as_str()),
            Counted::SidecarB => "sidecar-b".into(),
        }
    }

    /// `kind`: `json` or `sse`.
    fn path(self, kind: &str) -> String {
        match self {
            Counted::Nginx => format!("/{kind}/v1/messages"),
            Counted::Sidecar(p) => format!("/{kind}-{}/v1/messages", p.as_str()),
            // Build B on the same route as the direct row it is compared with.
            Counted::SidecarB => Counted::Sidecar(Path3::Direct).path(kind),
        }
    }
}

pub fn main() -> Result<(), String> {
    for tool in ["valgrind", "callgrind_control"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("{tool} not found: apt-get install valgrind"));
        }
    }
    let json_len = setup::json_answer().len();
    let json = Leg {
        kind: "json",
        template: Arc::new(RequestTemplate::new(false)),
        expect: Expect::Json { len: json_len },
        conns: 1,
        warmup: env_num("BENCH_INSTR_WARMUP", 200.0, 1.0, 1e6)? as u64,
        counted: env_num("BENCH_INSTR_REQUESTS", 2000.0, 10.0, 1e6)? as u64,
    };
    let sse = Leg {
        kind: "sse",
        template: Arc::new(RequestTemplate::new(true)),
        expect: Expect::Sse {
            events: crate::sse::EVENTS,
        },
        conns: 1,
        warmup: 10,
        counted: env_num("BENCH_INSTR_STREAMS", 100.0, 1.0, 1e5)? as u64,
    };
    let per_conn = env_num("BENCH_INSTR_CONN_REQUESTS", 16.0, 1.0, 1e5)? as u64;
    let many = Leg {
        kind: "json",
        template: Arc::new(RequestTemplate::new(false)),
        expect: Expect::Json { len: json_len },
        conns: env_num("BENCH_INSTR_CONNS", 256.0, 2.0, 4096.0)? as usize,
        // Warm-up rounds as long as the count (see `count`).
        warmup: per_conn,
        counted: per_conn,
    };

    let out = std::env::var_os("BENCH_OUT").map(PathBuf::from);
    let keep = std::env::var_os("BENCH_INSTR_PROFILES").map(PathBuf::from);
    if let Some(dir) = &keep {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    eprintln!("bench: starting nginx (upstream), Squid, Dante …");
    let options = setup_options();
    let with_b = options.sidecar_b_bin.is_some();
    let bench = Bench::start(&options)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;

    let mut rows = Vec::new();
    for fwd in Counted::all(with_b) {
        eprintln!("  {:<28} under callgrind", fwd.label());
        let profile = bench.dir.path().join(format!("callgrind-{}", fwd.key()));
        let mut tool = vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--dump-instr=no".to_owned(),
            format!("--callgrind-out-file={}.%p", profile.display()),
        ];
        tool.extend(CACHE.iter().map(|&a| a.to_owned()));
        let log = bench
            .dir
            .path()
            .join(format!("{}-callgrind.log", fwd.key()));
        let (guard, addr, admin) = match fwd {
            Counted::Nginx => {
                let (guard, addr) = bench.spawn_nginx_rp_under(&tool, &log, START)?;
                (guard, addr, None)
            }
            Counted::Sidecar(_) | Counted::SidecarB => {
                let run = if fwd == Counted::SidecarB {
                    SidecarRun::BuildB
                } else {
                    SidecarRun::Default
                };
                let (guard, addr, admin) = bench.spawn_sidecar_under(&tool, run, &log, START)?;
                (guard, addr, Some(admin))
            }
        };
        // nginx has no such count; its warm-up is one round.
        let opened = || admin.and_then(setup::sidecar_connections);
        let mut per_leg = [None; 3];
        for (leg, per) in [&json, &sse, &many].into_iter().zip(&mut per_leg) {
            // Many connections: nginx against the sidecar's direct route only; via Squid
            // or Dante a request costs the sidecar what it costs direct (the rows above).
            if leg.conns > 1 && matches!(fwd, Counted::Sidecar(p) if p != Path3::Direct) {
                continue;
            }
            let path = fwd.path(leg.kind);
            let target = Target {
                connect: addr,
                via: Via::Direct,
                upstream: if leg.kind == "sse" {
                    bench.sse_up_addr
                } else {
                    bench.json_up
                },
                tls: None,
                path: path.parse().map_err(|e| format!("path {path}: {e}"))?,
                host: addr.to_string().parse().map_err(|e| format!("host: {e}"))?,
            };
            let (counts, dump) = rt
                .block_on(count(&guard, &target, leg, &opened))
                .and_then(|()| latest_dump(&profile, guard.pid()))
                .map_err(|e| {
                    format!(
                        "{} ({}, {} connections): {e} (log: {})",
                        fwd.label(),
                        leg.kind,
                        leg.conns,
                        log.display()
                    )
                })?;
            let counts = counts.per(leg.exchanges());
            *per = Some(counts);
            eprintln!(
                "  {:<28} {} on {} connections: {:.0} instructions, {:.1} I1, {:.1} D1, {:.1} LL misses per request",
                "",
                leg.kind,
                leg.conns,
                counts.ir,
                counts.i1_misses,
                counts.d1_misses,
                counts.ll_misses
            );
            if let Some(dir) = &keep {
                let kept = dir.join(format!(
                    "callgrind.{}.{}-{}.out",
                    fwd.key(),
                    leg.kind,
                    leg.conns
                ));
                std::fs::copy(&dump, &kept).map_err(|e| format!("{}: {e}", kept.display()))?;
                eprintln!(
                    "  {:<28} profile: callgrind_annotate --inclusive=yes {}",
                    "",
                    kept.display()
                );
            }
        }
        let [Some(json), Some(sse_stream), many] = per_leg else {
            return Err(format!(
                "{}: a single-connection leg was not counted",
                fwd.label()
            ));
        };
        rows.push(Row {
            fwd,
            json,
            sse_stream,
            many,
        });
        drop(guard);
    }

    let md = render(&rows, &json, &sse, &many);
    println!("\n{md}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("instructions.md");
        std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// callgrind's cache simulation, sized as one core of the machine the figures were taken
/// on (32 KiB L1d; its 1 MiB L2 as callgrind's last level: the shared L3 is big enough to
/// hold everything here, so misses in L2 are the ones that cost). One simulated cache
/// for the whole process, so the sidecar's two workers share it as nginx's single worker
/// has its own: both forwarders keep every connection in one cache.
const CACHE: [&str; 4] = [
    "--cache-sim=yes",
    "--I1=32768,8,64",
    "--D1=32768,8,64",
    "--LL=1048576,8,64",
];

/// What one leg of the count sends: `warmup` exchanges, then `counted` ones between zeroing
/// and dumping the counters.
struct Leg {
    kind: &'static str,
    template: Arc<RequestTemplate>,
    expect: Expect,
    /// Keep-alive connections, each sending `warmup` then `counted` exchanges one after
    /// another, all connections at once.
    conns: usize,
    warmup: u64,
    counted: u64,
}

impl Leg {
    fn exchanges(&self) -> u64 {
        self.counted * self.conns as u64
    }
}

/// One forwarder's counts, per exchange: JSON request and SSE stream (request, headers
/// and `sse::EVENTS` events) on one connection, JSON request on many.
struct Row {
    fwd: Counted,
    json: Counts,
    sse_stream: Counts,
    many: Option<Counts>,
}

/// What callgrind counted: instructions, and data reads and writes that missed the
/// simulated L1 (`D1mr + D1mw`) and last level (`DLmr + DLmw`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counts {
    ir: f64,
    i1_misses: f64,
    d1_misses: f64,
    ll_misses: f64,
}

impl Counts {
    fn per(self, n: u64) -> Self {
        let n = n.max(1) as f64;
        Self {
            ir: self.ir / n,
            i1_misses: self.i1_misses / n,
            d1_misses: self.d1_misses / n,
            ll_misses: self.ll_misses / n,
        }
    }
}

/// Warm up, zero the counters, send the counted exchanges, dump. One connection when
/// `leg.conns` is 1: the sidecar deals connections to its workers round-robin and each
/// worker has its own upstream connections, so a second connection would count a TLS
/// handshake. With many, every connection is opened and warmed before the count, and all
/// send at once: what a busy forwarder's caches see.
///
/// No upstream connection may open during a count (a TLS handshake is worth ~10 JSON
/// requests). The sidecar's pool grows to the most requests a worker has had at once,
/// and under callgrind that depends on how the slow sidecar's ticks batch them: a warm-up
/// round can open none and the count still need a few more (34 of 256 once). So the
/// warm-up repeats until a round opens none (`opened`: the sidecar's count so far; nginx
/// has none and warms up once), and a count during which one opened is done again.
async fn count(
    guard: &ProcGuard,
    target: &Target,
    leg: &Leg,
    opened: &dyn Fn() -> Option<u64>,
) -> Result<(), String> {
    const ROUNDS: usize = 8;
    let target = Arc::new(target.clone());
    let template = leg.template.clone();
    let mut clients = Vec::with_capacity(leg.conns);
    for _ in 0..leg.conns {
        clients.push(Sequential::connect(&target).await?);
    }
    let mut seen = opened();
    for round in 1.. {
        clients = all(clients, &target, &template, leg.expect, leg.warmup).await?;
        let now = opened();
        if now == seen {
            break;
        }
        if round == ROUNDS {
            return Err(format!(
                "upstream connections still opening after {ROUNDS} warm-up rounds"
            ));
        }
        seen = now;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        callgrind_control("-z", guard.pid())?;
        clients = all(clients, &target, &template, leg.expect, leg.counted).await?;
        callgrind_control("-d", guard.pid())?;
        let now = opened();
        if now == seen {
            return Ok(());
        }
        if attempt == ROUNDS {
            return Err(format!(
                "upstream connections opened during each of {ROUNDS} counts"
            ));
        }
        seen = now;
    }
}

/// `n` exchanges on each client, all clients at once; the clients are handed back.
async fn all(
    clients: Vec<Sequential>,
    target: &Arc<Target>,
    template: &Arc<RequestTemplate>,
    expect: Expect,
    n: u64,
) -> Result<Vec<Sequential>, String> {
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        let (target, template) = (target.clone(), template.clone());
        tasks.spawn(async move {
            client.run(&target, &template, expect, n).await?;
            Ok::<_, String>(client)
        });
    }
    let mut back = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        back.push(done.map_err(|e| format!("client task: {e}"))??);
    }
    Ok(back)
}

fn callgrind_control(flag: &str, pid: u32) -> Result<(), String> {
    let out = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .output()
        .map_err(|e| format!("callgrind_control: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "callgrind_control {flag} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Process `pid`'s last dump (`<profile>.<pid>.<n>`, largest `n`) and its totals.
fn latest_dump(profile: &Path, pid: u32) -> Result<(Counts, PathBuf), String> {
    let dir = profile.parent().ok_or("profile path without a directory")?;
    let prefix = format!(
        "{}.{pid}.",
        profile
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    let latest = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let n = path
                .file_name()?
                .to_str()?
                .strip_prefix(&prefix)?
                .parse::<u32>()
                .ok()?;
            Some((n, path))
        })
        .max();
    let (_, path) = latest.ok_or_else(|| format!("no callgrind dump of process {pid}"))?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total =
        parse_counts(&text).ok_or_else(|| format!("{}: no event totals", path.display()))?;
    Ok((total, path))
}

/// The `summary:` (or `totals:`) line of a callgrind profile, read by the names on its
/// `events:` line. Without cache simulation the misses are zero.
fn parse_counts(profile: &str) -> Option<Counts> {
    let line = |prefix: &[&str]| {
        profile.lines().find_map(|l| {
            prefix
                .iter()
                .find_map(|p| l.strip_prefix(p))
                .map(str::split_whitespace)
        })
    };
    let names: Vec<&str> = line(&["events:"])?.collect();
    let values: Vec<u64> = line(&["summary:", "totals:"])?
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let get = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
            .map_or(0.0, |&v| v as f64)
    };
    let ir = names.iter().position(|n| *n == "Ir")?;
    Some(Counts {
        ir: *values.get(ir)? as f64,
        i1_misses: get("I1mr"),
        d1_misses: get("D1mr") + get("D1mw"),
        ll_misses: get("DLmr") + get("DLmw"),
    })
}

fn render(rows: &[Row], json: &Leg, sse: &Leg, many: &Leg) -> String {
    let base = |pick: fn(&Row) -> f64, who: Counted| rows.iter().find(|r| r.fwd == who).map(pick);
    let ratio = |x: f64, base: Option<f64>| {
        base.map_or_else(|| "–".to_owned(), |b| format!("{:.2}", x / b))
    };
    let events = f64::from(crate::sse::EVENTS);
    let mut md = format!(
        "## Instructions per request (callgrind)\n\n\
         User-space instructions, counted by `valgrind --tool=callgrind`, one exchange after \
         another on one keep-alive connection: per JSON request (~1 KiB answer, upstream over \
         TLS) over {} requests after {} warm-up ones, and per SSE stream ({events} events 5 ms \
         apart, upstream over TLS; each event is a wake-up, a TLS read and a chunk written) over \
         {} streams after {} warm-up ones. Repeatable to a fraction of a percent, unlike CPU time \
         on a shared machine; the kernel's work (about 60 % of a JSON request's CPU here) is not \
         in it. valgrind's CPU has no VAES, so AES-GCM is counted on its AES-NI path for both \
         nginx (OpenSSL) and the sidecar (ring).\n\n\
         | forwarder | JSON: per request | × nginx | × sidecar direct | SSE: per stream | per event | × nginx |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        json.counted, json.warmup, sse.counted, sse.warmup
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} |\n",
            r.fwd.label(),
            r.json.ir,
            ratio(r.json.ir, base(|r| r.json.ir, Counted::Nginx)),
            ratio(
                r.json.ir,
                base(|r| r.json.ir, Counted::Sidecar(Path3::Direct))
            ),
            r.sse_stream.ir,
            r.sse_stream.ir / events,
            ratio(r.sse_stream.ir, base(|r| r.sse_stream.ir, Counted::Nginx)),
        ));
    }
    md.push_str(&format!(
        "\n### Many connections: what a request costs the caches\n\n\
         JSON over {conns} keep-alive connections at once ({n} requests on each after {w} \
         warm-up ones, so every connection has its upstream connection), against the single \
         connection above; callgrind simulates one core's caches (32 KiB L1i and L1d, the 1 MiB \
         L2 as last level). Misses per request: an L1 miss costs a few ns, a last-level miss \
         tens. Instruction misses are code a request runs that is not in L1i (code size and \
         layout); the growth in data misses from one connection to {conns} is what connection \
         state that does not stay in cache costs.\n\n\
         | forwarder | instructions per request at {conns} | × nginx | × at 1 connection | L1i misses per request at 1 | at {conns} | × nginx | L1d misses per request at 1 | at {conns} | L2 misses per request at 1 | at {conns} | × nginx |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        conns = many.conns,
        n = many.counted,
        w = many.warmup,
    ));
    let nginx_many = rows
        .iter()
        .find(|r| r.fwd == Counted::Nginx)
        .and_then(|r| r.many);
    for r in rows {
        let Some(many) = r.many else { continue };
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} |\n",
            r.fwd.label(),
            many.ir,
            ratio(many.ir, nginx_many.map(|m| m.ir)),
            ratio(many.ir, Some(r.json.ir)),
            r.json.i1_misses,
            many.i1_misses,
            ratio(many.i1_misses, nginx_many.map(|m| m.i1_misses)),
            r.json.d1_misses,
            many.d1_misses,
            r.json.ll_misses,
            many.ll_misses,
            ratio(many.ll_misses, nginx_many.map(|m| m.ll_misses)),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_a_callgrind_dump() {
        let dump = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 4242\n\
                    cmd:  nginx\npart: 1\n\nevents: Ir\n\nsummary: 93451234\n\nfn=(1) main\n0 12\n";
        let counts = parse_counts(dump).map(|c| c.ir);
        assert_eq!(counts, Some(93_451_234.0));
        assert_eq!(parse_counts("events: Ir\n"), None);
        let simulated = "events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\n\
                         totals: 1000 300 200 7 40 20 3 9 1\n";
        assert_eq!(
            parse_counts(simulated),
            Some(Counts {
                ir: 1000.0,
                i1_misses: 7.0,
                d1_misses: 60.0,
                ll_misses: 10.0
            })
        );
    }
}
