//! `WEFT_PROXY_CORES=N`: one current-thread runtime per core, not one
//! work-stealing runtime with N workers.
//!
//! Core 0 is the main runtime: it accepts every connection and hands each
//! to the core serving the fewest, where the connection lives until it
//! closes. Each core keeps its own upstream connections (see
//! [`crate::endpoint`]), so a request is read, balanced, sent and answered
//! on one thread: no task migrates, no wakeup crosses threads, and no lock
//! inside hyper or h2 is contended. What cores share is what must be
//! shared: the balancer's load per endpoint, metrics, discovery.
//!
//! One acceptor dispatching by open connections balances as HAProxy's
//! threads do; an `SO_REUSEPORT` listener per core would spread by a hash
//! of the 4-tuple instead, which leaves a few long-lived HTTP/2
//! connections unevenly spread.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::Side;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The core this thread serves: 0 on the main runtime and on any thread
/// that is not a core's.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// A connection handed from the acceptor to another core.
struct Handoff {
    side: Arc<Side>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    open: Open,
}

/// The cores, and how many connections each serves.
pub struct Cores {
    open: Arc<[AtomicUsize]>,
    /// Cores 1.. (core 0 is the acceptor's own runtime). Unbounded, yet
    /// bounded: every hand-off carries one of its listener's connection
    /// slots.
    others: Vec<mpsc::UnboundedSender<Handoff>>,
}

/// One connection counted against its core until dropped.
pub struct Open {
    open: Arc<[AtomicUsize]>,
    core: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open[self.core].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection this core serves itself.
pub struct Local {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
    pub open: Open,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start core {core}: {source}")]
pub struct StartError {
    core: usize,
    #[source]
    source: std::io::Error,
}

impl Cores {
    /// Starts cores 1..`n`, each a thread with its own runtime serving what
    /// it is handed until `shutdown`, then until `tracker` is empty.
    pub fn start(
        n: usize,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, StartError> {
        let open: Arc<[AtomicUsize]> = (0..n.max(1)).map(|_| AtomicUsize::new(0)).collect();
        let mut others = Vec::with_capacity(n.saturating_sub(1));
        for core in 1..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| StartError { core, source })?;
            let shutdown = shutdown.clone();
            let tracker = tracker.clone();
            std::thread::Builder::new()
                .name(format!("weft-core-{core}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(core));
                    runtime.block_on(serve_handoffs(rx, shutdown, tracker));
                })
                .map_err(|source| StartError { core, source })?;
            others.push(tx);
        }
        Ok(Arc::new(Self { open, others }))
    }

    /// Counts a new connection against the core serving the fewest and,
    /// if that is another core, hands the connection to it (`None`).
    pub fn place(
        &self,
        side: &Arc<Side>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<Local> {
        let here = current();
        // Ties stay here: no hand-off when nothing is gained.
        let core = (0..self.open.len())
            .min_by_key(|&c| (self.open[c].load(Ordering::Relaxed), c != here))
            .unwrap_or(here);
        self.open[core].fetch_add(1, Ordering::Relaxed);
        let open = Open {
            open: self.open.clone(),
            core,
        };
        let tx = match core.checked_sub(1).and_then(|i| self.others.get(i)) {
            Some(tx) if core != here => tx,
            _ => {
                return Some(Local {
                    stream,
                    peer,
                    permit,
                    open,
                });
            }
        };
        // The stream leaves this runtime's reactor for the other core's.
        match stream.into_std() {
            Ok(stream) => {
                let handoff = Handoff {
                    side: side.clone(),
                    stream,
                    peer,
                    permit,
                    open,
                };
                if tx.send(handoff).is_err() {
                    tracing::debug!(core, "core stopped; connection closed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot hand a connection to another core"),
        }
        None
    }
}

/// A core's loop: serve each connection handed to it, until shutdown; then
/// keep driving the connections until they are done (or the process exits
/// at the end of the grace period).
async fn serve_handoffs(
    mut rx: mpsc::UnboundedReceiver<Handoff>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let handoff = tokio::select! {
            _ = shutdown.cancelled() => break,
            h = rx.recv() => match h {
                Some(h) => h,
                None => break,
            },
        };
        let stream = match TcpStream::from_std(handoff.stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot serve a handed connection");
                continue;
            }
        };
        handoff.side.spawn_serving(
            Local {
                stream,
                peer: handoff.peer,
                permit: handoff.permit,
                open: handoff.open,
            },
            shutdown.clone(),
            &tracker,
        );
    }
    drop(rx);
    tracker.wait().await;
}
