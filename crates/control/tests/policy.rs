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
