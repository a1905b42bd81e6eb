//! Inbound server policy as `io.linkerd.proxy.inbound.InboundServerPolicies`
//! carries it, by the protos' documented meaning: the server's
//! authorizations apply to the connection (non-HTTP traffic) and extend
//! every route's own; each route names itself in `metadata`; an
//! authorization lists at least one network (everyone is an explicit
//! `0.0.0.0/0` and `::/0`); all authenticated clients are the mesh-TLS
//! identity suffix with no parts; the server's `labels` name it.
//!
//! `decode` is strict: a policy with something weft cannot evaluate (a
//! regex path, header or query matches, hosts, filters) is refused whole,
//! because enforcing part of an authorization policy is not enforcing it.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use linkerd2_proxy_api::grpc_route::{GrpcRouteMatch, GrpcRpcMatch};
use linkerd2_proxy_api::http_route::{HttpRouteMatch, PathMatch as ApiPath, path_match};
use linkerd2_proxy_api::inbound as api;
use linkerd2_proxy_api::meta::{Metadata, Resource, metadata};
use weft_authz::compile::routes;
use weft_authz::{
    Authn, Authorization, Identities, Limiter, Network, Override, PathMatch, PortSpec, Protocol,
    RateLimit, Route, RouteMatch, Server,
};

/// The API group weft's policy objects are named in.
pub const GROUP: &str = "policy.weft.io";

fn meta(kind: &str, name: &str) -> Option<Metadata> {
    Some(Metadata {
        kind: Some(if name.starts_with("default") {
            metadata::Kind::Default(name.to_string())
        } else {
            metadata::Kind::Resource(Resource {
                group: GROUP.into(),
                kind: kind.into(),
                name: name.into(),
                ..Default::default()
            })
        }),
    })
}

fn encode_authz(a: &Authorization) -> api::Authz {
    let authn = match &a.authn {
        Authn::Unauthenticated => {
            api::authn::Permit::Unauthenticated(api::authn::PermitUnauthenticated {})
        }
        Authn::MeshTls(ids) => {
            let (identities, suffixes) = match ids {
                Identities::Any => (Vec::new(), vec![Vec::new()]),
                Identities::Listed { names, suffixes } => (
                    names.clone(),
                    suffixes
                        .iter()
                        .map(|s| s.split('.').map(str::to_string).collect())
                        .collect(),
                ),
            };
            api::authn::Permit::MeshTls(api::authn::PermitMeshTls {
                clients: Some(api::authn::permit_mesh_tls::Clients::Identities(
                    api::authn::permit_mesh_tls::PermitClientIdentities {
                        identities: identities
                            .into_iter()
                            .map(|name| api::Identity { name })
                            .collect(),
                        suffixes: suffixes
                            .into_iter()
                            .map(|parts| api::IdentitySuffix { parts })
                            .collect(),
                    },
                )),
            })
        }
    };
    let kind = if a.name.starts_with("default") {
        "default"
    } else {
        "authorizationpolicy"
    };
    api::Authz {
        networks: a
            .networks
            .iter()
            .map(|n| api::Network {
                net: Some(n.net.into()),
                except: n.except.iter().map(|e| (*e).into()).collect(),
            })
            .collect(),
        authentication: Some(api::Authn {
            permit: Some(authn),
        }),
        // For proxies that read only the older labels.
        labels: HashMap::from([
            ("group".to_string(), GROUP.to_string()),
            ("kind".to_string(), kind.to_string()),
            ("name".to_string(), a.name.to_string()),
        ]),
        metadata: meta("AuthorizationPolicy", &a.name),
    }
}

fn encode_http_match(m: &RouteMatch) -> HttpRouteMatch {
    HttpRouteMatch {
        path: Some(ApiPath {
            kind: Some(match &m.path {
                PathMatch::Exact(p) => path_match::Kind::Exact(p.clone()),
                PathMatch::Prefix(p) => path_match::Kind::Prefix(p.clone()),
            }),
        }),
        method: m.method.clone().map(Into::into),
        ..Default::default()
    }
}

/// A gRPC route match from a path weft's parser wrote for one
/// (`/svc/method` exact, `/svc/` prefix, or `/` for all).
fn encode_grpc_match(m: &RouteMatch) -> GrpcRouteMatch {
    let rpc = match &m.path {
        PathMatch::Prefix(p) if p.trim_matches('/').is_empty() => None,
        PathMatch::Prefix(p) => Some(GrpcRpcMatch {
            service: p.trim_matches('/').to_string(),
            method: String::new(),
        }),
        PathMatch::Exact(p) => {
            let (service, method) = p.trim_start_matches('/').split_once('/').unwrap_or((p, ""));
            Some(GrpcRpcMatch {
                service: service.to_string(),
                method: method.to_string(),
            })
        }
    };
    GrpcRouteMatch {
        rpc,
        headers: Vec::new(),
    }
}

fn encode_rate_limit(r: &RateLimit) -> api::HttpLocalRateLimit {
    let limit = |rps: std::num::NonZeroU32| api::http_local_rate_limit::Limit {
        requests_per_second: rps.get(),
    };
    api::HttpLocalRateLimit {
        metadata: None,
        total: r.total.map(limit),
        identity: r.per_client.map(limit),
        overrides: r
            .overrides
            .iter()
            .map(|o| api::http_local_rate_limit::Override {
                limit: Some(limit(o.rps)),
                clients: Some(api::http_local_rate_limit::r#override::ClientIdentities {
                    identities: o
                        .identities
                        .iter()
                        .map(|name| api::Identity { name: name.clone() })
                        .collect(),
                }),
            })
            .collect(),
    }
}

/// `spec` as the API's `Server`.
pub fn encode(spec: &PortSpec) -> Result<api::Server, weft_authz::CompileError> {
    let (server_authz, compiled) = routes(spec)?;
    let server_names: Vec<&str> = server_authz.iter().map(|a| &*a.name).collect();
    // Each route's own: the server's extend them on the other side.
    let own = |r: &Route| -> Vec<api::Authz> {
        r.authorizations
            .iter()
            .filter(|a| !server_names.contains(&&*a.name))
            .map(|a| encode_authz(a))
            .collect()
    };
    let http_routes = || -> Vec<api::HttpRoute> {
        compiled
            .iter()
            .map(|r| api::HttpRoute {
                metadata: meta("HTTPRoute", &r.name),
                hosts: Vec::new(),
                authorizations: own(r),
                rules: vec![api::http_route::Rule {
                    matches: r.matches.iter().map(encode_http_match).collect(),
                    filters: Vec::new(),
                }],
            })
            .collect()
    };
    let rate_limit = spec.rate_limit.as_ref().map(encode_rate_limit);
    let kind = match &spec.protocol {
        Protocol::Detect { timeout } => {
            api::proxy_protocol::Kind::Detect(api::proxy_protocol::Detect {
                timeout: prost_types::Duration::try_from(*timeout).ok(),
                http_routes: http_routes(),
                http_local_rate_limit: rate_limit,
            })
        }
        Protocol::Http1 => api::proxy_protocol::Kind::Http1(api::proxy_protocol::Http1 {
            routes: http_routes(),
            local_rate_limit: rate_limit,
        }),
        Protocol::Http2 => api::proxy_protocol::Kind::Http2(api::proxy_protocol::Http2 {
            routes: http_routes(),
            local_rate_limit: rate_limit,
        }),
        Protocol::Grpc => api::proxy_protocol::Kind::Grpc(api::proxy_protocol::Grpc {
            routes: compiled
                .iter()
                .map(|r| api::GrpcRoute {
                    metadata: meta("GRPCRoute", &r.name),
                    hosts: Vec::new(),
                    authorizations: own(r),
                    rules: vec![api::grpc_route::Rule {
                        matches: r.matches.iter().map(encode_grpc_match).collect(),
                        filters: Vec::new(),
                    }],
                })
                .collect(),
        }),
        Protocol::Opaque => api::proxy_protocol::Kind::Opaque(api::proxy_protocol::Opaque {}),
        Protocol::Tls => api::proxy_protocol::Kind::Tls(api::proxy_protocol::Tls {}),
    };
    let server_kind = if spec.name.starts_with("default") {
        "default"
    } else {
        "server"
    };
    Ok(api::Server {
        protocol: Some(api::ProxyProtocol { kind: Some(kind) }),
        server_ips: Vec::new(),
        authorizations: server_authz.iter().map(|a| encode_authz(a)).collect(),
        labels: HashMap::from([
            ("group".to_string(), GROUP.to_string()),
            ("kind".to_string(), server_kind.to_string()),
            ("name".to_string(), spec.name.clone()),
        ]),
    })
}

#[derive(Debug, thiserror::Error)]
#[error("inbound policy {server:?}: {reason}")]
pub struct InboundDecodeError {
    pub server: String,
    pub reason: String,
}

fn name_of(m: &Option<Metadata>, labels: &HashMap<String, String>) -> Option<String> {
    match m.as_ref().and_then(|m| m.kind.as_ref()) {
        Some(metadata::Kind::Default(name)) => Some(name.clone()),
        Some(metadata::Kind::Resource(r)) => Some(r.name.clone()),
        None => labels.get("name").cloned(),
    }
}

fn decode_authz(a: api::Authz) -> Result<Authorization, String> {
    let name = name_of(&a.metadata, &a.labels).unwrap_or_else(|| "unnamed".into());
    if a.networks.is_empty() {
        return Err(format!("authorization {name:?} lists no network"));
    }
    let networks = a
        .networks
        .into_iter()
        .map(|n| {
            let net = n
                .net
                .ok_or_else(|| format!("authorization {name:?}: a network without net"))?
                .try_into()
                .map_err(|e| format!("authorization {name:?}: {e}"))?;
            let except = n
                .except
                .into_iter()
                .map(|e| {
                    e.try_into()
                        .map_err(|e| format!("authorization {name:?}: {e}"))
                })
                .collect::<Result<_, _>>()?;
            Ok(Network { net, except })
        })
        .collect::<Result<_, String>>()?;
    use api::authn::permit_mesh_tls::Clients;
    let authn = match a.authentication.and_then(|a| a.permit) {
        Some(api::authn::Permit::Unauthenticated(_)) => Authn::Unauthenticated,
        Some(api::authn::Permit::MeshTls(tls)) => match tls.clients {
            // Mesh TLS always proves the client here, so "TLS, any
            // client" is "any identity".
            Some(Clients::Unauthenticated(_)) => Authn::MeshTls(Identities::Any),
            Some(Clients::Identities(ids)) => {
                let suffixes: Vec<String> = ids
                    .suffixes
                    .into_iter()
                    .map(|s| s.parts.join(".").to_ascii_lowercase())
                    .collect();
                if suffixes.iter().any(String::is_empty) {
                    Authn::MeshTls(Identities::Any)
                } else {
                    Authn::MeshTls(Identities::Listed {
                        names: ids
                            .identities
                            .into_iter()
                            .map(|i| i.name.to_ascii_lowercase())
                            .collect(),
                        suffixes,
                    })
                }
            }
            None => return Err(format!("authorization {name:?}: mesh TLS names no clients")),
        },
        None => return Err(format!("authorization {name:?} has no authentication")),
    };
    Ok(Authorization {
        name: name.into(),
        networks,
        authn,
    })
}

fn decode_path(p: Option<ApiPath>) -> Result<PathMatch, String> {
    match p.and_then(|p| p.kind) {
        None => Ok(PathMatch::Prefix("/".into())),
        Some(path_match::Kind::Exact(e)) => Ok(PathMatch::Exact(e)),
        Some(path_match::Kind::Prefix(p)) => Ok(PathMatch::Prefix(p)),
        Some(path_match::Kind::Regex(r)) => Err(format!("regex path {r:?} is not supported")),
    }
}

fn decode_http_match(m: HttpRouteMatch) -> Result<RouteMatch, String> {
    if !m.headers.is_empty() || !m.query_params.is_empty() {
        return Err("header and query matches are not supported".into());
    }
    Ok(RouteMatch {
        path: decode_path(m.path)?,
        method: m
            .method
            .map(http::Method::try_from)
            .transpose()
            .map_err(|e| format!("bad method: {e}"))?,
    })
}

fn decode_grpc_match(m: GrpcRouteMatch) -> Result<RouteMatch, String> {
    if !m.headers.is_empty() {
        return Err("header matches are not supported".into());
    }
    let path = match m.rpc {
        None => PathMatch::Prefix("/".into()),
        Some(rpc) if rpc.service.is_empty() && rpc.method.is_empty() => {
            PathMatch::Prefix("/".into())
        }
        Some(rpc) if rpc.service.is_empty() => {
            return Err(format!(
                "a method ({}) without a service is not supported",
                rpc.method
            ));
        }
        Some(rpc) if rpc.method.is_empty() => PathMatch::Prefix(format!("/{}/", rpc.service)),
        Some(rpc) => PathMatch::Exact(format!("/{}/{}", rpc.service, rpc.method)),
    };
    // Every call is a POST: the path is the whole match.
    Ok(RouteMatch { path, method: None })
}

/// One decoded route: its name, matches and own authorizations.
type Decoded = (String, Vec<RouteMatch>, Vec<api::Authz>);

fn decode_routes<R>(
    routes: Vec<R>,
    parts: impl Fn(R) -> Result<Decoded, String>,
    server: &[Arc<Authorization>],
) -> Result<Vec<Route>, String> {
    // No routes: one matching everything, with the server's authorizations.
    if routes.is_empty() {
        return Ok(vec![Route {
            name: "default".into(),
            matches: vec![RouteMatch::any()],
            authorizations: server.to_vec(),
        }]);
    }
    routes
        .into_iter()
        .map(|r| {
            let (name, matches, own) = parts(r)?;
            // The server's first, as weft compiles them: the same
            // authorization is credited whichever way the policy came.
            let mut authorizations = server.to_vec();
            for a in own {
                authorizations.push(Arc::new(decode_authz(a)?));
            }
            Ok(Route {
                name: name.into(),
                // A rule without matches matches everything.
                matches: if matches.is_empty() {
                    vec![RouteMatch::any()]
                } else {
                    matches
                },
                authorizations,
            })
        })
        .collect()
}

/// A route's name, matches and own authorizations, from its parts: the
/// HTTP and gRPC route messages differ only in their match type.
fn route_parts<M>(
    kind: &str,
    metadata: &Option<Metadata>,
    hosts: usize,
    rules: impl IntoIterator<Item = (usize, Vec<M>)>,
    decode: fn(M) -> Result<RouteMatch, String>,
    authorizations: Vec<api::Authz>,
) -> Result<Decoded, String> {
    let name = name_of(metadata, &HashMap::new())
        .ok_or_else(|| format!("a {kind} route without metadata"))?;
    if hosts > 0 {
        return Err(format!("route {name:?}: host matches are not supported"));
    }
    let mut matches = Vec::new();
    for (filters, rule_matches) in rules {
        if filters > 0 {
            return Err(format!("route {name:?}: filters are not supported"));
        }
        for m in rule_matches {
            matches.push(decode(m).map_err(|e| format!("route {name:?}: {e}"))?);
        }
    }
    Ok((name, matches, authorizations))
}

fn http_route(r: api::HttpRoute) -> Result<Decoded, String> {
    let rules = r.rules.into_iter().map(|x| (x.filters.len(), x.matches));
    route_parts(
        "HTTP",
        &r.metadata,
        r.hosts.len(),
        rules,
        decode_http_match,
        r.authorizations,
    )
}

fn grpc_route(r: api::GrpcRoute) -> Result<Decoded, String> {
    let rules = r.rules.into_iter().map(|x| (x.filters.len(), x.matches));
    route_parts(
        "gRPC",
        &r.metadata,
        r.hosts.len(),
        rules,
        decode_grpc_match,
        r.authorizations,
    )
}

fn decode_rate_limit(r: api::HttpLocalRateLimit) -> RateLimit {
    let rps = |l: Option<api::http_local_rate_limit::Limit>| {
        l.and_then(|l| std::num::NonZeroU32::new(l.requests_per_second))
    };
    RateLimit {
        total: rps(r.total),
        per_client: rps(r.identity),
        overrides: r
            .overrides
            .into_iter()
            .filter_map(|o| {
                Some(Override {
                    rps: rps(o.limit)?,
                    identities: o
                        .clients
                        .map(|c| c.identities.into_iter().map(|i| i.name).collect())
                        .unwrap_or_default(),
                })
            })
            .collect(),
    }
}

/// A `Server` from the API as weft enforces it, with per-client rate-limit
/// buckets for at most `limit_clients` clients.
pub fn decode(
    server: api::Server,
    limit_clients: NonZeroUsize,
) -> Result<Server, InboundDecodeError> {
    let name = server
        .labels
        .get("name")
        .cloned()
        .unwrap_or_else(|| "unnamed".into());
    let fail = |reason: String| InboundDecodeError {
        server: name.clone(),
        reason,
    };
    let authorizations: Vec<Arc<Authorization>> = server
        .authorizations
        .into_iter()
        .map(|a| decode_authz(a).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let kind = server
        .protocol
        .and_then(|p| p.kind)
        .ok_or_else(|| fail("no protocol".into()))?;
    use api::proxy_protocol::Kind;
    let (protocol, routes, rate_limit) = match kind {
        Kind::Detect(d) => (
            Protocol::Detect {
                timeout: d
                    .timeout
                    .and_then(|t| Duration::try_from(t).ok())
                    .ok_or_else(|| fail("detect without a valid timeout".into()))?,
            },
            decode_routes(d.http_routes, http_route, &authorizations).map_err(fail)?,
            d.http_local_rate_limit,
        ),
        Kind::Http1(h) => (
            Protocol::Http1,
            decode_routes(h.routes, http_route, &authorizations).map_err(fail)?,
            h.local_rate_limit,
        ),
        Kind::Http2(h) => (
            Protocol::Http2,
            decode_routes(h.routes, http_route, &authorizations).map_err(fail)?,
            h.local_rate_limit,
        ),
        Kind::Grpc(g) => (
            Protocol::Grpc,
            decode_routes(g.routes, grpc_route, &authorizations).map_err(fail)?,
            None,
        ),
        Kind::Opaque(_) => (Protocol::Opaque, Vec::new(), None),
        Kind::Tls(_) => (Protocol::Tls, Vec::new(), None),
    };
    let limiter = rate_limit
        .map(decode_rate_limit)
        .filter(|r| r.total.is_some() || r.per_client.is_some() || !r.overrides.is_empty())
        .map(|r| Limiter::new(&r, limit_clients));
    Ok(Server {
        name: name.clone().into(),
        protocol,
        authorizations,
        routes,
        limiter,
    })
}
