//! Memory per idle HTTP/2 client connection: `CONNECTIONS` connections
//! opened to a proxy, one request each (so every connection is detected,
//! served and has answered), then held open while the proxy's RSS is read.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::procs::Proc;

pub(crate) const CONNECTIONS: usize = 10_000;
/// Handshakes in flight at once while the connections are opened.
const PARALLEL: usize = 200;

#[derive(Debug, Serialize)]
pub(crate) struct Idle {
    pub(crate) who: String,
    pub(crate) connections: usize,
    pub(crate) rss_before_bytes: u64,
    pub(crate) rss_after_bytes: u64,
    pub(crate) bytes_per_connection: f64,
}

/// Opens `connections` connections to `addr`, reads `proc`'s RSS before
/// and with all of them open, then closes them.
fn measure(who: &str, proc: &Proc, addr: SocketAddr, connections: usize) -> anyhow::Result<Idle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // One connection first, so the proxy's first-use allocations (its
        // upstream connection, the route) are in the baseline.
        let mut held = vec![open(addr).await?];
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = proc.rss_bytes();
        while held.len() < connections {
            let batch = PARALLEL.min(connections - held.len());
            let opening: Vec<_> = (0..batch).map(|_| tokio::spawn(open(addr))).collect();
            for o in opening {
                held.push(o.await??);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = proc.rss_bytes();
        drop(held);
        Ok(Idle {
            who: who.to_string(),
            connections,
            rss_before_bytes: rss_before,
            rss_after_bytes: rss_after,
            bytes_per_connection: rss_after.saturating_sub(rss_before) as f64
                / (connections - 1) as f64,
        })
    })
}

type Held = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// One HTTP/2 connection to `addr` that has had one answer.
async fn open(addr: SocketAddr) -> anyhow::Result<Held> {
    let mut send = weft_test_support::client::http2(addr)
        .await
        .with_context(|| {
            format!(
                "connecting to {addr} (with {CONNECTIONS} connections, `ulimit -n` must allow them)"
            )
        })?;
    let rsp = send
        .send_request(weft_test_support::client::get_h2(&addr.to_string(), "/")?)
        .await?;
    anyhow::ensure!(rsp.status() == 200, "{addr} answered {}", rsp.status());
    Ok(send)
}

/// weft's inbound side and HAProxy's h2 frontend, each in front of the
/// same backend. HAProxy holds fewer when the open-file limit cannot
/// allow it two descriptors per connection (this VM's hard limit is
/// 20,000); the figure per connection is what compares.
pub(crate) fn run(dir: &Path) -> anyhow::Result<Vec<Idle>> {
    // This process holds the client ends and each proxy the server ends:
    // the soft open-file limit goes up to the hard one (the children
    // inherit it), which must allow the connections.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if limit.current < limit.maximum {
        rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .context("raising the soft open-file limit to the hard one")?;
    }
    let nofile = limit.maximum.unwrap_or(u64::MAX) as usize;
    anyhow::ensure!(
        nofile > CONNECTIONS + 256,
        "the open-file limit ({nofile}) does not allow {CONNECTIONS} connections"
    );
    // HAProxy reserves two descriptors per connection it may accept.
    let haproxy_conns = CONNECTIONS.min(nofile.saturating_sub(512) / 2);
    let (_backend, backend) = crate::bench::start_backend()?;
    let proxy = crate::procs::proxy_bin()?;
    let (weft, _, inbound) = crate::bench::start_proxy(
        &proxy,
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", backend.to_string()),
            ("WEFT_PROXY_MAX_CONNECTIONS", (2 * CONNECTIONS).to_string()),
        ],
    )?;
    let mut out = vec![measure("weft inbound", &weft, inbound, CONNECTIONS)?];
    drop(weft);
    let (haproxy, _, h2) = crate::versus::start_haproxy(dir, Some(1), haproxy_conns + 16, backend)?;
    out.push(measure("HAProxy nbthread 1", &haproxy, h2, haproxy_conns)?);
    Ok(out)
}

/// What an idle HTTP/2 connection may cost weft.
const MAX_BYTES_PER_CONNECTION: f64 = 8192.0;

pub(crate) fn targets(idle: &[Idle]) -> (Vec<crate::bench::Target>, Vec<crate::bench::Reference>) {
    let mut targets = Vec::new();
    let mut references = Vec::new();
    for i in idle {
        let name = format!(
            "{}: memory per idle HTTP/2 connection ({} held)",
            i.who, i.connections
        );
        if i.who.starts_with("weft") {
            targets.push(crate::bench::Target {
                name,
                measured: i.bytes_per_connection,
                limit: MAX_BYTES_PER_CONNECTION,
                unit: "bytes",
                pass: i.bytes_per_connection <= MAX_BYTES_PER_CONNECTION,
            });
        } else {
            references.push(crate::bench::Reference {
                name,
                measured: i.bytes_per_connection,
                unit: "bytes",
            });
        }
    }
    (targets, references)
}

pub(crate) fn table(idle: &[Idle]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| idle HTTP/2 connections | held | RSS before | RSS with them | per connection |\n|---|---:|---:|---:|---:|"
    );
    for i in idle {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.0} bytes |",
            i.who,
            i.connections,
            i.rss_before_bytes as f64 / 1048576.0,
            i.rss_after_bytes as f64 / 1048576.0,
            i.bytes_per_connection
        );
    }
    out
}
