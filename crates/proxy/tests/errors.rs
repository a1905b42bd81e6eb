//! Bad input gets a clear answer and nobody else notices: configuration
//! errors name the variable, proxy failures name their reason.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::grpc;
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

async fn run_expecting_exit(env: &[(&str, &str)]) -> anyhow::Result<(i32, String)> {
    let out = tokio::process::Command::new(PROXY)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn bad_config_exits_64_naming_each_variable() -> anyhow::Result<()> {
    let (code, stderr) = run_expecting_exit(&[
        ("WEFT_PROXY_OUTBOUND_LISTEN", "localhost"),
        ("WEFT_PROXY_SHUTDOWN_GRACE", "forever"),
        ("WEFT_PROXY_DETECT_TIMEOUT", "5s"),
    ])
    .await?;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("WEFT_PROXY_OUTBOUND_LISTEN=\"localhost\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("WEFT_PROXY_SHUTDOWN_GRACE=\"forever\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("WEFT_PROXY_DETECT_TIMEOUT=\"5s\""),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_destinations_file_exits_64_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("d.yaml");
    std::fs::write(
        &file,
        "destinations:\n  \"svc.test:80\":\n    endpoints:\n      - addr: not-an-address\n",
    )?;
    let path = file.to_string_lossy().into_owned();
    let (code, stderr) = run_expecting_exit(&[
        ("WEFT_PROXY_DESTINATIONS", &path),
        ("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:0"),
        ("WEFT_PROXY_INBOUND_LISTEN", "127.0.0.1:0"),
        ("WEFT_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
    ])
    .await?;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("WEFT_PROXY_DESTINATIONS"), "{stderr}");
    assert!(stderr.contains("not-an-address"), "{stderr}");
    let (code, stderr) =
        run_expecting_exit(&[("WEFT_PROXY_DESTINATIONS", "/nonexistent/d.yaml")]).await?;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("/nonexistent/d.yaml"), "{stderr}");
    Ok(())
}

struct Setup {
    backend: Backend,
    proxy: Proxy,
    _file: DestinationsFile,
}

/// `svc.test:8080` works, `empty.test:80` has no endpoints, `down.test:80`
/// points at a closed port.
async fn setup() -> anyhow::Result<Setup> {
    let backend = Backend::start("ok").await?;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let file = DestinationsFile::new(&[
        ("svc.test:8080", &[(backend.addr, 1)]),
        ("empty.test:80", &[]),
        ("down.test:80", &[(closed, 1)]),
    ])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;
    Ok(Setup {
        backend,
        proxy,
        _file: file,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_and_connect_failures_are_503_with_a_reason() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut send = client::http1(s.proxy.outbound).await?;
    let (status, headers, _) = {
        send.ready().await?;
        text(send.send_request(get("empty.test", "/")?).await?).await?
    };
    assert_eq!(status, 503);
    let reason = headers["l5d-proxy-error"].to_str()?;
    assert!(
        reason.contains("no endpoints") && reason.contains("empty.test:80"),
        "{reason}"
    );

    let (status, headers, _) = {
        send.ready().await?;
        text(send.send_request(get("down.test", "/")?).await?).await?
    };
    assert_eq!(status, 503);
    let reason = headers["l5d-proxy-error"].to_str()?;
    assert!(reason.contains("connect"), "{reason}");

    // The connection is still good for the next request.
    send.ready().await?;
    let (status, _, body) = text(send.send_request(get("svc.test:8080", "/")?).await?).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));

    let m = scrape(s.proxy.admin).await?;
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "no_endpoints"), ("classification", "failure")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "connect"), ("status_code", "503")]
        ),
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_unavailable() -> anyhow::Result<()> {
    let s = setup().await?;
    let channel = grpc::channel_via(s.proxy.outbound, "empty.test:80").await?;
    let err = grpc::check(&channel, grpc::SERVING)
        .await
        .expect_err("no endpoints");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no endpoints"), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_others_are_unaffected() -> anyhow::Result<()> {
    let s = setup().await?;
    // A client with a healthy connection open before and after.
    let mut good = client::http1(s.proxy.outbound).await?;
    good.ready().await?;
    text(good.send_request(get("svc.test:8080", "/")?).await?).await?;

    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: svc.test:8080\r\nContent-Length: nope\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b c\r\n\r\n",
    ] {
        let mut raw = tokio::net::TcpStream::connect(s.proxy.outbound).await?;
        raw.write_all(garbage).await?;
        let mut rsp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rsp)).await??;
        let rsp = String::from_utf8_lossy(&rsp);
        assert!(
            rsp.starts_with("HTTP/1.1 400"),
            "{:?} -> {rsp}",
            String::from_utf8_lossy(garbage)
        );
    }

    good.ready().await?;
    let (status, _, body) = text(good.send_request(get("svc.test:8080", "/")?).await?).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
    assert_eq!(s.backend.hits(), 2, "garbage must not reach the backend");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_endpoint() -> anyhow::Result<()> {
    let live = Backend::start("live").await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let file = DestinationsFile::new(&[("mixed.test:80", &[(closed, 1), (live.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;
    let mut h1 = client::http1(proxy.outbound).await?;
    let mut h2 = client::http2(proxy.outbound).await?;
    for _ in 0..50 {
        h1.ready().await?;
        let (status, _, body) = text(h1.send_request(get("mixed.test", "/")?).await?).await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, "live"));
        let rsp = h2.send_request(client::get_h2("mixed.test", "/")?).await?;
        assert_eq!(text(rsp).await?.0, 200);
    }
    assert_eq!(live.hits(), 100);
    Ok(())
}

#[tokio::test]
async fn help_lists_every_variable_and_stray_arguments_are_refused() -> anyhow::Result<()> {
    let out = tokio::process::Command::new(PROXY)
        .arg("--help")
        .output()
        .await?;
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout)?;
    for var in [
        "WEFT_PROXY_OUTBOUND_LISTEN",
        "WEFT_PROXY_DESTINATIONS",
        "WEFT_PROXY_SHUTDOWN_GRACE",
        "WEFT_PROXY_CORES",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
    let out = tokio::process::Command::new(PROXY)
        .arg("--listen")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(64));
    Ok(())
}

/// A gRPC server that fails after it started answering: the client gets
/// the data that came, then trailers with a gRPC status and a
/// percent-encoded message, not a bare stream reset it cannot interpret.
#[tokio::test]
async fn a_grpc_failure_after_the_headers_ends_in_trailers() -> anyhow::Result<()> {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    use futures_util::StreamExt;
                    let frames = futures_util::stream::iter([
                        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                        Err(std::io::Error::other("the server died")),
                    ])
                    .then(|f| async {
                        // The data goes out before the failure.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        f
                    });
                    let body = http_body_util::StreamBody::new(frames);
                    let rsp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)?;
                    anyhow::Ok(rsp)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
            });
        }
    });
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_INBOUND_FORWARD", &upstream_addr.to_string())],
    )
    .await?;
    let mut send = client::http2(proxy.inbound).await?;
    let request = http::Request::post("http://svc.test/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")))?;
    let rsp = send.send_request(request).await?;
    assert_eq!(rsp.status(), 200);
    let collected = tokio::time::timeout(Duration::from_secs(5), rsp.into_body().collect())
        .await?
        .map_err(|e| anyhow::anyhow!("the body failed instead of ending in trailers: {e}"))?;
    let trailers = collected
        .trailers()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no trailers: {collected:?}\n{}", proxy.log()))?;
    assert_eq!(collected.to_bytes().as_ref(), b"\0\0\0\0\x02hi");
    assert_eq!(trailers["grpc-status"], "14");
    let message = trailers["grpc-message"].to_str()?;
    // Printable ASCII but '%' passes as it is; the rest is %-encoded
    // (grpc_messages_are_percent_encoded covers the encoding itself).
    assert!(message.contains("mid-stream"), "{message}");
    Ok(())
}
