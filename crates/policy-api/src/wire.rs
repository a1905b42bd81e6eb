//! The message weft-control sends: `OutboundPolicy`'s own fields, read
//! into the `linkerd2-proxy-api` types, plus weft's extension.

use linkerd2_proxy_api::{meta, outbound};

pub use linkerd2_proxy_api::outbound::TrafficSpec;

/// `io.linkerd.proxy.outbound.OutboundPolicy` with weft's extension in
/// field 1000. Fields 1 and 2 are the published ones, byte for byte.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboundPolicy {
    #[prost(message, optional, tag = "1")]
    pub protocol: Option<outbound::ProxyProtocol>,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<meta::Metadata>,
    #[prost(message, optional, tag = "1000")]
    pub weft: Option<Extension>,
}

/// What the API cannot say, per HTTP route in the order the routes are
/// sent (one rule each).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Extension {
    #[prost(message, repeated, tag = "1")]
    pub routes: Vec<RouteExtension>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RouteExtension {
    /// Retry a request whose connect failed (nothing was sent).
    #[prost(bool, tag = "1")]
    pub retry_connect_error: bool,
    /// Retry a request whose stream broke before response headers.
    #[prost(bool, tag = "2")]
    pub retry_reset: bool,
    /// gRPC status codes retried on an HTTP route (trailers-only answers).
    #[prost(uint32, repeated, tag = "3")]
    pub retry_grpc: Vec<u32>,
    #[prost(message, optional, tag = "4")]
    pub budget: Option<Budget>,
    /// Hedge after a fixed delay...
    #[prost(message, optional, tag = "5")]
    pub hedge_after: Option<prost_types::Duration>,
    /// ...or after the destination's recent latency at this quantile.
    #[prost(double, optional, tag = "6")]
    pub hedge_percentile: Option<f64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Budget {
    #[prost(double, tag = "1")]
    pub ratio: f64,
    #[prost(uint32, tag = "2")]
    pub min_per_second: u32,
}
