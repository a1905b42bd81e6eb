//! `weft top` run as the real binary, tapping two real meshed proxies: the
//! routes and counts it prints are the requests the test sent.

use std::time::Duration;

use anyhow::Context;
use weft_test_support::backend::Behaviour;
use weft_test_support::cli::Started;
use weft_test_support::client::Conn;
use weft_test_support::mesh::Mesh;
use weft_test_support::workspace_binary;

#[tokio::test]
async fn top_shows_the_routes_sent_with_their_counts() -> anyhow::Result<()> {
    let mesh = Mesh::start_with(Behaviour {
        delay: Duration::ZERO,
        fail_every: Some(2),
        slow: None,
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.json");
    mesh.write_targets(&targets, &[])?;
    let t = targets.to_string_lossy();
    let bin = workspace_binary("weft")?;
    let top = |direction: &'static str| {
        let (bin, t) = (bin.clone(), t.to_string());
        async move {
            let args = [
                "top",
                "--duration",
                "3s",
                "-o",
                "json",
                "--direction",
                direction,
                "--targets",
                &t,
            ];
            Started::run(&bin, &args, "tapping 2 proxies").await
        }
    };
    let inbound = top("inbound").await?;
    let outbound = top("outbound").await?;

    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    for _ in 0..6 {
        conn.get("api.demo:8080", "/orders?user=secret").await?;
    }
    for _ in 0..3 {
        conn.get("api.demo:8080", "/users/9").await?;
    }

    for (run, source) in [(inbound, "web.demo"), (outbound, "web.demo")] {
        let (stdout, _) = run.finish().await?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout)?;
        assert!(
            !stdout.contains("secret"),
            "query strings stay private: {stdout}"
        );
        let count = |path: &str| -> anyhow::Result<(u64, u64)> {
            let r = rows
                .iter()
                .find(|r| r["path"] == path)
                .with_context(|| format!("no {path} in {stdout}"))?;
            assert_eq!(
                (&r["source"], &r["destination"], &r["method"]),
                (&source.into(), &"api.demo:8080".into(), &"GET".into()),
                "{r}"
            );
            assert!(r["best_ms"].as_f64() <= r["worst_ms"].as_f64(), "{r}");
            Ok((
                r["count"].as_u64().unwrap_or(0),
                r["successes"].as_u64().unwrap_or(0),
            ))
        };
        let (orders, orders_ok) = count("/orders")?;
        let (users, users_ok) = count("/users/9")?;
        assert_eq!((orders, users), (6, 3), "{stdout}");
        // The backend fails every 2nd request it sees.
        assert!(
            orders_ok + users_ok < 9 && orders_ok + users_ok >= 4,
            "{stdout}"
        );
        assert_eq!(rows.len(), 2, "{stdout}");
    }
    Ok(())
}
