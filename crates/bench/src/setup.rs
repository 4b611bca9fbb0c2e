//! Everything the benchmark runs against, on loopback: the TLS PKI, nginx as the upstream
//! (JSON over h1 + h2), the SSE upstream, nginx as a keep-alive reverse proxy, real Squid
//! (Basic auth) and real Dante (SOCKS5 username/password), and the release sidecar. Every
//! process lives in its own process group and is killed with it when [`Bench`] drops.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use provider_proxy_testkit::{Dante, DanteOptions, Squid, SquidOptions, TestPki};

use crate::procs::{self, ProcGuard};

pub const SQUID_USER: &str = "bench";
pub const SQUID_PASS: &str = "bench-squid-pass";
pub const DANTE_USER: &str = "ppbench";
pub const DANTE_PASS: &str = "bench-dante-pass";
const START: Duration = Duration::from_secs(15);
/// How long a sidecar may take to exit after SIGTERM once its cell's load has ended.
const SIDECAR_GRACE: Duration = Duration::from_secs(5);

/// The ~1 KiB JSON nginx answers on `POST /v1/messages` (no `'`, `$` or `\`: it sits in
/// an nginx single-quoted string).
pub fn json_answer() -> String {
    let text = "Here is a short answer from the benchmark upstream. It is long enough to make the \
                response body about one kibibyte, like a small real completion, so that the \
                forwarders move a realistic amount of data per request. The content is \
                irrelevant; the bytes are counted by the load generator on every response \
                to prove the body arrived whole through every forwarder and proxy.";
    let mut s = format!(
        "{{\"id\":\"msg_01BenchmarkUpstreamAnswer\",\"type\":\"message\",\"role\":\"assistant\",\
         \"model\":\"claude-bench-1\",\"content\":[{{\"type\":\"text\",\"text\":\"{text}\"}}],\
         \"stop_reason\":\"end_turn\",\"stop_sequence\":null,\
         \"usage\":{{\"input_tokens\":42,\"output_tokens\":96,\"cache_read_input_tokens\":0}},\"pad\":\""
    );
    while s.len() < 1024 - 2 {
        s.push('x');
    }
    s.push_str("\"}");
    s
}

/// Which outbound path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path3 {
    Direct,
    Squid,
    Dante,
}

impl Path3 {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Squid => "squid",
            Self::Dante => "dante",
        }
    }
}

/// A process group whose CPU and RSS are read from /proc.
#[derive(Clone, Copy, Debug)]
pub struct Group {
    pub pgid: u32,
}

/// The running bench environment. Field order is drop order: forwarders first.
pub struct Bench {
    /// Started fresh for each sidecar cell ([`Bench::start_sidecar`]), so its CPU and peak
    /// RSS are that cell's alone, and stopped after it.
    pub sidecar: Option<ProcGuard>,
    pub nginx_rp: ProcGuard,
    pub nginx_up: ProcGuard,
    pub sse_up: ProcGuard,
    pub squid: Squid,
    pub dante: Dante,
    pub squid_group: Group,
    pub dante_group: Group,
    pub pki: Arc<TestPki>,
    pub json_up: SocketAddr,
    pub sse_up_addr: SocketAddr,
    pub nginx_rp_addr: SocketAddr,
    pub sidecar_addr: SocketAddr,
    pub sidecar_admin: SocketAddr,
    pub squid_addr: SocketAddr,
    pub dante_addr: SocketAddr,
    pub squid_auth: String,
    pub dante_user: (String, String),
    sidecar_bin: PathBuf,
    sidecar_b_bin: Option<PathBuf>,
    sidecar_log: String,
    sidecar_starts: usize,
    pub dir: tempfile::TempDir,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Which sidecar a cell runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarRun {
    Default,
    /// One data-plane worker (`--worker-threads 1`).
    OneWorker,
    /// The build in `BENCH_SIDECAR_B_BIN`.
    BuildB,
}

/// Options from the environment that shape the processes.
pub struct SetupOptions {
    /// The release `provider-proxy` binary.
    pub sidecar_bin: PathBuf,
    /// A second build to compare with it (the `sidecar-b` peer).
    pub sidecar_b_bin: Option<PathBuf>,
    /// `RUST_LOG` for the sidecar.
    pub sidecar_log: String,
    /// `worker_processes` of both nginx instances.
    pub nginx_workers: String,
    /// Re-hash the Dante user's password with SHA-512 at 1000 rounds (~1 ms per check)
    /// instead of the system default yescrypt (~20 ms): Dante checks it on every SOCKS
    /// connection, and we measure forwarding, not crypt(3).
    pub cheap_dante_hash: bool,
}

/// `chpasswd -c SHA512 -s 1000` for the Dante user (Dante reads /etc/shadow per check).
fn cheapen_password(user: &(String, String)) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("chpasswd")
        .args(["-c", "SHA512", "-s", "1000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("chpasswd: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{}:{}\n", user.0, user.1).as_bytes())
            .map_err(|e| format!("chpasswd: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("chpasswd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "chpasswd -c SHA512 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Bench {
    /// Start everything; blocking (run it on a blocking thread). On error every process
    /// started so far is killed (guards drop).
    pub fn start(opts: &SetupOptions) -> Result<Bench, String> {
        let dir = tempfile::Builder::new()
            .prefix("ppbench-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let d = dir.path().to_path_buf();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("chmod {}: {e}", d.display()))?;
        }
        let pki = Arc::new(TestPki::new());
        let (ca, cert, key) = pki.write_to(&d);
        for sub in ["up", "rp"] {
            std::fs::create_dir_all(d.join(sub).join("tmp")).map_err(|e| format!("mkdir: {e}"))?;
        }

        // Upstream: nginx with the JSON answer, TLS, h1 + h2.
        let json_up = loopback(procs::free_port()?);
        let conf = nginx_upstream_conf(
            &d.join("up"),
            json_up,
            &cert,
            &key,
            NginxProcesses::Workers(&opts.nginx_workers),
        );
        let mut nginx_up = spawn_nginx("nginx (upstream)", &d.join("up"), &conf)?;
        procs::wait_listening(json_up, START, Some(&mut nginx_up))?;

        // Upstream: the SSE server, its own process.
        let sse_up_addr = loopback(procs::free_port()?);
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("sse-upstream")
            .arg("--listen")
            .arg(sse_up_addr.to_string())
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key);
        let mut sse_up = ProcGuard::spawn("SSE upstream", cmd, &d.join("sse-upstream.log"), true)?;
        procs::wait_listening(sse_up_addr, START, Some(&mut sse_up))?;

        // Real proxies (testkit guards: own temp dirs, process groups, system user).
        let squid = Squid::start(SquidOptions {
            users: vec![(SQUID_USER.into(), SQUID_PASS.into())],
            https: None,
        });
        let dante = Dante::start(DanteOptions {
            user: Some((DANTE_USER.into(), DANTE_PASS.into())),
        });
        let squid_addr = loopback(squid.http_port());
        let dante_addr = loopback(dante.port());
        let squid_group = Group {
            pgid: procs::pgid_listening_on(squid.http_port())?,
        };
        let dante_group = Group {
            pgid: procs::pgid_listening_on(dante.port())?,
        };
        let dante_user = dante.user().ok_or("dante started without a user")?;
        if opts.cheap_dante_hash {
            cheapen_password(&dante_user)?;
        }

        // nginx as keep-alive reverse proxy (direct path).
        let nginx_rp_addr = loopback(procs::free_port()?);
        let conf = nginx_rp_conf(
            &d.join("rp"),
            nginx_rp_addr,
            json_up,
            sse_up_addr,
            &ca,
            NginxProcesses::Workers(&opts.nginx_workers),
        );
        let mut nginx_rp = spawn_nginx("nginx (reverse proxy)", &d.join("rp"), &conf)?;
        procs::wait_listening(nginx_rp_addr, START, Some(&mut nginx_rp))?;

        // The sidecar's manifests; the process starts per cell.
        let manifests = d.join("manifests");
        std::fs::create_dir_all(&manifests).map_err(|e| format!("mkdir: {e}"))?;
        std::fs::write(
            manifests.join("bench.yaml"),
            sidecar_manifests(json_up, sse_up_addr, squid_addr, dante_addr, &dante_user),
        )
        .map_err(|e| format!("write manifests: {e}"))?;
        if let Some(b) = opts.sidecar_b_bin.as_ref().filter(|b| !b.is_file()) {
            return Err(format!("BENCH_SIDECAR_B_BIN: {} not found", b.display()));
        }
        if !opts.sidecar_bin.is_file() {
            return Err(format!(
                "sidecar binary {} not found: build it with `cargo build --release -p provider-proxy` \
                 or set BENCH_SIDECAR_BIN",
                opts.sidecar_bin.display()
            ));
        }

        let squid_auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{SQUID_USER}:{SQUID_PASS}"))
        );
        Ok(Bench {
            sidecar: None,
            sidecar_bin: opts.sidecar_bin.clone(),
            sidecar_b_bin: opts.sidecar_b_bin.clone(),
            sidecar_log: opts.sidecar_log.clone(),
            sidecar_starts: 0,
            nginx_rp,
            nginx_up,
            sse_up,
            squid,
            dante,
            squid_group,
            dante_group,
            pki,
            json_up,
            sse_up_addr,
            nginx_rp_addr,
            sidecar_addr: loopback(0),
            sidecar_admin: loopback(0),
            squid_addr,
            dante_addr,
            squid_auth,
            dante_user,
            dir,
        })
    }

    /// (Re)start the sidecar on fresh ports; the previous one, if any, is killed first.
    pub fn start_sidecar(&mut self, run: SidecarRun) -> Result<(), String> {
        self.stop_sidecar();
        self.sidecar_starts += 1;
        let addr = loopback(procs::free_port()?);
        let admin = loopback(procs::free_port()?);
        let bin = self.sidecar_bin_for(run)?;
        let workers = if run == SidecarRun::OneWorker { 1 } else { 0 };
        let cmd = self.sidecar_command(Command::new(bin), addr, admin, workers);
        let log = self
            .dir
            .path()
            .join(format!("sidecar-{}.log", self.sidecar_starts));
        let mut guard = ProcGuard::spawn("sidecar", cmd, &log, false)?;
        procs::wait_listening(addr, START, Some(&mut guard))?;
        wait_ready(admin, START)?;
        self.sidecar = Some(guard);
        self.sidecar_addr = addr;
        self.sidecar_admin = admin;
        Ok(())
    }

    /// The build `run` runs.
    fn sidecar_bin_for(&self, run: SidecarRun) -> Result<&Path, String> {
        match (run, &self.sidecar_b_bin) {
            (SidecarRun::BuildB, Some(b)) => Ok(b),
            (SidecarRun::BuildB, None) => Err("no BENCH_SIDECAR_B_BIN to run".into()),
            _ => Ok(&self.sidecar_bin),
        }
    }

    /// `cmd` (the sidecar binary, or a tool that runs it: its arguments so far) with the
    /// sidecar's own arguments and environment: the bench manifests, `addr` and `admin`,
    /// `workers` data-plane threads (0: one per core).
    fn sidecar_command(
        &self,
        mut cmd: Command,
        addr: SocketAddr,
        admin: SocketAddr,
        workers: usize,
    ) -> Command {
        let d = self.dir.path();
        cmd.arg("sidecar")
            .arg("--config")
            .arg(d.join("manifests"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--worker-threads")
            .arg(workers.to_string())
            .env("SSL_CERT_FILE", d.join("ca.crt"))
            .env("RUST_LOG", &self.sidecar_log);
        cmd
    }

    /// The sidecar build `run` under `tool` (e.g. valgrind and its arguments), on fresh
    /// ports; returns its data and admin addresses once it is ready (within `timeout`:
    /// tools are slow to start).
    pub fn spawn_sidecar_under(
        &self,
        tool: &[String],
        run: SidecarRun,
        log: &Path,
        timeout: Duration,
    ) -> Result<(ProcGuard, SocketAddr, SocketAddr), String> {
        let (program, args) = tool
            .split_first()
            .ok_or("no tool to run the sidecar under")?;
        let mut cmd = Command::new(program);
        cmd.args(args).arg(self.sidecar_bin_for(run)?);
        let addr = loopback(procs::free_port()?);
        let admin = loopback(procs::free_port()?);
        let cmd = self.sidecar_command(cmd, addr, admin, 0);
        let mut guard = ProcGuard::spawn("sidecar", cmd, log, false)?;
        procs::wait_listening(addr, timeout, Some(&mut guard))?;
        wait_ready(admin, timeout)?;
        Ok((guard, addr, admin))
    }

    /// A second nginx reverse proxy, configured as the first but as one process (no
    /// master, one worker), under `tool`; returns its address once it listens.
    pub fn spawn_nginx_rp_under(
        &self,
        tool: &[String],
        log: &Path,
        timeout: Duration,
    ) -> Result<(ProcGuard, SocketAddr), String> {
        let prefix = self.dir.path().join("rp-tool");
        std::fs::create_dir_all(prefix.join("tmp")).map_err(|e| format!("mkdir: {e}"))?;
        let addr = loopback(procs::free_port()?);
        let conf = nginx_rp_conf(
            &prefix,
            addr,
            self.json_up,
            self.sse_up_addr,
            &self.dir.path().join("ca.crt"),
            NginxProcesses::Single,
        );
        let name = "nginx (reverse proxy, counted)";
        let mut guard = spawn_nginx_under(tool, name, &prefix, &conf, log)?;
        procs::wait_listening(addr, timeout, Some(&mut guard))?;
        Ok((guard, addr))
    }

    pub fn stop_sidecar(&mut self) {
        // Its load has ended, so an exit that takes longer is a shutdown that hangs.
        if let Some(sidecar) = self.sidecar.take()
            && !sidecar.stop(SIDECAR_GRACE)
        {
            eprintln!(
                "bench: WARNING: the sidecar did not exit within {SIDECAR_GRACE:?} of SIGTERM (killed)"
            );
        }
    }

    pub fn sidecar_group(&self) -> Option<Group> {
        self.sidecar.as_ref().map(|s| Group { pgid: s.pid() })
    }
    pub fn nginx_rp_group(&self) -> Group {
        Group {
            pgid: self.nginx_rp.pid(),
        }
    }
    pub fn nginx_up_group(&self) -> Group {
        Group {
            pgid: self.nginx_up.pid(),
        }
    }
    pub fn sse_up_group(&self) -> Group {
        Group {
            pgid: self.sse_up.pid(),
        }
    }

    /// The last lines of the current sidecar's log (for error reports).
    pub fn sidecar_log_tail(&self) -> String {
        let path = self
            .dir
            .path()
            .join(format!("sidecar-{}.log", self.sidecar_starts));
        let s = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Whether the processes we started ourselves are all still alive.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for g in [
            self.sidecar.as_mut(),
            Some(&mut self.nginx_rp),
            Some(&mut self.nginx_up),
            Some(&mut self.sse_up),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(st) = g.exited() {
                return Err(format!("{} died ({st})", g.name()));
            }
        }
        Ok(())
    }
}

/// `GET path` on the admin port, the whole answer (head and body), `Connection: close`.
pub fn admin_get(admin: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Bench {
    /// Upstream connections the current sidecar opened so far (its own metric).
    pub fn sidecar_connections(&self) -> Option<u64> {
        sidecar_connections(self.sidecar_admin)
    }
}

/// Upstream connections the sidecar with admin address `admin` opened so far.
pub fn sidecar_connections(admin: SocketAddr) -> Option<u64> {
    let text = admin_get(admin, "/metrics").ok()?;
    let n = text
        .lines()
        .filter(|l| {
            l.starts_with("provider_proxy_upstream_connections_total{")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(n as u64)
}

/// Poll the sidecar's `/readyz` until it answers 200 (config loaded), at most `timeout`.
fn wait_ready(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ok = admin_get(admin, "/readyz").is_ok_and(|out| out.starts_with("HTTP/1.1 200"));
        if ok {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "sidecar not ready on http://{admin}/readyz after {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_nginx(name: &str, prefix: &Path, conf: &str) -> Result<ProcGuard, String> {
    spawn_nginx_under(&[], name, prefix, conf, &prefix.join("nginx.out"))
}

/// nginx with `conf`, run by `tool` (its command line; empty: nginx itself), its output
/// to `log`.
fn spawn_nginx_under(
    tool: &[String],
    name: &str,
    prefix: &Path,
    conf: &str,
    log: &Path,
) -> Result<ProcGuard, String> {
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| format!("write {}: {e}", path.display()))?;
    let mut cmd = match tool.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg("nginx");
            c
        }
        None => Command::new("nginx"),
    };
    cmd.arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(prefix.join("error.log"));
    let check = Command::new("nginx")
        .arg("-t")
        .arg("-q")
        .arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .output()
        .map_err(|e| format!("nginx is not installed? ({e}); run `make deps`"))?;
    if !check.status.success() {
        return Err(format!(
            "{name}: nginx -t rejected the config: {}\n{conf}",
            String::from_utf8_lossy(&check.stderr)
        ));
    }
    ProcGuard::spawn(name, cmd, log, false)
}

/// How an nginx instance runs.
#[derive(Clone, Copy)]
enum NginxProcesses<'a> {
    /// A master and `worker_processes` workers (`auto` or a number).
    Workers(&'a str),
    /// One process doing everything (for a tool that follows one process).
    Single,
}

fn nginx_common(prefix: &Path, processes: NginxProcesses) -> String {
    let p = prefix.display();
    let (master, workers) = match processes {
        NginxProcesses::Workers(w) => ("on", w),
        NginxProcesses::Single => ("off", "1"),
    };
    format!(
        "daemon off;\nmaster_process {master};\nuser root;\nworker_processes {workers};\n\
         worker_rlimit_nofile 65536;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
         events {{ worker_connections 16384; multi_accept on; }}\n"
    )
}

fn nginx_http_common(prefix: &Path) -> String {
    let t = prefix.join("tmp");
    let t = t.display();
    format!(
        "  access_log off;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n\
         \x20 fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n\
         \x20 keepalive_requests 100000000;\n  keepalive_timeout 600s;\n  tcp_nodelay on;\n"
    )
}

fn nginx_upstream_conf(
    prefix: &Path,
    listen: SocketAddr,
    cert: &Path,
    key: &Path,
    processes: NginxProcesses,
) -> String {
    let mut c = nginx_common(prefix, processes);
    c.push_str("http {\n");
    c.push_str(&nginx_http_common(prefix));
    let _ = write!(
        c,
        "  server {{\n    listen {listen} ssl http2 backlog=4096;\n\
         \x20   ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
         \x20   ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:up:10m;\n\
         \x20   http2_max_concurrent_streams 1024;\n\
         \x20   location = /v1/messages {{\n      default_type application/json;\n\
         \x20     return 200 '{body}';\n    }}\n\
         \x20   location / {{ return 404; }}\n  }}\n}}\n",
        cert = cert.display(),
        key = key.display(),
        body = json_answer(),
    );
    c
}

fn nginx_rp_conf(
    prefix: &Path,
    listen: SocketAddr,
    json_up: SocketAddr,
    sse_up: SocketAddr,
    ca: &Path,
    processes: NginxProcesses,
) -> String {
    let mut c = nginx_common(prefix, processes);
    c.push_str("http {\n");
    c.push_str(&nginx_http_common(prefix));
    for (name, addr) in [("json_up", json_up), ("sse_up", sse_up)] {
        let _ = writeln!(
            c,
            "  upstream {name} {{ server {addr}; keepalive 1024; keepalive_requests 100000000; keepalive_timeout 600s; }}"
        );
    }
    let _ = write!(c, "  server {{\n    listen {listen} backlog=4096;\n");
    for (loc, up, extra) in [
        ("/json/", "json_up", ""),
        (
            "/sse/",
            "sse_up",
            "      proxy_buffering off;\n      proxy_cache off;\n      proxy_read_timeout 600s;\n",
        ),
    ] {
        let _ = write!(
            c,
            "    location {loc} {{\n      proxy_pass https://{up}/;\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n      proxy_ssl_server_name on;\n\
             \x20     proxy_ssl_name localhost;\n      proxy_ssl_verify on;\n\
             \x20     proxy_ssl_trusted_certificate {ca};\n      proxy_ssl_session_reuse on;\n{extra}    }}\n",
            ca = ca.display()
        );
    }
    c.push_str("  }\n}\n");
    c
}

/// Providers `json-{direct,squid,dante}` and `sse-{direct,squid,dante}` and their Secrets.
fn sidecar_manifests(
    json_up: SocketAddr,
    sse_up: SocketAddr,
    squid: SocketAddr,
    dante: SocketAddr,
    dante_user: &(String, String),
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: squid-login, namespace: bench}}\n\
         stringData: {{username: {SQUID_USER}, password: {SQUID_PASS}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: dante-login, namespace: bench}}\n\
         stringData: {{username: {}, password: {}}}\n",
        dante_user.0, dante_user.1
    );
    for (kind, up) in [("json", json_up), ("sse", sse_up)] {
        for (path, proxy) in [
            (Path3::Direct, String::new()),
            (
                Path3::Squid,
                format!(
                    "  proxy: {{url: \"http://{squid}\", credentialsSecretRef: {{name: squid-login}}}}\n"
                ),
            ),
            (
                Path3::Dante,
                format!(
                    "  proxy: {{url: \"socks5://{dante}\", credentialsSecretRef: {{name: dante-login}}}}\n"
                ),
            ),
        ] {
            let _ = write!(
                y,
                "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\n\
                 metadata: {{name: {kind}-{p}, namespace: bench}}\nspec:\n\
                 \x20 upstream: \"https://{up}\"\n{proxy}  fallbackToDirect: false\n  http2: false\n",
                p = path.as_str()
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\n\
             metadata: {{name: {kind}-direct-h2, namespace: bench}}\nspec:\n\
             \x20 upstream: \"https://{up}\"\n  http2: true\n"
        );
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answer_is_about_one_kib_and_nginx_safe() {
        let a = json_answer();
        assert_eq!(a.len(), 1024);
        assert!(!a.contains('\'') && !a.contains('$') && !a.contains('\\'));
    }
}
