//! `weft demo`, the README's main command, run as the real binary: a
//! control plane and six meshed proxies carrying HTTP/1.1, HTTP/2 and gRPC
//! traffic, all of it over mutual TLS.

use anyhow::Context;
use weft_test_support::workspace_binary;

#[tokio::test]
async fn the_demo_mesh_serves_every_service_over_mutual_tls() -> anyhow::Result<()> {
    let targets = tempfile::tempdir()?;
    let targets = targets.path().join("targets.json");
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(["demo", "--duration", "5s", "--every", "2s", "--rps", "40"])
        .args(["-o", "json", "--targets"])
        .arg(&targets)
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("weft stat"),
        "it says where to look: {stdout}"
    );
    assert!(stdout.contains("100% mTLS"), "live lines: {stdout}");
    assert!(
        !targets.exists(),
        "the targets file goes with the demo's proxies"
    );
    let json_start = stdout
        .find("\n{\n")
        .map(|i| i + 1)
        .with_context(|| format!("no JSON in:\n{stdout}"))?;
    let report: serde_json::Value = serde_json::from_str(&stdout[json_start..])?;
    let service = |name: &str| {
        report["services"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == name))
            .cloned()
            .with_context(|| format!("no {name} in {stdout}"))
    };
    for (name, min_ok, max_ok) in [
        // api fails 1 in 20; web fails when api does.
        ("web.demo:8080", 0.88, 0.99),
        ("api.demo:8080", 0.88, 0.99),
        ("health.demo:9090", 1.0, 1.0),
    ] {
        let r = service(name)?;
        let ok = r["success_rate"].as_f64().unwrap_or(-1.0);
        assert!((min_ok..=max_ok).contains(&ok), "{name}: success {ok}");
        assert_eq!(r["mtls_share"].as_f64(), Some(1.0), "{name}: {r}");
        let rps = r["rps"].as_f64().unwrap_or(0.0);
        assert!(rps > 25.0, "{name}: {rps} rps");
    }
    let web_requests = service("web.demo:8080")?["requests"].clone();
    for (src, dst) in [
        ("traffic.demo", "web.demo:8080"),
        ("web.demo", "api.demo:8080"),
        ("web.demo", "health.demo:9090"),
    ] {
        let e = report["edges"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["src"] == src && r["dst"] == dst))
            .with_context(|| format!("no edge {src} -> {dst} in {stdout}"))?;
        assert_eq!(e["secured"], true, "{e}");
        assert_eq!(e["client_id"], src, "{e}");
        // Every front-end request makes one call to each dependency.
        assert_eq!(e["requests"], web_requests, "{e}");
    }
    Ok(())
}
