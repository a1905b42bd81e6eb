//! Byte streams to an endpoint: opaque TCP (balanced per connection) and
//! CONNECT tunnels share one pick/connect/failover.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use weft_balance::Pending;

use crate::endpoint::Endpoint;
use crate::io::UpstreamIo;
use crate::route::Target;

/// Endpoints tried before a connection is given up: a refused connect
/// costs little and another endpoint may well answer.
const CONNECT_ATTEMPTS: usize = 3;

/// Why no upstream connection was made.
#[derive(Debug)]
pub enum ConnectFailed {
    NoEndpoints,
    /// The endpoint picked is `own`: connecting would loop.
    Loop(SocketAddr),
    /// Every attempt failed; the last error.
    Connect(Arc<Endpoint>, String),
}

/// An open upstream connection, in flight for the balancer until dropped.
pub struct Connected {
    pub endpoint: Arc<Endpoint>,
    pub pending: Pending,
    pub io: UpstreamIo,
}

/// Picks an endpoint and connects, going to another endpoint after a
/// failed connect (up to three). The connection counts as in flight (the
/// `Pending`) while it is open, so the balancer spreads long-lived
/// connections too.
pub async fn connect(
    target: &Target,
    own: Option<&crate::http::ListenAddrs>,
) -> Result<Connected, ConnectFailed> {
    let attempts = CONNECT_ATTEMPTS.min(target.len().max(1));
    let mut failed = Vec::new();
    let mut last = None;
    for attempt in 1..=attempts {
        let Some((endpoint, load)) = target.pick_excluding(&failed) else {
            return Err(ConnectFailed::NoEndpoints);
        };
        if own.is_some_and(|own| own.contains(endpoint.addr)) {
            return Err(ConnectFailed::Loop(endpoint.addr));
        }
        let mut pending = load.start();
        match endpoint.connect().await {
            Ok(io) => {
                pending.observe_response();
                return Ok(Connected {
                    endpoint,
                    pending,
                    io,
                });
            }
            Err(e) => {
                pending.observe_failure();
                tracing::info!(target = %target.authority, endpoint = %endpoint.addr, attempt, error = %e, "connect failed");
                failed.push(endpoint.addr);
                last = Some((endpoint, weft_channel::error_chain(&e)));
            }
        }
    }
    match last {
        Some((endpoint, reason)) => Err(ConnectFailed::Connect(endpoint, reason)),
        None => Err(ConnectFailed::NoEndpoints),
    }
}

/// Relays `client` to one of `target`'s endpoints until either side closes
/// or nothing moves for `idle`.
pub async fn relay<I>(client: I, target: Arc<Target>, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    match connect(&target, None).await {
        Ok(c) => relay_connected(client, &target, c, idle).await,
        Err(e) => {
            tracing::info!(target = %target.authority, error = ?e, "opaque connection not relayed; closing");
        }
    }
}

/// [`relay`] over a connection already made.
pub async fn relay_connected<I>(mut client: I, target: &Target, upstream: Connected, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Connected {
        endpoint,
        pending: _pending,
        io: mut upstream,
    } = upstream;
    match crate::io::splice(&mut client, &mut upstream, idle).await {
        Ok((up, down)) => {
            tracing::debug!(target = %target.authority, endpoint = %endpoint.addr, up, down, "opaque connection closed")
        }
        Err(e) => {
            tracing::debug!(target = %target.authority, endpoint = %endpoint.addr, error = %e, "opaque connection ended")
        }
    }
}
