//! HTTP/1.1 and HTTP/2 proxying: serve a detected connection, route each
//! request to a target, balance it onto an endpoint, stream both ways.

mod body;
mod error;
mod headers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use weft_detect::Authority;

pub use body::ProxyBody;
pub use error::{PROXY_ERROR_HEADER, ProxyError};

use crate::endpoint::{Endpoint, SendError};
use crate::metrics::{
    Classification, Direction, LatencyLabels, Metrics, ResponseLabels, RouteLabels, TlsLabel,
};
use crate::route::{Router, Target};
use body::Classify;
use headers::strip_hop_by_hop;

/// Endpoints tried when connecting fails, before answering 503.
const CONNECT_ATTEMPTS: usize = 3;

/// A client that sends no request head within this long is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

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
    /// The listener this connection arrived on: never a valid upstream.
    pub listen_addr: SocketAddr,
    /// Inbound: whether the client connected over mutual TLS, and as whom.
    pub client_tls: TlsLabel,
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
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let io = TokioIo::new(io);
    let result = match version {
        HttpVersion::Http1 => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => res,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        HttpVersion::Http2 => {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            // Fixed windows rather than BDP probing: no extra PING traffic
            // per connection, and memory per stream stays bounded.
            builder
                .timer(TokioTimer::new())
                .initial_stream_window_size(256 * 1024)
                .initial_connection_window_size(1024 * 1024);
            let conn = builder.serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => res,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        // Malformed requests land here after hyper has answered 400.
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
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
                let authority = match (authority, self.orig_dst) {
                    (Some(a), _) => a,
                    (None, Some(dst)) => Authority::from_socket_addr(dst),
                    (None, None) => return Err(ProxyError::NoAuthority),
                };
                let target = self.router.resolve(&authority).await?;
                Ok((target, Some(authority)))
            }
        }
    }

    async fn handle(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let tapped = self.metrics.tap.start(req.method(), req.uri(), start);
        let (target, authority) = match self.target(&req).await {
            Ok(t) => t,
            Err(e) => {
                let label: Arc<str> = match request_authority(&req) {
                    Ok(Some(a)) => a.to_string().into(),
                    _ => "".into(),
                };
                return self.fail(tapped, label, e, grpc, start, self.tls_for(None));
            }
        };
        let label: Arc<str> = match (self.direction, &authority) {
            (Direction::outbound, _) | (Direction::inbound, None) => target.label.clone(),
            (Direction::inbound, Some(a)) => a.to_string().into(),
        };
        self.metrics
            .request_total
            .get_or_create(&RouteLabels {
                direction: self.direction,
                authority: label.clone(),
                tls: match self.direction {
                    Direction::inbound => Some(self.client_tls.clone()),
                    Direction::outbound => None,
                },
            })
            .inc();

        if req.method() == Method::CONNECT && self.version == HttpVersion::Http1 {
            return Box::pin(self.tunnel(req, &target, label, start, tapped)).await;
        }

        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        // The proxy has already agreed to read the body (hyper sent the
        // 100 Continue); asking upstream again would only add a round trip.
        req.headers_mut().remove(header::EXPECT);
        let authority = authority.as_ref().unwrap_or(&target.authority);
        if let Err(e) = self.prepare_uri(&mut req, authority) {
            return self.fail(tapped, label, e, grpc, start, self.tls_for(None));
        }

        // Connect before committing the request: a refused or timed-out
        // connect is retried on another endpoint, since nothing was sent.
        let attempts = CONNECT_ATTEMPTS.min(target.len().max(1));
        let mut attempt = 0;
        let (endpoint, mut pending, sender) = loop {
            attempt += 1;
            let Some((endpoint, load)) = target.pick() else {
                let e = ProxyError::NoEndpoints(target.authority.to_string());
                return self.fail(tapped, label, e, grpc, start, self.tls_for(None));
            };
            if is_own_listener(self.listen_addr, endpoint.addr) {
                return self.fail(
                    tapped,
                    label,
                    ProxyError::Loop(endpoint.addr),
                    grpc,
                    start,
                    self.tls_for(Some(&endpoint)),
                );
            }
            let mut pending = load.start();
            let connected = match self.version {
                HttpVersion::Http1 => endpoint.http1().await,
                HttpVersion::Http2 => endpoint.http2().await,
            };
            match connected {
                Ok(sender) => break (endpoint, pending, sender),
                Err(e) => {
                    pending.observe_failure();
                    tracing::debug!(endpoint = %endpoint.addr, attempt, error = %e, "connect failed");
                    if attempt >= attempts {
                        return self.fail(
                            tapped,
                            label,
                            ProxyError::Connect(error_chain(&e)),
                            grpc,
                            start,
                            self.tls_for(Some(&endpoint)),
                        );
                    }
                }
            }
        };

        let tls = self.tls_for(Some(&endpoint));
        let mut rsp = match endpoint.send(sender, req).await {
            Ok(rsp) => rsp,
            Err(e) => {
                let err = match &e {
                    SendError::Connect(c) => ProxyError::Connect(error_chain(c)),
                    SendError::Request(r) => ProxyError::Upstream {
                        addr: endpoint.addr,
                        reason: error_chain(r),
                    },
                };
                tracing::debug!(error = %err, "request failed");
                return self.fail(tapped, label, err, grpc, start, tls);
            }
        };
        pending.observe_response();
        let status = rsp.status();
        self.observe_latency(&label, status, start, tls.clone());

        let upgraded = status == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_side)) = (upgraded, client_upgrade) {
            let server_side = hyper::upgrade::on(&mut rsp);
            tokio::spawn(async move {
                match tokio::try_join!(client_side, server_side) {
                    Ok((a, b)) => {
                        let mut a = TokioIo::new(a);
                        let mut b = TokioIo::new(b);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                            tracing::debug!(error = %e, "upgraded connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
                }
            });
        }
        strip_hop_by_hop(rsp.headers_mut(), upgraded);

        let labels = ResponseLabels {
            direction: self.direction,
            authority: label,
            status_code: status.as_u16(),
            classification: Classification::success,
            grpc_status_code: None,
            error: None,
            tls,
        };
        let classify = Classify::new(
            self.metrics.response_total.clone(),
            labels,
            grpc,
            rsp.headers(),
            Some(pending),
            tapped,
        );
        rsp.map(|b| ProxyBody::Upstream(b, Some(classify)))
    }

    /// HTTP/1.1 upstream requests go in origin form with a `Host` header;
    /// HTTP/2 ones need a scheme and `:authority`.
    fn prepare_uri(
        &self,
        req: &mut Request<Incoming>,
        authority: &Authority,
    ) -> Result<(), ProxyError> {
        match self.version {
            HttpVersion::Http1 => {
                if !req.headers().contains_key(header::HOST) {
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
        label: Arc<str>,
        start: Instant,
        tapped: Option<Box<crate::tap::Tapped>>,
    ) -> Response<ProxyBody> {
        let Some((endpoint, load)) = target.pick() else {
            let e = ProxyError::NoEndpoints(target.authority.to_string());
            return self.fail(tapped, label, e, false, start, self.tls_for(None));
        };
        if is_own_listener(self.listen_addr, endpoint.addr) {
            return self.fail(
                tapped,
                label,
                ProxyError::Loop(endpoint.addr),
                false,
                start,
                self.tls_for(Some(&endpoint)),
            );
        }
        let upstream = match endpoint.connector.connect().await {
            Ok(io) => io,
            Err(e) => {
                return self.fail(
                    tapped,
                    label,
                    ProxyError::Connect(error_chain(&e)),
                    false,
                    start,
                    self.tls_for(Some(&endpoint)),
                );
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _pending = load.start();
            match on_upgrade.await {
                Ok(client) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = upstream;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
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
                authority: label,
                status_code: StatusCode::OK.as_u16(),
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
        tapped: Option<Box<crate::tap::Tapped>>,
        label: Arc<str>,
        err: ProxyError,
        grpc: bool,
        start: Instant,
        tls: TlsLabel,
    ) -> Response<ProxyBody> {
        let mut rsp = err.to_response(grpc);
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
                authority: label,
                status_code: rsp.status().as_u16(),
                classification: Classification::failure,
                grpc_status_code: grpc.then(|| err.grpc_status()),
                error: Some(err.kind()),
                tls,
            },
        );
        rsp
    }

    fn observe_latency(&self, label: &Arc<str>, status: StatusCode, start: Instant, tls: TlsLabel) {
        self.metrics
            .response_latency_ms
            .get_or_create(&LatencyLabels {
                direction: self.direction,
                authority: label.clone(),
                status_code: status.as_u16(),
                tls,
            })
            .observe(start.elapsed().as_secs_f64() * 1000.0);
    }

    /// Counts a response the proxy answered itself (streamed responses are
    /// counted by their body when it ends), and publishes it to the tap.
    fn count_response(&self, tapped: Option<Box<crate::tap::Tapped>>, labels: ResponseLabels) {
        if let Some(t) = tapped {
            t.finish(&labels);
        }
        self.metrics.response_total.get_or_create(&labels).inc();
    }
}
