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
use weft_balance::Pending;

use crate::metrics::{Classification, ResponseLabels};
use crate::tap::Tapped;

pub enum ProxyBody {
    /// Streamed from upstream, classified when it ends.
    Upstream(Incoming, Option<Classify>),
    /// Produced by the proxy itself.
    Full(Full<Bytes>),
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
            ProxyBody::Upstream(inner, classify) => {
                let polled = ready!(Pin::new(&mut *inner).poll_frame(cx));
                match &polled {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            finish(classify, Some(trailers), false);
                        } else if inner.is_end_stream() {
                            finish(classify, None, false);
                        }
                    }
                    Some(Err(_)) => finish(classify, None, true),
                    None => finish(classify, None, false),
                }
                Poll::Ready(polled)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(f) => f.is_end_stream(),
            ProxyBody::Upstream(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(f) => f.size_hint(),
            ProxyBody::Upstream(inner, _) => inner.size_hint(),
        }
    }
}

fn finish(classify: &mut Option<Classify>, trailers: Option<&HeaderMap>, error: bool) {
    if let Some(mut c) = classify.take() {
        c.record(trailers, error);
    }
}

/// Everything needed to count one response when its stream ends. Holding
/// it keeps the request counted as in flight for the balancer.
pub struct Classify {
    family: Family<ResponseLabels, Counter>,
    labels: ResponseLabels,
    /// gRPC status from the response headers (a trailers-only response).
    header_grpc_status: Option<u32>,
    grpc: bool,
    pending: Option<Pending>,
    tapped: Option<Box<Tapped>>,
    recorded: bool,
}

pub(super) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Classify {
    pub fn new(
        family: Family<ResponseLabels, Counter>,
        labels: ResponseLabels,
        grpc: bool,
        response_headers: &HeaderMap,
        pending: Option<Pending>,
        tapped: Option<Box<Tapped>>,
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
    fn record(&mut self, trailers: Option<&HeaderMap>, error: bool) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.pending.take();
        let mut labels = self.labels.clone();
        let success = if self.grpc {
            // A gRPC response without any grpc-status is UNKNOWN (2).
            let code = self
                .header_grpc_status
                .or_else(|| trailers.and_then(grpc_status))
                .unwrap_or(2);
            labels.grpc_status_code = Some(code);
            code == 0 && !error
        } else {
            labels.status_code < 500 && !error
        };
        if error {
            labels.error = Some("stream");
        }
        labels.classification = if success {
            Classification::success
        } else {
            Classification::failure
        };
        if let Some(t) = self.tapped.take() {
            t.finish(&labels);
        }
        self.family.get_or_create(&labels).inc();
    }
}

impl Drop for Classify {
    /// A body dropped before its end was cut short (client went away, or a
    /// reset): it counts, as a failure.
    fn drop(&mut self) {
        self.record(None, true);
    }
}
