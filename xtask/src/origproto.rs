//! Scenario h: HTTP/1.1 between meshed proxies, carried over HTTP/2
//! (`l5d-orig-proto`) or as HTTP/1.1. 1k RPS over 100 client connections
//! through a client-side proxy to a server-side one (mutual TLS, both
//! certified by weft-control), once with the upgrade and once without,
//! rounds interleaved; the direct path at the same load is the noise floor.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use serde::Serialize;

use crate::bench::{MTLS_AUTHORITY, Reference, Target, percentile};
use crate::procs::Proc;
use crate::versus::spread;

const CLIENTS: u32 = 100;
const RPS_PER_CLIENT: u32 = 10;

/// One round on one path.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Run {
    requests: u64,
    failed: u64,
    rps: f64,
    /// Both proxies' CPU over the requests.
    cpu_us_per_request: f64,
    /// Open connections from the client-side proxy to the server side
    /// (its `tcp_open_connections{direction="outbound",peer="dst"}`) as
    /// the load ends.
    upstream_connections: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Row {
    path: &'static str,
    rounds: Vec<Run>,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct OrigProto {
    seconds_per_run: u64,
    clients: u32,
    rps: u32,
    rows: Vec<Row>,
    pub(crate) targets: Vec<Target>,
    pub(crate) references: Vec<Reference>,
}

struct Path_ {
    name: &'static str,
    url: String,
    authority: Option<&'static str>,
    procs: Vec<Proc>,
    admin: Option<SocketAddr>,
}

pub(crate) fn run(dir: &Path, seconds: u64, rounds: u64) -> anyhow::Result<OrigProto> {
    let (_backend, backend) = crate::bench::start_backend()?;
    let mtls = crate::bench::start_mtls(dir, backend)?;
    let outbound = |upgrade: bool| -> anyhow::Result<Path_> {
        let (proc, addr, admin) =
            mtls.outbound_with(&[("WEFT_PROXY_ORIG_PROTO", upgrade.to_string())])?;
        Ok(Path_ {
            name: if upgrade {
                "meshed, HTTP/1.1 over HTTP/2"
            } else {
                "meshed, HTTP/1.1"
            },
            url: format!("http://{addr}/"),
            authority: Some(MTLS_AUTHORITY),
            procs: vec![proc],
            admin: Some(admin),
        })
    };
    let paths = [
        Path_ {
            name: "direct",
            url: format!("http://{backend}/"),
            authority: None,
            procs: Vec::new(),
            admin: None,
        },
        outbound(true)?,
        outbound(false)?,
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut runs: Vec<Vec<Run>> = paths.iter().map(|_| Vec::new()).collect();
    let mut latencies: Vec<Vec<f64>> = paths.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, p) in paths.iter().enumerate() {
            eprintln!("  orig-proto round {}: {}", round + 1, p.name);
            // The server side's CPU counts only on the meshed paths.
            let cpu = |procs: &[Proc]| -> f64 {
                let mut s: f64 = procs.iter().map(Proc::cpu_seconds).sum();
                if !procs.is_empty() {
                    s += mtls.inbound.cpu_seconds();
                }
                s
            };
            let before = cpu(&p.procs);
            let mut load =
                weft_test_support::load::H2load::new(&p.url, dir.join("h2load-origproto.log"));
            load.h1 = true;
            load.clients = CLIENTS;
            load.rps = Some(RPS_PER_CLIENT);
            load.duration_secs = seconds;
            load.warm_up_secs = 1;
            load.authority = p.authority.map(str::to_string);
            let r = load.run()?;
            let used = cpu(&p.procs) - before;
            let upstream_connections = match p.admin {
                Some(admin) => {
                    let m = runtime.block_on(weft_test_support::metrics::scrape(admin))?;
                    m.sum(
                        "tcp_open_connections",
                        &[("direction", "outbound"), ("peer", "dst")],
                    )
                }
                None => f64::from(CLIENTS),
            };
            runs[i].push(Run {
                requests: r.total(),
                failed: r.failed,
                rps: r.rps,
                cpu_us_per_request: used * 1e6 / r.total().max(1) as f64,
                upstream_connections,
            });
            latencies[i].extend(r.latencies_us);
        }
    }
    let rows: Vec<Row> = paths
        .iter()
        .zip(runs)
        .zip(latencies)
        .map(|((p, rounds), mut lat)| {
            lat.sort_by(|a, b| a.total_cmp(b));
            Row {
                path: p.name,
                rounds,
                p50_us: percentile(&lat, 50.0),
                p99_us: percentile(&lat, 99.0),
            }
        })
        .collect();
    let (targets, references) = judge(&rows);
    Ok(OrigProto {
        seconds_per_run: seconds,
        clients: CLIENTS,
        rps: CLIENTS * RPS_PER_CLIENT,
        rows,
        targets,
        references,
    })
}

fn judge(rows: &[Row]) -> (Vec<Target>, Vec<Reference>) {
    let mut targets = Vec::new();
    let mut references = Vec::new();
    let [direct, up, plain] = rows else {
        return (targets, references);
    };
    let worst_conns = spread(up.rounds.iter().map(|r| r.upstream_connections)).1;
    targets.push(Target {
        name: format!(
            "connections between meshed proxies, HTTP/1.1 over HTTP/2, {CLIENTS} clients at 1k RPS (most in any round)"
        ),
        measured: worst_conns,
        limit: 1.0,
        unit: "conns",
        pass: worst_conns <= 1.0,
    });
    // Round by round, both paths having run in the same round.
    let ratios: Vec<f64> = up
        .rounds
        .iter()
        .zip(&plain.rounds)
        .map(|(u, p)| u.cpu_us_per_request / p.cpu_us_per_request)
        .collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
    let (lo, hi) = spread(ratios.iter().copied());
    targets.push(Target {
        name: format!(
            "both proxies' CPU per request at 1k RPS, upgraded / HTTP/1.1 ({lo:.2}–{hi:.2} over rounds)"
        ),
        measured: mean,
        limit: 1.0,
        unit: "×",
        pass: mean <= 1.0,
    });
    for r in [up, plain] {
        references.push(Reference {
            name: format!(
                "{}: p99 at 1k RPS (direct's own p99, the noise floor: {:.0} µs)",
                r.path, direct.p99_us
            ),
            measured: r.p99_us,
            unit: "µs",
        });
    }
    (targets, references)
}

pub(crate) fn table(o: &OrigProto) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nHTTP/1.1 between meshed proxies, {} client connections at {} RPS, {} s per round:\n\n| path | req/s | failed | CPU µs/req (both proxies) | connections between proxies | p50 µs | p99 µs |\n|---|---:|---:|---:|---:|---:|---:|",
        o.clients, o.rps, o.seconds_per_run
    );
    for r in &o.rows {
        let range = |f: &dyn Fn(&Run) -> f64| {
            let (lo, hi) = spread(r.rounds.iter().map(f));
            let mean = r.rounds.iter().map(f).sum::<f64>() / r.rounds.len().max(1) as f64;
            format!("{mean:.1} ({lo:.1}–{hi:.1})")
        };
        let direct = r.path == "direct";
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} |",
            r.path,
            range(&|x| x.rps),
            r.rounds.iter().map(|x| x.failed).sum::<u64>(),
            if direct {
                "–".into()
            } else {
                range(&|x| x.cpu_us_per_request)
            },
            if direct {
                "–".into()
            } else {
                range(&|x| x.upstream_connections)
            },
            r.p50_us,
            r.p99_us
        );
    }
    out
}
