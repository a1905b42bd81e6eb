//! `weft edges`: who talks to whom, and with what proven identities.
//!
//! An edge is read at its client (the source proxy's outbound side), which
//! knows the server's proven identity (`server_id`). Clients that are not
//! meshed, or whose proxies are not among the targets, are seen only at
//! the server's inbound side, which knows the client's identity
//! (`client_id`) when there was one.

use std::collections::{BTreeMap, BTreeSet};

use crate::source::{Output, Source};
use crate::window::Labels;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    source: Source,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub(crate) struct Edge {
    pub src: String,
    pub dst: String,
    /// The identity the client proved, if it proved one.
    pub client_id: Option<String>,
    /// The identity the server proved, if it proved one.
    pub server_id: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct Row {
    #[serde(flatten)]
    pub edge: Edge,
    pub requests: u64,
    pub rps: f64,
    /// Share of the responses classified a success.
    pub success_rate: f64,
    /// Every request on this edge went over mutual TLS.
    pub secured: bool,
}

fn get<'a>(l: &'a Labels, k: &str) -> Option<&'a str> {
    l.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

const UNMESHED: &str = "(unmeshed)";

/// Edges from the window's responses.
pub(crate) fn edges(w: &crate::window::Window) -> Vec<Row> {
    // Identities whose own proxies report their outbound side.
    let reporting: BTreeSet<&str> = w
        .responses
        .iter()
        .filter(|s| get(&s.labels, "direction") == Some("outbound"))
        .filter_map(|s| get(&s.labels, "identity").or(get(&s.labels, "workload")))
        .collect();
    // (responses, over mutual TLS, successes)
    let mut acc: BTreeMap<Edge, (f64, f64, f64)> = BTreeMap::new();
    for s in &w.responses {
        let l = &s.labels;
        let mutual = get(l, "tls") == Some("true");
        let here = get(l, "workload").unwrap_or("?");
        let authority = get(l, "authority").unwrap_or("?");
        let edge = match get(l, "direction") {
            Some("outbound") => Edge {
                src: here.to_string(),
                dst: authority.to_string(),
                client_id: mutual
                    .then(|| get(l, "identity"))
                    .flatten()
                    .map(String::from),
                server_id: get(l, "server_id").map(String::from),
            },
            Some("inbound") => {
                let client = get(l, "client_id");
                if client.is_some_and(|c| reporting.contains(c)) {
                    continue; // counted at the client
                }
                Edge {
                    src: client.unwrap_or(UNMESHED).to_string(),
                    dst: authority.to_string(),
                    client_id: client.map(String::from),
                    server_id: mutual
                        .then(|| get(l, "identity"))
                        .flatten()
                        .map(String::from),
                }
            }
            _ => continue,
        };
        let e = acc.entry(edge).or_default();
        e.0 += s.value;
        if mutual {
            e.1 += s.value;
        }
        if get(l, "classification") == Some("success") {
            e.2 += s.value;
        }
    }
    acc.into_iter()
        .map(|(edge, (total, mutual, ok))| Row {
            edge,
            requests: total.round() as u64,
            rps: total / w.seconds,
            success_rate: if total > 0.0 { ok / total } else { 1.0 },
            secured: mutual >= total,
        })
        .collect()
}

/// The edges as an aligned table.
pub(crate) fn table(rows: &[Row]) -> String {
    let w = |f: &dyn Fn(&Row) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let (ws, wd) = (w(&|r| r.edge.src.len(), 3), w(&|r| r.edge.dst.len(), 3));
    let wc = w(&|r| r.edge.client_id.as_deref().map_or(1, str::len), 9);
    let wv = w(&|r| r.edge.server_id.as_deref().map_or(1, str::len), 9);
    let mut out = format!(
        "{:<ws$}  {:<wd$}  {:<wc$}  {:<wv$}  {:>7}  {:>8}  {:>9}\n",
        "SRC", "DST", "CLIENT_ID", "SERVER_ID", "SECURED", "RPS", "REQUESTS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<ws$}  {:<wd$}  {:<wc$}  {:<wv$}  {:>7}  {:>8.1}  {:>9}\n",
            r.edge.src,
            r.edge.dst,
            r.edge.client_id.as_deref().unwrap_or("-"),
            r.edge.server_id.as_deref().unwrap_or("-"),
            if r.secured { "yes" } else { "no" },
            r.rps,
            r.requests
        ));
    }
    out
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let window = args.source.window().await?;
    let rows = edges(&window);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table if rows.is_empty() => println!(
            "no traffic in the last {:.0}s (from {})",
            window.seconds,
            args.source.name()
        ),
        Output::Table => print!("{}", table(&rows)),
    }
    Ok(())
}
