//! `weft authz [IDENTITY]`: who may reach a workload's ports and routes, as
//! proxies get it from the control plane (`InboundServerPolicies.GetPort`,
//! decoded as a proxy decodes it), with each port's rate limit. The ports
//! come from the control plane's admin `/servers`, or `--port`.

use std::time::Duration;

use anyhow::Context;
use linkerd2_proxy_api::inbound::PortSpec;
use linkerd2_proxy_api::inbound::inbound_server_policies_client::InboundServerPoliciesClient;
use weft_authz::{Authn, Authorization, Identities, Network, Protocol, Server};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The identity a workload serves as (e.g. api.demo); every server
    /// with policy if omitted.
    server: Option<String>,
    /// Only this port (repeatable) [default: the ports the control plane
    /// has policy for]
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// The control plane's admin address [default: from the targets file,
    /// else 127.0.0.1:9990]
    #[arg(long, env = "WEFT_CONTROL_ADMIN")]
    control_admin: Option<String>,
    #[command(flatten)]
    control: crate::control::ControlArgs,
    #[arg(long, short = 'o', value_parser = ["table", "json"], default_value = "table")]
    output: String,
}

/// One port's policy as proxies enforce it.
pub(crate) struct PortPolicy {
    pub identity: String,
    pub port: u16,
    pub server: Server,
}

#[derive(serde::Deserialize)]
struct Listed {
    default: String,
    servers: Vec<ListedServer>,
}

#[derive(serde::Deserialize)]
struct ListedServer {
    identity: String,
    ports: Vec<u16>,
}

/// The policies of `only` (else every listed server), port by port.
pub(crate) async fn fetch(
    channel: tonic::transport::Channel,
    admin: &str,
    only: Option<&str>,
    ports: &[u16],
) -> anyhow::Result<(String, Vec<PortPolicy>)> {
    let listed = crate::fetch::get_ok(&format!("http://{admin}/servers"))
        .await
        .with_context(|| {
            format!("asking the control plane's admin ({admin}) which servers have policy")
        })?;
    let listed: Listed = serde_json::from_str(&listed.body)
        .context("the control plane's /servers: upgrade weft-control to match this CLI")?;
    let mut wanted: Vec<(String, u16)> = Vec::new();
    match only {
        Some(id) if !ports.is_empty() => wanted.extend(ports.iter().map(|p| (id.to_string(), *p))),
        Some(id) => {
            let s = listed
                .servers
                .iter()
                .find(|s| s.identity.eq_ignore_ascii_case(id))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no policy names {id}: every port of it gets the mesh-wide default ({}); pass --port to see one",
                        listed.default
                    )
                })?;
            wanted.extend(s.ports.iter().map(|p| (s.identity.clone(), *p)));
        }
        None => {
            for s in &listed.servers {
                wanted.extend(
                    s.ports
                        .iter()
                        .filter(|p| ports.is_empty() || ports.contains(p))
                        .map(|p| (s.identity.clone(), *p)),
                );
            }
        }
    }
    let mut client = InboundServerPoliciesClient::new(channel);
    let mut out = Vec::with_capacity(wanted.len());
    for (identity, port) in wanted {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_port(PortSpec {
                workload: identity.clone(),
                port: u32::from(port),
            }),
        )
        .await
        .context("the control plane did not answer within 10 s")?
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .with_context(|| format!("asking for the policy of {identity}:{port}"))?
        .into_inner();
        let server = weft_policy_api::inbound::decode(msg, std::num::NonZeroUsize::MIN)
            .with_context(|| format!("the policy of {identity}:{port}"))?;
        out.push(PortPolicy {
            identity,
            port,
            server,
        });
    }
    Ok((listed.default, out))
}

/// Whether a port admits no one at all: its every request and connection
/// is refused.
pub(crate) fn admits_no_one(s: &Server) -> bool {
    s.authorizations.is_empty() && s.routes.iter().all(|r| r.authorizations.is_empty())
}

fn clients(a: &Authorization) -> String {
    match &a.authn {
        Authn::Unauthenticated => "any client, plaintext too".into(),
        Authn::MeshTls(Identities::Any) => "any mesh identity".into(),
        Authn::MeshTls(Identities::Listed { names, suffixes }) => names
            .iter()
            .cloned()
            .chain(suffixes.iter().map(|s| format!("*.{s}")))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn networks(a: &Authorization) -> String {
    if a.networks == Network::all() {
        return "all".into();
    }
    a.networks
        .iter()
        .map(|n| {
            let except: Vec<String> = n.except.iter().map(|e| e.to_string()).collect();
            if except.is_empty() {
                n.net.to_string()
            } else {
                format!("{} except {}", n.net, except.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(serde::Serialize)]
struct View {
    server: String,
    protocol: &'static str,
    rate_limit: Option<String>,
    rows: Vec<Row>,
}

#[derive(serde::Serialize)]
struct Row {
    route: String,
    authorization: String,
    clients: String,
    networks: String,
}

fn protocol(p: &Protocol) -> &'static str {
    match p {
        Protocol::Detect { .. } => "detect",
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Grpc => "grpc",
        Protocol::Opaque => "opaque",
        Protocol::Tls => "tls",
    }
}

fn view(p: &PortPolicy) -> View {
    let s = &p.server;
    let rate_limit = s.limiter.as_ref().map(|l| {
        let spec = l.spec();
        let mut parts = Vec::new();
        if let Some(t) = spec.total {
            parts.push(format!("{t}/s in total"));
        }
        if let Some(c) = spec.per_client {
            parts.push(format!("{c}/s per client"));
        }
        for o in &spec.overrides {
            parts.push(format!("{}/s for {}", o.rps, o.identities.join(", ")));
        }
        parts.join(", ")
    });
    let mut rows = Vec::new();
    let row = |route: &str, a: Option<&Authorization>| Row {
        route: route.to_string(),
        authorization: a.map_or("(none: refused)".into(), |a| a.name.to_string()),
        clients: a.map_or("-".into(), clients),
        networks: a.map_or("-".into(), networks),
    };
    if s.protocol.is_http() {
        for r in &s.routes {
            if r.authorizations.is_empty() {
                rows.push(row(&r.name, None));
            }
            for a in &r.authorizations {
                rows.push(row(&r.name, Some(a)));
            }
        }
    } else {
        if s.authorizations.is_empty() {
            rows.push(row("(connection)", None));
        }
        for a in &s.authorizations {
            rows.push(row("(connection)", Some(a)));
        }
    }
    let server = format!("{}:{}", p.identity, p.port);
    View {
        // A port without a policy of its own shows which default it has.
        server: if *s.name == server {
            server
        } else {
            format!("{server} ({})", s.name)
        },
        protocol: protocol(&s.protocol),
        rate_limit,
        rows,
    }
}

/// The rows as a table, each column as wide as its widest cell.
fn table(rows: &[Row]) -> String {
    let cells: Vec<[&str; 4]> = std::iter::once(["ROUTE", "AUTHORIZATION", "CLIENTS", "NETWORKS"])
        .chain(rows.iter().map(|r| {
            [
                r.route.as_str(),
                r.authorization.as_str(),
                r.clients.as_str(),
                r.networks.as_str(),
            ]
        }))
        .collect();
    let widths: Vec<usize> = (0..4)
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for c in &cells {
        let line = format!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let admin = args
        .control_admin
        .clone()
        .unwrap_or_else(|| args.control.admin());
    let channel = args.control.channel().await?;
    let (default, policies) = fetch(channel, &admin, args.server.as_deref(), &args.ports).await?;
    let views: Vec<View> = policies.iter().map(view).collect();
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no server has inbound policy; every port gets the mesh-wide default ({default})");
    }
    for v in &views {
        println!(
            "{}  protocol: {}  rate limit: {}",
            v.server,
            v.protocol,
            v.rate_limit.as_deref().unwrap_or("none")
        );
        print!("{}", table(&v.rows));
    }
    Ok(())
}
