//! InboundServerPolicies from the real weft-control, read by a plain client
//! generated from the `linkerd2-proxy-api` crate: the first `WatchPort`
//! message at once, an update within a second of a file edit and none for
//! an edit elsewhere, the default policy for an unlisted port, and clear
//! refusals of workloads it cannot name.

use std::time::{Duration, Instant};

use linkerd2_proxy_api::inbound::inbound_server_policies_client::InboundServerPoliciesClient;
use linkerd2_proxy_api::inbound::{PortSpec, Server, authn, proxy_protocol};
use tonic::Streaming;
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

fn file(methods: &str, other: &str) -> String {
    format!(
        r#"
destinations: {{}}
servers:
  "api.demo":
    default: deny
    ports:
      "8080":
        default: deny
        authorizations:
          - name: web-reads
            clients: {{identities: ["web.demo"]}}
            routes: [{{path_prefix: /v1/, methods: [{methods}]}}]
        rate_limit: {{per_client_rps: 10}}
  "other.demo":
    ports:
      "9000": {{protocol: {other}}}
"#
    )
}

async fn start(yaml: &str, extra: &[&str]) -> anyhow::Result<(DestinationsFile, MeshCa, Control)> {
    let file = DestinationsFile::from_yaml(yaml)?;
    let ca = MeshCa::new()?;
    let mut args = vec!["--destinations", &file.path_str()]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let control = Control::start(&workspace_binary("weft-control")?, &ca, &args).await?;
    Ok((file, ca, control))
}

fn spec(workload: &str, port: u32) -> PortSpec {
    PortSpec {
        workload: workload.into(),
        port,
    }
}

async fn next(stream: &mut Streaming<Server>, within: Duration) -> anyhow::Result<Option<Server>> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(m) => Ok(m?),
        Err(_) => Ok(None),
    }
}

fn route_names(s: &Server) -> Vec<String> {
    let Some(proxy_protocol::Kind::Detect(d)) = s.protocol.as_ref().and_then(|p| p.kind.as_ref())
    else {
        return Vec::new();
    };
    d.http_routes
        .iter()
        .filter_map(|r| match r.metadata.as_ref()?.kind.as_ref()? {
            linkerd2_proxy_api::meta::metadata::Kind::Default(n) => Some(n.clone()),
            linkerd2_proxy_api::meta::metadata::Kind::Resource(r) => Some(r.name.clone()),
        })
        .collect()
}

#[tokio::test]
async fn watch_port_sends_the_policy_then_each_change() -> anyhow::Result<()> {
    let (file, _ca, control) = start(&file("GET", "opaque"), &[]).await?;
    let mut client = InboundServerPoliciesClient::new(control.channel().await?);

    let asked = Instant::now();
    let mut stream = client
        .watch_port(spec("api.demo", 8080))
        .await?
        .into_inner();
    let first = next(&mut stream, Duration::from_secs(2))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no first message"))?;
    println!("first WatchPort message after {:?}", asked.elapsed());
    assert_eq!(first.labels["name"], "api.demo:8080");
    assert_eq!(first.labels["kind"], "server");
    assert!(
        first.authorizations.is_empty(),
        "default: deny adds no server authorization"
    );
    assert_eq!(route_names(&first), ["default", "GET /v1/*"]);
    let Some(proxy_protocol::Kind::Detect(detect)) =
        first.protocol.as_ref().and_then(|p| p.kind.clone())
    else {
        anyhow::bail!("{first:?}");
    };
    assert_eq!(
        detect
            .http_local_rate_limit
            .and_then(|r| r.identity)
            .map(|l| l.requests_per_second),
        Some(10)
    );

    // An edit elsewhere in the file sends nothing.
    file.write_yaml(&file_yaml("GET", "http2"))?;
    assert!(
        next(&mut stream, Duration::from_millis(1200))
            .await?
            .is_none()
    );

    // An edit to this port arrives within a second.
    file.write_yaml(&file_yaml("GET, POST", "http2"))?;
    let edited = Instant::now();
    let update = next(&mut stream, Duration::from_secs(2))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no update"))?;
    println!("update after {:?}", edited.elapsed());
    assert!(edited.elapsed() < Duration::from_secs(1));
    assert_eq!(route_names(&update), ["default", "GET /v1/*", "POST /v1/*"]);
    Ok(())
}

fn file_yaml(methods: &str, other: &str) -> String {
    file(methods, other)
}

#[tokio::test]
async fn unlisted_ports_and_servers_get_the_defaults() -> anyhow::Result<()> {
    let (_file, _ca, control) = start(
        &file("GET", "opaque"),
        &["--default-inbound-policy", "allow-authenticated"],
    )
    .await?;
    let mut client = InboundServerPoliciesClient::new(control.channel().await?);
    // api.demo's own default for its unlisted ports: deny.
    let s = client.get_port(spec("api.demo", 9999)).await?.into_inner();
    assert_eq!(s.labels["name"], "default:deny");
    assert_eq!(s.labels["kind"], "default");
    assert!(s.authorizations.is_empty());
    // A server nobody listed: the mesh-wide default.
    let s = client
        .get_port(spec("unknown.demo", 80))
        .await?
        .into_inner();
    assert_eq!(s.labels["name"], "default:allow-authenticated");
    assert_eq!(s.authorizations.len(), 1);
    let authz = &s.authorizations[0];
    assert_eq!(authz.networks.len(), 2, "0.0.0.0/0 and ::/0");
    assert!(matches!(
        authz
            .authentication
            .as_ref()
            .and_then(|a| a.permit.as_ref()),
        Some(authn::Permit::MeshTls(_))
    ));
    let Some(proxy_protocol::Kind::Detect(d)) = s.protocol.and_then(|p| p.kind) else {
        anyhow::bail!("not detect");
    };
    assert_eq!(d.timeout.map(|t| t.seconds), Some(10));
    // Opaque ports say so.
    let s = client
        .get_port(spec("other.demo", 9000))
        .await?
        .into_inner();
    assert!(matches!(
        s.protocol.and_then(|p| p.kind),
        Some(proxy_protocol::Kind::Opaque(_))
    ));
    Ok(())
}

#[tokio::test]
async fn workloads_it_cannot_name_are_refused_clearly() -> anyhow::Result<()> {
    let (_file, _ca, control) = start(&file("GET", "opaque"), &[]).await?;
    let mut client = InboundServerPoliciesClient::new(control.channel().await?);
    for (workload, port, says) in [
        ("default:web-5d8f", 8080, "names a Kubernetes pod"),
        (
            "{\"ns\":\"default\",\"pod\":\"web\"}",
            8080,
            "names a Kubernetes pod",
        ),
        ("not a name", 8080, "is not an identity name"),
        ("api.demo", 70000, "port 70000 is not a TCP port"),
    ] {
        let status = client
            .watch_port(spec(workload, port))
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("{workload} accepted"))?;
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(says), "{}", status.message());
    }
    Ok(())
}
