//! Meshing hosts, for `cargo xtask bench`: the transparent (iptables) path
//! against the explicit-proxy path and the direct path, in two network
//! namespaces of our own; and a proxy upgraded (SIGUSR2) under 1k RPS.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use weft_test_support::load::{H2load, Oha, steady_h2c};
use weft_test_support::netns::Netns;

use crate::bench::{Proto, Reference, Target, percentile};
use crate::procs::{Proc, field, spawn_until, target_dir};

const SERVER: &str = "10.97.0.2:8080";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CapturePath {
    /// The client dials the server; nothing in between.
    Direct,
    /// The client is configured to use the proxy (`127.0.0.1:4140`).
    Explicit,
    /// An unmodified client dials the server; iptables (`weft init`)
    /// sends the connection to the proxy.
    Transparent,
}

#[derive(Debug, Serialize)]
pub(crate) struct CaptureRow {
    pub(crate) proto: Proto,
    pub(crate) path: CapturePath,
    pub(crate) requests: u64,
    pub(crate) failed: u64,
    /// Median over rounds, and each round's.
    pub(crate) p50_us: f64,
    pub(crate) p50_rounds_us: Vec<f64>,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
    /// Proxy CPU per request over all rounds, and each round's.
    pub(crate) cpu_us_per_request: f64,
    pub(crate) cpu_rounds_us: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct UpgradeRow {
    pub(crate) client: &'static str,
    /// With SIGUSR2 in the middle, or the same run without (the baseline).
    pub(crate) upgrade: bool,
    pub(crate) responses: u64,
    /// Requests with no 2xx response, by reason.
    pub(crate) failed: u64,
    pub(crate) failures: Vec<String>,
    /// Requests sent again after a GOAWAY refused them (RFC 9113 8.7).
    pub(crate) resent: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// The longest any request took.
    pub(crate) slowest_ms: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Hosts {
    pub(crate) capture: Vec<CaptureRow>,
    pub(crate) upgrade: Vec<UpgradeRow>,
}

pub(crate) fn run(dir: &Path, secs: u64, rounds: u64) -> anyhow::Result<Hosts> {
    let capture = capture(dir, secs, rounds)?;
    let upgrade = upgrade()?;
    Ok(Hosts { capture, upgrade })
}

fn release(bin: &str) -> anyhow::Result<String> {
    Ok(target_dir()?
        .join("release")
        .join(bin)
        .to_string_lossy()
        .into_owned())
}

fn capture(dir: &Path, secs: u64, rounds: u64) -> anyhow::Result<Vec<CaptureRow>> {
    let client = Netns::new("bench-client")?;
    let server = Netns::new("bench-server")?;
    client.link(&server, "10.97.0.1/24", "10.97.0.2/24")?;
    let _backend = server.spawn(&[
        &release("weft-test-backend")?,
        "--mode",
        "http",
        "--listen",
        SERVER,
        "--name",
        "server",
    ])?;
    // The proxy runs as root (uid 0), whose traffic is never captured;
    // the transparent client runs as nobody.
    let mut cmd = weft_test_support::process::std_command("ip");
    cmd.args(["netns", "exec", &client.name])
        .arg(crate::procs::proxy_bin()?)
        .env_clear()
        .env("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140")
        .env("WEFT_PROXY_INBOUND_LISTEN", "127.0.0.1:4143")
        .env("WEFT_PROXY_ADMIN_LISTEN", "127.0.0.1:4191")
        .env("WEFT_PROXY_LOG", "warn,weft_proxy=info");
    let (proxy, _) = spawn_until("weft-proxy", cmd, " listening ", true)?;
    client.exec(&[
        &release("weft")?,
        "init",
        "--proxy-uid",
        "0",
        "--outbound-only",
    ])?;
    wait_for_server(&client)?;

    // nobody must be able to write h2load's log.
    let logs = dir.join("capture-logs");
    std::fs::create_dir_all(&logs)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o1777))?;
    }
    let paths = [
        CapturePath::Direct,
        CapturePath::Explicit,
        CapturePath::Transparent,
    ];
    let mut rows = Vec::new();
    for proto in [Proto::H1, Proto::H2c] {
        let mut acc: Vec<Acc> = paths.iter().map(|_| Acc::default()).collect();
        for round in 0..rounds {
            for (i, path) in paths.iter().enumerate() {
                let log = logs.join(format!("{path:?}-{round}.log"));
                let mut run = match path {
                    CapturePath::Direct => H2load::new(format!("http://{SERVER}/"), &log),
                    CapturePath::Explicit => {
                        let mut r = H2load::new("http://127.0.0.1:4140/", &log);
                        r.authority = Some(SERVER.into());
                        r
                    }
                    CapturePath::Transparent => H2load::new(format!("http://{SERVER}/"), &log),
                };
                run.prefix = vec![
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    client.name.clone(),
                ];
                if *path == CapturePath::Transparent {
                    run.prefix
                        .extend(weft_test_support::netns::AS_NOBODY.map(String::from));
                }
                run.h1 = proto == Proto::H1;
                (run.clients, run.rps) = (10, Some(100));
                run.duration_secs = secs;
                run.warm_up_secs = 1;
                let cpu_before = proxy.cpu_seconds();
                let r = run.run()?;
                let cpu = proxy.cpu_seconds() - cpu_before;
                let a = &mut acc[i];
                a.p50s.push(percentile(&r.latencies_us, 50.0));
                if *path != CapturePath::Direct {
                    a.cpu_per_request.push(cpu * 1e6 / r.total().max(1) as f64);
                }
                a.latencies.extend_from_slice(&r.latencies_us);
                a.requests += r.total();
                a.failed += r.failed + r.status_5xx;
                a.cpu_s += cpu;
                eprintln!(
                    "  {proto:?} {path:?} round {}: p50 {:.0} µs, {} requests, {} failed",
                    round + 1,
                    a.p50s.last().copied().unwrap_or_default(),
                    r.total(),
                    r.failed + r.status_5xx
                );
            }
        }
        for (path, mut a) in paths.into_iter().zip(acc) {
            a.latencies.sort_by(|x, y| x.total_cmp(y));
            let mut sorted = a.p50s.clone();
            sorted.sort_by(|x, y| x.total_cmp(y));
            rows.push(CaptureRow {
                proto,
                path,
                requests: a.requests,
                failed: a.failed,
                p50_us: percentile(&sorted, 50.0),
                p50_rounds_us: a.p50s,
                p99_us: percentile(&a.latencies, 99.0),
                max_us: a.latencies.last().copied().unwrap_or(f64::NAN),
                cpu_us_per_request: if path == CapturePath::Direct {
                    0.0
                } else {
                    a.cpu_s * 1e6 / a.requests.max(1) as f64
                },
                cpu_rounds_us: a.cpu_per_request,
            });
        }
    }
    drop(proxy);
    Ok(rows)
}

/// One path's rounds so far.
#[derive(Default)]
struct Acc {
    latencies: Vec<f64>,
    p50s: Vec<f64>,
    cpu_per_request: Vec<f64>,
    requests: u64,
    failed: u64,
    cpu_s: f64,
}

/// The backend answers through the namespaces' link before measuring.
fn wait_for_server(client: &Netns) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = client
            .command(&[
                "curl",
                "-sf",
                "-o",
                "/dev/null",
                &format!("http://{SERVER}/"),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the server namespace never answered on {SERVER}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The clients of the upgrade runs.
#[derive(Clone, Copy)]
enum Client {
    OhaH1,
    OhaH2,
    HyperH2,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::OhaH1 => "oha, HTTP/1.1 keep-alive",
            Client::OhaH2 => "oha, HTTP/2",
            Client::HyperH2 => "hyper-util client, HTTP/2",
        }
    }
}

const UPGRADE_REQUESTS: u64 = 8000;

/// 1k RPS for 8 s from 20 connections through a proxy's inbound side;
/// with `upgrade`, SIGUSR2 after 3 s.
fn upgrade() -> anyhow::Result<Vec<UpgradeRow>> {
    let (_backend, backend) = crate::policy::backend("upgrade", &[])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for client in [Client::OhaH1, Client::OhaH2, Client::HyperH2] {
        for upgrade in [false, true] {
            let (proxy, inbound, admin) = start(backend)?;
            let url = format!("http://{inbound}/");
            let mut new_pid = None;
            let row = std::thread::scope(|s| -> anyhow::Result<UpgradeRow> {
                let load = s.spawn(|| drive(&runtime, client, &url));
                if upgrade {
                    std::thread::sleep(Duration::from_secs(3));
                    weft_test_support::process::signal(proxy.pid(), "USR2")?;
                    new_pid = Some(wait_new_pid(&runtime, admin, proxy.pid())?);
                }
                let mut row = load
                    .join()
                    .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
                row.upgrade = upgrade;
                Ok(row)
            });
            if let Some(pid) = new_pid {
                let _ = weft_test_support::process::signal(pid, "KILL");
            }
            let row = row?;
            eprintln!(
                "  upgrade {:<5} {:<28} {} responses, {} failed {:?}, {} resent, p50 {:.2} ms, p99 {:.2} ms, slowest {:.1} ms",
                row.upgrade,
                row.client,
                row.responses,
                row.failed,
                row.failures,
                row.resent,
                row.p50_ms,
                row.p99_ms,
                row.slowest_ms
            );
            rows.push(row);
            drop(proxy);
        }
    }
    Ok(rows)
}

fn start(backend: SocketAddr) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let mut cmd = weft_test_support::process::std_command(crate::procs::proxy_bin()?);
    cmd.env_clear()
        .env("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:0")
        .env("WEFT_PROXY_INBOUND_LISTEN", "127.0.0.1:0")
        .env("WEFT_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("WEFT_PROXY_INBOUND_FORWARD", backend.to_string())
        .env("WEFT_PROXY_SHUTDOWN_GRACE", "10s")
        .env("WEFT_PROXY_LOG", "warn,weft_proxy=info");
    let (proc, line) = spawn_until("weft-proxy", cmd, " listening ", true)?;
    Ok((proc, field(&line, "inbound")?, field(&line, "admin")?))
}

fn wait_new_pid(
    runtime: &tokio::runtime::Runtime,
    admin: SocketAddr,
    old: u32,
) -> anyhow::Result<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let env = runtime.block_on(weft_test_support::metrics::get_text(admin, "/env.json"));
        if let Ok(env) = env
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&env)
            && let Some(pid) = v["pid"].as_u64()
            && pid as u32 != old
        {
            return Ok(pid as u32);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no new process after SIGUSR2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn drive(
    runtime: &tokio::runtime::Runtime,
    client: Client,
    url: &str,
) -> anyhow::Result<UpgradeRow> {
    match client {
        Client::OhaH1 | Client::OhaH2 => {
            let mut oha = Oha::new(url);
            oha.http2 = matches!(client, Client::OhaH2);
            (oha.connections, oha.rate, oha.requests) = (20, 1000, UPGRADE_REQUESTS);
            let r = oha.run().context("oha")?;
            let mut failures: Vec<String> =
                r.errors.iter().map(|(e, n)| format!("{n}× {e}")).collect();
            failures.extend(
                r.statuses
                    .iter()
                    .filter(|(s, _)| !s.starts_with('2'))
                    .map(|(s, n)| format!("{n}× status {s}")),
            );
            Ok(UpgradeRow {
                client: client.name(),
                upgrade: false,
                responses: r.responses(),
                failed: r.failed(),
                failures,
                resent: 0,
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                slowest_ms: r.slowest_ms,
            })
        }
        Client::HyperH2 => {
            let r = runtime.block_on(steady_h2c(url, 1000, UPGRADE_REQUESTS, 20))?;
            let mut lat: Vec<f64> = r.latencies_ms.clone();
            lat.sort_by(|a, b| a.total_cmp(b));
            Ok(UpgradeRow {
                client: client.name(),
                upgrade: false,
                responses: r.ok,
                failed: r.failed.len() as u64,
                failures: r.failed,
                resent: r.resent,
                p50_ms: percentile(&lat, 50.0),
                p99_ms: percentile(&lat, 99.0),
                slowest_ms: r.slowest.as_secs_f64() * 1000.0,
            })
        }
    }
}

/// What the issue asks: transparent costs what explicit costs, and an
/// upgrade under load fails nothing and stalls nothing for long.
pub(crate) fn targets(h: &Hosts) -> (Vec<Target>, Vec<Reference>) {
    let mut targets = Vec::new();
    let mut references = Vec::new();
    for proto in [Proto::H1, Proto::H2c] {
        let find = |path| {
            h.capture
                .iter()
                .find(|r| r.proto == proto && r.path == path)
        };
        let (Some(direct), Some(explicit), Some(transparent)) = (
            find(CapturePath::Direct),
            find(CapturePath::Explicit),
            find(CapturePath::Transparent),
        ) else {
            continue;
        };
        let spread = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.1}–{hi:.1}")
        };
        let ratio = transparent.cpu_us_per_request / explicit.cpu_us_per_request;
        targets.push(Target {
            name: format!(
                "{proto:?} 1k RPS: proxy CPU per request, transparent / explicit ({:.1} vs {:.1} µs; rounds {} vs {})",
                transparent.cpu_us_per_request,
                explicit.cpu_us_per_request,
                spread(&transparent.cpu_rounds_us),
                spread(&explicit.cpu_rounds_us)
            ),
            measured: ratio,
            limit: 1.2,
            unit: "×",
            pass: ratio <= 1.2,
        });
        for row in [explicit, transparent] {
            references.push(Reference {
                name: format!(
                    "{proto:?} 1k RPS: p50 added by the {:?} path over direct (rounds {} vs {} µs); p99 {:.0} µs, direct's own {:.0}",
                    row.path,
                    spread(&row.p50_rounds_us),
                    spread(&direct.p50_rounds_us),
                    row.p99_us,
                    direct.p99_us
                ),
                measured: row.p50_us - direct.p50_us,
                unit: "µs",
            });
        }
    }
    for row in h.upgrade.iter().filter(|r| r.upgrade) {
        let baseline = h
            .upgrade
            .iter()
            .find(|b| !b.upgrade && b.client == row.client);
        let judged = row.client != Client::OhaH2.name();
        let failed = Target {
            name: format!(
                "upgrade (SIGUSR2) under 1k RPS, {}: failed requests{}",
                row.client,
                if row.resent > 0 {
                    format!(" ({} unsent after GOAWAY, sent again)", row.resent)
                } else {
                    String::new()
                }
            ),
            measured: row.failed as f64,
            limit: 0.0,
            unit: "requests",
            pass: row.failed == 0,
        };
        if judged {
            targets.push(failed);
        } else {
            references.push(Reference {
                name: format!(
                    "{} (not judged: oha reports the request each HTTP/2 connection had not yet sent when the GOAWAY came: {:?})",
                    failed.name, row.failures
                ),
                measured: failed.measured,
                unit: "requests",
            });
        }
        targets.push(Target {
            name: format!(
                "upgrade under 1k RPS, {}: longest request (the same run without upgrade: {:.1} ms)",
                row.client,
                baseline.map_or(f64::NAN, |b| b.slowest_ms)
            ),
            measured: row.slowest_ms,
            limit: 50.0,
            unit: "ms",
            pass: row.slowest_ms <= 50.0,
        });
    }
    (targets, references)
}

pub(crate) fn table(h: &Hosts) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| capture path (1k RPS, 2 namespaces) | proto | requests | failed | p50 µs (median of rounds) | p99 µs | max µs | proxy CPU µs/req |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &h.capture {
        let _ = writeln!(
            out,
            "| {:?} | {:?} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} |",
            r.path,
            r.proto,
            r.requests,
            r.failed,
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.cpu_us_per_request
        );
    }
    let _ = writeln!(
        out,
        "\n| upgrade under 1k RPS (20 connections, 8,000 requests) | SIGUSR2 | responses | failed | resent | p50 ms | p99 ms | slowest ms |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &h.upgrade {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
            r.client,
            if r.upgrade { "yes" } else { "no" },
            r.responses,
            r.failed,
            r.resent,
            r.p50_ms,
            r.p99_ms,
            r.slowest_ms
        );
    }
    out
}
