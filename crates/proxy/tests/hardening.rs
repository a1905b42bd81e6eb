//! What a hostile or broken peer can make the proxy hold, and what it
//! cannot make it do: real sockets against the real binary, each test
//! bounded in time.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// Sends raw bytes and reads what comes back until the proxy closes or
/// `within` passes.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8], within: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn ok_through(proxy: &Proxy, authority: &str) -> anyhow::Result<()> {
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let (status, _, _) = text(send.send_request(get(authority, "/")?).await?).await?;
    anyhow::ensure!(status == 200, "{authority}: {status}\n{}", proxy.log());
    Ok(())
}

/// Whether the proxy has closed `s` (EOF or reset), waiting up to `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_and_preface_only_connections_are_closed_in_time() -> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let file = DestinationsFile::new(&[("svc.test:80", &[(backend.addr, 1)])])?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_HEADER_READ_TIMEOUT", "2s"),
            ("WEFT_PROXY_HTTP2_IDLE_TIMEOUT", "2s"),
        ],
    )
    .await?;
    let mut held = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(proxy.outbound).await?;
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: svc.test\r\nX-Slow: ")
                .await?;
        } else {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        }
        held.push(s);
    }
    // Everyone else is served meanwhile.
    for _ in 0..20 {
        ok_through(&proxy, "svc.test").await?;
    }
    let started = Instant::now();
    let mut open = 0;
    for s in &mut held {
        let left = Duration::from_secs(8).saturating_sub(started.elapsed());
        if !closed(s, left).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "connections still open after their timeouts");
    assert!(started.elapsed() < Duration::from_secs(8));
    ok_through(&proxy, "svc.test").await?;
    Ok(())
}

#[tokio::test]
async fn absolute_form_wins_and_two_hosts_are_refused() -> anyhow::Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let file =
        DestinationsFile::new(&[("a.test:80", &[(a.addr, 1)]), ("b.test:80", &[(b.addr, 1)])])?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &file.path_str())],
    )
    .await?;

    // Routed by the absolute-form target, and the upstream is told the
    // same authority: it never sees `Host: b.test`.
    let rsp = raw(
        proxy.outbound,
        b"GET http://a.test/headers HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(rsp.contains("x-backend: a"), "{rsp}");
    assert!(rsp.contains("host: a.test\n"), "{rsp}");
    assert!(!rsp.contains("b.test"), "{rsp}");

    let rsp = raw(
        proxy.outbound,
        b"GET /headers HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.contains("more than one Host"), "{rsp}");
    assert_eq!((a.hits(), b.hits()), (1, 0));
    Ok(())
}

#[tokio::test]
async fn a_malformed_client_body_is_the_clients_400_and_remote_clients_see_no_addresses()
-> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_INBOUND_FORWARD", &backend.addr.to_string())],
    )
    .await?;
    let rsp = raw(
        proxy.inbound,
        b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(!rsp.contains(&backend.addr.to_string()), "{rsp}");
    assert!(!rsp.contains("127.0.0.1"), "{rsp}");
    Ok(())
}

#[tokio::test]
async fn twenty_thousand_hosts_do_not_grow_the_metrics() -> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", &backend.addr.to_string()),
            ("WEFT_PROXY_INBOUND_AUTHORITIES", "svc.test:80"),
        ],
    )
    .await?;
    let mut conn = client::http1(proxy.inbound).await?;
    // Warm up, so the allocator's first growth is not counted.
    for i in 0..500 {
        conn.ready().await?;
        text(
            conn.send_request(get(&format!("warm{i}.test"), "/")?)
                .await?,
        )
        .await?;
    }
    let before = proxy.peak_rss_bytes()?;
    for i in 0..20_000 {
        conn.ready().await?;
        let (status, _, _) = text(
            conn.send_request(get(&format!("h{i}.random.test"), "/")?)
                .await?,
        )
        .await?;
        assert_eq!(status, 200);
    }
    conn.ready().await?;
    text(conn.send_request(get("svc.test", "/")?).await?).await?;
    let grown = proxy.peak_rss_bytes()?.saturating_sub(before);
    assert!(grown < 2 * 1024 * 1024, "RSS grew {grown} bytes");
    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "inbound"), ("authority", "other")]
        ),
        20_500.0
    );
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "inbound"), ("authority", "svc.test:80")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "metrics_authority_overflow_total",
            &[("direction", "inbound")]
        ),
        20_500.0
    );
    let series = m
        .samples()
        .iter()
        .filter(|s| s.metric == "request_total")
        .count();
    assert!(series <= 3, "{series} request_total series");
    Ok(())
}

#[tokio::test]
async fn an_empty_destinations_file_keeps_the_last_routes() -> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let file = DestinationsFile::new(&[("svc.test:80", &[(backend.addr, 1)])])?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &file.path_str())],
    )
    .await?;
    ok_through(&proxy, "svc.test").await?;
    file.write_yaml("")?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ok_through(&proxy, "svc.test").await?;
    assert!(
        proxy.log().contains("bad destinations edit ignored"),
        "{}",
        proxy.log()
    );
    Ok(())
}

#[tokio::test]
async fn a_hung_application_gets_a_504_and_cancelled_requests_are_counted() -> anyhow::Result<()> {
    // Accepts and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hung_addr = hung.local_addr()?;
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", &hung_addr.to_string()),
            ("WEFT_PROXY_INBOUND_RESPONSE_TIMEOUT", "500ms"),
            ("WEFT_PROXY_INBOUND_AUTHORITIES", "svc.test"),
        ],
    )
    .await?;
    let started = Instant::now();
    let mut send = client::http1(proxy.inbound).await?;
    send.ready().await?;
    let (status, headers, _) = text(send.send_request(get("svc.test", "/")?).await?).await?;
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
    let reason = headers["l5d-proxy-error"].to_str()?;
    assert!(!reason.contains(&hung_addr.to_string()), "{reason}");

    // A client that gives up first is counted too.
    let mut send = client::http1(proxy.inbound).await?;
    send.ready().await?;
    let _ = tokio::time::timeout(
        Duration::from_millis(100),
        send.send_request(get("svc.test", "/")?),
    )
    .await;
    drop(send);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "response_timeout"), ("status_code", "504")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "cancelled"), ("classification", "failure")]
        ),
        1.0
    );
    Ok(())
}
