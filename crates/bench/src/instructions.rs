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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::load::{Expect, RequestTemplate, Sequential, Target, Via};
use crate::procs::ProcGuard;
use crate::run::{env_num, setup_options};
use crate::setup::{self, Bench, Path3};

/// valgrind starts a program 20–50× slower than it runs natively.
const START: Duration = Duration::from_secs(90);

/// A forwarder whose instructions are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Nginx,
    Sidecar(Path3),
}

impl Counted {
    const ALL: [Counted; 4] = [
        Counted::Nginx,
        Counted::Sidecar(Path3::Direct),
        Counted::Sidecar(Path3::Squid),
        Counted::Sidecar(Path3::Dante),
    ];

    fn label(self) -> String {
        match self {
            Counted::Nginx => "nginx reverse proxy, direct".into(),
            Counted::Sidecar(Path3::Direct) => "sidecar, direct".into(),
            Counted::Sidecar(Path3::Squid) => "sidecar via Squid".into(),
            Counted::Sidecar(Path3::Dante) => "sidecar via Dante".into(),
        }
    }

    fn key(self) -> String {
        match self {
            Counted::Nginx => "nginx".into(),
            Counted::Sidecar(p) => format!("sidecar-{}", p.as_str()),
        }
    }

    /// `kind`: `json` or `sse`.
    fn path(self, kind: &str) -> String {
        match self {
            Counted::Nginx => format!("/{kind}/v1/messages"),
            Counted::Sidecar(p) => format!("/{kind}-{}/v1/messages", p.as_str()),
        }
    }
}

pub fn main() -> Result<(), String> {
    for tool in ["valgrind", "callgrind_control"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("{tool} not found: apt-get install valgrind"));
        }
    }
    let json = Leg {
        kind: "json",
        template: RequestTemplate::new(false),
        expect: Expect::Json {
            len: setup::json_answer().len(),
        },
        warmup: env_num("BENCH_INSTR_WARMUP", 200.0, 1.0, 1e6)? as u64,
        counted: env_num("BENCH_INSTR_REQUESTS", 2000.0, 10.0, 1e6)? as u64,
    };
    let sse = Leg {
        kind: "sse",
        template: RequestTemplate::new(true),
        expect: Expect::Sse {
            events: crate::sse::EVENTS,
        },
        warmup: 10,
        counted: env_num("BENCH_INSTR_STREAMS", 100.0, 1.0, 1e5)? as u64,
    };
    let out = std::env::var_os("BENCH_OUT").map(PathBuf::from);
    let keep = std::env::var_os("BENCH_INSTR_PROFILES").map(PathBuf::from);
    if let Some(dir) = &keep {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    eprintln!("bench: starting nginx (upstream), Squid, Dante …");
    let bench = Bench::start(&setup_options())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;

    let mut rows = Vec::new();
    for fwd in Counted::ALL {
        eprintln!("  {:<28} under callgrind", fwd.label());
        let profile = bench.dir.path().join(format!("callgrind-{}", fwd.key()));
        let tool = vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--dump-instr=no".to_owned(),
            format!("--callgrind-out-file={}.%p", profile.display()),
        ];
        let log = bench
            .dir
            .path()
            .join(format!("{}-callgrind.log", fwd.key()));
        let (guard, addr) = match fwd {
            Counted::Nginx => bench.spawn_nginx_rp_under(&tool, &log, START)?,
            Counted::Sidecar(_) => bench.spawn_sidecar_under(&tool, &log, START)?,
        };
        let mut per_leg = [0.0; 2];
        for (leg, per) in [&json, &sse].into_iter().zip(&mut per_leg) {
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
            let (ir, dump) = rt
                .block_on(count(&guard, &target, leg))
                .and_then(|()| latest_dump(&profile, guard.pid()))
                .map_err(|e| {
                    format!(
                        "{} ({}): {e} (log: {})",
                        fwd.label(),
                        leg.kind,
                        log.display()
                    )
                })?;
            *per = ir as f64 / leg.counted as f64;
            eprintln!(
                "  {:<28} {}: {:.0} instructions per request",
                "", leg.kind, *per
            );
            if let Some(dir) = &keep {
                let kept = dir.join(format!("callgrind.{}.{}.out", fwd.key(), leg.kind));
                std::fs::copy(&dump, &kept).map_err(|e| format!("{}: {e}", kept.display()))?;
                eprintln!(
                    "  {:<28} profile: callgrind_annotate --inclusive=yes {}",
                    "",
                    kept.display()
                );
            }
        }
        rows.push(Row {
            fwd,
            json: per_leg[0],
            sse_stream: per_leg[1],
        });
        drop(guard);
    }

    let md = render(&rows, &json, &sse);
    println!("\n{md}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("instructions.md");
        std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// What one leg of the count sends: `warmup` exchanges, then `counted` ones between zeroing
/// and dumping the counters.
struct Leg {
    kind: &'static str,
    template: RequestTemplate,
    expect: Expect,
    warmup: u64,
    counted: u64,
}

/// One forwarder's counts: per JSON request, per SSE stream (request, headers and
/// `sse::EVENTS` events).
struct Row {
    fwd: Counted,
    json: f64,
    sse_stream: f64,
}

/// Warm up, zero the counters, send the counted exchanges, dump. All on one connection:
/// the sidecar deals connections to its workers round-robin and each worker has its own
/// upstream connections, so a second connection would count a TLS handshake.
async fn count(guard: &ProcGuard, target: &Target, leg: &Leg) -> Result<(), String> {
    let mut client = Sequential::connect(target).await?;
    client
        .run(target, &leg.template, leg.expect, leg.warmup)
        .await?;
    callgrind_control("-z", guard.pid())?;
    client
        .run(target, &leg.template, leg.expect, leg.counted)
        .await?;
    callgrind_control("-d", guard.pid())
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

/// Process `pid`'s last dump (`<profile>.<pid>.<n>`, largest `n`) and its instruction total.
fn latest_dump(profile: &Path, pid: u32) -> Result<(u64, PathBuf), String> {
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
        parse_total(&text).ok_or_else(|| format!("{}: no instruction total", path.display()))?;
    Ok((total, path))
}

/// `summary:` (or `totals:`) of a callgrind profile: instructions executed.
fn parse_total(profile: &str) -> Option<u64> {
    profile.lines().find_map(|l| {
        let rest = l
            .strip_prefix("summary:")
            .or_else(|| l.strip_prefix("totals:"))?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn render(rows: &[Row], json: &Leg, sse: &Leg) -> String {
    let base = |pick: fn(&Row) -> f64, who: Counted| rows.iter().find(|r| r.fwd == who).map(pick);
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
    let ratio = |x: f64, base: Option<f64>| {
        base.map_or_else(|| "–".to_owned(), |b| format!("{:.2}", x / b))
    };
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} |\n",
            r.fwd.label(),
            r.json,
            ratio(r.json, base(|r| r.json, Counted::Nginx)),
            ratio(r.json, base(|r| r.json, Counted::Sidecar(Path3::Direct))),
            r.sse_stream,
            r.sse_stream / events,
            ratio(r.sse_stream, base(|r| r.sse_stream, Counted::Nginx)),
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
        assert_eq!(parse_total(dump), Some(93_451_234));
        assert_eq!(parse_total("totals: 77\n"), Some(77));
        assert_eq!(parse_total("events: Ir\n"), None);
    }
}
