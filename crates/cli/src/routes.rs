//! `weft routes SERVICE:PORT`: the traffic policy the control plane gives
//! proxies for a service (OutboundPolicies `Get`, as a proxy decodes it):
//! its routes in match order, where each sends traffic, and the timeout,
//! retries, hedging and breaker that apply.

use std::time::Duration;

use anyhow::Context;
use weft_destinations::{Hedge, Policy, Retry, Route};
use weft_detect::Authority;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The authority a client would use, e.g. api.demo:8080.
    service: String,
    #[command(flatten)]
    control: crate::control::ControlArgs,
    #[arg(long, short = 'o', value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

#[derive(serde::Serialize)]
struct View {
    service: String,
    breaker: String,
    routes: Vec<Row>,
}

#[derive(serde::Serialize)]
struct Row {
    name: String,
    #[serde(rename = "match")]
    matches: String,
    backends: Vec<String>,
    timeout: Option<String>,
    retry: Option<String>,
    hedge: Option<String>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let authority: Authority = args.service.parse().map_err(|_| {
        anyhow::anyhow!(
            "{:?} must be host:port, such as api.demo:8080",
            args.service
        )
    })?;
    let channel = args.control.channel().await?;
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        weft_policy_api::client::get(channel, &authority, "weft-cli"),
    )
    .await
    .context("the control plane did not answer within 10 s")?
    .map_err(|s| anyhow::anyhow!("{}", s.message()))
    .with_context(|| format!("asking for the policy of {authority}"))?;
    let policy = weft_policy_api::decode(&authority, &msg)
        .with_context(|| format!("the policy of {authority}"))?;
    let view = view(&authority, &policy);
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!("{}  breaker: {}", view.service, view.breaker);
    print!("{}", table(&view.routes));
    Ok(())
}

/// The routes as a table, each column as wide as its widest cell.
fn table(routes: &[Row]) -> String {
    let mut rows =
        vec![["ROUTE", "MATCH", "BACKENDS", "TIMEOUT", "RETRY", "HEDGE"].map(String::from)];
    for r in routes {
        rows.push([
            r.name.clone(),
            r.matches.clone(),
            r.backends.join(", "),
            r.timeout.clone().unwrap_or_else(|| "-".into()),
            r.retry.clone().unwrap_or_else(|| "-".into()),
            r.hedge.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w + 2 - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn view(authority: &Authority, p: &Policy) -> View {
    let breaker = if p.breaker.consecutive_failures == 0 {
        "off".to_string()
    } else {
        format!(
            "ejects after {} failures in a row, for {} doubling to {}",
            p.breaker.consecutive_failures,
            humantime::format_duration(p.breaker.min_open),
            humantime::format_duration(p.breaker.max_open)
        )
    };
    let routes = if p.routes.is_empty() {
        // The one route a destination without routes has.
        vec![row(
            &Route {
                name: "default".into(),
                matches: Default::default(),
                backends: vec![weft_destinations::RouteBackend {
                    destination: authority.clone(),
                    weight: 1,
                }],
                timeout: None,
                retry: None,
                hedge: None,
            },
            p,
        )]
    } else {
        p.routes.iter().map(|r| row(r, p)).collect()
    };
    View {
        service: authority.to_string(),
        breaker,
        routes,
    }
}

fn row(r: &Route, p: &Policy) -> Row {
    let mut m = Vec::new();
    if let Some(method) = &r.matches.method {
        m.push(method.clone());
    }
    m.push(r.matches.path_prefix.clone().unwrap_or_else(|| "/".into()));
    m.extend(r.matches.headers.iter().map(|(k, v)| format!("{k}={v}")));
    let total: u32 = r.backends.iter().map(|b| b.weight).sum();
    let backends = r
        .backends
        .iter()
        .map(|b| {
            if r.backends.len() == 1 {
                b.destination.to_string()
            } else {
                let share = f64::from(b.weight) * 100.0 / f64::from(total.max(1));
                format!("{} {share:.0}%", b.destination)
            }
        })
        .collect();
    Row {
        name: r.name.to_string(),
        matches: m.join(" "),
        backends,
        timeout: r
            .timeout
            .or(p.timeout)
            .map(|t| humantime::format_duration(t).to_string()),
        retry: r.retry.as_ref().or(p.retry.as_ref()).map(retry),
        hedge: r.hedge.or(p.hedge).map(|h| match h {
            Hedge::After(d) => format!("after {}", humantime::format_duration(d)),
            Hedge::Percentile(q) => format!("after p{}", q * 100.0),
        }),
    }
}

fn retry(r: &Retry) -> String {
    let mut on = Vec::new();
    if r.on.any_5xx {
        on.push("5xx".to_string());
    }
    on.extend(r.on.statuses.iter().map(u16::to_string));
    if r.on.connect_error {
        on.push("connect-error".into());
    }
    if r.on.reset {
        on.push("reset".into());
    }
    on.extend(
        r.on.grpc
            .iter()
            .map(|&c| match weft_destinations::grpc_status_name(c) {
                Some(name) => format!("grpc:{name}"),
                None => format!("grpc:{c}"),
            }),
    );
    format!("{}× on {}", r.attempts, on.join(","))
}
