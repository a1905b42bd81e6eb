//! The `servers:` section: inbound policy per workload identity and port.
//! The YAML keys are a contract: extend them, never change what one means.
//!
//! ```yaml
//! servers:
//!   "api.demo":                  # the identity that serves
//!     default: deny              # unlisted ports (else the mesh-wide default)
//!     ports:
//!       "8080":
//!         protocol: detect       # http1, http2, grpc, opaque, tls
//!         default: deny          # deny | allow-authenticated | allow-all
//!         authorizations:
//!           - name: web-reads
//!             clients: {identities: ["web.demo", "*.batch.demo"]}
//!             routes: [{path_prefix: /v1/, methods: [GET]}]
//!         rate_limit: {total_rps: 1000, per_client_rps: 100,
//!                      overrides: [{clients: {identities: [batch.demo]}, rps: 10}]}
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use weft_authz::{
    Authn, AuthzSpec, DefaultPolicy, Identities, Network, Override, PathMatch, PortSpec, Protocol,
    RateLimit, RouteSpec,
};
use weft_identity::Name;

/// How long a detecting port waits for a client's first bytes (Linkerd's
/// default too).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One serving identity's ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerSpec {
    /// For its unlisted ports; `None`: the mesh-wide default.
    pub default: Option<DefaultPolicy>,
    pub ports: BTreeMap<u16, PortSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerModel {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    ports: BTreeMap<String, PortModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortModel {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    authorizations: Vec<AuthzModel>,
    #[serde(default)]
    rate_limit: Option<RateLimitModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzModel {
    name: String,
    clients: ClientsModel,
    #[serde(default)]
    routes: Vec<RouteModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClientsModel {
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    networks: Vec<String>,
    /// Networks taken out of `networks` (of every client when `networks`
    /// is absent).
    #[serde(default)]
    except: Vec<String>,
    #[serde(default)]
    unauthenticated: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteModel {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    /// `pkg.Service` (all its methods) or `pkg.Service/Method`.
    #[serde(default)]
    grpc: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitModel {
    #[serde(default)]
    total_rps: Option<u32>,
    #[serde(default)]
    per_client_rps: Option<u32>,
    #[serde(default)]
    overrides: Vec<OverrideModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideModel {
    clients: OverrideClients,
    rps: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideClients {
    identities: Vec<String>,
}

fn default_policy(at: &str, s: &str) -> Result<DefaultPolicy, String> {
    s.parse().map_err(|e| format!("{at}.default: {e}"))
}

fn protocol(at: &str, s: Option<&str>) -> Result<Protocol, String> {
    Ok(match s.unwrap_or("detect") {
        "detect" => Protocol::Detect {
            timeout: DETECT_TIMEOUT,
        },
        "http1" => Protocol::Http1,
        "http2" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        "opaque" => Protocol::Opaque,
        "tls" => Protocol::Tls,
        other => {
            return Err(format!(
                "{at}.protocol: {other:?} is not one of detect, http1, http2, grpc, opaque, tls"
            ));
        }
    })
}

fn networks(at: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    list.iter()
        .map(|n| {
            n.parse::<ipnet::IpNet>()
                .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("{at}: {n:?} is not a network (10.0.0.0/8, fd00::/8 or an address)")
                })
        })
        .collect()
}

fn clients(at: &str, c: &ClientsModel) -> Result<(Vec<Network>, Authn), String> {
    let except = networks(&format!("{at}.except"), &c.except)?;
    let nets = if c.networks.is_empty() {
        Network::all()
            .into_iter()
            .map(|n| Network {
                except: except.clone(),
                ..n
            })
            .collect()
    } else {
        networks(&format!("{at}.networks"), &c.networks)?
            .into_iter()
            .map(|net| Network {
                net,
                except: except.clone(),
            })
            .collect()
    };
    let authn = match (
        c.unauthenticated,
        c.identities.is_empty(),
        c.networks.is_empty(),
    ) {
        (true, false, _) => {
            return Err(format!(
                "{at}: unauthenticated: true admits clients without identities; drop identities, or unauthenticated"
            ));
        }
        (true, true, _) | (false, true, false) => Authn::Unauthenticated,
        (false, true, true) => {
            return Err(format!(
                "{at}: name identities, networks, or unauthenticated: true"
            ));
        }
        (false, false, _) => {
            let mut names = Vec::new();
            let mut suffixes = Vec::new();
            let mut any = false;
            for id in &c.identities {
                if id == "*" {
                    any = true;
                } else if let Some(suffix) = id.strip_prefix("*.") {
                    suffix
                        .parse::<Name>()
                        .map_err(|e| format!("{at}.identities: {id:?}: {e}"))?;
                    suffixes.push(suffix.to_ascii_lowercase());
                } else {
                    id.parse::<Name>()
                        .map_err(|e| format!("{at}.identities: {id:?}: {e}"))?;
                    names.push(id.to_ascii_lowercase());
                }
            }
            Authn::MeshTls(if any {
                Identities::Any
            } else {
                Identities::Listed { names, suffixes }
            })
        }
    };
    Ok((nets, authn))
}

fn route(at: &str, r: &RouteModel, grpc_port: bool) -> Result<RouteSpec, String> {
    let path = |p: &str| -> Result<String, String> {
        if p.starts_with('/') {
            Ok(p.to_string())
        } else {
            Err(format!("{at}: path {p:?} must start with /"))
        }
    };
    let path = match (&r.path, &r.path_prefix, &r.grpc) {
        (Some(p), None, None) => PathMatch::Exact(path(p)?),
        (None, Some(p), None) => PathMatch::Prefix(path(p)?),
        (None, None, Some(g)) => match g.split_once('/') {
            Some((svc, method)) if !svc.is_empty() && !method.is_empty() => {
                PathMatch::Exact(format!("/{svc}/{method}"))
            }
            None if !g.is_empty() => PathMatch::Prefix(format!("/{g}/")),
            _ => {
                return Err(format!(
                    "{at}.grpc: {g:?} is not pkg.Service or pkg.Service/Method"
                ));
            }
        },
        _ => {
            return Err(format!(
                "{at}: give exactly one of path, path_prefix or grpc"
            ));
        }
    };
    if grpc_port && r.grpc.is_none() {
        return Err(format!(
            "{at}: a grpc port's routes are grpc: pkg.Service[/Method]"
        ));
    }
    if r.grpc.is_some() && !r.methods.is_empty() {
        return Err(format!(
            "{at}: gRPC routes have no methods (every call is a POST)"
        ));
    }
    let methods = r
        .methods
        .iter()
        .map(|m| {
            http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("{at}.methods: {m:?} is not an HTTP method"))
        })
        .collect::<Result<_, _>>()?;
    Ok(RouteSpec { path, methods })
}

fn rps(at: &str, n: u32) -> Result<NonZeroU32, String> {
    NonZeroU32::new(n).ok_or_else(|| {
        format!("{at}: 0 requests per second admits nothing; use default: deny to refuse")
    })
}

fn rate_limit(at: &str, r: &RateLimitModel) -> Result<RateLimit, String> {
    Ok(RateLimit {
        total: r
            .total_rps
            .map(|n| rps(&format!("{at}.total_rps"), n))
            .transpose()?,
        per_client: r
            .per_client_rps
            .map(|n| rps(&format!("{at}.per_client_rps"), n))
            .transpose()?,
        overrides: r
            .overrides
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let at = format!("{at}.overrides[{i}]");
                for id in &o.clients.identities {
                    id.parse::<Name>()
                        .map_err(|e| format!("{at}.clients.identities: {id:?}: {e}"))?;
                }
                Ok(Override {
                    identities: o.clients.identities.clone(),
                    rps: rps(&format!("{at}.rps"), o.rps)?,
                })
            })
            .collect::<Result<_, String>>()?,
    })
}

fn port(at: &str, server: &str, number: u16, p: &PortModel) -> Result<PortSpec, String> {
    let protocol = protocol(at, p.protocol.as_deref())?;
    let default = p
        .default
        .as_deref()
        .map(|d| default_policy(at, d))
        .transpose()?
        .unwrap_or(DefaultPolicy::Deny);
    let mut seen = HashSet::new();
    let mut authorizations = Vec::new();
    for (i, a) in p.authorizations.iter().enumerate() {
        let at = format!("{at}.authorizations[{i}]");
        if a.name.is_empty() || !seen.insert(a.name.as_str()) {
            return Err(format!(
                "{at}.name: {:?} must be non-empty and unique on the port",
                a.name
            ));
        }
        let (networks, authn) = clients(&format!("{at}.clients"), &a.clients)?;
        if !a.routes.is_empty() && !protocol.is_http() {
            return Err(format!(
                "{at}.routes: a {} port has no HTTP routes",
                p.protocol.as_deref().unwrap_or("detect")
            ));
        }
        let routes = a
            .routes
            .iter()
            .enumerate()
            .map(|(j, r)| route(&format!("{at}.routes[{j}]"), r, protocol == Protocol::Grpc))
            .collect::<Result<_, _>>()?;
        authorizations.push(AuthzSpec {
            name: a.name.clone(),
            networks,
            authn,
            routes,
        });
    }
    let rate_limit = p
        .rate_limit
        .as_ref()
        .map(|r| match protocol {
            // The API's gRPC protocol carries no rate limit: a proxy
            // following the control plane would never see it.
            Protocol::Grpc => Err(format!(
                "{at}.rate_limit: the policy API carries no rate limit for grpc ports; declare the port http2 (gRPC is HTTP/2) or detect"
            )),
            ref p if p.is_http() => rate_limit(&format!("{at}.rate_limit"), r),
            _ => Err(format!(
                "{at}.rate_limit: rate limits apply to HTTP requests; this port is not HTTP"
            )),
        })
        .transpose()?;
    let spec = PortSpec {
        name: format!("{server}:{number}"),
        protocol,
        default,
        authorizations,
        rate_limit,
    };
    // Refuse now what the proxy could not compile.
    weft_authz::compile::routes(&spec).map_err(|e| format!("{at}: {e}"))?;
    Ok(spec)
}

pub(crate) fn build(
    models: HashMap<String, ServerModel>,
) -> Result<HashMap<String, ServerSpec>, String> {
    let mut servers = HashMap::new();
    for (name, model) in models {
        let at = format!("servers.{name:?}");
        let id: Name = name
            .parse()
            .map_err(|e| format!("{at}: a server is named by its identity: {e}"))?;
        let default = model
            .default
            .as_deref()
            .map(|d| default_policy(&at, d))
            .transpose()?;
        let mut ports = BTreeMap::new();
        for (number, p) in &model.ports {
            let at = format!("{at}.ports.{number:?}");
            let n: u16 = number
                .parse()
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| format!("{at}: not a port number"))?;
            ports.insert(n, port(&at, id.as_str(), n, p)?);
        }
        if servers
            .insert(
                id.as_str().to_ascii_lowercase(),
                ServerSpec { default, ports },
            )
            .is_some()
        {
            return Err(format!("{at}: listed twice (names are case-insensitive)"));
        }
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use crate::Destinations;
    use std::path::Path;

    fn parse(servers: &str) -> Result<crate::Destinations, String> {
        Destinations::parse(
            Path::new("d.yaml"),
            &format!("destinations: {{}}\nservers:\n{servers}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn documented_format() {
        let d = parse(
            r#"
  "api.demo":
    default: allow-authenticated
    ports:
      "8080":
        protocol: detect
        default: deny
        authorizations:
          - name: web-reads
            clients: {identities: ["web.demo", "*.batch.demo"]}
            routes: [{path_prefix: /v1/, methods: [GET]}]
          - name: office
            clients: {networks: [10.0.0.0/8], except: [10.9.0.0/16]}
        rate_limit: {total_rps: 1000, per_client_rps: 100, overrides: [{clients: {identities: ["batch.demo"]}, rps: 10}]}
      "9000":
        protocol: grpc
        authorizations:
          - name: web
            clients: {identities: ["web.demo"]}
            routes: [{grpc: demo.Echo/Say}, {grpc: grpc.health.v1.Health}]
"#,
        );
        let d = match d {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let api = &d.servers["api.demo"];
        assert_eq!(
            api.default,
            Some(weft_authz::DefaultPolicy::AllowAuthenticated)
        );
        let p = &api.ports[&8080];
        assert_eq!(p.name, "api.demo:8080");
        assert_eq!(p.authorizations.len(), 2);
        assert!(
            p.rate_limit
                .as_ref()
                .is_some_and(|r| r.overrides.len() == 1)
        );
        assert_eq!(api.ports[&9000].protocol, weft_authz::Protocol::Grpc);
    }

    #[test]
    fn errors_name_the_key() {
        for (yaml, want) in [
            (
                "  \"api.demo\": {ports: {\"80\": {protocol: quic}}}\n",
                "servers.\"api.demo\".ports.\"80\".protocol: \"quic\" is not one of",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {authorizations: [{name: a, clients: {identities: [\"bad name!\"]}}]}}}\n",
                "servers.\"api.demo\".ports.\"80\".authorizations[0].clients.identities: \"bad name!\"",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {authorizations: [{name: a, clients: {}}]}}}\n",
                "authorizations[0].clients: name identities, networks, or unauthenticated: true",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {protocol: opaque, rate_limit: {total_rps: 5}}}}\n",
                "ports.\"80\".rate_limit: rate limits apply to HTTP requests",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {protocol: grpc, rate_limit: {total_rps: 5}}}}\n",
                "carries no rate limit for grpc ports",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {rate_limit: {per_client_rps: 0}}}}\n",
                "rate_limit.per_client_rps: 0 requests per second",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {authorizations: [{name: a, clients: {networks: [10.0.0.0/33]}}]}}}\n",
                "clients.networks: \"10.0.0.0/33\" is not a network",
            ),
            (
                "  \"api.demo\": {ports: {\"80\": {protocol: grpc, authorizations: [{name: a, clients: {unauthenticated: true}, routes: [{path: /x}]}]}}}\n",
                "routes[0]: a grpc port's routes are grpc:",
            ),
            (
                "  \"api.demo\": {ports: {\"0\": {}}}\n",
                "ports.\"0\": not a port number",
            ),
            (
                "  \"api.demo\": {default: open}\n",
                "servers.\"api.demo\".default: \"open\" is not a default policy",
            ),
        ] {
            let err = parse(yaml).err().unwrap_or_default();
            assert!(err.contains(want), "{yaml}\n got: {err}\nwant: {want}");
        }
    }
}
