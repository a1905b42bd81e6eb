//! weft's traffic policy as `io.linkerd.proxy.outbound.OutboundPolicies`
//! carries it: routes, matches, weighted backends, timeouts, retries and
//! failure accrual in the published messages, so any client of the API
//! (a real linkerd2-proxy included) reads them by their documented
//! meaning.
//!
//! What the API has no message for — retry budgets, retrying connect
//! errors and resets, gRPC statuses on HTTP routes, hedging — rides in
//! field 1000 of `OutboundPolicy` ([`wire::Extension`]). Protobuf clients
//! skip fields they do not know, so the extension costs other clients
//! nothing and weft proxies behave exactly as with the same policy in a
//! static file.

pub mod client;
mod decode;
mod encode;
pub mod inbound;
pub mod server;
pub mod wire;

pub use decode::{DecodeError, decode};
pub use encode::{encode, encode_forward};

/// The gRPC service name, for routing and for `Unimplemented` checks.
pub const SERVICE: &str = "io.linkerd.proxy.outbound.OutboundPolicies";
