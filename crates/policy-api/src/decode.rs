//! An `OutboundPolicy` as a weft [`Policy`].
//!
//! Everything weft-control sends decodes to the policy it encoded (in
//! effect: destination-level settings come back on each route). Policies
//! from other servers decode by the API's documented meaning; what weft
//! cannot honour (regex or exact path matches, query matches, filters) is
//! refused as a whole with the route and the reason, so the proxy keeps
//! its last good policy rather than half-applying one.

use std::time::Duration;

use linkerd2_proxy_api::http_route as api_route;
use linkerd2_proxy_api::meta::{Metadata, metadata};
use linkerd2_proxy_api::outbound::{
    self as api, Backend, FailureAccrual, backend, failure_accrual, grpc_route, http_route,
    proxy_protocol,
};
use weft_balance::BreakerConfig;
use weft_destinations::{Budget, Hedge, Policy, Retry, RetryOn, Route, RouteBackend, RouteMatch};
use weft_detect::Authority;

use crate::wire::{OutboundPolicy, RouteExtension};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the policy names no protocol")]
    NoProtocol,
    #[error("route {route:?}: {reason}")]
    Route { route: String, reason: String },
    #[error("{what}: invalid metadata: {reason}")]
    Metadata { what: String, reason: &'static str },
    #[error("{what}: duration {seconds}s {nanos}ns is negative or longer than {max:?}")]
    Duration {
        what: String,
        seconds: i64,
        nanos: i32,
        max: Duration,
    },
}

/// Metadata as linkerd2-proxy requires it: present, and a resource with
/// its group, kind, name and namespace. A policy linkerd2-proxy would
/// refuse is refused here too, so a weft proxy never accepts what another
/// client of the same control plane cannot use.
fn metadata(what: impl FnOnce() -> String, m: Option<&Metadata>) -> Result<(), DecodeError> {
    let reason = match m.and_then(|m| m.kind.as_ref()) {
        None => "missing",
        Some(metadata::Kind::Default(_)) => return Ok(()),
        Some(metadata::Kind::Resource(r)) => match () {
            () if r.group.is_empty() => "group must not be empty",
            () if r.kind.is_empty() => "kind must not be empty",
            () if r.name.is_empty() => "name must not be empty",
            () if r.namespace.is_empty() => "namespace must not be empty",
            () => return Ok(()),
        },
    };
    Err(DecodeError::Metadata {
        what: what(),
        reason,
    })
}

fn refuse(route: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Route {
        route: route.to_string(),
        reason: reason.into(),
    }
}

/// Most statuses one retry condition range may expand to.
const MAX_STATUS_RANGE: u32 = 200;

/// The policy `msg` describes for `authority`, the destination it was
/// asked for.
pub fn decode(authority: &Authority, msg: &OutboundPolicy) -> Result<Policy, DecodeError> {
    let kind = msg
        .protocol
        .as_ref()
        .and_then(|p| p.kind.as_ref())
        .ok_or(DecodeError::NoProtocol)?;
    metadata(|| "the policy".into(), msg.metadata.as_ref())?;
    let ext = msg
        .weft
        .as_ref()
        .map(|e| e.routes.as_slice())
        .unwrap_or_default();
    let (routes, accrual) = match kind {
        proxy_protocol::Kind::Detect(d) => match (&d.http1, &d.http2) {
            (Some(h), _) => (http_routes(&h.routes, ext)?, h.failure_accrual.as_ref()),
            (None, Some(h)) => (http_routes(&h.routes, ext)?, h.failure_accrual.as_ref()),
            (None, None) => return Ok(Policy::default()),
        },
        proxy_protocol::Kind::Http1(h) => {
            (http_routes(&h.routes, ext)?, h.failure_accrual.as_ref())
        }
        proxy_protocol::Kind::Http2(h) => {
            (http_routes(&h.routes, ext)?, h.failure_accrual.as_ref())
        }
        proxy_protocol::Kind::Grpc(g) => (grpc_routes(&g.routes, ext)?, g.failure_accrual.as_ref()),
        // No HTTP requests to apply a policy to.
        proxy_protocol::Kind::Opaque(_) | proxy_protocol::Kind::Tls(_) => {
            return Ok(Policy::default());
        }
    };
    let breaker = breaker(accrual)?;
    // The default route of a destination without routes: its settings are
    // the destination's.
    if let [only] = routes.as_slice()
        && only.is_default
        && only.route.matches == RouteMatch::default()
        && matches!(only.route.backends.as_slice(), [b] if b.destination == *authority)
    {
        let r = &only.route;
        return Ok(Policy {
            timeout: r.timeout,
            breaker,
            retry: r.retry.clone(),
            hedge: r.hedge,
            routes: Vec::new(),
        });
    }
    Ok(Policy {
        timeout: None,
        breaker,
        retry: None,
        hedge: None,
        routes: routes.into_iter().map(|r| r.route).collect(),
    })
}

struct Decoded {
    route: Route,
    /// The route's metadata says it is the default one.
    is_default: bool,
}

fn name(metadata: Option<&Metadata>, index: usize) -> (String, bool) {
    match metadata.and_then(|m| m.kind.as_ref()) {
        Some(metadata::Kind::Default(n)) => (n.clone(), true),
        Some(metadata::Kind::Resource(r)) if !r.name.is_empty() => (r.name.clone(), false),
        _ => (format!("route-{index}"), false),
    }
}

fn http_routes(
    routes: &[api::HttpRoute],
    ext: &[RouteExtension],
) -> Result<Vec<Decoded>, DecodeError> {
    let mut out = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        metadata(|| format!("route {i}"), route.metadata.as_ref())?;
        let (name, is_default) = name(route.metadata.as_ref(), i);
        let ext = ext.get(i).cloned().unwrap_or_default();
        if !route.hosts.is_empty() {
            return Err(refuse(&name, "host matches are not supported"));
        }
        if route.rules.is_empty() {
            return Err(refuse(&name, "a route must have at least one rule"));
        }
        for rule in &route.rules {
            if !rule.filters.is_empty() {
                return Err(refuse(&name, "route filters are not supported"));
            }
            let backends = http_backends(&name, rule.backends.as_ref())?;
            let retry = rule
                .retry
                .as_ref()
                .map(|r| {
                    let statuses = statuses(
                        &name,
                        r.conditions
                            .as_ref()
                            .map(|c| c.status_ranges.as_slice())
                            .unwrap_or_default(),
                    )?;
                    Ok::<_, DecodeError>(retry(r.max_retries, statuses, Vec::new(), &ext))
                })
                .transpose()?;
            #[allow(deprecated)] // Older servers set only this.
            let timeout = timeout(&name, rule.timeouts.as_ref(), rule.request_timeout.as_ref())?;
            let hedge = hedge(&name, &ext)?;
            let matches = if rule.matches.is_empty() {
                vec![RouteMatch::default()]
            } else {
                rule.matches
                    .iter()
                    .map(|m| http_match(&name, m))
                    .collect::<Result<_, _>>()?
            };
            for matches in matches {
                out.push(Decoded {
                    route: Route {
                        name: name.as_str().into(),
                        matches,
                        backends: backends.clone(),
                        timeout,
                        retry: retry.clone(),
                        hedge,
                    },
                    is_default,
                });
            }
        }
    }
    Ok(out)
}

fn grpc_routes(
    routes: &[api::GrpcRoute],
    ext: &[RouteExtension],
) -> Result<Vec<Decoded>, DecodeError> {
    let mut out = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        metadata(|| format!("route {i}"), route.metadata.as_ref())?;
        let (name, is_default) = name(route.metadata.as_ref(), i);
        let ext = ext.get(i).cloned().unwrap_or_default();
        if !route.hosts.is_empty() {
            return Err(refuse(&name, "host matches are not supported"));
        }
        if route.rules.is_empty() {
            return Err(refuse(&name, "a route must have at least one rule"));
        }
        for rule in &route.rules {
            if !rule.filters.is_empty() {
                return Err(refuse(&name, "route filters are not supported"));
            }
            let backends = grpc_backends(&name, rule.backends.as_ref())?;
            let retry = rule.retry.as_ref().map(|r| {
                let c = r.conditions.unwrap_or_default();
                let codes = [
                    (c.cancelled, 1),
                    (c.deadine_exceeded, 4),
                    (c.resource_exhausted, 8),
                    (c.internal, 13),
                    (c.unavailable, 14),
                ]
                .into_iter()
                .filter_map(|(on, code)| on.then_some(code))
                .collect();
                retry(r.max_retries, (false, Vec::new()), codes, &ext)
            });
            #[allow(deprecated)] // Older servers set only this.
            let timeout = timeout(&name, rule.timeouts.as_ref(), rule.request_timeout.as_ref())?;
            let hedge = hedge(&name, &ext)?;
            let matches = if rule.matches.is_empty() {
                vec![RouteMatch::default()]
            } else {
                rule.matches
                    .iter()
                    .map(|m| grpc_match(&name, m))
                    .collect::<Result<_, _>>()?
            };
            for matches in matches {
                out.push(Decoded {
                    route: Route {
                        name: name.as_str().into(),
                        matches,
                        backends: backends.clone(),
                        timeout,
                        retry: retry.clone(),
                        hedge,
                    },
                    is_default,
                });
            }
        }
    }
    Ok(out)
}

fn http_match(route: &str, m: &api_route::HttpRouteMatch) -> Result<RouteMatch, DecodeError> {
    if !m.query_params.is_empty() {
        return Err(refuse(route, "query parameter matches are not supported"));
    }
    let path_prefix = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => None,
        Some(api_route::path_match::Kind::Prefix(p)) => Some(p.clone()),
        Some(api_route::path_match::Kind::Exact(p)) => {
            return Err(refuse(
                route,
                format!("exact path {p:?}: only path prefixes are supported"),
            ));
        }
        Some(api_route::path_match::Kind::Regex(p)) => {
            return Err(refuse(
                route,
                format!("regex path {p:?}: only path prefixes are supported"),
            ));
        }
    };
    if let Some(p) = &path_prefix
        && !p.starts_with('/')
    {
        return Err(refuse(
            route,
            format!("path prefix {p:?} must start with /"),
        ));
    }
    let method = match &m.method {
        None => None,
        Some(method) => Some(
            http::Method::try_from(method.clone())
                .map_err(|e| refuse(route, format!("method: {e}")))?
                .as_str()
                .to_string(),
        ),
    };
    Ok(RouteMatch {
        path_prefix,
        method,
        headers: headers(route, &m.headers)?,
    })
}

fn grpc_match(
    route: &str,
    m: &linkerd2_proxy_api::grpc_route::GrpcRouteMatch,
) -> Result<RouteMatch, DecodeError> {
    let path_prefix =
        m.rpc.as_ref().and_then(
            |rpc| match (rpc.service.is_empty(), rpc.method.is_empty()) {
                (true, _) => None,
                (false, true) => Some(format!("/{}", rpc.service)),
                (false, false) => Some(format!("/{}/{}", rpc.service, rpc.method)),
            },
        );
    if m.rpc
        .as_ref()
        .is_some_and(|r| r.service.is_empty() && !r.method.is_empty())
    {
        return Err(refuse(route, "a method match needs its service"));
    }
    Ok(RouteMatch {
        path_prefix,
        method: None,
        headers: headers(route, &m.headers)?,
    })
}

fn headers(
    route: &str,
    headers: &[api_route::HeaderMatch],
) -> Result<std::collections::BTreeMap<String, String>, DecodeError> {
    headers
        .iter()
        .map(|h| match &h.value {
            Some(api_route::header_match::Value::Exact(v)) => {
                let v = String::from_utf8(v.clone()).map_err(|_| {
                    refuse(route, format!("header {:?}: value is not UTF-8", h.name))
                })?;
                Ok((h.name.to_ascii_lowercase(), v))
            }
            Some(api_route::header_match::Value::Regex(_)) => Err(refuse(
                route,
                format!("header {:?}: only exact values are supported", h.name),
            )),
            None => Err(refuse(route, format!("header {:?}: no value", h.name))),
        })
        .collect()
}

/// Backends of an HTTP rule, by weight. `FirstAvailable` sends everything
/// to the first: weft has no failover between backends.
fn http_backends(
    route: &str,
    d: Option<&http_route::Distribution>,
) -> Result<Vec<RouteBackend>, DecodeError> {
    use http_route::distribution::Kind;
    let weighted: Vec<(Option<&Backend>, u32, bool)> = match d.and_then(|d| d.kind.as_ref()) {
        None | Some(Kind::Empty(_)) => Vec::new(),
        Some(Kind::FirstAvailable(f)) => f
            .backends
            .iter()
            .take(1)
            .map(|b| (b.backend.as_ref(), 1, !b.filters.is_empty()))
            .collect(),
        Some(Kind::RandomAvailable(r)) => r
            .backends
            .iter()
            .map(|w| {
                let b = w.backend.as_ref();
                (
                    b.and_then(|b| b.backend.as_ref()),
                    w.weight,
                    b.is_some_and(|b| !b.filters.is_empty()),
                )
            })
            .collect(),
    };
    backends(route, weighted)
}

fn grpc_backends(
    route: &str,
    d: Option<&grpc_route::Distribution>,
) -> Result<Vec<RouteBackend>, DecodeError> {
    use grpc_route::distribution::Kind;
    let weighted: Vec<(Option<&Backend>, u32, bool)> = match d.and_then(|d| d.kind.as_ref()) {
        None | Some(Kind::Empty(_)) => Vec::new(),
        Some(Kind::FirstAvailable(f)) => f
            .backends
            .iter()
            .take(1)
            .map(|b| (b.backend.as_ref(), 1, !b.filters.is_empty()))
            .collect(),
        Some(Kind::RandomAvailable(r)) => r
            .backends
            .iter()
            .map(|w| {
                let b = w.backend.as_ref();
                (
                    b.and_then(|b| b.backend.as_ref()),
                    w.weight,
                    b.is_some_and(|b| !b.filters.is_empty()),
                )
            })
            .collect(),
    };
    backends(route, weighted)
}

fn backends(
    route: &str,
    weighted: Vec<(Option<&Backend>, u32, bool)>,
) -> Result<Vec<RouteBackend>, DecodeError> {
    let mut out = Vec::new();
    for (i, (backend, weight, filtered)) in weighted.into_iter().enumerate() {
        if filtered {
            return Err(refuse(
                route,
                format!("backend {i}: filters are not supported"),
            ));
        }
        // Weight 0 takes a backend out of the split.
        if weight == 0 {
            continue;
        }
        if let Some(b) = backend {
            metadata(
                || format!("route {route:?}: backend {i}"),
                b.metadata.as_ref(),
            )?;
            if b.queue.is_none() {
                return Err(refuse(route, format!("backend {i}: no queue")));
            }
        }
        let destination = match backend.and_then(|b| b.kind.as_ref()) {
            Some(backend::Kind::Balancer(p2c)) => {
                let path = p2c
                    .discovery
                    .as_ref()
                    .and_then(|d| d.kind.as_ref())
                    .map(|backend::endpoint_discovery::Kind::Dst(dst)| dst.path.as_str());
                let path = path.ok_or_else(|| {
                    refuse(
                        route,
                        format!("backend {i}: a balancer needs a discovery path"),
                    )
                })?;
                match path.parse::<Authority>() {
                    Ok(a) if a.socket_addr().is_none() => a,
                    // Destination `Get` resolves names: an address is a
                    // `Forward` backend (linkerd2-proxy panics on one).
                    _ => {
                        return Err(refuse(
                            route,
                            format!("backend {i}: discovery path {path:?} is not a name:port"),
                        ));
                    }
                }
            }
            Some(backend::Kind::Forward(addr)) => {
                let addr = addr
                    .addr
                    .and_then(|a| std::net::SocketAddr::try_from(a).ok())
                    .ok_or_else(|| refuse(route, format!("backend {i}: no forward address")))?;
                Authority::from_socket_addr(addr)
            }
            None => return Err(refuse(route, format!("backend {i}: no backend"))),
        };
        out.push(RouteBackend {
            destination,
            weight,
        });
    }
    if out.is_empty() {
        return Err(refuse(route, "no backend with a weight above 0"));
    }
    Ok(out)
}

fn statuses(
    route: &str,
    ranges: &[http_route::retry::conditions::StatusRange],
) -> Result<(bool, Vec<u16>), DecodeError> {
    let mut any_5xx = false;
    let mut out = Vec::new();
    for r in ranges {
        if r.start == 500 && r.end == 599 {
            any_5xx = true;
            continue;
        }
        let valid = (100..=599).contains(&r.start) && (r.start..=599).contains(&r.end);
        if !valid || r.end - r.start >= MAX_STATUS_RANGE {
            return Err(refuse(
                route,
                format!(
                    "retry status range {}-{} is not within 100-599",
                    r.start, r.end
                ),
            ));
        }
        out.extend((r.start..=r.end).filter_map(|s| u16::try_from(s).ok()));
    }
    Ok((any_5xx, out))
}

fn retry(
    max_retries: u32,
    (any_5xx, statuses): (bool, Vec<u16>),
    grpc_codes: Vec<u32>,
    ext: &RouteExtension,
) -> Retry {
    let mut grpc = grpc_codes;
    for c in &ext.retry_grpc {
        if !grpc.contains(c) {
            grpc.push(*c);
        }
    }
    Retry {
        attempts: max_retries,
        on: RetryOn {
            any_5xx,
            statuses,
            connect_error: ext.retry_connect_error,
            reset: ext.retry_reset,
            grpc,
        },
        budget: ext
            .budget
            .as_ref()
            .map(|b| Budget {
                ratio: b.ratio.clamp(0.0, 1.0),
                min_per_second: b.min_per_second,
            })
            .unwrap_or_default(),
    }
}

fn hedge(route: &str, ext: &RouteExtension) -> Result<Option<Hedge>, DecodeError> {
    let after = ext
        .hedge_after
        .map(|d| std_duration(|| format!("route {route:?}: hedge delay"), d))
        .transpose()?;
    if let Some(d) = after.filter(|d| !d.is_zero()) {
        return Ok(Some(Hedge::After(d)));
    }
    Ok(ext
        .hedge_percentile
        .filter(|q| (0.5..=0.999).contains(q))
        .map(Hedge::Percentile))
}

/// weft bounds a request until its response headers: the `request`
/// timeout, else `response`, else the deprecated per-rule one.
fn timeout(
    route: &str,
    timeouts: Option<&api_route::Timeouts>,
    deprecated: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, DecodeError> {
    let d = timeouts
        .and_then(|t| t.request.or(t.response))
        .or(deprecated.copied())
        .map(|d| std_duration(|| format!("route {route:?}: timeout"), d))
        .transpose()?;
    Ok(d.filter(|d| !d.is_zero()))
}

fn breaker(accrual: Option<&FailureAccrual>) -> Result<BreakerConfig, DecodeError> {
    let defaults = BreakerConfig::default();
    let (failures, backoff) = match accrual.and_then(|a| a.kind.as_ref()) {
        Some(failure_accrual::Kind::ConsecutiveFailures(c)) => (c.max_failures, c.backoff.as_ref()),
        // weft counts consecutive failures only; a success-rate threshold
        // is not applied.
        Some(failure_accrual::Kind::Unified(u)) => (u.max_consecutive_failures, u.backoff.as_ref()),
        None => (0, None),
    };
    let min_open = backoff
        .and_then(|b| b.min_backoff)
        .map(|d| std_duration(|| "failure accrual: min_backoff".into(), d))
        .transpose()?
        .filter(|d| !d.is_zero())
        .unwrap_or(defaults.min_open);
    let max_open = backoff
        .and_then(|b| b.max_backoff)
        .map(|d| std_duration(|| "failure accrual: max_backoff".into(), d))
        .transpose()?
        .unwrap_or(defaults.max_open)
        .max(min_open);
    Ok(BreakerConfig {
        consecutive_failures: failures,
        min_open,
        max_open,
    })
}

/// A duration from the wire, refused when negative or beyond
/// [`weft_destinations::MAX_DURATION`]: the proxy adds these to
/// `Instant`s, which a value near `i64::MAX` seconds overflows.
fn std_duration(
    what: impl FnOnce() -> String,
    d: prost_types::Duration,
) -> Result<Duration, DecodeError> {
    match Duration::try_from(d) {
        Ok(std) if std <= weft_destinations::MAX_DURATION => Ok(std),
        _ => Err(DecodeError::Duration {
            what: what(),
            seconds: d.seconds,
            nanos: d.nanos,
            max: weft_destinations::MAX_DURATION,
        }),
    }
}
