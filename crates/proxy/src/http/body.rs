//! The response body the proxy streams back, and the end-of-stream
//! classification that feeds `response_total`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{Classification, ResponseLabels};
use crate::tap::Observed;

pub enum ProxyBody {
    /// Streamed from upstream, classified when it ends.
    Upstream {
        inner: Incoming,
        classify: Option<Classify>,
        /// A gRPC response whose upstream fails mid-stream ends with
        /// trailers saying so, rather than a reset the client can only
        /// report as a transport error.
        grpc: bool,
        /// Set once those trailers are sent: the body is over.
        ended: bool,
    },
    /// Produced by the proxy itself.
    Full(Full<Bytes>),
}

impl ProxyBody {
    pub fn upstream(inner: Incoming, classify: Classify) -> Self {
        let mut classify = Some(classify);
        let grpc = classify.as_ref().is_some_and(|c| c.grpc);
        // A body over at the headers (204, `Content-Length: 0`, HEAD, a
        // gRPC trailers-only response) may never be polled: it is a whole
        // response now, not one cut short when it is dropped.
        if inner.is_end_stream() {
            finish(&mut classify, None, End::Clean);
        }
        Self::Upstream {
            grpc,
            inner,
            classify,
            ended: false,
        }
    }
}

/// The trailers that end a gRPC response whose upstream failed after the
/// headers were sent.
fn grpc_failure_trailers(error: &hyper::Error) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(14u32)); // UNAVAILABLE
    trailers.insert(
        "grpc-message",
        super::error::grpc_message(&format!("upstream failed mid-stream: {error}")),
    );
    trailers
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(full) => match ready!(Pin::new(full).poll_frame(cx)) {
                Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
                Some(Err(never)) => match never {},
                None => Poll::Ready(None),
            },
            ProxyBody::Upstream {
                inner,
                classify,
                grpc,
                ended,
            } => {
                if *ended {
                    return Poll::Ready(None);
                }
                let polled = ready!(Pin::new(&mut *inner).poll_frame(cx));
                match &polled {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            finish(classify, Some(trailers), End::Clean);
                        } else if inner.is_end_stream() {
                            finish(classify, None, End::Clean);
                        }
                    }
                    Some(Err(e)) if *grpc => {
                        let trailers = grpc_failure_trailers(e);
                        finish(classify, Some(&trailers), End::UpstreamFailed);
                        *ended = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Some(Err(_)) => finish(classify, None, End::UpstreamFailed),
                    None => finish(classify, None, End::Clean),
                }
                Poll::Ready(polled)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(f) => f.is_end_stream(),
            ProxyBody::Upstream { ended: true, .. } => true,
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(f) => f.size_hint(),
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

/// How a response stream ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// At its end, with trailers or without.
    Clean,
    /// The upstream failed mid-stream: its endpoint's breaker counts it.
    UpstreamFailed,
    /// The client went away (or reset the stream) first: nobody's answer,
    /// so no gRPC status of the server's.
    Cancelled,
}

/// The stream ended, seen from upstream.
fn finish(classify: &mut Option<Classify>, trailers: Option<&HeaderMap>, end: End) {
    if let Some(mut c) = classify.take() {
        c.record(trailers, end);
    }
}

/// Whether an answer says the endpoint failed (and so counts for its
/// breaker): a 5xx, or gRPC UNAVAILABLE or INTERNAL. Other gRPC codes are
/// the application's answers.
pub(super) fn blames_endpoint(status: u16, grpc_code: Option<u32>) -> bool {
    const GRPC_INTERNAL: u32 = 13;
    const GRPC_UNAVAILABLE: u32 = 14;
    status >= 500 || matches!(grpc_code, Some(GRPC_INTERNAL | GRPC_UNAVAILABLE))
}

/// Everything needed to count one response when its stream ends. Holding
/// it keeps the request counted as in flight for the balancer.
pub struct Classify {
    family: Family<ResponseLabels, Counter>,
    labels: ResponseLabels,
    /// gRPC status from the response headers (a trailers-only response).
    header_grpc_status: Option<u32>,
    grpc: bool,
    /// The endpoint slot and balancer load, released at end of stream.
    pending: Option<crate::endpoint::InFlight>,
    tapped: Observed,
    recorded: bool,
}

/// The `grpc-status` of a response, one of the 17 codes gRPC defines: any
/// other value is UNKNOWN (2), so a peer cannot mint metric series.
pub(super) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    let code: u32 = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())?;
    Some(if code <= 16 { code } else { 2 })
}

impl Classify {
    pub fn new(
        family: Family<ResponseLabels, Counter>,
        labels: ResponseLabels,
        grpc: bool,
        response_headers: &HeaderMap,
        pending: Option<crate::endpoint::InFlight>,
        tapped: Observed,
    ) -> Self {
        Self {
            family,
            labels,
            header_grpc_status: if grpc {
                grpc_status(response_headers)
            } else {
                None
            },
            grpc,
            pending,
            tapped,
            recorded: false,
        }
    }

    /// Counts the response once; later calls (the drop after a normal end)
    /// do nothing.
    fn record(&mut self, trailers: Option<&HeaderMap>, end: End) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let mut labels = self.labels.clone();
        let error = end != End::Clean;
        let success = if self.grpc {
            // A gRPC response without any grpc-status is UNKNOWN (2), or
            // CANCELLED (1) when the client cancelled it.
            let code = self
                .header_grpc_status
                .or_else(|| trailers.and_then(grpc_status))
                .unwrap_or(if end == End::Cancelled { 1 } else { 2 });
            labels.grpc_status_code = Some(code);
            code == 0 && !error
        } else {
            labels.status_code.is_some_and(|c| c < 500) && !error
        };
        let endpoint_failed = labels
            .status_code
            .is_some_and(|c| blames_endpoint(c, labels.grpc_status_code));
        if let Some(mut in_flight) = self.pending.take() {
            use weft_balance::Outcome;
            in_flight
                .pending
                .record(if endpoint_failed || end == End::UpstreamFailed {
                    Outcome::Failure
                } else if error {
                    Outcome::Neutral
                } else {
                    Outcome::Success
                });
        }
        labels.error = match end {
            End::Clean => labels.error,
            End::UpstreamFailed => Some("stream"),
            End::Cancelled => Some("cancelled"),
        };
        labels.classification = if success {
            Classification::success
        } else {
            Classification::failure
        };
        std::mem::take(&mut self.tapped).finish(&labels);
        self.family.get_or_create(&labels).inc();
    }
}

impl Drop for Classify {
    /// A body dropped before its end was cut short by the client (it went
    /// away, or reset the stream): it counts, as a cancelled failure.
    fn drop(&mut self) {
        self.record(None, End::Cancelled);
    }
}

/// A response body that keeps its request counted as active on the
/// connection until the body is done (or dropped).
pub(super) struct Tracked {
    inner: ProxyBody,
    _active: super::Active,
}

impl Tracked {
    pub(super) fn new(inner: ProxyBody, active: super::Active) -> Self {
        Self {
            inner,
            _active: active,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
