//! Replacing a running proxy: SIGUSR2 under load loses nothing; a new
//! process that fails leaves the old one serving; SO_REUSEPORT as the
//! rolling alternative.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::load::{Oha, steady_h2c};
use weft_test_support::metrics::get_text;
use weft_test_support::process::KillOnDrop;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");
const AUTHORITY: &str = "svc.test:8080";

async fn env_json(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&get_text(admin, "/env.json").await?)?)
}

/// The pid answering on `admin`, once it is not `old`.
async fn new_pid(admin: SocketAddr, old: u32) -> anyhow::Result<(u32, serde_json::Value)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(env) = env_json(admin).await
            && let Some(pid) = env["pid"].as_u64()
            && pid as u32 != old
        {
            return Ok((pid as u32, env));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no new process on {admin}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(
    bin: &Path,
    extra: &[(&str, &str)],
) -> anyhow::Result<(Backend, DestinationsFile, Proxy)> {
    let backend = Backend::start("a").await?;
    let file = DestinationsFile::new(&[(AUTHORITY, &[(backend.addr, 1)])])?;
    let path = file.path_str();
    let forward = backend.addr.to_string();
    let mut env = vec![
        ("WEFT_PROXY_DESTINATIONS", path.as_str()),
        ("WEFT_PROXY_INBOUND_FORWARD", forward.as_str()),
        ("WEFT_PROXY_SHUTDOWN_GRACE", "10s"),
    ];
    env.extend_from_slice(extra);
    let proxy = Proxy::start(bin, &env).await?;
    Ok((backend, file, proxy))
}

/// 1k RPS for 8 s through the inbound listener over keep-alive
/// connections; USR2 after 3 s. `load` runs it and returns (responses,
/// failures).
async fn upgrade_under_load<F>(load: F) -> anyhow::Result<()>
where
    F: FnOnce(String) -> tokio::task::JoinHandle<anyhow::Result<(u64, Vec<String>)>>,
{
    let (backend, _file, mut proxy) = start(PROXY.as_ref(), &[]).await?;
    let old = proxy.pid().expect("running");
    let run = load(format!("http://{}/", proxy.inbound));

    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.process.signal("USR2")?;
    let (pid, env) = new_pid(proxy.admin, old).await?;
    let _new = KillOnDrop(pid);
    assert_eq!(env["upgraded_from"], old);
    assert!(
        env["started"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{env}"
    );
    let exit = proxy.wait(Duration::from_secs(15)).await?;
    assert_eq!(exit.code(), Some(0), "{}", proxy.log());

    let (ok, failed) = run.await??;
    assert!(failed.is_empty(), "{failed:?}\n{}", proxy.log());
    assert_eq!(ok, 8000);
    assert!(backend.hits() >= 8000, "{}", backend.hits());

    // The new process serves on the same listeners, readiness included.
    assert_eq!(get_text(proxy.admin, "/ready").await?, "ready\n");
    let mut c = client::http1(proxy.outbound).await?;
    let (status, _, body) = text(c.send_request(get(AUTHORITY, "/")?).await?).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
    let log = proxy.log();
    assert!(
        log.contains("upgrade: the new process serves; draining"),
        "{log}"
    );
    Ok(())
}

/// oha over HTTP/1.1 keep-alive: connections in use are closed by their
/// next response (`Connection: close`), so no request meets a closed
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usr2_under_http1_keep_alive_load_fails_nothing() -> anyhow::Result<()> {
    upgrade_under_load(|url| {
        tokio::task::spawn_blocking(move || {
            let mut oha = Oha::new(url);
            (oha.connections, oha.rate, oha.requests) = (20, 1000, 8000);
            let r = oha.run()?;
            println!("HTTP/1.1 (oha): {r:?}");
            let failed = r
                .errors
                .iter()
                .map(|(e, n)| format!("{n}× {e}"))
                .chain(
                    r.statuses
                        .iter()
                        .filter(|(s, _)| !s.starts_with('2'))
                        .map(|(s, n)| format!("{n}× status {s}")),
                )
                .collect();
            Ok((
                r.responses() - (r.failed() - r.errors.values().sum::<u64>()),
                failed,
            ))
        })
    })
    .await
}

/// HTTP/2 clients get GOAWAY and move to a new connection (to the new
/// process); a request its connection never sent is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usr2_under_http2_load_fails_nothing() -> anyhow::Result<()> {
    upgrade_under_load(|url| {
        tokio::spawn(async move {
            let r = steady_h2c(&url, 1000, 8000, 20).await?;
            println!(
                "HTTP/2 (hyper-util client): {} ok, {} sent again after GOAWAY, slowest {:?}",
                r.ok, r.resent, r.slowest
            );
            // At most the one request each connection had queued when
            // the GOAWAY came.
            anyhow::ensure!(r.resent <= 20, "{} requests were sent again", r.resent);
            Ok((r.ok, r.failed))
        })
    })
    .await
}

/// Puts `contents` at `path` the way a package manager replaces a binary
/// (a new file renamed over the old, which keeps running).
fn replace(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_old_process_serving_and_a_replaced_binary_is_picked_up()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = dir.path().join("weft-proxy");
    std::fs::copy(PROXY, &bin)?;
    let (_b, _f, mut proxy) = start(&bin, &[("WEFT_PROXY_UPGRADE_TIMEOUT", "1s")]).await?;
    let old = proxy.pid().expect("running");
    let serves = |outbound| async move {
        let mut c = client::http1(outbound).await?;
        let (status, _, _) = text(c.send_request(get(AUTHORITY, "/")?).await?).await?;
        anyhow::ensure!(status == 200, "status {status}");
        anyhow::Ok(())
    };

    // A binary that exits at once.
    replace(&bin, b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n")?;
    proxy.process.signal("USR2")?;
    proxy
        .process
        .wait_for_log(
            "exited (exit status: 3) before it was ready",
            Duration::from_secs(10),
        )
        .await?;
    serves(proxy.outbound).await?;
    assert_eq!(env_json(proxy.admin).await?["pid"], old);

    // One that never gets ready: stopped after the timeout.
    replace(&bin, b"#!/bin/sh\nexec sleep 60\n")?;
    proxy.process.signal("USR2")?;
    proxy
        .process
        .wait_for_log(
            "was not ready within 1s; it was stopped",
            Duration::from_secs(10),
        )
        .await?;
    serves(proxy.outbound).await?;
    assert!(
        proxy.process.child.try_wait()?.is_none(),
        "the old process must still run"
    );

    // The real binary again: the upgrade goes through.
    replace(&bin, &std::fs::read(PROXY)?)?;
    proxy.process.signal("USR2")?;
    let (pid, _) = new_pid(proxy.admin, old).await?;
    let _new = KillOnDrop(pid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe"))?,
        bin,
        "the new process runs the binary now at the original path"
    );
    assert_eq!(proxy.wait(Duration::from_secs(15)).await?.code(), Some(0));
    serves(proxy.outbound).await?;
    // No hand-over directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("weft-proxy-{old}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_port_lets_a_second_proxy_share_the_ports_for_a_rolling_restart() -> anyhow::Result<()>
{
    let (_b, file, mut first) = start(PROXY.as_ref(), &[("WEFT_PROXY_REUSE_PORT", "true")]).await?;
    let outbound = first.outbound.to_string();
    let inbound = first.inbound.to_string();
    let path = file.path_str();
    let same_ports = [
        ("WEFT_PROXY_DESTINATIONS", path.as_str()),
        ("WEFT_PROXY_OUTBOUND_LISTEN", outbound.as_str()),
        ("WEFT_PROXY_INBOUND_LISTEN", inbound.as_str()),
    ];

    // Without SO_REUSEPORT on both, the second cannot bind.
    let refused = Proxy::start(PROXY.as_ref(), &same_ports).await;
    let err = refused
        .err()
        .expect("a second proxy without SO_REUSEPORT must not start");
    assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");

    let mut env = same_ports.to_vec();
    env.push(("WEFT_PROXY_REUSE_PORT", "true"));
    let second = Proxy::start(PROXY.as_ref(), &env).await?;
    assert_eq!(second.outbound, first.outbound);

    first.terminate()?;
    assert_eq!(first.wait(Duration::from_secs(15)).await?.code(), Some(0));
    for _ in 0..20 {
        let mut c = client::http1(second.outbound).await?;
        let (status, _, body) = text(c.send_request(get(AUTHORITY, "/")?).await?).await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
    }
    Ok(())
}

/// systemd's notify protocol (`Type=notify`, `NotifyAccess=all`): ready
/// once serving, and after SIGUSR2 the new process names itself the main
/// process, so the supervisor follows the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_manager_hears_ready_and_then_the_new_main_pid() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path)?;
    let notify = path.to_string_lossy().into_owned();
    let (_b, _f, mut proxy) = start(PROXY.as_ref(), &[("NOTIFY_SOCKET", &notify)]).await?;
    let mut buf = vec![0u8; 4096];
    let mut message = async || -> anyhow::Result<String> {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf)).await??;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    assert_eq!(message().await?, "READY=1\n");

    let old = proxy.pid().expect("running");
    proxy.process.signal("USR2")?;
    let said = message().await?;
    let (pid, _) = new_pid(proxy.admin, old).await?;
    let _new = KillOnDrop(pid);
    assert_eq!(said, format!("MAINPID={pid}\nREADY=1\n"));
    assert_eq!(proxy.wait(Duration::from_secs(15)).await?.code(), Some(0));
    Ok(())
}

/// The certificate travels with the listeners: the new process is ready at
/// once, though the token file was deleted (as the README allows once a
/// proxy is certified) and the control plane is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_handed_over_so_neither_token_nor_control_plane_is_needed()
-> anyhow::Result<()> {
    use weft_test_support::control::Control;
    use weft_test_support::mesh::{MeshCa, meshed};
    let ca = MeshCa::new()?;
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let control = Control::start(
        &weft_test_support::workspace_binary("weft-control")?,
        &ca,
        &["--destinations", &file.path_str()],
    )
    .await?;
    let env = meshed(&ca, &control, "api.demo")?;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut proxy = Proxy::start(PROXY.as_ref(), &env).await?;
    let token = env
        .iter()
        .find(|(k, _)| *k == "WEFT_PROXY_IDENTITY_TOKEN_FILE")
        .map(|(_, v)| *v)
        .expect("a token file");
    std::fs::remove_file(token)?;
    drop(control);

    let old = proxy.pid().expect("running");
    proxy.process.signal("USR2")?;
    let new = new_pid(proxy.admin, old).await;
    let (pid, _) = new.map_err(|e| anyhow::anyhow!("{e}:\n{}", proxy.log()))?;
    let _new = KillOnDrop(pid);
    assert_eq!(get_text(proxy.admin, "/ready").await?, "ready\n");
    assert_eq!(proxy.wait(Duration::from_secs(15)).await?.code(), Some(0));
    let log = proxy.log();
    assert!(log.contains("certificate handed over"), "{log}");
    Ok(())
}
