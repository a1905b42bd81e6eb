//! HTTP semantics end to end: streaming bodies in bounded memory, chunked
//! encoding, trailers, `Expect: 100-continue`, protocol upgrades and
//! hop-by-hop headers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, get_h2, text};
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");
const AUTHORITY: &str = "svc.test:8080";

async fn setup() -> anyhow::Result<(Backend, Proxy, DestinationsFile)> {
    let backend = Backend::start("body").await?;
    let file = DestinationsFile::new(&[(AUTHORITY, &[(backend.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;
    Ok((backend, proxy, file))
}

type StreamedBody = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
>;

/// `total` bytes in `chunk`-sized frames, with no Content-Length: chunked.
fn chunks(total: usize, chunk: usize) -> StreamedBody {
    let data = Bytes::from(vec![7u8; chunk]);
    let frames: Vec<_> = (0..total.div_ceil(chunk))
        .map(|i| Ok(Frame::data(data.slice(..chunk.min(total - i * chunk)))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_upload_streams_in_bounded_memory() -> anyhow::Result<()> {
    let (_b, proxy, _d) = setup().await?;
    const GIB: usize = 1 << 30;
    let frames = (0..GIB / (256 * 1024)).map(|_| {
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![1u8; 256 * 1024])))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut send = client::http1(proxy.outbound).await?;
    let req = Request::post(format!("http://{AUTHORITY}/count"))
        .header(http::header::HOST, AUTHORITY)
        .body(body)?;
    let (status, _, count) = text(send.send_request(req).await?).await?;
    assert_eq!((status.as_u16(), count.as_str()), (200, "1073741824"));
    let peak = proxy.peak_rss_bytes()?;
    assert!(
        peak < 64 << 20,
        "proxy peak RSS {} MiB while streaming 1 GiB",
        peak >> 20
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_http2_downloads_respect_flow_control() -> anyhow::Result<()> {
    let (_b, proxy, _d) = setup().await?;
    let mut send = client::http2(proxy.outbound).await?;
    let rsp = send
        .send_request(get_h2(AUTHORITY, "/bytes/268435456")?)
        .await?;
    let mut body = rsp.into_body();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            n += d.len();
        }
    }
    assert_eq!(n, 256 << 20);
    assert!(proxy.peak_rss_bytes()? < 64 << 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_and_trailers_pass_on_both_versions() -> anyhow::Result<()> {
    let (_b, proxy, _d) = setup().await?;
    // HTTP/1.1: chunked request body echoed back chunked.
    let mut h1 = client::http1(proxy.outbound).await?;
    let req = Request::post(format!("http://{AUTHORITY}/echo"))
        .header(http::header::HOST, AUTHORITY)
        .body(chunks(100_000, 1000))?;
    let rsp = h1.send_request(req).await?;
    assert_eq!(rsp.headers()[http::header::TRANSFER_ENCODING], "chunked");
    let echoed = rsp.into_body().collect().await?.to_bytes();
    assert_eq!(echoed.len(), 100_000);

    // HTTP/1.1 trailers, for a client that says it accepts them.
    h1.ready().await?;
    let req = Request::get(format!("http://{AUTHORITY}/trailers"))
        .header(http::header::HOST, AUTHORITY)
        .header(http::header::TE, "trailers")
        .body(chunks(0, 1))?;
    let collected = h1.send_request(req).await?.into_body().collect().await?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("x-trailer").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    assert_eq!(collected.to_bytes(), "body");

    // HTTP/2 trailers.
    let mut h2 = client::http2(proxy.outbound).await?;
    let collected = h2
        .send_request(get_h2(AUTHORITY, "/trailers")?)
        .await?
        .into_body()
        .collect()
        .await?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("x-trailer").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_promptly() -> anyhow::Result<()> {
    let (_b, proxy, dir) = setup().await?;
    let file = dir.dir().join("upload.bin");
    std::fs::write(&file, vec![0u8; 2 << 20])?;
    let started = Instant::now();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-x", &format!("http://{}", proxy.outbound)])
        .args(["-H", "Expect: 100-continue", "--expect100-timeout", "5"])
        .args(["--data-binary", &format!("@{}", file.display())])
        .arg(format!("http://{AUTHORITY}/count"))
        .output()
        .await?;
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?, (2u64 << 20).to_string());
    // Without a 100 Continue, curl would wait out its 5 s timeout.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_relayed() -> anyhow::Result<()> {
    let (_b, proxy, _d) = setup().await?;
    let mut s = tokio::net::TcpStream::connect(proxy.outbound).await?;
    s.write_all(
        format!("GET /upgrade HTTP/1.1\r\nHost: {AUTHORITY}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    let head = String::from_utf8(head)?.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"ping over the upgraded connection").await?;
    let mut back = [0u8; 33];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
    assert_eq!(&back, b"ping over the upgraded connection");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() -> anyhow::Result<()> {
    let (_b, proxy, _d) = setup().await?;
    let mut send = client::http1(proxy.outbound).await?;
    let mut req = get(AUTHORITY, "/headers")?;
    let h = req.headers_mut();
    h.insert(http::header::CONNECTION, "keep-alive, x-hop".parse()?);
    h.insert("x-hop", "1".parse()?);
    h.insert("keep-alive", "timeout=5".parse()?);
    h.insert(http::header::PROXY_AUTHORIZATION, "Basic c2VjcmV0".parse()?);
    h.insert("x-end-to-end", "1".parse()?);
    let (_, _, seen) = text(send.send_request(req).await?).await?;
    for gone in ["x-hop", "keep-alive", "proxy-authorization"] {
        assert!(!seen.contains(gone), "{gone} was forwarded:\n{seen}");
    }
    assert!(seen.contains("x-end-to-end: 1"), "{seen}");
    assert!(seen.contains(&format!("host: {AUTHORITY}")), "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_resets_propagate_both_ways() -> anyhow::Result<()> {
    let (backend, proxy, _d) = setup().await?;
    let mut h2 = client::http2(proxy.outbound).await?;

    // The client gives up on a slow request: its RST_STREAM reaches the
    // backend as a cancelled request, not a response nobody reads.
    let slow = h2.send_request(get_h2(AUTHORITY, "/slow/5000")?);
    let _ = tokio::time::timeout(Duration::from_millis(300), slow).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while backend.cancelled() == 0 {
        assert!(
            Instant::now() < deadline,
            "backend never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The backend resets mid-body: the client sees a stream error, and the
    // connection still carries other requests.
    let rsp = h2.send_request(get_h2(AUTHORITY, "/reset")?).await?;
    assert_eq!(rsp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), rsp.into_body().collect()).await?;
    assert!(body.is_err(), "a reset stream must not look complete");
    let rsp = h2.send_request(get_h2(AUTHORITY, "/")?).await?;
    assert_eq!(text(rsp).await?.0, 200);

    let m = weft_test_support::metrics::scrape(proxy.admin).await?;
    assert!(
        m.sum(
            "response_total",
            &[("error", "stream"), ("classification", "failure")]
        ) >= 1.0,
        "{}",
        m.text
    );
    Ok(())
}
