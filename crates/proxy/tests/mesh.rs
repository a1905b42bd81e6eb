//! Two real proxies and a real control plane: discovery from the control
//! plane, certificates from its Identity API, mutual TLS between proxies.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use weft_test_support::backend::Backend;
use weft_test_support::client::Conn;
use weft_test_support::control::Control;
use weft_test_support::mesh::{Mesh, MeshCa, api_destination, meshed, start_proxy};
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;
use weft_test_support::workspace_binary;

#[tokio::test]
async fn requests_between_meshed_proxies_are_mutual_tls() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    for _ in 0..5 {
        let (status, headers, body) = conn.get("api.demo:8080", "/").await?;
        assert_eq!(status, 200, "{body}\n{}", mesh.client.log());
        assert_eq!(
            headers.get("x-backend").map(|v| v.as_bytes()),
            Some(&b"api"[..])
        );
    }
    assert_eq!(mesh.backend.hits(), 5);

    // Each side saw the other's identity.
    let client = scrape(mesh.client.admin).await?;
    let outbound = [
        ("direction", "outbound"),
        ("tls", "true"),
        ("server_id", "api.demo"),
    ];
    assert_eq!(
        client.sum("response_total", &outbound),
        5.0,
        "{}",
        client.text
    );
    let server = scrape(mesh.server.admin).await?;
    let inbound = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("client_id", "web.demo"),
    ];
    assert_eq!(
        server.sum("request_total", &inbound),
        5.0,
        "{}",
        server.text
    );
    for proxy in [&client, &server] {
        assert_eq!(proxy.sum("identity_cert_refresh_count", &[]), 1.0);
        let expiry = proxy.sum("identity_cert_expiration_timestamp_seconds", &[]);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs_f64();
        assert!(expiry > now + 23.0 * 3600.0, "expiry {expiry}, now {now}");
    }

    // Unmeshed clients still reach the service in plaintext (permissive).
    let mut plain = Conn::connect(mesh.server.inbound, false).await?;
    let (status, _, _) = plain.get("api.demo:8080", "/").await?;
    assert_eq!(status, 200);
    let server = scrape(mesh.server.admin).await?;
    let plaintext = [("direction", "inbound"), ("tls", "no_identity")];
    assert_eq!(
        server.sum("request_total", &plaintext),
        1.0,
        "{}",
        server.text
    );
    Ok(())
}

/// `openssl s_client` against an inbound port: the output, and whether the
/// server closed the connection on it.
async fn s_client(
    addr: std::net::SocketAddr,
    ca: &str,
    cert: Option<(&Path, &Path)>,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "api.demo",
    ])
    .args(["-CAfile", ca, "-showcerts", "-ign_eof"]);
    if let Some((cert, key)) = cert {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(b"GET / HTTP/1.1\r\nHost: api.demo:8080\r\nConnection: close\r\n\r\n")
            .await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await??;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A leaf for `name` from `ca`'s issuer, valid from `now` for `lifetime`,
/// written as PEM (chain, key).
fn leaf_files(
    ca: &MeshCa,
    dir: &Path,
    name: &str,
    now: SystemTime,
    lifetime: Duration,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let issuer = weft_identity::Issuer::load(&ca.dir)?;
    let (key, csr) = weft_identity::new_csr(&name.parse()?)?;
    let leaf = issuer.certify(&csr, &name.parse()?, lifetime, now)?;
    let der = dir.join(format!("{name}.der"));
    std::fs::write(&der, leaf.der.as_ref())?;
    let pem = dir.join(format!("{name}.pem"));
    let status = std::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&pem)
        .status()?;
    anyhow::ensure!(status.success(), "openssl x509 failed");
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((pem, key_path))
}

#[tokio::test]
async fn the_inbound_port_shows_its_chain_and_refuses_expired_or_foreign_clients()
-> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let tmp = tempfile::tempdir()?;

    let out = s_client(mesh.server.inbound, &mesh.ca.anchors(), None).await?;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains("CN = api.demo") || out.contains("CN=api.demo"),
        "{out}"
    );
    assert!(
        out.contains("issuer-"),
        "the chain includes the issuer:\n{out}"
    );

    let hits = mesh.backend.hits();
    let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
    let (cert, key) = leaf_files(
        &mesh.ca,
        tmp.path(),
        "web.demo",
        day_ago,
        Duration::from_secs(3600),
    )?;
    s_client(mesh.server.inbound, &mesh.ca.anchors(), Some((&cert, &key))).await?;

    let foreign = MeshCa::new()?;
    let (cert, key) = leaf_files(
        &foreign,
        tmp.path(),
        "web.demo",
        SystemTime::now(),
        Duration::from_secs(3600),
    )?;
    s_client(mesh.server.inbound, &mesh.ca.anchors(), Some((&cert, &key))).await?;

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = mesh.server.log();
        // The first s_client, without a certificate, is refused too.
        let failures: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("inbound TLS handshake failed") && !l.contains("no certificates")
            })
            .collect();
        if failures.len() >= 2 {
            assert!(
                failures[0].to_lowercase().contains("expired"),
                "{}",
                failures[0]
            );
            assert!(
                failures[1].contains("UnknownIssuer")
                    || failures[1].to_lowercase().contains("issuer"),
                "{}",
                failures[1]
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "handshakes not refused:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        mesh.backend.hits(),
        hits,
        "a refused client reached the application"
    );
    Ok(())
}

#[tokio::test]
async fn a_peer_without_the_expected_identity_is_refused() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    // Discovery says the endpoint is `billing.demo`; the proxy there proves
    // `api.demo`.
    mesh.dests
        .write_yaml(&api_destination(mesh.server.inbound, "billing.demo"))?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    let (status, headers, body) = conn.get("api.demo:8080", "/").await?;
    assert_eq!(status, 503, "{body}");
    let reason = headers
        .get("l5d-proxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("billing.demo"), "{reason}");
    assert_eq!(mesh.backend.hits(), 0);
    Ok(())
}

#[tokio::test]
async fn a_bad_token_keeps_the_proxy_unready_and_says_why() -> anyhow::Result<()> {
    let ca = MeshCa::new()?;
    let control = Control::start(&workspace_binary("weft-control")?, &ca, &[]).await?;
    let mut env = meshed(&ca, &control, "web.demo")?;
    // A token for another identity.
    env[2].1 = ca.token_file("api.demo")?;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let proxy = Proxy::spawn(&[], &workspace_binary("weft-proxy")?, &env).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ready = weft_test_support::metrics::get_text(proxy.admin, "/ready").await;
    let err = ready
        .expect_err("not ready without a certificate")
        .to_string();
    assert!(err.contains("no certificate"), "{err}");
    let log = proxy.log();
    assert!(
        log.contains("certification failed") && log.contains("minted for api.demo"),
        "{log}"
    );
    assert!(control.process.log().contains("certify refused"));
    Ok(())
}

#[tokio::test]
async fn a_proxy_expecting_another_control_plane_name_refuses_it() -> anyhow::Result<()> {
    let ca = MeshCa::new()?;
    let control = Control::start(&workspace_binary("weft-control")?, &ca, &[]).await?;
    let mut env = meshed(&ca, &control, "web.demo")?;
    env.push((
        "WEFT_PROXY_CONTROL_NAME".into(),
        "impostor.weft.local".into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let proxy = Proxy::spawn(&[], &workspace_binary("weft-proxy")?, &env).await?;
    // It never sends its token to a server that cannot prove the name.
    proxy
        .process
        .wait_for_log(
            "not valid for name \"impostor.weft.local\"",
            Duration::from_secs(10),
        )
        .await?;
    let ready = weft_test_support::metrics::get_text(proxy.admin, "/ready").await;
    assert!(ready.is_err(), "ready without a certificate");
    assert!(
        !control.process.log().contains("web.demo"),
        "the control plane saw a Certify call:\n{}",
        control.process.log()
    );
    Ok(())
}

#[tokio::test]
async fn endpoint_changes_reach_the_proxy_within_a_second() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    assert_eq!(conn.get("api.demo:8080", "/").await?.0, 200);
    let other = Backend::start("api-v2").await?;
    let started = Instant::now();
    mesh.dests.write_yaml(&format!(
        "destinations:\n  \"api.demo:8080\":\n    endpoints:\n      - addr: {}\n",
        other.addr
    ))?;
    loop {
        let (status, headers, _) = conn.get("api.demo:8080", "/").await?;
        assert_eq!(status, 200);
        if headers.get("x-backend").map(|v| v.as_bytes()) == Some(&b"api-v2"[..]) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3),
            "change never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    assert!(took <= Duration::from_secs(1), "the change took {took:?}");
    Ok(())
}

#[tokio::test]
async fn a_control_plane_restart_under_load_fails_no_request() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    let (mut ok, mut failed) = (0u32, Vec::new());
    let send = async |conn: &mut Conn, ok: &mut u32, failed: &mut Vec<String>| match conn
        .get("api.demo:8080", "/")
        .await
    {
        Ok((s, _, _)) if s == 200 => *ok += 1,
        Ok((s, h, b)) => failed.push(format!("{s} {h:?} {b}")),
        Err(e) => failed.push(e.to_string()),
    };
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        send(&mut conn, &mut ok, &mut failed).await;
    }
    mesh.control.process.child.start_kill()?;
    mesh.control.process.wait(Duration::from_secs(5)).await?;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        send(&mut conn, &mut ok, &mut failed).await;
    }
    let listen = mesh.control.grpc.to_string();
    let restarted = Control::start(
        &workspace_binary("weft-control")?,
        &mesh.ca,
        &[
            "--listen",
            &listen,
            "--destinations",
            &mesh.dests.path_str(),
        ],
    )
    .await?;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        send(&mut conn, &mut ok, &mut failed).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 50, "only {ok} requests");
    // The proxy came back to the new control plane: an edit reaches it.
    let other = Backend::start("api-v2").await?;
    mesh.dests.write_yaml(&format!(
        "destinations:\n  \"api.demo:8080\":\n    endpoints:\n      - addr: {}\n",
        other.addr
    ))?;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (_, headers, _) = conn.get("api.demo:8080", "/").await?;
        if headers.get("x-backend").map(|v| v.as_bytes()) == Some(&b"api-v2"[..]) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the proxy never reconnected:\n{}",
            mesh.client.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(restarted);
    Ok(())
}

#[tokio::test]
async fn an_issuer_rotation_fails_no_request() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    let mut failed = Vec::new();
    let mut ok = 0u32;
    let rotated_at = Instant::now() + Duration::from_millis(300);
    let mut rotated = false;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        if !rotated && Instant::now() >= rotated_at {
            mesh.ca.dir.rotate_issuer(&"weft.local".parse()?)?;
            rotated = true;
        }
        match conn.get("api.demo:8080", "/").await {
            Ok((s, _, _)) if s == 200 => ok += 1,
            Ok((s, _, b)) => failed.push(format!("{s} {b}")),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 20, "only {ok} requests");

    // A proxy certified by the new issuer and the server, still on a leaf
    // from the old one, accept each other: both chain to the same anchor.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let newcomer = start_proxy(&meshed(&mesh.ca, &mesh.control, "billing.demo")?).await?;
    let scrape = scrape(newcomer.admin).await?;
    assert_eq!(scrape.sum("identity_cert_refresh_count", &[]), 1.0);
    let mut conn = Conn::connect(newcomer.outbound, false).await?;
    let (status, _, body) = conn.get("api.demo:8080", "/").await?;
    assert_eq!(status, 200, "{body}\n{}", newcomer.log());
    assert!(mesh.control.process.log().contains("issuer reloaded"));
    Ok(())
}

/// The bootstrap token is needed once: with its file deleted after the
/// first certificate, the proxy renews with the certificate it holds.
#[tokio::test]
async fn a_proxy_renews_without_its_token() -> anyhow::Result<()> {
    let ca = MeshCa::new()?;
    // The shortest lifetime allowed: renewal comes at 70 % of it, 42 s.
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--leaf-lifetime", "1m"],
    )
    .await?;
    let env = meshed(&ca, &control, "web.demo")?;
    let token_file = env
        .iter()
        .find(|(k, _)| k == "WEFT_PROXY_IDENTITY_TOKEN_FILE")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| anyhow::anyhow!("no token file"))?;
    let proxy = start_proxy(&env).await?;
    std::fs::remove_file(&token_file)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.log().matches("certified").count() < 2 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no renewal within 60 s:\n{}\n{}",
            proxy.log(),
            control.process.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = control.process.log();
    assert!(
        log.contains("proof=\"certificate\"") || log.contains("proof=certificate"),
        "{log}"
    );
    assert!(
        !proxy.log().contains("certification failed"),
        "{}",
        proxy.log()
    );
    Ok(())
}

/// A name the control plane refuses to follow (this proxy already follows
/// its limit) is never sent to DNS instead, where a meshed service would
/// be reached in plaintext: the request fails with the reason, and is
/// counted. `localhost` resolves in DNS, so a fallback would have
/// answered 200 from the backend directly.
#[tokio::test]
async fn a_refused_name_is_not_sent_to_dns_in_plaintext() -> anyhow::Result<()> {
    let ca = MeshCa::new()?;
    let backend = Backend::start("api").await?;
    let port = backend.addr.port();
    let dests = weft_test_support::DestinationsFile::from_yaml(&format!(
        r#"destinations:
  "a.demo:80":
    endpoints: [{{addr: "{addr}"}}]
  "localhost:{port}":
    endpoints: [{{addr: "{addr}", identity: api.demo}}]
"#,
        addr = backend.addr
    ))?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &[
            "--destinations",
            &dests.path_str(),
            "--max-names-per-client",
            "1",
        ],
    )
    .await?;
    let client = start_proxy(&meshed(&ca, &control, "web.demo")?).await?;
    let mut conn = Conn::connect(client.outbound, false).await?;
    let (status, _, body) = conn.get("a.demo:80", "/").await?;
    assert_eq!(status, 200, "{body}");
    let localhost = format!("localhost:{port}");
    let (status, headers, _) = conn.get(&localhost, "/").await?;
    let error = headers
        .get("l5d-proxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(status, 503, "{error}");
    assert!(
        error.contains(&format!("the control plane refused to follow {localhost}")),
        "{error}"
    );
    assert_eq!(
        backend.hits(),
        1,
        "nothing reached the backend around the mesh"
    );
    let metrics = scrape(client.admin).await?;
    assert_eq!(
        metrics.sum(
            "response_total",
            &[("direction", "outbound"), ("error", "discovery_refused")]
        ),
        1.0,
        "{}",
        metrics.text
    );
    assert!(client.log().contains("refused to follow a name"), "warned");
    Ok(())
}

/// `l5d-client-id` reaches the application only as the proxy set it: the
/// meshed caller's proven identity, never a value a client sent.
#[tokio::test]
async fn l5d_client_id_is_the_proven_identity_only() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let mut conn = Conn::connect(mesh.client.outbound, false).await?;
    let (status, _, body) = conn.get("api.demo:8080", "/headers").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("l5d-client-id: web.demo"), "{body}");

    let mut forged = weft_test_support::client::http1(mesh.server.inbound).await?;
    let req = http::Request::get("/headers")
        .header("host", "api.demo:8080")
        .header("l5d-client-id", "admin.demo")
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let (status, _, body) =
        weft_test_support::client::text(forged.send_request(req).await?).await?;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("l5d-client-id"), "{body}");
    Ok(())
}
