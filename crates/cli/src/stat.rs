//! `weft stat`: golden metrics per service, or per edge with --to/--from.
//!
//! A service's own figures are measured where it receives traffic (its
//! proxies' inbound side). An edge is measured at its client (the source
//! proxies' outbound side), so `stat api --from web` and `stat web --to api`
//! report the same traffic.

use crate::golden::{self, Golden};
use crate::source::{Output, Source, names};
use crate::window::Labels;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A service (`web.demo` or `web.demo:8080`); all services if omitted.
    service: Option<String>,
    /// Show the traffic from SERVICE to this service.
    #[arg(long, conflicts_with = "from")]
    to: Option<String>,
    /// Show the traffic to SERVICE from this workload.
    #[arg(long)]
    from: Option<String>,
    /// A row per route: the policy's route names, and for gRPC each
    /// `/package.Service/Method`.
    #[arg(long)]
    route: bool,
    #[command(flatten)]
    source: Source,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(serde::Serialize)]
struct Report<'a> {
    source: &'static str,
    window_seconds: f64,
    rows: &'a [Golden],
}

fn label<'a>(l: &'a Labels, name: &str) -> &'a str {
    l.get(name).map_or("", String::as_str)
}

/// The row a series counts in, or None when it does not match.
fn key(args: &Args, l: &Labels) -> Option<String> {
    let service = args.service.as_deref();
    let direction = label(l, "direction");
    let (src, dst) = (label(l, "workload"), label(l, "authority"));
    let matched = match (&args.to, &args.from) {
        (Some(to), _) => {
            direction == "outbound" && service.is_none_or(|s| names(s, src)) && names(to, dst)
        }
        (None, Some(from)) => {
            direction == "outbound" && names(from, src) && service.is_none_or(|s| names(s, dst))
        }
        (None, None) => {
            return (direction == "inbound" && service.is_none_or(|s| names(s, dst)))
                .then(|| with_route(args, l, dst.to_string()));
        }
    };
    matched.then(|| with_route(args, l, format!("{src} -> {dst}")))
}

fn with_route(args: &Args, l: &Labels, row: String) -> String {
    match (args.route, l.get("route")) {
        (true, Some(route)) => format!("{row} {route}"),
        (true, None) => format!("{row} default"),
        (false, _) => row,
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let window = args.source.window().await?;
    let rows = golden::aggregate(&window, |l| key(&args, l));
    let header = match (args.to.is_some() || args.from.is_some(), args.route) {
        (true, false) => "EDGE",
        (true, true) => "EDGE ROUTE",
        (false, false) => "SERVICE",
        (false, true) => "SERVICE ROUTE",
    };
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&Report {
                source: args.source.name(),
                window_seconds: window.seconds,
                rows: &rows,
            })?
        ),
        Output::Table if rows.is_empty() => {
            println!(
                "no traffic matched in the last {:.0}s (from {})",
                window.seconds,
                args.source.name()
            );
        }
        Output::Table => print!("{}", golden::table(header, &rows)),
    }
    Ok(())
}
