//! The client side: `Get` and `Watch` decoding weft's extension too.

use tonic::transport::Channel;
use tonic::{Status, Streaming};
use weft_detect::Authority;

use crate::wire::{OutboundPolicy, TrafficSpec};

/// An address is asked for as one (`Target::Addr`), as the API asks.
fn spec(authority: &Authority, workload: &str) -> TrafficSpec {
    use linkerd2_proxy_api::outbound::traffic_spec::Target;
    TrafficSpec {
        source_workload: workload.to_string(),
        target: Some(match authority.socket_addr() {
            Some(addr) => Target::Addr(addr.into()),
            None => Target::Authority(authority.to_string()),
        }),
    }
}

async fn ready(channel: Channel) -> Result<tonic::client::Grpc<Channel>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("control plane not ready: {e}")))?;
    Ok(grpc)
}

/// The policy of `authority` now. `workload` names the asking proxy.
pub async fn get(
    channel: Channel,
    authority: &Authority,
    workload: &str,
) -> Result<OutboundPolicy, Status> {
    let mut grpc = ready(channel).await?;
    let path =
        http::uri::PathAndQuery::from_static("/io.linkerd.proxy.outbound.OutboundPolicies/Get");
    let codec = tonic_prost::ProstCodec::<TrafficSpec, OutboundPolicy>::default();
    let rsp = grpc
        .unary(tonic::Request::new(spec(authority, workload)), path, codec)
        .await?;
    Ok(rsp.into_inner())
}

/// Follows the policy of `authority`: its first message is the policy
/// now, each later one a replacement.
pub async fn watch(
    channel: Channel,
    authority: &Authority,
    workload: &str,
) -> Result<Streaming<OutboundPolicy>, Status> {
    let mut grpc = ready(channel).await?;
    let path =
        http::uri::PathAndQuery::from_static("/io.linkerd.proxy.outbound.OutboundPolicies/Watch");
    let codec = tonic_prost::ProstCodec::<TrafficSpec, OutboundPolicy>::default();
    let rsp = grpc
        .server_streaming(tonic::Request::new(spec(authority, workload)), path, codec)
        .await?;
    Ok(rsp.into_inner())
}
