//! DNS discovery against a real DNS server: A records, SRV records, and
//! names that do not exist.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{GetDestination, Update, update};
use tonic::Streaming;
use weft_control::destination::apply_update;
use weft_test_support::control::Control;
use weft_test_support::dns::Dns;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

async fn first(
    client: &mut DestinationClient<tonic::transport::Channel>,
    path: &str,
) -> anyhow::Result<Update> {
    let mut stream: Streaming<Update> = client
        .get(GetDestination {
            path: path.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

#[tokio::test]
async fn names_nobody_else_knows_come_from_dns() -> anyhow::Result<()> {
    let dns = Dns::start(&[
        "--host-record=api.demo,10.0.0.7",
        "--host-record=api-2.demo,10.0.0.8",
        "--srv-host=_grpc._tcp.api.demo,api.demo,9000,0,5",
        "--srv-host=_grpc._tcp.api.demo,api-2.demo,9001,0,1",
        "--host-record=web.demo,10.0.0.9",
    ])
    .await?;
    let file = DestinationsFile::from_yaml(
        "destinations:\n  \"web.demo:80\":\n    endpoints:\n      - addr: 10.1.0.1:4143\n",
    )?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &[
            "--dns-server",
            &dns.addr.to_string(),
            "--destinations",
            &file.path_str(),
        ],
    )
    .await?;
    let mut client = DestinationClient::new(control.channel().await?);

    let mut state = BTreeMap::new();
    apply_update(&mut state, &first(&mut client, "api.demo:8080").await?);
    let addrs: Vec<SocketAddr> = state.keys().copied().collect();
    assert_eq!(addrs, ["10.0.0.7:8080".parse::<SocketAddr>()?]);

    let mut state = BTreeMap::new();
    apply_update(
        &mut state,
        &first(&mut client, "_grpc._tcp.api.demo:80").await?,
    );
    let got: Vec<(SocketAddr, u32)> = state.iter().map(|(a, w)| (*a, w.weight)).collect();
    assert_eq!(
        got,
        [("10.0.0.7:9000".parse()?, 5), ("10.0.0.8:9001".parse()?, 1)]
    );

    // The file knows web.demo: DNS does not get a say.
    let mut state = BTreeMap::new();
    apply_update(&mut state, &first(&mut client, "web.demo:80").await?);
    let addrs: Vec<SocketAddr> = state.keys().copied().collect();
    assert_eq!(addrs, ["10.1.0.1:4143".parse::<SocketAddr>()?]);

    match first(&mut client, "nowhere.demo:80").await?.update {
        Some(update::Update::NoEndpoints(n)) => assert!(!n.exists),
        other => anyhow::bail!("expected no_endpoints, got {other:?}"),
    }
    Ok(())
}
