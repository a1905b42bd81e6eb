//! The injection webhook over real TLS, with AdmissionReview bodies in the
//! exact admission.k8s.io/v1 shape: the JSONPatch it answers makes the pod
//! `weft inject` makes; what it cannot read is allowed, with a warning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::workspace_binary;

struct Webhook {
    _control: Control,
    addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    _dir: tempfile::TempDir,
}

async fn start() -> anyhow::Result<Webhook> {
    let dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["weft-webhook.weft.svc".into()])?;
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone())?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &[
            "--dns",
            "false",
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-cert",
            &cert_path.to_string_lossy(),
            "--webhook-key",
            &key_path.to_string_lossy(),
        ],
    )
    .await?;
    control
        .process
        .wait_for_log("webhook listening webhook=", Duration::from_secs(10))
        .await?;
    let log = control.process.log();
    let addr = log
        .split("webhook=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no webhook address in {log}"))?
        .parse()?;
    Ok(Webhook {
        _control: control,
        addr,
        roots: Arc::new(roots),
        _dir: dir,
    })
}

impl Webhook {
    /// POSTs `body` to `path` over TLS as the API server would.
    async fn post(&self, path: &str, body: String) -> anyhow::Result<Value> {
        let config = rustls::ClientConfig::builder_with_provider(weft_channel::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("weft-webhook.weft.svc".try_into()?, tcp)
            .await?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, "weft-webhook.weft.svc")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))?;
        let rsp = send.send_request(req).await?;
        anyhow::ensure!(rsp.status() == 200, "status {}", rsp.status());
        let body = rsp.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    }
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-7d9c-", "namespace": "demo", "annotations": annotations},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
    })
}

fn review(uid: &str, object: &Value) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
    .to_string()
}

/// The pod the answer's patch makes of `original`.
fn patched(original: &Value, answer: &Value) -> anyhow::Result<Value> {
    let response = &answer["response"];
    anyhow::ensure!(response["allowed"] == true, "{answer}");
    anyhow::ensure!(response["patchType"] == "JSONPatch", "{answer}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap_or_default())?;
    let patch: json_patch::Patch = serde_json::from_slice(&patch)?;
    let mut pod = original.clone();
    json_patch::patch(&mut pod, &patch)?;
    Ok(pod)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_patches_pods_into_what_weft_inject_makes() -> anyhow::Result<()> {
    let hook = start().await?;
    let settings = weft_inject::Settings::new("ghcr.io/weft", env!("CARGO_PKG_VERSION"), "weft");
    let expected = |mut p: Value| -> anyhow::Result<Value> {
        weft_inject::inject_object(&mut p, &settings, true)?;
        Ok(p)
    };

    let asks = pod(json!({"weft.io/inject": "enabled"}));
    let answer = hook.post("/inject", review("uid-1", &asks)).await?;
    assert_eq!(answer["response"]["uid"], "uid-1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(patched(&asks, &answer)?, expected(asks.clone())?);

    // Silent pods only where the namespace asked (?all=true).
    let silent = pod(json!({}));
    let answer = hook.post("/inject", review("uid-2", &silent)).await?;
    assert_eq!(answer["response"], json!({"uid": "uid-2", "allowed": true}));
    let answer = hook
        .post("/inject?all=true", review("uid-3", &silent))
        .await?;
    assert_eq!(patched(&silent, &answer)?, expected(silent.clone())?);
    let disabled = pod(json!({"weft.io/inject": "disabled"}));
    let answer = hook
        .post("/inject?all=true", review("uid-4", &disabled))
        .await?;
    assert!(answer["response"]["patch"].is_null(), "{answer}");

    // Never blocking a pod for weft's sake: allowed, with a warning.
    for (body, warning) in [
        ("not json".to_string(), "not an AdmissionReview"),
        (review("uid-5", &json!("a string")), "no pod"),
        (
            review(
                "uid-6",
                &pod(json!({"weft.io/inject": "enabled", "weft.io/proxy-memory-limit": "much"})),
            ),
            "weft.io/proxy-memory-limit",
        ),
    ] {
        let answer = hook.post("/inject", body).await?;
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(
            answer["response"]["warnings"].to_string().contains(warning),
            "{answer}"
        );
    }
    Ok(())
}
