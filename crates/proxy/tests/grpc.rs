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
