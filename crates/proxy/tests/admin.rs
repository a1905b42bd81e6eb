//! The admin server: readiness, liveness, config dump and metrics that
//! Prometheus's own linter accepts.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::metrics::{get_text, scrape};
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_metrics_lint_clean() -> anyhow::Result<()> {
    let backend = Backend::start("a").await?;
    let file = DestinationsFile::new(&[("svc.test:8080", &[(backend.addr, 1)])])?;
    let path = file.path_str();
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &path),
            ("WEFT_PROXY_INBOUND_FORWARD", &backend.addr.to_string()),
        ],
    )
    .await?;

    assert_eq!(get_text(proxy.admin, "/ready").await?, "ready\n");
    assert_eq!(get_text(proxy.admin, "/live").await?, "live\n");
    let env: serde_json::Value = serde_json::from_str(&get_text(proxy.admin, "/env.json").await?)?;
    assert_eq!(env["destinations"], path.as_str());
    assert_eq!(env["shutdown_grace"], "30s");
    assert!(get_text(proxy.admin, "/nope").await.is_err());

    // Traffic both ways so every family has samples.
    let mut out = client::http1(proxy.outbound).await?;
    text(
        out.send_request(get("svc.test:8080", "/status/500")?)
            .await?,
    )
    .await?;
    let mut inb = client::http1(proxy.inbound).await?;
    text(inb.send_request(get("svc.test:8080", "/")?).await?).await?;

    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "response_total",
            &[
                ("direction", "outbound"),
                ("classification", "failure"),
                ("status_code", "500")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[("direction", "inbound"), ("classification", "success")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "inbound"), ("authority", "svc.test:8080")]
        ),
        1.0
    );
    // CPU time may still round to zero ticks this early; it must be there.
    assert!(
        m.text.contains("\nprocess_cpu_seconds_total "),
        "{}",
        m.text
    );
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            m.sum(name, &[]) > 0.0,
            "{name} missing or zero:\n{}",
            m.text
        );
    }
    let buckets = m.buckets("response_latency_ms", &[("direction", "outbound")]);
    let les: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
    assert_eq!(
        les,
        [
            1.0,
            2.0,
            3.0,
            4.0,
            5.0,
            10.0,
            20.0,
            30.0,
            40.0,
            50.0,
            100.0,
            200.0,
            300.0,
            400.0,
            500.0,
            1000.0,
            2000.0,
            3000.0,
            4000.0,
            5000.0,
            10000.0,
            20000.0,
            30000.0,
            40000.0,
            50000.0,
            f64::INFINITY
        ]
    );
    assert_eq!(buckets.last().map(|b| b.1), Some(1.0));

    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool (Debian package prometheus) is needed: {e}"))?;
    let mut stdin = promtool
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    stdin.write_all(m.text.as_bytes()).await?;
    drop(stdin);
    let out = promtool.wait_with_output().await?;
    // promtool objects to two names, both Linkerd's and kept so existing
    // dashboards work: the unit abbreviation in `response_latency_ms` and
    // the `_count` suffix of `identity_cert_refresh_count`. Anything else it
    // reports is a defect.
    const LINKERD_NAMES: [&str; 2] = [
        "response_latency_ms metric names should not contain abbreviated units",
        "identity_cert_refresh_count non-histogram and non-summary metrics should not have \"_count\" suffix",
    ];
    let findings =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let unexpected: Vec<&str> = findings
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !LINKERD_NAMES.contains(l))
        .collect();
    assert!(unexpected.is_empty(), "promtool check metrics:\n{findings}");
    Ok(())
}

/// What a peer can hold on the admin port is bounded: connections beyond
/// the cap are closed at once, silent ones at the header timeout, after
/// which the port serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_bounds_connections_and_silence() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &file.path_str())],
    )
    .await?;
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(proxy.admin).await?);
    }
    // Past the cap: closed at once.
    let mut extra = tokio::net::TcpStream::connect(proxy.admin).await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await?;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the 65th connection was served"
    );
    // Silent: closed at the header timeout (10 s).
    for s in &mut held {
        let left = Duration::from_secs(13).saturating_sub(started.elapsed());
        let n = tokio::time::timeout(left, s.read(&mut buf)).await?;
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9), "{took:?}");
    assert_eq!(get_text(proxy.admin, "/ready").await?, "ready\n");
    Ok(())
}
