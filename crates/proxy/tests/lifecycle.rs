//! SIGTERM: stop accepting, finish what is in flight (up to the grace
//! period), exit 0.

use std::time::{Duration, Instant};

use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::metrics::get_text;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

async fn setup(grace: &str) -> anyhow::Result<(Backend, Proxy, DestinationsFile)> {
    let backend = Backend::start("a").await?;
    let file = DestinationsFile::new(&[("svc.test:8080", &[(backend.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &path),
            ("WEFT_PROXY_SHUTDOWN_GRACE", grace),
        ],
    )
    .await?;
    Ok((backend, proxy, file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() -> anyhow::Result<()> {
    let (_b, mut proxy, _d) = setup("30s").await?;
    let outbound = proxy.outbound;
    let mut h1 = client::http1(outbound).await?;
    let mut h2 = client::http2(outbound).await?;
    let slow_h1 = tokio::spawn(async move {
        text(h1.send_request(get("svc.test:8080", "/slow/800")?).await?).await
    });
    let slow_h2 = tokio::spawn(async move {
        text(
            h2.send_request(weft_test_support::client::get_h2(
                "svc.test:8080",
                "/slow/800",
            )?)
            .await?,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    proxy.terminate()?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: not ready, and not accepting new connections.
    assert!(get_text(proxy.admin, "/ready").await.is_err());
    assert!(
        tokio::net::TcpStream::connect(outbound).await.is_err(),
        "still accepting"
    );

    let (status, _, body) = slow_h1.await??;
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
    let (status, _, _) = slow_h2.await??;
    assert_eq!(status, 200);
    let exit = proxy.wait(Duration::from_secs(10)).await?;
    assert_eq!(exit.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_bounds_the_drain() -> anyhow::Result<()> {
    let (_b, mut proxy, _d) = setup("300ms").await?;
    let mut h1 = client::http1(proxy.outbound).await?;
    let stuck = tokio::spawn(async move {
        h1.send_request(get("svc.test:8080", "/slow/10000")?)
            .await
            .map_err(anyhow::Error::from)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    proxy.terminate()?;
    let exit = proxy.wait(Duration::from_secs(5)).await?;
    assert_eq!(exit.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stuck.await?.is_err(),
        "the stuck request cannot have succeeded"
    );
    Ok(())
}
