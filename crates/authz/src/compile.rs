//! From a port's policy as an operator writes it (a default, named
//! authorizations each optionally limited to some routes) to the Linkerd
//! model the proxy enforces and the API carries (server authorizations,
//! routes each with every authorization that covers it).
//!
//! The Linkerd model picks one route per request, the most specific that
//! matches, and admits the request if an authorization of that route
//! admits the client. To give the same answers as "any authorization whose
//! routes include the request admits it", the route matches are closed
//! under intersection (so the most specific match of any request is the
//! intersection of all that match it), and each route carries every
//! authorization one of whose matches covers it.

use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;

use crate::limit::{Limiter, RateLimit};
use crate::model::{
    Authn, Authorization, Identities, Network, PathMatch, Protocol, Route, RouteMatch, Server,
};

/// Bounds the intersection closure: beyond this many distinct matches a
/// port's routes overlap too much to be meant.
const MAX_MATCHES: usize = 256;

/// What a port allows before its authorizations are read, and what applies
/// to ports and servers nobody listed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Only the listed authorizations admit anyone.
    Deny,
    /// Any client proving a mesh identity.
    AllowAuthenticated,
    /// Anyone: the mesh does not restrict the port.
    #[default]
    AllowAll,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::AllowAuthenticated => "allow-authenticated",
            Self::AllowAll => "allow-all",
        }
    }

    /// The policy of a port it covers: named `default:<policy>`,
    /// detecting HTTP for up to `detect_timeout`.
    pub fn port_spec(self, detect_timeout: std::time::Duration) -> PortSpec {
        PortSpec {
            name: format!("default:{self}"),
            protocol: Protocol::Detect {
                timeout: detect_timeout,
            },
            default: self,
            authorizations: Vec::new(),
            rate_limit: None,
        }
    }

    /// The authorization it stands for, if any.
    pub fn authorization(self) -> Option<Authorization> {
        let authn = match self {
            Self::Deny => return None,
            Self::AllowAuthenticated => Authn::MeshTls(Identities::Any),
            Self::AllowAll => Authn::Unauthenticated,
        };
        Some(Authorization {
            name: format!("default:{}", self.as_str()).into(),
            networks: Network::all(),
            authn,
        })
    }
}

impl FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deny" => Ok(Self::Deny),
            "allow-authenticated" => Ok(Self::AllowAuthenticated),
            "allow-all" => Ok(Self::AllowAll),
            other => Err(format!(
                "{other:?} is not a default policy (deny, allow-authenticated or allow-all)"
            )),
        }
    }
}

impl std::fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One authorization as written: who, and optionally on which routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzSpec {
    pub name: String,
    pub networks: Vec<Network>,
    pub authn: Authn,
    /// Empty: every route.
    pub routes: Vec<RouteSpec>,
}

/// Requests on a path, with any of `methods` (all when empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub path: PathMatch,
    pub methods: Vec<http::Method>,
}

/// One port's policy as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Names the server in metrics and errors (`api.demo:8080`).
    pub name: String,
    pub protocol: Protocol,
    pub default: DefaultPolicy,
    pub authorizations: Vec<AuthzSpec>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CompileError(String);

/// A route's name in metrics: `GET /v1/*` (a prefix), `/health` (exact).
fn route_name(m: &RouteMatch) -> String {
    let path = match &m.path {
        PathMatch::Exact(p) => p.clone(),
        PathMatch::Prefix(p) if p.ends_with('/') => format!("{p}*"),
        PathMatch::Prefix(p) => format!("{p}/*"),
    };
    match &m.method {
        Some(method) => format!("{method} {path}"),
        None => path,
    }
}

/// The model of `spec`, enforcing with per-client buckets for at most
/// `limit_clients` clients.
pub fn compile(spec: &PortSpec, limit_clients: NonZeroUsize) -> Result<Server, CompileError> {
    let (server_authz, routes) = routes(spec)?;
    Ok(Server {
        name: spec.name.clone().into(),
        protocol: spec.protocol.clone(),
        authorizations: server_authz,
        routes,
        limiter: spec
            .rate_limit
            .as_ref()
            .filter(|r| r.total.is_some() || r.per_client.is_some() || !r.overrides.is_empty())
            .map(|r| Limiter::new(r, limit_clients)),
    })
}

type Compiled = (Vec<Arc<Authorization>>, Vec<Route>);

/// The server's authorizations and its routes.
pub fn routes(spec: &PortSpec) -> Result<Compiled, CompileError> {
    let mut server_authz: Vec<Arc<Authorization>> = spec
        .default
        .authorization()
        .map(Arc::new)
        .into_iter()
        .collect();
    let mut routed: Vec<(Arc<Authorization>, Vec<RouteMatch>)> = Vec::new();
    for a in &spec.authorizations {
        let authz = Arc::new(Authorization {
            name: a.name.clone().into(),
            networks: a.networks.clone(),
            authn: a.authn.clone(),
        });
        if a.routes.is_empty() {
            server_authz.push(authz);
            continue;
        }
        let mut matches = Vec::new();
        for r in &a.routes {
            if r.methods.is_empty() {
                matches.push(RouteMatch {
                    path: r.path.clone(),
                    method: None,
                });
            }
            for m in &r.methods {
                matches.push(RouteMatch {
                    path: r.path.clone(),
                    method: Some(m.clone()),
                });
            }
        }
        routed.push((authz, matches));
    }
    // Close the matches under intersection.
    let mut all: Vec<RouteMatch> = vec![RouteMatch::any()];
    for (_, ms) in &routed {
        for m in ms {
            if !all.contains(m) {
                all.push(m.clone());
            }
        }
    }
    let mut i = 0;
    while i < all.len() {
        for j in 0..i {
            if let Some(x) = all[i].intersect(&all[j])
                && !all.contains(&x)
            {
                all.push(x);
                if all.len() > MAX_MATCHES {
                    return Err(CompileError(format!(
                        "server {}: the authorizations' routes overlap in more than {MAX_MATCHES} ways; write fewer, broader routes",
                        spec.name
                    )));
                }
            }
        }
        i += 1;
    }
    let routes = all
        .into_iter()
        .map(|m| {
            let mut authorizations = server_authz.clone();
            authorizations.extend(
                routed
                    .iter()
                    .filter(|(_, ms)| ms.iter().any(|c| c.covers(&m)))
                    .map(|(a, _)| a.clone()),
            );
            let name = if m == RouteMatch::any() {
                "default".to_string()
            } else {
                route_name(&m)
            };
            Route {
                name: name.into(),
                matches: vec![m],
                authorizations,
            }
        })
        .collect();
    Ok((server_authz, routes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Client;
    use http::Method;
    use std::net::IpAddr;

    fn ids(names: &[&str]) -> Authn {
        Authn::MeshTls(Identities::Listed {
            names: names.iter().map(|s| s.to_string()).collect(),
            suffixes: vec![],
        })
    }

    fn authz(name: &str, who: &[&str], routes: Vec<RouteSpec>) -> AuthzSpec {
        AuthzSpec {
            name: name.into(),
            networks: Network::all(),
            authn: ids(who),
            routes,
        }
    }

    fn prefix(p: &str, methods: &[Method]) -> RouteSpec {
        RouteSpec {
            path: PathMatch::Prefix(p.into()),
            methods: methods.to_vec(),
        }
    }

    fn server(authorizations: Vec<AuthzSpec>) -> Server {
        let spec = PortSpec {
            name: "api.demo:8080".into(),
            protocol: Protocol::Http1,
            default: DefaultPolicy::Deny,
            authorizations,
            rate_limit: None,
        };
        match compile(&spec, NonZeroUsize::MIN) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn allowed(s: &Server, who: &'static str, method: Method, path: &str) -> bool {
        let c = Client {
            addr: IpAddr::from([10, 0, 0, 1]),
            identity: Some(who),
        };
        s.authorize_request(&c, &method, path, std::time::Instant::now())
            .is_ok()
    }

    /// The compiled routes admit exactly what "some authorization whose
    /// routes include the request admits the client" would.
    #[test]
    fn overlapping_authorizations_all_apply() {
        let s = server(vec![
            authz(
                "web-reads",
                &["web.demo"],
                vec![prefix("/v1/", &[Method::GET])],
            ),
            authz("batch", &["batch.demo"], vec![prefix("/v1/", &[])]),
            authz(
                "ops",
                &["ops.demo"],
                vec![prefix("/v1/users/", &[Method::DELETE])],
            ),
            authz("all", &["admin.demo"], vec![]),
        ]);
        let cases = [
            ("web.demo", Method::GET, "/v1/users/7", true),
            ("web.demo", Method::POST, "/v1/users/7", false),
            ("web.demo", Method::GET, "/v2/", false),
            ("batch.demo", Method::GET, "/v1/users/7", true),
            ("batch.demo", Method::DELETE, "/v1/users/7", true),
            ("batch.demo", Method::GET, "/v10", false),
            ("ops.demo", Method::DELETE, "/v1/users/7", true),
            ("ops.demo", Method::DELETE, "/v1/orders", false),
            ("admin.demo", Method::PUT, "/anything", true),
            ("other.demo", Method::GET, "/v1/", false),
        ];
        for (who, method, path, want) in cases {
            assert_eq!(
                allowed(&s, who, method.clone(), path),
                want,
                "{who} {method} {path}"
            );
        }
    }

    #[test]
    fn denials_name_the_route_not_the_rules() {
        let s = server(vec![authz(
            "web-reads",
            &["web.demo"],
            vec![prefix("/v1/", &[Method::GET])],
        )]);
        let c = Client {
            addr: IpAddr::from([10, 0, 0, 1]),
            identity: Some("api.demo"),
        };
        let denied = s
            .authorize_request(&c, &Method::GET, "/v1/x", std::time::Instant::now())
            .err()
            .map(|(_, d)| d.to_string());
        assert_eq!(
            denied.as_deref(),
            Some(
                "unauthorized: no authorization of route \"GET /v1/*\" on server \"api.demo:8080\" admits client api.demo"
            )
        );
    }

    #[test]
    fn defaults() {
        for (default, plain, meshed) in [
            (DefaultPolicy::Deny, false, false),
            (DefaultPolicy::AllowAuthenticated, false, true),
            (DefaultPolicy::AllowAll, true, true),
        ] {
            let spec = PortSpec {
                name: "x:1".into(),
                protocol: Protocol::Opaque,
                default,
                authorizations: vec![],
                rate_limit: None,
            };
            let s = compile(&spec, NonZeroUsize::MIN).map_err(|e| e.to_string());
            let Ok(s) = s else { panic!("{s:?}") };
            let c = |identity| Client {
                addr: IpAddr::from([10, 0, 0, 1]),
                identity,
            };
            assert_eq!(s.authorize_connection(&c(None)).is_ok(), plain, "{default}");
            assert_eq!(
                s.authorize_connection(&c(Some("a.b"))).is_ok(),
                meshed,
                "{default}"
            );
        }
    }
}
