//! `weft endpoints SERVICE:PORT`: what discovery says now, as a proxy sees
//! it through the control plane's Destination `Get` stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{GetDestination, WeightedAddr, protocol_hint};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The authority a client would use, e.g. api.demo:8080.
    service: String,
    #[command(flatten)]
    control: crate::control::ControlArgs,
    #[arg(long, short = 'o', value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

#[derive(serde::Serialize)]
pub(crate) struct Row {
    addr: SocketAddr,
    weight: u32,
    identity: Option<String>,
    protocol_hint: Option<&'static str>,
}

#[derive(serde::Serialize)]
pub(crate) struct View {
    service: String,
    /// False when no discovery backend knows the name (proxies then use
    /// DNS themselves).
    exists: bool,
    endpoints: Vec<Row>,
}

/// Updates that arrive this soon after the first are part of the answer.
const SETTLE: Duration = Duration::from_millis(200);

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let channel = args.control.channel().await?;
    let view = fetch(channel, &args.service).await?;
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    print(&view);
    Ok(())
}

/// What discovery says of `service` now, through the control plane.
pub(crate) async fn fetch(
    channel: tonic::transport::Channel,
    service: &str,
) -> anyhow::Result<View> {
    let mut client = DestinationClient::new(channel);
    let mut stream = client
        .get(GetDestination {
            path: service.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .with_context(|| format!("asking for {service}"))?
        .into_inner();
    let mut state: BTreeMap<SocketAddr, WeightedAddr> = BTreeMap::new();
    let mut exists = true;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .context("the control plane did not answer within 10 s")??
        .context("the control plane closed the stream without an answer")?;
    if let Some(e) = weft_control::destination::apply_update(&mut state, &first) {
        exists = e;
    }
    while let Ok(Ok(Some(update))) = tokio::time::timeout(SETTLE, stream.message()).await {
        if let Some(e) = weft_control::destination::apply_update(&mut state, &update) {
            exists = e;
        }
        if !state.is_empty() {
            exists = true;
        }
    }
    Ok(View {
        service: service.to_string(),
        exists,
        endpoints: state
            .into_iter()
            .map(|(addr, w)| Row {
                addr,
                weight: w.weight,
                identity: w.tls_identity.and_then(|t| t.server_name).map(|n| n.name),
                protocol_hint: w.protocol_hint.and_then(|h| h.protocol).map(|p| match p {
                    protocol_hint::Protocol::H2(_) => "h2",
                    protocol_hint::Protocol::Opaque(_) => "opaque",
                }),
            })
            .collect(),
    })
}

fn print(view: &View) {
    if !view.exists {
        println!(
            "{}: no discovery backend knows this name (proxies resolve it with DNS)",
            view.service
        );
        return;
    }
    if view.endpoints.is_empty() {
        println!("{}: known, but has no endpoints now", view.service);
        return;
    }
    println!(
        "{:<24} {:>6}  {:<28} HINT",
        "ENDPOINT", "WEIGHT", "IDENTITY"
    );
    for r in &view.endpoints {
        println!(
            "{:<24} {:>6}  {:<28} {}",
            r.addr.to_string(),
            r.weight,
            r.identity.as_deref().unwrap_or("- (not meshed)"),
            r.protocol_hint.unwrap_or("-")
        );
    }
}
