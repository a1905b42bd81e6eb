//! The dashboard's live tap: every proxy's `/tap`, filtered here (service,
//! direction, method, path prefix, failures only) and pushed to the page
//! as server-sent events, at a rate a browser can draw.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Body, reply};
use crate::source::Source;
use crate::tap::{Event, Msg};

/// Events sent to one page per second; the rest are counted as skipped.
const EVENTS_PER_SECOND: u32 = 50;
/// A comment this often, so a page that went away is noticed (the write
/// fails) and its proxies' taps are closed even when no request matches.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What the page asked to see.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Filter {
    /// `host:port`, or every service when empty.
    service: String,
    /// `inbound` (where requests are received: each request once, and
    /// clients outside the mesh too) or `outbound`; both when empty.
    direction: String,
    /// Upper-cased; any when empty.
    method: String,
    path_prefix: String,
    failures_only: bool,
}

impl Filter {
    pub(super) fn parse(query: &str) -> Result<Self, String> {
        let mut f = Filter {
            direction: "inbound".into(),
            ..Filter::default()
        };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "service" if v.is_empty() => {}
                "service" => {
                    v.parse::<weft_detect::Authority>()
                        .map_err(|_| format!("service {v:?} must be host:port"))?;
                    f.service = v.into_owned();
                }
                "direction" => match &*v {
                    "inbound" | "outbound" => f.direction = v.into_owned(),
                    "" | "both" => f.direction.clear(),
                    _ => return Err(format!("direction {v:?}: inbound, outbound or both")),
                },
                "method" => f.method = v.to_ascii_uppercase(),
                "path" => f.path_prefix = v.into_owned(),
                "failures" => f.failures_only = matches!(&*v, "1" | "true" | "on"),
                _ => {}
            }
        }
        Ok(f)
    }

    fn admits(&self, e: &Event) -> bool {
        (self.service.is_empty() || e.authority.eq_ignore_ascii_case(&self.service))
            && (self.direction.is_empty() || e.direction == self.direction)
            && (self.method.is_empty() || e.method == self.method)
            && e.path.starts_with(&self.path_prefix)
            && !(self.failures_only && e.success)
    }
}

#[derive(serde::Serialize)]
struct Tapped<'a> {
    /// The proxy that saw it.
    workload: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

/// A fixed-window limit on what one page is sent.
struct Pace {
    window: Instant,
    sent: u32,
    skipped: u64,
}

impl Pace {
    /// Whether to send an event now; what was skipped since the last one
    /// sent is reported with it.
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.sent = 0;
        }
        if self.sent >= EVENTS_PER_SECOND {
            self.skipped += 1;
            return None;
        }
        self.sent += 1;
        Some(std::mem::take(&mut self.skipped))
    }
}

struct Stream {
    /// The proxies' tap readers: dropping them (the page went away) closes
    /// every `/tap`.
    _readers: JoinSet<()>,
    rx: mpsc::Receiver<Msg>,
    filter: Filter,
    pace: Pace,
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    /// The next SSE frame, or `None` when every proxy's stream ended.
    async fn next(&mut self) -> Option<String> {
        loop {
            let msg = match tokio::time::timeout(KEEPALIVE, self.rx.recv()).await {
                Err(_) => return Some(": keepalive\n\n".into()),
                Ok(None) => return Some("event: ended\ndata: {}\n\n".into()),
                Ok(Some(m)) => m,
            };
            match msg {
                Msg::Lost(n) => {
                    return Some(format!("event: lost\ndata: {{\"lost\":{n}}}\n\n"));
                }
                Msg::Event(workload, e) if self.filter.admits(&e) => {
                    let Some(skipped) = self.pace.admit() else {
                        continue;
                    };
                    let mut out = String::new();
                    if skipped > 0 {
                        out.push_str(&format!(
                            "event: skipped\ndata: {{\"skipped\":{skipped}}}\n\n"
                        ));
                    }
                    let json = serde_json::to_string(&Tapped {
                        workload: &workload,
                        event: &e,
                    })
                    .ok()?;
                    out.push_str(&format!("data: {json}\n\n"));
                    return Some(out);
                }
                Msg::Event(..) => {}
            }
        }
    }
}

/// `GET /api/tap?service=&direction=&method=&path=&failures=`.
pub(super) async fn serve(
    query: &str,
    source: &Source,
    permit: OwnedSemaphorePermit,
) -> Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let filter = match Filter::parse(query) {
        Ok(f) => f,
        Err(e) => return reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
    };
    let proxies = match source.targets() {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return reply(StatusCode::NOT_FOUND, TEXT, "the targets list no proxies\n"),
        Err(e) => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("the tap reads the proxies from the targets file: {e:#}\n"),
            );
        }
    };
    let (readers, rx, skipped) = crate::tap::follow_all(&proxies, 1024).await;
    let opened = serde_json::json!({
        "tapped": proxies.len() - skipped.len(),
        "skipped": skipped.iter().map(|(t, why)| format!("{} ({}): {why}", t.admin, t.workload())).collect::<Vec<_>>(),
    });
    let first = format!("event: open\ndata: {opened}\n\n");
    let stream = Stream {
        _readers: readers,
        rx,
        filter,
        pace: Pace {
            window: Instant::now(),
            sent: 0,
            skipped: 0,
        },
        _permit: permit,
    };
    let frames =
        futures_util::stream::unfold((Some(first), stream), |(first, mut stream)| async move {
            let text = match first {
                Some(f) => f,
                None => stream.next().await?,
            };
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(text))),
                (None, stream),
            ))
        });
    super::sse(BodyExt::boxed(StreamBody::new(frames)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(authority: &str, direction: &str, method: &str, path: &str, success: bool) -> Event {
        Event {
            direction: direction.into(),
            authority: authority.into(),
            method: method.into(),
            path: path.into(),
            status: if success { 200 } else { 503 },
            grpc_status: None,
            success,
            latency_ms: 1.0,
            tls: true,
            peer_id: None,
        }
    }

    #[test]
    fn filters_by_service_direction_method_path_and_failure() {
        let f =
            Filter::parse("service=api.demo:8080&method=get&path=/v1/&failures=1").expect("valid");
        assert!(f.admits(&event("api.demo:8080", "inbound", "GET", "/v1/x", false)));
        assert!(f.admits(&event("API.demo:8080", "inbound", "GET", "/v1/x", false)));
        assert!(!f.admits(&event("api.demo:8080", "inbound", "GET", "/v1/x", true)));
        assert!(!f.admits(&event("api.demo:8080", "outbound", "GET", "/v1/x", false)));
        assert!(!f.admits(&event("api.demo:8080", "inbound", "POST", "/v1/x", false)));
        assert!(!f.admits(&event("api.demo:8080", "inbound", "GET", "/v2/x", false)));
        assert!(!f.admits(&event("web.demo:8080", "inbound", "GET", "/v1/x", false)));
        let all = Filter::parse("direction=both").expect("valid");
        assert!(all.admits(&event("web.demo:80", "outbound", "PUT", "/", true)));
    }

    #[test]
    fn bad_filters_are_named() {
        assert_eq!(
            Filter::parse("service=nope"),
            Err("service \"nope\" must be host:port".into())
        );
        assert_eq!(
            Filter::parse("direction=sideways"),
            Err("direction \"sideways\": inbound, outbound or both".into())
        );
    }

    #[test]
    fn a_page_is_sent_at_most_its_pace_and_told_what_it_missed() {
        let mut pace = Pace {
            window: Instant::now(),
            sent: 0,
            skipped: 0,
        };
        let sent = (0..EVENTS_PER_SECOND + 7)
            .filter(|_| pace.admit().is_some())
            .count();
        assert_eq!(sent, EVENTS_PER_SECOND as usize);
        pace.window -= Duration::from_secs(1);
        assert_eq!(pace.admit(), Some(7));
        assert_eq!(pace.admit(), Some(0));
    }
}
