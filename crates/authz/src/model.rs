//! A port's server policy as the Linkerd inbound API models it: the
//! protocol, connection-level authorizations, HTTP routes each with its own
//! authorizations, and a rate limit; and the decisions made from it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::limit::Limiter;

/// How a port's connections are handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Detect HTTP (giving up after `timeout`); otherwise opaque.
    Detect {
        timeout: Duration,
    },
    Http1,
    Http2,
    Grpc,
    /// Never parsed: authorized per connection.
    Opaque,
    /// The application's own TLS, relayed: authorized per connection.
    Tls,
}

impl Protocol {
    /// Whether requests are authorized one by one (HTTP), rather than the
    /// connection as a whole.
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Self::Detect { .. } | Self::Http1 | Self::Http2 | Self::Grpc
        )
    }
}

/// Who a client is, as far as this proxy can tell.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub addr: IpAddr,
    /// The identity it proved with mutual TLS; `None` for plaintext (or
    /// TLS without a client certificate).
    pub identity: Option<&'a str>,
}

/// One set of clients allowed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    /// Names it in metrics (`authz_name`) and in the proxy's log.
    pub name: Arc<str>,
    /// Where clients may come from. An authorization with none matches no
    /// one (the API's rule: "all" is an explicit 0.0.0.0/0 and ::/0).
    pub networks: Vec<Network>,
    pub authn: Authn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authn {
    /// Any client, with or without mesh TLS.
    Unauthenticated,
    /// Clients over mesh TLS whose identity matches.
    MeshTls(Identities),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identities {
    /// Every proven identity.
    Any,
    /// Exact names, and suffixes (`*.batch.demo` is the suffix
    /// `batch.demo`: any name ending in `.batch.demo`).
    Listed {
        names: Vec<String>,
        suffixes: Vec<String>,
    },
}

/// A client network with exceptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub net: IpNet,
    pub except: Vec<IpNet>,
}

impl Network {
    /// Every IPv4 and IPv6 address.
    pub fn all() -> Vec<Network> {
        ["0.0.0.0/0", "::/0"]
            .into_iter()
            .filter_map(|n| n.parse().ok())
            .map(|net| Network {
                net,
                except: Vec::new(),
            })
            .collect()
    }

    fn contains(&self, addr: IpAddr) -> bool {
        // An IPv4 client arriving on an IPv6 socket is still that client.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.net.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

impl Identities {
    fn allows(&self, id: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Listed { names, suffixes } => {
                names.iter().any(|n| n.eq_ignore_ascii_case(id))
                    || suffixes.iter().any(|s| {
                        // The empty suffix is every name (the API's `.`).
                        s.is_empty()
                            || id.len() > s.len()
                                && id.as_bytes()[id.len() - s.len() - 1] == b'.'
                                && id[id.len() - s.len()..].eq_ignore_ascii_case(s)
                    })
            }
        }
    }
}

impl Authorization {
    pub fn allows(&self, client: &Client<'_>) -> bool {
        self.networks.iter().any(|n| n.contains(client.addr))
            && match &self.authn {
                Authn::Unauthenticated => true,
                Authn::MeshTls(ids) => client.identity.is_some_and(|id| ids.allows(id)),
            }
    }
}

/// How a request's path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathMatch {
    Exact(String),
    /// By whole segments: `/v1` matches `/v1` and `/v1/x`, not `/v10`.
    Prefix(String),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => segment_prefix(p, path),
        }
    }

    /// The longer of two prefixes when one contains the other: the paths
    /// both match. Exact paths intersect with what contains them.
    pub(crate) fn intersect(&self, other: &Self) -> Option<Self> {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => (a == b).then(|| self.clone()),
            (Self::Exact(e), p @ Self::Prefix(_)) | (p @ Self::Prefix(_), Self::Exact(e)) => {
                p.matches(e).then(|| Self::Exact(e.clone()))
            }
            (Self::Prefix(a), Self::Prefix(b)) => {
                if segment_prefix(a, b) {
                    Some(other.clone())
                } else if segment_prefix(b, a) {
                    Some(self.clone())
                } else {
                    None
                }
            }
        }
    }

    /// Whether every path `other` matches, this matches too.
    pub(crate) fn covers(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Exact(_), Self::Prefix(_)) => false,
            (Self::Prefix(a), Self::Exact(b) | Self::Prefix(b)) => segment_prefix(a, b),
        }
    }
}

/// Whether `prefix` is `path` or a whole-segment prefix of it.
fn segment_prefix(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// One condition a request may meet: a path and, optionally, a method.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<http::Method>,
}

impl RouteMatch {
    /// Everything.
    pub fn any() -> Self {
        Self {
            path: PathMatch::Prefix("/".into()),
            method: None,
        }
    }

    /// A match without a method matches every method but CONNECT: a
    /// CONNECT opens a tunnel of bytes that no later request-level
    /// decision (route, rate limit, metrics per request) sees, so only a
    /// match that names it admits it.
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        match &self.method {
            Some(m) => m == method && self.path.matches(path),
            None => method != http::Method::CONNECT && self.path.matches(path),
        }
    }

    /// Gateway API precedence: an exact path over a prefix, a longer
    /// prefix over a shorter, a method over none.
    fn rank(&self) -> (bool, usize, bool) {
        match &self.path {
            PathMatch::Exact(p) => (true, p.len(), self.method.is_some()),
            PathMatch::Prefix(p) => (false, p.trim_end_matches('/').len(), self.method.is_some()),
        }
    }

    pub(crate) fn intersect(&self, other: &Self) -> Option<Self> {
        let method = match (&self.method, &other.method) {
            (Some(a), Some(b)) if a != b => return None,
            // No match without a method admits CONNECT.
            (Some(m), None) | (None, Some(m)) if m == http::Method::CONNECT => return None,
            (Some(m), _) | (None, Some(m)) => Some(m.clone()),
            (None, None) => None,
        };
        Some(Self {
            path: self.path.intersect(&other.path)?,
            method,
        })
    }

    pub(crate) fn covers(&self, other: &Self) -> bool {
        self.path.covers(&other.path)
            && match (&self.method, &other.method) {
                (None, Some(m)) => m != http::Method::CONNECT,
                (None, None) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
            }
    }
}

/// An HTTP route: requests meeting any of its matches, and who may send
/// them (the server's authorizations included: the API's routes extend
/// them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: Arc<str>,
    pub matches: Vec<RouteMatch>,
    pub authorizations: Vec<Arc<Authorization>>,
}

/// One port's policy.
#[derive(Debug)]
pub struct Server {
    /// Names it in metrics (`srv_name`) and errors.
    pub name: Arc<str>,
    pub protocol: Protocol,
    /// Connection-level: who may open a non-HTTP connection.
    pub authorizations: Vec<Arc<Authorization>>,
    /// Request-level: the most specific match wins, the first on a tie. A
    /// request no route matches is refused (404).
    pub routes: Vec<Route>,
    /// Applied to requests on an HTTP route that were authorized.
    pub limiter: Option<Limiter>,
}

/// Why a request or connection was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no route of server {server:?} matches the request")]
    NoRoute { server: Arc<str> },
    #[error(
        "unauthorized: no authorization {}on server {server:?} admits {client}",
        of_route(route)
    )]
    Unauthorized {
        server: Arc<str>,
        route: Option<Arc<str>>,
        client: String,
    },
    #[error("too many requests: server {server:?} allows {rps} per second {scope}")]
    RateLimited {
        server: Arc<str>,
        rps: u32,
        scope: crate::limit::Scope,
        retry_after: Duration,
    },
}

/// An admitted request: the route it matched and the authorization that
/// let it in (for `inbound_http_authz_allow_total`).
#[derive(Clone, Copy, Debug)]
pub struct Permit<'a> {
    pub route: &'a Route,
    pub authorization: &'a Authorization,
}

fn of_route(route: &Option<Arc<str>>) -> String {
    route
        .as_ref()
        .map(|r| format!("of route {r:?} "))
        .unwrap_or_default()
}

fn describe(client: &Client<'_>) -> String {
    match client.identity {
        Some(id) => format!("client {id}"),
        None => "unauthenticated clients".into(),
    }
}

impl Server {
    /// A connection-level decision (opaque and TLS ports, and connections
    /// on a detecting port that turn out not to be HTTP).
    pub fn authorize_connection(&self, client: &Client<'_>) -> Result<&Authorization, Denied> {
        self.authorizations
            .iter()
            .find(|a| a.allows(client))
            .map(|a| &**a)
            .ok_or_else(|| Denied::Unauthorized {
                server: self.name.clone(),
                route: None,
                client: describe(client),
            })
    }

    /// The route a request takes, if any: the most specific match, the
    /// first route on a tie.
    pub fn route(&self, method: &http::Method, path: &str) -> Option<&Route> {
        let mut best: Option<(&Route, (bool, usize, bool))> = None;
        for route in &self.routes {
            for m in route.matches.iter().filter(|m| m.matches(method, path)) {
                let rank = m.rank();
                if best.is_none_or(|(_, b)| rank > b) {
                    best = Some((route, rank));
                }
            }
        }
        best.map(|(r, _)| r)
    }

    /// A request-level decision: its route, an authorization of that route
    /// that admits the client, then the rate limit.
    pub fn authorize_request(
        &self,
        client: &Client<'_>,
        method: &http::Method,
        path: &str,
        now: std::time::Instant,
    ) -> Result<Permit<'_>, (Option<&Route>, Denied)> {
        let Some(route) = self.route(method, path) else {
            return Err((
                None,
                Denied::NoRoute {
                    server: self.name.clone(),
                },
            ));
        };
        let Some(authorization) = route.authorizations.iter().find(|a| a.allows(client)) else {
            return Err((
                Some(route),
                Denied::Unauthorized {
                    server: self.name.clone(),
                    route: Some(route.name.clone()),
                    client: describe(client),
                },
            ));
        };
        if let Some(limiter) = &self.limiter
            && let Err((rps, scope, retry_after)) = limiter.check(client, now)
        {
            return Err((
                Some(route),
                Denied::RateLimited {
                    server: self.name.clone(),
                    rps,
                    scope,
                    retry_after,
                },
            ));
        }
        Ok(Permit {
            route,
            authorization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(addr: &str, id: Option<&'static str>) -> Client<'static> {
        Client {
            addr: addr.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            identity: id,
        }
    }

    #[test]
    fn identities_match_by_name_and_whole_label_suffix() {
        let ids = Identities::Listed {
            names: vec!["web.demo".into()],
            suffixes: vec!["batch.demo".into()],
        };
        assert!(ids.allows("web.demo"));
        assert!(ids.allows("WEB.demo"));
        assert!(ids.allows("etl.batch.demo"));
        assert!(!ids.allows("batch.demo"));
        assert!(!ids.allows("xbatch.demo"));
        assert!(!ids.allows("api.demo"));
        let all = Identities::Listed {
            names: vec![],
            suffixes: vec![String::new()],
        };
        assert!(all.allows("anything.at.all"));
    }

    #[test]
    fn networks_with_exceptions_and_mapped_v4() -> Result<(), ipnet::AddrParseError> {
        let n = Network {
            net: "10.0.0.0/8".parse()?,
            except: vec!["10.1.0.0/16".parse()?],
        };
        assert!(n.contains("10.2.3.4".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!n.contains("10.1.3.4".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(n.contains("::ffff:10.2.3.4".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!n.contains("192.168.0.1".parse().unwrap_or(IpAddr::from([10, 0, 0, 1]))));
        Ok(())
    }

    #[test]
    fn authn_needs_identity_for_mesh_tls() {
        let a = Authorization {
            name: "a".into(),
            networks: Network::all(),
            authn: Authn::MeshTls(Identities::Any),
        };
        assert!(a.allows(&client("10.0.0.1", Some("x.y"))));
        assert!(!a.allows(&client("10.0.0.1", None)));
        let none = Authorization {
            networks: vec![],
            ..a
        };
        assert!(!none.allows(&client("10.0.0.1", Some("x.y"))));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = PathMatch::Prefix("/v1/".into());
        assert!(p.matches("/v1"));
        assert!(p.matches("/v1/users"));
        assert!(!p.matches("/v10"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
    }
}
