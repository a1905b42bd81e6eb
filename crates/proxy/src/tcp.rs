//! Opaque TCP: balanced per connection, bytes relayed both ways.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::route::Target;

/// Endpoints tried before an opaque connection is given up: a refused
/// connect costs little and another endpoint may well answer.
const CONNECT_ATTEMPTS: usize = 3;

pub async fn relay<I>(mut client: I, target: Arc<Target>)
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
        let _pending = load.start();
        match endpoint.connector.connect().await {
            Ok(mut upstream) => {
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
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
                tracing::info!(target = %target.authority, attempt, error = %e, "opaque connect failed");
            }
        }
    }
}
