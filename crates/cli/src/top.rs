//! `weft top`: the busiest routes (method and path; for gRPC, the service
//! method) live, from every proxy's `/tap` stream.
//!
//! Each request passes two proxies in a mesh; by default a request is
//! counted where it is received (inbound), which also sees clients that
//! are not meshed.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::source::Output;
use crate::tap::{self, Event, Msg};
use crate::targets::{self, Target};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The proxies to tap: a Prometheus file_sd JSON file of admin
    /// addresses [default: the file `weft demo` writes]
    #[arg(long, env = "WEFT_TARGETS", value_name = "FILE")]
    targets: Option<PathBuf>,
    /// Count requests where they are received (inbound) or sent (outbound).
    #[arg(long, value_enum, default_value = "inbound")]
    direction: Direction,
    /// How often to redraw.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Stop after this long (0: until Ctrl-C), then print the table once
    /// more.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rows to show.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// JSON prints only the final table.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub(crate) struct Route {
    source: String,
    destination: String,
    /// The HTTP method, or `gRPC`.
    method: String,
    path: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Row {
    #[serde(flatten)]
    route: Route,
    count: u64,
    successes: u64,
    best_ms: f64,
    worst_ms: f64,
    last_ms: f64,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let path = args.targets.clone().unwrap_or_else(targets::default_path);
    let proxies: Vec<Target> = targets::load(&path)?
        .into_iter()
        .filter(|t| t.is_proxy())
        .collect();
    anyhow::ensure!(!proxies.is_empty(), "{} lists no proxies", path.display());
    let (_streams, mut rx, skipped) = tap::follow_all(&proxies, 4096).await;
    for (t, why) in &skipped {
        eprintln!("weft: skipping proxy {} ({}): {why}", t.admin, t.workload());
    }
    let tapped = proxies.len() - skipped.len();
    anyhow::ensure!(
        tapped > 0,
        "none of the {} proxies could be tapped",
        proxies.len()
    );
    eprintln!(
        "weft: tapping {tapped} proxies ({} requests)",
        args.direction.as_str()
    );

    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let deadline = (!args.duration.is_zero()).then(|| tokio::time::Instant::now() + args.duration);
    let mut routes: HashMap<Route, Row> = HashMap::new();
    let mut lost = 0u64;
    let mut redraw = tokio::time::interval(args.every);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Event(workload, e)) => add(&mut routes, args.direction, &workload, e),
                Some(Msg::Lost(n)) => lost += n,
                None => { eprintln!("weft: every tap stream ended"); break; }
            },
            _ = redraw.tick() => {
                if args.output == Output::Table {
                    let table = render(&routes, args.limit, started.elapsed(), lost);
                    if tty {
                        // Home and clear: a live view, not a scroll.
                        print!("\x1b[H\x1b[2J{table}");
                    } else {
                        println!("{table}");
                    }
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&sorted(&routes, args.limit))?
        ),
        Output::Table => println!("{}", render(&routes, args.limit, started.elapsed(), lost)),
    }
    Ok(())
}

fn add(routes: &mut HashMap<Route, Row>, direction: Direction, workload: &str, e: Event) {
    if e.direction != direction.as_str() {
        return;
    }
    let source = match direction {
        Direction::Inbound => e.peer_id.unwrap_or_else(|| "(unmeshed)".into()),
        Direction::Outbound => workload.to_string(),
    };
    let route = Route {
        source,
        destination: e.authority,
        method: if e.grpc_status.is_some() {
            "gRPC".into()
        } else {
            e.method
        },
        path: e.path,
    };
    let row = routes.entry(route.clone()).or_insert(Row {
        route,
        count: 0,
        successes: 0,
        best_ms: f64::INFINITY,
        worst_ms: 0.0,
        last_ms: 0.0,
    });
    row.count += 1;
    row.successes += u64::from(e.success);
    row.best_ms = row.best_ms.min(e.latency_ms);
    row.worst_ms = row.worst_ms.max(e.latency_ms);
    row.last_ms = e.latency_ms;
}

fn sorted(routes: &HashMap<Route, Row>, limit: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = routes.values().cloned().collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.route.cmp(&b.route)));
    rows.truncate(limit);
    rows
}

fn render(routes: &HashMap<Route, Row>, limit: usize, elapsed: Duration, lost: u64) -> String {
    let rows = sorted(routes, limit);
    let w = |f: &dyn Fn(&Row) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let (ws, wd) = (
        w(&|r| r.route.source.len(), 6),
        w(&|r| r.route.destination.len(), 11),
    );
    let wp = w(&|r| r.route.path.len(), 4);
    let mut out = format!(
        "weft top: {} routes over {:.0}s{}\n{:<ws$}  {:<wd$}  {:<6}  {:<wp$}  {:>7}  {:>8}  {:>8}  {:>8}  {:>8}\n",
        routes.len(),
        elapsed.as_secs_f64(),
        if lost > 0 {
            format!(" ({lost} events lost: the tap fell behind)")
        } else {
            String::new()
        },
        "SOURCE",
        "DESTINATION",
        "METHOD",
        "PATH",
        "COUNT",
        "SUCCESS",
        "BEST",
        "WORST",
        "LAST"
    );
    for r in &rows {
        out.push_str(&format!(
            "{:<ws$}  {:<wd$}  {:<6}  {:<wp$}  {:>7}  {:>7.1}%  {:>6.1}ms  {:>6.1}ms  {:>6.1}ms\n",
            r.route.source,
            r.route.destination,
            r.route.method,
            r.route.path,
            r.count,
            100.0 * r.successes as f64 / r.count.max(1) as f64,
            r.best_ms,
            r.worst_ms,
            r.last_ms
        ));
    }
    out
}
