//! Distributed tracing: every proxied request carries a trace context
//! upstream (the client's, with this proxy's span as the parent, or a new
//! one), and a span per request on each side is exported over OTLP when it
//! is sampled: by the client's decision, else with probability
//! `WEFT_PROXY_TRACE_SAMPLE` (head sampling), and always when the request
//! failed or took longer than `WEFT_PROXY_TRACE_SLOW`, so the traces that
//! matter are kept without paying for all of them. Export never blocks a
//! request: spans go to a bounded queue, and what does not fit is dropped
//! and counted.

pub mod context;
mod export;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::Method;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span as OtlpSpan, Status, span, status};

use crate::metrics::{Classification, Direction, ResponseLabels, TlsLabel};
use context::{Format, Incoming};
pub use export::{TraceMetrics, spawn_exporter};

/// Paths longer than this are cut in spans: a span's size must not be the
/// client's choice.
const MAX_PATH: usize = 256;

/// How this proxy traces.
pub struct Tracer {
    /// Head sampling probability for requests with no decision of their
    /// own.
    sample: f64,
    /// Requests slower than this are always exported.
    slow: Duration,
    exporter: export::Queue,
}

impl Tracer {
    pub fn new(sample: f64, slow: Duration, exporter: export::Queue) -> Arc<Self> {
        Arc::new(Self {
            sample: sample.clamp(0.0, 1.0),
            slow,
            exporter,
        })
    }

    /// Reads the request's context, decides whether it is sampled, and
    /// writes the context its upstream request carries (this span as the
    /// parent). The span is exported at [`Span::finish`], if kept.
    pub fn start(
        self: &Arc<Self>,
        headers: &mut http::HeaderMap,
        direction: Direction,
        method: &Method,
        uri: &http::Uri,
    ) -> Span {
        let (incoming, decision) = Incoming::read(headers);
        let sampled = decision.unwrap_or_else(|| fastrand::f64() < self.sample);
        let trace_id = incoming.map_or_else(|| fastrand::u128(1..), |c| c.trace_id);
        let span_id = fastrand::u64(1..);
        let parent = incoming.map(|c| c.parent);
        let format = incoming.map_or(Format::W3c, |c| c.format);
        context::write(headers, format, trace_id, span_id, parent, sampled);
        let request_bytes = content_length(headers);
        Span {
            tracer: self.clone(),
            trace_id,
            span_id,
            parent,
            sampled,
            direction,
            start: SystemTime::now(),
            started: Instant::now(),
            method: method.clone(),
            // A reference-counted copy: the path is read only for spans
            // that are kept.
            uri: uri.clone(),
            endpoint: None,
            retries: 0,
            request_bytes,
            response_bytes: None,
        }
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// One request's span, until its response ends.
pub struct Span {
    tracer: Arc<Tracer>,
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
    direction: Direction,
    start: SystemTime,
    started: Instant,
    method: Method,
    uri: http::Uri,
    endpoint: Option<SocketAddr>,
    retries: u32,
    request_bytes: Option<u64>,
    response_bytes: Option<u64>,
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

fn int(key: &str, value: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(value))
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Span {
    /// The endpoint that answered, after `retries` tries before it.
    pub fn upstream(
        &mut self,
        endpoint: SocketAddr,
        retries: u32,
        response_headers: &http::HeaderMap,
    ) {
        self.endpoint = Some(endpoint);
        self.retries = retries;
        self.response_bytes = content_length(response_headers);
    }

    /// Ends the span with the response counted as `labels`; exports it if
    /// it is sampled, failed or was slow.
    pub fn finish(self, labels: &ResponseLabels) {
        let elapsed = self.started.elapsed();
        let failed = labels.classification == Classification::failure;
        if !(self.sampled || failed || elapsed >= self.tracer.slow) {
            return;
        }
        let path = crate::tap::truncate(self.uri.path(), MAX_PATH);
        let route = &*labels.dst.route;
        let name = if route == "default" {
            format!("{} {}", self.method, labels.dst.authority)
        } else {
            format!("{} {route}", self.method)
        };
        let mut attributes = vec![
            text("http.request.method", self.method.as_str()),
            text("url.path", path),
            text("server.address", &*labels.dst.authority),
            text("http.route", route),
            text(
                "weft.direction",
                match self.direction {
                    Direction::inbound => "inbound",
                    Direction::outbound => "outbound",
                },
            ),
        ];
        if let Some(code) = labels.status_code {
            attributes.push(int("http.response.status_code", i64::from(code)));
        }
        if let Some(code) = labels.grpc_status_code {
            attributes.push(int("rpc.grpc.status_code", i64::from(code)));
        }
        match &labels.tls {
            TlsLabel::Mutual { peer_id } => {
                attributes.push(text("weft.tls", "true"));
                attributes.push(text("weft.peer.identity", &**peer_id));
            }
            TlsLabel::Plain => attributes.push(text("weft.tls", "no_identity")),
        }
        if let Some(ep) = self.endpoint {
            attributes.push(text("network.peer.address", ep.ip().to_string()));
            attributes.push(int("network.peer.port", i64::from(ep.port())));
        }
        if self.retries > 0 {
            attributes.push(int("weft.retries", i64::from(self.retries)));
        }
        if let Some(b) = self.request_bytes {
            attributes.push(int(
                "http.request.body.size",
                i64::try_from(b).unwrap_or(i64::MAX),
            ));
        }
        if let Some(b) = self.response_bytes {
            attributes.push(int(
                "http.response.body.size",
                i64::try_from(b).unwrap_or(i64::MAX),
            ));
        }
        if let Some(w) = &labels.dst.workload {
            attributes.push(text("weft.workload", &**w));
        }
        let status = if failed {
            if let Some(e) = labels.error {
                attributes.push(text("error.type", e));
            }
            Status {
                code: status::StatusCode::Error as i32,
                message: labels.error.unwrap_or("failed").to_string(),
            }
        } else {
            Status::default()
        };
        let span = OtlpSpan {
            trace_id: self.trace_id.to_be_bytes().to_vec(),
            span_id: self.span_id.to_be_bytes().to_vec(),
            parent_span_id: self
                .parent
                .map(|p| p.to_be_bytes().to_vec())
                .unwrap_or_default(),
            // The W3C flags (sampled), and whether the parent is remote:
            // it always is, in another process.
            flags: u32::from(self.sampled) | if self.parent.is_some() { 0x300 } else { 0x100 },
            name,
            kind: match self.direction {
                Direction::inbound => span::SpanKind::Server,
                Direction::outbound => span::SpanKind::Client,
            } as i32,
            start_time_unix_nano: nanos(self.start),
            end_time_unix_nano: nanos(self.start + elapsed),
            attributes,
            status: Some(status),
            ..Default::default()
        };
        self.tracer.exporter.offer(span);
    }
}
