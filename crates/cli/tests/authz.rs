//! `weft authz`, `weft check` and `weft stat` on inbound policy, run as the
//! real binary against a real mesh: what is allowed where, a server that
//! admits no one flagged, denied and rate-limited requests counted.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::Command;
use weft_test_support::cli::Started;
use weft_test_support::client::Conn;
use weft_test_support::mesh::{Mesh, api_destination};
use weft_test_support::workspace_binary;

async fn weft(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(workspace_binary("weft")?)
        .args(args)
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

#[tokio::test]
async fn authz_check_and_stat_show_inbound_policy() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let port = mesh.backend.addr.port();
    mesh.dests.write_yaml(&format!(
        r#"{}servers:
  "api.demo":
    ports:
      "{port}":
        default: deny
        authorizations:
          - name: web-reads
            clients: {{identities: ["web.demo"]}}
            routes: [{{path_prefix: /, methods: [GET]}}]
        rate_limit: {{per_client_rps: 20}}
  "locked.demo":
    ports:
      "7000": {{protocol: opaque, default: deny}}
"#,
        api_destination(mesh.server.inbound, "api.demo")
    ))?;
    let file = tempfile::NamedTempFile::new()?;
    mesh.write_targets(file.path(), &[])?;
    let t = file.path().to_string_lossy().into_owned();

    // The policy is in force once POSTs are refused.
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    let started = Instant::now();
    loop {
        let req = http::Request::post("http://api.demo:8080/items")
            .header(http::header::HOST, "api.demo:8080")
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        if conn.send(req).await?.0 == 403 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3),
            "policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (ok, out) = weft(&["authz", "api.demo", "--targets", &t]).await?;
    assert!(ok, "{out}");
    println!("{out}");
    assert!(
        out.contains(&format!(
            "api.demo:{port}  protocol: detect  rate limit: 20/s per client"
        )),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("GET /*")
            && l.contains("web-reads")
            && l.contains("web.demo")
            && l.contains("all")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("default") && l.contains("(none: refused)")),
        "{out}"
    );
    let (ok, out) = weft(&["authz", "nobody.demo", "--targets", &t]).await?;
    assert!(!ok && out.contains("no policy names nobody.demo"), "{out}");

    let (_, out) = weft(&["check", "-o", "json", "--targets", &t]).await?;
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&out[..out.rfind(']').map_or(0, |i| i + 1)])
            .with_context(|| out.clone())?;
    let find = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .with_context(|| format!("no {name}: {checks:#?}"))
    };
    let locked = find("locked.demo:7000")?;
    assert_eq!(locked["status"], "warn", "{locked}");
    assert!(
        locked["hint"]
            .as_str()
            .is_some_and(|h| h.contains("servers.\"locked.demo\".ports.\"7000\"")),
        "{locked}"
    );
    let api = find(&format!("api.demo:{port}"))?;
    assert_eq!(api["status"], "ok", "{api}");

    // Over a window: 10 allowed GETs, 5 denied POSTs, and a burst of GETs
    // past the rate limit.
    let stat = Started::run(
        &workspace_binary("weft")?,
        &["stat", "-t", "3s", "-o", "json", "--targets", &t],
        "sampling",
    )
    .await?;
    let (mut allowed, mut denied, mut limited) = (0u64, 0u64, 0u64);
    for i in 0..60 {
        let method = if i % 12 == 0 { "POST" } else { "GET" };
        let req = http::Request::builder()
            .method(method)
            .uri("http://api.demo:8080/items")
            .header(http::header::HOST, "api.demo:8080")
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        match conn.send(req).await?.0.as_u16() {
            200 => allowed += 1,
            403 => denied += 1,
            429 => limited += 1,
            other => anyhow::bail!("unexpected {other}"),
        }
    }
    let (stdout, _) = stat.finish().await?;
    let json: serde_json::Value = serde_json::from_str(&stdout)?;
    let row = json["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == "api.demo:8080"))
        .with_context(|| format!("no api.demo row: {json}"))?;
    println!("sent: {allowed} allowed, {denied} denied, {limited} limited; stat: {row}");
    assert_eq!(row["denied"], denied, "{row}");
    assert_eq!(row["rate_limited"], limited, "{row}");
    assert!(denied == 5 && limited > 0 && allowed > 0);
    Ok(())
}
