//! OutboundPolicies from the real weft-control: the file's policies, their
//! edits, and what a plain Linkerd API client reads.

use std::time::{Duration, Instant};

use linkerd2_proxy_api::outbound::outbound_policies_client::OutboundPoliciesClient;
use linkerd2_proxy_api::outbound::{TrafficSpec, proxy_protocol, traffic_spec};
use tonic::Streaming;
use weft_destinations::Policy;
use weft_detect::Authority;
use weft_policy_api::{client, decode, wire};
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

fn file(canary_weight: u32) -> String {
    format!(
        r#"
destinations:
  "api.demo:8080":
    endpoints: [{{addr: "127.0.0.1:18081"}}]
    timeout: 2s
    retry: {{attempts: 2}}
    routes:
      - name: canary-header
        match: {{headers: {{x-canary: "1"}}}}
        backends: [{{destination: "api-v2.demo:8080"}}]
      - name: split
        backends:
          - {{destination: "api.demo:8080", weight: 100}}
          - {{destination: "api-v2.demo:8080", weight: {canary_weight}}}
  "api-v2.demo:8080":
    endpoints: [{{addr: "127.0.0.1:18082"}}]
  "db.demo:5432":
    opaque: true
    endpoints: []
"#
    )
}

async fn next(
    authority: &Authority,
    stream: &mut Streaming<wire::OutboundPolicy>,
) -> anyhow::Result<Policy> {
    let msg = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
    Ok(decode(authority, &msg)?)
}

async fn start(yaml: &str) -> anyhow::Result<(DestinationsFile, MeshCa, Control)> {
    let file = DestinationsFile::from_yaml(yaml)?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--destinations", &file.path_str()],
    )
    .await?;
    Ok((file, ca, control))
}

#[tokio::test]
async fn watch_streams_the_file_policy_and_its_edits() -> anyhow::Result<()> {
    let (dests, _ca, control) = start(&file(1)).await?;
    let api: Authority = "api.demo:8080".parse()?;
    let mut stream = client::watch(control.channel().await?, &api, "web").await?;
    let p = next(&api, &mut stream).await?;
    let names: Vec<&str> = p.routes.iter().map(|r| r.name.as_ref()).collect();
    assert_eq!(names, ["canary-header", "split"]);
    let weights: Vec<u32> = p.routes[1].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [100, 1]);
    assert_eq!(p.routes[1].timeout, Some(Duration::from_secs(2)));
    assert_eq!(p.routes[1].retry.as_ref().map(|r| r.attempts), Some(2));
    assert_eq!(p.breaker, weft_balance::BreakerConfig::default());

    // An edit reaches the stream within a second (the file is polled
    // every 250 ms).
    dests.write_yaml(&file(100))?;
    let edited = Instant::now();
    let p = next(&api, &mut stream).await?;
    let took = edited.elapsed();
    let weights: Vec<u32> = p.routes[1].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [100, 100]);
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Unchanged policy, changed endpoints: no message.
    dests.write_yaml(&file(100).replace("18081", "18083"))?;
    let quiet = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
    assert!(
        quiet.is_err(),
        "a message for an unchanged policy: {quiet:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_names_get_the_default_policy_until_they_appear() -> anyhow::Result<()> {
    let (dests, _ca, control) = start(&file(1)).await?;
    let new: Authority = "new.demo:80".parse()?;
    let mut stream = client::watch(control.channel().await?, &new, "web").await?;
    assert_eq!(next(&new, &mut stream).await?, Policy::default());
    dests.write_yaml(&format!(
        "{}  \"new.demo:80\":\n    endpoints: []\n    timeout: 300ms\n",
        file(1)
    ))?;
    let p = next(&new, &mut stream).await?;
    assert_eq!(p.timeout, Some(Duration::from_millis(300)));
    Ok(())
}

/// The generated client of the published API (what a linkerd2-proxy
/// uses) reads weft-control's answer: extension and all, it decodes.
#[tokio::test]
async fn a_plain_linkerd_client_reads_the_policy() -> anyhow::Result<()> {
    let (_dests, _ca, control) = start(&file(1)).await?;
    let mut linkerd = OutboundPoliciesClient::new(control.channel().await?);
    let spec = |a: &str| TrafficSpec {
        source_workload: "web".into(),
        target: Some(traffic_spec::Target::Authority(a.into())),
    };
    let rsp = linkerd.get(spec("api.demo:8080")).await?.into_inner();
    let Some(proxy_protocol::Kind::Detect(detect)) = rsp.protocol.and_then(|p| p.kind) else {
        anyhow::bail!("not Detect");
    };
    let routes = detect.http2.map(|h| h.routes).unwrap_or_default();
    assert_eq!(routes.len(), 2);

    let mut watch = linkerd.watch(spec("db.demo:5432")).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(3), watch.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("ended"))?;
    assert!(
        matches!(
            first.protocol.and_then(|p| p.kind),
            Some(proxy_protocol::Kind::Opaque(_))
        ),
        "an opaque service is Opaque"
    );

    let bad = linkerd.get(spec("no port")).await.err();
    assert_eq!(bad.map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    Ok(())
}

const ADDRESSED: &str = r#"
destinations:
  "api.demo:8080":
    addresses: ["10.96.0.20:8080"]
    endpoints: [{addr: "127.0.0.1:18081", identity: api.demo}]
    routes:
      - name: split
        backends:
          - {destination: "api.demo:8080", weight: 9}
          - {destination: "api-v2.demo:8080", weight: 1}
  "api-v2.demo:8080":
    endpoints: [{addr: "127.0.0.1:18082"}]
"#;

/// What a policy forwards to, or the discovery paths of its balancers.
fn backends_of(p: &wire::OutboundPolicy) -> Vec<Result<String, std::net::SocketAddr>> {
    use linkerd2_proxy_api::outbound::{backend, http_route};
    let Some(proxy_protocol::Kind::Detect(d)) = p.protocol.as_ref().and_then(|p| p.kind.as_ref())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for rule in d
        .http2
        .iter()
        .flat_map(|h| &h.routes)
        .flat_map(|r| &r.rules)
    {
        let backends: Vec<_> = match rule.backends.as_ref().and_then(|b| b.kind.as_ref()) {
            Some(http_route::distribution::Kind::FirstAvailable(f)) => f
                .backends
                .iter()
                .filter_map(|b| b.backend.clone())
                .collect(),
            Some(http_route::distribution::Kind::RandomAvailable(r)) => r
                .backends
                .iter()
                .filter_map(|w| w.backend.as_ref().and_then(|b| b.backend.clone()))
                .collect(),
            _ => Vec::new(),
        };
        for b in backends {
            out.push(match b.kind {
                Some(backend::Kind::Balancer(p2c)) => match p2c.discovery.and_then(|d| d.kind) {
                    Some(backend::endpoint_discovery::Kind::Dst(dst)) => Ok(dst.path),
                    None => Ok(String::new()),
                },
                Some(backend::Kind::Forward(w)) => Err(w
                    .addr
                    .and_then(|a| a.try_into().ok())
                    .unwrap_or(([0, 0, 0, 0], 0).into())),
                None => Ok(String::new()),
            });
        }
    }
    out
}

/// Asked by `IP:port` (a redirected connection's original destination),
/// as linkerd2-proxy asks: a service's own address is answered with the
/// service under its name, whose balancers discover names; an endpoint's
/// address and an unknown one are forwarded to, an endpoint with its
/// identity so the connection is mutual TLS.
#[tokio::test]
async fn an_address_gets_its_services_policy_by_name_or_is_forwarded() -> anyhow::Result<()> {
    use linkerd2_proxy_api::destination::destination_client::DestinationClient;
    use linkerd2_proxy_api::meta::metadata;
    let (_dests, _ca, control) = start(ADDRESSED).await?;
    let channel = control.channel().await?;
    let mut linkerd = OutboundPoliciesClient::new(channel.clone());
    let by_addr = |a: &str| -> anyhow::Result<TrafficSpec> {
        Ok(TrafficSpec {
            source_workload: "web".into(),
            target: Some(traffic_spec::Target::Addr(
                a.parse::<std::net::SocketAddr>()?.into(),
            )),
        })
    };
    let vip = linkerd.get(by_addr("10.96.0.20:8080")?).await?.into_inner();
    let Some(metadata::Kind::Resource(parent)) = vip.metadata.clone().and_then(|m| m.kind) else {
        anyhow::bail!("{:?}", vip.metadata);
    };
    assert_eq!(
        (
            parent.kind.as_str(),
            parent.name.as_str(),
            parent.namespace.as_str(),
            parent.port
        ),
        ("Service", "api", "demo", 8080)
    );
    let weft_vip = as_weft(&vip)?;
    assert_eq!(
        backends_of(&weft_vip),
        [
            Ok("api.demo:8080".to_string()),
            Ok("api-v2.demo:8080".to_string())
        ]
    );
    // A weft proxy reads it too: the split, by name.
    let vip_authority: Authority = "10.96.0.20:8080".parse()?;
    let policy = decode(&vip_authority, &weft_vip)?;
    assert_eq!(
        policy.routes[0].backends[1].destination.to_string(),
        "api-v2.demo:8080"
    );

    let endpoint = linkerd.get(by_addr("127.0.0.1:18081")?).await?.into_inner();
    let endpoint = as_weft(&endpoint)?;
    assert_eq!(backends_of(&endpoint), [Err("127.0.0.1:18081".parse()?)]);
    let identity = forwarded_identity(&endpoint);
    assert_eq!(
        identity.as_deref(),
        Some("api.demo"),
        "the endpoint is meshed"
    );
    decode(&"127.0.0.1:18081".parse()?, &endpoint)?;

    let unknown = linkerd.get(by_addr("10.9.9.9:80")?).await?.into_inner();
    let unknown = as_weft(&unknown)?;
    assert_eq!(backends_of(&unknown), [Err("10.9.9.9:80".parse()?)]);
    assert_eq!(forwarded_identity(&unknown), None);

    // GetProfile by address: the service's name, or none for an endpoint.
    let mut dst = DestinationClient::new(channel);
    for (addr, fqn) in [("10.96.0.20:8080", "api.demo"), ("127.0.0.1:18081", "")] {
        let mut stream = dst
            .get_profile(linkerd2_proxy_api::destination::GetDestination {
                scheme: "k8s".into(),
                path: addr.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let p = tokio::time::timeout(Duration::from_secs(3), stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("no profile"))?;
        assert_eq!(p.fully_qualified_name, fqn, "{addr}");
    }
    Ok(())
}

/// The published message as a weft proxy receives it.
fn as_weft(
    p: &linkerd2_proxy_api::outbound::OutboundPolicy,
) -> anyhow::Result<wire::OutboundPolicy> {
    use prost::Message;
    Ok(wire::OutboundPolicy::decode(p.encode_to_vec().as_slice())?)
}

fn forwarded_identity(p: &wire::OutboundPolicy) -> Option<String> {
    use linkerd2_proxy_api::outbound::{backend, http_route};
    let Some(proxy_protocol::Kind::Detect(d)) = p.protocol.as_ref().and_then(|p| p.kind.as_ref())
    else {
        return None;
    };
    let rule = d.http2.as_ref()?.routes.first()?.rules.first()?;
    let Some(http_route::distribution::Kind::FirstAvailable(f)) =
        rule.backends.as_ref().and_then(|b| b.kind.as_ref())
    else {
        return None;
    };
    let Some(backend::Kind::Forward(w)) = f.backends.first()?.backend.as_ref()?.kind.as_ref()
    else {
        return None;
    };
    Some(w.tls_identity.as_ref()?.server_name.as_ref()?.name.clone())
}
