//! HTTP/1.1 carried over HTTP/2 between meshed proxies (`l5d-orig-proto`):
//! real proxies, a real control plane advertising the H2 hint, a real
//! HTTP/1.1 and HTTP/2 backend that says which version reached it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use weft_test_support::client::{self, Conn};
use weft_test_support::mesh::{Mesh, meshed, start_proxy};
use weft_test_support::metrics::scrape;

const CLIENTS: usize = 8;

/// `CLIENTS` HTTP/1.1 connections to `outbound`, each with a request in
/// flight at once (so unmultiplexed HTTP/1 would need as many upstream
/// connections), then a version check on each. Returns what the
/// application saw.
async fn concurrent_http1(outbound: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(outbound, false).await?;
            let (status, _, body) = conn.get("api.demo:8080", "/slow/300").await?;
            anyhow::ensure!(status == 200, "slow: {status} {body}");
            let (status, headers, version) = conn.get("api.demo:8080", "/version").await?;
            anyhow::ensure!(status == 200, "version: {status} {version}");
            anyhow::ensure!(
                headers.get("l5d-orig-proto").is_none(),
                "the client saw the proxies' header: {headers:?}"
            );
            Ok::<_, anyhow::Error>(version)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await??);
    }
    Ok(versions)
}

#[tokio::test]
async fn http1_between_meshed_proxies_rides_one_http2_connection() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let versions = concurrent_http1(mesh.client.outbound).await?;
    assert_eq!(versions, vec!["HTTP/1.1"; CLIENTS], "{}", mesh.client.log());

    // The application sees the request as the client sent it: its Host,
    // its headers, its chunked body, and none of the proxies' own.
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    let mut req = client::get("api.demo:8080", "/headers")?;
    req.headers_mut().insert("x-app", "kept".parse()?);
    let (status, _, seen) = conn.send(req).await?;
    assert_eq!(status, 200);
    assert!(seen.contains("host: api.demo:8080\n"), "{seen}");
    assert!(seen.contains("x-app: kept\n"), "{seen}");
    assert!(!seen.contains("l5d-orig-proto"), "{seen}");
    let body = vec![b'x'; 100_000];
    let req = http::Request::post("http://api.demo:8080/count")
        .header(http::header::HOST, "api.demo:8080")
        .body(Full::new(Bytes::from(body)))?;
    let (status, _, counted) = conn.send(req).await?;
    assert_eq!((status.as_u16(), counted.as_str()), (200, "100000"));

    // One connection between the proxies carried every client's requests,
    // over mutual TLS; the application had HTTP/1.1 connections of its own.
    let client = scrape(mesh.client.admin).await?;
    let upstream = client.sum(
        "tcp_open_total",
        &[("direction", "outbound"), ("peer", "dst")],
    );
    assert_eq!(upstream, 1.0, "{}", client.text);
    let server = scrape(mesh.server.admin).await?;
    assert_eq!(
        server.sum(
            "request_total",
            &[("direction", "inbound"), ("client_id", "web.demo")]
        ),
        (2 * CLIENTS + 2) as f64,
        "{}",
        server.text
    );
    Ok(())
}

#[tokio::test]
async fn without_the_upgrade_each_concurrent_request_needs_its_own_connection() -> anyhow::Result<()>
{
    let mesh = Mesh::start().await?;
    let mut env = meshed(&mesh.ca, &mesh.control, "web.demo")?;
    env.push(("WEFT_PROXY_ORIG_PROTO".into(), "false".into()));
    let plain = start_proxy(&env).await?;
    let versions = concurrent_http1(plain.outbound).await?;
    assert_eq!(versions, vec!["HTTP/1.1"; CLIENTS], "{}", plain.log());
    let m = scrape(plain.admin).await?;
    let upstream = m.sum(
        "tcp_open_total",
        &[("direction", "outbound"), ("peer", "dst")],
    );
    assert_eq!(upstream, CLIENTS as f64, "{}", m.text);
    Ok(())
}

/// What a linkerd2-proxy following the H2 hint sends: HTTP/2 with
/// `l5d-orig-proto`, which the inbound side must turn back into HTTP/1.1.
#[tokio::test]
async fn an_http2_request_marked_orig_proto_reaches_the_application_as_http1() -> anyhow::Result<()>
{
    let mesh = Mesh::start().await?;
    let mut h2 = client::http2(mesh.server.inbound).await?;
    for (marker, app_saw, answer) in [
        (Some("HTTP/1.1"), "HTTP/1.1", Some("HTTP/1.1")),
        (
            Some("HTTP/1.1; absolute-form"),
            "HTTP/1.1",
            Some("HTTP/1.1"),
        ),
        (None, "HTTP/2.0", None),
    ] {
        let mut req = client::get_h2("api.demo:8080", "/version")?;
        if let Some(m) = marker {
            req.headers_mut().insert("l5d-orig-proto", m.parse()?);
        }
        let rsp = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req)).await??;
        let (status, headers, body) = client::text(rsp).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, app_saw, "marker {marker:?}");
        assert_eq!(
            headers
                .get("l5d-orig-proto")
                .map(|v| v.to_str().unwrap_or("?")),
            answer,
            "marker {marker:?}"
        );
    }
    // The Host the application sees is the upgraded request's authority.
    let mut req = client::get_h2("api.demo:8080", "/headers")?;
    req.headers_mut()
        .insert("l5d-orig-proto", "HTTP/1.1".parse()?);
    let (_, _, seen) = client::text(h2.send_request(req).await?).await?;
    assert!(seen.contains("host: api.demo:8080\n"), "{seen}");
    assert!(!seen.contains("l5d-orig-proto"), "{seen}");
    Ok(())
}
