//! `weft check` run as the real binary against a real mesh: healthy, then
//! with an issuer about to expire, an expired issuer and a stopped proxy,
//! each reported with what to do.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use weft_test_support::mesh::Mesh;
use weft_test_support::workspace_binary;

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Checked {
    code: Option<i32>,
    checks: Vec<serde_json::Value>,
    stderr: String,
}

impl Checked {
    fn find(&self, name_starts: &str) -> anyhow::Result<&serde_json::Value> {
        self.checks
            .iter()
            .find(|c| {
                c["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_starts))
            })
            .with_context(|| format!("no check {name_starts:?} in {:#?}", self.checks))
    }
}

async fn check(targets: &std::path::Path) -> anyhow::Result<Checked> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(["check", "-o", "json", "--targets"])
        .arg(targets)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(Checked {
        code: out.status.code(),
        checks: serde_json::from_str(&stdout).with_context(|| format!("not JSON: {stdout}"))?,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `weft check` until `done` says the mesh's state has reached it
/// (the control plane re-reads issuer files within a second).
async fn check_until(
    targets: &std::path::Path,
    done: impl Fn(&Checked) -> bool,
) -> anyhow::Result<Checked> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = check(targets).await?;
        if done(&c) {
            return Ok(c);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "never got there: {:#?}",
            c.checks
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn status<'a>(c: &'a Checked, name: &str) -> &'a str {
    c.find(name)
        .ok()
        .and_then(|v| v["status"].as_str())
        .unwrap_or("missing")
}

#[tokio::test]
async fn check_reports_a_healthy_mesh_then_says_what_is_wrong() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.json");
    mesh.write_targets(&targets, &[])?;

    let healthy = check(&targets).await?;
    assert_eq!(
        healthy.code,
        Some(0),
        "{:#?}{}",
        healthy.checks,
        healthy.stderr
    );
    assert!(
        healthy.checks.iter().all(|c| c["status"] == "ok"),
        "{:#?}",
        healthy.checks
    );
    for name in [
        "reachable",
        "ready",
        "trust anchor",
        "issuer",
        "chain",
        "web.demo",
        "api.demo",
    ] {
        healthy.find(name)?;
    }
    let api = healthy.find("api.demo")?["detail"].to_string();
    assert!(
        api.contains("certified") && api.contains("clock within"),
        "{api}"
    );

    // An issuer with three days left: a warning, not a failure.
    let domain = "weft.local".parse()?;
    mesh.ca
        .dir
        .rotate_issuer_at(&domain, SystemTime::now() - (365 - 3) * DAY)?;
    let soon = check_until(&targets, |c| status(c, "issuer") == "warn").await?;
    assert_eq!(
        soon.code,
        Some(0),
        "warnings alone pass: {:#?}",
        soon.checks
    );
    let issuer = soon.find("issuer")?;
    assert!(
        issuer["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expires in")),
        "{issuer}"
    );

    // An expired issuer fails, and says how to mend it.
    mesh.ca
        .dir
        .rotate_issuer_at(&domain, SystemTime::now() - 366 * DAY)?;
    let expired = check_until(&targets, |c| status(c, "issuer") == "fail").await?;
    assert_eq!(expired.code, Some(2), "{:#?}", expired.checks);
    let issuer = expired.find("issuer")?;
    assert!(
        issuer["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expired")),
        "{issuer}"
    );
    assert!(
        issuer["hint"]
            .as_str()
            .is_some_and(|h| h.contains("weft identity rotate-issuer")),
        "{issuer}"
    );
    assert!(
        expired.stderr.contains("checks failed"),
        "{}",
        expired.stderr
    );

    // Mended, then a proxy stops.
    mesh.ca.dir.rotate_issuer(&domain)?;
    check_until(&targets, |c| c.code == Some(0)).await?;
    mesh.server.terminate()?;
    let stopped = check_until(&targets, |c| status(c, "api.demo") == "fail").await?;
    assert_eq!(stopped.code, Some(2));
    let api = stopped.find("api.demo")?;
    assert!(
        api["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not answering")),
        "{api}"
    );
    assert!(
        api["hint"]
            .as_str()
            .is_some_and(|h| h.contains("is it running?")),
        "{api}"
    );
    assert_eq!(
        status(&stopped, "web.demo"),
        "ok",
        "the others are still checked"
    );
    Ok(())
}
