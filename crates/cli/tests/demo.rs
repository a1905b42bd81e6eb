//! `weft demo`, the README's main command, run as the real binary: a
//! control plane and seven meshed proxies carrying HTTP/1.1, HTTP/2 and
//! gRPC traffic, all of it over mutual TLS.

use weft_test_support::workspace_binary;

#[tokio::test]
async fn the_demo_mesh_serves_every_service_over_mutual_tls() -> anyhow::Result<()> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args([
            "demo",
            "--duration",
            "4s",
            "--every",
            "2s",
            "--rps",
            "40",
            "-o",
            "json",
        ])
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout
        .find("\n[\n")
        .map(|i| i + 1)
        .ok_or_else(|| anyhow::anyhow!("no JSON in:\n{stdout}"))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout[json_start..])?;
    let row = |authority: &str| {
        rows.iter()
            .find(|r| r["authority"] == authority)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no {authority} in {stdout}"))
    };
    for (authority, min_ok, max_ok) in [
        ("web.demo:8080", 0.85, 0.99),
        ("api.demo:8080", 1.0, 1.0),
        ("health.demo:9090", 0.9, 0.99),
    ] {
        let r = row(authority)?;
        let ok = r["success_rate"].as_f64().unwrap_or(-1.0);
        assert!((min_ok..=max_ok).contains(&ok), "{authority}: success {ok}");
        assert_eq!(r["mtls_share"].as_f64(), Some(1.0), "{authority}: {r}");
        let rps = r["rps"].as_f64().unwrap_or(0.0);
        assert!(rps > 20.0, "{authority}: {rps} rps");
    }
    assert!(stdout.contains("100% mTLS"), "{stdout}");
    Ok(())
}
