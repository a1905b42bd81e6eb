//! HTTP/1.1 and HTTP/2 proxying: serve a detected connection, route each
//! request to a target, balance it onto an endpoint, stream both ways.

mod body;
mod error;
mod headers;
mod orig_proto;
mod replay;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use weft_channel::error_chain;
use weft_detect::Authority;

pub use body::ProxyBody;
pub use error::{Audience, PROXY_ERROR_HEADER, ProxyError};
pub use replay::{ReplayBody, ReqBody};

use crate::config::Limits;
use crate::destinations::{Budget, Hedge, Policy, Retry, Route};
use crate::endpoint::{Endpoint, SendError};
use crate::metrics::{
    AuthorityLabels, Classification, Direction, Dst, LatencyLabels, Metrics, ResponseLabels,
    RouteLabels, TlsLabel,
};
use crate::route::{Router, Target};
use body::Classify;
use headers::strip_hop_by_hop;

/// Endpoints tried when connecting fails, before answering 503.
const CONNECT_ATTEMPTS: usize = 3;

/// HTTP/1 request headers at most (hyper's default, pinned).
const HTTP1_MAX_HEADERS: usize = 100;
/// HTTP/2 streams a client may reset before the server has accepted them,
/// and streams the server may reset for a client's protocol errors, before
/// the connection is closed with ENHANCE_YOUR_CALM: the rapid-reset bounds,
/// pinned rather than inherited.
const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// After GOAWAY for idleness, how often to check whether the connection
/// can be dropped: at once if no request is in flight (a client that never
/// finished its handshake included), else when the last one ends.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// How a request goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Http1,
    /// HTTP/1, or over HTTP/2 (`orig_proto`) when the endpoint picked is
    /// a meshed proxy.
    Http1Upgradable,
    Http2,
}

impl Wire {
    /// The form `prepare_uri` puts the request in: HTTP/1 until an
    /// endpoint is picked.
    fn version(self) -> HttpVersion {
        match self {
            Wire::Http1 | Wire::Http1Upgradable => HttpVersion::Http1,
            Wire::Http2 => HttpVersion::Http2,
        }
    }
}

/// Draining, an HTTP/1 connection with no request for this long is closed
/// (a busy one is closed by its next response). Long enough for a client
/// sending a request a second to be told by a response.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// What every request on one accepted connection shares.
pub struct HttpContext {
    pub direction: Direction,
    pub router: Arc<Router>,
    pub metrics: Metrics,
    pub version: HttpVersion,
    /// Outbound: the connection's original destination, when it was
    /// redirected; the authority of last resort.
    pub orig_dst: Option<SocketAddr>,
    /// Inbound: where the local application listens.
    pub inbound_target: Option<Arc<Target>>,
    /// This side's listeners: never a valid upstream.
    pub listen_addrs: ListenAddrs,
    /// Inbound: whether the client connected over mutual TLS, and as whom.
    pub client_tls: TlsLabel,
    /// Inbound: `l5d-client-id` for the application, made once per
    /// connection from `client_tls`'s proven identity.
    pub client_id: Option<http::HeaderValue>,
    pub limits: Arc<Limits>,
    /// Inbound: the metric label of each request's authority.
    pub labels: Arc<AuthorityLabels>,
    /// Per-node mode: the local workload this connection is from
    /// (outbound) or for (inbound).
    pub workload: Option<Arc<str>>,
    /// Inbound: what the policy decisions on this connection need.
    pub inbound: Option<crate::authz::InboundConn>,
    /// When tracing is on.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

/// The addresses one side of the proxy listens on (one per address
/// family, say): never a valid upstream.
#[derive(Clone, Debug)]
pub struct ListenAddrs(Arc<[SocketAddr]>);

impl ListenAddrs {
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Self(addrs.into())
    }

    /// Whether `addr` is one of them (see [`is_own_listener`]).
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.iter().any(|l| is_own_listener(*l, addr))
    }
}

/// Whether `addr` is the proxy's own listener `listen` (which may be bound
/// to a wildcard address).
pub fn is_own_listener(listen: SocketAddr, addr: SocketAddr) -> bool {
    addr.port() == listen.port()
        && (addr.ip() == listen.ip()
            || (listen.ip().is_unspecified()
                && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
}

/// Serves one client connection until it closes, or until `shutdown` asks
/// it to finish its in-flight requests and close.
pub async fn serve<I>(io: I, ctx: Arc<HttpContext>, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let version = ctx.version;
    let limits = ctx.limits.clone();
    let activity = Arc::new(Activity::new());
    let svc = {
        let activity = activity.clone();
        let draining = shutdown.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let active = activity.begin();
            // Decided as the request arrives (one atomic load, no clone per
            // request); a drain that starts mid-request closes the
            // connection at the next one, or when it idles.
            let close = version == HttpVersion::Http1 && draining.is_cancelled();
            async move {
                // Boxed: the request's future is several KiB, and hyper
                // spawns each HTTP/2 stream as a task holding it, moving
                // it by value through tokio's spawn path (measured: 13% of
                // the proxy's CPU in memcpy at h2c 16x16). A box moves as a
                // pointer.
                let mut rsp = Box::pin(ctx.handle(req)).await;
                if close && rsp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    // Draining: the client learns not to reuse the
                    // connection from the response itself, and hyper closes
                    // it once written. Closing it idle instead would race
                    // the client's next request.
                    rsp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(rsp.map(|body| body::Tracked::new(body, active)))
            }
        })
    };
    let io = TokioIo::new(io);
    let result = match version {
        HttpVersion::Http1 => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            // The header read timeout also closes idle keep-alive
            // connections: hyper starts it whenever it waits for a head.
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_headers(HTTP1_MAX_HEADERS)
                // One flat buffer and send(): a small response costs less
                // copied than gathered by writev (measured with the client
                // side's: 3.7 % less CPU per request on HTTP/1.1
                // keep-alive, the same on 1 MiB bodies).
                .writev(false)
                .max_buf_size((limits.max_header_bytes as usize).max(8192));
            // Boxed: the serving future then holds only the protocol this
            // connection speaks (measured: 1 KiB less per idle HTTP/2
            // connection than both versions' state laid out together).
            let mut conn = Box::pin(builder.serve_connection(io, svc).with_upgrades());
            // Draining, a connection in use ends with its next response
            // (`Connection: close`); one left idle for DRAIN_IDLE is closed.
            let mut draining = false;
            loop {
                let idle_at = activity.idle_deadline(DRAIN_IDLE, DRAIN_IDLE);
                tokio::select! {
                    res = conn.as_mut() => break res,
                    _ = shutdown.cancelled(), if !draining => draining = true,
                    () = tokio::time::sleep_until(idle_at), if draining => {
                        if activity.idle_deadline(DRAIN_IDLE, DRAIN_IDLE) <= tokio::time::Instant::now() {
                            conn.as_mut().graceful_shutdown();
                            break conn.as_mut().await;
                        }
                    }
                }
            }
        }
        HttpVersion::Http2 => {
            let exec = crate::local::LocalExec::default();
            let mut builder = hyper::server::conn::http2::Builder::new(exec.clone());
            // Fixed windows rather than BDP probing: no extra PING traffic
            // per connection, and memory per stream stays bounded.
            builder
                .timer(TokioTimer::new())
                .initial_stream_window_size(256 * 1024)
                .initial_connection_window_size(1024 * 1024)
                .max_concurrent_streams(limits.http2_max_concurrent_streams)
                .max_header_list_size(limits.max_header_bytes)
                .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESETS)
                .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
                .keep_alive_interval(limits.http2_keepalive_interval)
                .keep_alive_timeout(limits.http2_keepalive_timeout);
            let mut conn = crate::local::Driven::new(builder.serve_connection(io, svc), exec);
            // A connection must start a request within the header read
            // timeout, and is closed after the idle timeout without one.
            let mut closing: Option<tokio::time::Instant> = None;
            loop {
                let idle_at =
                    activity.idle_deadline(limits.header_read_timeout, limits.http2_idle_timeout);
                tokio::select! {
                    res = &mut conn => break res,
                    _ = shutdown.cancelled() => {
                        // Bounded by the process's shutdown grace.
                        conn.main().graceful_shutdown();
                        break (&mut conn).await;
                    }
                    () = tokio::time::sleep_until(idle_at), if closing.is_none() => {
                        if activity.idle_deadline(limits.header_read_timeout, limits.http2_idle_timeout) <= tokio::time::Instant::now() {
                            tracing::debug!("closing idle HTTP/2 connection");
                            conn.main().graceful_shutdown();
                            closing = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                        }
                    }
                    () = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)), if closing.is_some() => {
                        if activity.active.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                            closing = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                            continue;
                        }
                        tracing::debug!("idle HTTP/2 connection did not close by itself; dropping it");
                        break Ok(());
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        // Malformed requests land here after hyper has answered 400.
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Requests in flight on one connection, and when the last one ended, for
/// the HTTP/2 idle timeout.
#[derive(Debug)]
struct Activity {
    start: tokio::time::Instant,
    active: std::sync::atomic::AtomicUsize,
    /// Milliseconds since `start` when the connection last went idle; 0
    /// with no request yet.
    idle_since: std::sync::atomic::AtomicU64,
    seen: std::sync::atomic::AtomicBool,
}

/// One request on the connection, until its response body is done.
#[derive(Debug)]
pub struct Active(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            active: Default::default(),
            idle_since: Default::default(),
            seen: Default::default(),
        }
    }

    fn begin(self: &Arc<Self>) -> Active {
        use std::sync::atomic::Ordering::Relaxed;
        self.seen.store(true, Relaxed);
        self.active.fetch_add(1, Relaxed);
        Active(self.clone())
    }

    /// When the connection becomes closable for idleness: never while a
    /// request is in flight.
    fn idle_deadline(&self, first: Duration, idle: Duration) -> tokio::time::Instant {
        use std::sync::atomic::Ordering::Relaxed;
        let now = tokio::time::Instant::now();
        if self.active.load(Relaxed) > 0 {
            return now + idle;
        }
        if !self.seen.load(Relaxed) {
            return self.start + first;
        }
        self.start + Duration::from_millis(self.idle_since.load(Relaxed)) + idle
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.0.active.fetch_sub(1, Relaxed) == 1 {
            let ms = self.0.start.elapsed().as_millis() as u64;
            self.0.idle_since.store(ms, Relaxed);
        }
    }
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The header naming a meshed client's proven identity to the application
/// (Linkerd's).
const L5D_CLIENT_ID: &str = "l5d-client-id";

/// The `l5d-client-id` an inbound connection's requests carry: its
/// client's proven identity, if it has one.
pub fn client_id_header(tls: &TlsLabel) -> Option<http::HeaderValue> {
    match tls {
        TlsLabel::Mutual { peer_id } => http::HeaderValue::from_str(peer_id).ok(),
        _ => None,
    }
}

/// The largest body a request may declare: far beyond any upload through a
/// sidecar (1 TiB), and a bound a client cannot talk past to hold a
/// request open "until the rest arrives".
const MAX_CONTENT_LENGTH: u64 = 1 << 40;

/// The request's declared `Content-Length`, if any (hyper has checked it
/// is one valid number).
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Puts the request's path in the form routes and inbound policy judge
/// (`weft_detect::normalize_path`), and sends it on in that form, so the
/// application serves exactly the path policy allowed.
fn normalize_uri<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    // CONNECT's target is an authority, `OPTIONS *` has no path.
    if req.method() == Method::CONNECT || req.uri().path() == "*" {
        return Ok(());
    }
    let path = match weft_detect::normalize_path(req.uri().path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| weft_detect::PathError::BadEscape)?,
    );
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| weft_detect::PathError::BadEscape)?;
    Ok(())
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The authority a request names: absolute-form URI or `:authority` first,
/// then `Host`.
fn request_authority(req: &Request<Incoming>) -> Result<Option<Authority>, ProxyError> {
    let default_port = match req.uri().scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    if let Some(a) = req.uri().authority() {
        return Ok(Some(Authority::from_uri(a, default_port)?));
    }
    match req.headers().get(header::HOST) {
        Some(h) => {
            let s = h.to_str().map_err(|_| ProxyError::NoAuthority)?;
            Ok(Some(Authority::parse(s, default_port)?))
        }
        None => Ok(None),
    }
}

impl HttpContext {
    async fn target(
        &self,
        req: &Request<Incoming>,
    ) -> Result<(Arc<Target>, Option<Authority>), ProxyError> {
        let authority = request_authority(req)?;
        match self.direction {
            Direction::inbound => {
                let target = self
                    .inbound_target
                    .clone()
                    .ok_or(ProxyError::NoInboundTarget)?;
                Ok((target, authority))
            }
            Direction::outbound => {
                // A redirected connection goes where the application sent
                // it: its Host is a header, which any client can set, not
                // a routing decision. An explicit-proxy request goes by
                // its authority.
                let authority = match (self.orig_dst, authority) {
                    (Some(dst), _) => Authority::from_socket_addr(dst),
                    (None, Some(a)) => a,
                    (None, None) => return Err(ProxyError::NoAuthority),
                };
                let target = self.router.resolve(&authority).await?;
                Ok((target, Some(authority)))
            }
        }
    }

    /// Handles one request. A request whose client goes away before the
    /// response headers (the future is dropped) is still counted, as a
    /// failure with `error="cancelled"`, so success rates see it.
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let mut cancelled = Cancelled {
            ctx: self,
            counted: None,
        };
        let rsp = self.handle_inner(req, &mut cancelled).await;
        cancelled.counted = None;
        rsp
    }

    fn audience(&self) -> Audience {
        match self.direction {
            Direction::outbound => Audience::Local,
            Direction::inbound => Audience::Remote,
        }
    }

    fn label_for(&self, target: &Target, authority: Option<&Authority>) -> Arc<str> {
        match (self.direction, authority) {
            (Direction::outbound, _) | (Direction::inbound, None) => target.label.clone(),
            (Direction::inbound, Some(a)) => self.labels.label(a),
        }
    }

    async fn handle_inner(
        &self,
        mut req: Request<Incoming>,
        cancelled: &mut Cancelled<'_>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let span = self.tracer.as_ref().map(|t| {
            // Both clones are cheap: a standard method is a tag, a URI
            // shares its bytes.
            let (method, uri) = (req.method().clone(), req.uri().clone());
            t.start(req.headers_mut(), self.direction, &method, &uri)
        });
        let mut tapped =
            crate::tap::Observed::new(self.metrics.tap.start(req.method(), req.uri(), start), span);
        let routed = if req.version() <= Version::HTTP_11
            && req.headers().get_all(header::HOST).iter().nth(1).is_some()
        {
            // RFC 9112 §3.2: which Host is meant is ambiguous; answering
            // would invite request smuggling.
            Err(ProxyError::DuplicateHost)
        } else if let Err(e) = normalize_uri(&mut req) {
            Err(e)
        } else if let Some(len) = declared_length(&req)
            && len > MAX_CONTENT_LENGTH
        {
            Err(ProxyError::TooLarge(len))
        } else {
            self.target(&req).await
        };
        let (target, authority) = match routed {
            Ok(t) => t,
            Err(e) => {
                let authority: Arc<str> = match (self.direction, request_authority(&req)) {
                    (Direction::inbound, Ok(Some(a))) => self.labels.label(&a),
                    _ => "".into(),
                };
                let label = Dst {
                    authority,
                    route: default_route(),
                    workload: self.workload.clone(),
                };
                return self.fail(tapped, label, e, grpc, start, self.tls_for(None));
            }
        };
        // The policy is read once: the route it matches names the
        // request's series and decides where it goes.
        let policy = target.policy.load_full();
        let route = self.matched_route(&policy, &req);
        let authority_label = self.label_for(&target, authority.as_ref());
        let label = Dst {
            route: self.route_label(&authority_label, route, &req, grpc),
            authority: authority_label,
            workload: self.workload.clone(),
        };
        self.labels.count(&label.authority);
        self.metrics
            .request_total
            .get_or_create(&RouteLabels {
                direction: self.direction,
                dst: label.clone(),
                tls: match self.direction {
                    Direction::inbound => Some(self.client_tls.clone()),
                    Direction::outbound => None,
                },
            })
            .inc();
        cancelled.counted = Some((label.clone(), grpc));

        // Decided per request, so a policy change applies to the next one
        // on a connection already open.
        if let Some(conn) = &self.inbound
            && let Err(denied) = conn.authorize_request(
                &self.metrics,
                &self.client_tls,
                req.method(),
                req.uri().path(),
            )
        {
            return self.fail(
                tapped,
                label,
                denied.into(),
                grpc,
                start,
                self.tls_for(None),
            );
        }

        // The application may trust `l5d-client-id` as the caller's
        // proven identity: it is this proxy's to set, never the client's.
        if self.direction == Direction::inbound {
            let headers = req.headers_mut();
            headers.remove(L5D_CLIENT_ID);
            if let Some(id) = &self.client_id {
                headers.insert(L5D_CLIENT_ID, id.clone());
            }
        }
        if req.method() == Method::CONNECT && self.version == HttpVersion::Http1 {
            return Box::pin(self.tunnel(req, &target, label, start, tapped)).await;
        }

        let upgrade = is_upgrade(&req);
        // Inbound: an HTTP/1 request a meshed proxy carried over HTTP/2
        // goes to the application as HTTP/1.1 again.
        let downgraded = self.direction == Direction::inbound
            && self.version == HttpVersion::Http2
            && orig_proto::downgrade(req.headers_mut());
        let wire = match self.version {
            HttpVersion::Http2 if !downgraded => Wire::Http2,
            HttpVersion::Http1 if self.direction == Direction::outbound && !upgrade => {
                Wire::Http1Upgradable
            }
            _ => Wire::Http1,
        };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        // The proxy has already agreed to read the body (hyper sent the
        // 100 Continue); asking upstream again would only add a round trip.
        req.headers_mut().remove(header::EXPECT);
        let authority = authority.as_ref().unwrap_or(&target.authority);
        // Logical → concrete: the route the request matches decides which
        // destination's endpoints serve it, how long it may take and
        // whether it is tried again.
        let logical = target.clone();
        let Concrete {
            target,
            timeout,
            retry,
            hedge,
        } = match self.concrete(&logical, &policy, route).await {
            Ok(c) => c,
            Err(e) => return self.fail(tapped, label, e, grpc, start, self.tls_for(None)),
        };
        // A percentile needs the destination's recent latencies.
        let record_latency = matches!(hedge, Some(Hedge::Percentile(_)));
        let deadline = timeout.map(|t| (t, tokio::time::Instant::from_std(start) + t));
        if let Err(e) = self.prepare_uri(&mut req, authority, wire.version()) {
            return self.fail(tapped, label, e, grpc, start, self.tls_for(None));
        }
        let response_timeout = self.response_timeout(&req, grpc);

        // Only requests safe to repeat are retried, and they keep a copy
        // of their body (up to 64 KiB) while it streams.
        let too_big = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > replay::MAX_REPLAY);
        let repeatable = !upgrade && !too_big;
        let retry = retry.filter(|r| {
            repeatable && (is_idempotent(req.method()) || (grpc && !r.on.grpc.is_empty()))
        });
        // Hedges run two tries at once, so only requests with no body to
        // share between them are hedged.
        let hedge = hedge.filter(|_| {
            repeatable && is_idempotent(req.method()) && http_body::Body::is_end_stream(req.body())
        });
        let budget = retry.map(|r| r.budget).unwrap_or_default();
        if retry.is_some() || hedge.is_some() {
            logical.budget.deposit(Instant::now());
        }
        let hedge_after = hedge.and_then(|h| match h {
            Hedge::After(d) => Some(d),
            Hedge::Percentile(q) => logical.latency.percentile(q, Instant::now()),
        });
        let (head, body) = req.into_parts();
        // What a retry or a hedge repeats: the request's head, and the copy
        // of its body. A request that cannot be repeated copies nothing.
        let (mut head, mut body, again) = if retry.is_some() || hedge.is_some() {
            let first = ReplayBody::new(body);
            let again = first.replay().map(|copy| (copy_parts(&head), copy));
            (head, ReqBody::Replay(first), again)
        } else {
            (head, ReqBody::Stream(body), None)
        };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        let (endpoint, mut in_flight, mut rsp) = loop {
            let mut req = Request::from_parts(head, body);
            if retries > 0 {
                req.headers_mut()
                    .insert(RETRY_ATTEMPT_HEADER, http::HeaderValue::from(retries + 1));
            }
            let hedge = match (hedge_after, &again) {
                (Some(after), Some((parts, replay))) if retries == 0 => Some(HedgeWith {
                    after,
                    replay,
                    parts,
                    budget,
                    logical: &logical,
                    label: &label.authority,
                }),
                _ => None,
            };
            let outcome = match hedge {
                // Boxed: hedging is rare and its future (two attempts)
                // would otherwise more than double every request's.
                Some(h) => {
                    Box::pin(self.hedged(&target, req, h, deadline, response_timeout, wire)).await
                }
                None => {
                    self.attempt(&target, req, deadline, response_timeout, &tried, wire)
                        .await
                }
            };
            if record_latency && outcome.is_ok() {
                logical.latency.record(start.elapsed(), Instant::now());
            }
            let grpc_code = |rsp: &Response<Incoming>| {
                if grpc {
                    body::grpc_status(rsp.headers())
                } else {
                    None
                }
            };
            let worth_another = match (&outcome, retry) {
                (_, None) => false,
                (Ok((_, _, rsp)), Some(r)) => r.on.status(rsp.status().as_u16(), grpc_code(rsp)),
                (Err(f), Some(r)) => match f.kind {
                    FailKind::Connect => r.on.connect_error,
                    FailKind::Reset => r.on.reset,
                    FailKind::Final => false,
                },
            };
            let next = if worth_another
                && retry.is_some_and(|r| {
                    retries < r.attempts
                        && logical.budget.withdraw(
                            r.budget.ratio,
                            r.budget.min_per_second,
                            Instant::now(),
                        )
                }) {
                again
                    .as_ref()
                    .and_then(|(parts, replay)| Some((copy_parts(parts), replay.replay()?)))
            } else {
                None
            };
            match (outcome, next) {
                (Ok((endpoint, mut in_flight, rsp)), Some(next)) => {
                    // An answer nobody will see. A 5xx or gRPC
                    // UNAVAILABLE/INTERNAL counts against the endpoint;
                    // other retried statuses (a 429, a NOT_FOUND listed
                    // in `on`) say nothing about its health.
                    in_flight.pending.observe_response();
                    let failed = body::blames_endpoint(rsp.status().as_u16(), grpc_code(&rsp));
                    in_flight.pending.record(if failed {
                        weft_balance::Outcome::Failure
                    } else {
                        weft_balance::Outcome::Neutral
                    });
                    tracing::debug!(endpoint = %endpoint.addr, status = %rsp.status(), retries, "retrying");
                    tried.push(endpoint.addr);
                    (head, body) = (next.0, ReqBody::Replay(next.1));
                }
                (Err(f), Some(next)) => {
                    tracing::debug!(error = %f.error, retries, "retrying");
                    if let Some(e) = &f.endpoint {
                        tried.push(e.addr);
                    }
                    (head, body) = (next.0, ReqBody::Replay(next.1));
                }
                (Ok(answered), None) => break answered,
                (Err(f), None) => {
                    let tls = self.tls_for(f.endpoint.as_deref());
                    return self.fail(tapped, label, f.error, grpc, start, tls);
                }
            }
            retries += 1;
            self.metrics.retry(self.direction, &label.authority);
        };
        let tls = self.tls_for(Some(&endpoint));
        in_flight.pending.observe_response();
        let status = rsp.status();
        self.observe_latency(&label, status, start, tls.clone());

        let upgraded = status == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_side)) = (upgraded, client_upgrade) {
            let server_side = hyper::upgrade::on(&mut rsp);
            let idle = self.limits.tcp_idle_timeout;
            tokio::spawn(async move {
                match tokio::try_join!(client_side, server_side) {
                    Ok((a, b)) => {
                        let mut a = TokioIo::new(a);
                        let mut b = TokioIo::new(b);
                        if let Err(e) = crate::io::splice(&mut a, &mut b, idle).await {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
                }
            });
        }
        strip_hop_by_hop(rsp.headers_mut(), upgraded);
        if downgraded {
            orig_proto::mark_response(&mut rsp);
        }

        let labels = ResponseLabels {
            direction: self.direction,
            dst: label,
            status_code: Some(status.as_u16()),
            classification: Classification::success,
            grpc_status_code: None,
            error: None,
            tls,
        };
        tapped.upstream(endpoint.addr, retries, rsp.headers());
        let classify = Classify::new(
            self.metrics.response_total.clone(),
            labels,
            grpc,
            rsp.headers(),
            Some(in_flight),
            tapped,
        );
        rsp.map(|b| ProxyBody::upstream(b, classify))
    }

    /// One try: pick an endpoint (not one already tried, when there is
    /// another), connect (a refused or timed-out connect goes to another
    /// endpoint, since nothing was sent), send, and wait for the response
    /// headers within the deadline and the response timeout.
    async fn attempt(
        &self,
        target: &Target,
        mut req: Request<ReqBody>,
        deadline: Deadline,
        response_timeout: Option<Duration>,
        tried: &[SocketAddr],
        wire: Wire,
    ) -> Result<(Arc<Endpoint>, crate::endpoint::InFlight, Response<Incoming>), Failed> {
        let timed_out = |endpoint: Option<Arc<Endpoint>>| Failed {
            error: ProxyError::Timeout(deadline.map(|(t, _)| t).unwrap_or_default()),
            endpoint,
            kind: FailKind::Final,
        };
        let attempts = CONNECT_ATTEMPTS.min(target.len().max(1));
        let mut avoid = tried.to_vec();
        let mut attempt = 0;
        let (endpoint, mut in_flight, sender, upgraded) = loop {
            attempt += 1;
            let Some((endpoint, load)) = target.pick_excluding(&avoid) else {
                return Err(Failed {
                    error: ProxyError::NoEndpoints(target.authority.to_string()),
                    endpoint: None,
                    kind: FailKind::Final,
                });
            };
            if self.listen_addrs.contains(endpoint.addr) {
                return Err(Failed {
                    error: ProxyError::Loop(endpoint.addr),
                    endpoint: Some(endpoint),
                    kind: FailKind::Final,
                });
            }
            let Some(reserved) = within(deadline, endpoint.reserve(&load)).await else {
                return Err(timed_out(Some(endpoint)));
            };
            let in_flight = match reserved {
                Ok(f) => f,
                Err(e) => {
                    return Err(Failed {
                        error: ProxyError::Saturated {
                            addr: endpoint.addr,
                            in_flight: e.in_flight,
                            waited: e.waited,
                        },
                        endpoint: Some(endpoint),
                        kind: FailKind::Final,
                    });
                }
            };
            // Decided per endpoint: an HTTP/1 request to a meshed proxy
            // rides its HTTP/2 connection.
            let upgrade_to = match wire {
                Wire::Http1Upgradable if endpoint.upgrade_http1 => orig_proto::h2_uri(&req),
                _ => None,
            };
            let connect = async {
                if wire == Wire::Http2 || upgrade_to.is_some() {
                    endpoint.http2().await
                } else {
                    endpoint.http1().await
                }
            };
            let Some(connected) = within(deadline, connect).await else {
                return Err(timed_out(Some(endpoint)));
            };
            match connected {
                Ok(sender) => break (endpoint, in_flight, sender, upgrade_to),
                Err(e) => {
                    let mut in_flight = in_flight;
                    in_flight.pending.observe_failure();
                    tracing::debug!(endpoint = %endpoint.addr, attempt, error = %e, "connect failed");
                    avoid.push(endpoint.addr);
                    if attempt >= attempts {
                        return Err(Failed {
                            error: ProxyError::Connect(error_chain(&e)),
                            endpoint: Some(endpoint),
                            kind: FailKind::Connect,
                        });
                    }
                }
            }
        };
        // The deadline: dropping the send on expiry cancels the upstream
        // request (stream reset, or the HTTP/1 connection closed).
        let upgraded = match upgraded {
            Some(uri) => {
                orig_proto::upgrade(&mut req, uri);
                true
            }
            None => false,
        };
        // One timer for whichever comes first, the request's deadline or
        // the response timeout (one future, not one nested in the other).
        let response_at = response_timeout.map(|t| (t, tokio::time::Instant::now() + t));
        let (first, response_first) = earliest(deadline, response_at);
        let Some(sent) = within(first, endpoint.send(sender, req)).await else {
            if let (true, Some((t, _))) = (response_first, response_at) {
                let error = ProxyError::ResponseTimeout {
                    addr: endpoint.addr,
                    timeout: t,
                };
                tracing::info!(%error, "response timed out");
                // `in_flight` drops unanswered: the endpoint's load
                // counts the timeout as a failure.
                return Err(Failed {
                    error,
                    endpoint: Some(endpoint),
                    kind: FailKind::Final,
                });
            }
            tracing::debug!(endpoint = %endpoint.addr, "request timed out");
            return Err(timed_out(Some(endpoint)));
        };
        match sent {
            Ok(mut rsp) => {
                if upgraded {
                    orig_proto::restore_response(&mut rsp);
                }
                Ok((endpoint, in_flight, rsp))
            }
            Err(e) => {
                let (error, kind) = match &e {
                    SendError::Connect(c) => {
                        (ProxyError::Connect(error_chain(c)), FailKind::Connect)
                    }
                    // The client's own body failed (bad chunking, cut
                    // short): the client's fault, not the upstream's, and
                    // not held against the endpoint.
                    SendError::Request(r) if r.is_user() => {
                        in_flight.pending.observe_response();
                        (ProxyError::ClientBody(error_chain(r)), FailKind::Final)
                    }
                    SendError::Request(r) => (
                        ProxyError::Upstream {
                            addr: endpoint.addr,
                            reason: error_chain(r),
                        },
                        FailKind::Reset,
                    ),
                };
                tracing::debug!(%error, "request failed");
                Err(Failed {
                    error,
                    endpoint: Some(endpoint),
                    kind,
                })
            }
        }
    }

    /// The first try, and after `after` without an answer an identical
    /// second one (to another endpoint, by the balancer's choice: the
    /// first is in flight there); the first answer wins and the other is
    /// cancelled (dropped). A failure of one waits for the other.
    async fn hedged(
        &self,
        target: &Target,
        req: Request<ReqBody>,
        h: HedgeWith<'_>,
        deadline: Deadline,
        response_timeout: Option<Duration>,
        wire: Wire,
    ) -> Result<(Arc<Endpoint>, crate::endpoint::InFlight, Response<Incoming>), Failed> {
        let first = self.attempt(target, req, deadline, response_timeout, &[], wire);
        tokio::pin!(first);
        tokio::select! {
            r = &mut first => return r,
            () = tokio::time::sleep(h.after) => {}
        }
        let allowed =
            h.logical
                .budget
                .withdraw(h.budget.ratio, h.budget.min_per_second, Instant::now());
        let Some(body) = h.replay.replay().filter(|_| allowed) else {
            return first.await;
        };
        self.metrics.hedge(self.direction, h.label);
        let mut req = Request::from_parts(copy_parts(h.parts), ReqBody::Replay(body));
        req.headers_mut()
            .insert(RETRY_ATTEMPT_HEADER, http::HeaderValue::from(2u32));
        let second = self.attempt(target, req, deadline, response_timeout, &[], wire);
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => match r {
                Ok(answered) => Ok(answered),
                Err(_) => second.await,
            },
            r = &mut second => match r {
                Ok(answered) => Ok(answered),
                Err(_) => first.await,
            },
        }
    }

    /// The route an outbound request matches, when its destination has
    /// routes (the first whose match holds).
    fn matched_route<'p>(&self, policy: &'p Policy, req: &Request<Incoming>) -> Option<&'p Route> {
        if self.direction != Direction::outbound || policy.routes.is_empty() {
            return None;
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        policy.routes.iter().find(|r| {
            r.matches
                .matches(req.method().as_str(), req.uri().path(), header)
        })
    }

    /// The route label: the matched route's name, a gRPC call's method
    /// (bounded per destination), else `default`.
    fn route_label(
        &self,
        authority: &Arc<str>,
        route: Option<&Route>,
        req: &Request<Incoming>,
        grpc: bool,
    ) -> Arc<str> {
        match route {
            Some(r) => r.name.clone(),
            None if grpc => self.labels.grpc_method(authority, req.uri().path()),
            None => default_route(),
        }
    }

    /// Logical → concrete. A destination without routes serves requests
    /// from its own endpoints; otherwise the matched route picks a backend
    /// by weight, a destination resolved like any other name (no match:
    /// 404). Also returns the timeout, retry and hedging in force (the
    /// route's, else the destination's).
    async fn concrete<'p>(
        &self,
        logical: &Arc<Target>,
        policy: &'p Policy,
        route: Option<&'p Route>,
    ) -> Result<Concrete<'p>, ProxyError> {
        if policy.routes.is_empty() || self.direction != Direction::outbound {
            return Ok(Concrete {
                target: logical.clone(),
                timeout: policy.timeout,
                retry: policy.retry.as_ref(),
                hedge: policy.hedge,
            });
        }
        let no_route = || ProxyError::NoRoute(logical.authority.to_string());
        let route = route.ok_or_else(no_route)?;
        let backend = route.pick_backend().ok_or_else(no_route)?;
        let target = if backend.destination == logical.authority {
            logical.clone()
        } else {
            self.router.resolve(&backend.destination).await?
        };
        Ok(Concrete {
            target,
            timeout: route.timeout.or(policy.timeout),
            retry: route.retry.as_ref().or(policy.retry.as_ref()),
            hedge: route.hedge.or(policy.hedge),
        })
    }

    /// How long the upstream may take to send response headers: on
    /// inbound, the configured bound for the application, or a gRPC
    /// request's own `grpc-timeout` (a stream may rightly send its headers
    /// only with its first message); outbound, unbounded here (routes will
    /// set timeouts).
    fn response_timeout(&self, req: &Request<Incoming>, grpc: bool) -> Option<Duration> {
        if self.direction != Direction::inbound {
            return None;
        }
        // gRPC is HTTP/2: an HTTP/1.1 request saying `application/grpc` is
        // bounded like any other.
        if grpc && req.version() == Version::HTTP_2 {
            return req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
                .map(|t| t + Duration::from_secs(1));
        }
        Some(self.limits.inbound_response_timeout)
    }

    /// HTTP/1.1 upstream requests go in origin form with a `Host` header;
    /// HTTP/2 ones need a scheme and `:authority`.
    fn prepare_uri(
        &self,
        req: &mut Request<Incoming>,
        authority: &Authority,
        version: HttpVersion,
    ) -> Result<(), ProxyError> {
        match version {
            HttpVersion::Http1 => {
                // An absolute-form target names the authority, and Host
                // must say the same (RFC 9112 §3.2.2): the upstream sees
                // what the proxy routed by.
                if let Some(a) = req.uri().authority() {
                    let host = http::HeaderValue::from_str(a.as_str())
                        .map_err(|_| ProxyError::NoAuthority)?;
                    req.headers_mut().insert(header::HOST, host);
                } else if !req.headers().contains_key(header::HOST) {
                    let host = http::HeaderValue::from_str(&authority.to_string())
                        .map_err(|_| ProxyError::NoAuthority)?;
                    req.headers_mut().insert(header::HOST, host);
                }
                if req.uri().scheme().is_some() || req.uri().authority().is_some() {
                    let origin = req
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                    *req.uri_mut() = Uri::from(origin);
                }
                *req.version_mut() = Version::HTTP_11;
            }
            HttpVersion::Http2 => {
                // `:authority` is what was routed by; a `host` header that
                // might disagree with it is not passed on.
                if req.uri().authority().is_some() {
                    req.headers_mut().remove(header::HOST);
                }
                if req.uri().scheme().is_none() || req.uri().authority().is_none() {
                    let mut parts = req.uri().clone().into_parts();
                    parts.scheme = Some(http::uri::Scheme::HTTP);
                    parts.authority = Some(
                        http::uri::Authority::try_from(authority.to_string())
                            .map_err(|_| ProxyError::NoAuthority)?,
                    );
                    if parts.path_and_query.is_none() {
                        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
                    }
                    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::NoAuthority)?;
                }
                *req.version_mut() = Version::HTTP_2;
            }
        }
        Ok(())
    }

    /// `CONNECT host:port` in explicit proxy mode: pick an endpoint, connect,
    /// answer 200 and relay bytes.
    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        target: &Target,
        label: Dst,
        start: Instant,
        tapped: crate::tap::Observed,
    ) -> Response<ProxyBody> {
        let crate::tcp::Connected {
            endpoint,
            pending,
            io: upstream,
        } = match crate::tcp::connect(target, Some(&self.listen_addrs)).await {
            Ok(c) => c,
            Err(failed) => {
                let (e, endpoint) = match failed {
                    crate::tcp::ConnectFailed::NoEndpoints => {
                        (ProxyError::NoEndpoints(target.authority.to_string()), None)
                    }
                    crate::tcp::ConnectFailed::Loop(addr) => (ProxyError::Loop(addr), None),
                    crate::tcp::ConnectFailed::Connect(endpoint, reason) => {
                        (ProxyError::Connect(reason), Some(endpoint))
                    }
                };
                let tls = self.tls_for(endpoint.as_deref());
                return self.fail(tapped, label, e, false, start, tls);
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let idle = self.limits.tcp_idle_timeout;
        tokio::spawn(async move {
            // In flight for the balancer until the tunnel closes.
            let _pending = pending;
            match on_upgrade.await {
                Ok(client) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = upstream;
                    if let Err(e) = crate::io::splice(&mut client, &mut upstream, idle).await {
                        tracing::debug!(error = %e, "CONNECT tunnel ended");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        let tls = self.tls_for(Some(&endpoint));
        self.observe_latency(&label, StatusCode::OK, start, tls.clone());
        self.count_response(
            tapped,
            ResponseLabels {
                direction: self.direction,
                dst: label,
                status_code: Some(StatusCode::OK.as_u16()),
                classification: Classification::success,
                grpc_status_code: None,
                error: None,
                tls,
            },
        );
        Response::new(ProxyBody::Full(Default::default()))
    }

    /// The TLS labels of a request: the client's on inbound, the chosen
    /// endpoint's on outbound (plaintext until one is chosen).
    fn tls_for(&self, endpoint: Option<&Endpoint>) -> TlsLabel {
        match (self.direction, endpoint) {
            (Direction::inbound, _) => self.client_tls.clone(),
            (Direction::outbound, Some(e)) => e.tls_label.clone(),
            (Direction::outbound, None) => TlsLabel::Plain,
        }
    }

    fn fail(
        &self,
        tapped: crate::tap::Observed,
        label: Dst,
        err: ProxyError,
        grpc: bool,
        start: Instant,
        tls: TlsLabel,
    ) -> Response<ProxyBody> {
        let mut rsp = err.to_response(grpc, self.audience());
        if rsp.status() == StatusCode::BAD_REQUEST && self.version == HttpVersion::Http1 {
            // After a malformed request the connection's state is suspect:
            // answer, then close it.
            rsp.headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        self.observe_latency(&label, rsp.status(), start, tls.clone());
        self.count_response(
            tapped,
            ResponseLabels {
                direction: self.direction,
                dst: label,
                status_code: Some(rsp.status().as_u16()),
                classification: Classification::failure,
                grpc_status_code: grpc.then(|| err.grpc_status()),
                error: Some(err.kind()),
                tls,
            },
        );
        rsp
    }

    fn observe_latency(&self, label: &Dst, status: StatusCode, start: Instant, tls: TlsLabel) {
        self.metrics
            .response_latency_ms
            .get_or_create(&LatencyLabels {
                direction: self.direction,
                dst: label.clone(),
                status_code: status.as_u16(),
                tls,
            })
            .observe(start.elapsed().as_secs_f64() * 1000.0);
    }

    /// Counts a response the proxy answered itself (streamed responses are
    /// counted by their body when it ends), and publishes it to the tap.
    fn count_response(&self, tapped: crate::tap::Observed, labels: ResponseLabels) {
        tapped.finish(&labels);
        self.metrics.response_total.get_or_create(&labels).inc();
    }
}

/// Counts a request whose client went away before the response headers.
struct Cancelled<'a> {
    ctx: &'a HttpContext,
    /// The request's label once it was counted in `request_total`.
    counted: Option<(Dst, bool)>,
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        let Some((label, grpc)) = self.counted.take() else {
            return;
        };
        self.ctx.count_response(
            crate::tap::Observed::default(),
            ResponseLabels {
                direction: self.ctx.direction,
                dst: label,
                status_code: None,
                classification: Classification::failure,
                // CANCELLED, as a gRPC client would see it.
                grpc_status_code: grpc.then_some(1),
                error: Some("cancelled"),
                tls: self.ctx.tls_for(None),
            },
        );
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
/// The route label of requests no route or gRPC method names.
fn default_route() -> Arc<str> {
    static DEFAULT: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| "default".into()).clone()
}

/// Where a request goes once its route is chosen.
struct Concrete<'p> {
    target: Arc<Target>,
    timeout: Option<Duration>,
    retry: Option<&'p Retry>,
    hedge: Option<Hedge>,
}

/// What a hedge needs besides the first try.
struct HedgeWith<'a> {
    after: Duration,
    replay: &'a ReplayBody,
    parts: &'a http::request::Parts,
    budget: Budget,
    logical: &'a Target,
    label: &'a str,
}

/// Why an attempt produced no response, and whether trying again could
/// help.
struct Failed {
    error: ProxyError,
    endpoint: Option<Arc<Endpoint>>,
    kind: FailKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FailKind {
    /// Nothing was sent: the connect failed.
    Connect,
    /// The connection or stream broke before the response headers.
    Reset,
    /// Another try would fail the same way (or must not be made).
    Final,
}

/// Tells the server which try it sees (2 for the first retry).
const RETRY_ATTEMPT_HEADER: &str = "l5d-retry-attempt";

/// Methods RFC 9110 §9.2.2 says may be repeated.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The parts of a request for another try (extensions are not copied:
/// nothing upstream reads them).
fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// A timeout and when it expires, if there is one.
type Deadline = Option<(Duration, tokio::time::Instant)>;

/// The request's deadline or the response timeout, whichever expires
/// first (the deadline on a tie), and whether that is the response
/// timeout.
fn earliest(deadline: Deadline, response: Deadline) -> (Deadline, bool) {
    match (deadline, response) {
        (Some(d), Some(r)) if r.1 < d.1 => (Some(r), true),
        (Some(d), _) => (Some(d), false),
        (None, r) => (r, r.is_some()),
    }
}

/// Runs `f` until `deadline` (`None` when it passed first); no deadline,
/// no bound. Not an `async fn`: that would hold `f` twice (as its argument
/// and inside the timeout it awaits), and every request's future moves
/// whole through several of these.
fn within<F: std::future::Future>(
    deadline: Deadline,
    f: F,
) -> impl std::future::Future<Output = Option<F::Output>> {
    use futures_util::FutureExt;
    use futures_util::future::Either;
    match deadline {
        Some((_, at)) => Either::Left(tokio::time::timeout_at(at, f).map(Result::ok)),
        None => Either::Right(f.map(Some)),
    }
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn the_earliest_timeout_is_the_one_awaited_and_reported() {
        let now = tokio::time::Instant::now();
        let at = |ms: u64| Some((Duration::from_millis(ms), now + Duration::from_millis(ms)));
        assert_eq!(earliest(None, None), (None, false));
        assert_eq!(earliest(at(5), None), (at(5), false));
        assert_eq!(earliest(None, at(7)), (at(7), true));
        assert_eq!(earliest(at(5), at(7)), (at(5), false));
        assert_eq!(earliest(at(9), at(7)), (at(7), true));
        assert_eq!(earliest(at(7), at(7)), (at(7), false));
    }

    #[tokio::test]
    async fn within_bounds_a_future_only_when_given_a_deadline() {
        let never = std::future::pending::<()>;
        let soon = Some((
            Duration::from_millis(10),
            tokio::time::Instant::now() + Duration::from_millis(10),
        ));
        assert_eq!(within(soon, never()).await, None);
        assert_eq!(within(soon, async { 3 }).await, Some(3));
        assert_eq!(within(None, async { 4 }).await, Some(4));
        let unbounded = tokio::time::timeout(Duration::from_millis(50), within(None, never()));
        assert!(unbounded.await.is_err(), "no deadline, no bound");
    }
}
