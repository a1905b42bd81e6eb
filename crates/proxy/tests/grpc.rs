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

/// A health server whose every other call fails with UNAVAILABLE (as a
/// trailers-only response, the way gRPC servers report errors).
struct Flaky(std::sync::atomic::AtomicU64);

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for Flaky {
    async fn check(
        &self,
        _: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 2 == 1 {
            return Err(tonic::Status::unavailable("every other call fails"));
        }
        Ok(tonic::Response::new(
            tonic_health::pb::HealthCheckResponse {
                status: tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            },
        ))
    }

    type WatchStream =
        futures_util::stream::Empty<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no watch"))
    }
}

/// gRPC calls are POSTs, retried only for the statuses `retry.on` lists:
/// with `grpc:unavailable` a real tonic client sees every call succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_retried_on_listed_statuses() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic_health::pb::health_server::HealthServer::new(Flaky(
                Default::default(),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let file = DestinationsFile::from_yaml(&format!(
        "destinations:\n  \"health.test:9090\":\n    endpoints: [{{addr: {addr}}}]\n    breaker: {{consecutive_failures: 0}}\n    retry: {{attempts: 1, on: [\"grpc:unavailable\"]}}\n  \"plain.test:9090\":\n    endpoints: [{{addr: {addr}}}]\n    breaker: {{consecutive_failures: 0}}\n"
    ))?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;
    let retried = grpc::channel_via(proxy.outbound, "health.test:9090").await?;
    for _ in 0..20 {
        assert_eq!(grpc::check(&retried, "").await?, 1, "SERVING");
    }
    let plain = grpc::channel_via(proxy.outbound, "plain.test:9090").await?;
    let mut unavailable = 0;
    for _ in 0..20 {
        if let Err(s) = grpc::check(&plain, "").await {
            assert_eq!(s.code(), tonic::Code::Unavailable);
            unavailable += 1;
        }
    }
    assert_eq!(unavailable, 10, "without retries every other call fails");
    Ok(())
}

/// A response whose body is over at its headers (a gRPC trailers-only
/// answer, a 204, the answer to HEAD) is counted as it answered, not as a
/// broken stream; a client that cancels after the headers is counted as
/// cancelled (gRPC CANCELLED), not as the server's UNKNOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_bodies_count_as_answered_and_cancels_as_cancelled() -> anyhow::Result<()> {
    use weft_test_support::backend::Backend;
    use weft_test_support::client::{self, get, get_h2, text};
    let server = grpc::start().await?;
    let backend = Backend::start("plain").await?;
    let file = DestinationsFile::new(&[
        ("health.test:9090", &[(server.addr, 1)]),
        ("plain.test:80", &[(backend.addr, 1)]),
    ])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;

    let channel = grpc::channel_via(proxy.outbound, "health.test:9090").await?;
    for _ in 0..5 {
        let err = grpc::check(&channel, "no.such.Service")
            .await
            .expect_err("unknown service");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
    let mut h1 = client::http1(proxy.outbound).await?;
    let mut h2 = client::http2(proxy.outbound).await?;
    for _ in 0..3 {
        h1.ready().await?;
        let (status, _, _) = text(
            h1.send_request(get("plain.test:80", "/status/204")?)
                .await?,
        )
        .await?;
        assert_eq!(status, 204);
        h2.ready().await?;
        let (status, _, _) = text(
            h2.send_request(get_h2("plain.test:80", "/status/204")?)
                .await?,
        )
        .await?;
        assert_eq!(status, 204);
        let mut head = get("plain.test:80", "/")?;
        *head.method_mut() = http::Method::HEAD;
        h1.ready().await?;
        let (status, _, body) = text(h1.send_request(head).await?).await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, ""));
    }

    // Cancelled after the headers and the first message.
    let mut stream = grpc::watch(&channel, grpc::SERVING).await?;
    let first = stream.message().await?;
    assert!(first.is_some());
    drop(stream);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let m = loop {
        let m = scrape(proxy.admin).await?;
        if m.sum("response_total", &[("error", "cancelled")]) >= 1.0
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        m.sum(
            "response_total",
            &[("grpc_status_code", "5"), ("classification", "failure")]
        ),
        5.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[("status_code", "204"), ("classification", "success")]
        ),
        6.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[
                ("status_code", "200"),
                ("classification", "success"),
                ("authority", "plain.test:80")
            ]
        ),
        3.0,
        "HEAD: {}",
        m.text
    );
    assert_eq!(
        m.sum("response_total", &[("error", "stream")]),
        0.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "cancelled"), ("grpc_status_code", "1")]
        ),
        1.0,
        "{}",
        m.text
    );
    Ok(())
}

/// The two label bounds do not multiply: one client naming 20 authorities
/// × 100 gRPC methods on inbound gets at most 1,000 method series in all
/// (100 per authority), the rest `route="other"`, and the scrape stays
/// small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorities_times_methods_is_bounded_in_total() -> anyhow::Result<()> {
    use http_body_util::Full;
    use weft_test_support::backend::Backend;
    use weft_test_support::client;
    let app = Backend::start("app").await?;
    let app_addr = app.addr.to_string();
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_INBOUND_FORWARD", &app_addr),
        ],
    )
    .await?;
    let mut h2 = client::http2(proxy.inbound).await?;
    for a in 0..20 {
        for m in 0..100 {
            let req = http::Request::post(format!("http://svc{a}.test:80/pkg.Service/Method{m}"))
                .header("content-type", "application/grpc")
                .body(Full::new(bytes::Bytes::new()))?;
            h2.ready().await?;
            h2.send_request(req).await?;
        }
    }
    h2.ready().await?;
    let m = scrape(proxy.admin).await?;
    let pairs: std::collections::HashSet<(String, String)> = m
        .text
        .lines()
        .filter(|l| l.starts_with("request_total{") && l.contains("direction=\"inbound\""))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(String::from)
            };
            Some((field("authority")?, field("route")?))
        })
        .filter(|(_, r)| r != "other")
        .collect();
    assert_eq!(pairs.len(), 1_000, "method series in total");
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "inbound"), ("route", "other")]
        ),
        1_000.0
    );
    let lines = m.text.lines().count();
    assert!(lines < 40_000, "{lines} lines in a scrape");
    Ok(())
}
