//! One upstream address and the connections the proxy keeps to it: a pool
//! of HTTP/1.1 keep-alive connections and one multiplexed HTTP/2
//! connection. Connecting happens before a request is committed, so a
//! failed connect can be retried on another endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_balance::{Load, PeakEwmaConfig};

use crate::http::ReqBody;
use crate::io::{CountingIo, UpstreamIo};
use crate::metrics::{Direction, Peer, TcpMetrics, TlsLabel};
use crate::tls::Tls;
use weft_destinations::ProtocolHint;
use weft_identity::Name;

/// Idle HTTP/1.1 connections older than this are closed rather than reused:
/// servers commonly time idle keep-alive connections out after a minute.
const HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// HTTP/1.1 connections kept per endpoint, busy or idle; beyond this a
/// finished connection is closed instead of pooled.
const HTTP1_MAX_POOLED: usize = 256;

/// After a failed connect an endpoint is passed over for this long,
/// doubling with each further failure up to the maximum.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} (expected identity {identity}) failed: {source}")]
    Tls {
        addr: SocketAddr,
        identity: Name,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// A connect shared by concurrent requests failed.
    #[error(transparent)]
    Shared(Arc<ConnectError>),
}

/// Every request in flight to an endpoint holds one of its slots.
#[derive(Debug, thiserror::Error)]
#[error("{in_flight} requests in flight and none finished within {waited:?}")]
pub struct Saturated {
    pub in_flight: usize,
    pub waited: Duration,
}

/// What every endpoint of one direction shares.
#[derive(Clone, Debug)]
pub struct EndpointSettings {
    pub connect_timeout: Duration,
    pub tcp_metrics: TcpMetrics,
    pub direction: Direction,
    /// This proxy's identity, when it has one: meshed endpoints are then
    /// reached over mutual TLS.
    pub tls: Option<Arc<Tls>>,
    pub limits: Arc<crate::config::Limits>,
    /// Per-node mode: the workload whose router this is, for metrics.
    pub workload: Option<Arc<str>>,
    /// Whether HTTP/1 requests to an endpoint hinted HTTP/2 (a meshed
    /// proxy) travel over HTTP/2 with `l5d-orig-proto`.
    pub orig_proto_upgrade: bool,
    /// How many cores (each with its own connections to every endpoint).
    pub cores: usize,
}

/// Connects to one fixed address, over mutual TLS when the endpoint is
/// meshed and this proxy has an identity.
#[derive(Clone, Debug)]
pub struct Connector {
    addr: SocketAddr,
    timeout: Duration,
    metrics: TcpMetrics,
    direction: Direction,
    tls: Option<(Arc<Tls>, Name)>,
    workload: Option<Arc<str>>,
}

impl Connector {
    pub async fn connect(&self) -> Result<UpstreamIo, ConnectError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    timeout: self.timeout,
                });
            }
            Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
            Ok(Ok(s)) => s,
        };
        // Latency matters more than packet count for request/response.
        let _ = stream.set_nodelay(true);
        let tls_label = match &self.tls {
            Some((_, identity)) => TlsLabel::Mutual {
                peer_id: identity.as_str().into(),
            },
            None => TlsLabel::Plain,
        };
        let io = CountingIo::new(
            stream,
            &self.metrics,
            self.direction,
            Peer::dst,
            tls_label,
            self.workload.clone(),
        );
        let Some((tls, identity)) = &self.tls else {
            return Ok(UpstreamIo::Plain(io));
        };
        let handshake = tls.connect(io, identity);
        match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(s)) => Ok(UpstreamIo::Tls(Box::new(s))),
            Ok(Err(source)) => Err(ConnectError::Tls {
                addr,
                identity: identity.clone(),
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                addr,
                timeout: self.timeout,
            }),
        }
    }

    /// The identity the peer proved, when the connection is mutual TLS.
    pub fn server_id(&self) -> Option<&Name> {
        self.tls.as_ref().map(|(_, name)| name)
    }
}

struct Pooled {
    send: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// An upstream endpoint. Its `Load` is shared by every balancer that can
/// pick it, so latency history survives destination reloads.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity discovery says this endpoint proves, if meshed.
    pub identity: Option<Name>,
    /// Metric labels for requests sent here, rendered once.
    pub tls_label: TlsLabel,
    /// HTTP/1 requests go to this endpoint over its HTTP/2 connection, as
    /// `l5d-orig-proto` upgrades: it is a meshed proxy that restores them.
    pub upgrade_http1: bool,
    pub load: Arc<Load>,
    pub connector: Connector,
    /// One pool per core, so a request is sent on a connection whose task
    /// runs on the request's own thread.
    pools: Box<[Pool]>,
    /// Requests in flight here (HTTP/1 connections, HTTP/2 streams).
    slots: Arc<Semaphore>,
    limits: Arc<crate::config::Limits>,
    /// Consecutive failed connects, and until when (ms since `epoch`) the
    /// endpoint is passed over.
    failures: AtomicU32,
    backoff_until: AtomicU64,
    epoch: Instant,
}

/// Connections to the endpoint that one core's requests use.
#[derive(Default)]
struct Pool {
    http1: Mutex<Vec<Pooled>>,
    http2: ArcSwapOption<http2::SendRequest<ReqBody>>,
    /// Single flight for the HTTP/2 connection: concurrent requests share
    /// one connect, and its failure.
    http2_connecting: Mutex<Option<SharedConnect>>,
}

type SharedConnect =
    Shared<BoxFuture<'static, Result<http2::SendRequest<ReqBody>, Arc<ConnectError>>>>;

/// A request's hold on an endpoint: its slot, released with the response
/// body, and its balancer load.
#[derive(Debug)]
pub struct InFlight {
    pub pending: weft_balance::Pending,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A connection ready to carry one request.
pub enum Sender {
    Http1(http1::SendRequest<ReqBody>),
    Http2(http2::SendRequest<ReqBody>),
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        identity: Option<Name>,
        hint: ProtocolHint,
        settings: &EndpointSettings,
    ) -> Self {
        let tls = match (&settings.tls, &identity) {
            (Some(tls), Some(id)) => Some((tls.clone(), id.clone())),
            _ => None,
        };
        let tls_label = match &tls {
            Some((_, id)) => TlsLabel::Mutual {
                peer_id: id.as_str().into(),
            },
            None => TlsLabel::Plain,
        };
        Self {
            addr,
            identity,
            tls_label,
            upgrade_http1: settings.orig_proto_upgrade && hint == ProtocolHint::Http2,
            load: Arc::new(Load::new(PeakEwmaConfig::default())),
            connector: Connector {
                addr,
                timeout: settings.connect_timeout,
                metrics: settings.tcp_metrics.clone(),
                direction: settings.direction,
                tls,
                workload: settings.workload.clone(),
            },
            pools: (0..settings.cores.max(1))
                .map(|_| Pool::default())
                .collect(),
            slots: Arc::new(Semaphore::new(settings.limits.endpoint_max_in_flight)),
            limits: settings.limits.clone(),
            failures: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// This core's pool.
    fn pool(&self) -> &Pool {
        &self.pools[crate::cores::current() % self.pools.len()]
    }

    /// Takes one of the endpoint's in-flight slots, waiting at most the
    /// queue timeout for one to free up.
    pub async fn reserve(&self, load: &Arc<weft_balance::Load>) -> Result<InFlight, Saturated> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let wait = self.limits.endpoint_queue_timeout;
                match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(Saturated {
                            in_flight: self.limits.endpoint_max_in_flight,
                            waited: wait,
                        });
                    }
                }
            }
        };
        Ok(InFlight {
            pending: load.start(),
            _slot: permit,
        })
    }

    /// Whether recent connects failed and the endpoint should be passed
    /// over for now.
    pub fn backing_off(&self) -> bool {
        let until = self.backoff_until.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_millis() as u64) < until
    }

    fn connect_failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = CONNECT_BACKOFF_MIN
            .saturating_mul(1 << n.min(5))
            .min(CONNECT_BACKOFF_MAX);
        let until = self.epoch.elapsed() + backoff;
        self.backoff_until
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }

    fn connect_succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.backoff_until.store(0, Ordering::Relaxed);
        }
    }

    /// Connects, keeping the endpoint's connect backoff up to date.
    pub async fn connect(&self) -> Result<UpstreamIo, ConnectError> {
        let r = self.connector.connect().await;
        match &r {
            Ok(_) => self.connect_succeeded(),
            Err(_) => self.connect_failed(),
        }
        r
    }

    /// A ready HTTP/1.1 connection: an idle pooled one, or a new one.
    pub async fn http1(&self) -> Result<Sender, ConnectError> {
        if let Some(send) = self.checkout_http1() {
            return Ok(Sender::Http1(send));
        }
        // Connecting is the cold path; boxing it keeps the per-request
        // future (moved on every poll setup) small.
        Box::pin(self.connect_http1()).await.map(Sender::Http1)
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<ReqBody>, ConnectError> {
        let io = self.connect().await?;
        let (send, conn) = http1::Builder::new()
            // As the server side's: flat writes cost less than writev for
            // the small heads and bodies most requests have.
            .writev(false)
            .max_buf_size((self.limits.max_header_bytes as usize).max(8192))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: self.addr,
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(send)
    }

    fn checkout_http1(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut pool = self.pool().http1.lock().ok()?;
        let now = Instant::now();
        // Closed and long-idle connections go; busy ones (a response body
        // still streaming) stay for later.
        pool.retain(|p| {
            let stale = p.send.is_ready() && now - p.since > HTTP1_IDLE_TIMEOUT;
            !p.send.is_closed() && !stale
        });
        let i = pool.iter().rposition(|p| p.send.is_ready())?;
        Some(pool.swap_remove(i).send)
    }

    /// Returns a connection whose request has been answered; it becomes
    /// ready again once the response body has been read.
    pub fn checkin_http1(&self, send: http1::SendRequest<ReqBody>) {
        if let Ok(mut pool) = self.pool().http1.lock()
            && pool.len() < HTTP1_MAX_POOLED
        {
            pool.push(Pooled {
                send,
                since: Instant::now(),
            });
        }
    }

    /// The endpoint's HTTP/2 connection, connecting if there is none.
    pub async fn http2(&self) -> Result<Sender, ConnectError> {
        if let Some(send) = self.live_http2() {
            return Ok(Sender::Http2(send));
        }
        Box::pin(self.connect_http2()).await
    }

    async fn connect_http2(&self) -> Result<Sender, ConnectError> {
        // One pool throughout: the one this request's core connects for
        // is the one whose single flight it clears.
        let pool = self.pool();
        let connect = {
            let mut slot = match pool.http2_connecting.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if let Some(send) = self.live_http2() {
                return Ok(Sender::Http2(send));
            }
            match &*slot {
                Some(c) => c.clone(),
                None => {
                    let c = self.start_http2_connect();
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        let result = connect.clone().await;
        if let Ok(mut slot) = pool.http2_connecting.lock()
            && slot.as_ref().is_some_and(|c| c.ptr_eq(&connect))
        {
            *slot = None;
            match &result {
                Ok(send) => {
                    pool.http2.store(Some(Arc::new(send.clone())));
                    self.connect_succeeded();
                }
                Err(_) => self.connect_failed(),
            }
        }
        result.map(Sender::Http2).map_err(ConnectError::Shared)
    }

    /// One connect and HTTP/2 handshake that every waiting request shares;
    /// it owns what it needs, so it runs on even if the request that
    /// started it is cancelled while others still wait.
    fn start_http2_connect(&self) -> SharedConnect {
        let connector = self.connector.clone();
        let limits = self.limits.clone();
        let addr = self.addr;
        async move {
            let io = connector.connect().await.map_err(Arc::new)?;
            let exec = crate::local::LocalExec::default();
            let (send, conn) = http2::Builder::new(exec.clone())
                .timer(TokioTimer::new())
                .initial_stream_window_size(256 * 1024)
                .initial_connection_window_size(1024 * 1024)
                .max_header_list_size(limits.max_header_bytes)
                // A peer that vanished without a FIN would otherwise hold
                // requests until the kernel gives up on the socket.
                .keep_alive_interval(limits.http2_keepalive_interval)
                .keep_alive_timeout(limits.http2_keepalive_timeout)
                .handshake(TokioIo::new(io))
                .await
                .map_err(|source| Arc::new(ConnectError::Handshake { addr, source }))?;
            tokio::spawn(async move {
                if let Err(e) = crate::local::Driven::new(conn, exec).await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Ok(send)
        }
        .boxed()
        .shared()
    }

    fn live_http2(&self) -> Option<http2::SendRequest<ReqBody>> {
        let current = self.pool().http2.load();
        let send = current.as_deref()?;
        (!send.is_closed()).then(|| send.clone())
    }

    /// Sends `req` on `sender`. If the connection turns out to be unusable
    /// before the request was written (a pooled connection the server just
    /// closed), the request is sent once more on a fresh connection.
    pub async fn send(
        &self,
        sender: Sender,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let http1 = matches!(sender, Sender::Http1(_));
        let req = match self.try_send(sender, req).await {
            Ok(rsp) => return Ok(rsp),
            Err(mut e) => match e.take_message() {
                Some(req) => req,
                None => return Err(SendError::Request(e.into_error())),
            },
        };
        Box::pin(self.resend(http1, req)).await
    }

    async fn resend(
        &self,
        http1: bool,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, SendError> {
        tracing::debug!(endpoint = %self.addr, "connection closed before the request was sent; reconnecting");
        let fresh = if http1 {
            Sender::Http1(self.connect_http1().await.map_err(SendError::Connect)?)
        } else {
            self.pool().http2.store(None);
            self.http2().await.map_err(SendError::Connect)?
        };
        self.try_send(fresh, req)
            .await
            .map_err(|e| SendError::Request(e.into_error()))
    }

    /// One attempt; an HTTP/1.1 connection goes back to the pool once its
    /// response has arrived (unless it was upgraded away).
    async fn try_send(
        &self,
        sender: Sender,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ReqBody>>> {
        match sender {
            Sender::Http1(mut send) => {
                let rsp = send.try_send_request(req).await?;
                if rsp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    self.checkin_http1(send);
                }
                Ok(rsp)
            }
            Sender::Http2(mut send) => send.try_send_request(req).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("{0}")]
    Request(#[source] hyper::Error),
}
