//! Transparent mode in a network namespace of our own: iptables `REDIRECT`
//! sends an application's connections to the outbound listener, and the
//! proxy recovers where they were going with `SO_ORIGINAL_DST`.
//!
//! Needs root, `ip` (iproute2) and `iptables`; `.ci/run` installs them.

use std::time::{Duration, Instant};

use weft_test_support::netns::Netns;
use weft_test_support::proxy::Proxy;
use weft_test_support::workspace_binary;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// A namespace with a veth holding 10.99.0.0/24 (addresses nothing
/// listens on), and a nat rule redirecting every TCP connection to that
/// range to the proxy's outbound port 4140.
fn redirecting_netns() -> anyhow::Result<Netns> {
    let ns = Netns::new("transparent")?;
    ns.exec(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ])?;
    ns.exec(&["ip", "addr", "add", "10.99.0.254/24", "dev", "v0"])?;
    ns.exec(&["ip", "link", "set", "v0", "up"])?;
    ns.exec(&["ip", "link", "set", "v1", "up"])?;
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.99.0.0/24",
        "-j",
        "REDIRECT",
        "--to-ports",
        "4140",
    ])?;
    Ok(ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connections_reach_their_original_destination() -> anyhow::Result<()> {
    let ns = redirecting_netns()?;
    let backend = workspace_binary("weft-test-backend")?;
    let backend = backend.to_string_lossy().into_owned();
    let mut peers = Vec::new();
    for (mode, listen) in [
        ("http", "127.0.0.1:18080"),
        ("banner", "127.0.0.1:18025"),
        ("echo", "127.0.0.1:18007"),
    ] {
        peers.push(ns.spawn(&[
            &backend, "--mode", mode, "--listen", listen, "--name", "inside",
        ])?);
    }

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("d.yaml");
    std::fs::write(
        &file,
        "destinations:\n\
         \x20 \"10.99.0.1:80\":\n    endpoints:\n      - addr: 127.0.0.1:18080\n\
         \x20 \"10.99.0.2:25\":\n    endpoints:\n      - addr: 127.0.0.1:18025\n\
         \x20 \"10.99.0.3:7\":\n    endpoints:\n      - addr: 127.0.0.1:18007\n\
         \x20 \"web.test:80\":\n    addresses: [\"10.99.0.9:80\"]\n    endpoints:\n      - addr: 127.0.0.1:18080\n",
    )?;
    let path = file.to_string_lossy().into_owned();
    let wrapper = ["ip", "netns", "exec", ns.name.as_str()];
    let _proxy = Proxy::spawn(
        &wrapper,
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &path),
            ("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140"),
            ("WEFT_PROXY_ADMIN_LISTEN", "127.0.0.1:4191"),
        ],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns
        .exec(&["curl", "-sf", "http://127.0.0.1:4191/ready"])
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "proxy in namespace never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the peers time to bind as well.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An application that knows nothing of the proxy.
    assert_eq!(
        ns.exec(&["curl", "-sS", "--max-time", "5", "http://10.99.0.1/"])?,
        "inside"
    );
    // A service's own address (a virtual IP) routes as the service.
    assert_eq!(
        ns.exec(&["curl", "-sS", "--max-time", "5", "http://10.99.0.9/"])?,
        "inside"
    );
    // HTTP/1.0 without Host: only the original destination says where.
    let no_host = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--http1.0",
        "-H",
        "Host:",
        "http://10.99.0.1/",
    ])?;
    assert_eq!(no_host, "inside");
    // Server speaks first: the banner arrives after the short peek timeout.
    let started = Instant::now();
    let banner = ns.exec(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.99.0.2/25; timeout 3 head -c 21 <&3",
    ])?;
    assert_eq!(banner, "220 weft-test ready\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Opaque bytes to the original destination.
    let echoed = ns.exec(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.99.0.3/7; printf 'opaque\\n' >&3; timeout 3 head -c 7 <&3",
    ])?;
    assert_eq!(echoed, "opaque\n");

    let metrics = ns.exec(&["curl", "-sS", "http://127.0.0.1:4191/metrics"])?;
    let m = weft_test_support::metrics::Scrape::parse(metrics)?;
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "outbound"), ("authority", "10.99.0.1:80")]
        ),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "outbound"), ("authority", "web.test:80")]
        ),
        1.0,
        "{}",
        m.text
    );
    assert!(
        m.sum(
            "tcp_open_total",
            &[("direction", "outbound"), ("peer", "src")]
        ) >= 5.0,
        "{}",
        m.text
    );
    Ok(())
}
