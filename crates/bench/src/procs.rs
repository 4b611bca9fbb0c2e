//! Child processes (each in its own process group, killed with the whole group on drop),
//! free ports, waiting for listeners, and the /proc readings the tables are made of: CPU
//! time (utime+stime, children included) and peak RSS (VmHWM) summed over a process group.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A child in its own process group. Drop sends SIGKILL to the group and reaps the child,
/// so workers and helpers it forked (nginx workers) go too.
pub struct ProcGuard {
    name: String,
    child: Child,
    /// Held open so a child that watches stdin (our SSE upstream) exits when we die, even
    /// by SIGKILL.
    _stdin: Option<ChildStdin>,
}

impl ProcGuard {
    /// Spawn `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        keep_stdin: bool,
    ) -> Result<Self, String> {
        use std::os::unix::process::CommandExt;
        let out = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("dup {}: {e}", log.display()))?;
        cmd.stdin(if keep_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_owned(),
            child,
            _stdin: stdin,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("try_wait: {e}")),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stop the child as Kubernetes does: SIGTERM, then (drop) SIGKILL to the group if it
    /// has not exited within `grace`. A process that exits by itself runs its exit
    /// handlers: a profiling build writes its profile there. Whether it did, in time.
    pub fn stop(mut self, grace: Duration) -> bool {
        signal("-TERM", &self.child.id().to_string());
        let deadline = Instant::now() + grace;
        loop {
            if self.exited().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILL to process group `pgid`.
pub fn kill_group(pgid: u32) {
    signal("-KILL", &format!("-{pgid}"));
}

/// `kill SIGNAL -- TARGET` (a pid, or `-pgid` for a group): unsafe code is forbidden, so
/// through kill(1).
fn signal(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Wait (at most `timeout`) until something accepts connections on `addr`; fail early when
/// `guard`'s process exits.
pub fn wait_listening(
    addr: SocketAddr,
    timeout: Duration,
    mut guard: Option<&mut ProcGuard>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(g) = guard.as_deref_mut()
            && let Some(st) = g.exited()
        {
            return Err(format!(
                "{} exited ({st}) before listening on {addr}",
                g.name()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("nothing listens on {addr} after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Clock ticks per second for /proc/*/stat times (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// (pgrp, utime+stime+cutime+cstime) from one `/proc/PID/stat`.
fn stat_of(path: &Path) -> Option<(u32, u64)> {
    ticks_of(path).map(|(g, user, sys)| (g, user + sys))
}

/// (pgrp, user ticks, kernel ticks), reaped children included, from one `/proc/PID/stat`.
fn ticks_of(path: &Path) -> Option<(u32, u64, u64)> {
    let s = fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field N is f[N - 3]; utime 14, stime 15, cutime 16, cstime 17.
    let pgrp = f.get(2)?.parse().ok()?;
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some((pgrp, field(14)? + field(16)?, field(15)? + field(17)?))
}

fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn group_members(pgid: u32) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|pid| {
            stat_of(&Path::new("/proc").join(pid.to_string()).join("stat"))
                .is_some_and(|(g, _)| g == pgid)
        })
        .collect()
}

/// CPU ticks used so far by every process of group `pgid` (and its reaped children).
pub fn group_cpu_ticks(pgid: u32) -> u64 {
    let (user, sys) = group_user_sys_ticks(pgid);
    user + sys
}

/// (user, kernel) CPU ticks used so far by every process of group `pgid`.
pub fn group_user_sys_ticks(pgid: u32) -> (u64, u64) {
    pids()
        .into_iter()
        .filter_map(|pid| ticks_of(&Path::new("/proc").join(pid.to_string()).join("stat")))
        .filter(|(g, _, _)| *g == pgid)
        .fold((0, 0), |(u, s), (_, user, sys)| (u + user, s + sys))
}

/// What the scheduler did with the threads of a process group so far, summed over its
/// live threads (`/proc/PID/task/TID/schedstat`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sched {
    /// Nanoseconds runnable but not running: woken and waiting for a CPU.
    pub wait_ns: u64,
    /// Times a thread got a CPU: wake-ups, mostly, for an event-driven server.
    pub runs: u64,
}

pub fn group_sched(pgid: u32) -> Sched {
    group_members(pgid)
        .into_iter()
        .flat_map(|pid| {
            fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .filter_map(|task| {
            let s = fs::read_to_string(task.join("schedstat")).ok()?;
            let mut f = s.split_whitespace().skip(1);
            Some(Sched {
                wait_ns: f.next()?.parse().ok()?,
                runs: f.next()?.parse().ok()?,
            })
        })
        .fold(Sched::default(), |a, b| Sched {
            wait_ns: a.wait_ns + b.wait_ns,
            runs: a.runs + b.runs,
        })
}

/// (busy, total) clock ticks of all CPUs so far, from the `cpu` line of `/proc/stat`;
/// idle and iowait are not busy.
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total - idle, total))
}

/// CPU ticks used so far by this process.
pub fn self_cpu_ticks() -> u64 {
    stat_of(Path::new("/proc/self/stat")).map_or(0, |(_, t)| t)
}

/// Reset the peak RSS (VmHWM) of every process of group `pgid` (`echo 5 > clear_refs`).
pub fn reset_peak_rss(pgid: u32) {
    for pid in group_members(pgid) {
        let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// Sum of VmHWM (KiB) over the processes of group `pgid`.
pub fn group_peak_rss_kib(pgid: u32) -> u64 {
    group_members(pgid)
        .into_iter()
        .filter_map(|pid| {
            let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// The process group of the process listening on 127.0.0.1:`port` (found through the
/// socket inode in /proc/net/tcp and the /proc/*/fd links), for daemons whose guard does
/// not expose a PID (the testkit's Squid and Dante).
pub fn pgid_listening_on(port: u16) -> Result<u32, String> {
    let table = fs::read_to_string("/proc/net/tcp").map_err(|e| format!("/proc/net/tcp: {e}"))?;
    let wanted = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    let inode = table
        .lines()
        .skip(1)
        .find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() > 9 && cols[3] == "0A" && wanted.iter().any(|w| w == cols[1]))
                .then(|| cols[9].to_owned())
        })
        .ok_or_else(|| format!("nothing listens on 127.0.0.1:{port}"))?;
    let link = format!("socket:[{inode}]");
    for pid in pids() {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let owns = fds
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == link.as_str()));
        if owns {
            return stat_of(&Path::new("/proc").join(pid.to_string()).join("stat"))
                .map(|(g, _)| g)
                .ok_or_else(|| format!("cannot read /proc/{pid}/stat"));
        }
    }
    Err(format!("no process owns the listener on 127.0.0.1:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit handler of a shell stands in for the instrumented sidecar writing its
    /// profile (bench/pgo.sh): it runs only if the child is stopped by SIGTERM, not killed.
    #[test]
    fn stop_lets_the_child_run_its_exit_handler() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (ready, exited) = (dir.path().join("ready"), dir.path().join("exited"));
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "trap 'echo graceful > {}; exit 0' TERM; touch {}; while :; do sleep 0.05; done",
            exited.display(),
            ready.display()
        ));
        let child = ProcGuard::spawn("sh", cmd, &dir.path().join("log"), false)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            child.stop(Duration::from_secs(10)),
            "exited within the grace"
        );
        let said = fs::read_to_string(&exited).map_err(|e| format!("no exit handler ran: {e}"))?;
        assert_eq!(said.trim(), "graceful");
        Ok(())
    }
}
