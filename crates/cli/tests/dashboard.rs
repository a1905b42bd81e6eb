//! `weft dashboard` in a real headless Chromium, over a real mesh with
//! traffic: the page fills in live (server-sent events, no reload), shows a
//! row per service with non-zero RPS, the graph's nodes and edges, and the
//! check results; screenshots go to `target/dashboard/`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use weft_test_support::cli::Started;
use weft_test_support::client::Conn;
use weft_test_support::mesh::Mesh;
use weft_test_support::workspace_binary;

/// `target/dashboard`, where the screenshots are kept.
fn shots() -> anyhow::Result<PathBuf> {
    let weft = workspace_binary("weft")?;
    let target = weft
        .parent()
        .and_then(|d| d.parent())
        .context("no target directory")?;
    let dir = target.join("dashboard");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Headless Chromium on `url`: `--dump-dom`, or a screenshot to `png`.
async fn chromium(
    url: &str,
    profile: &std::path::Path,
    png: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.env("HOME", profile)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
            "--window-size=1280,1400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("chromium").display()
        ))
        .kill_on_drop(true);
    match png {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.arg(url).output())
        .await
        .context("chromium did not finish within 60 s")??;
    anyhow::ensure!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every value of attribute `name` in `html`.
fn attrs<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let key = format!("{name}=\"");
    html.match_indices(&key)
        .filter_map(|(i, _)| {
            let rest = &html[i + key.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_mesh_live_in_a_browser() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.json");
    mesh.write_targets(&targets, &[])?;
    // Traffic all along: web → api through the client's proxy.
    let client = mesh.client.outbound;
    let traffic = tokio::spawn(async move {
        let mut conn = Conn::connect(client, false).await?;
        loop {
            conn.get("api.demo:8080", "/").await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });
    let dashboard = Started::run(
        &workspace_binary("weft")?,
        &[
            "dashboard",
            "--listen",
            "127.0.0.1:0",
            "--refresh",
            "500ms",
            "--targets",
            &targets.to_string_lossy(),
        ],
        "weft dashboard: http://",
    )
    .await?;
    let url = dashboard
        .said()
        .split("weft dashboard: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("no URL")?
        .to_string();
    // Two refreshes, so the window holds traffic.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let dom = chromium(&format!("{url}?updates=3"), dir.path(), None).await?;
    // The first snapshot, then three pushed live.
    assert_eq!(attrs(&dom, "data-updates"), ["4"], "{dom}");
    let services = attrs(&dom, "data-service");
    assert_eq!(services, ["api.demo:8080"], "{dom}");
    let rps: f64 = attrs(&dom, "data-rps")
        .first()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    assert!(rps > 5.0, "api.demo at {rps} rps");
    let mut nodes = attrs(&dom, "data-node");
    nodes.sort();
    assert_eq!(nodes, ["api.demo", "web.demo"], "{dom}");
    assert_eq!(attrs(&dom, "data-src"), ["web.demo"]);
    assert_eq!(attrs(&dom, "data-dst"), ["api.demo:8080"]);
    assert!(
        dom.contains("100.0% · mTLS"),
        "the edge's success rate and mTLS: {dom}"
    );
    // Per route: the api's requests, all on its default route.
    assert_eq!(
        attrs(&dom, "data-route-service"),
        ["api.demo:8080"],
        "{dom}"
    );
    assert_eq!(attrs(&dom, "data-route"), ["default"]);
    let checks = attrs(&dom, "data-check");
    assert!(checks.contains(&"ready") && checks.len() >= 5, "{checks:?}");
    assert!(dom.contains("live · updated"), "{dom}");

    // A service chosen: its routes only, and its endpoints from discovery
    // (the api's proxy, proving api.demo).
    let dom = chromium(
        &format!("{url}?updates=1&service=api.demo:8080"),
        dir.path(),
        None,
    )
    .await?;
    let endpoint = mesh.server.inbound.to_string();
    assert_eq!(attrs(&dom, "data-endpoint"), [endpoint.as_str()], "{dom}");
    assert!(
        dom.contains("Endpoints of api.demo:8080") && dom.contains(">api.demo<"),
        "{dom}"
    );

    let png = shots()?.join("overview.png");
    chromium(&format!("{url}?updates=2"), dir.path(), Some(&png)).await?;
    let size = std::fs::metadata(&png)?.len();
    assert!(size > 20_000, "{} is {size} bytes", png.display());
    println!("screenshot: {}", png.display());
    traffic.abort();
    drop(dashboard);
    Ok(())
}
