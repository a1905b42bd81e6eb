//! `weft demo`: a small mesh on loopback with no root and no Kubernetes.
//!
//! A real `weft-control` (file discovery, a fresh certificate authority)
//! and three sample services of two replicas each, every replica behind its
//! own meshed `weft-proxy`: `web.demo:8080` (HTTP/1.1; one replica fails
//! 10 % of requests, ~5 % overall), `api.demo:8080` (HTTP/2; one replica is
//! slow) and `health.demo:9090` (gRPC; 5 % of calls ask for an unknown
//! service and get NOT_FOUND). Traffic generators call all three through a
//! client-side meshed proxy, so every hop between proxies is mutual TLS; a
//! summary line is printed every few seconds, and at the end the golden
//! metrics table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_test_support::backend::{Backend, Behaviour};
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;
use weft_test_support::{DestinationsFile, client, grpc, workspace_binary};

use crate::golden;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How long to run, e.g. 30s or 5m; 0 runs until Ctrl-C.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Requests per second per service.
    #[arg(long, default_value_t = 50)]
    rps: u32,
    /// Seconds between summary lines.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Print the final table as JSON instead.
    #[arg(long, short = 'o', value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        duration,
        rps,
        every,
        output,
    } = args;
    anyhow::ensure!(rps > 0, "--rps must be at least 1");
    let proxy_bin = workspace_binary("weft-proxy")?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;

    let web_ok = Backend::start("web-1").await?;
    let web_flaky = Backend::start_with(
        "web-2",
        any,
        Behaviour {
            delay: Duration::ZERO,
            fail_every: Some(10),
        },
    )
    .await?;
    let api_fast = Backend::start("api-1").await?;
    let api_slow = Backend::start_with_delay("api-2", any, Duration::from_millis(25)).await?;
    let health_a = grpc::start().await?;
    let health_b = grpc::start().await?;

    // The control plane, with a fresh CA and (for now) no destinations.
    let ca = MeshCa::new().context("creating the demo's certificate authority")?;
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let path = file.path_str();
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &[
            "--destinations",
            &path,
            "--identity-dir",
            &ca.dir_str(),
            "--log",
            "warn,weft_control=info",
        ],
    )
    .await
    .context("starting weft-control")?;
    let grpc_addr = control.grpc.to_string();
    let anchors = ca.anchors();
    let meshed = |name: &str| -> anyhow::Result<Vec<(&'static str, String)>> {
        Ok(vec![
            ("WEFT_PROXY_CONTROL_ADDR", grpc_addr.clone()),
            ("WEFT_PROXY_IDENTITY_NAME", name.to_string()),
            ("WEFT_PROXY_IDENTITY_TOKEN_FILE", ca.token_file(name)?),
            ("WEFT_PROXY_TRUST_ANCHORS", anchors.clone()),
            ("WEFT_PROXY_LOG", "warn,weft_proxy=info".to_string()),
        ])
    };
    let start_proxy = async |env: Vec<(&'static str, String)>| -> anyhow::Result<Proxy> {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Proxy::start(&proxy_bin, &env)
            .await
            .context("starting weft-proxy")
    };

    // One meshed proxy per replica, forwarding to it.
    let replicas = [
        ("web.demo:8080", web_ok.addr),
        ("web.demo:8080", web_flaky.addr),
        ("api.demo:8080", api_fast.addr),
        ("api.demo:8080", api_slow.addr),
        ("health.demo:9090", health_a.addr),
        ("health.demo:9090", health_b.addr),
    ];
    let mut servers = Vec::new();
    let mut yaml = String::from("destinations:\n");
    let mut current = "";
    for (service, app) in replicas {
        let identity = service.split(':').next().unwrap_or(service);
        let mut env = meshed(identity)?;
        env.push(("WEFT_PROXY_INBOUND_FORWARD", app.to_string()));
        let proxy = start_proxy(env).await?;
        if service != current {
            yaml.push_str(&format!("  \"{service}\":\n    endpoints:\n"));
            current = service;
        }
        yaml.push_str(&format!(
            "      - addr: {}\n        identity: {identity}\n",
            proxy.inbound
        ));
        servers.push(proxy);
    }
    file.write_yaml(&yaml)?;
    // The control plane reads the file within 250 ms; the client proxy's
    // first lookups should find every service.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let proxy = start_proxy(meshed("traffic.demo")?).await?;

    println!(
        "weft demo: weft-control and {} meshed proxies are up (mutual TLS between every pair)",
        servers.len() + 1
    );
    println!(
        "  control   grpc {}   admin http://{}/metrics",
        control.grpc, control.admin
    );
    println!(
        "  client    outbound {}   (try: curl -x http://{} http://web.demo:8080/)",
        proxy.outbound, proxy.outbound
    );
    println!(
        "            admin    http://{}/metrics   /ready   /env.json",
        proxy.admin
    );
    for (s, (service, _)) in servers.iter().zip(replicas) {
        println!(
            "  {:<16} inbound {}   admin http://{}/metrics",
            service, s.inbound, s.admin
        );
    }
    println!("  destinations file: {path} (edit it: changes apply within a second)");
    println!("  trust anchor: {anchors}");
    println!(
        "  services: web.demo:8080 (HTTP/1.1, 2 replicas, one failing 10% => ~5% overall), api.demo:8080 (HTTP/2, one replica 25 ms slower), health.demo:9090 (gRPC, 5% NOT_FOUND)"
    );
    if duration.is_zero() {
        println!("  running until Ctrl-C");
    } else {
        println!("  running for {}", humantime::format_duration(duration));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let period = Duration::from_secs_f64(1.0 / f64::from(rps));
    let generators = vec![
        tokio::spawn(http_traffic(
            proxy.outbound,
            false,
            "web.demo:8080",
            period,
            stop.clone(),
        )),
        tokio::spawn(http_traffic(
            proxy.outbound,
            true,
            "api.demo:8080",
            period,
            stop.clone(),
        )),
        tokio::spawn(grpc_traffic(proxy.outbound, period, stop.clone())),
    ];

    let started = Instant::now();
    let first = scrape(proxy.admin).await?;
    let mut last = scrape(proxy.admin).await?;
    let mut last_at = Instant::now();
    let deadline = (!duration.is_zero()).then(|| started + duration);
    loop {
        let tick = tokio::time::sleep(every);
        tokio::select! {
            _ = tick => {}
            _ = tokio::signal::ctrl_c() => { println!("\nCtrl-C: stopping"); break; }
        }
        let now = scrape(proxy.admin).await?;
        let rows = golden::between(&last, &now, last_at.elapsed());
        let summary: Vec<String> = rows
            .iter()
            .map(|g| {
                format!(
                    "{} {:.0} rps {:.1}% ok p99 {:.1}ms {:.0}% mTLS",
                    g.authority,
                    g.rps,
                    g.success_rate * 100.0,
                    g.p99_ms,
                    g.mtls_share * 100.0
                )
            })
            .collect();
        println!(
            "[{:>4.0}s] {}",
            started.elapsed().as_secs_f64(),
            summary.join(" | ")
        );
        last = now;
        last_at = Instant::now();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for g in generators {
        errors += g.await.unwrap_or(0);
    }
    let end = scrape(proxy.admin).await?;
    let rows = golden::between(&first, &end, started.elapsed());
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("\ngolden metrics over the whole run (from the client-side proxy's /metrics):");
        print!("{}", golden::table(&rows));
    }
    if errors > 0 {
        println!("(traffic generators saw {errors} transport errors)");
    }
    proxy.terminate()?;
    for s in &servers {
        s.terminate()?;
    }
    control.process.terminate()?;
    Ok(())
}

/// A steady request clock: sleeping "the rest of the period" after each
/// request would drift below the asked rate by the timer's granularity.
fn pacer(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// Requests to `authority` at a steady pace over one connection,
/// reconnecting after an error. Returns the number of transport errors.
async fn http_traffic(
    proxy: SocketAddr,
    use_http2: bool,
    authority: &'static str,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut errors = 0;
    let mut conn = None;
    let mut clock = pacer(period);
    while !stop.load(Ordering::Relaxed) {
        clock.tick().await;
        if conn.is_none() {
            conn = client::Conn::connect(proxy, use_http2).await.ok();
        }
        if let Some(c) = conn.as_mut()
            && c.get(authority, "/").await.is_err()
        {
            errors += 1;
            conn = None;
        }
    }
    errors
}

async fn grpc_traffic(proxy: SocketAddr, period: Duration, stop: Arc<AtomicBool>) -> u64 {
    let mut errors = 0;
    let Ok(channel) = grpc::channel_via(proxy, "health.demo:9090").await else {
        return 1;
    };
    let mut n: u64 = 0;
    let mut clock = pacer(period);
    while !stop.load(Ordering::Relaxed) {
        clock.tick().await;
        n += 1;
        let service = if n.is_multiple_of(20) {
            "demo.Unknown"
        } else {
            grpc::SERVING
        };
        if let Err(status) = grpc::check(&channel, service).await
            && status.code() != tonic::Code::NotFound
        {
            errors += 1;
        }
    }
    errors
}
