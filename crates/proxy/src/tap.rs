//! Live request events, for `weft top` and anyone debugging a route: each
//! completed request's method, path, status and latency, streamed as JSON
//! lines from the admin server's `/tap`.
//!
//! Nothing is captured while nobody listens: the request path checks one
//! atomic counter, so an idle tap costs a load per request. Listeners that
//! fall behind lose events (and are told how many) rather than slowing the
//! proxy down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use http::Method;
use tokio::sync::broadcast;

use crate::metrics::{Classification, Direction, ResponseLabels, TlsLabel};

/// Events buffered per listener before it starts losing them.
const BUFFER: usize = 4096;
/// Paths longer than this are cut (at a character boundary): an event's
/// size must not be the client's choice.
const MAX_PATH: usize = 512;

#[derive(Clone, Debug)]
pub struct Tap {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    listeners: AtomicUsize,
    tx: broadcast::Sender<Arc<TapEvent>>,
}

/// One completed request.
#[derive(Debug, serde::Serialize)]
pub struct TapEvent {
    pub direction: Direction,
    pub authority: Arc<str>,
    pub method: String,
    /// Without the query string: queries carry user data.
    pub path: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub success: bool,
    /// From the request's arrival to the end of the response stream.
    pub latency_ms: f64,
    pub tls: bool,
    /// The peer's proven identity: the client's inbound, the server's
    /// outbound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<Arc<str>>,
}

/// What a request contributes to its event, captured only while tapped.
#[derive(Debug)]
pub struct Tapped {
    tap: Tap,
    method: Method,
    path: Box<str>,
    start: Instant,
}

impl Default for Tap {
    fn default() -> Self {
        Self::new()
    }
}

impl Tap {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        Self {
            inner: Arc::new(Inner {
                listeners: AtomicUsize::new(0),
                tx,
            }),
        }
    }

    /// Starts an event for a request, if anyone is listening.
    #[inline]
    pub fn start(&self, method: &Method, uri: &http::Uri, start: Instant) -> Option<Tapped> {
        if self.inner.listeners.load(Ordering::Relaxed) == 0 {
            return None;
        }
        Some(Tapped {
            tap: self.clone(),
            method: method.clone(),
            path: truncate(uri.path(), MAX_PATH).into(),
            start,
        })
    }

    pub fn listen(&self) -> Listener {
        self.inner.listeners.fetch_add(1, Ordering::Relaxed);
        Listener {
            rx: self.inner.tx.subscribe(),
            inner: self.inner.clone(),
        }
    }
}

impl Tapped {
    /// Publishes the event for a response counted with `labels`.
    pub fn finish(self, labels: &ResponseLabels) {
        let (tls, peer_id) = match &labels.tls {
            TlsLabel::Plain => (false, None),
            TlsLabel::Mutual { peer_id } => (true, Some(peer_id.clone())),
        };
        let event = TapEvent {
            direction: labels.direction,
            authority: labels.dst.authority.clone(),
            method: self.method.to_string(),
            path: self.path.into(),
            // 0: no response (the client cancelled first).
            status: labels.status_code.unwrap_or(0),
            grpc_status: labels.grpc_status_code,
            success: labels.classification == Classification::success,
            latency_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            tls,
            peer_id,
        };
        // No listener left is fine: the event had nowhere to go.
        let _ = self.tap.inner.tx.send(Arc::new(event));
    }
}

/// One `/tap` client. Dropping it stops capture once nobody else listens.
pub struct Listener {
    rx: broadcast::Receiver<Arc<TapEvent>>,
    inner: Arc<Inner>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.inner.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a listener receives next.
pub enum Next {
    Event(Arc<TapEvent>),
    /// This many events were dropped because the listener fell behind.
    Lost(u64),
}

impl Listener {
    pub async fn next(&mut self) -> Option<Next> {
        match self.rx.recv().await {
            Ok(e) => Some(Next::Event(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Next::Lost(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What watches one request to its end: the tap, while anyone listens,
/// and its trace span, when tracing is on. Both learn the outcome from the
/// labels it is counted with. One pointer, null when nothing watches: it
/// travels with every response body.
#[derive(Default)]
pub struct Observed(Option<Box<Watchers>>);

struct Watchers {
    tap: Option<Tapped>,
    span: Option<crate::trace::Span>,
}

impl Observed {
    pub fn new(tap: Option<Tapped>, span: Option<crate::trace::Span>) -> Self {
        if tap.is_none() && span.is_none() {
            return Self(None);
        }
        Self(Some(Box::new(Watchers { tap, span })))
    }

    /// The endpoint that answered, after `retries` earlier tries.
    pub fn upstream(
        &mut self,
        endpoint: std::net::SocketAddr,
        retries: u32,
        headers: &http::HeaderMap,
    ) {
        if let Some(s) = self.0.as_mut().and_then(|w| w.span.as_mut()) {
            s.upstream(endpoint, retries, headers);
        }
    }

    pub fn finish(self, labels: &ResponseLabels) {
        let Some(w) = self.0 else { return };
        if let Some(t) = w.tap {
            t.finish(labels);
        }
        if let Some(s) = w.span {
            s.finish(labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> ResponseLabels {
        ResponseLabels {
            direction: Direction::inbound,
            dst: crate::metrics::Dst {
                authority: "api:80".into(),
                route: "default".into(),
                workload: None,
            },
            status_code: Some(200),
            classification: Classification::success,
            grpc_status_code: None,
            error: None,
            tls: TlsLabel::Mutual {
                peer_id: "web".into(),
            },
        }
    }

    #[tokio::test]
    async fn captures_only_while_someone_listens() {
        let tap = Tap::new();
        let uri: http::Uri = "/orders?user=secret".parse().unwrap_or_default();
        assert!(tap.start(&Method::GET, &uri, Instant::now()).is_none());
        let mut listener = tap.listen();
        let tapped = tap.start(&Method::GET, &uri, Instant::now());
        assert!(tapped.is_some());
        if let Some(t) = tapped {
            t.finish(&labels());
        }
        match listener.next().await {
            Some(Next::Event(e)) => {
                assert_eq!((e.method.as_str(), e.path.as_str()), ("GET", "/orders"));
                assert_eq!(e.peer_id.as_deref(), Some("web"));
            }
            _ => panic!("no event"),
        }
        drop(listener);
        assert!(tap.start(&Method::GET, &uri, Instant::now()).is_none());
    }
}
