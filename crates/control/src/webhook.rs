//! The injection webhook: Kubernetes sends each new Pod in an
//! `admission.k8s.io/v1` `AdmissionReview` to `POST /inject`, and gets back
//! a JSONPatch that makes it exactly the pod `weft inject` would make. A
//! review weft cannot read is allowed unchanged with a warning: a weft bug
//! must never stop pods from starting (unless the cluster's webhook
//! configuration says `failurePolicy: Fail`).
//!
//! `POST /inject-all` (or `/inject?all=true`) injects every pod that does
//! not say `weft.io/inject: disabled` (the webhook configuration sends
//! there the pods of namespaces labelled for injection); `POST /inject`
//! only those annotated `weft.io/inject: enabled`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_inject::{Outcome, Settings};

/// A review larger than this is not a pod's.
const MAX_BODY: usize = 4 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot listen on {addr} (webhook): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The TLS configuration from PEM files: the API server only talks HTTPS.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |path: &Path, reason: String| WebhookError::Cert {
        path: path.display().to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| fail(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(fail(cert, "no certificate in it".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(key, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(weft_channel::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| fail(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| fail(key, format!("does not match the certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// Binds the webhook's listener (at start-up, so a bad address stops it).
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, WebhookError> {
    let listener =
        weft_listener::bind(addr).map_err(|source| WebhookError::Bind { addr, source })?;
    if let Ok(a) = listener.local_addr() {
        tracing::info!("weft-control webhook listening webhook={a}");
    }
    Ok(listener)
}

/// Serves `POST /inject` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut listener = weft_listener::Listener::new(listener, "webhook", 1024);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept(|| {}) => a,
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let _slot = accepted.permit;
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(accepted.stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
            let svc = service_fn(move |req| {
                let settings = settings.clone();
                async move { Ok::<_, Infallible>(handle(req, &settings).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

async fn handle(req: Request<Incoming>, settings: &Settings) -> Response<Full<Bytes>> {
    let all = match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "all=true")),
        (&Method::POST, "/inject-all") => true,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "POST /inject or /inject-all takes AdmissionReviews"}),
            );
        }
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return json_response(
                StatusCode::OK,
                &allow("", &format!("cannot read the review: {e}")),
            );
        }
    };
    json_response(StatusCode::OK, &review(&body, settings, all))
}

/// Allowed, unchanged, with a warning the user sees (kubectl prints it).
fn allow(uid: &str, warning: &str) -> Value {
    tracing::warn!(uid, warning, "admission review not injected");
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true, "warnings": [format!("weft: {warning}")]},
    })
}

/// The answer to one AdmissionReview body.
pub fn review(body: &[u8], settings: &Settings, all: bool) -> Value {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return allow("", &format!("not an AdmissionReview: {e}")),
    };
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str() else {
        return allow("", "the review has no request.uid");
    };
    if review["apiVersion"] != "admission.k8s.io/v1" {
        return allow(uid, "only admission.k8s.io/v1 reviews are understood");
    }
    if request["kind"]["kind"] != "Pod" {
        return allow(uid, "only Pods are injected");
    }
    let original = request["object"].clone();
    if !original.is_object() {
        return allow(uid, "the review carries no pod");
    }
    let mut pod = original.clone();
    // A pod under review may not have its kind set.
    pod["kind"] = json!("Pod");
    let name = pod["metadata"]["name"]
        .as_str()
        .or(pod["metadata"]["generateName"].as_str())
        .unwrap_or("(unnamed)")
        .to_string();
    match weft_inject::inject_object(&mut pod, settings, all) {
        Ok(outcomes) if outcomes.contains(&Outcome::Injected) => {}
        Ok(_) => {
            return json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": uid, "allowed": true},
            });
        }
        Err(e) => return allow(uid, &format!("pod {name} not injected: {e}")),
    }
    if original.get("kind").is_none()
        && let Some(m) = pod.as_object_mut()
    {
        m.remove("kind");
    }
    let patch = json_patch::diff(&original, &pod);
    let patch = match serde_json::to_vec(&patch) {
        Ok(p) => p,
        Err(e) => return allow(uid, &format!("cannot write the patch: {e}")),
    };
    tracing::info!(pod = %name, namespace = request["namespace"].as_str().unwrap_or(""), "injected");
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": base64::engine::general_purpose::STANDARD.encode(patch),
        },
    })
}
