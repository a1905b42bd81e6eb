//! What linkerd2-proxy requires of an `OutboundPolicy` (its
//! `client-policy` conversions): every resource names its group, kind,
//! name and namespace; every backend has metadata and a queue; a balancer
//! discovers a *name* (an address there makes it panic: "destination must
//! be a nameaddr"). weft-control's policies meet all of it, and weft's
//! decoder refuses what linkerd2-proxy refuses.

use std::path::Path;

use linkerd2_proxy_api::destination::WeightedAddr;
use linkerd2_proxy_api::meta::{Metadata, metadata};
use linkerd2_proxy_api::outbound as api;
use prost::Message;
use weft_destinations::Destinations;
use weft_detect::Authority;
use weft_policy_api::{decode, encode, encode_forward, wire};

const FILE: &str = r#"
destinations:
  "api.demo:8080":
    endpoints: [{addr: "127.0.0.1:1"}]
    routes:
      - name: to-an-address
        match: {path_prefix: /pinned}
        backends: [{destination: "10.1.2.3:80"}]
      - name: split
        backends:
          - {destination: "api.demo:8080", weight: 90}
          - {destination: "api-v2.demo.svc.cluster.local:8080", weight: 10}
  "single:80":
    endpoints: [{addr: "127.0.0.1:2"}]
  "db.demo:5432":
    endpoints: [{addr: "127.0.0.1:3"}]
    opaque: true
"#;

/// Every backend of every route of every protocol in `p`.
fn backends(p: &api::OutboundPolicy) -> Vec<api::Backend> {
    let mut out = Vec::new();
    let http = |routes: &[api::HttpRoute], out: &mut Vec<api::Backend>| {
        for rule in routes.iter().flat_map(|r| &r.rules) {
            use api::http_route::distribution::Kind;
            match rule.backends.as_ref().and_then(|d| d.kind.as_ref()) {
                Some(Kind::FirstAvailable(f)) => {
                    out.extend(f.backends.iter().filter_map(|b| b.backend.clone()))
                }
                Some(Kind::RandomAvailable(r)) => out.extend(
                    r.backends
                        .iter()
                        .filter_map(|w| w.backend.as_ref().and_then(|b| b.backend.clone())),
                ),
                _ => {}
            }
        }
    };
    let opaque = |o: &api::proxy_protocol::Opaque, out: &mut Vec<api::Backend>| {
        for rule in o.routes.iter().flat_map(|r| &r.rules) {
            use api::opaque_route::distribution::Kind;
            if let Some(Kind::FirstAvailable(f)) =
                rule.backends.as_ref().and_then(|d| d.kind.as_ref())
            {
                out.extend(f.backends.iter().filter_map(|b| b.backend.clone()));
            }
        }
    };
    match p.protocol.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(api::proxy_protocol::Kind::Detect(d)) => {
            http(
                &d.http1
                    .as_ref()
                    .map(|h| h.routes.clone())
                    .unwrap_or_default(),
                &mut out,
            );
            http(
                &d.http2
                    .as_ref()
                    .map(|h| h.routes.clone())
                    .unwrap_or_default(),
                &mut out,
            );
            if let Some(o) = &d.opaque {
                opaque(o, &mut out);
            }
        }
        Some(api::proxy_protocol::Kind::Opaque(o)) => opaque(o, &mut out),
        _ => {}
    }
    out
}

/// Every metadata in `p`: the policy's, its routes' and its backends'.
fn metadata_of(p: &api::OutboundPolicy) -> Vec<Option<Metadata>> {
    let mut out = vec![p.metadata.clone()];
    match p.protocol.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(api::proxy_protocol::Kind::Detect(d)) => {
            for h in [
                d.http1.as_ref().map(|h| &h.routes),
                d.http2.as_ref().map(|h| &h.routes),
            ]
            .into_iter()
            .flatten()
            {
                out.extend(h.iter().map(|r| r.metadata.clone()));
            }
            out.extend(
                d.opaque
                    .iter()
                    .flat_map(|o| o.routes.iter().map(|r| r.metadata.clone())),
            );
        }
        Some(api::proxy_protocol::Kind::Opaque(o)) => {
            out.extend(o.routes.iter().map(|r| r.metadata.clone()))
        }
        _ => {}
    }
    out.extend(backends(p).into_iter().map(|b| b.metadata));
    out
}

/// The published message, as a client that knows only the API reads it.
fn published(p: &wire::OutboundPolicy) -> anyhow::Result<api::OutboundPolicy> {
    Ok(api::OutboundPolicy::decode(p.encode_to_vec().as_slice())?)
}

fn every_policy() -> anyhow::Result<Vec<(Authority, wire::OutboundPolicy)>> {
    let d = Destinations::parse(Path::new("test.yaml"), FILE)?;
    let mut out: Vec<_> = d
        .by_authority
        .iter()
        .map(|(a, dest)| (a.clone(), encode(a, &dest.policy, dest.opaque)))
        .collect();
    let unknown: Authority = "nobody-knows.example.com:443".parse()?;
    out.push((
        unknown.clone(),
        encode(&unknown, &Default::default(), false),
    ));
    let pod: Authority = "10.0.0.9:8080".parse()?;
    out.push((pod, encode_forward(forward_to("10.0.0.9:8080")?, false)));
    Ok(out)
}

fn forward_to(addr: &str) -> anyhow::Result<WeightedAddr> {
    Ok(WeightedAddr {
        addr: Some(addr.parse::<std::net::SocketAddr>()?.into()),
        weight: 1,
        ..Default::default()
    })
}

#[test]
fn every_resource_names_its_group_kind_name_and_namespace() -> anyhow::Result<()> {
    for (a, p) in every_policy()? {
        let msg = published(&p)?;
        let all = metadata_of(&msg);
        assert!(all.len() > 2, "{a}: {all:?}");
        for m in all {
            match m.and_then(|m| m.kind) {
                Some(metadata::Kind::Default(name)) => assert!(!name.is_empty(), "{a}"),
                Some(metadata::Kind::Resource(r)) => {
                    for (field, value) in [
                        ("group", &r.group),
                        ("kind", &r.kind),
                        ("name", &r.name),
                        ("namespace", &r.namespace),
                    ] {
                        assert!(!value.is_empty(), "{a}: {field} of {r:?}");
                    }
                }
                None => panic!("{a}: metadata missing"),
            }
        }
        for b in backends(&msg) {
            assert!(b.queue.is_some(), "{a}: a backend without a queue");
        }
    }
    Ok(())
}

#[test]
fn services_are_named_as_kubernetes_names_them() -> anyhow::Result<()> {
    let named = |p: &wire::OutboundPolicy| match p.metadata.as_ref().and_then(|m| m.kind.clone()) {
        Some(metadata::Kind::Resource(r)) => (r.name, r.namespace, r.port),
        other => panic!("{other:?}"),
    };
    for (authority, want) in [
        ("web.demo:8080", ("web", "demo", 8080)),
        ("web.demo.svc.cluster.local:80", ("web", "demo", 80)),
        ("single:80", ("single", "default", 80)),
        ("api.example.com:443", ("api.example.com", "default", 443)),
    ] {
        let a: Authority = authority.parse()?;
        let (name, namespace, port) = named(&encode(&a, &Default::default(), false));
        assert_eq!(
            (name.as_str(), namespace.as_str(), port),
            want,
            "{authority}"
        );
    }
    Ok(())
}

#[test]
fn balancers_discover_names_and_addresses_are_forwarded() -> anyhow::Result<()> {
    for (a, p) in every_policy()? {
        for b in backends(&published(&p)?) {
            match b.kind {
                Some(api::backend::Kind::Balancer(p2c)) => {
                    let Some(api::backend::endpoint_discovery::Kind::Dst(dst)) =
                        p2c.discovery.and_then(|d| d.kind)
                    else {
                        panic!("{a}: a balancer without discovery");
                    };
                    let path: Authority = dst.path.parse()?;
                    assert!(path.socket_addr().is_none(), "{a}: balancer on {path}");
                }
                Some(api::backend::Kind::Forward(w)) => {
                    assert!(w.addr.is_some(), "{a}: forward without an address")
                }
                None => panic!("{a}: a backend without a kind"),
            }
        }
    }
    // The route pinned to an address still reaches it, through a weft proxy.
    let a: Authority = "api.demo:8080".parse()?;
    let (_, p) = every_policy()?
        .into_iter()
        .find(|(x, _)| *x == a)
        .ok_or_else(|| anyhow::anyhow!("api.demo missing"))?;
    let decoded = decode(&a, &p)?;
    assert_eq!(
        decoded.routes[0].backends[0].destination.to_string(),
        "10.1.2.3:80"
    );
    Ok(())
}

#[test]
fn a_forwarded_address_decodes_to_itself() -> anyhow::Result<()> {
    let a: Authority = "10.0.0.9:8080".parse()?;
    let p = decode(&a, &encode_forward(forward_to("10.0.0.9:8080")?, false))?;
    assert!(p.routes.is_empty(), "{:?}", p.routes);
    Ok(())
}

/// Blanks the namespace of every resource `edit` reaches.
fn without_namespace(m: &mut Option<Metadata>) {
    if let Some(Metadata {
        kind: Some(metadata::Kind::Resource(r)),
    }) = m
    {
        r.namespace.clear();
    }
}

#[test]
fn what_linkerd2_proxy_refuses_weft_refuses_too() -> anyhow::Result<()> {
    let a: Authority = "web.demo:8080".parse()?;
    let good = encode(&a, &Default::default(), false);
    decode(&a, &good)?;

    let mut parent = good.clone();
    without_namespace(&mut parent.metadata);
    let err = decode(&a, &parent).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("the policy: invalid metadata: namespace must not be empty")
    );

    let mut no_meta = good.clone();
    no_meta.metadata = None;
    let err = decode(&a, &no_meta).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("the policy: invalid metadata: missing")
    );

    // A backend's namespace, and a balancer on an address.
    let edit_backend = |edit: &dyn Fn(&mut api::Backend)| {
        let mut p = good.clone();
        if let Some(api::proxy_protocol::Kind::Detect(d)) =
            p.protocol.as_mut().and_then(|p| p.kind.as_mut())
            && let Some(h) = d.http1.as_mut()
        {
            for rule in h.routes.iter_mut().flat_map(|r| r.rules.iter_mut()) {
                if let Some(api::http_route::distribution::Kind::RandomAvailable(r)) =
                    rule.backends.as_mut().and_then(|d| d.kind.as_mut())
                {
                    for w in &mut r.backends {
                        if let Some(b) = w.backend.as_mut().and_then(|b| b.backend.as_mut()) {
                            edit(b);
                        }
                    }
                }
            }
        }
        decode(&a, &p).err().map(|e| e.to_string())
    };
    assert_eq!(
        edit_backend(&|b| without_namespace(&mut b.metadata)).as_deref(),
        Some(r#"route "default": backend 0: invalid metadata: namespace must not be empty"#)
    );
    assert_eq!(
        edit_backend(&|b| b.queue = None).as_deref(),
        Some(r#"route "default": backend 0: no queue"#)
    );
    assert_eq!(
        edit_backend(&|b| {
            if let Some(api::backend::Kind::Balancer(p2c)) = b.kind.as_mut() {
                p2c.discovery = Some(api::backend::EndpointDiscovery {
                    kind: Some(api::backend::endpoint_discovery::Kind::Dst(
                        api::backend::endpoint_discovery::DestinationGet {
                            path: "10.0.0.9:8080".into(),
                        },
                    )),
                });
            }
        })
        .as_deref(),
        Some(r#"route "default": backend 0: discovery path "10.0.0.9:8080" is not a name:port"#)
    );
    Ok(())
}

/// A duration the proxy would add to an `Instant` is bounded: a timeout or
/// backoff near `i64::MAX` seconds (which aborted the proxy) or a negative
/// one refuses the whole policy, naming where it was.
#[test]
fn durations_beyond_a_day_or_below_zero_are_refused() -> anyhow::Result<()> {
    let d = Destinations::parse(Path::new("test.yaml"), FILE)?;
    let a: Authority = "api.demo:8080".parse()?;
    let good = encode(&a, &d.by_authority[&a].policy, false);
    decode(&a, &good)?;
    for (seconds, nanos) in [(i64::MAX, 999_999_999), (-1, 0), (86_401, 0)] {
        let mut p = good.clone();
        if let Some(api::proxy_protocol::Kind::Detect(det)) =
            p.protocol.as_mut().and_then(|p| p.kind.as_mut())
            && let Some(h) = det.http1.as_mut()
        {
            h.routes[0].rules[0].timeouts = Some(linkerd2_proxy_api::http_route::Timeouts {
                request: Some(prost_types::Duration { seconds, nanos }),
                ..Default::default()
            });
        }
        let err = decode(&a, &p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(r#"route "to-an-address": timeout: duration "#)
                && err.ends_with("is negative or longer than 86400s"),
            "{seconds}: {err}"
        );
    }
    Ok(())
}
