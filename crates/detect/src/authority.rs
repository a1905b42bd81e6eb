use std::fmt;
use std::str::FromStr;

/// A normalized `host:port`: the key the proxy routes and labels metrics by.
/// Hosts are lower-cased and lose a trailing dot; a missing port becomes the
/// scheme's default, so `Svc.Test.` and `svc.test:80` name one destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Authority {
    host: String,
    port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityError {
    #[error("authority {0:?} is not a valid host[:port]")]
    Invalid(String),
    #[error("authority {0:?} has no host")]
    NoHost(String),
}

impl Authority {
    /// Parses an authority as found in a `Host` header, an absolute-form
    /// URI or HTTP/2 `:authority`, filling in `default_port` if absent.
    pub fn parse(s: &str, default_port: u16) -> Result<Self, AuthorityError> {
        let parsed = http::uri::Authority::from_str(s.trim())
            .map_err(|_| AuthorityError::Invalid(s.to_string()))?;
        Self::from_uri(&parsed, default_port)
    }

    /// The same rules, for an authority `http` has already split out of a
    /// URI: it checks less strictly than a routing key needs, but parsing
    /// it again would cost an allocation per request.
    pub fn from_uri(
        parsed: &http::uri::Authority,
        default_port: u16,
    ) -> Result<Self, AuthorityError> {
        let invalid = || AuthorityError::Invalid(parsed.as_str().to_string());
        if parsed.as_str().contains('@') {
            // userinfo has no place in a routing key
            return Err(invalid());
        }
        let after_host = &parsed.as_str()[parsed.host().len()..];
        if after_host.len() > 1 && parsed.port_u16().is_none() {
            return Err(invalid());
        }
        let host = parsed.host().trim_end_matches('.');
        if host.is_empty() {
            return Err(AuthorityError::NoHost(parsed.as_str().to_string()));
        }
        if !valid_host(host) {
            return Err(invalid());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port: parsed.port_u16().unwrap_or(default_port),
        })
    }

    /// The authority naming a literal address.
    pub fn from_socket_addr(addr: std::net::SocketAddr) -> Self {
        let host = match addr.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        Self {
            host,
            port: addr.port(),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address, when the host is an IP literal rather than a name.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        let ip = self.bare_host().parse::<std::net::IpAddr>().ok()?;
        Some(std::net::SocketAddr::new(ip, self.port))
    }

    /// The host without IPv6 brackets, as DNS or `SocketAddr` parsing wants it.
    pub fn bare_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }
}

/// The longest DNS name (RFC 1035 §2.3.4, without the trailing dot), and
/// the longest label in it.
const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// `http` accepts any URI authority; a routing key must be a DNS name, an
/// IPv4 address or a bracketed IPv6 address, so it renders and re-parses to
/// itself. Lengths are DNS's, so a client cannot make a metric label or a
/// route key of arbitrary size.
fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    }
    host.len() <= MAX_HOST_LEN
        && host.split('.').all(|l| l.len() <= MAX_LABEL_LEN)
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;

    /// Configuration form: the port is required.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let a = Self::parse(s, 0)?;
        if a.port == 0 {
            return Err(AuthorityError::Invalid(s.to_string()));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        let a = Authority::parse("Svc.Test.", 80).expect("valid");
        assert_eq!(a.to_string(), "svc.test:80");
        assert_eq!(
            Authority::parse("svc.test:8080", 80).expect("valid").port(),
            8080
        );
        let v6 = Authority::parse("[::1]:90", 80).expect("valid");
        assert_eq!(v6.bare_host(), "::1");
        assert_eq!(v6.to_string(), "[::1]:90");
    }

    #[test]
    fn rejects() {
        assert!(Authority::parse("", 80).is_err());
        assert!(Authority::parse("a b", 80).is_err());
        assert!(Authority::parse("user@host", 80).is_err());
        assert!(Authority::parse("host:99999", 80).is_err());
        // Found by the fuzzer: accepted by `http`, unusable as a key.
        assert!(Authority::parse("vrrrr[:262", 80).is_err());
        assert!(Authority::parse("[nope]:1", 80).is_err());
        assert!("svc.test".parse::<Authority>().is_err());
        assert!("svc.test:1".parse::<Authority>().is_ok());
        // Longer than DNS allows: refused, never a 5,000-byte label.
        assert!(Authority::parse(&"a".repeat(5000), 80).is_err());
        assert!(Authority::parse(&format!("{}.test", "a".repeat(64)), 80).is_err());
        let longest = vec!["a".repeat(63); 4].join(".")[..253].to_string();
        assert!(Authority::parse(&longest, 80).is_ok());
        assert!(Authority::parse(&format!("{longest}a"), 80).is_err());
    }
}
