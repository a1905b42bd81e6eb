//! The admin server: metrics, readiness, liveness, a config dump and the
//! live request tap.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Admin connections open at once, at most.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a request head (or the wait for the next one) may take.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
use crate::metrics::Metrics;
use crate::tap::{Listener, Next};

pub struct Admin {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    pub config: Config,
    /// With an identity, the proxy is ready only once it is certified.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Per-node mode: ready once every workload is certified too.
    pub workloads: Arc<crate::workload::Workloads>,
    pub process: ProcessInfo,
}

/// Which process answers, so an operator can see an upgrade happen.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    /// RFC 3339, UTC.
    pub started: String,
    pub version: &'static str,
    /// The process this one took the listeners over from (SIGUSR2).
    pub upgraded_from: Option<u32>,
}

impl ProcessInfo {
    pub fn now(upgraded_from: Option<u32>) -> Self {
        Self {
            pid: std::process::id(),
            started: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            version: env!("CARGO_PKG_VERSION"),
            upgraded_from,
        }
    }
}

/// `/env.json`: the process, then the configuration's keys.
#[derive(serde::Serialize)]
struct Env<'a> {
    #[serde(flatten)]
    process: &'a ProcessInfo,
    #[serde(flatten)]
    config: &'a Config,
}

type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AdminBody> {
    let mut rsp = Response::new(Full::new(body.into()).boxed_unsync());
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    rsp
}

/// Streams one JSON line per completed request until the client goes
/// away; a line `{"lost":N}` says N events were dropped because the client
/// read too slowly.
fn tap(listener: Listener) -> Response<AdminBody> {
    let lines = futures_util::stream::unfold(listener, |mut listener| async move {
        let line = match listener.next().await? {
            Next::Event(e) => {
                let mut line = serde_json::to_vec(&*e).ok()?;
                line.push(b'\n');
                line
            }
            Next::Lost(n) => format!("{{\"lost\":{n}}}\n").into_bytes(),
        };
        Some((Ok(Frame::data(Bytes::from(line))), listener))
    });
    let mut rsp = Response::new(StreamBody::new(lines).boxed_unsync());
    rsp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    rsp
}

impl Admin {
    fn handle(&self, req: &Request<Incoming>) -> Response<AdminBody> {
        const PLAIN: &str = "text/plain; charset=utf-8";
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET and HEAD\n");
        }
        match req.uri().path() {
            "/metrics" => match self.metrics.encode() {
                Ok(body) => text(StatusCode::OK, crate::metrics::CONTENT_TYPE, body),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    "cannot encode metrics\n",
                ),
            },
            "/ready" => {
                let certified =
                    self.tls.as_ref().is_none_or(|t| t.has_cert()) && self.workloads.certified();
                if !certified {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        PLAIN,
                        "not ready: no certificate yet\n",
                    )
                } else if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, PLAIN, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready\n")
                }
            }
            "/live" => text(StatusCode::OK, PLAIN, "live\n"),
            "/tap" => tap(self.metrics.tap.listen()),
            "/env.json" => match serde_json::to_vec_pretty(&Env {
                process: &self.process,
                config: &self.config,
            }) {
                Ok(body) => text(StatusCode::OK, "application/json", body),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    "cannot encode config\n",
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                PLAIN,
                "not found; try /metrics, /ready, /live, /env.json or /tap\n",
            ),
        }
    }

    /// Serves the admin port: at most [`MAX_CONNECTIONS`] at once (a
    /// scraper, a few CLIs and their taps), each closed if a request head
    /// takes longer than [`HEADER_TIMEOUT`], so nothing a peer does holds
    /// more than that many sockets, or holds them silently.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let mut listener = weft_listener::Listener::new(listener, "admin", MAX_CONNECTIONS);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept(|| {}) => a,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let _permit = accepted.permit;
                let svc = service_fn(move |req| {
                    let rsp = admin.handle(&req);
                    async move { Ok::<_, Infallible>(rsp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(accepted.stream), svc)
                    .await;
            });
        }
    }
}
