//! The admin port: `/ready`, `/live`, `/metrics`, `/identity` and
//! `/servers` (which workloads' ports have inbound policy, for `weft authz`
//! and `weft check`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_authz::DefaultPolicy;
use weft_destinations::Destinations;

use crate::identity::IdentityView;
use crate::metrics::Metrics;

/// What the admin port serves from.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Metrics,
    pub identity: Option<IdentityView>,
    /// The destinations file, for its `servers:`.
    pub file: Option<watch::Receiver<Arc<Destinations>>>,
    pub default_inbound: DefaultPolicy,
}

/// `/servers`: every server with inbound policy, its ports, and the
/// defaults for the rest.
fn servers(admin: &Admin) -> String {
    let mut servers: Vec<serde_json::Value> = admin
        .file
        .as_ref()
        .map(|f| {
            f.borrow()
                .servers
                .iter()
                .map(|(identity, spec)| {
                    serde_json::json!({
                        "identity": identity,
                        "default": spec.default.unwrap_or(admin.default_inbound).as_str(),
                        "ports": spec.ports.keys().collect::<Vec<_>>(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    servers.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
    serde_json::json!({
        "default": admin.default_inbound.as_str(),
        "servers": servers,
    })
    .to_string()
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp
}

fn handle(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let metrics = &admin.metrics;
    let identity = admin.identity.as_ref();
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        // The gRPC listener is bound before the admin one, so answering at
        // all means ready.
        "/ready" => reply(StatusCode::OK, PLAIN, "ready\n".into()),
        "/live" => reply(StatusCode::OK, PLAIN, "live\n".into()),
        "/metrics" => match metrics.encode() {
            Ok(body) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(_) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN,
                "cannot encode metrics\n".into(),
            ),
        },
        "/identity" => match identity.map(IdentityView::to_json) {
            Some(Ok(body)) => reply(StatusCode::OK, "application/json", body),
            Some(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
            None => reply(
                StatusCode::NOT_FOUND,
                PLAIN,
                "this control plane runs without --identity-dir\n".into(),
            ),
        },
        "/servers" => reply(StatusCode::OK, "application/json", servers(admin)),
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /ready, /live, /metrics, /identity or /servers\n".into(),
        ),
    }
}

pub async fn serve(listener: TcpListener, admin: Admin, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let rsp = handle(&admin, &req);
                async move { Ok::<_, Infallible>(rsp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
