//! `weft probe` against a real mesh: an HTTP service and a gRPC service,
//! each probed through the client's proxy and directly; Prometheus sees
//! both paths; then the api's proxy stops, and `weft check` tells the
//! mesh-only failure from a failure of the service.

use std::time::{Duration, Instant};

use anyhow::Context;
use weft_test_support::cli::Started;
use weft_test_support::mesh::{Mesh, api_destination};
use weft_test_support::metrics::Scrape;
use weft_test_support::workspace_binary;

async fn probes_json(admin: &str) -> anyhow::Result<serde_json::Value> {
    let text = weft_test_support::metrics::get_text(admin.parse()?, "/probes.json").await?;
    Ok(serde_json::from_str(&text)?)
}

#[tokio::test]
async fn probes_tell_a_mesh_failure_from_a_service_failure() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    // A gRPC service the client reaches through its proxy (no proxy of
    // its own: plaintext to it).
    let grpc = weft_test_support::grpc::start_on("127.0.0.1:0".parse()?).await?;
    mesh.dests.write_yaml(&format!(
        "{}  \"health.demo:9090\":\n    endpoints: [{{addr: \"{}\"}}]\n",
        api_destination(mesh.server.inbound, "api.demo"),
        grpc.addr
    ))?;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let dir = tempfile::tempdir()?;
    let probes = dir.path().join("probes.yaml");
    std::fs::write(
        &probes,
        format!(
            r#"proxy: {}
interval: 300ms
timeout: 2s
probes:
  - name: api
    authority: api.demo:8080
    direct: {}
    http: {{path: /, status: 200}}
  - name: health
    authority: health.demo:9090
    direct: {}
    grpc: {{service: ""}}
"#,
            mesh.client.outbound, mesh.backend.addr, grpc.addr
        ),
    )?;
    let (prober, admin) = Started::weft_probe(&workspace_binary("weft")?, &probes).await?;

    // Both paths of both probes succeed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = weft_test_support::metrics::get_text(admin.parse()?, "/metrics").await?;
        let m = Scrape::parse(text)?;
        let up = |probe: &str, path: &str| {
            m.sum("probe_success", &[("probe", probe), ("path", path)]) == 1.0
        };
        if up("api", "mesh")
            && up("api", "direct")
            && up("health", "mesh")
            && up("health", "direct")
        {
            assert!(m.sum("probe_latency_ms", &[("probe", "api"), ("path", "mesh")]) > 0.0);
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "probes never all passed:\n{}\n{:#}",
            m.text,
            probes_json(&admin).await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The api's proxy goes away: the service still answers directly.
    mesh.server.terminate()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let results = loop {
        let r = probes_json(&admin).await?;
        let api = r
            .as_array()
            .and_then(|a| a.iter().find(|p| p["probe"] == "api"))
            .cloned()
            .unwrap_or_default();
        if api["mesh"]["ok"] == false && api["direct"]["ok"] == true {
            break r;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the mesh failure was never seen: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let targets = dir.path().join("targets.json");
    mesh.write_targets(
        &targets,
        &[serde_json::json!({"targets": [admin], "labels": {"role": "probe"}})],
    )?;
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(["check", "-o", "json", "--targets"])
        .arg(&targets)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).with_context(|| stdout.to_string())?;
    let api = checks
        .iter()
        .find(|c| c["section"] == "probes" && c["name"] == "api")
        .with_context(|| format!("no probe check: {checks:#?}"))?;
    assert_eq!(api["status"], "fail", "{api}");
    assert!(
        api["detail"]
            .as_str()
            .is_some_and(|d| d.contains("a mesh failure")),
        "{api}\n{results:#}"
    );
    let health = checks
        .iter()
        .find(|c| c["section"] == "probes" && c["name"] == "health")
        .context("no health probe check")?;
    assert_eq!(health["status"], "ok", "{health}");
    drop(prober);
    Ok(())
}
