//! `weft demo`, the README's main command, run as the real binary, and the
//! operator's commands run against it from "another terminal": the mesh
//! carries HTTP/1.1, HTTP/2 and gRPC over mutual TLS, and `weft stat`,
//! `top`, `edges`, `endpoints` and `check` show what it does.

use std::path::Path;

use anyhow::Context;
use weft_test_support::cli::Started;
use weft_test_support::workspace_binary;

const RPS: f64 = 40.0;

async fn weft(args: &[&str], targets: &Path) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(args)
        .arg("--targets")
        .arg(targets)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "weft {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| format!("weft {args:?}: {stdout}"))
}

fn find<'a>(
    rows: &'a serde_json::Value,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<&'a serde_json::Value> {
    rows.as_array()
        .and_then(|r| r.iter().find(|r| pred(r)))
        .with_context(|| format!("no {what} in {rows:#}"))
}

#[tokio::test]
async fn the_demo_mesh_works_and_the_cli_shows_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.json");
    let t = targets.to_string_lossy().into_owned();
    let rps = RPS.to_string();
    // Every request traced, to a real OTLP receiver.
    let receiver = weft_test_support::otlp::Receiver::start().await?;
    let collector = receiver.addr.to_string();
    let demo = Started::run(
        &workspace_binary("weft")?,
        &[
            "demo",
            "--trace-collector",
            &collector,
            "--duration",
            "12s",
            "--every",
            "2s",
            "--rps",
            &rps,
            "-o",
            "json",
            "--targets",
            &t,
        ],
        "the mesh is up",
    )
    .await?;

    // Another terminal, while it runs.
    let stat = weft(&["stat", "-t", "3s", "-o", "json"], &targets).await?;
    for (name, min_ok) in [
        ("web.demo:8080", 0.85),
        ("api.demo:8080", 0.85),
        ("health.demo:9090", 1.0),
    ] {
        let r = find(&stat["rows"], name, |r| r["name"] == name)?;
        let rps = r["rps"].as_f64().unwrap_or(0.0);
        assert!(
            (0.75 * RPS..=1.1 * RPS).contains(&rps),
            "{name}: {rps} rps: {r}"
        );
        let ok = r["success_rate"].as_f64().unwrap_or(-1.0);
        assert!((min_ok..=1.0).contains(&ok), "{name}: {r}");
        assert_eq!(r["mtls_share"], 1.0, "{name}: {r}");
        assert!(r["p99_ms"].as_f64() >= r["p50_ms"].as_f64(), "{r}");
    }
    let top = weft(&["top", "--duration", "2s", "-o", "json"], &targets).await?;
    let grpc = find(&top, "the gRPC route", |r| {
        r["path"] == "/grpc.health.v1.Health/Check"
    })?;
    assert_eq!(
        (&grpc["method"], &grpc["source"]),
        (&"gRPC".into(), &"web.demo".into()),
        "{grpc}"
    );
    find(&top, "the front end's routes", |r| {
        r["destination"] == "web.demo:8080" && r["path"] == "/orders"
    })?;
    let endpoints = weft(&["endpoints", "api.demo:8080", "-o", "json"], &targets).await?;
    let eps = endpoints["endpoints"].as_array().context("endpoints")?;
    assert_eq!(eps.len(), 2, "{endpoints}");
    assert!(
        eps.iter().all(|e| e["identity"] == "api.demo"),
        "{endpoints}"
    );
    let check = weft(&["check", "-o", "json"], &targets).await?;
    assert!(
        check
            .as_array()
            .is_some_and(|c| c.len() >= 10 && c.iter().all(|c| c["status"] == "ok")),
        "{check:#}"
    );
    // The demo's own probes, both paths of both passing.
    let mut probes: Vec<&str> = check
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["section"] == "probes")
        .filter_map(|c| c["name"].as_str())
        .collect();
    probes.sort();
    assert_eq!(probes, ["api", "health"], "{check:#}");

    let (stdout, _) = demo.finish().await?;
    linked_trace(&receiver)?;
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
    let web_requests =
        find(&report["services"], "web", |r| r["name"] == "web.demo:8080")?["requests"]
            .as_u64()
            .context("requests")?;
    for (src, dst) in [
        ("traffic.demo", "web.demo:8080"),
        ("web.demo", "api.demo:8080"),
        ("web.demo", "health.demo:9090"),
    ] {
        let e = find(&report["edges"], dst, |r| {
            r["src"] == src && r["dst"] == dst
        })?;
        assert_eq!(e["secured"], true, "{e}");
        assert_eq!(e["client_id"], src, "{e}");
        // Every front-end request makes one call to each dependency. The
        // run's first scrapes happen under traffic, one proxy after another,
        // so a request in flight then (at most one per generator worker)
        // can count at one hop and not the other.
        let diff = e["requests"].as_u64().unwrap_or(0).abs_diff(web_requests);
        assert!(diff <= 4, "{e} vs {web_requests} front-end requests");
    }
    Ok(())
}

/// Whatever stops `weft demo` (Ctrl-C, a process manager's SIGTERM, a
/// closed terminal's SIGHUP, or SIGKILL, which it cannot even see), no
/// weft-control or weft-proxy it started is left holding its ports.
#[tokio::test]
async fn the_demo_leaves_no_process_behind_whatever_stops_it() -> anyhow::Result<()> {
    use std::time::Duration;
    use weft_test_support::process::{alive, children_of};
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.json");
    let t = targets.to_string_lossy().into_owned();
    for signal in ["INT", "TERM", "HUP", "KILL"] {
        let mut demo = Started::run(
            &workspace_binary("weft")?,
            &["demo", "--every", "1s", "--targets", &t],
            "the mesh is up",
        )
        .await?;
        let pid = demo.pid().context("demo already exited")?;
        let children = children_of(pid);
        // weft-control and a proxy per replica and for the traffic.
        anyhow::ensure!(children.len() >= 7, "demo children: {children:?}");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid}");
        demo.wait(Duration::from_secs(30))
            .await
            .with_context(|| format!("demo did not exit on SIG{signal}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<u32> = children.iter().copied().filter(|c| alive(*c)).collect();
            if left.is_empty() {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "after SIG{signal}, demo children still running: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// One demo request is one trace: the traffic generator's proxy (client
/// side) → web's inbound proxy → (web passes the context on) web's
/// outbound proxy → api's inbound proxy, and web → health likewise, each
/// span the child of the one before.
fn linked_trace(receiver: &weft_test_support::otlp::Receiver) -> anyhow::Result<()> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use weft_test_support::otlp::Received;
    let spans = receiver.spans();
    let service = |r: &Received| {
        r.resource
            .as_ref()
            .and_then(|res| res.attributes.iter().find(|a| a.key == "service.name"))
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default()
    };
    let address = |r: &Received| {
        r.span
            .attributes
            .iter()
            .find(|a| a.key == "server.address")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default()
    };
    let kind = |r: &Received, k: SpanKind| r.span.kind == k as i32;
    let child = |parent: &Received, svc: &str, k: SpanKind, to: &str| {
        spans
            .iter()
            .find(|r| {
                r.span.trace_id == parent.span.trace_id
                    && r.span.parent_span_id == parent.span.span_id
                    && service(r) == svc
                    && kind(r, k)
                    && (to.is_empty() || address(r) == to)
            })
            .cloned()
    };
    let complete = spans
        .iter()
        .filter(|r| service(r) == "traffic.demo" && kind(r, SpanKind::Client))
        .find_map(|root| {
            let web_in = child(root, "web.demo", SpanKind::Server, "")?;
            let to_api = child(&web_in, "web.demo", SpanKind::Client, "api.demo:8080")?;
            let api_in = child(&to_api, "api.demo", SpanKind::Server, "")?;
            let to_health = child(&web_in, "web.demo", SpanKind::Client, "health.demo:9090")?;
            let health_in = child(&to_health, "health.demo", SpanKind::Server, "")?;
            Some([root.clone(), web_in, to_api, api_in, to_health, health_in])
        });
    anyhow::ensure!(
        complete.is_some(),
        "no complete trace among {} spans",
        spans.len()
    );
    Ok(())
}
