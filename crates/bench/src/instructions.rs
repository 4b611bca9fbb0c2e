//! `provider-proxy-bench instructions` (`make bench-instructions`): user-space instructions
//! per request of each forwarder, counted by callgrind.
//!
//! The load benchmark's CPU per request moves by 10–20 % between runs on a shared 2-core
//! machine; an instruction count does not. Each forwarder runs under
//! `valgrind --tool=callgrind` on the same upstream as the load benchmark, gets a warm-up
//! (connections, TLS sessions, lazy set-up), then the counters are zeroed, `n` requests go
//! one after another on one keep-alive connection, and the counters are dumped. One
//! connection, so nothing is batched and every request costs the same: repeated runs agree
//! to a fraction of a percent. Instructions are not time (the kernel's share, 60 % of a
//! request here, and cache behaviour are not in them) but they show what a change in
//! user space is worth, and how our user space compares with nginx's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::load::{self, Expect, RequestTemplate, Target, Via};
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

    fn path(self) -> String {
        match self {
            Counted::Nginx => "/json/v1/messages".into(),
            Counted::Sidecar(p) => format!("/json-{}/v1/messages", p.as_str()),
        }
    }
}

pub fn main() -> Result<(), String> {
    for tool in ["valgrind", "callgrind_control"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("{tool} not found: apt-get install valgrind"));
        }
    }
    let requests = env_num("BENCH_INSTR_REQUESTS", 2000.0, 10.0, 1e6)? as u64;
    let warmup = env_num("BENCH_INSTR_WARMUP", 200.0, 1.0, 1e6)? as u64;
    let out = std::env::var_os("BENCH_OUT").map(PathBuf::from);
    eprintln!("bench: starting nginx (upstream), Squid, Dante …");
    let bench = Bench::start(&setup_options())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let template = RequestTemplate::new(false);
    let expect = Expect::Json {
        len: setup::json_answer().len(),
    };

    let mut rows = Vec::new();
    for fwd in Counted::ALL {
        eprintln!(
            "  {:<28} under callgrind: {warmup} requests warm-up, {requests} counted",
            fwd.label()
        );
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
        let target = Target {
            connect: addr,
            via: Via::Direct,
            upstream: bench.json_up,
            tls: None,
            path: fwd.path().parse().map_err(|e| format!("path: {e}"))?,
            host: addr.to_string().parse().map_err(|e| format!("host: {e}"))?,
        };
        let ir = rt
            .block_on(count(&guard, &target, &template, expect, warmup, requests))
            .and_then(|()| latest_dump_total(&profile, guard.pid()))
            .map_err(|e| format!("{}: {e} (log: {})", fwd.label(), log.display()))?;
        let per_request = ir as f64 / requests as f64;
        eprintln!("  {:<28} {per_request:.0} instructions per request", "");
        rows.push((fwd, per_request));
        drop(guard);
    }

    let md = render(&rows, requests, warmup);
    println!("\n{md}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("instructions.md");
        std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// Warm up, zero the counters, send `requests`, dump.
async fn count(
    guard: &ProcGuard,
    target: &Target,
    template: &RequestTemplate,
    expect: Expect,
    warmup: u64,
    requests: u64,
) -> Result<(), String> {
    load::run_sequential(target, template, expect, warmup).await?;
    callgrind_control("-z", guard.pid())?;
    load::run_sequential(target, template, expect, requests).await?;
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

/// The instruction total in process `pid`'s last dump: `<profile>.<pid>.<n>`, largest `n`.
fn latest_dump_total(profile: &Path, pid: u32) -> Result<u64, String> {
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
    parse_total(&text).ok_or_else(|| format!("{}: no instruction total", path.display()))
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

fn render(rows: &[(Counted, f64)], requests: u64, warmup: u64) -> String {
    let nginx = rows
        .iter()
        .find(|(f, _)| *f == Counted::Nginx)
        .map(|(_, n)| *n);
    let direct = rows
        .iter()
        .find(|(f, _)| *f == Counted::Sidecar(Path3::Direct))
        .map(|(_, n)| *n);
    let mut md = format!(
        "## Instructions per request (callgrind)\n\n\
         User-space instructions per JSON request (~1 KiB answer, upstream over TLS), counted by \
         `valgrind --tool=callgrind` over {requests} requests sent one after another on one \
         keep-alive connection, after {warmup} warm-up requests. Repeatable to a fraction of a \
         percent, unlike CPU time on a shared machine; the kernel's work (about 60 % of a request's \
         CPU here) is not in it. valgrind's CPU has no VAES, so AES-GCM is counted on its AES-NI \
         path for both nginx (OpenSSL) and the sidecar (ring).\n\n\
         | forwarder | instructions per request | × nginx | × sidecar direct |\n\
         |---|---:|---:|---:|\n"
    );
    let ratio = |x: f64, base: Option<f64>| {
        base.map_or_else(|| "–".to_owned(), |b| format!("{:.2}", x / b))
    };
    for (fwd, n) in rows {
        md.push_str(&format!(
            "| {} | {n:.0} | {} | {} |\n",
            fwd.label(),
            ratio(*n, nginx),
            ratio(*n, direct)
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
