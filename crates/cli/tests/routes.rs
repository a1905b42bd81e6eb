//! `weft routes` against a real control plane.

use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

const FILE: &str = r#"
destinations:
  "api.demo:8080":
    endpoints: [{addr: "10.0.0.1:4143"}]
    timeout: 2s
    retry: {attempts: 2, on: [5xx, connect-error, "grpc:unavailable"]}
    breaker: {consecutive_failures: 5, min_open: 2s, max_open: 30s}
    routes:
      - name: canary-header
        match: {method: GET, headers: {x-canary: "1"}}
        backends: [{destination: "api-v2.demo:8080"}]
      - name: split
        match: {path_prefix: /v1}
        backends:
          - {destination: "api.demo:8080", weight: 90}
          - {destination: "api-v2.demo:8080", weight: 10}
        timeout: 500ms
        hedge: {after: p95}
"#;

#[tokio::test]
async fn shows_the_policy_proxies_get() -> anyhow::Result<()> {
    let file = DestinationsFile::from_yaml(FILE)?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--destinations", &file.path_str(), "--dns", "false"],
    )
    .await?;
    let addr = control.grpc.to_string();
    let anchors = ca.anchors();
    let weft = async |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = tokio::process::Command::new(workspace_binary("weft")?)
            .args(args)
            .args(["--control", &addr, "--trust-anchors", &anchors])
            .env("WEFT_TARGETS", "/nonexistent/targets.json")
            .output()
            .await?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    let (ok, out, err) = weft(&["routes", "api.demo:8080"]).await?;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("ejects after 5 failures in a row, for 2s doubling to 30s"),
        "{out}"
    );
    let canary = lines.iter().find(|l| l.starts_with("canary-header"));
    let canary = canary.ok_or_else(|| anyhow::anyhow!("{out}"))?;
    for want in [
        "GET / x-canary=1",
        "api-v2.demo:8080",
        "2s",
        "2× on 5xx,connect-error,grpc:unavailable",
    ] {
        assert!(canary.contains(want), "{want:?} not in {canary:?}");
    }
    let split = lines.iter().find(|l| l.starts_with("split"));
    let split = split.ok_or_else(|| anyhow::anyhow!("{out}"))?;
    for want in [
        "/v1",
        "api.demo:8080 90%, api-v2.demo:8080 10%",
        "500ms",
        "after p95",
    ] {
        assert!(split.contains(want), "{want:?} not in {split:?}");
    }

    // A service with no policy of its own: the default route and breaker.
    let (ok, out, err) = weft(&["routes", "other.demo:80", "-o", "json"]).await?;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["routes"][0]["name"], "default");
    assert_eq!(v["routes"][0]["backends"][0], "other.demo:80");
    assert_eq!(v["routes"][0]["retry"], serde_json::Value::Null);
    assert!(
        v["breaker"]
            .as_str()
            .is_some_and(|b| b.contains("after 7 failures"))
    );

    let (ok, _, err) = weft(&["routes", "no-port"]).await?;
    assert!(!ok);
    assert!(err.contains("must be host:port"), "{err}");
    Ok(())
}
