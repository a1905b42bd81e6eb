//! Listeners: accept, detect the protocol, hand the connection to the HTTP
//! proxy or the opaque relay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weft_detect::{Authority, ClientHello, Detection, MAX_PREFIX, Protocol, client_hello, detect};

use crate::authz::Authz;
use crate::authz::InboundConn;
use crate::config::Limits;
use crate::cores::{Cores, Local};
use crate::http::{self, HttpContext, HttpVersion, ListenAddrs};
use crate::io::{CountingIo, PrefixedIo, TlsSlot};
use crate::metrics::{AuthorityLabels, Direction, DirectionLabels, Metrics, Peer, TlsLabel};
use crate::orig_dst::original_dst;
use crate::route::{Router, Target};
use crate::tcp;
use crate::tls::Tls;
use crate::workload::Workloads;

/// A TLS client must finish its handshake within this long.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest TLS record, and so the largest ClientHello this proxy reads
/// before deciding whether the TLS is addressed to it.
const MAX_CLIENT_HELLO: usize = 5 + 16 * 1024;
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
    pub listen_addrs: ListenAddrs,
    /// Inbound: this proxy's identity, to terminate mutual TLS addressed
    /// to it.
    pub tls: Option<Arc<Tls>>,
    /// Per-node mode: the local workloads (outbound: whose router a
    /// connection uses; inbound: whose certificate its SNI asks for).
    pub workloads: Arc<Workloads>,
    pub limits: Arc<Limits>,
    /// The metric label of each inbound request's authority.
    pub labels: Arc<AuthorityLabels>,
    /// Inbound: who may reach which port and route.
    pub authz: Arc<Authz>,
    /// Inbound: whose policy applies when no local workload's does.
    pub server_id: Option<Arc<str>>,
    /// When tracing is on.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// The cores connections are spread over.
    pub cores: Arc<Cores>,
}

impl Side {
    pub async fn accept_loop(
        self: Arc<Self>,
        mut listener: weft_listener::Listener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let refused = self
            .metrics
            .accept_refused
            .get_or_create(&DirectionLabels {
                direction: self.direction,
            })
            .clone();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept(|| { refused.inc(); }) => a,
            };
            if let Some(local) =
                self.cores
                    .place(&self, accepted.stream, accepted.peer, accepted.permit)
            {
                self.clone()
                    .spawn_serving(local, shutdown.clone(), &tracker);
            }
        }
    }

    /// Serves a connection on this thread's runtime.
    pub(crate) fn spawn_serving(
        self: Arc<Self>,
        local: Local,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) {
        tracker.spawn(async move {
            // The slot (and the core's count) is held for as long as the
            // connection is served.
            let Local {
                stream,
                peer,
                permit: _permit,
                open: _open,
            } = local;
            // Two phases, each boxed, so the task holds two pointers:
            // detection (and a TLS handshake) is freed once it has
            // decided, and a connection served for hours holds only
            // what serving needs.
            let serving = Box::pin(self.serve(stream, peer, shutdown)).await;
            if let Some(serving) = serving {
                serving.await;
            }
        });
    }

    /// Detects the connection's protocol (terminating TLS addressed to
    /// this proxy) and returns what serves it, if anything does.
    async fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Option<Serving> {
        let _ = stream.set_nodelay(true);
        let orig_dst = original_dst(&stream);
        let tls_slot = TlsSlot::default();
        let mut io = CountingIo::deferred(
            stream,
            &self.metrics.tcp,
            self.direction,
            Peer::src,
            tls_slot.clone(),
        );

        // Outbound, the workload the client is (by its address); inbound,
        // the one it dialled, until its TLS says otherwise.
        let workload = match self.direction {
            Direction::outbound => self.workloads.of_client(peer).await,
            Direction::inbound => orig_dst.and_then(|d| self.workloads.by_addr(d.ip())),
        };
        let router = match (self.direction, workload) {
            (Direction::outbound, Some(w)) => &w.router,
            _ => &self.router,
        };
        // Inbound, the identity served (whose policy applies): the local
        // workload's the client dialled, else this proxy's, until the
        // client's TLS names one.
        let mut server_id: Option<Arc<str>> = match (self.direction, workload) {
            (Direction::inbound, Some(w)) => Some(w.tls.name.as_str().into()),
            (Direction::inbound, None) => self.server_id.clone(),
            (Direction::outbound, _) => None,
        };
        let mut workload = workload.map(|w| w.name.clone());
        let opaque_target: Option<Arc<Target>> = match self.direction {
            Direction::outbound => match orig_dst {
                Some(dst) => router.resolve(&Authority::from_socket_addr(dst)).await.ok(),
                None => None,
            },
            // The address the client dialled, not 127.0.0.1 and its port:
            // a service bound only to loopback is not for other hosts.
            Direction::inbound => orig_dst
                .or(self.inbound_forward)
                .map(|addr| router.fixed(addr, None)),
        };
        let timeout = if opaque_target.is_some() {
            self.detect_timeout
        } else {
            EXPLICIT_MODE_DETECT_TIMEOUT
        };
        let (mut prefix, protocol) =
            match read_prefix(&mut io, timeout, self.limits.header_read_timeout).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed during detection");
                    return None;
                }
            };
        tracing::trace!(?protocol, bytes = prefix.len(), "detected");
        if let (Protocol::Tls, Direction::inbound, true) = (
            protocol,
            self.direction,
            self.tls.is_some() || self.workloads.iter().next().is_some(),
        ) {
            let sni = match read_client_hello(&mut io, &mut prefix).await {
                Ok(sni) => sni,
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed while reading the ClientHello");
                    return None;
                }
            };
            // TLS addressed to this proxy's identity (or, per node, to a
            // local workload's) is a peer proxy's mutual TLS; anything else
            // is the application's own TLS and is relayed untouched.
            let tls = match sni.as_deref() {
                Some(name) if self.tls.as_ref().is_some_and(|t| t.name.as_str() == name) => {
                    self.tls.clone()
                }
                Some(name) => self.workloads.by_identity(name).map(|w| {
                    workload = Some(w.name.clone());
                    server_id = Some(w.tls.name.as_str().into());
                    w.tls.clone()
                }),
                None => None,
            };
            if let Some(tls) = tls {
                let io = PrefixedIo::new(prefix.freeze(), io);
                let accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(io)).await;
                let (mut stream, client_id) = match accepted {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(error = %e, "inbound TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        tracing::info!("inbound TLS handshake timed out");
                        return None;
                    }
                };
                let client_tls = match client_id {
                    Some(id) => TlsLabel::Mutual {
                        peer_id: id.as_str().into(),
                    },
                    None => TlsLabel::Plain,
                };
                tls_slot.set(client_tls.clone(), workload.clone());
                let (inner, protocol) = match read_prefix(
                    &mut stream,
                    timeout,
                    self.limits.header_read_timeout,
                )
                .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS connection failed during detection");
                        return None;
                    }
                };
                let silent = inner.is_empty() && protocol == Protocol::Opaque;
                let io = PrefixedIo::new(inner.freeze(), stream);
                let conn = Detected {
                    silent,
                    protocol,
                    opaque_target,
                    orig_dst,
                    client_tls,
                    router: router.clone(),
                    workload,
                    peer,
                    server_id,
                };
                return self.dispatch(io, conn, shutdown).await;
            }
        }
        tls_slot.set(TlsLabel::Plain, workload.clone());
        let silent = prefix.is_empty() && protocol == Protocol::Opaque;
        let io = PrefixedIo::new(prefix.freeze(), io);
        let conn = Detected {
            silent,
            protocol,
            opaque_target,
            orig_dst,
            client_tls: TlsLabel::Plain,
            router: router.clone(),
            workload,
            peer,
            server_id,
        };
        self.dispatch(io, conn, shutdown).await
    }

    /// Hands a detected connection to the HTTP proxy or the opaque relay.
    async fn dispatch<I>(
        &self,
        io: I,
        conn: Detected,
        shutdown: CancellationToken,
    ) -> Option<Serving>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Detected {
            protocol,
            opaque_target,
            orig_dst,
            client_tls,
            router,
            workload,
            peer,
            server_id,
            silent,
        } = conn;
        // Inbound: the port whose policy applies is the application's.
        let inbound = match self.direction {
            Direction::inbound => {
                let target_addr = orig_dst
                    .or(self.inbound_forward)
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                Some(InboundConn {
                    port: self.authz.port(server_id, target_addr.port()).await,
                    target_addr,
                    client: peer,
                })
            }
            Direction::outbound => None,
        };
        // A port declared opaque (or TLS) is relayed as bytes whatever its
        // first bytes look like.
        let declared_opaque = inbound.as_ref().is_some_and(|c| {
            matches!(
                c.server().protocol,
                weft_authz::Protocol::Opaque | weft_authz::Protocol::Tls
            )
        });
        let protocol = if declared_opaque {
            Protocol::Opaque
        } else {
            protocol
        };
        // A client silent through detection may be an HTTP client that
        // connected early, or the client of a server-speaks-first
        // protocol: whoever speaks first within the header read timeout
        // decides, so the first never escapes the HTTP policy and neither
        // holds a connection past that timeout.
        let (io, protocol, greeted) = match &opaque_target {
            Some(target) if silent && !declared_opaque => {
                let admitted = inbound
                    .as_ref()
                    .is_none_or(|c| c.admits_connection(&client_tls));
                let upstream = if admitted {
                    tcp::connect(target, Some(&self.listen_addrs)).await.ok()
                } else {
                    None
                };
                let deadline = tokio::time::Instant::now() + self.limits.header_read_timeout;
                let mut io = io;
                match first_words(&mut io, upstream, deadline).await {
                    Ok(FirstWords {
                        prefix,
                        protocol,
                        upstream,
                    }) => (PrefixedIo::new(prefix.freeze(), io), protocol, upstream),
                    Err(e) => {
                        tracing::debug!(direction = ?self.direction, error = %e, "silent connection closed");
                        return None;
                    }
                }
            }
            _ => (PrefixedIo::new(bytes::Bytes::new(), io), protocol, None),
        };
        let version = match protocol {
            Protocol::Http1 => HttpVersion::Http1,
            Protocol::Http2 => HttpVersion::Http2,
            Protocol::Tls | Protocol::Opaque => {
                if let Some(conn) = &inbound
                    && !conn.authorize_connection(&self.metrics, &client_tls)
                {
                    return None;
                }
                let idle = self.limits.tcp_idle_timeout;
                let looped = opaque_target
                    .as_ref()
                    .is_some_and(|t| t.endpoints().iter().any(|a| self.listen_addrs.contains(*a)));
                if looped {
                    tracing::info!(direction = ?self.direction, "opaque connection would loop back to this proxy; closing");
                    return None;
                }
                return match opaque_target {
                    Some(t) => {
                        let relay = async move {
                            match greeted {
                                Some((up, greeting)) => {
                                    let mut io = io;
                                    if io.write_all(&greeting).await.is_ok() {
                                        tcp::relay_connected(io, &t, up, idle).await;
                                    }
                                }
                                None => tcp::relay(io, t, idle).await,
                            }
                        };
                        match inbound {
                            Some(conn) => {
                                let metrics = self.metrics.clone();
                                Some(Box::pin(async move {
                                    conn.while_authorized(relay, &metrics, &client_tls).await
                                }))
                            }
                            None => Some(Box::pin(relay)),
                        }
                    }
                    None => {
                        tracing::debug!(direction = ?self.direction, ?protocol, "opaque connection without a destination; closing");
                        None
                    }
                };
            }
        };
        let ctx = Arc::new(HttpContext {
            direction: self.direction,
            router,
            metrics: self.metrics.clone(),
            version,
            orig_dst,
            inbound_target: match self.direction {
                Direction::inbound => opaque_target,
                Direction::outbound => None,
            },
            listen_addrs: self.listen_addrs.clone(),
            client_id: match self.direction {
                Direction::inbound => http::client_id_header(&client_tls),
                Direction::outbound => None,
            },
            client_tls,
            limits: self.limits.clone(),
            labels: self.labels.clone(),
            workload,
            inbound,
            tracer: self.tracer.clone(),
        });
        Some(Box::pin(http::serve(io, ctx, shutdown)))
    }
}

/// A connection's serving phase: the HTTP server or the relay.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What the server learned about a connection before handing it on.
struct Detected {
    protocol: Protocol,
    opaque_target: Option<Arc<Target>>,
    orig_dst: Option<SocketAddr>,
    client_tls: TlsLabel,
    /// Outbound: the client's workload's router (per node), else the
    /// proxy's.
    router: Arc<Router>,
    workload: Option<Arc<str>>,
    /// The client's address.
    peer: SocketAddr,
    /// Inbound: the identity whose policy applies.
    server_id: Option<Arc<str>>,
    /// The client sent nothing within the detection timeout.
    silent: bool,
}

/// Reads the rest of a TLS ClientHello into `buf`; returns its server name.
async fn read_client_hello<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
) -> io::Result<Option<String>> {
    let deadline = tokio::time::Instant::now() + TLS_HANDSHAKE_TIMEOUT;
    loop {
        match client_hello(buf) {
            ClientHello::Parsed { server_name } => return Ok(server_name.map(str::to_string)),
            ClientHello::Invalid => return Ok(None),
            ClientHello::NeedMore(n) if n > MAX_CLIENT_HELLO => return Ok(None),
            ClientHello::NeedMore(n) => {
                buf.reserve(n - buf.len());
                match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "ClientHello incomplete",
                        ));
                    }
                    Ok(Ok(0)) => return Ok(None),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                }
            }
        }
    }
}

/// Reads until the first bytes identify the protocol. A client that stays
/// silent past `timeout` is taken for a server-speaks-first protocol
/// (opaque, with nothing read); one that has sent part of something (a
/// request line trickled in) is not silent, and must finish within
/// `partial_timeout` (the header read timeout), or is closed: relayed as
/// opaque it would escape that timeout and the HTTP policy.
async fn read_prefix<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
    partial_timeout: Duration,
) -> io::Result<(BytesMut, Protocol)> {
    let mut buf = BytesMut::with_capacity(1024);
    let start = tokio::time::Instant::now();
    let protocol = read_prefix_into(
        io,
        &mut buf,
        start + timeout,
        start + partial_timeout.max(timeout),
    )
    .await?;
    Ok((buf, protocol))
}

/// [`read_prefix`] into `buf`, which keeps what was read if the future is
/// dropped.
async fn read_prefix_into<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    silent_deadline: tokio::time::Instant,
    partial_deadline: tokio::time::Instant,
) -> io::Result<Protocol> {
    loop {
        let deadline = if buf.is_empty() {
            silent_deadline
        } else {
            partial_deadline
        };
        if let Detection::Known(p) = detect(buf) {
            return Ok(p);
        }
        if buf.len() >= MAX_PREFIX {
            return Ok(Protocol::Opaque);
        }
        buf.reserve(1024.min(MAX_PREFIX - buf.len()));
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) if buf.is_empty() => return Ok(Protocol::Opaque),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "sent part of a request and not the rest within the header read timeout",
                ));
            }
            Ok(Ok(0)) if buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending anything",
                ));
            }
            Ok(Ok(0)) => return Ok(Protocol::Opaque),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// What is known once someone spoke on a connection whose client was
/// silent through detection.
struct FirstWords {
    /// What the client sent (all of it, or part of something when the
    /// server spoke first).
    prefix: BytesMut,
    /// Its protocol: opaque whenever the server spoke first.
    protocol: Protocol,
    /// For an opaque connection, the upstream connection made to listen
    /// for the server, and its greeting (empty if the client spoke first),
    /// owed to the client before anything else.
    upstream: Option<(tcp::Connected, BytesMut)>,
}

/// Waits, until `deadline`, for the first bytes of either the client or
/// (when `upstream` is connected) the server. A client that speaks first
/// is detected like any other, so an HTTP client that merely connected
/// early is served as HTTP, under its header timeout and policy; only a
/// server's greeting makes the connection opaque. Neither speaking by
/// the deadline closes it, as the header read timeout closes a silent
/// HTTP client.
async fn first_words<I: AsyncRead + Unpin>(
    io: &mut I,
    upstream: Option<tcp::Connected>,
    deadline: tokio::time::Instant,
) -> io::Result<FirstWords> {
    let mut prefix = BytesMut::with_capacity(1024);
    let silent = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "neither the client nor the server spoke within the header read timeout",
        )
    };
    let Some(mut up) = upstream else {
        let protocol = read_prefix_into(io, &mut prefix, deadline, deadline).await?;
        if prefix.is_empty() {
            return Err(silent());
        }
        return Ok(FirstWords {
            prefix,
            protocol,
            upstream: None,
        });
    };
    let mut greeting = BytesMut::with_capacity(1024);
    let server_spoke = tokio::select! {
        p = read_prefix_into(io, &mut prefix, deadline, deadline) => Err(p),
        r = up.io.read_buf(&mut greeting) => Ok(r),
    };
    match server_spoke {
        Err(p) => {
            let protocol = p?;
            if prefix.is_empty() {
                return Err(silent());
            }
            let upstream = (protocol == Protocol::Opaque).then(|| (up, BytesMut::new()));
            Ok(FirstWords {
                prefix,
                protocol,
                upstream,
            })
        }
        Ok(Ok(0)) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed before anyone spoke",
        )),
        Ok(Ok(_)) => Ok(FirstWords {
            prefix,
            protocol: Protocol::Opaque,
            upstream: Some((up, greeting)),
        }),
        Ok(Err(e)) => Err(e),
    }
}
