//! Opaque TCP: balanced per connection, bytes relayed both ways.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::route::Target;

/// Endpoints tried before an opaque connection is given up: a refused
/// connect costs little and another endpoint may well answer.
const CONNECT_ATTEMPTS: usize = 3;

/// Relays `client` to one of `target`'s endpoints until either side closes
/// or nothing moves for `idle`.
pub async fn relay<I>(mut client: I, target: Arc<Target>, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let attempts = CONNECT_ATTEMPTS.min(target.len().max(1));
    for attempt in 1..=attempts {
        let Some((endpoint, load)) = target.pick() else {
            tracing::info!(target = %target.authority, "no endpoints for opaque connection; closing");
            return;
        };
        // The connection counts as in flight while open, so the balancer
        // spreads long-lived connections too.
        let mut pending = load.start();
        match endpoint.connect().await {
            Ok(mut upstream) => {
                pending.observe_response();
                match crate::io::splice(&mut client, &mut upstream, idle).await {
                    Ok((up, down)) => {
                        tracing::debug!(target = %target.authority, endpoint = %endpoint.addr, up, down, "opaque connection closed")
                    }
                    Err(e) => {
                        tracing::debug!(target = %target.authority, endpoint = %endpoint.addr, error = %e, "opaque connection ended")
                    }
                }
                return;
            }
            Err(e) => {
                pending.observe_failure();
                tracing::info!(target = %target.authority, attempt, error = %e, "opaque connect failed");
            }
        }
    }
}
