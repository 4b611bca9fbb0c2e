//! The SOCKS5 / SOCKS4(a) handshakes (`connector/socks.rs`, via tokio-socks) as the
//! sidecar runs them: a real `Connector` for a plain-http upstream through a SOCKS proxy,
//! against a loopback peer whose whole answer is the fuzz input after its first byte. The
//! first byte picks the variant: socks5 / socks5h / socks4 / socks4a, with or without
//! credentials (user id for SOCKS4). Properties: no panic, no hang, errors never show the
//! password, and a success only when the peer really sent a success reply.
#![no_main]

#[path = "common/peer.rs"]
mod peer;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use provider_proxy_dataplane::connector::Connector;

/// (scheme, credentials?, upstream). SOCKS5/SOCKS4 targets are IP literals (we resolve,
/// and the fuzzer must not do DNS); socks5h/socks4a send the name to the proxy.
const VARIANTS: [(&str, bool, &str); 8] = [
    ("socks5", false, "http://127.0.0.2:8080"),
    ("socks5", true, "http://[::1]:8080"),
    ("socks5h", false, "http://api.example.com"),
    ("socks5h", true, "http://api.example.com:8443"),
    ("socks4", false, "http://127.0.0.2:8080"),
    ("socks4", true, "http://127.0.0.2:8080"),
    ("socks4a", false, "http://api.example.com"),
    ("socks4a", true, "http://api.example.com"),
];

fuzz_target!(|data: &[u8]| {
    static CONNECTORS: OnceLock<Vec<Connector>> = OnceLock::new();
    let Some((&selector, reply)) = data.split_first() else {
        return;
    };
    let p = peer::peer();
    let connectors = CONNECTORS.get_or_init(|| {
        VARIANTS
            .iter()
            .map(|(scheme, creds, upstream)| {
                let userinfo = match (creds, scheme.starts_with("socks5")) {
                    (false, _) => String::new(),
                    (true, true) => format!("{}:{}@", peer::USER, peer::PASSWORD_ENCODED),
                    // SOCKS4 has a user id and no password.
                    (true, false) => format!("{}@", peer::USER),
                };
                peer::connector(
                    upstream,
                    &format!("{scheme}://{userinfo}127.0.0.1:{}", p.port),
                )
            })
            .collect()
    });
    let variant = usize::from(selector) % VARIANTS.len();
    let (scheme, _, _) = VARIANTS[variant];
    let connector = &connectors[variant];
    p.exchange(reply, async {
        match connector.connect().await {
            Ok(_) => {
                // A tunnel only on a success reply: SOCKS5 `05 00 00` after method
                // selection, SOCKS4 `00 5A`.
                if scheme.starts_with("socks5") {
                    assert!(
                        reply.len() >= 2 && reply[0] == 5,
                        "socks5 tunnel without a SOCKS5 method reply"
                    );
                } else {
                    assert!(
                        reply.len() >= 8 && reply[1] == 0x5a,
                        "socks4 tunnel without a 0x5A reply"
                    );
                }
            }
            Err(e) => peer::check_error(&e, reply, &[peer::PASSWORD]),
        }
    });
});
