//! Mesh measurements for `cargo xtask bench`: mutual TLS handshakes per
//! second against a real inbound proxy, and the control plane's fan-out of
//! one endpoint change to many watchers.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use linkerd2_proxy_api::destination::GetDestination;
use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::Serialize;

use crate::procs::{Proc, field, free_port, spawn_until, target_dir};

#[derive(Debug, Serialize)]
pub(crate) struct Handshakes {
    pub(crate) concurrency: usize,
    pub(crate) seconds: f64,
    pub(crate) handshakes: u64,
    pub(crate) failed: u64,
    pub(crate) per_second: f64,
    /// Inbound proxy CPU per handshake.
    pub(crate) proxy_cpu_us_per_handshake: f64,
}

/// Full TLS 1.3 handshakes with client certificates against `inbound`,
/// from `concurrency` clients for `seconds`.
pub(crate) fn handshakes(
    ca_dir: &Path,
    inbound: SocketAddr,
    server_id: &str,
    proxy: &Proc,
    seconds: u64,
) -> anyhow::Result<Handshakes> {
    let issuer = weft_identity::Issuer::load(&weft_identity::CaDir::new(ca_dir))?;
    let name: weft_identity::Name = "handshake.bench.weft".parse()?;
    let (key, csr) = weft_identity::new_csr(&name)?;
    let leaf = issuer.certify(&csr, &name, Duration::from_secs(3600), SystemTime::now())?;
    let anchors = weft_identity::read_pem_certs(&ca_dir.join("ca.crt"))?;
    let mut roots = rustls::RootCertStore::empty();
    for a in anchors {
        roots.add(a)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der, issuer.cert().clone()];
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(server_id.to_string())?;
    let concurrency = 8;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu_before = proxy.cpu_seconds();
    let started = Instant::now();
    runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let ok = ok.clone();
            let failed = failed.clone();
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let result = async {
                        let tcp = tokio::net::TcpStream::connect(inbound).await?;
                        tcp.set_nodelay(true)?;
                        let mut tls = connector.connect(server_name.clone(), tcp).await?;
                        tokio::io::AsyncWriteExt::shutdown(&mut tls).await?;
                        Ok::<_, std::io::Error>(())
                    }
                    .await;
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = proxy.cpu_seconds() - cpu_before;
    let handshakes = ok.load(Ordering::Relaxed);
    Ok(Handshakes {
        concurrency,
        seconds: elapsed,
        handshakes,
        failed: failed.load(Ordering::Relaxed),
        per_second: handshakes as f64 / elapsed,
        proxy_cpu_us_per_handshake: cpu * 1e6 / handshakes.max(1) as f64,
    })
}

#[derive(Debug, Serialize)]
pub(crate) struct FanOut {
    pub(crate) watchers: usize,
    pub(crate) services: usize,
    pub(crate) streams: usize,
    pub(crate) setup_s: f64,
    /// For each change: time from etcd acknowledging the put to the last
    /// watcher receiving the update, in milliseconds.
    pub(crate) change_to_all_ms: Vec<f64>,
    pub(crate) control_rss_bytes: u64,
    /// weft-control's RSS with the services loaded and no stream open.
    pub(crate) control_rss_before_bytes: u64,
    /// (RSS with every stream open − RSS before) / streams.
    pub(crate) bytes_per_stream: f64,
    pub(crate) control_cpu_s: f64,
}

/// One endpoint change must reach every watcher within this (worst of
/// the changes).
const MAX_FAN_OUT_MS: f64 = 20.0;
/// What an open `Get` stream may cost the control plane.
const MAX_BYTES_PER_STREAM: f64 = 2048.0;

pub(crate) fn fan_out_targets(f: &FanOut) -> Vec<crate::bench::Target> {
    let worst = f.change_to_all_ms.iter().copied().fold(0.0_f64, f64::max);
    vec![
        crate::bench::Target {
            name: format!(
                "one endpoint change reaches all {} watchers (worst of {})",
                f.watchers,
                f.change_to_all_ms.len()
            ),
            measured: worst,
            limit: MAX_FAN_OUT_MS,
            unit: "ms",
            pass: worst <= MAX_FAN_OUT_MS,
        },
        crate::bench::Target {
            name: format!("control-plane memory per Get stream, {} streams", f.streams),
            measured: f.bytes_per_stream,
            limit: MAX_BYTES_PER_STREAM,
            unit: "bytes",
            pass: f.bytes_per_stream <= MAX_BYTES_PER_STREAM,
        },
    ]
}

/// A key put through etcd's JSON gateway (keys and values base64).
fn etcd_put(client: SocketAddr, key: &str, value: &str) -> anyhow::Result<()> {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        BASE64.encode(key),
        BASE64.encode(value)
    );
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-X", "POST", "-d", &body])
        .arg(format!("http://{client}/v3/kv/put"))
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("etcd put {key}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `watchers` clients, each with its own connection and a Get stream for
/// each of `services` services; then `changes` endpoint changes to one
/// service that every watcher follows.
pub(crate) fn fan_out(
    dir: &Path,
    watchers: usize,
    services: usize,
    changes: usize,
) -> anyhow::Result<FanOut> {
    let client = free_port()?;
    let peer = free_port()?;
    let mut cmd = weft_test_support::process::std_command("etcd");
    cmd.args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &format!("http://{client}")])
        .args(["--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &format!("http://{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
        .args(["--initial-cluster", &format!("bench=http://{peer}")]);
    let (_etcd, _) = spawn_until(
        "etcd (Debian package etcd-server)",
        cmd,
        "ready to serve client requests",
        true,
    )?;
    for s in 0..services {
        for e in 1..=2 {
            etcd_put(
                client,
                &format!(
                    "/weft/services/svc-{s}.bench:80/endpoints/10.{}.0.{e}:4143",
                    s % 250
                ),
                "{}",
            )?;
        }
    }
    let release = target_dir()?.join("release");
    let ca = weft_identity::CaDir::new(dir.join("fan-out-ca"));
    ca.init(&"weft.local".parse()?, true)?;
    let mut cmd = weft_test_support::process::std_command(release.join("weft-control"));
    cmd.env_clear()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--dns",
            "false",
        ])
        .arg("--identity-dir")
        .arg(&ca.dir)
        // Every watcher here is one anonymous client (127.0.0.1): it may
        // follow all the names the fleet would.
        .args(["--max-names-per-client", &(watchers * services).to_string()])
        .args(["--etcd", &format!("http://{client}")])
        .args(["--log", "warn,weft_control=info"]);
    let (control, line) = spawn_until("weft-control", cmd, " listening ", true)?;
    let grpc = field(&line, "grpc")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tls = weft_channel::ClientTls::new(
        weft_channel::load_roots(&ca.anchor_cert())?,
        &weft_channel::DEFAULT_NAME.parse()?,
        None,
    )?;
    // The services are loaded once the control plane answers: let it
    // settle, then call that the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = control.rss_bytes();
    runtime.block_on(async {
        let setup_started = Instant::now();
        let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(watchers * services);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        for _ in 0..watchers {
            let channel =
                weft_channel::connect(&grpc.to_string(), &tls, Duration::from_secs(5)).await?;
            for s in 0..services {
                let mut client = DestinationClient::new(channel.clone());
                let first_tx = first_tx.clone();
                let seen_tx = seen_tx.clone();
                tokio::spawn(async move {
                    let request = GetDestination {
                        path: format!("svc-{s}.bench:80"),
                        ..Default::default()
                    };
                    let Ok(rsp) = client.get(request).await else {
                        return;
                    };
                    let mut stream = rsp.into_inner();
                    if stream.message().await.ok().flatten().is_some() {
                        let _ = first_tx.send(()).await;
                    }
                    while let Ok(Some(_)) = stream.message().await {
                        if s == 0 {
                            let _ = seen_tx.send(Instant::now());
                        }
                    }
                });
            }
        }
        for _ in 0..watchers * services {
            tokio::time::timeout(Duration::from_secs(120), first_rx.recv())
                .await
                .context("streams never all answered")?;
        }
        let setup_s = setup_started.elapsed().as_secs_f64();
        let rss_streams = control.rss_bytes();
        let cpu_before = control.cpu_seconds();
        let mut change_to_all_ms = Vec::new();
        for c in 0..changes {
            let key = format!(
                "/weft/services/svc-0.bench:80/endpoints/10.0.1.{}:4143",
                c + 1
            );
            let put = tokio::task::spawn_blocking(move || etcd_put(client, &key, "{}"));
            put.await??;
            let acked = Instant::now();
            let mut last = acked;
            for _ in 0..watchers {
                let t = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                    .await
                    .context("an update never reached every watcher")?
                    .context("watchers gone")?;
                last = last.max(t);
            }
            change_to_all_ms.push(last.saturating_duration_since(acked).as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, anyhow::Error>(FanOut {
            watchers,
            services,
            streams: watchers * services,
            setup_s,
            change_to_all_ms,
            control_rss_bytes: control.rss_bytes(),
            control_rss_before_bytes: rss_before,
            bytes_per_stream: rss_streams.saturating_sub(rss_before) as f64
                / (watchers * services) as f64,
            control_cpu_s: control.cpu_seconds() - cpu_before,
        })
    })
}
