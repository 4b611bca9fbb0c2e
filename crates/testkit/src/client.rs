//! Minimal client helpers for tests: TLS with a [`TestPki`] CA, one request
//! over HTTP/1.1 or HTTP/2 on an already connected stream, and a raw HTTP
//! `CONNECT` handshake.

use std::io;

use base64::Engine;
use bytes::Bytes;
use http::response::Parts;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

use crate::certs::TestPki;

/// Boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TLS handshake over `io`, trusting only `pki`'s CA, offering `alpn`.
pub async fn tls_connect<S>(
    io: S,
    pki: &TestPki,
    server_name: &str,
    alpn: &[&[u8]],
) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client_config(alpn));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    connector.connect(name, io).await
}

/// Sends one HTTP/1.1 request on `io` and returns the response with its
/// body still streaming (the connection is driven by a spawned task).
pub async fn send_h1_streaming<S, B>(io: S, req: Request<B>) -> Result<Response<Incoming>, BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

/// Sends one HTTP/2 request on `io` (h2 via ALPN or prior knowledge) and
/// returns the response with its body still streaming.
pub async fn send_h2_streaming<S, B>(io: S, req: Request<B>) -> Result<Response<Incoming>, BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

/// [`send_h1_streaming`] and collect the whole body.
pub async fn send_h1<S, B>(io: S, req: Request<B>) -> Result<(Parts, Bytes), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (parts, body) = send_h1_streaming(io, req).await?.into_parts();
    Ok((parts, body.collect().await?.to_bytes()))
}

/// [`send_h2_streaming`] and collect the whole body.
pub async fn send_h2<S, B>(io: S, req: Request<B>) -> Result<(Parts, Bytes), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (parts, body) = send_h2_streaming(io, req).await?.into_parts();
    Ok((parts, body.collect().await?.to_bytes()))
}

/// The `Proxy-Authorization` value for Basic auth.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Reply to a raw `CONNECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectReply {
    /// Status code of the reply (0 when the status line did not parse).
    pub status: u16,
    /// The whole response head (status line and headers), lossily decoded.
    pub head: String,
}

/// Writes `CONNECT target HTTP/1.1` (with Basic auth when given) on `io` and
/// reads the reply head byte by byte, so nothing of the tunnel is consumed.
/// On `200` the stream is a tunnel to `target`. The head is limited to 16 KiB.
pub async fn http_connect<S>(
    io: &mut S,
    target: &str,
    auth: Option<(&str, &str)>,
) -> io::Result<ConnectReply>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((u, p)) = auth {
        req.push_str(&format!("Proxy-Authorization: {}\r\n", basic_auth(u, p)));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;
    let head = read_head_exact(io).await?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(ConnectReply { status, head })
}

/// Reads an HTTP response head (up to and including the blank line) byte by
/// byte. Errors on EOF before the end of the head or past 16 KiB.
pub async fn read_head_exact<S>(io: &mut S) -> io::Result<String>
where
    S: AsyncRead + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 16 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head over 16 KiB",
            ));
        }
        if io.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "EOF inside response head: {:?}",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Sends a minimal `GET path HTTP/1.1` with `Connection: close` on `io`
/// (e.g. through a tunnel) and reads until EOF; returns the raw response.
pub async fn raw_get<S>(io: &mut S, host: &str, path: &str) -> io::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;
    let mut out = Vec::new();
    io.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
