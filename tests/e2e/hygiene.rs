//! Credential hygiene, proven on the real binary: distinctive passwords, every feature
//! exercised with trace logging, every output channel searched for the password in plain,
//! percent-encoded and base64 form.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use provider_proxy_testkit::{
    Behavior, ChildGuard, FaultProxy, Squid, SquidOptions, StderrTail, Upstream, UpstreamOptions,
    free_port,
};

use crate::observability::secret_forms;
use crate::support::*;

const SECRET_PASSWORD: &str = "Le@k%Me:If/You#Can";
const URL_PASSWORD: &str = "in-url@pa%ss:word";

/// The `provider-proxy` binary (`make test` builds it before the tests).
pub fn binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let bin = target.join("debug/provider-proxy");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p provider-proxy` (make test does)",
        bin.display()
    );
    bin
}

fn spawn_capturing_stderr(cmd: &mut Command) -> (ChildGuard, StderrTail) {
    ChildGuard::spawn_capturing_stderr(cmd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_in_any_output_channel() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = pki.write_to(dir.path());
    let upstream = Upstream::start(UpstreamOptions::tls_h2(pki.clone()));
    let squid = Squid::start(SquidOptions {
        users: vec![("alice".into(), SECRET_PASSWORD.into())],
        https: None,
    });
    let refuses = FaultProxy::start(Behavior::Status(407));
    let dies = FaultProxy::start(Behavior::ResetAfterBytes(3000));
    let base = upstream.base_url();
    let pct: String = secret_forms("x", URL_PASSWORD)[1].clone();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let proxy = |name: &str, url: String, extra: &str| {
        format!(
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: {name}, namespace: ai}}\nspec:\n  upstream: {base}\n{extra}  proxy:\n    url: \"{url}\"\n"
        )
    };
    let yaml = secret("login", "alice", SECRET_PASSWORD)
        + &proxy("ok", format!("http://127.0.0.1:{}", squid.http_port()), "")
        + "    credentialsSecretRef: {name: login}\n"
        + &proxy(
            "h2",
            format!("http://127.0.0.1:{}", squid.http_port()),
            "  http2: true\n",
        )
        + "    credentialsSecretRef: {name: login}\n"
        + &proxy(
            "refused",
            format!("http://127.0.0.1:{}", refuses.port()),
            "",
        )
        + "    credentialsSecretRef: {name: login}\n"
        + &proxy(
            "fallback",
            format!("http://127.0.0.1:{}", refuses.port()),
            "  fallbackToDirect: true\n",
        )
        + "    credentialsSecretRef: {name: login}\n"
        + &proxy(
            "inurl",
            format!("http://bob:{pct}@127.0.0.1:{}", dies.port()),
            "",
        )
        + &proxy(
            "socks",
            format!(
                "socks5://carol:{pct}@127.0.0.1:{}",
                provider_proxy_testkit::closed_port()
            ),
            "  fallbackToDirect: true\n  timeouts: {connect: 2s}\n",
        );
    std::fs::write(config.join("providers.yaml"), &yaml).unwrap();

    let (listen, admin) = (free_port(), free_port());
    let mut cmd = Command::new(binary());
    cmd.args(["sidecar", "--config"])
        .arg(&config)
        .args([
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .env("SSL_CERT_FILE", &ca)
        .env("RUST_LOG", "trace")
        .env("LOG_FORMAT", "json")
        // Not the machine's CPU count, so the worker threads below are the setting's.
        .env("WORKER_THREADS", "3")
        .stdout(Stdio::piped());
    let (sidecar, log_reader) = spawn_capturing_stderr(&mut cmd);

    let url = |p: &str| format!("http://127.0.0.1:{listen}{p}");
    let client = TestClient::new();
    let started = Instant::now();
    while client
        .get(&format!("http://127.0.0.1:{admin}/readyz"))
        .await
        .0
        != StatusCode::OK
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sidecar not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut outputs = Vec::new();
    for (path, want) in [
        ("/ok/v1/messages", StatusCode::OK),
        ("/h2/v1/messages", StatusCode::OK),
        ("/refused/v1/messages", StatusCode::SERVICE_UNAVAILABLE),
        ("/fallback/v1/messages", StatusCode::OK),
        ("/socks/v1/messages", StatusCode::OK),
        ("/ok/v1/sse?events=3&interval_ms=10", StatusCode::OK),
        ("/inurl/v1/sse?events=200&interval_ms=2", StatusCode::OK),
        ("/unknown/v1/x", StatusCode::NOT_FOUND),
    ] {
        let (status, body) = client.get(&url(path)).await;
        assert_eq!(status, want, "{path}: {body}");
        outputs.push((format!("response {path}"), body));
    }
    for p in ["/metrics", "/config", "/readyz"] {
        outputs.push((
            format!("admin {p}"),
            client.get(&format!("http://127.0.0.1:{admin}{p}")).await.1,
        ));
    }
    // The requests ran on the data-plane workers `WORKER_THREADS` asked for.
    let mut threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", sidecar.0.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("pp-worker"))
        .collect();
    threads.sort();
    assert_eq!(threads, ["pp-worker-1", "pp-worker-2", "pp-worker-3"]);
    drop(sidecar);
    outputs.push(("sidecar logs (trace, json)".into(), log_reader.finish()));

    // `check` and `--help`, at trace level too.
    for args in [vec!["check", "-f"], vec!["check", "--json", "-f"]] {
        let out = Command::new(binary())
            .args(&args)
            .arg(&config)
            .env("SSL_CERT_FILE", &ca)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("alice:***@"), "{text}");
        outputs.push((format!("{args:?}"), text));
    }
    for args in [
        vec!["--help"],
        vec!["sidecar", "--help"],
        vec!["controller", "--help"],
        vec!["check", "--help"],
    ] {
        let out = Command::new(binary()).args(&args).output().unwrap();
        outputs.push((
            format!("{args:?}"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ));
    }

    let mut forms = secret_forms("alice", SECRET_PASSWORD);
    forms.extend(secret_forms("bob", URL_PASSWORD));
    forms.extend(secret_forms("carol", URL_PASSWORD));
    for (channel, text) in &outputs {
        assert!(
            !text.is_empty() || channel.starts_with("response"),
            "{channel} is empty"
        );
        for f in &forms {
            assert!(!text.contains(f.as_str()), "{channel} leaks {f:?}");
        }
    }
    // The logs really were at trace level and did mention the proxies (masked).
    let logs = &outputs
        .iter()
        .find(|(c, _)| c.starts_with("sidecar logs"))
        .unwrap()
        .1;
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "trace logging was not on"
    );
    assert!(logs.contains("alice:***@"), "masked proxy not logged");
}

/// A tiny HTTP client for these tests: (status, body).
struct TestClient(
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
);

impl TestClient {
    fn new() -> Self {
        Self(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http(),
        )
    }

    async fn get(&self, url: &str) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let req = http::Request::get(url)
            .body(http_body_util::Full::default())
            .unwrap();
        let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(20), self.0.request(req)).await
        else {
            return (StatusCode::INTERNAL_SERVER_ERROR, "no answer".into());
        };
        let status = resp.status();
        let body =
            match tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect()).await {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                _ => String::from("<body broke>"),
            };
        (status, body)
    }
}

/// The controller binary at trace level: reading Secrets, probing through Squid with the
/// password, writing status and events, pushing snapshots — its logs never carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_logs_carry_no_password() {
    use crate::controller::{Cluster, raw_get, wait_until};

    let pki = pki();
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = pki.write_to(dir.path());
    let upstream = Upstream::start(UpstreamOptions::tls(pki.clone()));
    let squid = Squid::start(SquidOptions {
        users: vec![("alice".into(), SECRET_PASSWORD.into())],
        https: None,
    });
    let pct = secret_forms("x", URL_PASSWORD)[1].clone();
    let base = upstream.base_url();
    let yaml = secret("login", "alice", SECRET_PASSWORD)
        + &format!(
            "---\napiVersion: providerproxy.dev/v1alpha1\nkind: ProviderProxy\nmetadata: {{name: ok, namespace: ai}}\nspec:\n  upstream: {base}\n  proxy:\n    url: http://127.0.0.1:{}\n    credentialsSecretRef: {{name: login}}\n",
            squid.http_port()
        )
        + &provider(
            "inurl",
            &base,
            Some(&format!("http://bob:{pct}@127.0.0.1:{}", squid.http_port())),
            "",
        );
    let manifests = dir.path().join("m.yaml");
    std::fs::write(&manifests, yaml).unwrap();
    let (admin, snapshots) = (free_port(), free_port());
    let mut cmd = Command::new(binary());
    cmd.arg("controller")
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args([
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--snapshot-listen",
            &format!("127.0.0.1:{snapshots}"),
        ])
        .args(["--probe-interval", "0"])
        .env("SSL_CERT_FILE", &ca)
        .env("RUST_LOG", "trace")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null());
    let (controller, log_tail) = spawn_capturing_stderr(&mut cmd);
    cluster.apply(&manifests);
    cluster.wait_ready_reason("ai", "ok", "Ready").await;
    cluster
        .wait_ready_reason("ai", "inurl", "ProbeFailed")
        .await;
    // A sidecar's stream carries the credentials; the logs around it must not.
    wait_until(Duration::from_secs(10), "controller ready", || async move {
        raw_get(&format!("http://127.0.0.1:{admin}/readyz"), None)
            .await
            .0
            == StatusCode::OK
    })
    .await;
    let first_line = {
        use http_body_util::BodyExt;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = http::Request::get(format!("http://127.0.0.1:{snapshots}/v1/snapshots"))
            .header("authorization", "Bearer token-ai")
            .body(http_body_util::Full::default())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut text = String::new();
        while !text.contains('\n') {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(d) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(d));
            }
        }
        text
    };
    assert!(
        first_line.contains("\"proxyPassword\""),
        "the authenticated stream carries credentials: {first_line}"
    );
    let metrics = raw_get(&format!("http://127.0.0.1:{admin}/metrics"), None)
        .await
        .1;
    // The line is written through the log queue after the frame is handed over: wait for
    // it rather than kill the controller with it still queued (a loaded machine lost it).
    let tail = &log_tail;
    wait_until(Duration::from_secs(10), "the push logged", || async move {
        tail.contains("snapshot pushed")
    })
    .await;
    drop(controller);
    let logs = log_tail.finish();
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "trace logging was not on"
    );
    let mut forms = secret_forms("alice", SECRET_PASSWORD);
    forms.extend(secret_forms("bob", URL_PASSWORD));
    for (channel, text) in [("controller logs", &logs), ("controller metrics", &metrics)] {
        for f in &forms {
            assert!(!text.contains(f.as_str()), "{channel} leak {f:?}");
        }
    }
}
