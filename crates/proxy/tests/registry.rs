//! A proxy registers its service in a real etcd; another finds it through
//! the control plane and reaches it over mutual TLS.

use std::time::{Duration, Instant};

use weft_registry::etcd::Etcd as EtcdClient;
use weft_test_support::backend::Backend;
use weft_test_support::client::Conn;
use weft_test_support::control::Control;
use weft_test_support::etcd::Etcd;
use weft_test_support::mesh::MeshCa;
use weft_test_support::proxy::Proxy;
use weft_test_support::workspace_binary;

#[tokio::test]
async fn a_registered_proxy_is_discovered_and_leaves_on_sigterm() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--etcd", &etcd.url()],
    )
    .await?;
    let grpc = control.grpc.to_string();
    let backend = Backend::start("api").await?;
    let bin = workspace_binary("weft-proxy")?;
    let anchors = ca.anchors();
    let api_token = ca.token_file("api.demo")?;
    let forward = backend.addr.to_string();
    let etcd_url = etcd.url();
    let mut server = Proxy::start(
        &bin,
        &[
            ("WEFT_PROXY_CONTROL_ADDR", &grpc),
            ("WEFT_PROXY_IDENTITY_NAME", "api.demo"),
            ("WEFT_PROXY_IDENTITY_TOKEN_FILE", &api_token),
            ("WEFT_PROXY_TRUST_ANCHORS", &anchors),
            ("WEFT_PROXY_INBOUND_FORWARD", &forward),
            ("WEFT_PROXY_REGISTER", "api.demo:8080"),
            ("WEFT_PROXY_ETCD", &etcd_url),
            ("WEFT_PROXY_SHUTDOWN_GRACE", "1s"),
        ],
    )
    .await?;

    let mut kv = EtcdClient::connect(&[etcd.url()]).await?;
    let key = format!("/weft/services/api.demo:8080/endpoints/{}", server.inbound);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, got) = kv.get_prefix(&key).await?;
        if let Some(v) = got.first() {
            assert_eq!(v.value, br#"{"identity":"api.demo"}"#);
            assert!(v.lease != 0, "registered without a lease");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "never registered:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let web_token = ca.token_file("web.demo")?;
    let client = Proxy::start(
        &bin,
        &[
            ("WEFT_PROXY_CONTROL_ADDR", &grpc),
            ("WEFT_PROXY_IDENTITY_NAME", "web.demo"),
            ("WEFT_PROXY_IDENTITY_TOKEN_FILE", &web_token),
            ("WEFT_PROXY_TRUST_ANCHORS", &anchors),
        ],
    )
    .await?;
    let mut conn = Conn::connect(client.outbound, false).await?;
    let (status, headers, body) = conn.get("api.demo:8080", "/").await?;
    assert_eq!(status, 200, "{body}\n{}", client.log());
    assert_eq!(
        headers.get("x-backend").map(|v| v.as_bytes()),
        Some(&b"api"[..])
    );
    let scrape = weft_test_support::metrics::scrape(server.admin).await?;
    let mtls = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("client_id", "web.demo"),
    ];
    assert_eq!(scrape.sum("request_total", &mtls), 1.0, "{}", scrape.text);

    // SIGTERM: the instance leaves discovery at once, not after its lease.
    server.terminate()?;
    let started = Instant::now();
    loop {
        let (_, got) = kv.get_prefix("/weft/services/").await?;
        if got.is_empty() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3),
            "still registered after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.wait(Duration::from_secs(5)).await?.success());
    Ok(())
}

#[tokio::test]
async fn registering_needs_etcd_and_a_reachable_address() -> anyhow::Result<()> {
    let bin = workspace_binary("weft-proxy")?;
    let out = tokio::process::Command::new(&bin)
        .env_clear()
        .env("WEFT_PROXY_REGISTER", "api.demo:8080")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("WEFT_PROXY_REGISTER=\"api.demo:8080\": registering needs WEFT_PROXY_ETCD"),
        "{stderr}"
    );
    Ok(())
}
