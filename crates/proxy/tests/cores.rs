//! `WEFT_PROXY_CORES=2`: connections spread over two current-thread
//! runtimes, each with its own upstream connections, and a drain that
//! waits for both.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, get_h2, text};
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// CPU time (ns) of each of the proxy's threads, by thread name.
fn cpu_by_thread(pid: u32) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let name = std::fs::read_to_string(dir.join("comm"))?
            .trim()
            .to_string();
        let ns: u64 = std::fs::read_to_string(dir.join("schedstat"))?
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow::anyhow!("empty schedstat"))?
            .parse()?;
        *out.entry(name).or_default() += ns;
    }
    Ok(out)
}

/// A two-core proxy routing `svc.test:8080` to `backend`.
async fn two_cores(
    backend: &Backend,
    env: &[(&str, &str)],
) -> anyhow::Result<(Proxy, DestinationsFile)> {
    let file = DestinationsFile::new(&[("svc.test:8080", &[(backend.addr, 1)])])?;
    let path = file.path_str();
    let mut all = vec![
        ("WEFT_PROXY_DESTINATIONS", path.as_str()),
        ("WEFT_PROXY_CORES", "2"),
    ];
    all.extend_from_slice(env);
    let proxy = Proxy::start(PROXY.as_ref(), &all).await?;
    Ok((proxy, file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_cores_each_with_its_own_upstream() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let (proxy, _file) = two_cores(&backend, &[]).await?;
    let pid = proxy.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let before = cpu_by_thread(pid)?;
    assert!(before.contains_key("weft-core-1"), "{before:?}");

    // Four HTTP/2 connections, 300 requests each, 8 at a time per
    // connection.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let send = client::http2(proxy.outbound).await?;
        for _ in 0..8 {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..300 / 8 {
                    let rsp = send.send_request(get_h2("svc.test:8080", "/")?).await?;
                    anyhow::ensure!(text(rsp).await?.0 == 200);
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }

    // Each core served connections: both spent real CPU on them (the main
    // thread also accepted, so neither is expected at exactly half).
    let after = cpu_by_thread(pid)?;
    let spent =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    let (core0, core1) = (spent("weft-proxy"), spent("weft-core-1"));
    let total = (core0 + core1).max(1) as f64;
    assert!(
        core0 as f64 / total > 0.2 && core1 as f64 / total > 0.2,
        "core 0 {core0} ns, core 1 {core1} ns: one core did nearly everything"
    );

    // One HTTP/2 connection upstream per core, shared by that core's
    // client connections.
    let s = scrape(proxy.admin).await?;
    let upstream = s.sum(
        "tcp_open_total",
        &[("direction", "outbound"), ("peer", "dst")],
    );
    assert_eq!(upstream, 2.0, "{}", s.text);
    assert_eq!(
        s.sum(
            "request_total",
            &[("direction", "outbound"), ("authority", "svc.test:8080")]
        ),
        4.0 * (300 / 8 * 8) as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_connections_on_every_core() -> anyhow::Result<()> {
    let backend =
        Backend::start_with_delay("a", "127.0.0.1:0".parse()?, Duration::from_millis(600)).await?;
    let (mut proxy, _file) = two_cores(&backend, &[("WEFT_PROXY_SHUTDOWN_GRACE", "10s")]).await?;
    // Two connections: one per core. Each has a slow request in flight
    // when the drain starts; both must be answered.
    let mut inflight = Vec::new();
    for _ in 0..2 {
        let mut send = client::http1(proxy.outbound).await?;
        inflight.push(tokio::spawn(async move {
            send.ready().await?;
            let rsp = send.send_request(get("svc.test:8080", "/")?).await?;
            anyhow::Ok(text(rsp).await?.0)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.terminate()?;
    for t in inflight {
        assert_eq!(t.await??, 200);
    }
    let status = proxy.wait(Duration::from_secs(5)).await?;
    assert!(status.success(), "{status}: {}", proxy.log());
    Ok(())
}
