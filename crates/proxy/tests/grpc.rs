//! gRPC through the proxy: one client channel spread over every endpoint,
//! and success judged by `grpc-status`, not the HTTP status.

use weft_test_support::DestinationsFile;
use weft_test_support::grpc;
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_is_balanced_and_classified_by_grpc_status() -> anyhow::Result<()> {
    let a = grpc::start().await?;
    let b = grpc::start().await?;
    let file = DestinationsFile::new(&[("health.test:9090", &[(a.addr, 1), (b.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;

    let channel = grpc::channel_via(proxy.outbound, "health.test:9090").await?;
    for _ in 0..100 {
        assert_eq!(grpc::check(&channel, grpc::SERVING).await?, 1, "SERVING");
    }
    for _ in 0..10 {
        let err = grpc::check(&channel, "no.such.Service")
            .await
            .expect_err("unknown service");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    let m = scrape(proxy.admin).await?;
    let ok = m.sum(
        "response_total",
        &[("classification", "success"), ("grpc_status_code", "0")],
    );
    let not_found = m.sum(
        "response_total",
        &[("classification", "failure"), ("grpc_status_code", "5")],
    );
    assert_eq!((ok, not_found), (100.0, 10.0), "{}", m.text);
    // Every response was HTTP 200: gRPC failures are in the trailers.
    assert_eq!(m.sum("response_total", &[("status_code", "200")]), 110.0);

    // Both servers saw traffic from the single client connection: their
    // proxies' inbound would show it; here the TCP peers tell.
    assert_eq!(
        m.sum(
            "tcp_open_total",
            &[("direction", "outbound"), ("peer", "src")]
        ),
        1.0
    );
    assert!(
        m.sum(
            "tcp_open_total",
            &[("direction", "outbound"), ("peer", "dst")]
        ) >= 2.0,
        "{}",
        m.text
    );
    Ok(())
}

/// With no configuration, every gRPC call is counted under its method, on
/// both sides of the mesh hop; a client inventing methods gets 100 series
/// per destination, the rest `route="other"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_metrics_carry_the_method_and_are_bounded() -> anyhow::Result<()> {
    let server = grpc::start().await?;
    let file = DestinationsFile::new(&[("health.test:9090", &[(server.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;
    let channel = grpc::channel_via(proxy.outbound, "health.test:9090").await?;
    for _ in 0..7 {
        grpc::check(&channel, grpc::SERVING).await?;
    }
    // 150 methods the server has never heard of (it answers UNIMPLEMENTED).
    let mut grpc_client = tonic::client::Grpc::new(channel.clone());
    for i in 0..150 {
        grpc_client.ready().await?;
        let path = format!("/bogus.Service/Method{i}").parse::<http::uri::PathAndQuery>()?;
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let _ = grpc_client
            .unary::<(), (), _>(tonic::Request::new(()), path, codec)
            .await;
    }
    let m = scrape(proxy.admin).await?;
    let check = m.sum(
        "response_total",
        &[
            ("route", "/grpc.health.v1.Health/Check"),
            ("grpc_status_code", "0"),
        ],
    );
    assert_eq!(check, 7.0, "{}", m.text);
    let routes: std::collections::HashSet<String> = m
        .text
        .lines()
        .filter(|l| l.starts_with("request_total{"))
        .filter_map(|l| {
            l.split("route=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(String::from)
        })
        .collect();
    assert_eq!(routes.len(), 101, "{routes:?}");
    assert!(routes.contains("other"));
    assert_eq!(
        m.sum("request_total", &[("route", "other")]),
        150.0 + 1.0 - 100.0,
        "{}",
        m.text
    );
    Ok(())
}
