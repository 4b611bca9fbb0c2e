//! The HTTP CONNECT handshake (RFC 9110 §9.3.6), with Basic proxy authentication.

use base64::Engine;
use provider_proxy_api::{ProxyUrl, UpstreamUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Io;
use crate::error::{ConnectError, ErrorClass};

/// A proxy's CONNECT answer larger than this is not an answer.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// `Proxy-Authorization` value for the proxy's credentials, if any.
pub fn basic_auth(url: &ProxyUrl) -> Option<String> {
    let c = url.credentials()?;
    let pass = c.password.as_ref().map_or("", |p| p.expose());
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{pass}", c.username));
    Some(format!("Basic {token}"))
}

pub async fn tunnel(
    io: &mut Box<dyn Io>,
    target: &UpstreamUrl,
    proxy: &ProxyUrl,
    what: &str,
) -> Result<(), ConnectError> {
    let authority = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = basic_auth(proxy) {
        request.push_str("Proxy-Authorization: ");
        request.push_str(&auth);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| ConnectError::io(what, &e))?;
    io.flush().await.map_err(|e| ConnectError::io(what, &e))?;

    // Read byte by byte up to the blank line, so not one byte of the tunnel is consumed.
    // A tunnel is set up once per pooled connection, so the syscalls do not matter.
    let mut head = Vec::with_capacity(128);
    loop {
        let b = io.read_u8().await.map_err(|e| {
            ConnectError::new(
                ErrorClass::ProxyProtocol,
                format!("{what} closed the connection during CONNECT: {e}"),
            )
        })?;
        head.push(b);
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(ConnectError::new(
                ErrorClass::ProxyProtocol,
                format!("{what} sent a CONNECT response head over {MAX_RESPONSE_HEAD} bytes"),
            ));
        }
    }
    let status = parse_status(&head).ok_or_else(|| {
        ConnectError::new(
            ErrorClass::ProxyProtocol,
            format!(
                "{what} did not answer CONNECT with HTTP: {:?}",
                printable_prefix(&head)
            ),
        )
    })?;
    match status {
        200..=299 => Ok(()),
        407 => Err(ConnectError::new(
            ErrorClass::ProxyAuth,
            format!(
                "{what} answered CONNECT with 407 Proxy Authentication Required ({})",
                if proxy.has_credentials() {
                    "credentials rejected"
                } else {
                    "no credentials configured"
                }
            ),
        )),
        s => Err(ConnectError::new(
            ErrorClass::TunnelRefused,
            format!("{what} refused CONNECT to {authority} with status {s}"),
        )),
    }
}

/// The status code of `HTTP/1.x NNN ...`.
pub fn parse_status(head: &[u8]) -> Option<u16> {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..=599).contains(c))
}

fn printable_prefix(head: &[u8]) -> String {
    String::from_utf8_lossy(&head[..head.len().min(40)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 407 Proxy Authentication Required\r\n"),
            Some(407)
        );
        assert_eq!(parse_status(b"HTTP/1.1 200\r\n\r\n"), Some(200));
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"HTTP/1.1 2000 x\r\n",
            b"HTTP/1.1 abc\r\n",
            b"\r\n",
            b"HTTP/2 200\r\n",
            b"HTTP/1.1 099 x\r\n",
        ] {
            assert_eq!(
                parse_status(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn basic_auth_is_base64_of_decoded_credentials() {
        let url = ProxyUrl::parse("http://al%40ice:p%3Ass@proxy:1").unwrap();
        assert_eq!(
            basic_auth(&url).unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("al@ice:p:ss")
            )
        );
        assert_eq!(
            basic_auth(&ProxyUrl::parse("http://proxy:1").unwrap()),
            None
        );
    }
}
