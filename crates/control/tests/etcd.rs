//! etcd discovery with a real etcd: puts, deletes and lease expiry reach
//! open Destination streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{GetDestination, Update, WeightedAddr, update};
use tonic::Streaming;
use weft_control::destination::apply_update;
use weft_registry::etcd::Etcd as EtcdClient;
use weft_test_support::control::Control;
use weft_test_support::etcd::Etcd;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

const KEY_A: &str = "/weft/services/api.demo:8080/endpoints/10.0.0.1:4143";
const KEY_B: &str = "/weft/services/api.demo:8080/endpoints/10.0.0.2:4143";

async fn next(stream: &mut Streaming<Update>) -> anyhow::Result<Update> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

/// Reads updates until the endpoint set is `want`; returns how long it took.
async fn until(
    stream: &mut Streaming<Update>,
    state: &mut BTreeMap<SocketAddr, WeightedAddr>,
    want: &[&str],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let want: Vec<SocketAddr> = want.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    while state.keys().copied().collect::<Vec<_>>() != want {
        apply_update(state, &next(stream).await?);
    }
    Ok(started.elapsed())
}

#[tokio::test]
async fn puts_deletes_and_expired_leases_reach_the_stream() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--etcd", &etcd.url()],
    )
    .await?;
    let mut kv = EtcdClient::connect(&[etcd.url()]).await?;
    let mut dst = DestinationClient::new(control.channel().await?);
    let mut stream = dst
        .get(GetDestination {
            path: "api.demo:8080".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    match next(&mut stream).await?.update {
        Some(update::Update::NoEndpoints(n)) => assert!(!n.exists),
        other => anyhow::bail!("expected no_endpoints, got {other:?}"),
    }
    let mut state = BTreeMap::new();

    kv.put(KEY_A, r#"{"identity":"api.demo"}"#, 0).await?;
    let took = until(&mut stream, &mut state, &["10.0.0.1:4143"]).await?;
    assert!(took < Duration::from_secs(1), "put took {took:?}");
    let id = state
        .values()
        .next()
        .and_then(|w| w.tls_identity.as_ref())
        .and_then(|t| t.server_name.as_ref());
    assert_eq!(id.map(|n| n.name.as_str()), Some("api.demo"));

    // An instance under a lease nobody keeps alive disappears when it
    // expires.
    let lease = kv.lease_grant(2).await?;
    kv.put(KEY_B, "{}", lease).await?;
    until(&mut stream, &mut state, &["10.0.0.1:4143", "10.0.0.2:4143"]).await?;
    let took = until(&mut stream, &mut state, &["10.0.0.1:4143"]).await?;
    assert!(took < Duration::from_secs(4), "lease expiry took {took:?}");

    // A bad value is skipped, not served.
    kv.put(
        "/weft/services/api.demo:8080/endpoints/10.0.0.3:4143",
        "{not json",
        0,
    )
    .await?;
    kv.delete(KEY_A).await?;
    let took = until(&mut stream, &mut state, &[]).await?;
    assert!(took < Duration::from_secs(1), "delete took {took:?}");
    assert!(
        control.process.log().contains("not valid JSON"),
        "{}",
        control.process.log()
    );
    Ok(())
}

#[tokio::test]
async fn the_file_overrides_etcd_and_etcd_outages_keep_the_last_answer() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let file = DestinationsFile::from_yaml(
        "destinations:\n  \"web.demo:80\":\n    endpoints:\n      - addr: 10.1.0.1:4143\n",
    )?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--etcd", &etcd.url(), "--destinations", &file.path_str()],
    )
    .await?;
    let mut kv = EtcdClient::connect(&[etcd.url()]).await?;
    kv.put(
        "/weft/services/web.demo:80/endpoints/10.9.9.9:4143",
        "{}",
        0,
    )
    .await?;
    kv.put(KEY_A, "{}", 0).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut dst = DestinationClient::new(control.channel().await?);
    let mut web = dst
        .get(GetDestination {
            path: "web.demo:80".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut state = BTreeMap::new();
    until(&mut web, &mut state, &["10.1.0.1:4143"]).await?;

    let mut api = dst
        .get(GetDestination {
            path: "api.demo:8080".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut state = BTreeMap::new();
    until(&mut api, &mut state, &["10.0.0.1:4143"]).await?;
    drop(etcd);
    // etcd is gone; the stream stays open and nothing is withdrawn.
    let quiet = tokio::time::timeout(Duration::from_secs(2), api.message()).await;
    assert!(
        quiet.is_err(),
        "unexpected update while etcd is down: {quiet:?}"
    );
    Ok(())
}
