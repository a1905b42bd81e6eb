//! `weft endpoints` against a real control plane.

use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

/// Runs `weft ARGS` with no targets file, so only flags and the
/// environment say where the control plane is.
async fn weft(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(args)
        .env("WEFT_TARGETS", "/nonexistent/targets.json")
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn shows_what_discovery_says() -> anyhow::Result<()> {
    let file = DestinationsFile::from_yaml(
        "destinations:\n  \"api.demo:8080\":\n    endpoints:\n      - addr: 10.0.0.1:4143\n        identity: api.demo\n      - addr: 10.0.0.2:4143\n        weight: 3\n",
    )?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--destinations", &file.path_str(), "--dns", "false"],
    )
    .await?;
    let addr = control.grpc.to_string();
    let anchors = ca.anchors();

    // The control channel is TLS: without trust anchors the CLI says so,
    // and with the wrong expected name it refuses the control plane.
    let (ok, _, err) = weft(&["endpoints", "api.demo:8080", "--control", &addr]).await?;
    assert!(!ok);
    assert!(err.contains("--trust-anchors"), "{err}");
    let (ok, _, err) = weft(&[
        "endpoints",
        "api.demo:8080",
        "--control",
        &addr,
        "--trust-anchors",
        &anchors,
        "--control-name",
        "impostor.weft.local",
    ])
    .await?;
    assert!(!ok);
    assert!(err.contains("expecting impostor.weft.local"), "{err}");
    let weft = async |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--trust-anchors", &anchors]);
        weft(&all).await
    };

    let (ok, out, err) = weft(&[
        "endpoints",
        "api.demo:8080",
        "--control",
        &addr,
        "-o",
        "json",
    ])
    .await?;
    assert!(ok, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(view["exists"], true);
    let eps = view["endpoints"].as_array().cloned().unwrap_or_default();
    assert_eq!(eps.len(), 2, "{out}");
    assert_eq!(eps[0]["addr"], "10.0.0.1:4143");
    assert_eq!(eps[0]["identity"], "api.demo");
    assert_eq!(eps[0]["protocol_hint"], "h2");
    assert_eq!(eps[1]["weight"], 3);
    assert_eq!(eps[1]["identity"], serde_json::Value::Null);

    let (ok, out, _) = weft(&["endpoints", "api.demo:8080", "--control", &addr]).await?;
    assert!(ok);
    assert!(
        out.contains("10.0.0.2:4143") && out.contains("- (not meshed)"),
        "{out}"
    );

    let (ok, out, _) = weft(&["endpoints", "nowhere.demo:80", "--control", &addr]).await?;
    assert!(ok);
    assert!(
        out.contains("no discovery backend knows this name"),
        "{out}"
    );

    // Errors say what went wrong and exit non-zero.
    let (ok, _, err) = weft(&["endpoints", "no-port", "--control", &addr]).await?;
    assert!(!ok);
    assert!(err.contains("host:port"), "{err}");
    drop(control);
    let (ok, _, err) = weft(&["endpoints", "api.demo:8080", "--control", &addr]).await?;
    assert!(!ok);
    assert!(err.contains("TLS to the control plane"), "{err}");
    Ok(())
}
