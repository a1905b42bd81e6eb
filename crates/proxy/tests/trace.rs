//! Tracing with a real OTLP receiver: a request through two proxies yields
//! two linked spans in the client's trace; head sampling holds its ratio;
//! failed and slow requests are always kept and an upstream "not sampled"
//! is honoured; a dead collector costs dropped (counted) spans, never a
//! request.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, text};
use weft_test_support::metrics::scrape;
use weft_test_support::otlp::{Received, Receiver};
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");
const AUTHORITY: &str = "api.demo:8080";

fn attr(span: &Received, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.span
        .attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

/// An outbound proxy routing AUTHORITY to `to`, exporting to `collector`.
async fn outbound(
    to: std::net::SocketAddr,
    collector: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<(DestinationsFile, Proxy)> {
    let file = DestinationsFile::new(&[(AUTHORITY, &[(to, 1)])])?;
    let path = file.path_str();
    let mut env = vec![
        ("WEFT_PROXY_DESTINATIONS", path.as_str()),
        ("WEFT_PROXY_TRACE_COLLECTOR", collector),
    ];
    env.extend_from_slice(extra);
    let proxy = Proxy::start(PROXY.as_ref(), &env).await?;
    Ok((file, proxy))
}

fn request(
    path: &str,
    traceparent: Option<&str>,
) -> anyhow::Result<http::Request<http_body_util::Full<bytes::Bytes>>> {
    let mut b = http::Request::get(format!("http://{AUTHORITY}{path}"))
        .header(http::header::HOST, AUTHORITY);
    if let Some(tp) = traceparent {
        b = b.header("traceparent", tp);
    }
    Ok(b.body(http_body_util::Full::new(bytes::Bytes::new()))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_proxies_yields_two_linked_spans() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let collector = receiver.addr.to_string();
    let app = Backend::start("api").await?;
    let app_addr = app.addr.to_string();
    // The server side: inbound to the application; sampling is the
    // client's decision, so the proxies' own ratio is zero.
    let server = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", &app_addr),
            ("WEFT_PROXY_TRACE_COLLECTOR", &collector),
            ("WEFT_PROXY_TRACE_SAMPLE", "0"),
        ],
    )
    .await?;
    let (_file, client_proxy) = outbound(
        server.inbound,
        &collector,
        &[("WEFT_PROXY_TRACE_SAMPLE", "0")],
    )
    .await?;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let mut conn = client::http1(client_proxy.outbound).await?;
    let (status, _, _) = text(
        conn.send_request(request(
            "/v1/items",
            Some(&format!("00-{trace}-{parent}-01")),
        )?)
        .await?,
    )
    .await?;
    assert_eq!(status, 200);

    let trace_id = u128::from_str_radix(trace, 16)?.to_be_bytes().to_vec();
    let spans = receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter().filter(|r| r.span.trace_id == trace_id).count() >= 2
        })
        .await?;
    let ours: Vec<&Received> = spans
        .iter()
        .filter(|r| r.span.trace_id == trace_id)
        .collect();
    assert_eq!(ours.len(), 2, "{ours:#?}");
    let client_span = ours
        .iter()
        .find(|r| r.span.kind == SpanKind::Client as i32)
        .ok_or_else(|| anyhow::anyhow!("no client span"))?;
    let server_span = ours
        .iter()
        .find(|r| r.span.kind == SpanKind::Server as i32)
        .ok_or_else(|| anyhow::anyhow!("no server span"))?;
    // The client's span is the outbound span's parent, which is the
    // inbound span's parent.
    assert_eq!(
        client_span.span.parent_span_id,
        u64::from_str_radix(parent, 16)?.to_be_bytes().to_vec()
    );
    assert_eq!(server_span.span.parent_span_id, client_span.span.span_id);
    assert_eq!(
        attr(client_span, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(attr(client_span, "url.path").as_deref(), Some("/v1/items"));
    assert_eq!(
        attr(client_span, "server.address").as_deref(),
        Some(AUTHORITY)
    );
    assert_eq!(
        attr(client_span, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(client_span, "network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        attr(client_span, "network.peer.port"),
        Some(server.inbound.port().to_string())
    );
    assert_eq!(
        attr(server_span, "weft.direction").as_deref(),
        Some("inbound")
    );
    assert_eq!(
        attr(server_span, "network.peer.port"),
        Some(app.addr.port().to_string())
    );
    assert!(client_span.span.end_time_unix_nano >= server_span.span.end_time_unix_nano);
    assert!(client_span.span.start_time_unix_nano <= server_span.span.start_time_unix_nano);
    let service = client_span
        .resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
        .and_then(|a| a.value.clone());
    assert!(format!("{service:?}").contains("weft-proxy"), "{service:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_sampling_holds_its_ratio_and_failures_and_slow_requests_are_kept()
-> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    let collector = receiver.addr.to_string();
    let app = Backend::start("api").await?;
    let (_file, proxy) = outbound(
        app.addr,
        &collector,
        &[
            ("WEFT_PROXY_TRACE_SAMPLE", "0.1"),
            ("WEFT_PROXY_TRACE_SLOW", "80ms"),
        ],
    )
    .await?;
    let mut conn = client::http1(proxy.outbound).await?;
    const N: usize = 5_000;
    for _ in 0..N {
        conn.ready().await?;
        let (status, _, _) = text(conn.send_request(request("/", None)?).await?).await?;
        assert_eq!(status, 200);
    }
    // Failures and slow requests, whatever the dice say; and requests an
    // upstream said not to sample, however fast and fine.
    for _ in 0..20 {
        conn.ready().await?;
        text(conn.send_request(request("/status/503", None)?).await?).await?;
    }
    for _ in 0..3 {
        conn.ready().await?;
        text(conn.send_request(request("/slow/120", None)?).await?).await?;
    }
    for _ in 0..200 {
        conn.ready().await?;
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        text(conn.send_request(request("/unsampled", Some(tp))?).await?).await?;
    }
    receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter()
                .filter(|r| attr(r, "url.path").as_deref() == Some("/slow/120"))
                .count()
                == 3
                && s.iter()
                    .filter(|r| attr(r, "url.path").as_deref() == Some("/status/503"))
                    .count()
                    == 20
        })
        .await?;
    // Export lags by up to a second: let the last batch land.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = receiver.spans();
    let plain = all
        .iter()
        .filter(|r| attr(r, "url.path").as_deref() == Some("/"))
        .count();
    let ratio = plain as f64 / N as f64;
    println!(
        "head-sampled {plain} of {N} ({ratio:.3}); {} spans in all",
        all.len()
    );
    assert!(
        (0.08..=0.12).contains(&ratio),
        "{plain} of {N} sampled at 0.1"
    );
    let failed: Vec<&Received> = all
        .iter()
        .filter(|r| attr(r, "url.path").as_deref() == Some("/status/503"))
        .collect();
    assert!(
        failed
            .iter()
            .all(|r| r.span.status.as_ref().is_some_and(|s| s.code == 2))
    );
    assert_eq!(
        all.iter()
            .filter(|r| attr(r, "url.path").as_deref() == Some("/unsampled"))
            .count(),
        0
    );
    let m = scrape(proxy.admin).await?;
    assert_eq!(m.sum("trace_spans_exported_total", &[]), all.len() as f64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_drops_spans_never_requests() -> anyhow::Result<()> {
    let app = Backend::start("api").await?;
    let (_file, proxy) = outbound(
        app.addr,
        "127.0.0.1:1",
        &[
            ("WEFT_PROXY_TRACE_SAMPLE", "1"),
            ("WEFT_PROXY_TRACE_QUEUE", "16"),
        ],
    )
    .await?;
    let mut conn = client::http1(proxy.outbound).await?;
    for _ in 0..300 {
        conn.ready().await?;
        let (status, _, _) = text(conn.send_request(request("/", None)?).await?).await?;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = scrape(proxy.admin).await?;
    let failed = m.sum("trace_spans_dropped_total", &[("reason", "export_failed")]);
    let full = m.sum("trace_spans_dropped_total", &[("reason", "queue_full")]);
    println!(
        "dead collector: {failed:.0} spans failed export, {:.0} found the queue full",
        full.abs()
    );
    assert!(failed > 0.0 && failed + full >= 290.0, "{}", m.text);
    assert_eq!(m.sum("trace_spans_exported_total", &[]), 0.0);
    Ok(())
}
