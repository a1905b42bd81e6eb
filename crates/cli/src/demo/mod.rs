//! `weft demo`: a meshed sample application on loopback, with no root and
//! no Kubernetes.
//!
//! A real `weft-control` (file discovery, a fresh certificate authority)
//! and three services, every replica behind its own `weft-proxy`:
//! `web.demo:8080`, an HTTP/1.1 front end that calls `api.demo:8080` (HTTP;
//! two replicas, each failing 5 % of requests, one of them 25 ms slow) and
//! `health.demo:9090` (gRPC; two replicas). A traffic generator calls the
//! front end through a meshed client proxy, so every hop between proxies is
//! mutual TLS. The proxies' admin addresses are written to a Prometheus
//! file_sd targets file, which `weft stat`, `edges` and `top` read.

mod traffic;
mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use weft_test_support::backend::{Backend, Behaviour};
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::proxy::Proxy;
use weft_test_support::{DestinationsFile, grpc, workspace_binary};

use crate::source::Output;
use crate::targets::{self, Group, Target};
use crate::window::{self, Window};
use crate::{edges, golden};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How long to run, e.g. 30s or 5m; 0 runs until Ctrl-C.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Requests per second sent to the front end.
    #[arg(long, default_value_t = 50)]
    rps: u32,
    /// Seconds between summary lines.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Where to write the proxies' targets (Prometheus file_sd JSON)
    /// [default: the file other weft commands read]
    #[arg(long, env = "WEFT_TARGETS", value_name = "FILE")]
    targets: Option<PathBuf>,
    /// Export the proxies' spans to this OTLP/gRPC collector (`host:port`).
    #[arg(long, env = "WEFT_TRACE_COLLECTOR", value_name = "ADDR")]
    trace_collector: Option<String>,
    /// With --trace-collector: the share of requests traced.
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    trace_sample: f64,
    /// Print the final report as JSON instead.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability from 0 to 1")),
    }
}

/// A meshed workload: its proxy, and the labels Prometheus and the CLI
/// know it by.
struct Workload {
    name: &'static str,
    proxy: Proxy,
}

#[derive(serde::Serialize)]
struct Report {
    window_seconds: f64,
    services: Vec<golden::Golden>,
    edges: Vec<edges::Row>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        duration,
        rps,
        every,
        targets: targets_path,
        output,
        trace_collector,
        trace_sample,
    } = args;
    anyhow::ensure!(rps > 0, "--rps must be at least 1");
    anyhow::ensure!(!every.is_zero(), "--every must be longer than 0s");
    let targets_path = targets_path.unwrap_or_else(targets::default_path);
    let proxy_bin = workspace_binary("weft-proxy")?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let step = |what: &str| eprintln!("weft demo: {what}");

    step("starting the sample services");
    let api_1 = Backend::start_with(
        "api-1",
        any,
        Behaviour {
            delay: Duration::ZERO,
            fail_every: Some(20),
            slow: None,
        },
    )
    .await?;
    let api_2 = Backend::start_with(
        "api-2",
        any,
        Behaviour {
            delay: Duration::from_millis(25),
            fail_every: Some(20),
            slow: None,
        },
    )
    .await?;
    let health_1 = grpc::start().await?;
    let health_2 = grpc::start().await?;
    let web_listener = TcpListener::bind(any).await?;
    let web_addr = web_listener.local_addr()?;

    step("starting weft-control with a fresh certificate authority");
    let ca = MeshCa::new().context("creating the demo's certificate authority")?;
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let path = file.path_str();
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--destinations", &path, "--log", "warn,weft_control=info"],
    )
    .await
    .context("starting weft-control")?;
    let grpc_addr = control.grpc.to_string();
    let anchors = ca.anchors();
    let trace_sample = trace_sample.to_string();
    let start_proxy =
        async |name: &'static str, forward: Option<SocketAddr>| -> anyhow::Result<Workload> {
            let token = ca.token_file(name)?;
            let forward = forward.map(|a| a.to_string());
            let mut env = vec![
                ("WEFT_PROXY_CONTROL_ADDR", grpc_addr.as_str()),
                ("WEFT_PROXY_IDENTITY_NAME", name),
                ("WEFT_PROXY_IDENTITY_TOKEN_FILE", token.as_str()),
                ("WEFT_PROXY_TRUST_ANCHORS", anchors.as_str()),
                ("WEFT_PROXY_LOG", "warn,weft_proxy=info"),
            ];
            if let Some(f) = &forward {
                env.push(("WEFT_PROXY_INBOUND_FORWARD", f.as_str()));
            }
            if let Some(c) = &trace_collector {
                env.push(("WEFT_PROXY_TRACE_COLLECTOR", c.as_str()));
                env.push(("WEFT_PROXY_TRACE_SAMPLE", trace_sample.as_str()));
            }
            let proxy = Proxy::start(&proxy_bin, &env)
                .await
                .with_context(|| format!("starting the proxy for {name}"))?;
            Ok(Workload { name, proxy })
        };

    step("starting a meshed proxy for every replica");
    let servers = [
        ("api.demo", "api.demo:8080", api_1.addr),
        ("api.demo", "api.demo:8080", api_2.addr),
        ("health.demo", "health.demo:9090", health_1.addr),
        ("health.demo", "health.demo:9090", health_2.addr),
        ("web.demo", "web.demo:8080", web_addr),
    ];
    let mut workloads = Vec::new();
    for (name, _, app) in servers {
        workloads.push(start_proxy(name, Some(app)).await?);
    }
    let mut yaml = String::from("destinations:\n");
    for service in ["api.demo:8080", "health.demo:9090", "web.demo:8080"] {
        yaml.push_str(&format!("  \"{service}\":\n    endpoints:\n"));
        for ((name, s, _), w) in servers.iter().zip(&workloads) {
            if *s == service {
                yaml.push_str(&format!(
                    "      - addr: {}\n        identity: {name}\n",
                    w.proxy.inbound
                ));
            }
        }
    }
    file.write_yaml(&yaml)?;
    let web_proxy = workloads
        .last()
        .map(|w| w.proxy.outbound)
        .context("no web proxy")?;
    let _web = web::start(web_listener, web_proxy).await?;
    // The control plane reads the file within 250 ms; let the first
    // lookups find every service.
    tokio::time::sleep(Duration::from_millis(400)).await;
    workloads.push(start_proxy("traffic.demo", None).await?);
    let client = workloads
        .last()
        .map(|w| w.proxy.outbound)
        .context("no traffic proxy")?;

    step("probing api and health through the mesh and directly");
    let prober = TcpListener::bind(any).await?;
    let prober_addr = prober.local_addr()?;
    let _probes = tokio_util::task::AbortOnDropHandle::new(
        crate::probe::spawn(
            &format!(
                "proxy: {client}\ninterval: 5s\ntimeout: 2s\nprobes:\n\
                 - {{name: api, authority: \"api.demo:8080\", direct: \"{}\", http: {{path: /healthz}}}}\n\
                 - {{name: health, authority: \"health.demo:9090\", direct: \"{}\", grpc: {{service: \"\"}}}}\n",
                api_1.addr, health_1.addr
            ),
            prober,
        )
        .await?,
    );

    let mut groups = target_groups(&workloads, &control);
    groups.push(Group {
        targets: vec![prober_addr.to_string()],
        labels: [("role".to_string(), "probe".to_string())].into(),
    });
    targets::write(&targets_path, &groups)?;
    let proxies: Vec<Target> = targets::from_groups(groups)?
        .into_iter()
        .filter(|t| t.is_proxy())
        .collect();

    print_guide(
        &workloads,
        &control,
        &targets_path,
        &path,
        &anchors,
        duration,
    );

    // Ctrl-C, a process manager's SIGTERM and a closed terminal's SIGHUP
    // all stop the demo the same way: every child is stopped on the way
    // out. (A SIGKILL cannot be caught; the children die with the demo
    // anyway, see weft_test_support::process::guarded.)
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = Arc::new(AtomicBool::new(false));
    let generators = traffic::start(client, web::WEB, rps, stop.clone());
    step("the mesh is up and traffic is flowing");

    let started = Instant::now();
    let first = window::snapshots(&proxies).await;
    let mut last = first.clone();
    let mut last_at = Instant::now();
    let deadline = (!duration.is_zero()).then(|| started + duration);
    loop {
        let wait = deadline.map_or(every, |d| {
            every.min(d.saturating_duration_since(Instant::now()))
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = int.recv() => { eprintln!("\nCtrl-C: stopping"); break; }
            _ = term.recv() => { eprintln!("SIGTERM: stopping"); break; }
            _ = hup.recv() => { eprintln!("SIGHUP: stopping"); break; }
        }
        let now = window::snapshots(&proxies).await;
        let w = Window::across(&last, &now, last_at.elapsed());
        println!(
            "[{:>4.0}s] {}",
            started.elapsed().as_secs_f64(),
            summary(&w)
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
    let end = window::snapshots(&proxies).await;
    let w = Window::across(&first, &end, started.elapsed());
    let report = Report {
        window_seconds: w.seconds,
        services: services(&w),
        edges: edges::edges(&w),
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            println!("\nover the whole run, per service (measured by the receiving proxies):");
            print!("{}", golden::table("SERVICE", &report.services));
            println!("\nedges (measured by the calling proxies):");
            print!("{}", edges::table(&report.edges));
        }
    }
    if errors > 0 {
        eprintln!("(the traffic generator saw {errors} transport errors)");
    }
    step("stopping every process it started");
    for w in &workloads {
        w.proxy.terminate()?;
    }
    control.process.terminate()?;
    let _ = std::fs::remove_file(&targets_path);
    Ok(())
}

fn target_groups(workloads: &[Workload], control: &Control) -> Vec<Group> {
    let mut groups: Vec<Group> = workloads
        .iter()
        .map(|w| Group {
            targets: vec![w.proxy.admin.to_string()],
            labels: [
                ("role", "proxy"),
                ("workload", w.name),
                ("identity", w.name),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        })
        .collect();
    groups.push(Group {
        targets: vec![control.admin.to_string()],
        labels: [
            ("role".to_string(), "control".to_string()),
            ("grpc".to_string(), control.grpc.to_string()),
            // What `weft endpoints` and `weft check` verify the control
            // channel with.
            ("anchors".to_string(), control.anchors.display().to_string()),
        ]
        .into(),
    });
    groups
}

fn services(w: &Window) -> Vec<golden::Golden> {
    golden::by_service(w)
}

fn summary(w: &Window) -> String {
    let mut rows = services(w);
    // A steady order line after line, whatever is busiest.
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    if rows.is_empty() {
        return "no traffic yet".into();
    }
    rows.iter()
        .map(|g| {
            format!(
                "{} {:.0} rps {:.1}% ok p99 {:.0}ms {:.0}% mTLS",
                g.name,
                g.rps,
                g.success_rate * 100.0,
                g.p99_ms,
                g.mtls_share * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn print_guide(
    workloads: &[Workload],
    control: &Control,
    targets: &std::path::Path,
    destinations: &str,
    anchors: &str,
    duration: Duration,
) {
    let default_targets = targets == targets::default_path();
    let flag = if default_targets {
        String::new()
    } else {
        format!(" --targets {}", targets.display())
    };
    println!(
        "weft demo: {} meshed proxies and weft-control are up; every hop between proxies is mutual TLS",
        workloads.len()
    );
    println!(
        "  traffic.demo -> web.demo:8080 (HTTP/1.1 front end) -> api.demo:8080 (HTTP; 5% failures, one replica 25 ms slow)"
    );
    println!("                                                      -> health.demo:9090 (gRPC)");
    println!("\n  in another terminal:");
    for (cmd, what) in [
        ("stat", "golden metrics per service"),
        ("stat web.demo --to api.demo", "one edge"),
        ("edges", "who talks to whom, with their identities"),
        ("top", "the busiest routes, live"),
        ("endpoints api.demo:8080", "what discovery says"),
        ("check", "is the mesh healthy (the probes too)"),
        ("dashboard", "all of it in a browser"),
    ] {
        println!("    {:<44} # {what}", format!("weft {cmd}{flag}"));
    }
    println!("\n  admin endpoints (/metrics /ready /live /env.json):");
    for w in workloads {
        println!("    {:<13} http://{}", w.name, w.proxy.admin);
    }
    println!(
        "    {:<13} http://{}  (grpc {})",
        "weft-control", control.admin, control.grpc
    );
    println!("  targets (Prometheus file_sd): {}", targets.display());
    println!("  destinations file: {destinations} (edit it: changes apply within a second)");
    println!("  trust anchor: {anchors}");
    if duration.is_zero() {
        println!("  running until Ctrl-C\n");
    } else {
        println!("  running for {}\n", humantime::format_duration(duration));
    }
}
