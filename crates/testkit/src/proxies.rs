//! Guards around **real** proxy processes on loopback: Squid (HTTP proxy,
//! optional TLS-to-proxy `https_port`, Basic auth), Dante (SOCKS5 with
//! username/password against a throwaway system user, or SOCKS4/5 without
//! auth), and microsocks (SOCKS5 with its own username/password).
//!
//! Each guard writes its config into its own temp dir, picks a free port
//! (never the same twice in one process), starts the daemon in its own
//! process group, and waits (at most 10 s) until the port is in LISTEN state
//! (read from `/proc/net/tcp`, so no probe connection shows up in the proxy's
//! logs). If the daemon exits or does not listen in time, `start` panics with
//! the daemon's log files. On drop the whole process group gets SIGKILL and
//! the daemon is reaped; Dante's system user is removed.
//!
//! `start` blocks the calling thread (typically well under a second); call it
//! before you depend on other tasks of a current-thread runtime making
//! progress, or from `tokio::task::spawn_blocking`.
//!
//! Observed behaviour worth knowing when writing assertions:
//!
//! - **Squid 5.7**: a `407` is `Connection: keep-alive` with a ~3 KB HTML
//!   body (`Proxy-Authenticate: Basic realm="provider-proxy-test"`); a retry
//!   with credentials on the same connection works. A `CONNECT` to a refused
//!   port gets **`503`** (not 502). A non-loopback target gets `403` (our
//!   ACL); an unresolvable hostname also gets `403`, after ~5 s (DNS goes to
//!   127.0.0.1, where nothing answers). Denied requests are logged at once,
//!   tunnels only when they close. Squid 5 creates `/dev/shm/<service>-cf__*`
//!   segments even without SMP, hence a unique `-n` service name per instance.
//! - **Dante 1.4.2**: with `socksmethod: username`, SOCKS4 and no-auth SOCKS5
//!   are refused (general failure / no acceptable methods); without auth it
//!   serves SOCKS4 and SOCKS5, but **not SOCKS4a** (hostname) requests. A
//!   refused target maps to SOCKS5 reply "connection refused", a target
//!   outside the rules to "not allowed by ruleset". Dante forks ~40 helper
//!   processes per instance.
//! - **microsocks**: SOCKS5 only (a SOCKS4 request is just closed); with a
//!   user configured, a client offering only "no auth" gets method `0xFF`.
//!
//! These must run as root (Squid drops to `proxy`, Dante checks system
//! passwords, and user accounts are created with `useradd`).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use crate::certs::TestPki;
use crate::util::{WaitOutcome, free_port, unique_suffix, wait_until_listening};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const START_ATTEMPTS: usize = 3;

/// A child process in its own process group, killed (whole group, SIGKILL)
/// and reaped on drop.
struct ProcGuard {
    child: Child,
}

impl ProcGuard {
    fn spawn(mut cmd: Command, out_log: &Path) -> ProcGuard {
        use std::os::unix::process::CommandExt;
        let out =
            File::create(out_log).unwrap_or_else(|e| panic!("create {}: {e}", out_log.display()));
        let err = out.try_clone().expect("clone log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                panic!(
                    "{:?} is not installed: apt-get install -y --no-install-recommends \
                     squid dante-server microsocks apache2-utils ({e})",
                    cmd.get_program()
                )
            }
            panic!("spawn {cmd:?}: {e}")
        });
        ProcGuard { child }
    }

    fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("try_wait failed: {e}")),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        let pid = self.child.id();
        // The child leads its own process group (process_group(0)), so this
        // also reaches helpers and worker children it forked.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn logs_of(files: &[PathBuf]) -> String {
    let mut s = String::new();
    for f in files {
        s.push_str(&format!("\n----- {} -----\n{}", f.display(), read_lossy(f)));
    }
    s
}

/// Runs `start_once` up to [`START_ATTEMPTS`] times while the failure looks
/// like a port clash with some other process; panics with the logs otherwise.
#[track_caller]
fn start_with_retries<T>(what: &str, mut start_once: impl FnMut() -> Result<T, String>) -> T {
    let mut last = String::new();
    for _ in 0..START_ATTEMPTS {
        match start_once() {
            Ok(v) => return v,
            Err(log) => {
                let clash = log.contains("in use") || log.contains("EADDRINUSE");
                last = log;
                if !clash {
                    break;
                }
            }
        }
    }
    panic!("{what} did not start:{last}");
}

fn run_checked(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

fn make_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir")
}

// ------------------------------------------------------------------ Squid

/// How to run [`Squid`].
#[derive(Clone, Debug, Default)]
pub struct SquidOptions {
    /// Basic-auth users; empty means no authentication at all.
    pub users: Vec<(String, String)>,
    /// Also listen with TLS (`https_port`, i.e. an HTTPS proxy) using this
    /// PKI's `localhost`/`127.0.0.1` leaf.
    pub https: Option<Arc<TestPki>>,
}

/// A real Squid 5 on `127.0.0.1`: `CONNECT` to any loopback port and plain
/// absolute-form requests to loopback are allowed (for authenticated users
/// when `users` is non-empty); every other destination is denied.
///
/// Squid writes a `CONNECT` line to the access log only when the tunnel
/// **closes**, so [`Squid::connect_count`] lags behind open tunnels; use
/// [`Squid::wait_connect_count`] after closing the client side.
pub struct Squid {
    http_port: u16,
    https_port: Option<u16>,
    service: String,
    dir: TempDir,
    proc: Option<ProcGuard>,
}

impl Drop for Squid {
    fn drop(&mut self) {
        // Kill first, then remove the shared-memory segments Squid 5 creates
        // even without SMP (`/dev/shm/<service>-cf__*.shm`, collapsed
        // forwarding); SIGKILL leaves them behind otherwise.
        drop(self.proc.take());
        if let Ok(entries) = fs::read_dir("/dev/shm") {
            let prefix = format!("{}-", self.service);
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl std::fmt::Debug for Squid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Squid")
            .field("http_port", &self.http_port)
            .field("https_port", &self.https_port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Squid {
    /// Starts Squid and waits until its port(s) listen. Panics with
    /// `cache.log`/stderr if it does not start within 10 s.
    #[track_caller]
    pub fn start(opts: SquidOptions) -> Squid {
        start_with_retries("squid", || Self::start_once(&opts))
    }

    fn start_once(opts: &SquidOptions) -> Result<Squid, String> {
        let dir = make_tempdir("ppt-squid-");
        let d = dir.path();
        let http_port = free_port();
        let https_port = opts.https.as_ref().map(|_| free_port());

        let mut conf = String::new();
        conf.push_str(&format!("http_port 127.0.0.1:{http_port}\n"));
        if let (Some(pki), Some(port)) = (&opts.https, https_port) {
            let (_, cert, key) = pki.write_to(d);
            conf.push_str(&format!(
                "https_port 127.0.0.1:{port} tls-cert={} tls-key={}\n",
                cert.display(),
                key.display()
            ));
        }
        if !opts.users.is_empty() {
            let passwd = d.join("passwd");
            for (i, (user, pass)) in opts.users.iter().enumerate() {
                let flags = if i == 0 { "-bc" } else { "-b" };
                run_checked(
                    Command::new("htpasswd")
                        .arg(flags)
                        .arg(&passwd)
                        .arg(user)
                        .arg(pass),
                )?;
            }
            conf.push_str(&format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\n",
                passwd.display()
            ));
            conf.push_str("auth_param basic children 2 startup=1 idle=1\n");
            conf.push_str("auth_param basic realm provider-proxy-test\n");
            conf.push_str("acl authed proxy_auth REQUIRED\n");
        }
        conf.push_str("acl loopback_dst dst 127.0.0.0/8 ::1\n");
        conf.push_str("http_access deny !loopback_dst\n");
        if opts.users.is_empty() {
            conf.push_str("http_access allow localhost\n");
        } else {
            conf.push_str("http_access allow localhost authed\n");
        }
        conf.push_str("http_access deny all\n");
        for line in [
            "cache deny all".to_string(),
            format!("pid_filename {}", d.join("squid.pid").display()),
            format!("access_log stdio:{}", d.join("access.log").display()),
            format!("cache_log {}", d.join("cache.log").display()),
            "cache_store_log none".to_string(),
            format!("coredump_dir {}", d.display()),
            "netdb_filename none".to_string(),
            "cache_effective_user proxy".to_string(),
            "visible_hostname provider-proxy-test".to_string(),
            "pinger_enable off".to_string(),
            "icp_port 0".to_string(),
            "htcp_port 0".to_string(),
            "shutdown_lifetime 1 seconds".to_string(),
            "logfile_rotate 0".to_string(),
            "dns_nameservers 127.0.0.1".to_string(),
            "dns_timeout 1 seconds".to_string(),
            "forwarded_for delete".to_string(),
            "via off".to_string(),
        ] {
            conf.push_str(&line);
            conf.push('\n');
        }
        let conf_path = d.join("squid.conf");
        fs::write(&conf_path, &conf).map_err(|e| format!("write squid.conf: {e}"))?;
        run_checked(Command::new("chown").arg("-R").arg("proxy:proxy").arg(d))?;

        let service = format!("ppt{}", unique_suffix(10));
        let out = d.join("squid.out");
        let mut cmd = Command::new("squid");
        cmd.args(["-N", "-d1", "-n", &service, "-f"])
            .arg(&conf_path);
        let out_log = out.clone();
        let cache_log = d.join("cache.log");
        let mut squid = Squid {
            http_port,
            https_port,
            service,
            proc: Some(ProcGuard::spawn(cmd, &out)),
            dir,
        };
        let ports: Vec<u16> = std::iter::once(http_port).chain(https_port).collect();
        let outcome = wait_until_listening(&ports, START_TIMEOUT, || {
            squid.proc.as_mut().and_then(ProcGuard::exit_status)
        });
        let logs = || {
            format!(
                "{}\n----- squid.conf -----\n{conf}",
                logs_of(&[out_log.clone(), cache_log.clone()])
            )
        };
        // On failure `squid` drops here: process group killed, shm removed.
        match outcome {
            WaitOutcome::Listening => Ok(squid),
            WaitOutcome::Exited(st) => Err(format!(" exited with {st}{}", logs())),
            WaitOutcome::TimedOut => {
                Err(format!(" not listening after {START_TIMEOUT:?}{}", logs()))
            }
        }
    }

    /// Plain HTTP proxy port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// TLS ("HTTPS proxy") port, when started with `https`.
    pub fn https_port(&self) -> Option<u16> {
        self.https_port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// `https://127.0.0.1:PORT` (the leaf has an IP SAN for 127.0.0.1, and
    /// `localhost` works too).
    pub fn https_url(&self) -> Option<String> {
        self.https_port.map(|p| format!("https://127.0.0.1:{p}"))
    }

    /// The temp dir holding config and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Current contents of the access log (native format:
    /// `time elapsed client code/status bytes method URL user hierarchy type`).
    pub fn access_log(&self) -> String {
        read_lossy(&self.dir.path().join("access.log"))
    }

    /// Current contents of `cache.log`.
    pub fn cache_log(&self) -> String {
        read_lossy(&self.dir.path().join("cache.log"))
    }

    /// Number of `CONNECT` lines in the access log, denied ones (e.g.
    /// `TCP_DENIED/407`) included. A denied `CONNECT` is logged at once, an
    /// established tunnel only when it **closes**.
    pub fn connect_count(&self) -> usize {
        self.count_lines(|method, _| method == "CONNECT")
    }

    /// Number of established-and-closed tunnels (`TCP_TUNNEL/200 ... CONNECT`
    /// lines). Squid logs a tunnel when it **closes**, not when it opens.
    pub fn tunnel_count(&self) -> usize {
        self.count_lines(|method, code| method == "CONNECT" && code.starts_with("TCP_TUNNEL/200"))
    }

    fn count_lines(&self, pred: impl Fn(&str, &str) -> bool) -> usize {
        self.access_log()
            .lines()
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 5 && pred(cols[5], cols[3])
            })
            .count()
    }

    /// Polls (every 50 ms, at most `timeout`) until [`Self::connect_count`]
    /// reaches `at_least`; returns the last count seen.
    pub async fn wait_connect_count(&self, at_least: usize, timeout: Duration) -> usize {
        self.wait_count(|| self.connect_count(), at_least, timeout)
            .await
    }

    /// Polls (every 50 ms, at most `timeout`) until [`Self::tunnel_count`]
    /// reaches `at_least`; returns the last count seen.
    pub async fn wait_tunnel_count(&self, at_least: usize, timeout: Duration) -> usize {
        self.wait_count(|| self.tunnel_count(), at_least, timeout)
            .await
    }

    async fn wait_count(
        &self,
        count: impl Fn() -> usize,
        at_least: usize,
        timeout: Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = count();
            if n >= at_least || tokio::time::Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ------------------------------------------------------------------ Dante

/// How to run [`Dante`].
#[derive(Clone, Debug, Default)]
pub struct DanteOptions {
    /// `Some((name, password))`: SOCKS5 with username/password. Dante checks
    /// **system** accounts, so a throwaway system user is created: its real
    /// name is `name` (lowercased, reduced to `[a-z0-9]`, at most 16 chars,
    /// `ppt` when empty) plus a random suffix — read it back with
    /// [`Dante::user`]. The password is used as given (no newline).
    ///
    /// `None`: no authentication (`socksmethod: none`), which serves both
    /// SOCKS5 and SOCKS4 (not SOCKS4a: use [`crate::fault::Behavior::Socks4a`]).
    pub user: Option<(String, String)>,
}

/// Serialises account changes within this process (useradd and friends
/// lock /etc/passwd and fail rather than wait).
static ACCOUNTS: Mutex<()> = Mutex::new(());

fn with_account_retries(mut f: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let _guard = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for _ in 0..20 {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        // Another process may hold the /etc/passwd lock.
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// A throwaway system account, deleted on drop.
struct SystemUser {
    name: String,
}

impl SystemUser {
    fn create(prefix: &str, password: &str) -> SystemUser {
        assert!(
            !password.contains('\n') && !password.contains('\r'),
            "dante test password must not contain a newline"
        );
        let mut base: String = prefix
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            .take(16)
            .collect();
        if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
            base.insert_str(0, "ppt");
            base.truncate(16);
        }
        let name = format!("{base}{}", unique_suffix(10));
        with_account_retries(|| {
            let exists = Command::new("id")
                .arg("-u")
                .arg(&name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !exists {
                run_checked(
                    Command::new("useradd")
                        .args(["-M", "-N", "-s", "/usr/sbin/nologin"])
                        .arg(&name),
                )?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("useradd {name}: {e}"));
        let user = SystemUser { name };
        with_account_retries(|| {
            use std::io::Write;
            let mut child = Command::new("chpasswd")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("spawn chpasswd: {e}"))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(format!("{}:{password}\n", user.name).as_bytes())
                    .map_err(|e| format!("write to chpasswd: {e}"))?;
            }
            let out = child
                .wait_with_output()
                .map_err(|e| format!("wait chpasswd: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "chpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .unwrap_or_else(|e| panic!("chpasswd {}: {e}", user.name));
        user
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        let _ = with_account_retries(|| run_checked(Command::new("userdel").arg(&self.name)));
    }
}

/// A real Dante (`danted`) SOCKS server on `127.0.0.1` allowing `CONNECT`
/// to `127.0.0.0/8` and to the hostname `localhost`.
pub struct Dante {
    port: u16,
    creds: Option<(String, String)>,
    dir: TempDir,
    // Declared before `_user`: the daemon dies before its account goes.
    _proc: ProcGuard,
    _user: Option<SystemUser>,
}

impl std::fmt::Debug for Dante {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dante")
            .field("port", &self.port)
            .field("user", &self.creds.as_ref().map(|c| &c.0))
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Dante {
    /// Starts danted and waits until it listens. Panics with its log if it
    /// does not start within 10 s.
    #[track_caller]
    pub fn start(opts: DanteOptions) -> Dante {
        let user = opts
            .user
            .as_ref()
            .map(|(name, pass)| SystemUser::create(name, pass));
        let creds = user
            .as_ref()
            .zip(opts.user.as_ref())
            .map(|(u, (_, pass))| (u.name.clone(), pass.clone()));
        let mut user = user;
        start_with_retries("danted", || Self::start_once(creds.clone(), &mut user))
    }

    fn start_once(
        creds: Option<(String, String)>,
        user: &mut Option<SystemUser>,
    ) -> Result<Dante, String> {
        let dir = make_tempdir("ppt-dante-");
        let d = dir.path();
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
        }
        let port = free_port();
        let log = d.join("socks.log");
        let (method, user_line) = match &creds {
            Some((name, _)) => ("username", format!("  user: {name}\n")),
            None => ("none", String::new()),
        };
        let mut conf = format!(
            "logoutput: {log}\n\
             internal: 127.0.0.1 port = {port}\n\
             external: 127.0.0.1\n\
             clientmethod: none\n\
             socksmethod: {method}\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}}\n",
            log = log.display()
        );
        for to in ["127.0.0.0/8", "localhost"] {
            conf.push_str(&format!(
                "socks pass {{\n  from: 127.0.0.0/8 to: {to}\n  socksmethod: {method}\n{user_line}  command: connect\n}}\n"
            ));
        }
        conf.push_str("socks block {\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}\n");
        let conf_path = d.join("danted.conf");
        fs::write(&conf_path, &conf).map_err(|e| format!("write danted.conf: {e}"))?;

        let out = d.join("danted.out");
        let mut cmd = Command::new("danted");
        cmd.arg("-f")
            .arg(&conf_path)
            .arg("-p")
            .arg(d.join("danted.pid"))
            .args(["-N", "1"]);
        let mut proc = ProcGuard::spawn(cmd, &out);
        let outcome = wait_until_listening(&[port], START_TIMEOUT, || proc.exit_status());
        let logs = || {
            format!(
                "{}\n----- danted.conf -----\n{conf}",
                logs_of(&[out.clone(), log.clone()])
            )
        };
        match outcome {
            WaitOutcome::Listening => Ok(Dante {
                port,
                creds,
                dir,
                _proc: proc,
                _user: user.take(),
            }),
            WaitOutcome::Exited(st) => Err(format!(" exited with {st}{}", logs())),
            WaitOutcome::TimedOut => {
                Err(format!(" not listening after {START_TIMEOUT:?}{}", logs()))
            }
        }
    }

    /// The SOCKS port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The real `(system user name, password)`, when started with a user.
    pub fn user(&self) -> Option<(String, String)> {
        self.creds.clone()
    }

    /// Current contents of Dante's log.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("socks.log"))
    }
}

// ------------------------------------------------------------- microsocks

/// A real microsocks SOCKS5 server on `127.0.0.1` (no system user needed).
pub struct Microsocks {
    port: u16,
    creds: Option<(String, String)>,
    dir: TempDir,
    _proc: ProcGuard,
}

impl std::fmt::Debug for Microsocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Microsocks")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Microsocks {
    /// SOCKS5 with username/password.
    #[track_caller]
    pub fn start(user: &str, pass: &str) -> Microsocks {
        Self::start_inner(Some((user.to_string(), pass.to_string())))
    }

    /// SOCKS5 without authentication.
    #[track_caller]
    pub fn start_no_auth() -> Microsocks {
        Self::start_inner(None)
    }

    #[track_caller]
    fn start_inner(creds: Option<(String, String)>) -> Microsocks {
        start_with_retries("microsocks", || {
            let dir = make_tempdir("ppt-microsocks-");
            let port = free_port();
            let out = dir.path().join("microsocks.out");
            let mut cmd = Command::new("microsocks");
            cmd.args([
                "-i",
                "127.0.0.1",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ]);
            if let Some((u, p)) = &creds {
                cmd.args(["-u", u, "-P", p]);
            }
            let mut proc = ProcGuard::spawn(cmd, &out);
            match wait_until_listening(&[port], START_TIMEOUT, || proc.exit_status()) {
                WaitOutcome::Listening => Ok(Microsocks {
                    port,
                    creds: creds.clone(),
                    dir,
                    _proc: proc,
                }),
                WaitOutcome::Exited(st) => Err(format!(
                    " exited with {st}{}",
                    logs_of(std::slice::from_ref(&out))
                )),
                WaitOutcome::TimedOut => Err(format!(
                    " not listening after {START_TIMEOUT:?}{}",
                    logs_of(std::slice::from_ref(&out))
                )),
            }
        })
    }

    /// The SOCKS5 port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `(user, password)` when started with auth.
    pub fn user(&self) -> Option<(String, String)> {
        self.creds.clone()
    }

    /// The daemon's output (microsocks prints little).
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("microsocks.out"))
    }

    /// PID of the daemon (e.g. to check it is gone after drop).
    pub fn pid(&self) -> u32 {
        self._proc.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{self, http_connect, raw_get};
    use crate::upstream::{Upstream, UpstreamOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_socks::tcp::socks4::Socks4Stream;
    use tokio_socks::tcp::socks5::Socks5Stream;

    const T: Duration = Duration::from_secs(10);

    fn users() -> Vec<(String, String)> {
        vec![
            ("alice".to_string(), "s3cret:with colon".to_string()),
            ("bob".to_string(), "pw".to_string()),
        ]
    }

    #[tokio::test]
    async fn squid_connect_auth_and_absolute_form() {
        let up = Upstream::start(UpstreamOptions::plain());
        let squid = Squid::start(SquidOptions {
            users: users(),
            https: None,
        });
        let target = up.addr().to_string();

        // wrong password → 407
        let mut s = TcpStream::connect(("127.0.0.1", squid.http_port()))
            .await
            .expect("connect");
        let r = tokio::time::timeout(T, http_connect(&mut s, &target, Some(("alice", "nope"))))
            .await
            .expect("bounded")
            .expect("reply");
        assert_eq!(r.status, 407, "{}", r.head);
        assert!(r.head.contains("Proxy-Authenticate: Basic"), "{}", r.head);
        drop(s);

        // right password → tunnel to a high loopback port
        let mut s = TcpStream::connect(("127.0.0.1", squid.http_port()))
            .await
            .expect("connect");
        let r = tokio::time::timeout(
            T,
            http_connect(&mut s, &target, Some(("alice", "s3cret:with colon"))),
        )
        .await
        .expect("bounded")
        .expect("reply");
        assert_eq!(r.status, 200, "{}", r.head);
        let resp = tokio::time::timeout(T, raw_get(&mut s, &target, "/v1/messages"))
            .await
            .expect("bounded")
            .expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        drop(s);
        assert_eq!(up.requests("/v1/messages"), 1);
        assert_eq!(
            squid.wait_tunnel_count(1, T).await,
            1,
            "{}",
            squid.access_log()
        );
        // the denied attempt is a CONNECT line too
        assert_eq!(squid.connect_count(), 2, "{}", squid.access_log());

        // absolute-form GET
        let mut s = TcpStream::connect(("127.0.0.1", squid.http_port()))
            .await
            .expect("connect");
        let req = format!(
            "GET http://{target}/v1/plain?q=1 HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            client::basic_auth("bob", "pw")
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(T, s.read_to_string(&mut out))
            .await
            .expect("bounded")
            .expect("read");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let last = up.last_request().expect("last");
        assert_eq!(last.path, "/v1/plain");
        assert_eq!(last.header("proxy-authorization"), None);
        assert!(squid.access_log().contains("/v1/plain"));
    }

    #[tokio::test]
    async fn squid_https_port_no_auth() {
        let pki = Arc::new(TestPki::new());
        let up = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
        let squid = Squid::start(SquidOptions {
            users: vec![],
            https: Some(pki.clone()),
        });
        let port = squid.https_port().expect("https port");
        assert!(squid.https_url().expect("url").ends_with(&port.to_string()));
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        // TLS to the proxy...
        let mut tls = client::tls_connect(tcp, &pki, "127.0.0.1", &[b"http/1.1"])
            .await
            .expect("tls to squid");
        let r = tokio::time::timeout(
            T,
            http_connect(&mut tls, &format!("localhost:{}", up.port()), None),
        )
        .await
        .expect("bounded")
        .expect("reply");
        assert_eq!(r.status, 200, "{}", r.head);
        // ...then TLS (h2) to the upstream inside the tunnel.
        let inner = client::tls_connect(tls, &pki, "localhost", &[b"h2"])
            .await
            .expect("tls in tunnel");
        let req = http::Request::get(up.url("/v1/messages"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let (parts, body) = tokio::time::timeout(T, client::send_h2(inner, req))
            .await
            .expect("bounded")
            .expect("h2");
        assert_eq!(parts.status, 200);
        assert!(String::from_utf8_lossy(&body).contains("HTTP/2.0"));
    }

    #[tokio::test]
    async fn dante_socks5_with_password_and_socks4_without() {
        let up = Upstream::start(UpstreamOptions::plain());
        let dante = Dante::start(DanteOptions {
            user: Some(("Alice-1".to_string(), "pa ss:word".to_string())),
        });
        let (name, pass) = dante.user().expect("user");
        assert!(name.starts_with("alice1") && name.len() <= 32, "{name}");
        let proxy = ("127.0.0.1", dante.port());

        let mut s = tokio::time::timeout(
            T,
            Socks5Stream::connect_with_password(proxy, up.addr(), &name, &pass),
        )
        .await
        .expect("bounded")
        .expect("socks5 auth ok");
        let resp = raw_get(&mut s, "x", "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

        // hostname target
        let mut s = tokio::time::timeout(
            T,
            Socks5Stream::connect_with_password(proxy, ("localhost", up.port()), &name, &pass),
        )
        .await
        .expect("bounded")
        .expect("socks5 hostname");
        let resp = raw_get(&mut s, "x", "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

        let bad = tokio::time::timeout(
            T,
            Socks5Stream::connect_with_password(proxy, up.addr(), &name, "wrong"),
        )
        .await
        .expect("bounded");
        assert!(bad.is_err(), "wrong password must fail");

        let open = Dante::start(DanteOptions { user: None });
        assert!(open.user().is_none());
        let mut s = tokio::time::timeout(
            T,
            Socks4Stream::connect(("127.0.0.1", open.port()), up.addr()),
        )
        .await
        .expect("bounded")
        .expect("socks4");
        let resp = raw_get(&mut s, "x", "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let mut s = tokio::time::timeout(
            T,
            Socks5Stream::connect(("127.0.0.1", open.port()), up.addr()),
        )
        .await
        .expect("bounded")
        .expect("socks5 no auth");
        let resp = raw_get(&mut s, "x", "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(up.requests("/v1/messages"), 4);

        drop(dante);
        let gone = Command::new("id")
            .arg("-u")
            .arg(&name)
            .output()
            .expect("id");
        assert!(!gone.status.success(), "system user {name} must be removed");
    }

    #[tokio::test]
    async fn microsocks_socks5_with_password() {
        let up = Upstream::start(UpstreamOptions::plain());
        let ms = Microsocks::start("mike", "pw");
        let proxy = ("127.0.0.1", ms.port());
        let mut s = tokio::time::timeout(
            T,
            Socks5Stream::connect_with_password(proxy, up.addr(), "mike", "pw"),
        )
        .await
        .expect("bounded")
        .expect("socks5");
        let resp = raw_get(&mut s, "x", "/v1/messages").await.expect("get");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let bad = tokio::time::timeout(
            T,
            Socks5Stream::connect_with_password(proxy, up.addr(), "mike", "nope"),
        )
        .await
        .expect("bounded");
        assert!(bad.is_err());
        let pid = ms.pid();
        drop(ms);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "microsocks reaped"
        );
    }
}
