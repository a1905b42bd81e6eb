//! The demo's front end: an HTTP/1.1 service that, for every request,
//! calls the HTTP service `api.demo:8080` and the gRPC service
//! `health.demo:9090` through its own proxy, the way a meshed application
//! does, and fails (502) when either dependency fails. Like an
//! instrumented application, it passes its request's trace context on to
//! both calls, so a request's spans form one trace.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use weft_test_support::{client, grpc};

pub(crate) const WEB: &str = "web.demo:8080";
pub(crate) const API: &str = "api.demo:8080";
pub(crate) const HEALTH: &str = "health.demo:9090";

struct Deps {
    /// The local proxy's outbound listener.
    proxy: SocketAddr,
    /// One multiplexed connection to the proxy, replaced after a failure.
    api: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
    health: tonic::transport::Channel,
}

pub(crate) struct Web {
    task: JoinHandle<()>,
}

impl Drop for Web {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the front end on `listener`; its outbound calls go to `proxy`.
/// The listener is bound first because the proxy in front of the front end
/// must know its address before the front end can know the proxy's.
pub(crate) async fn start(listener: TcpListener, proxy: SocketAddr) -> anyhow::Result<Web> {
    let deps = Arc::new(Deps {
        proxy,
        api: Mutex::new(None),
        health: grpc::channel_via(proxy, HEALTH).await?,
    });
    let task = tokio::spawn(crate::serve::http1(
        listener,
        1024,
        "demo web",
        move |req| {
            let deps = deps.clone();
            async move { handle(&deps, req).await }
        },
    ));
    Ok(Web { task })
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp
}

/// The headers that carry a trace context (W3C and B3).
const TRACE_HEADERS: [&str; 7] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

async fn handle(deps: &Deps, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let mut context = http::HeaderMap::new();
    for name in TRACE_HEADERS {
        if let Some(v) = req.headers().get(name) {
            context.insert(name, v.clone());
        }
    }
    let (api, health) = tokio::join!(
        call_api(deps, &path, &context),
        grpc::check_with(&deps.health, grpc::SERVING, &context)
    );
    match (api, health) {
        (Ok(()), Ok(_)) => reply(StatusCode::OK, "web: api and health answered\n".into()),
        (Err(e), _) => reply(StatusCode::BAD_GATEWAY, format!("web: {API}: {e:#}\n")),
        (_, Err(status)) => reply(
            StatusCode::BAD_GATEWAY,
            format!("web: {HEALTH}: {}\n", status.message()),
        ),
    }
}

async fn call_api(deps: &Deps, path: &str, context: &http::HeaderMap) -> anyhow::Result<()> {
    let mut send = {
        let mut slot = deps.api.lock().await;
        match slot.as_ref().filter(|s| !s.is_closed()) {
            Some(s) => s.clone(),
            None => {
                let s = client::http2(deps.proxy).await?;
                *slot = Some(s.clone());
                s
            }
        }
    };
    let mut req = client::get_h2(API, path)?;
    req.headers_mut().extend(context.clone());
    let rsp = send.send_request(req).await?;
    let (status, _, _) = client::text(rsp).await?;
    anyhow::ensure!(status.is_success(), "answered {status}");
    Ok(())
}
