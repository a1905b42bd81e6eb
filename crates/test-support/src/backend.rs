//! An HTTP/1.1 + HTTP/2 (prior knowledge) server with behaviours the tests
//! drive by path:
//!
//! - `/status/N`: answer with status N
//! - `/slow/MS`: answer after MS milliseconds
//! - `/count`: read the whole body as it streams, answer with its length
//! - `/echo`: stream the request body back
//! - `/bytes/N`: stream N bytes
//! - `/trailers`: a body followed by trailers (`x-trailer: yes`)
//! - `/headers`: the request headers, one `name: value` per line
//! - `/version`: the request's HTTP version (`HTTP/1.1`, `HTTP/2.0`)
//! - `/path/...`: the request's path and query as received
//! - `/upgrade`: 101 Switching Protocols to `Upgrade: echo`, then echo bytes
//! - anything else: the backend's name
//!
//! Every response carries `x-backend: <name>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// A running backend; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

/// What a backend has seen.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    /// Requests whose handling was abandoned before the response was done:
    /// how a backend sees a client's RST_STREAM or disconnect.
    pub cancelled: AtomicU64,
}

/// Counts a request as cancelled unless disarmed.
struct CancelGuard(Option<Arc<Stats>>);

impl CancelGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(stats) = self.0.take() {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Backend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with_delay(name, addr, Duration::ZERO).await
    }

    /// A backend that takes `delay` over every response: the slow replica.
    pub async fn start_with_delay(
        name: &str,
        addr: SocketAddr,
        delay: Duration,
    ) -> anyhow::Result<Self> {
        let behaviour = Behaviour {
            delay,
            fail_every: None,
            slow: None,
        };
        Self::start_with(name, addr, behaviour).await
    }

    pub async fn start_with(
        name: &str,
        addr: SocketAddr,
        behaviour: Behaviour,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(serve_with(
            listener,
            name.to_string(),
            stats.clone(),
            behaviour,
        ));
        Ok(Self {
            addr,
            name: name.to_string(),
            stats,
            task,
        })
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        self.stats.hits.load(Ordering::Relaxed)
    }

    /// Requests abandoned mid-handling (reset or disconnected).
    pub fn cancelled(&self) -> u64 {
        self.stats.cancelled.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts until the task is aborted.
pub async fn serve(listener: TcpListener, name: String) {
    serve_with(listener, name, Arc::default(), Behaviour::default()).await
}

/// How a backend misbehaves, for demos and balancing tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// Added to every response.
    pub delay: Duration,
    /// Every Nth request gets a 500.
    pub fail_every: Option<u64>,
    /// Every Nth request takes this much longer: a replica with a tail.
    pub slow: Option<(u64, Duration)>,
}

pub async fn serve_with(
    listener: TcpListener,
    name: String,
    stats: Arc<Stats>,
    behaviour: Behaviour,
) {
    let Behaviour {
        delay,
        fail_every,
        slow,
    } = behaviour;
    let name: Arc<str> = name.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let n = stats.hits.fetch_add(1, Ordering::Relaxed) + 1;
                let name = name.clone();
                let guard = CancelGuard(Some(stats.clone()));
                async move {
                    let delay = match slow {
                        Some((every, extra)) if every > 0 && n.is_multiple_of(every) => {
                            delay + extra
                        }
                        _ => delay,
                    };
                    let rsp = handle(&name, req, delay, fail_every, n).await;
                    guard.disarm();
                    rsp
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    name: &str,
    req: Request<Incoming>,
    delay: Duration,
    fail_every: Option<u64>,
    n: u64,
) -> Result<Response<Body>, Infallible> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // `/healthz` is the service's health check: the failures injected to
    // stand for application errors do not touch it.
    let injected = fail_every.is_some_and(|every| every > 0 && n.is_multiple_of(every));
    if injected && req.uri().path() != "/healthz" {
        return Ok(reply(
            name,
            StatusCode::INTERNAL_SERVER_ERROR,
            full("injected failure\n"),
        ));
    }
    Ok(respond(name, req).await)
}

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

fn reply(name: &str, status: StatusCode, body: Body) -> Response<Body> {
    let mut rsp = Response::new(body);
    *rsp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(name) {
        rsp.headers_mut().insert("x-backend", v);
    }
    rsp
}

async fn respond(name: &str, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let head = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    match head {
        "status" => {
            let status = arg
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            reply(name, status, full(format!("{status}\n")))
        }
        "slow" => {
            let ms = arg.parse().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(name, StatusCode::OK, full(name.to_string()))
        }
        "count" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                        }
                    }
                    Err(e) => return reply(name, StatusCode::BAD_REQUEST, full(format!("{e}\n"))),
                }
            }
            reply(name, StatusCode::OK, full(n.to_string()))
        }
        "path" => reply(
            name,
            StatusCode::OK,
            full(
                req.uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
            ),
        ),
        "echo" => reply(
            name,
            StatusCode::OK,
            req.into_body().map_err(BoxError::from).boxed(),
        ),
        "reset" => {
            // One chunk, a pause (so the headers and chunk are on the wire),
            // then the stream fails: HTTP/2 resets it.
            let stream = futures_util::stream::unfold(0u8, |step| async move {
                match step {
                    0 => Some((Ok(Frame::data(Bytes::from_static(b"partial"))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Err(BoxError::from("backend reset the stream")), 2))
                    }
                    _ => None,
                }
            });
            reply(name, StatusCode::OK, StreamBody::new(stream).boxed())
        }
        "bytes" => {
            let total: u64 = arg.parse().unwrap_or(0);
            const CHUNK: u64 = 64 * 1024;
            let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
            let stream = futures_util::stream::iter((0..total.div_ceil(CHUNK)).map(move |i| {
                let len = CHUNK.min(total - i * CHUNK) as usize;
                Ok::<_, BoxError>(Frame::data(chunk.slice(..len)))
            }));
            reply(name, StatusCode::OK, StreamBody::new(stream).boxed())
        }
        "trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-trailer", HeaderValue::from_static("yes"));
            let frames = vec![
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"body"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            let mut rsp = reply(name, StatusCode::OK, body);
            rsp.headers_mut()
                .insert(http::header::TRAILER, HeaderValue::from_static("x-trailer"));
            rsp
        }
        "version" => reply(name, StatusCode::OK, full(format!("{:?}", req.version()))),
        "headers" => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<binary>")));
            }
            reply(name, StatusCode::OK, full(out))
        }
        "upgrade" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut rsp = reply(name, StatusCode::SWITCHING_PROTOCOLS, full(Bytes::new()));
            rsp.headers_mut()
                .insert(http::header::UPGRADE, HeaderValue::from_static("echo"));
            rsp.headers_mut().insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            rsp
        }
        _ => {
            // Drain any body so keep-alive connections stay usable.
            let mut body = req.into_body();
            while let Some(Ok(_)) = body.frame().await {}
            reply(name, StatusCode::OK, full(name.to_string()))
        }
    }
}
