//! A fake proxy on loopback that answers every connection with the fuzz input, so the
//! sidecar's real connector (`provider_proxy_dataplane::connector::Connector`) runs its
//! CONNECT / SOCKS handshake against it, exactly as in production, with no visibility
//! changes to the library. One current-thread runtime and one listener per process.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use provider_proxy_api::{ProxyUrl, UpstreamUrl};
use provider_proxy_dataplane::connector::{Connector, NoObserver, ProxyHop};
use provider_proxy_dataplane::{ConnectError, ErrorClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// The proxy password in every fuzzed proxy URL (percent-decoded form below): errors must
/// never show it, nor the Basic token made from it.
pub const PASSWORD_ENCODED: &str = "Fz%40pw%3As3cr3t";
pub const PASSWORD: &str = "Fz@pw:s3cr3t";
pub const USER: &str = "fuzz-user";

/// Generous: a handshake against a peer that has already sent everything and hung up
/// never waits on the network. A fuzz input that hits it is a hang (libFuzzer -timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Peer {
    rt: Runtime,
    listener: TcpListener,
    pub port: u16,
}

pub fn peer() -> &'static Peer {
    static PEER: OnceLock<Peer> = OnceLock::new();
    PEER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        Peer { rt, listener, port }
    })
}

impl Peer {
    /// Run `client` (which connects once to `127.0.0.1:{port}`) against a peer that writes
    /// `reply`, closes its sending side, and drains whatever the client sends until the
    /// client hangs up (so the close is a clean FIN, never a RST that eats the reply).
    pub fn exchange<Fut: Future<Output = ()>>(&self, reply: &[u8], client: Fut) {
        self.rt.block_on(async {
            let server = async {
                let accepted =
                    tokio::time::timeout(CONNECT_TIMEOUT * 2, self.listener.accept()).await;
                let Ok(Ok((mut sock, _))) = accepted else {
                    return;
                };
                let _ = sock.write_all(reply).await;
                let _ = sock.shutdown().await;
                let mut sink = [0u8; 4096];
                let drain = async {
                    while let Ok(n) = sock.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CONNECT_TIMEOUT * 2, drain).await;
            };
            tokio::join!(server, client);
        });
    }
}

pub fn tls_config() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    })
    .clone()
}

pub fn connector(upstream: &str, proxy: &str) -> Connector {
    let upstream = UpstreamUrl::parse(upstream).expect("upstream URL");
    let tls = upstream.is_https().then(tls_config);
    let url = ProxyUrl::parse(proxy).expect("proxy URL");
    Connector::new(
        upstream,
        tls,
        Some(ProxyHop { url, tls: None }),
        CONNECT_TIMEOUT,
        Arc::new(NoObserver),
    )
    .expect("connector")
}

/// Checks every connect error must pass: no credential in its text, a timeout is a hang.
pub fn check_error(e: &ConnectError, reply: &[u8], secrets: &[&str]) {
    assert!(
        e.class != ErrorClass::ConnectTimeout,
        "handshake hung against a peer that had already hung up: {e}"
    );
    let shown = format!("{e} {e:?}");
    for s in secrets {
        let echoed = reply.windows(s.len().max(1)).any(|w| w == s.as_bytes());
        assert!(
            echoed || !shown.contains(s),
            "connect error shows a credential: {shown}"
        );
    }
}
