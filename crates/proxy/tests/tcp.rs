//! Opaque TCP through the inbound side: relayed both ways, and clients that
//! wait for the server to speak first are not stalled.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;
use weft_test_support::tcp;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_bytes_are_relayed_and_counted() -> anyhow::Result<()> {
    let echo = tcp::echo().await?;
    let fwd = echo.addr.to_string();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_INBOUND_FORWARD", &fwd)]).await?;
    let mut s = TcpStream::connect(proxy.inbound).await?;
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, payload);
    // A TLS ClientHello is passed through as opaque bytes too.
    let mut t = TcpStream::connect(proxy.inbound).await?;
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    t.write_all(&hello).await?;
    let mut got = [0u8; 10];
    t.read_exact(&mut got).await?;
    assert_eq!(got, hello);
    drop(s);
    drop(t);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = scrape(proxy.admin).await?;
    let read = m.sum(
        "tcp_read_bytes_total",
        &[("direction", "inbound"), ("peer", "src")],
    );
    assert_eq!(read, 100_010.0, "{}", m.text);
    assert_eq!(
        m.sum(
            "tcp_close_total",
            &[("direction", "inbound"), ("peer", "src")]
        ),
        2.0
    );
    assert_eq!(
        m.sum("tcp_open_connections", &[("direction", "inbound")]),
        0.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_protocols_do_not_stall() -> anyhow::Result<()> {
    let smtp = tcp::server_first(b"220 mail.test ESMTP ready\r\n").await?;
    let fwd = smtp.addr.to_string();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_INBOUND_FORWARD", &fwd)]).await?;
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.inbound).await?;
    let mut banner = [0u8; 27];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut banner)).await??;
    let waited = started.elapsed();
    assert_eq!(&banner, b"220 mail.test ESMTP ready\r\n");
    // The default peek timeout is 200 ms; Linkerd's is 10 s.
    assert!(
        waited < Duration::from_millis(400),
        "banner took {waited:?}"
    );
    s.write_all(b"EHLO client\r\n").await?;
    let mut echo = [0u8; 13];
    s.read_exact(&mut echo).await?;
    assert_eq!(&echo, b"EHLO client\r\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peek_timeout_is_configurable() -> anyhow::Result<()> {
    let smtp = tcp::server_first(b"220 hi\r\n").await?;
    let fwd = smtp.addr.to_string();
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", &fwd),
            ("WEFT_PROXY_DETECT_TIMEOUT", "20ms"),
        ],
    )
    .await?;
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.inbound).await?;
    let mut banner = [0u8; 8];
    s.read_exact(&mut banner).await?;
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// A client of a client-first binary protocol that waits past detection
/// before speaking is relayed on the one upstream connection the proxy
/// made to see who speaks first: its bytes arrive, and the application
/// sees one connection, not a spare one dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_opaque_client_is_relayed_on_one_upstream_connection() -> anyhow::Result<()> {
    let echo = tcp::echo().await?;
    let fwd = echo.addr.to_string();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_INBOUND_FORWARD", &fwd)]).await?;
    let mut s = TcpStream::connect(proxy.inbound).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let payload = [0u8, 1, 2, 3, 250, 251, 252, 253];
    s.write_all(&payload).await?;
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back)).await??;
    assert_eq!(back, payload);
    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "tcp_open_total",
            &[("direction", "inbound"), ("peer", "dst")]
        ),
        1.0,
        "{}",
        m.text
    );
    Ok(())
}
