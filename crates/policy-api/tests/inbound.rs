//! Inbound policy through the API's messages: what a proxy decodes admits
//! exactly what the policy compiled in place admits, and the messages
//! follow the protos' documented shapes.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Instant;

use http::Method;
use linkerd2_proxy_api::inbound as api;
use weft_authz::{Client, PortSpec, Server};
use weft_destinations::Destinations;
use weft_policy_api::inbound::{decode, encode};

const POLICY: &str = r#"
destinations: {}
servers:
  "api.demo":
    ports:
      "8080":
        default: allow-authenticated
        authorizations:
          - name: web-reads
            clients: {identities: ["web.demo", "*.batch.demo"]}
            routes: [{path_prefix: /v1/, methods: [GET]}]
          - name: office
            clients: {networks: [10.0.0.0/8], except: [10.9.0.0/16]}
            routes: [{path: /health}]
          - name: ops
            clients: {identities: [ops.demo]}
        rate_limit: {total_rps: 1000, per_client_rps: 100, overrides: [{clients: {identities: ["batch.demo"]}, rps: 10}]}
      "9000":
        protocol: grpc
        default: deny
        authorizations:
          - name: web
            clients: {identities: ["web.demo"]}
            routes: [{grpc: demo.Echo/Say}, {grpc: grpc.health.v1.Health}]
      "5432":
        protocol: opaque
        default: deny
        authorizations:
          - name: db-clients
            clients: {identities: ["*.batch.demo"], networks: [10.0.0.0/8]}
"#;

fn specs() -> anyhow::Result<Vec<PortSpec>> {
    let d = Destinations::parse(Path::new("p.yaml"), POLICY)?;
    Ok(d.servers["api.demo"].ports.values().cloned().collect())
}

fn decide(
    s: &Server,
    who: Option<&'static str>,
    addr: &str,
    method: &Method,
    path: &str,
) -> String {
    let client = Client {
        addr: addr.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        identity: who,
    };
    if s.protocol.is_http() {
        match s.authorize_request(&client, method, path, Instant::now()) {
            Ok(p) => format!("allow {} by {}", p.route.name, p.authorization.name),
            Err((_, d)) => format!("deny: {d}"),
        }
    } else {
        match s.authorize_connection(&client) {
            Ok(a) => format!("allow by {}", a.name),
            Err(d) => format!("deny: {d}"),
        }
    }
}

#[test]
fn decoded_policy_decides_as_the_compiled_one() -> anyhow::Result<()> {
    let n = NonZeroUsize::MIN.saturating_add(99);
    for spec in specs()? {
        let direct = weft_authz::compile(&spec, n)?;
        let via_api = decode(encode(&spec)?, n)?;
        assert_eq!(direct.name, via_api.name);
        assert_eq!(direct.protocol, via_api.protocol);
        for who in [
            None,
            Some("web.demo"),
            Some("etl.batch.demo"),
            Some("ops.demo"),
            Some("x.demo"),
        ] {
            for addr in ["10.1.2.3", "10.9.0.1", "192.168.1.1"] {
                for (method, path) in [
                    (Method::GET, "/v1/users"),
                    (Method::POST, "/v1/users"),
                    (Method::GET, "/health"),
                    (Method::POST, "/demo.Echo/Say"),
                    (Method::POST, "/grpc.health.v1.Health/Check"),
                    (Method::POST, "/demo.Echo/Other"),
                ] {
                    assert_eq!(
                        decide(&direct, who, addr, &method, path),
                        decide(&via_api, who, addr, &method, path),
                        "{} {who:?} {addr} {method} {path}",
                        spec.name
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn messages_follow_the_documented_shapes() -> anyhow::Result<()> {
    let specs = specs()?;
    let http = encode(
        &specs
            .iter()
            .find(|s| s.name == "api.demo:8080")
            .ok_or_else(|| anyhow::anyhow!("8080"))?
            .clone(),
    )?;
    assert_eq!(http.labels["name"], "api.demo:8080");
    assert_eq!(http.labels["kind"], "server");
    // allow-authenticated: every identity, from every network, as the API
    // spells "all": the suffix without parts, and 0.0.0.0/0 and ::/0.
    let default = &http.authorizations[0];
    let nets: Vec<String> = default
        .networks
        .iter()
        .filter_map(|n| n.net)
        .filter_map(|n| ipnet::IpNet::try_from(n).ok())
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["0.0.0.0/0", "::/0"]);
    match default
        .authentication
        .as_ref()
        .and_then(|a| a.permit.as_ref())
    {
        Some(api::authn::Permit::MeshTls(tls)) => match &tls.clients {
            Some(api::authn::permit_mesh_tls::Clients::Identities(ids)) => {
                assert!(ids.identities.is_empty());
                assert_eq!(ids.suffixes, [api::IdentitySuffix { parts: vec![] }]);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    match http.protocol.and_then(|p| p.kind) {
        Some(api::proxy_protocol::Kind::Detect(d)) => {
            assert_eq!(
                d.timeout,
                Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0
                })
            );
            let rl = d
                .http_local_rate_limit
                .ok_or_else(|| anyhow::anyhow!("no rate limit"))?;
            assert_eq!(rl.total.map(|l| l.requests_per_second), Some(1000));
            assert_eq!(rl.identity.map(|l| l.requests_per_second), Some(100));
            assert_eq!(rl.overrides.len(), 1);
            // Every route names itself; the catch-all is the default.
            assert!(d.http_routes.iter().all(|r| r.metadata.is_some()));
            assert!(d.http_routes.iter().any(|r| matches!(
                r.metadata.as_ref().and_then(|m| m.kind.as_ref()),
                Some(linkerd2_proxy_api::meta::metadata::Kind::Default(n)) if n == "default"
            )));
        }
        other => panic!("{other:?}"),
    }
    let opaque = encode(
        &specs
            .iter()
            .find(|s| s.name == "api.demo:5432")
            .ok_or_else(|| anyhow::anyhow!("5432"))?
            .clone(),
    )?;
    assert!(matches!(
        opaque.protocol.and_then(|p| p.kind),
        Some(api::proxy_protocol::Kind::Opaque(_))
    ));
    assert_eq!(
        opaque.authorizations.len(),
        1,
        "deny adds nothing; db-clients is connection-level"
    );
    Ok(())
}

#[test]
fn what_weft_cannot_evaluate_is_refused_whole() -> anyhow::Result<()> {
    let spec = specs()?
        .into_iter()
        .find(|s| s.name == "api.demo:8080")
        .ok_or_else(|| anyhow::anyhow!("8080"))?;
    let mut server = encode(&spec)?;
    if let Some(api::proxy_protocol::Kind::Detect(d)) =
        server.protocol.as_mut().and_then(|p| p.kind.as_mut())
    {
        d.http_routes[0].rules[0].matches[0]
            .headers
            .push(Default::default());
    }
    let err = decode(server, NonZeroUsize::MIN)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("header and query matches are not supported"),
        "{err}"
    );
    Ok(())
}
