//! Listeners: accept, detect the protocol, hand the connection to the HTTP
//! proxy or the opaque relay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_detect::{Authority, Detection, MAX_PREFIX, Protocol, detect};

use crate::http::{self, HttpContext, HttpVersion};
use crate::io::{CountingIo, PrefixedIo};
use crate::metrics::{Direction, Metrics, Peer};
use crate::orig_dst::original_dst;
use crate::route::{Router, Target};
use crate::tcp;

/// How long to wait for a first request when the connection has nowhere
/// to go as opaque bytes anyway (explicit proxy mode): a pooled client may
/// well connect before it has anything to send.
const EXPLICIT_MODE_DETECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One side of the proxy: what it needs to serve a connection.
pub struct Side {
    pub direction: Direction,
    pub router: Arc<Router>,
    pub metrics: Metrics,
    pub detect_timeout: Duration,
    /// Inbound: where the application listens, if the original destination
    /// is not available.
    pub inbound_forward: Option<SocketAddr>,
    /// This side's listening address, to refuse routing loops.
    pub listen_addr: SocketAddr,
}

impl Side {
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
            let (stream, _peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Usually EMFILE: back off rather than spin.
                        tracing::warn!(direction = ?self.direction, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let side = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move { side.serve(stream, shutdown).await });
        }
    }

    async fn serve(&self, stream: TcpStream, shutdown: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let orig_dst = original_dst(&stream);
        let mut io = CountingIo::new(stream, &self.metrics.tcp, self.direction, Peer::src);

        let opaque_target: Option<Arc<Target>> = match self.direction {
            Direction::outbound => match orig_dst {
                Some(dst) => self
                    .router
                    .resolve(&Authority::from_socket_addr(dst))
                    .await
                    .ok(),
                None => None,
            },
            Direction::inbound => orig_dst
                .map(|dst| SocketAddr::from(([127, 0, 0, 1], dst.port())))
                .or(self.inbound_forward)
                .map(|addr| self.router.fixed(addr, None)),
        };
        let timeout = if opaque_target.is_some() {
            self.detect_timeout
        } else {
            EXPLICIT_MODE_DETECT_TIMEOUT
        };
        let (prefix, protocol) = match read_prefix(&mut io, timeout).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "connection failed during detection");
                return;
            }
        };
        tracing::trace!(?protocol, bytes = prefix.len(), "detected");
        let io = PrefixedIo::new(prefix.freeze(), io);
        let version = match protocol {
            Protocol::Http1 => HttpVersion::Http1,
            Protocol::Http2 => HttpVersion::Http2,
            Protocol::Tls | Protocol::Opaque => {
                let looped = opaque_target.as_ref().is_some_and(|t| {
                    t.endpoints()
                        .iter()
                        .any(|a| http::is_own_listener(self.listen_addr, *a))
                });
                if looped {
                    tracing::info!(direction = ?self.direction, "opaque connection would loop back to this proxy; closing");
                    return;
                }
                match opaque_target {
                    Some(t) => tcp::relay(io, t).await,
                    None => {
                        tracing::debug!(direction = ?self.direction, ?protocol, "opaque connection without a destination; closing")
                    }
                }
                return;
            }
        };
        let ctx = Arc::new(HttpContext {
            direction: self.direction,
            router: self.router.clone(),
            metrics: self.metrics.clone(),
            version,
            orig_dst,
            inbound_target: match self.direction {
                Direction::inbound => opaque_target,
                Direction::outbound => None,
            },
            listen_addr: self.listen_addr,
        });
        http::serve(io, ctx, shutdown).await;
    }
}

/// Reads until the first bytes identify the protocol. A client that stays
/// silent past `timeout` is taken for a server-speaks-first protocol.
async fn read_prefix<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(BytesMut, Protocol)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Detection::Known(p) = detect(&buf) {
            return Ok((buf, p));
        }
        if buf.len() >= MAX_PREFIX {
            return Ok((buf, Protocol::Opaque));
        }
        buf.reserve(1024.min(MAX_PREFIX - buf.len()));
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Ok((buf, Protocol::Opaque)),
            Ok(Ok(0)) if buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending anything",
                ));
            }
            Ok(Ok(0)) => return Ok((buf, Protocol::Opaque)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}
