//! Connectors: how a byte stream to an upstream is established, directly or through an
//! HTTP, HTTPS, SOCKS5 or SOCKS4 proxy, ending in TLS to the upstream with ALPN.
//!
//! The agent pool owns one [`Connector`] per (upstream, proxy, credentials, protocol) and
//! hands what it connects to hyper. The connect timeout covers the whole path: TCP, the
//! proxy handshake and TLS.

mod http_connect;
mod socks;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use provider_proxy_api::{ProxyScheme, ProxyUrl, UpstreamUrl};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{ConnectError, ErrorClass};
use crate::tls::ALPN_H2;

/// Any byte stream we can stack TLS or a proxy protocol on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// How long each stage of a connection took, for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectTimings {
    /// TCP connect to the first hop (proxy or upstream).
    pub tcp: Duration,
    /// Proxy handshake: TLS to an https proxy, CONNECT or SOCKS negotiation.
    pub proxy_handshake: Duration,
    /// TLS to the upstream.
    pub tls: Duration,
}

/// Told about every connection attempt (metrics, connection counting in tests).
pub trait ConnectObserver: Send + Sync + 'static {
    fn connected(&self, _proxied: bool, _timings: &ConnectTimings) {}
    fn failed(&self, _proxied: bool, _error: &ConnectError) {}
}

/// An observer that observes nothing.
pub struct NoObserver;
impl ConnectObserver for NoObserver {}

/// An established stream to the upstream (or, for an http upstream behind an HTTP proxy,
/// to the proxy, which then takes absolute-form requests).
pub struct Conn {
    io: Box<dyn Io>,
    h2: bool,
    /// The outermost layer is TLS: rustls copies whatever it is given into records, so
    /// vectored writes buy nothing and cost it an allocation per write; hyper flattens
    /// instead (one small copy it would make anyway).
    tls: bool,
}

impl Conn {
    pub fn is_h2(&self) -> bool {
        self.h2
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        !self.tls && self.io.is_write_vectored()
    }
}

/// The first hop when it is a proxy.
#[derive(Clone)]
pub struct ProxyHop {
    pub url: ProxyUrl,
    /// For `https://` proxies: trust for the proxy's certificate.
    pub tls: Option<Arc<ClientConfig>>,
}

/// Everything needed to reach one upstream along one path.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    upstream: UpstreamUrl,
    /// TLS to the upstream (None for http:// upstreams).
    upstream_tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    proxy: Option<ProxyHop>,
    connect_timeout: Duration,
    observer: Arc<dyn ConnectObserver>,
}

impl Connector {
    pub fn new(
        upstream: UpstreamUrl,
        upstream_tls: Option<Arc<ClientConfig>>,
        proxy: Option<ProxyHop>,
        connect_timeout: Duration,
        observer: Arc<dyn ConnectObserver>,
    ) -> Result<Self, ConnectError> {
        let upstream_tls = match (upstream.is_https(), upstream_tls) {
            (true, Some(cfg)) => {
                let name = ServerName::try_from(upstream.host.clone()).map_err(|e| {
                    ConnectError::new(
                        ErrorClass::UpstreamTls,
                        format!("upstream host {:?}: {e}", upstream.host),
                    )
                })?;
                Some((cfg, name))
            }
            (true, None) => {
                return Err(ConnectError::new(
                    ErrorClass::UpstreamTls,
                    "https upstream without TLS settings",
                ));
            }
            (false, _) => None,
        };
        Ok(Self {
            inner: Arc::new(ConnectorInner {
                upstream,
                upstream_tls,
                proxy,
                connect_timeout,
                observer,
            }),
        })
    }

    /// Establish a stream, within the connect timeout.
    pub async fn connect(&self) -> Result<Conn, ConnectError> {
        let inner = &self.inner;
        let proxied = inner.proxy.is_some();
        let mut timings = ConnectTimings::default();
        let result = match tokio::time::timeout(
            inner.connect_timeout,
            inner.establish(&mut timings),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::new(
                ErrorClass::ConnectTimeout,
                format!(
                    "connecting {} took longer than the connect timeout ({} ms)",
                    inner.path_description(),
                    inner.connect_timeout.as_millis()
                ),
            )),
        };
        match &result {
            Ok(_) => inner.observer.connected(proxied, &timings),
            Err(e) => inner.observer.failed(proxied, e),
        }
        result
    }
}

impl ConnectorInner {
    fn path_description(&self) -> String {
        match &self.proxy {
            Some(p) => format!("to {} via proxy {}", self.upstream.origin(), p.url),
            None => format!("to {}", self.upstream.origin()),
        }
    }

    async fn establish(&self, timings: &mut ConnectTimings) -> Result<Conn, ConnectError> {
        let started = Instant::now();
        let Some(proxy) = &self.proxy else {
            let tcp = tcp_connect(&self.upstream.host, self.upstream.port, "upstream").await?;
            timings.tcp = started.elapsed();
            return self.upstream_tls(Box::new(tcp), timings).await;
        };
        let url = &proxy.url;
        let what = format!("proxy {}", url.origin());
        let tcp = tcp_connect(&url.host_str(), url.port(), &what).await?;
        timings.tcp = started.elapsed();
        let handshake_started = Instant::now();
        let io: Box<dyn Io> = match url.scheme() {
            ProxyScheme::Http | ProxyScheme::Https => {
                let mut io: Box<dyn Io> = if url.scheme() == ProxyScheme::Https {
                    let cfg = proxy.tls.clone().ok_or_else(|| {
                        ConnectError::new(ErrorClass::ProxyTls, "https proxy without TLS settings")
                    })?;
                    let name = ServerName::try_from(url.host_str()).map_err(|e| {
                        ConnectError::new(ErrorClass::ProxyTls, format!("{what}: {e}"))
                    })?;
                    let tls = TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| {
                            ConnectError::new(
                                ErrorClass::ProxyTls,
                                format!("TLS to {what} failed: {e}"),
                            )
                        })?;
                    Box::new(tls)
                } else {
                    Box::new(tcp)
                };
                if !self.upstream.is_https() {
                    // An http upstream behind an HTTP proxy: the proxy takes absolute-form
                    // requests on this very connection; no tunnel.
                    timings.proxy_handshake = handshake_started.elapsed();
                    let tls = url.scheme() == ProxyScheme::Https;
                    return Ok(Conn { io, h2: false, tls });
                }
                http_connect::tunnel(&mut io, &self.upstream, url, &what).await?;
                io
            }
            ProxyScheme::Socks5
            | ProxyScheme::Socks5h
            | ProxyScheme::Socks4
            | ProxyScheme::Socks4a => socks::tunnel(tcp, &self.upstream, url, &what).await?,
        };
        timings.proxy_handshake = handshake_started.elapsed();
        self.upstream_tls(io, timings).await
    }

    async fn upstream_tls(
        &self,
        io: Box<dyn Io>,
        timings: &mut ConnectTimings,
    ) -> Result<Conn, ConnectError> {
        let Some((cfg, name)) = &self.upstream_tls else {
            return Ok(Conn {
                io,
                h2: false,
                tls: false,
            });
        };
        let started = Instant::now();
        let tls = TlsConnector::from(cfg.clone())
            .connect(name.clone(), io)
            .await
            .map_err(|e| {
                let class = if e.kind() == io::ErrorKind::InvalidData {
                    ErrorClass::UpstreamTls
                } else if self.proxy.is_some() {
                    // The tunnel broke during the handshake: the proxy path failed.
                    ErrorClass::ProxyProtocol
                } else {
                    ErrorClass::UpstreamTls
                };
                ConnectError::new(
                    class,
                    format!("TLS to upstream {} failed: {e}", self.upstream.origin()),
                )
            })?;
        timings.tls = started.elapsed();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        Ok(Conn {
            io: Box::new(tls),
            h2,
            tls: true,
        })
    }
}

/// Resolve and connect, trying each address; DNS failure gets its own class.
async fn tcp_connect(host: &str, port: u16, what: &str) -> Result<TcpStream, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            ConnectError::new(
                ErrorClass::Dns,
                format!("{what}: cannot resolve {host:?}: {e}"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::new(
            ErrorClass::Dns,
            format!("{what}: {host:?} resolved to no address"),
        ));
    }
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                // Small request/response exchanges: never wait for Nagle.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::other("no address"));
    let class = match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorClass::Refused,
        io::ErrorKind::TimedOut => ErrorClass::ConnectTimeout,
        _ => ErrorClass::ConnectIo,
    };
    Err(ConnectError::new(
        class,
        format!("{what}: connect failed: {e}"),
    ))
}

/// `Proxy-Authorization` for absolute-form requests through an HTTP proxy. Marked
/// sensitive so hyper's HPACK and any header dump leave it out.
pub fn proxy_authorization(url: &ProxyUrl) -> Option<http::HeaderValue> {
    let mut v = http::HeaderValue::from_str(&http_connect::basic_auth(url)?).ok()?;
    v.set_sensitive(true);
    Some(v)
}
