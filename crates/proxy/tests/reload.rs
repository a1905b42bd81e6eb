//! Destinations file changes apply within a second, never drop in-flight
//! requests, and a bad edit keeps the last good version.

use std::time::{Duration, Instant};

use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");
const AUTHORITY: &str = "svc.test:8080";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_apply_within_a_second_without_dropping_requests() -> anyhow::Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let file = DestinationsFile::new(&[(AUTHORITY, &[(a.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(PROXY.as_ref(), &[("WEFT_PROXY_DESTINATIONS", &path)]).await?;

    // A slow request in flight on `a` while `a` is removed.
    let outbound = proxy.outbound;
    let in_flight = tokio::spawn(async move {
        let mut send = client::http1(outbound).await?;
        let (status, _, body) =
            text(send.send_request(get(AUTHORITY, "/slow/1500")?).await?).await?;
        anyhow::Ok((status.as_u16(), body))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    file.write(&[(AUTHORITY, &[(b.addr, 1)])])?;
    let changed = Instant::now();
    let mut send = client::http1(proxy.outbound).await?;
    loop {
        send.ready().await?;
        let (status, _, body) = text(send.send_request(get(AUTHORITY, "/")?).await?).await?;
        assert_eq!(status, 200);
        if body == "b" {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "change not applied after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied = changed.elapsed();
    assert!(
        applied < Duration::from_secs(1),
        "applied after {applied:?}"
    );

    assert_eq!(
        in_flight.await??,
        (200, "a".to_string()),
        "in-flight request was dropped"
    );

    // A bad edit is logged and ignored.
    std::fs::write(file.path(), "destinations: [this is not a map\n")?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..20 {
        send.ready().await?;
        let (status, _, body) = text(send.send_request(get(AUTHORITY, "/")?).await?).await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, "b"));
    }
    assert!(
        proxy.log().contains("bad destinations edit ignored"),
        "{}",
        proxy.log()
    );

    // And the next good edit applies again.
    file.write(&[(AUTHORITY, &[(a.addr, 1)])])?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    send.ready().await?;
    let (_, _, body) = text(send.send_request(get(AUTHORITY, "/")?).await?).await?;
    assert_eq!(body, "a");
    Ok(())
}
