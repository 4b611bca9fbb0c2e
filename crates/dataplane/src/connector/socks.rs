//! SOCKS5 (RFC 1928, username/password per RFC 1929) and SOCKS4/4a, via tokio-socks.

use std::net::{IpAddr, SocketAddr};

use provider_proxy_api::{ProxyScheme, ProxyUrl, UpstreamUrl};
use tokio::net::TcpStream;
use tokio_socks::tcp::{Socks4Stream, Socks5Stream};

use super::Io;
use crate::error::{ConnectError, ErrorClass};

pub async fn tunnel(
    tcp: TcpStream,
    target: &UpstreamUrl,
    proxy: &ProxyUrl,
    what: &str,
) -> Result<Box<dyn Io>, ConnectError> {
    let scheme = proxy.scheme();
    let port = target.port;
    // socks5h / socks4a: the proxy resolves the name. socks5 / socks4: we do.
    let remote_dns = matches!(scheme, ProxyScheme::Socks5h | ProxyScheme::Socks4a);
    let literal_ip = target.host.parse::<IpAddr>().ok();
    let resolved: Option<SocketAddr> = match (literal_ip, remote_dns) {
        (Some(ip), _) => Some(SocketAddr::new(ip, port)),
        (None, true) => None,
        (None, false) => {
            Some(resolve_locally(&target.host, port, scheme == ProxyScheme::Socks4).await?)
        }
    };
    let creds = proxy.credentials();
    let user = creds.map(|c| c.username.as_str()).unwrap_or("");
    let pass = creds
        .and_then(|c| c.password.as_ref())
        .map(|p| p.expose())
        .unwrap_or("");
    let fail = |e: tokio_socks::Error| classify(e, what);
    let io: Box<dyn Io> = match (scheme, resolved) {
        (ProxyScheme::Socks5 | ProxyScheme::Socks5h, addr) => {
            let s = match (creds.is_some(), addr) {
                (true, Some(a)) => {
                    Socks5Stream::connect_with_password_and_socket(tcp, a, user, pass).await
                }
                (true, None) => {
                    Socks5Stream::connect_with_password_and_socket(
                        tcp,
                        (target.host.as_str(), port),
                        user,
                        pass,
                    )
                    .await
                }
                (false, Some(a)) => Socks5Stream::connect_with_socket(tcp, a).await,
                (false, None) => {
                    Socks5Stream::connect_with_socket(tcp, (target.host.as_str(), port)).await
                }
            };
            Box::new(s.map_err(fail)?)
        }
        (_, addr) => {
            let s = match (user.is_empty(), addr) {
                (true, Some(a)) => Socks4Stream::connect_with_socket(tcp, a).await,
                (true, None) => {
                    Socks4Stream::connect_with_socket(tcp, (target.host.as_str(), port)).await
                }
                (false, Some(a)) => {
                    Socks4Stream::connect_with_userid_and_socket(tcp, a, user).await
                }
                (false, None) => {
                    Socks4Stream::connect_with_userid_and_socket(
                        tcp,
                        (target.host.as_str(), port),
                        user,
                    )
                    .await
                }
            };
            Box::new(s.map_err(fail)?)
        }
    };
    Ok(io)
}

async fn resolve_locally(
    host: &str,
    port: u16,
    ipv4_only: bool,
) -> Result<SocketAddr, ConnectError> {
    let addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| {
        ConnectError::new(
            ErrorClass::Dns,
            format!("cannot resolve upstream {host:?} for SOCKS: {e}"),
        )
    })?;
    let mut addrs = addrs.filter(|a| !ipv4_only || a.is_ipv4());
    addrs.next().ok_or_else(|| {
        ConnectError::new(
            ErrorClass::Dns,
            format!(
                "upstream {host:?} has no {}address; {}",
                if ipv4_only { "IPv4 " } else { "" },
                if ipv4_only {
                    "SOCKS4 carries only IPv4, use socks4a or socks5h"
                } else {
                    "check the name"
                }
            ),
        )
    })
}

fn classify(e: tokio_socks::Error, what: &str) -> ConnectError {
    use tokio_socks::Error as E;
    let class = match &e {
        E::PasswordAuthFailure(_)
        | E::NoAcceptableAuthMethods
        | E::AuthorizationRequired
        | E::IdentdAuthFailure
        | E::InvalidUserIdAuthFailure
        | E::InvalidAuthValues(_) => ErrorClass::ProxyAuth,
        E::GeneralSocksServerFailure
        | E::ConnectionNotAllowedByRuleset
        | E::NetworkUnreachable
        | E::HostUnreachable
        | E::ConnectionRefused
        | E::TtlExpired
        | E::CommandNotSupported
        | E::AddressTypeNotSupported => ErrorClass::TunnelRefused,
        E::Io(io) => return ConnectError::io(what, io),
        _ => ErrorClass::ProxyProtocol,
    };
    ConnectError::new(class, format!("{what}: SOCKS: {e}"))
}
