//! A policy from a destinations file survives the trip through the wire:
//! the published message alone (what any Linkerd API client reads) says
//! the routes, weights, timeouts, retries and failure accrual, and a weft
//! proxy decodes the same policy it would read from the file.

use std::path::Path;
use std::time::Duration;

use linkerd2_proxy_api::outbound as api;
use prost::Message;
use weft_destinations::{Destinations, Hedge, Policy};
use weft_detect::Authority;
use weft_policy_api::{decode, encode, wire};

const FILE: &str = r#"
destinations:
  "api.demo:8080":
    endpoints: [{addr: "127.0.0.1:1"}]
    timeout: 2s
    retry:
      attempts: 2
      on: [5xx, 429, connect-error, "grpc:unavailable"]
      budget: {ratio: 0.1, min_per_second: 3}
    breaker: {consecutive_failures: 5, min_open: 2s, max_open: 30s}
    hedge: {after: p95}
    routes:
      - name: canary-header
        match: {path_prefix: /v1, method: GET, headers: {x-canary: "1"}}
        backends: [{destination: "api-v2.demo:8080", weight: 1}]
      - name: split
        backends:
          - {destination: "api.demo:8080", weight: 90}
          - {destination: "api-v2.demo:8080", weight: 10}
        timeout: 500ms
        hedge: {after: 20ms}
  "plain.demo:80":
    endpoints: [{addr: "127.0.0.1:2"}]
    timeout: 1s
    retry: {attempts: 1}
  "off.demo:80":
    endpoints: [{addr: "127.0.0.1:3"}]
    breaker: {consecutive_failures: 0}
"#;

fn policies() -> anyhow::Result<Destinations> {
    Ok(Destinations::parse(Path::new("test.yaml"), FILE)?)
}

fn policy(d: &Destinations, name: &str) -> anyhow::Result<(Authority, Policy)> {
    let a: Authority = name.parse()?;
    let p = d
        .by_authority
        .get(&a)
        .ok_or_else(|| anyhow::anyhow!("{name} missing"))?
        .policy
        .clone();
    Ok((a, p))
}

/// Encodes, sends as bytes, and decodes as a weft proxy does.
fn trip(a: &Authority, p: &Policy) -> anyhow::Result<(Vec<u8>, Policy)> {
    let bytes = encode(a, p, false).encode_to_vec();
    let msg = wire::OutboundPolicy::decode(bytes.as_slice())?;
    Ok((bytes, decode(a, &msg)?))
}

#[test]
fn a_destination_without_routes_comes_back_as_it_was() -> anyhow::Result<()> {
    let d = policies()?;
    for name in ["plain.demo:80", "off.demo:80"] {
        let (a, p) = policy(&d, name)?;
        let (_, back) = trip(&a, &p)?;
        assert_eq!(back, p, "{name}");
    }
    Ok(())
}

#[test]
fn routes_come_back_with_the_destination_settings_they_inherit() -> anyhow::Result<()> {
    let d = policies()?;
    let (a, p) = policy(&d, "api.demo:8080")?;
    let (_, back) = trip(&a, &p)?;
    assert_eq!(back.breaker, p.breaker);
    assert_eq!(back.routes.len(), 2);
    for (got, want) in back.routes.iter().zip(&p.routes) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.matches, want.matches);
        assert_eq!(got.backends, want.backends);
        assert_eq!(got.timeout, want.timeout.or(p.timeout), "{}", want.name);
        assert_eq!(got.retry, want.retry.clone().or(p.retry.clone()));
        assert_eq!(got.hedge, want.hedge.or(p.hedge));
    }
    assert_eq!(back.routes[0].hedge, Some(Hedge::Percentile(0.95)));
    assert_eq!(
        back.routes[1].hedge,
        Some(Hedge::After(Duration::from_millis(20)))
    );
    Ok(())
}

#[test]
fn the_published_message_alone_says_routes_weights_timeouts_retries_and_accrual()
-> anyhow::Result<()> {
    let d = policies()?;
    let (a, p) = policy(&d, "api.demo:8080")?;
    let (bytes, _) = trip(&a, &p)?;
    // What a client that knows only the published API sees.
    let msg = api::OutboundPolicy::decode(bytes.as_slice())?;
    let Some(api::proxy_protocol::Kind::Detect(detect)) = msg.protocol.and_then(|p| p.kind) else {
        anyhow::bail!("not Detect");
    };
    let http = detect.http1.ok_or_else(|| anyhow::anyhow!("no http1"))?;
    assert_eq!(
        http.routes,
        detect.http2.map(|h| h.routes).unwrap_or_default()
    );
    let Some(api::failure_accrual::Kind::ConsecutiveFailures(cf)) =
        http.failure_accrual.and_then(|f| f.kind)
    else {
        anyhow::bail!("no consecutive-failures accrual");
    };
    assert_eq!(cf.max_failures, 5);
    let backoff = cf.backoff.ok_or_else(|| anyhow::anyhow!("no backoff"))?;
    assert_eq!(backoff.min_backoff.map(|d| d.seconds), Some(2));
    assert_eq!(backoff.max_backoff.map(|d| d.seconds), Some(30));

    let split = &http.routes[1];
    let Some(linkerd2_proxy_api::meta::metadata::Kind::Resource(r)) =
        split.metadata.as_ref().and_then(|m| m.kind.clone())
    else {
        anyhow::bail!("route metadata");
    };
    assert_eq!(r.name, "split");
    let rule = &split.rules[0];
    let timeouts = rule.timeouts.ok_or_else(|| anyhow::anyhow!("timeouts"))?;
    assert_eq!(timeouts.request.map(|d| d.nanos), Some(500_000_000));
    let retry = rule
        .retry
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("retry"))?;
    assert_eq!(retry.max_retries, 2);
    let ranges: Vec<(u32, u32)> = retry
        .conditions
        .iter()
        .flat_map(|c| c.status_ranges.iter().map(|r| (r.start, r.end)))
        .collect();
    assert_eq!(ranges, [(500, 599), (429, 429)]);
    let Some(api::http_route::distribution::Kind::RandomAvailable(ra)) =
        rule.backends.as_ref().and_then(|b| b.kind.clone())
    else {
        anyhow::bail!("not RandomAvailable");
    };
    let weighted: Vec<(String, u32)> = ra
        .backends
        .iter()
        .map(|w| {
            let path = match w
                .backend
                .as_ref()
                .and_then(|b| b.backend.as_ref())
                .and_then(|b| b.kind.clone())
            {
                Some(api::backend::Kind::Balancer(p2c)) => match p2c.discovery.and_then(|d| d.kind)
                {
                    Some(api::backend::endpoint_discovery::Kind::Dst(dst)) => dst.path,
                    None => String::new(),
                },
                _ => String::new(),
            };
            (path, w.weight)
        })
        .collect();
    assert_eq!(
        weighted,
        [
            ("api.demo:8080".to_string(), 90),
            ("api-v2.demo:8080".to_string(), 10)
        ]
    );
    Ok(())
}

#[test]
fn what_weft_cannot_honour_is_refused_with_the_route() -> anyhow::Result<()> {
    let d = policies()?;
    let (a, p) = policy(&d, "api.demo:8080")?;
    let mut msg = encode(&a, &p, false);
    if let Some(api::proxy_protocol::Kind::Detect(detect)) =
        msg.protocol.as_mut().and_then(|p| p.kind.as_mut())
        && let Some(http) = detect.http1.as_mut()
    {
        http.routes[1].rules[0].matches[0].path = Some(linkerd2_proxy_api::http_route::PathMatch {
            kind: Some(linkerd2_proxy_api::http_route::path_match::Kind::Regex(
                "/v[0-9]+".into(),
            )),
        });
    }
    let err = decode(&a, &msg)
        .err()
        .ok_or_else(|| anyhow::anyhow!("accepted"))?;
    assert_eq!(
        err.to_string(),
        r#"route "split": regex path "/v[0-9]+": only path prefixes are supported"#
    );
    Ok(())
}

#[test]
fn grpc_routes_from_other_servers_decode_by_their_meaning() -> anyhow::Result<()> {
    use linkerd2_proxy_api::grpc_route::{GrpcRouteMatch, GrpcRpcMatch};
    let a: Authority = "greeter.demo:50051".parse()?;
    let resource = |group: &str, kind: &str, name: &str| {
        Some(linkerd2_proxy_api::meta::Metadata {
            kind: Some(linkerd2_proxy_api::meta::metadata::Kind::Resource(
                linkerd2_proxy_api::meta::Resource {
                    group: group.into(),
                    kind: kind.into(),
                    name: name.into(),
                    namespace: "demo".into(),
                    ..Default::default()
                },
            )),
        })
    };
    let backend = api::Backend {
        metadata: resource("core", "Service", "greeter-v2"),
        queue: Some(api::Queue {
            capacity: 100,
            failfast_timeout: None,
        }),
        kind: Some(api::backend::Kind::Balancer(api::backend::BalanceP2c {
            discovery: Some(api::backend::EndpointDiscovery {
                kind: Some(api::backend::endpoint_discovery::Kind::Dst(
                    api::backend::endpoint_discovery::DestinationGet {
                        path: "greeter-v2.demo:50051".into(),
                    },
                )),
            }),
            load: None,
        })),
    };
    #[allow(deprecated)]
    let route = api::GrpcRoute {
        metadata: resource("gateway.networking.k8s.io", "GRPCRoute", "greeter-split"),
        hosts: Vec::new(),
        rules: vec![api::grpc_route::Rule {
            matches: vec![GrpcRouteMatch {
                rpc: Some(GrpcRpcMatch {
                    service: "helloworld.Greeter".into(),
                    method: "SayHello".into(),
                }),
                headers: Vec::new(),
            }],
            filters: Vec::new(),
            backends: Some(api::grpc_route::Distribution {
                kind: Some(api::grpc_route::distribution::Kind::FirstAvailable(
                    api::grpc_route::distribution::FirstAvailable {
                        backends: vec![api::grpc_route::RouteBackend {
                            backend: Some(backend),
                            filters: Vec::new(),
                            request_timeout: None,
                        }],
                    },
                )),
            }),
            request_timeout: None,
            timeouts: None,
            retry: Some(api::grpc_route::Retry {
                max_retries: 3,
                conditions: Some(api::grpc_route::retry::Conditions {
                    unavailable: true,
                    resource_exhausted: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            allow_l5d_request_headers: false,
        }],
    };
    let msg = wire::OutboundPolicy {
        protocol: Some(api::ProxyProtocol {
            kind: Some(api::proxy_protocol::Kind::Grpc(api::proxy_protocol::Grpc {
                routes: vec![route],
                failure_accrual: None,
            })),
        }),
        metadata: resource("core", "Service", "greeter"),
        weft: None,
    };
    let p = decode(&a, &msg)?;
    assert_eq!(p.breaker.consecutive_failures, 0, "no accrual: no breaker");
    let [r] = p.routes.as_slice() else {
        anyhow::bail!("{:?}", p.routes)
    };
    assert_eq!(r.name.as_ref(), "greeter-split");
    assert_eq!(
        r.matches.path_prefix.as_deref(),
        Some("/helloworld.Greeter/SayHello")
    );
    assert_eq!(
        r.backends[0].destination.to_string(),
        "greeter-v2.demo:50051"
    );
    let retry = r.retry.as_ref().ok_or_else(|| anyhow::anyhow!("retry"))?;
    assert_eq!(
        (retry.attempts, retry.on.grpc.as_slice()),
        (3, &[8, 14][..])
    );
    Ok(())
}
