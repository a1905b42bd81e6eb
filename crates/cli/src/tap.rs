//! Reading proxies' `/tap` streams (JSON lines, one per completed request):
//! shared by `weft top` and the dashboard's live tap.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::targets::Target;

/// One line of a proxy's `/tap` stream.
#[derive(serde::Deserialize, Debug)]
#[serde(untagged)]
enum Line {
    Event(Event),
    Lost { lost: u64 },
}

/// One completed request, as a proxy reports it.
#[derive(serde::Deserialize, serde::Serialize, Debug, Clone)]
pub(crate) struct Event {
    pub direction: String,
    pub authority: String,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub success: bool,
    pub latency_ms: f64,
    #[serde(default)]
    pub tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
}

pub(crate) enum Msg {
    /// An event and the workload of the proxy that saw it.
    Event(String, Event),
    /// Events a proxy dropped because this reader fell behind.
    Lost(u64),
}

/// Follows every proxy's `/tap` into one channel. Proxies that cannot be
/// tapped within 5 s are skipped with a reason; the streams end when the
/// returned set is dropped (or the receiver is).
pub(crate) async fn follow_all(
    proxies: &[Target],
    buffer: usize,
) -> (JoinSet<()>, mpsc::Receiver<Msg>, Vec<(Target, String)>) {
    let (tx, rx) = mpsc::channel::<Msg>(buffer);
    let mut set = JoinSet::new();
    let mut opened = Vec::new();
    for t in proxies {
        let (ok_tx, ok_rx) = tokio::sync::oneshot::channel();
        set.spawn(follow(t.clone(), tx.clone(), ok_tx));
        opened.push((t, ok_rx));
    }
    let mut skipped = Vec::new();
    for (t, ok) in opened {
        match tokio::time::timeout(Duration::from_secs(5), ok).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => skipped.push((t.clone(), format!("{e:#}"))),
            _ => skipped.push((t.clone(), "/tap did not answer".into())),
        }
    }
    (set, rx, skipped)
}

/// Follows one proxy's `/tap`, reporting once whether it opened.
async fn follow(
    t: Target,
    tx: mpsc::Sender<Msg>,
    opened: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) {
    // The connection's task goes with this one: a reader dropped (the
    // page went away) closes the proxy's `/tap` at once, not at its next
    // event.
    let (mut body, _conn) = match open(&t).await {
        Ok(b) => {
            let _ = opened.send(Ok(()));
            b
        }
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    let workload = t.workload();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let msg = match serde_json::from_slice::<Line>(&line) {
                Ok(Line::Event(e)) => Msg::Event(workload.clone(), e),
                Ok(Line::Lost { lost }) => Msg::Lost(lost),
                // A newer proxy's line this CLI does not know: skip it.
                Err(_) => continue,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        // A line longer than any the proxy writes (its paths are cut at
        // 512 bytes) is not a tap line: stop rather than buffer it.
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}

async fn open(
    t: &Target,
) -> anyhow::Result<(hyper::body::Incoming, AbortOnDropHandle<hyper::Result<()>>)> {
    let stream = tokio::net::TcpStream::connect(t.admin).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = AbortOnDropHandle::new(tokio::spawn(conn));
    let req = http::Request::get("/tap")
        .header(http::header::HOST, t.admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let rsp = send.send_request(req).await.context("GET /tap")?;
    anyhow::ensure!(
        rsp.status().is_success(),
        "GET /tap answered {} (an older proxy without the tap?)",
        rsp.status()
    );
    Ok((rsp.into_body(), conn))
}
