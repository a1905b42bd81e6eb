//! The admin port: `/ready`, `/live`, `/metrics` and `/identity`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::identity::IdentityView;
use crate::metrics::Metrics;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp
}

fn handle(
    metrics: &Metrics,
    identity: Option<&IdentityView>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
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
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /ready, /live, /metrics or /identity\n".into(),
        ),
    }
}

pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    identity: Option<IdentityView>,
    shutdown: CancellationToken,
) {
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
        let metrics = metrics.clone();
        let identity = identity.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let rsp = handle(&metrics, identity.as_ref(), &req);
                async move { Ok::<_, Infallible>(rsp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
