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

/// What clients without a certificate can make the control plane hold is
/// bounded in total, not per address, and the DNS lookups behind their
/// names are bounded in number (so in sockets) and in time: against a
/// DNS server that never answers, 300 followed names hold well under 300
/// descriptors, and the 301st name is refused.
#[tokio::test]
async fn uncertified_names_and_their_lookups_are_bounded() -> anyhow::Result<()> {
    // Receives queries and never answers them.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &[
            "--dns-server",
            &silent.local_addr()?.to_string(),
            "--max-names-per-client",
            "1000",
            "--max-names-uncertified",
            "300",
        ],
    )
    .await?;
    let pid = control
        .process
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count());
    let before = fds()?;
    let mut client = DestinationClient::new(control.channel().await?);
    let mut streams = Vec::new();
    for i in 0..300 {
        let get = GetDestination {
            path: format!("n{i}.silent.test:80"),
            ..Default::default()
        };
        streams.push(client.get(get).await?.into_inner());
    }
    let refused = client
        .get(GetDestination {
            path: "one-more.silent.test:80".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("the 301st name was followed"))?;
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("without a certificate"),
        "{}",
        refused.message()
    );
    let mut peak = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(fds()?);
    }
    let kinds: std::collections::BTreeMap<String, usize> =
        std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .fold(Default::default(), |mut m, l| {
                let k = l
                    .to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .to_string();
                *m.entry(k).or_insert(0) += 1;
                m
            });
    eprintln!("fds: peak {peak} (from {before}), now {kinds:?}");
    // 16 lookups at a time, about six sockets each while unanswered (64 at
    // a time peaked at 398 here).
    assert!(
        peak < before + 150,
        "{peak} descriptors while looking up 300 names (from {before})"
    );
    drop(streams);
    Ok(())
}
