//! One small classification of everything that can go wrong on the way to an upstream,
//! shared by the JSON error bodies, the request log and the metrics labels.

use std::fmt;

/// Why a request could not be (fully) served. `as_str` is a stable, low-cardinality label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The proxy (or, direct, the upstream) refused the TCP connection.
    Refused,
    /// The proxy's (or upstream's) name did not resolve.
    Dns,
    /// Connecting, including the proxy handshake and TLS, took longer than the connect timeout.
    ConnectTimeout,
    /// The proxy wants other credentials: HTTP 407, or SOCKS5 authentication rejected.
    ProxyAuth,
    /// The proxy refused to open the tunnel: a CONNECT status other than 2xx/407, or a
    /// SOCKS connect reply other than success.
    TunnelRefused,
    /// TLS to an `https://` proxy failed.
    ProxyTls,
    /// The proxy answered something that is not its protocol, or hung up mid-handshake.
    ProxyProtocol,
    /// TLS to the upstream failed (certificate, handshake).
    UpstreamTls,
    /// Other I/O error while connecting.
    ConnectIo,
    /// The upstream did not answer with headers in time.
    HeadersTimeout,
    /// The upstream went silent between body chunks for longer than the body timeout.
    BodyTimeout,
    /// The connection broke after the request was (partly) sent.
    UpstreamReset,
    /// An HTTP/2 connection-level error.
    Http2,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Dns => "dns",
            Self::ConnectTimeout => "connect_timeout",
            Self::ProxyAuth => "proxy_auth",
            Self::TunnelRefused => "tunnel_refused",
            Self::ProxyTls => "proxy_tls",
            Self::ProxyProtocol => "proxy_protocol",
            Self::UpstreamTls => "upstream_tls",
            Self::ConnectIo => "connect_io",
            Self::HeadersTimeout => "headers_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::UpstreamReset => "upstream_reset",
            Self::Http2 => "http2",
        }
    }

    /// Failures to *establish the proxy path*: the only ones that may fall back to direct.
    /// An upstream certificate failure is not one of them: bypassing the proxy must never be
    /// the answer to a certificate the proxy path presented.
    pub fn proxy_path_failure(self) -> bool {
        matches!(
            self,
            Self::Refused
                | Self::Dns
                | Self::ConnectTimeout
                | Self::ProxyAuth
                | Self::TunnelRefused
                | Self::ProxyTls
                | Self::ProxyProtocol
                | Self::ConnectIo
        )
    }

    /// Whether the agent that saw this should take no more requests.
    pub fn marks_unhealthy(self) -> bool {
        matches!(self, Self::UpstreamTls | Self::ProxyTls | Self::Http2)
    }

    pub const ALL: [ErrorClass; 13] = [
        Self::Refused,
        Self::Dns,
        Self::ConnectTimeout,
        Self::ProxyAuth,
        Self::TunnelRefused,
        Self::ProxyTls,
        Self::ProxyProtocol,
        Self::UpstreamTls,
        Self::ConnectIo,
        Self::HeadersTimeout,
        Self::BodyTimeout,
        Self::UpstreamReset,
        Self::Http2,
    ];
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure to establish a connection, with its class and a message that never contains
/// credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    pub class: ErrorClass,
    pub message: String,
}

impl ConnectError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    /// Classify an I/O error from connecting to `what` (e.g. "proxy 10.0.0.1:3128").
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let class = match e.kind() {
            ConnectionRefused => ErrorClass::Refused,
            TimedOut => ErrorClass::ConnectTimeout,
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                ErrorClass::ProxyProtocol
            }
            _ => ErrorClass::ConnectIo,
        };
        Self::new(class, format!("{what}: {e}"))
    }
}
