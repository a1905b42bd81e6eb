//! A weft [`Policy`] as an `OutboundPolicy`.
//!
//! Every weft route becomes one `HttpRoute` with one rule, in weft's
//! first-match order; the destination's own timeout, retry and hedge are
//! written into each rule that does not override them, since the API has
//! no destination-level place for them. A destination without routes gets
//! one match-all route to itself whose metadata is `Default`, as Linkerd's
//! policy controller describes a service with no routes attached.

use std::time::Duration;

use linkerd2_proxy_api::destination::WeightedAddr;
use linkerd2_proxy_api::http_route as api_route;
use linkerd2_proxy_api::meta::{self, Metadata, metadata};
use linkerd2_proxy_api::outbound::{
    self as api, Backend, ExponentialBackoff, FailureAccrual, HttpRoute, ProxyProtocol, Queue,
    backend, failure_accrual, http_route, proxy_protocol,
};
use weft_balance::{BreakerConfig, PeakEwmaConfig};
use weft_destinations::{Hedge, Policy, Retry, Route, RouteMatch};
use weft_detect::Authority;

use crate::wire::{self, Extension, OutboundPolicy, RouteExtension};

/// The weft proxy's body replay limit: larger requests are not retried.
pub(crate) const MAX_REPLAY_BYTES: u32 = 64 * 1024;
/// Linkerd's protocol detection timeout.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests a backend holds while it has no ready endpoint, and for how
/// long: the proxy's per-endpoint in-flight bound and queue timeout.
const QUEUE_CAPACITY: u32 = 1_000;
const QUEUE_FAILFAST: Duration = Duration::from_millis(500);

/// The name of the route a destination without routes has.
pub(crate) const DEFAULT_ROUTE: &str = "default";
/// The namespace of a service whose name has none (`Service` resources
/// must have one).
const DEFAULT_NAMESPACE: &str = "default";
/// The metadata name of a policy or backend forwarding to an address.
pub(crate) const FORWARD: &str = "forward";

/// The policy for `authority`. `opaque` services are TCP only: their
/// policy has no HTTP routes.
pub fn encode(authority: &Authority, policy: &Policy, opaque: bool) -> OutboundPolicy {
    let metadata = Some(service_metadata(authority));
    if opaque {
        return OutboundPolicy {
            protocol: Some(ProxyProtocol {
                kind: Some(proxy_protocol::Kind::Opaque(opaque_protocol(authority))),
            }),
            metadata,
            weft: None,
        };
    }
    let (routes, extensions): (Vec<HttpRoute>, Vec<RouteExtension>) = if policy.routes.is_empty() {
        let own = Route {
            name: DEFAULT_ROUTE.into(),
            matches: RouteMatch::default(),
            backends: vec![weft_destinations::RouteBackend {
                destination: authority.clone(),
                weight: 1,
            }],
            timeout: None,
            retry: None,
            hedge: None,
        };
        let (r, e) = http_route(authority, policy, &own);
        (
            vec![HttpRoute {
                metadata: Some(Metadata {
                    kind: Some(metadata::Kind::Default(DEFAULT_ROUTE.into())),
                }),
                ..r
            }],
            vec![e],
        )
    } else {
        policy
            .routes
            .iter()
            .map(|r| http_route(authority, policy, r))
            .unzip()
    };
    let failure_accrual = failure_accrual(&policy.breaker);
    let detect = proxy_protocol::Detect {
        timeout: Some(duration(DETECT_TIMEOUT)),
        opaque: Some(opaque_protocol(authority)),
        http1: Some(proxy_protocol::Http1 {
            routes: routes.clone(),
            failure_accrual,
        }),
        http2: Some(proxy_protocol::Http2 {
            routes,
            failure_accrual,
        }),
    };
    OutboundPolicy {
        protocol: Some(ProxyProtocol {
            kind: Some(proxy_protocol::Kind::Detect(detect)),
        }),
        metadata,
        weft: Some(Extension { routes: extensions }),
    }
}

fn http_route(
    authority: &Authority,
    policy: &Policy,
    route: &Route,
) -> (HttpRoute, RouteExtension) {
    let timeout = route.timeout.or(policy.timeout);
    let retry = route.retry.as_ref().or(policy.retry.as_ref());
    let hedge = route.hedge.or(policy.hedge);
    let backends = route
        .backends
        .iter()
        .map(|b| http_route::WeightedRouteBackend {
            #[allow(deprecated)] // Proxies ignore it; the struct needs it.
            backend: Some(http_route::RouteBackend {
                backend: Some(balancer(&b.destination)),
                filters: Vec::new(),
                request_timeout: None,
            }),
            weight: b.weight,
        })
        .collect();
    #[allow(deprecated)] // The API asks servers to keep setting it.
    let rule = http_route::Rule {
        matches: vec![route_match(&route.matches)],
        filters: Vec::new(),
        backends: Some(http_route::Distribution {
            kind: Some(http_route::distribution::Kind::RandomAvailable(
                http_route::distribution::RandomAvailable { backends },
            )),
        }),
        request_timeout: timeout.map(duration),
        // weft's timeout runs from the request's start to the response
        // headers: the API's `request` timeout is the closest.
        timeouts: timeout.map(|t| api_route::Timeouts {
            request: Some(duration(t)),
            ..Default::default()
        }),
        retry: retry.map(http_retry),
        allow_l5d_request_headers: false,
    };
    let http = HttpRoute {
        metadata: Some(Metadata {
            kind: Some(metadata::Kind::Resource(meta::Resource {
                group: "policy.weft.io".into(),
                kind: "Route".into(),
                name: route.name.to_string(),
                namespace: ServiceName::of(authority).namespace.to_string(),
                section: authority.to_string(),
                port: 0,
            })),
        }),
        hosts: Vec::new(),
        rules: vec![rule],
    };
    (http, extension(retry, hedge))
}

fn route_match(m: &RouteMatch) -> api_route::HttpRouteMatch {
    api_route::HttpRouteMatch {
        path: m.path_prefix.as_ref().map(|p| api_route::PathMatch {
            kind: Some(api_route::path_match::Kind::Prefix(p.clone())),
        }),
        headers: m
            .headers
            .iter()
            .map(|(k, v)| api_route::HeaderMatch {
                name: k.clone(),
                value: Some(api_route::header_match::Value::Exact(v.as_bytes().to_vec())),
            })
            .collect(),
        query_params: Vec::new(),
        method: m.method.as_ref().map(|m| method(m)),
    }
}

fn method(m: &str) -> linkerd2_proxy_api::http_types::HttpMethod {
    match http::Method::from_bytes(m.as_bytes()) {
        Ok(m) => m.into(),
        Err(_) => linkerd2_proxy_api::http_types::HttpMethod {
            r#type: Some(
                linkerd2_proxy_api::http_types::http_method::Type::Unregistered(m.to_string()),
            ),
        },
    }
}

fn http_retry(r: &Retry) -> http_route::Retry {
    let mut ranges = Vec::new();
    if r.on.any_5xx {
        ranges.push((500, 599));
    }
    ranges.extend(r.on.statuses.iter().map(|&s| (u32::from(s), u32::from(s))));
    http_route::Retry {
        max_retries: r.attempts,
        max_request_bytes: MAX_REPLAY_BYTES,
        conditions: Some(http_route::retry::Conditions {
            status_ranges: ranges
                .into_iter()
                .map(|(start, end)| http_route::retry::conditions::StatusRange { start, end })
                .collect(),
        }),
        // weft retries at once, on another endpoint, bounded by the budget.
        timeout: None,
        backoff: None,
    }
}

fn extension(retry: Option<&Retry>, hedge: Option<Hedge>) -> RouteExtension {
    let mut e = RouteExtension::default();
    if let Some(r) = retry {
        e.retry_connect_error = r.on.connect_error;
        e.retry_reset = r.on.reset;
        e.retry_grpc = r.on.grpc.clone();
        e.budget = Some(wire::Budget {
            ratio: r.budget.ratio,
            min_per_second: r.budget.min_per_second,
        });
    }
    match hedge {
        Some(Hedge::After(d)) => e.hedge_after = Some(duration(d)),
        Some(Hedge::Percentile(q)) => e.hedge_percentile = Some(q),
        None => {}
    }
    e
}

fn failure_accrual(b: &BreakerConfig) -> Option<FailureAccrual> {
    // An absent accrual policy means no circuit breaking, as weft's 0.
    (b.consecutive_failures > 0).then(|| FailureAccrual {
        ejection: None,
        kind: Some(failure_accrual::Kind::ConsecutiveFailures(
            failure_accrual::ConsecutiveFailures {
                max_failures: b.consecutive_failures,
                backoff: Some(ExponentialBackoff {
                    min_backoff: Some(duration(b.min_open)),
                    max_backoff: Some(duration(b.max_open)),
                    jitter_ratio: 0.0,
                    respect_retry_after_hint: false,
                }),
            },
        )),
    })
}

fn queue() -> Option<Queue> {
    Some(Queue {
        capacity: QUEUE_CAPACITY,
        failfast_timeout: Some(duration(QUEUE_FAILFAST)),
    })
}

/// A load-balanced backend discovered with Destination `Get`, which the
/// API defines for names only (linkerd2-proxy refuses, indeed panics on,
/// an IP path): an address is a backend of its own, forwarded to.
fn balancer(authority: &Authority) -> Backend {
    if let Some(addr) = authority.socket_addr() {
        return forward(WeightedAddr {
            addr: Some(addr.into()),
            weight: 1,
            ..Default::default()
        });
    }
    let ewma = PeakEwmaConfig::default();
    Backend {
        metadata: Some(service_metadata(authority)),
        queue: queue(),
        kind: Some(backend::Kind::Balancer(backend::BalanceP2c {
            discovery: Some(backend::EndpointDiscovery {
                kind: Some(backend::endpoint_discovery::Kind::Dst(
                    backend::endpoint_discovery::DestinationGet {
                        path: authority.to_string(),
                    },
                )),
            }),
            load: Some(backend::balance_p2c::Load::PeakEwma(
                backend::balance_p2c::PeakEwma {
                    default_rtt: Some(duration(ewma.default_rtt)),
                    decay: Some(duration(ewma.decay)),
                },
            )),
        })),
    }
}

fn forward(endpoint: WeightedAddr) -> Backend {
    Backend {
        metadata: Some(Metadata {
            kind: Some(metadata::Kind::Default(FORWARD.into())),
        }),
        queue: queue(),
        kind: Some(backend::Kind::Forward(endpoint)),
    }
}

/// The policy of an address that is no service (a pod's own address, or
/// one discovery does not know), looked up by `IP:port`: everything is
/// forwarded to `endpoint` as it is, with the identity and protocol hint
/// discovery knows for it, as Linkerd's controller answers an address
/// outside the cluster's services.
pub fn encode_forward(endpoint: WeightedAddr, opaque: bool) -> OutboundPolicy {
    let backend = forward(endpoint);
    let default = || {
        Some(Metadata {
            kind: Some(metadata::Kind::Default(FORWARD.into())),
        })
    };
    let opaque_routes = proxy_protocol::Opaque {
        routes: vec![api::OpaqueRoute {
            metadata: default(),
            rules: vec![api::opaque_route::Rule {
                backends: Some(api::opaque_route::Distribution {
                    kind: Some(api::opaque_route::distribution::Kind::FirstAvailable(
                        api::opaque_route::distribution::FirstAvailable {
                            backends: vec![api::opaque_route::RouteBackend {
                                backend: Some(backend.clone()),
                                filters: Vec::new(),
                            }],
                        },
                    )),
                }),
                filters: Vec::new(),
            }],
        }],
    };
    let kind = if opaque {
        proxy_protocol::Kind::Opaque(opaque_routes)
    } else {
        #[allow(deprecated)] // The struct needs them; proxies ignore them.
        let routes = vec![HttpRoute {
            metadata: default(),
            hosts: Vec::new(),
            rules: vec![http_route::Rule {
                matches: vec![api_route::HttpRouteMatch::default()],
                filters: Vec::new(),
                backends: Some(http_route::Distribution {
                    kind: Some(http_route::distribution::Kind::FirstAvailable(
                        http_route::distribution::FirstAvailable {
                            backends: vec![http_route::RouteBackend {
                                backend: Some(backend),
                                filters: Vec::new(),
                                request_timeout: None,
                            }],
                        },
                    )),
                }),
                request_timeout: None,
                timeouts: None,
                retry: None,
                allow_l5d_request_headers: false,
            }],
        }];
        proxy_protocol::Kind::Detect(proxy_protocol::Detect {
            timeout: Some(duration(DETECT_TIMEOUT)),
            opaque: Some(opaque_routes),
            http1: Some(proxy_protocol::Http1 {
                routes: routes.clone(),
                failure_accrual: None,
            }),
            http2: Some(proxy_protocol::Http2 {
                routes,
                failure_accrual: None,
            }),
        })
    };
    OutboundPolicy {
        protocol: Some(ProxyProtocol { kind: Some(kind) }),
        metadata: default(),
        weft: None,
    }
}

fn opaque_protocol(authority: &Authority) -> proxy_protocol::Opaque {
    proxy_protocol::Opaque {
        routes: vec![api::OpaqueRoute {
            metadata: Some(Metadata {
                kind: Some(metadata::Kind::Default(DEFAULT_ROUTE.into())),
            }),
            rules: vec![api::opaque_route::Rule {
                backends: Some(api::opaque_route::Distribution {
                    kind: Some(api::opaque_route::distribution::Kind::FirstAvailable(
                        api::opaque_route::distribution::FirstAvailable {
                            backends: vec![api::opaque_route::RouteBackend {
                                backend: Some(balancer(authority)),
                                filters: Vec::new(),
                            }],
                        },
                    )),
                }),
                filters: Vec::new(),
            }],
        }],
    }
}

/// A service's name and namespace as a Kubernetes-style resource:
/// `name.namespace` with or without `.svc[.domain]`; any other host is a
/// name of its own in `default`. linkerd2-proxy refuses a policy in which
/// any resource's namespace is empty.
struct ServiceName<'a> {
    name: &'a str,
    namespace: &'a str,
}

impl<'a> ServiceName<'a> {
    fn of(authority: &'a Authority) -> Self {
        let host = authority.bare_host();
        let mut labels = host.split('.');
        match (labels.next(), labels.next(), labels.next()) {
            (Some(name), Some(namespace), None | Some("svc"))
                if authority.socket_addr().is_none() =>
            {
                Self { name, namespace }
            }
            _ => Self {
                name: host,
                namespace: DEFAULT_NAMESPACE,
            },
        }
    }
}

/// A destination as a resource: a service named by host, with its port.
fn service_metadata(authority: &Authority) -> Metadata {
    let ServiceName { name, namespace } = ServiceName::of(authority);
    Metadata {
        kind: Some(metadata::Kind::Resource(meta::Resource {
            group: "core".into(),
            kind: "Service".into(),
            name: name.to_string(),
            namespace: namespace.to_string(),
            section: String::new(),
            port: u32::from(authority.port()),
        })),
    }
}

pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
