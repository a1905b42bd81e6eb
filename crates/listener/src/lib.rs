//! The one accept loop of weft's servers (the proxy's listeners; the
//! control plane's gRPC server is to follow): at most `max` connections open at once,
//! accept errors (usually EMFILE at the fd limit) backed off rather than
//! spun on, and repeated warnings collapsed into one line with a count.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The first pause after a failed accept, doubled while failures continue.
/// Connections the kernel may queue for us while we are busy, or out of
/// descriptors: a burst of clients (a fleet reconnecting after a restart)
/// waits here instead of having its SYNs dropped and retried seconds
/// later. Library defaults are 128; the kernel caps this at somaxconn.
pub const BACKLOG: u32 = 1024;

/// Binds a listener with [`BACKLOG`] (and SO_REUSEADDR, so a restarted
/// process can bind while old connections are in TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(addr, false)
}

/// [`bind`], optionally with SO_REUSEPORT: then another process of the same
/// user may bind the same address and the kernel spreads new connections
/// over both (connections still queued on a socket when its process
/// closes it are reset; handing the socket over does not have that gap).
///
/// An IPv6 listener takes IPv6 only (`IPV6_V6ONLY`), so `[::]:4143` and
/// `0.0.0.0:4143` can be bound side by side, one per family, whatever the
/// host's `bindv6only`.
pub fn bind_with(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG as i32)?;
    TcpListener::from_std(socket.into())
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Logs a recurring condition at most once per period, with how many times
/// it happened meanwhile.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were
    /// suppressed since the last one; `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// A connection accepted under the cap: the slot is freed when this drops.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
}

/// A listener with a cap on open connections.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    name: &'static str,
    slots: Arc<Semaphore>,
    max: usize,
    refused: AtomicU64,
    full_log: Throttle,
    error_log: Throttle,
    backoff: Duration,
}

impl Listener {
    pub fn new(inner: TcpListener, name: &'static str, max: usize) -> Self {
        Self {
            inner,
            name,
            slots: Arc::new(Semaphore::new(max)),
            max,
            refused: AtomicU64::new(0),
            full_log: Throttle::new(Duration::from_secs(5)),
            error_log: Throttle::new(Duration::from_secs(5)),
            backoff: BACKOFF_MIN,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Connections closed at once because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// The next connection within the cap. A connection beyond the cap is
    /// accepted and closed at once (so its client learns now, rather than
    /// waiting in the backlog), and `on_refused` is called; accept errors
    /// pause the loop, growing while they last.
    pub async fn accept(&mut self, mut on_refused: impl FnMut()) -> Accepted {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = BACKOFF_MIN;
                    match self.slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            return Accepted {
                                stream,
                                peer,
                                permit,
                            };
                        }
                        Err(_) => {
                            drop(stream);
                            self.refused.fetch_add(1, Ordering::Relaxed);
                            on_refused();
                            if let Some(suppressed) = self.full_log.allow() {
                                tracing::warn!(
                                    listener = self.name,
                                    max = self.max,
                                    suppressed,
                                    "connection limit reached; closing new connections"
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    if let Some(suppressed) = self.error_log.allow() {
                        tracing::warn!(
                            listener = self.name,
                            error = %e,
                            suppressed,
                            retry_in = ?self.backoff,
                            "accept failed (at the file descriptor limit?); backing off"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_counts_what_it_suppresses() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        let t2 = Throttle::new(Duration::ZERO);
        assert_eq!(t2.allow(), Some(0));
        assert_eq!(t2.allow(), Some(0));
    }

    #[tokio::test]
    async fn beyond_the_cap_connections_are_closed_at_once() -> io::Result<()> {
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let mut l = Listener::new(l, "test", 1);
        let _held = TcpStream::connect(addr).await?;
        let first = l.accept(|| {}).await;
        assert_eq!(l.open(), 1);
        let mut second = TcpStream::connect(addr).await?;
        let refused = std::sync::atomic::AtomicBool::new(false);
        {
            let accept = l.accept(|| refused.store(true, Ordering::Relaxed));
            tokio::pin!(accept);
            // The second is closed at once (EOF), and accept goes on waiting.
            let mut buf = [0u8; 1];
            tokio::select! {
                _ = &mut accept => panic!("accepted beyond the cap"),
                n = second.read(&mut buf) => assert_eq!(n?, 0),
            }
        }
        assert!(refused.load(Ordering::Relaxed));
        assert_eq!(l.refused(), 1);
        // Once the first closes, the next one gets its slot.
        drop(first);
        assert_eq!(l.open(), 0);
        let _third = TcpStream::connect(addr).await?;
        let third = tokio::time::timeout(Duration::from_secs(5), l.accept(|| {}))
            .await
            .map_err(|_| io::Error::other("no slot freed"))?;
        assert_eq!(l.open(), 1);
        drop(third);
        Ok(())
    }
}
