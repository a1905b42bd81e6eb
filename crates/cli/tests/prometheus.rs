//! A real Prometheus, configured with the scrape configuration the repo
//! ships, scraping two meshed proxies: `weft stat --prometheus` must report
//! exactly the request counts the proxies themselves export.

use std::time::Duration;

use anyhow::Context;
use weft_test_support::backend::Behaviour;
use weft_test_support::client::Conn;
use weft_test_support::mesh::Mesh;
use weft_test_support::metrics::scrape;
use weft_test_support::prometheus::Prometheus;
use weft_test_support::workspace_binary;

const SHIPPED: &str = include_str!("../../../deploy/prometheus/prometheus.yml");
const DASHBOARD: &str = include_str!("../../../deploy/grafana/weft-golden.json");

/// Every query of the shipped Grafana dashboard is valid PromQL, and the
/// golden-metric panels have data from the mesh.
async fn dashboard_queries_work(prometheus: &Prometheus) -> anyhow::Result<()> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD)?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut checked = 0;
    for panel in panels.iter().filter(|p| p["type"] == "timeseries") {
        let title = panel["title"].as_str().unwrap_or("?");
        for t in panel["targets"].as_array().context("targets")? {
            let expr = t["expr"]
                .as_str()
                .context("expr")?
                .replace("$__rate_interval", "1m")
                .replace("$workload", ".*")
                .replace("$service", ".*");
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("query", &expr)
                .finish();
            let golden = [
                "Success rate",
                "Requests per second",
                "Latency",
                "Share of",
                "Edge",
            ];
            let needs_data = golden.iter().any(|g| title.starts_with(g));
            // rate() needs two samples after the series appeared.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let body = weft_test_support::metrics::get_text(
                    prometheus.addr,
                    &format!("/api/v1/query?{query}"),
                )
                .await
                .with_context(|| format!("panel {title:?}: {expr}"))?;
                let json: serde_json::Value = serde_json::from_str(&body)?;
                assert_eq!(json["status"], "success", "{title}: {expr}: {body}");
                let results = json["data"]["result"].as_array().map_or(0, Vec::len);
                if !needs_data || results > 0 {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "panel {title:?} has no data: {expr}: {body}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} queries");
    Ok(())
}

async fn weft_stat(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .arg("stat")
        .args(args)
        .args(["-o", "json"])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "weft stat {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_str(&stdout)?)
}

fn count(json: &serde_json::Value, name: &str) -> Option<(u64, u64)> {
    let row = json["rows"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)?;
    Some((row["requests"].as_u64()?, row["successes"].as_u64()?))
}

#[tokio::test]
async fn stat_from_prometheus_matches_the_proxies_counts() -> anyhow::Result<()> {
    let out = tokio::process::Command::new("promtool")
        .args(["check", "config", "../../deploy/prometheus/prometheus.yml"])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mesh = Mesh::start_with(Behaviour {
        delay: Duration::ZERO,
        fail_every: Some(5),
        slow: None,
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.json");
    mesh.write_targets(&targets, &[])?;
    let config = SHIPPED
        .replace("/etc/weft/targets.json", &targets.to_string_lossy())
        .replace("scrape_interval: 10s", "scrape_interval: 1s");
    let prometheus = Prometheus::start(&config).await?;

    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    for _ in 0..30 {
        conn.get("api.demo:8080", "/").await?;
    }
    let server = scrape(mesh.server.admin).await?;
    let inbound = [("direction", "inbound"), ("authority", "api.demo:8080")];
    let sent = server.sum("response_total", &inbound) as u64;
    let ok = server.sum(
        "response_total",
        &[inbound[0], inbound[1], ("classification", "success")],
    ) as u64;
    assert_eq!((sent, ok), (30, 24), "the proxy's own count");

    // Prometheus's first samples take a few scrapes to arrive.
    let url = prometheus.url();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let service = weft_stat(&["--prometheus", &url, "-t", "5m"]).await?;
        let edge = weft_stat(&[
            "web.demo",
            "--to",
            "api.demo",
            "--prometheus",
            &url,
            "-t",
            "5m",
        ])
        .await?;
        if count(&service, "api.demo:8080") == Some((sent, ok))
            && count(&edge, "web.demo -> api.demo:8080") == Some((sent, ok))
        {
            let row = &service["rows"][0];
            assert_eq!(service["source"], "prometheus");
            assert_eq!(row["mtls_share"], 1.0, "{row}");
            assert!(row["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{row}");
            break;
        }
        let last = serde_json::json!({"service": service, "edge": edge});
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never agreed with the proxies ({sent} sent, {ok} ok): {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    dashboard_queries_work(&prometheus).await?;

    // The control plane is scraped by its own job, not as a proxy.
    let up = weft_test_support::metrics::get_text(
        prometheus.addr,
        "/api/v1/query?query=up%7Bjob%3D%22weft-control%22%7D",
    )
    .await?;
    assert!(up.contains(&mesh.control.admin.to_string()), "{up}");

    // A bad address is a clear error.
    let err = weft_stat(&["--prometheus", "http://127.0.0.1:1", "-t", "1m"])
        .await
        .err()
        .context("an unreachable Prometheus must fail")?;
    assert!(
        format!("{err:#}").contains("asking Prometheus at http://127.0.0.1:1"),
        "{err:#}"
    );
    Ok(())
}
