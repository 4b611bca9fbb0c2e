//! The HTTP CONNECT handshake (`connector/http_connect.rs`: `tunnel`, `parse_status`) as
//! the sidecar runs it: a real `Connector` for an https upstream through an HTTP proxy
//! with credentials, against a loopback peer whose whole answer is the fuzz input.
//! Properties: no panic, no hang (the peer has hung up, so every path must end well
//! before the connect timeout), errors never show the password or the Basic token, a
//! 407 is classed `proxy_auth` and nothing else is, and no 2xx is ever reported as a
//! refusal. The peer's answer is capped at 16 KiB + a little by the library; run with
//! -max_len above that to reach the cap.
#![no_main]

#[path = "common/peer.rs"]
mod peer;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use provider_proxy_dataplane::ErrorClass;
use provider_proxy_dataplane::connector::Connector;

fn status_line(reply: &[u8]) -> Option<u16> {
    // Independent oracle: "HTTP/1.x NNN" up to the first CR/LF, UTF-8, NNN in 100..=599.
    let end = reply.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = std::str::from_utf8(&reply[..end]).ok()?;
    let rest = line.strip_prefix("HTTP/1.")?;
    let mut parts = rest.splitn(3, ' ');
    let _minor = parts.next()?;
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..=599).contains(c))
}

/// base64("fuzz-user:Fz@pw:s3cr3t"): the Basic token the connector sends.
const TOKEN: &str = "ZnV6ei11c2VyOkZ6QHB3OnMzY3IzdA==";

/// The library reads the head byte by byte and gives up once it holds more than 16 KiB
/// without a blank line (a head ending exactly at byte 16 KiB + 1 still counts).
const MAX_HEAD: usize = 16 * 1024 + 1;

fuzz_target!(|reply: &[u8]| {
    static CONNECTOR: OnceLock<Connector> = OnceLock::new();
    let p = peer::peer();
    let connector = CONNECTOR.get_or_init(|| {
        peer::connector(
            "https://api.example.com",
            &format!(
                "http://{}:{}@127.0.0.1:{}",
                peer::USER,
                peer::PASSWORD_ENCODED,
                p.port
            ),
        )
    });
    p.exchange(reply, async {
        // After a 2xx the upstream TLS handshake reads the rest of the input and fails:
        // nothing the peer can send completes it (no trusted roots).
        let err = match connector.connect().await {
            Ok(_) => panic!("connected through a peer with no valid upstream certificate"),
            Err(e) => e,
        };
        peer::check_error(&err, reply, &[peer::PASSWORD, TOKEN]);
        let head_complete = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|i| i + 4 <= MAX_HEAD);
        let status = status_line(reply).filter(|_| head_complete);
        match err.class {
            ErrorClass::ProxyAuth => assert_eq!(status, Some(407), "{err}"),
            ErrorClass::TunnelRefused => assert!(
                status.is_some_and(|s| s != 407 && !(200..300).contains(&s)),
                "{err}"
            ),
            _ => assert!(
                status.is_none_or(|s| (200..300).contains(&s)),
                "status {status:?} classed {:?}: {err}",
                err.class
            ),
        }
    });
});
