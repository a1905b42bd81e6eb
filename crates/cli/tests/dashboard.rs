//! `weft dashboard` in a real headless Chromium, over a real mesh with
//! traffic: the page fills in live (server-sent events, no reload), shows a
//! row per service with non-zero RPS, the graph's nodes and edges, and the
//! check results; screenshots go to `target/dashboard/`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use weft_test_support::browser::{Firefox, chromium};
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

/// What `/api/tap?query` streams in its first second (or its status and
/// body when refused).
async fn tap(admin: std::net::SocketAddr, query: &str) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let mut send =
        weft_test_support::client::http1::<http_body_util::Empty<bytes::Bytes>>(admin).await?;
    let req = http::Request::get(format!("/api/tap?{query}"))
        .header(http::header::HOST, admin.to_string())
        .body(http_body_util::Empty::new())?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status();
    let mut body = rsp.into_body();
    let mut text = String::new();
    if !status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        return Ok(format!(
            "{} {}",
            status.as_u16(),
            String::from_utf8_lossy(&bytes)
        ));
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(frame)) = tokio::time::timeout_at(until, body.frame()).await {
        if let Ok(data) = frame?.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    Ok(text)
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
    // The api probed through the client's proxy and directly.
    let probes = dir.path().join("probes.yaml");
    std::fs::write(
        &probes,
        format!(
            "proxy: {}\ninterval: 300ms\nprobes:\n  - name: api\n    authority: api.demo:8080\n    direct: {}\n    http: {{path: /, status: 200}}\n",
            mesh.client.outbound, mesh.backend.addr
        ),
    )?;
    let (prober, prober_admin) = Started::weft_probe(&workspace_binary("weft")?, &probes).await?;
    let targets = dir.path().join("targets.json");
    mesh.write_targets(
        &targets,
        &[serde_json::json!({"targets": [prober_admin], "labels": {"role": "probe"}})],
    )?;
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
    // Until the window holds traffic and the probe has run both paths.
    let admin: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let snapshot: serde_json::Value = serde_json::from_str(
            &weft_test_support::metrics::get_text(admin, "/api/snapshot").await?,
        )?;
        let probed = snapshot["probes"][0]["status"] == "ok";
        let busy = snapshot["services"][0]["rps"].as_f64().unwrap_or(0.0) > 5.0;
        if probed && busy {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no traffic or probe results: {snapshot:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

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
    // The probe beside its service, and in its own table.
    assert_eq!(
        attrs(&dom, "data-probe-service"),
        ["api.demo:8080"],
        "{dom}"
    );
    assert_eq!(attrs(&dom, "data-probe"), ["api"], "{dom}");
    assert_eq!(attrs(&dom, "data-probe-status"), ["ok"], "{dom}");
    let checks = attrs(&dom, "data-check");
    assert!(checks.contains(&"ready") && checks.len() >= 5, "{checks:?}");
    assert!(dom.contains("live · updated"), "{dom}");

    // A service chosen: its routes only, its endpoints from discovery
    // (the api's proxy, proving api.demo), and its live tap, which stops
    // after five requests.
    let dom = chromium(
        &format!("{url}?updates=1&service=api.demo:8080&tap=5"),
        dir.path(),
        None,
    )
    .await?;
    assert_eq!(attrs(&dom, "data-tap"), ["/"; 5], "{dom}");
    assert!(dom.contains("paused after 5"), "{dom}");
    // Seen where the api receives them, from the client's identity.
    assert!(dom.contains("<td>web.demo</td>"), "{dom}");
    // Filters from the address fill the form and apply.
    let dom = chromium(
        &format!("{url}?updates=1&service=api.demo:8080&tap=2&method=get&path=/"),
        dir.path(),
        None,
    )
    .await?;
    assert_eq!(attrs(&dom, "data-tap"), ["/"; 2], "{dom}");
    // The server filters: a path no request takes yields only the opening
    // event; failures only, none (every request succeeds); a bad filter
    // is named.
    let opened = tap(admin, "service=api.demo:8080&path=/nothing").await?;
    let open: serde_json::Value = serde_json::from_str(
        opened
            .strip_prefix("event: open\ndata: ")
            .and_then(|s| s.lines().next())
            .with_context(|| format!("no opening event: {opened}"))?,
    )?;
    assert_eq!(open, serde_json::json!({"tapped": 2, "skipped": []}));
    assert!(!opened.contains("\ndata: {\"workload\""), "{opened}");
    let failures = tap(admin, "service=api.demo:8080&failures=1").await?;
    assert!(!failures.contains("\ndata: {\"workload\""), "{failures}");
    let all = tap(admin, "service=api.demo:8080&method=GET").await?;
    assert!(all.matches("\ndata: {\"workload\"").count() >= 5, "{all}");
    let bad = tap(admin, "direction=sideways").await?;
    assert!(bad.starts_with("400 direction \"sideways\""), "{bad}");
    let endpoint = mesh.server.inbound.to_string();
    assert_eq!(attrs(&dom, "data-endpoint"), [endpoint.as_str()], "{dom}");
    assert!(
        dom.contains("Endpoints of api.demo:8080") && dom.contains(">api.demo<"),
        "{dom}"
    );

    // The same page in Firefox, driven over WebDriver BiDi: live updates,
    // the service's row, the graph, the probe and the tap.
    let mut firefox = Firefox::start().await?;
    firefox
        .open(&format!("{url}?service=api.demo:8080&tap=5"))
        .await?;
    firefox
        .wait_for(
            "Number(document.body.dataset.updates || 0) >= 3 \
             && document.querySelectorAll('#tap tbody tr').length >= 5 \
             && document.querySelectorAll('#endpoints tbody tr').length >= 1",
            Duration::from_secs(20),
        )
        .await?;
    let dom = firefox.dom().await?;
    assert_eq!(attrs(&dom, "data-service"), ["api.demo:8080"], "{dom}");
    let mut nodes = attrs(&dom, "data-node");
    nodes.sort();
    assert_eq!(nodes, ["api.demo", "web.demo"], "{dom}");
    assert_eq!(attrs(&dom, "data-probe-status"), ["ok"], "{dom}");
    assert_eq!(attrs(&dom, "data-tap"), ["/"; 5], "{dom}");
    assert_eq!(attrs(&dom, "data-endpoint"), [endpoint.as_str()], "{dom}");
    let rps: f64 = firefox
        .eval("Number(document.querySelector('tr[data-service]').dataset.rps)")
        .await?
        .as_f64()
        .unwrap_or(0.0);
    assert!(rps > 5.0, "api.demo at {rps} rps in Firefox");
    let png = shots()?.join("firefox-service.png");
    firefox.screenshot(&png).await?;
    assert!(std::fs::metadata(&png)?.len() > 20_000);
    println!("screenshot: {}", png.display());
    drop(firefox);

    let png = shots()?.join("service.png");
    chromium(
        &format!("{url}?updates=2&service=api.demo:8080&tap=8"),
        dir.path(),
        Some(&png),
    )
    .await?;
    println!("screenshot: {}", png.display());
    let png = shots()?.join("overview.png");
    chromium(&format!("{url}?updates=2"), dir.path(), Some(&png)).await?;
    let size = std::fs::metadata(&png)?.len();
    assert!(size > 20_000, "{} is {size} bytes", png.display());
    println!("screenshot: {}", png.display());
    traffic.abort();
    drop(dashboard);
    drop(prober);
    Ok(())
}
