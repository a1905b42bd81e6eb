//! `weft stat` and `weft edges` run as the real binary against a real
//! mesh (control plane, two meshed proxies, a backend failing every 4th
//! request), checked against the requests the test actually sent.

use std::time::Duration;

use anyhow::Context;
use tokio::process::Command;
use weft_test_support::backend::Behaviour;
use weft_test_support::cli::Started;
use weft_test_support::client::Conn;
use weft_test_support::mesh::Mesh;
use weft_test_support::workspace_binary;

/// `weft ARGS`, once its window is open.
async fn sampling(args: &[&str]) -> anyhow::Result<Started> {
    Started::run(&workspace_binary("weft")?, args, "sampling").await
}

fn row<'a>(json: &'a serde_json::Value, name: &str) -> anyhow::Result<&'a serde_json::Value> {
    json["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .with_context(|| format!("no row {name} in {json}"))
}

#[tokio::test]
async fn stat_and_edges_report_the_requests_sent() -> anyhow::Result<()> {
    let mesh = Mesh::start_with(Behaviour {
        delay: Duration::ZERO,
        fail_every: Some(4),
        slow: None,
    })
    .await?;
    // The mesh, plus a proxy that is not there.
    let file = tempfile::NamedTempFile::new()?;
    mesh.write_targets(
        file.path(),
        &[serde_json::json!({"targets": ["127.0.0.1:1"], "labels": {"workload": "gone.demo"}})],
    )?;
    let t = file.path().to_string_lossy().into_owned();
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    // Warm: certificates, discovery and connections are in place before
    // the windows open, so every counted request is one the test sent.
    conn.get("api.demo:8080", "/").await?;

    let window = ["-t", "4s", "-o", "json", "--targets", &t];
    let service = sampling(&[&["stat"][..], &window].concat()).await?;
    let edge = sampling(&[&["stat", "web.demo", "--to", "api.demo"][..], &window].concat()).await?;
    let from =
        sampling(&[&["stat", "api.demo", "--from", "web.demo"][..], &window].concat()).await?;
    let edges = sampling(&[&["edges"][..], &window].concat()).await?;
    let by_route = sampling(&[&["stat", "--route"][..], &window].concat()).await?;

    let (mut sent, mut ok) = (0u64, 0u64);
    for _ in 0..40 {
        let (status, _, _) = conn.get("api.demo:8080", "/").await?;
        sent += 1;
        ok += u64::from(status.is_success());
    }
    assert!(
        ok < sent && ok > 0,
        "the backend fails every 4th: {ok}/{sent}"
    );

    let (stdout, said) = service.finish().await?;
    assert!(
        said.contains("skipping proxy 127.0.0.1:1 (gone.demo)"),
        "a stopped proxy is reported: {said}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout)?;
    let r = row(&json, "api.demo:8080")?;
    assert_eq!(r["requests"], sent, "{r}");
    assert_eq!(r["successes"], ok, "{r}");
    assert_eq!(r["mtls_share"], 1.0, "{r}");
    let rps = r["rps"].as_f64().unwrap_or(0.0);
    let secs = json["window_seconds"].as_f64().unwrap_or(0.0);
    assert!(
        (rps * secs - sent as f64).abs() < 0.01 && secs >= 4.0,
        "{json}"
    );
    assert!(r["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "{r}");

    // Plain HTTP with no routes configured: one route, `default`.
    let (stdout, _) = by_route.finish().await?;
    let json: serde_json::Value = serde_json::from_str(&stdout)?;
    let r = row(&json, "api.demo:8080 default")?;
    assert_eq!(r["requests"], sent, "{r}");

    for run in [edge, from] {
        let (stdout, _) = run.finish().await?;
        let json: serde_json::Value = serde_json::from_str(&stdout)?;
        let r = row(&json, "web.demo -> api.demo:8080")?;
        assert_eq!(
            (&r["requests"], &r["successes"]),
            (&sent.into(), &ok.into()),
            "{r}"
        );
    }

    let (stdout, _) = edges.finish().await?;
    let rows: serde_json::Value = serde_json::from_str(&stdout)?;
    let expected = serde_json::json!([{
        "src": "web.demo", "dst": "api.demo:8080",
        "client_id": "web.demo", "server_id": "api.demo",
        "requests": sent, "secured": true,
        "success_rate": ok as f64 / sent as f64,
    }]);
    let got: Vec<serde_json::Value> = rows
        .as_array()
        .context("edges is a list")?
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.as_object_mut().map(|o| o.remove("rps"));
            r
        })
        .collect();
    assert_eq!(serde_json::Value::from(got), expected);
    Ok(())
}

#[tokio::test]
async fn stat_without_targets_says_what_to_do() -> anyhow::Result<()> {
    let out = Command::new(workspace_binary("weft")?)
        .args(["stat", "--targets", "/nonexistent/targets.json"])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/targets.json") && stderr.contains("weft demo"),
        "{stderr}"
    );
    Ok(())
}
