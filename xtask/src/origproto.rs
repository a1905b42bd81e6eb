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
    /// What the proxies did; none on the direct path.
    proxies: Option<Proxies>,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct Proxies {
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
    /// The client-side proxy and its admin address, on the meshed paths.
    proxy: Option<(Proc, SocketAddr)>,
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
            proxy: Some((proc, admin)),
        })
    };
    let paths = [
        Path_ {
            name: "direct",
            url: format!("http://{backend}/"),
            authority: None,
            proxy: None,
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
            // Both sides' CPU: the client's proxy and the server's.
            let cpu =
                |(proc, _): &(Proc, SocketAddr)| proc.cpu_seconds() + mtls.inbound.cpu_seconds();
            let before = p.proxy.as_ref().map(cpu);
            let mut load =
                weft_test_support::load::H2load::new(&p.url, dir.join("h2load-origproto.log"));
            load.h1 = true;
            load.clients = CLIENTS;
            load.rps = Some(RPS_PER_CLIENT);
            load.duration_secs = seconds;
            load.warm_up_secs = 1;
            load.authority = p.authority.map(str::to_string);
            let r = load.run()?;
            let proxies = match (&p.proxy, before) {
                (Some(proxy), Some(before)) => {
                    let used = cpu(proxy) - before;
                    let m = runtime.block_on(weft_test_support::metrics::scrape(proxy.1))?;
                    Some(Proxies {
                        cpu_us_per_request: used * 1e6 / r.total().max(1) as f64,
                        upstream_connections: m.sum(
                            "tcp_open_connections",
                            &[("direction", "outbound"), ("peer", "dst")],
                        ),
                    })
                }
                _ => None,
            };
            runs[i].push(Run {
                requests: r.total(),
                failed: r.failed,
                rps: r.rps,
                proxies,
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
    let proxies =
        |row: &Row| -> Vec<Proxies> { row.rounds.iter().filter_map(|r| r.proxies).collect() };
    let (up_p, plain_p) = (proxies(up), proxies(plain));
    let worst_conns = spread(up_p.iter().map(|p| p.upstream_connections)).1;
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
    let ratios: Vec<f64> = up_p
        .iter()
        .zip(&plain_p)
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
    // Mean (min–max) of what the rounds measured; "–" where none did.
    fn range(values: &[f64]) -> String {
        if values.is_empty() {
            return "–".into();
        }
        let (lo, hi) = spread(values.iter().copied());
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        format!("{mean:.1} ({lo:.1}–{hi:.1})")
    }
    for r in &o.rows {
        let of = |f: fn(&Run) -> Option<f64>| r.rounds.iter().filter_map(f).collect::<Vec<_>>();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} |",
            r.path,
            range(&of(|x| Some(x.rps))),
            r.rounds.iter().map(|x| x.failed).sum::<u64>(),
            range(&of(|x| x.proxies.map(|p| p.cpu_us_per_request))),
            range(&of(|x| x.proxies.map(|p| p.upstream_connections))),
            r.p50_us,
            r.p99_us
        );
    }
    out
}
