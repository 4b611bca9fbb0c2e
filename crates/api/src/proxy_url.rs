//! `ProxyUrl`: the one parsed, validated form of a provider's outbound proxy.
//!
//! The password lives in a [`Password`] whose `Debug` and `Display` print `***`, and
//! `ProxyUrl`'s own `Display`/`Debug` mask it too, so a proxy URL can be logged, put in a
//! status or an error body without thought. The only way to the clear text is the
//! explicitly named [`Password::expose`] / [`ProxyUrl::to_credentialed_string`].

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// The longest proxy URL accepted, as in the reference (`proxy_url VARCHAR(512)`).
pub const MAX_PROXY_URL_LEN: usize = 512;

/// What a user may write, in the order error messages list them.
pub const ACCEPTED_SCHEMES: &str = "http, https, socks5, socks5h, socks4 or socks4a";

/// The mask shown in place of a password, everywhere.
pub const MASK: &str = "***";

/// Characters that must be escaped inside the userinfo part of a URL (RFC 3986).
const USERINFO: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The proxy protocols we speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProxyScheme {
    /// HTTP proxy: CONNECT for https upstreams, absolute-form for http ones.
    Http,
    /// TLS to the proxy, then as `Http`.
    Https,
    /// SOCKS5, target name resolved locally.
    Socks5,
    /// SOCKS5, target name resolved by the proxy.
    Socks5h,
    /// SOCKS4, target name resolved locally (SOCKS4 carries only IPv4 addresses).
    Socks4,
    /// SOCKS4a, target name resolved by the proxy.
    Socks4a,
}

impl ProxyScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Socks5 => "socks5",
            Self::Socks5h => "socks5h",
            Self::Socks4 => "socks4",
            Self::Socks4a => "socks4a",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
            Self::Socks5 | Self::Socks5h | Self::Socks4 | Self::Socks4a => 1080,
        }
    }

    pub fn is_socks(self) -> bool {
        !matches!(self, Self::Http | Self::Https)
    }

    /// SOCKS4 has no authentication; a username there is only the "user id".
    pub fn supports_password(self) -> bool {
        !matches!(self, Self::Socks4 | Self::Socks4a)
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Self::Http,
            "https" => Self::Https,
            "socks5" => Self::Socks5,
            "socks5h" => Self::Socks5h,
            "socks4" => Self::Socks4,
            "socks4a" => Self::Socks4a,
            _ => return None,
        })
    }
}

impl fmt::Display for ProxyScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret string. Never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The clear text, for the one place that must send it (a handshake).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// Proxy login. The username is shown; the password never is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub username: String,
    pub password: Option<Password>,
}

/// The host part of a proxy URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProxyHost {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for ProxyHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// Why a proxy URL was refused. Messages say what is wrong and what is accepted,
/// and never contain the password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    #[error("is empty; expected a URL such as http://proxy.example:8080")]
    Empty,
    #[error("is {len} characters long; at most {MAX_PROXY_URL_LEN} are accepted")]
    TooLong { len: usize },
    #[error("has no scheme; write it as SCHEME://HOST:PORT with SCHEME one of {ACCEPTED_SCHEMES}")]
    MissingScheme,
    #[error("unsupported scheme {0:?}; use {ACCEPTED_SCHEMES}")]
    UnsupportedScheme(String),
    #[error("has no host; expected SCHEME://HOST:PORT")]
    MissingHost,
    #[error("has an invalid host {0:?}")]
    InvalidHost(String),
    #[error(
        "has an invalid IPv6 address {0:?}; write IPv6 hosts in brackets, e.g. http://[2001:db8::1]:8080"
    )]
    InvalidIpv6(String),
    #[error("has an IPv6 address without brackets; write it as [{0}]")]
    UnbracketedIpv6(String),
    #[error("has an invalid port {0:?}; expected a number from 1 to 65535")]
    InvalidPort(String),
    #[error(
        "has a path, query or fragment {0:?}; a proxy URL is only SCHEME://[USER:PASSWORD@]HOST[:PORT]"
    )]
    UnexpectedPath(String),
    #[error(
        "has credentials that are not valid percent-encoded UTF-8; encode special characters, e.g. @ as %40"
    )]
    InvalidCredentials,
    #[error(
        "has '/', '?' or '#' in its credentials; percent-encode them (%2F, %3F, %23) or use credentialsSecretRef"
    )]
    UnencodedCredentials,
    #[error("has whitespace or control characters")]
    Whitespace,
}

/// A parsed proxy URL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    scheme: ProxyScheme,
    host: ProxyHost,
    port: u16,
    credentials: Option<Credentials>,
}

impl ProxyUrl {
    pub fn parse(input: &str) -> Result<Self, ProxyUrlError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ProxyUrlError::Empty);
        }
        if input.len() > MAX_PROXY_URL_LEN {
            return Err(ProxyUrlError::TooLong { len: input.len() });
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ProxyUrlError::Whitespace);
        }
        let (scheme, rest) = input
            .split_once("://")
            .ok_or(ProxyUrlError::MissingScheme)?;
        if scheme.is_empty() {
            return Err(ProxyUrlError::MissingScheme);
        }
        let scheme = ProxyScheme::parse(scheme)
            .ok_or_else(|| ProxyUrlError::UnsupportedScheme(scheme.to_owned()))?;

        // The last '@' of the whole URL ends the userinfo: a proxy URL has no path, and
        // users paste raw passwords, whose '/', '?' or '#' must not be read as the start of
        // a path (that would quote the password back in the error, or leave it unmasked).
        let (userinfo, after) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        if userinfo.is_some_and(|u| u.contains(['/', '?', '#'])) {
            return Err(ProxyUrlError::UnencodedCredentials);
        }
        // Everything after the authority must be empty (a lone trailing "/" is tolerated).
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (hostport, tail) = after.split_at(authority_end);
        if !tail.is_empty() && tail != "/" {
            return Err(ProxyUrlError::UnexpectedPath(tail.to_owned()));
        }
        let credentials = userinfo.map(parse_userinfo).transpose()?.flatten();
        let (host, port) = parse_host_port(hostport)?;
        Ok(Self {
            scheme,
            port: port.unwrap_or_else(|| scheme.default_port()),
            host,
            credentials,
        })
    }

    pub fn scheme(&self) -> ProxyScheme {
        self.scheme
    }

    pub fn host(&self) -> &ProxyHost {
        &self.host
    }

    /// Host as used to connect or for SNI: no brackets around IPv6.
    pub fn host_str(&self) -> String {
        match &self.host {
            ProxyHost::Ip(ip) => ip.to_string(),
            ProxyHost::Name(n) => n.clone(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The same proxy with other credentials (those resolved from a Secret).
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// `scheme://host:port`, no credentials: the proxy's identity in pool keys and metrics.
    pub fn origin(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.port)
    }

    /// The full URL with the clear-text password, for the snapshot wire format only.
    pub fn to_credentialed_string(&self) -> String {
        self.render(false)
    }

    fn render(&self, mask: bool) -> String {
        let mut out = format!("{}://", self.scheme);
        if let Some(c) = &self.credentials {
            out.extend(utf8_percent_encode(&c.username, USERINFO));
            if let Some(p) = &c.password {
                out.push(':');
                if mask {
                    out.push_str(MASK);
                } else {
                    out.extend(utf8_percent_encode(p.expose(), USERINFO));
                }
            }
            out.push('@');
        }
        out.push_str(&format!("{}:{}", self.host, self.port));
        out
    }
}

fn parse_userinfo(userinfo: &str) -> Result<Option<Credentials>, ProxyUrlError> {
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| ProxyUrlError::InvalidCredentials)
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (decode(u)?, Some(Password::new(decode(p)?))),
        None => (decode(userinfo)?, None),
    };
    if user.is_empty() && password.as_ref().is_none_or(|p| p.expose().is_empty()) {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: user,
        password,
    }))
}

pub(crate) fn parse_host_port(hostport: &str) -> Result<(ProxyHost, Option<u16>), ProxyUrlError> {
    if hostport.is_empty() {
        return Err(ProxyUrlError::MissingHost);
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| ProxyUrlError::InvalidIpv6(hostport.to_owned()))?;
        let ip = Ipv6Addr::from_str(ip).map_err(|_| ProxyUrlError::InvalidIpv6(ip.to_owned()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| ProxyUrlError::InvalidPort(p.to_owned()))?,
            ),
        };
        (ProxyHost::Ip(IpAddr::V6(ip)), port)
    } else {
        if hostport.matches(':').count() > 1 {
            return Err(ProxyUrlError::UnbracketedIpv6(hostport.to_owned()));
        }
        let (host, port) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        if host.is_empty() {
            return Err(ProxyUrlError::MissingHost);
        }
        (parse_host(host)?, port)
    };
    let port = port
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => Ok(n),
            _ => Err(ProxyUrlError::InvalidPort(p.to_owned())),
        })
        .transpose()?;
    Ok((host, port))
}

fn parse_host(host: &str) -> Result<ProxyHost, ProxyUrlError> {
    if let Ok(ip) = host.strip_suffix('.').unwrap_or(host).parse::<IpAddr>() {
        return Ok(ProxyHost::Ip(ip));
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(ProxyUrlError::InvalidHost(host.to_owned()));
    }
    Ok(ProxyHost::Name(name.to_ascii_lowercase()))
}

impl FromStr for ProxyUrl {
    type Err = ProxyUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Masked: `http://user:***@proxy.corp.example:8080`.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(true))
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({})", self.render(true))
    }
}

/// Mask the password in any URL-ish string, including ones that do not parse as a
/// `ProxyUrl` (a user's typo must not leak their password in the error about it).
pub fn mask_url(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let auth_start = scheme_end + 3;
    let rest = &raw[auth_start..];
    // As in parsing: the last '@' ends the userinfo, whatever characters the password has.
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = match userinfo.split_once(':') {
                Some((u, _)) => format!("{u}:{MASK}"),
                None => userinfo.to_owned(),
            };
            format!("{}{}@{}", &raw[..auth_start], user, &rest[at + 1..])
        }
        None => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(s: &str) -> ProxyUrl {
        match ProxyUrl::parse(s) {
            Ok(u) => u,
            Err(e) => panic!("{s} should parse: {e}"),
        }
    }

    fn err(s: &str) -> String {
        match ProxyUrl::parse(s) {
            Ok(u) => panic!("{s} should be rejected, parsed as {u}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_scheme_and_default_port() {
        for (s, scheme, port) in [
            ("http://p.example", ProxyScheme::Http, 80),
            ("https://p.example", ProxyScheme::Https, 443),
            ("socks5://p.example", ProxyScheme::Socks5, 1080),
            ("socks5h://p.example", ProxyScheme::Socks5h, 1080),
            ("socks4://p.example", ProxyScheme::Socks4, 1080),
            ("socks4a://p.example", ProxyScheme::Socks4a, 1080),
            ("HTTP://P.Example:3128", ProxyScheme::Http, 3128),
        ] {
            let u = ok(s);
            assert_eq!(u.scheme(), scheme, "{s}");
            assert_eq!(u.port(), port, "{s}");
            assert_eq!(u.host_str(), "p.example", "{s}");
        }
    }

    #[test]
    fn ipv4_with_a_trailing_dot_is_an_ip() {
        // Found by fuzzing: it parsed as a name, then re-parsed as an IP.
        assert_eq!(
            ok("http://10.0.0.1.:1").host(),
            &ProxyHost::Ip("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_in_brackets() {
        let u = ok("http://[2001:db8::1]:8080");
        assert_eq!(u.host(), &ProxyHost::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(u.host_str(), "2001:db8::1");
        assert_eq!(u.port(), 8080);
        assert_eq!(u.to_string(), "http://[2001:db8::1]:8080");
        assert_eq!(ok("socks5://[::1]").port(), 1080);
    }

    #[test]
    fn credentials_are_percent_decoded_and_masked() {
        let u = ok("http://us%40er:p%40ss%3Aw%2Frd@proxy.corp.example:8080/");
        let c = u.credentials().unwrap();
        assert_eq!(c.username, "us@er");
        assert_eq!(c.password.as_ref().unwrap().expose(), "p@ss:w/rd");
        assert_eq!(u.to_string(), "http://us%40er:***@proxy.corp.example:8080");
        assert_eq!(
            format!("{u:?}"),
            "ProxyUrl(http://us%40er:***@proxy.corp.example:8080)"
        );
        assert_eq!(
            u.to_credentialed_string(),
            "http://us%40er:p%40ss%3Aw%2Frd@proxy.corp.example:8080"
        );
        assert_eq!(u.origin(), "http://proxy.corp.example:8080");
        // A raw '@' in the password: the last '@' ends the userinfo.
        let raw = ok("http://user:p@ss@proxy:1");
        assert_eq!(
            raw.credentials()
                .unwrap()
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "p@ss"
        );
    }

    #[test]
    fn length_limit() {
        let host = "a".repeat(MAX_PROXY_URL_LEN - "http://".len() - ":1".len());
        let at_limit = format!("http://{host}:1");
        assert_eq!(at_limit.len(), MAX_PROXY_URL_LEN);
        // Too long a label is still a bad host, but the length check is what we test here.
        let long = format!("http://user:{}@p:1", "x".repeat(MAX_PROXY_URL_LEN));
        assert_eq!(
            err(&long),
            format!(
                "is {} characters long; at most 512 are accepted",
                long.len()
            )
        );
        let fits = format!("http://user:{}@p:1", "x".repeat(400));
        assert!(ProxyUrl::parse(&fits).is_ok());
    }

    #[test]
    fn malformed_inputs_have_clear_messages() {
        let cases = [
            (
                "",
                "is empty; expected a URL such as http://proxy.example:8080",
            ),
            (
                "ftp://p:21",
                "unsupported scheme \"ftp\"; use http, https, socks5, socks5h, socks4 or socks4a",
            ),
            (
                "proxy.example:8080",
                "has no scheme; write it as SCHEME://HOST:PORT with SCHEME one of http, https, socks5, socks5h, socks4 or socks4a",
            ),
            ("http://", "has no host; expected SCHEME://HOST:PORT"),
            (
                "http://p:0",
                "has an invalid port \"0\"; expected a number from 1 to 65535",
            ),
            (
                "http://p:65536",
                "has an invalid port \"65536\"; expected a number from 1 to 65535",
            ),
            (
                "http://p:abc",
                "has an invalid port \"abc\"; expected a number from 1 to 65535",
            ),
            (
                "http://2001:db8::1:8080",
                "has an IPv6 address without brackets; write it as [2001:db8::1:8080]",
            ),
            (
                "http://[2001:db8::zz]:8080",
                "has an invalid IPv6 address \"2001:db8::zz\"; write IPv6 hosts in brackets, e.g. http://[2001:db8::1]:8080",
            ),
            (
                "http://p:8080/path",
                "has a path, query or fragment \"/path\"; a proxy URL is only SCHEME://[USER:PASSWORD@]HOST[:PORT]",
            ),
            ("http://pro xy:1", "has whitespace or control characters"),
            ("http://bad_host!:1", "has an invalid host \"bad_host!\""),
            (
                "http://u:%FF@p:1",
                "has credentials that are not valid percent-encoded UTF-8; encode special characters, e.g. @ as %40",
            ),
            (
                "://p:1",
                "has no scheme; write it as SCHEME://HOST:PORT with SCHEME one of http, https, socks5, socks5h, socks4 or socks4a",
            ),
        ];
        for (input, message) in cases {
            assert_eq!(err(input), message, "input {input:?}");
        }
    }

    #[test]
    fn raw_separators_in_passwords_never_leak() {
        // Found by fuzzing: a raw '/', '?' or '#' used to end the authority early.
        for raw in [
            "http://user:pa/ss@proxy:1",
            "http://user:pa?ss@proxy:1",
            "socks5://u:a#b/c@p:1",
        ] {
            let e = err(raw);
            assert!(
                e.starts_with("has '/', '?' or '#' in its credentials"),
                "{e}"
            );
            for piece in ["pa/ss", "ss@", "a#b", "b/c"] {
                assert!(!e.contains(piece), "{e}");
                assert!(!mask_url(raw).contains(piece), "{}", mask_url(raw));
            }
        }
        assert_eq!(
            mask_url("http://user:pa/ss@proxy:1"),
            "http://user:***@proxy:1"
        );
    }

    #[test]
    fn mask_url_handles_unparseable_urls() {
        assert_eq!(
            mask_url("ftp://user:hunter2@host/x"),
            "ftp://user:***@host/x"
        );
        assert_eq!(mask_url("no scheme"), "no scheme");
        assert_eq!(mask_url("http://host:1"), "http://host:1");
    }

    fn scheme_strategy() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "http", "https", "socks5", "socks5h", "socks4", "socks4a",
        ])
    }

    proptest! {
        #[test]
        fn round_trip_keeps_all_but_the_password(
            scheme in scheme_strategy(),
            user in "[a-zA-Z0-9@:/% ._-]{1,20}",
            password in "[a-zA-Z0-9@:/%#?&=+ ._-]{1,30}",
            host in "[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\\.[a-z]{2,6})?",
            port in 1u16..,
        ) {
            let url = ProxyUrl::parse(&format!("{scheme}://x@{host}:{port}")).unwrap()
                .with_credentials(Some(Credentials { username: user.clone(), password: Some(Password::new(password.clone())) }));
            // The credentialed form parses back to exactly the same value.
            let back = ProxyUrl::parse(&url.to_credentialed_string()).unwrap();
            prop_assert_eq!(&back, &url);
            // The masked form parses back to everything but the password.
            let masked = ProxyUrl::parse(&url.to_string()).unwrap();
            prop_assert_eq!(masked.scheme(), url.scheme());
            prop_assert_eq!(masked.host(), url.host());
            prop_assert_eq!(masked.port(), url.port());
            prop_assert_eq!(&masked.credentials().unwrap().username, &user);
            prop_assert_eq!(masked.credentials().unwrap().password.as_ref().unwrap().expose(), MASK);
        }

        #[test]
        fn masking_never_leaks_the_password(password in "[a-zA-Z0-9@:/%]{6,40}") {
            let encoded: String = utf8_percent_encode(&password, USERINFO).collect();
            let raw = format!("http://user:{encoded}@proxy.example:8080");
            let url = ProxyUrl::parse(&raw).unwrap();
            prop_assert_eq!(url.credentials().unwrap().password.as_ref().unwrap().expose(), password.as_str());
            for shown in [url.to_string(), format!("{url:?}"), format!("{:?}", url.credentials()), mask_url(&raw)] {
                prop_assert!(!shown.contains(&password), "{} leaks {}", shown, password);
                prop_assert!(!shown.contains(&encoded), "{} leaks {}", shown, encoded);
            }
        }
    }
}
