//! OTLP export: spans queue in a bounded channel (a full queue drops the
//! span and counts it: the request path never waits), and one task sends
//! them in batches of up to 512, at least every second, to the collector's
//! `TraceService/Export` over gRPC. One export is in flight at a time; a
//! failed one is dropped and counted, not retried, so a dead collector
//! costs a bounded queue and a log line every ten seconds.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

const BATCH: usize = 512;
const BATCH_WAIT: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` or `export_failed`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct TraceMetrics {
    pub exported: Counter,
    pub dropped: Family<DropLabels, Counter>,
}

impl TraceMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not exported: the queue was full (WEFT_PROXY_TRACE_QUEUE), or the export failed",
            self.dropped.clone(),
        );
    }
}

/// The request path's end of the queue.
pub struct Queue {
    tx: mpsc::Sender<Span>,
    metrics: TraceMetrics,
}

impl Queue {
    /// Queues a span, or drops it (counted) when the queue is full.
    pub fn offer(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.metrics
                .dropped
                .get_or_create(&DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

/// Starts the exporter to `collector` (`host:port`, plaintext gRPC) with a
/// queue of `capacity` spans, describing this proxy as `resource`.
pub fn spawn_exporter(
    collector: &str,
    capacity: usize,
    resource: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
    metrics: TraceMetrics,
) -> Result<Queue, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{collector}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let (tx, rx) = mpsc::channel(capacity.max(1));
    tokio::spawn(run(
        rx,
        TraceServiceClient::new(channel),
        collector.to_string(),
        Resource {
            attributes: resource,
            ..Default::default()
        },
        metrics.clone(),
    ));
    Ok(Queue { tx, metrics })
}

async fn run(
    mut rx: mpsc::Receiver<Span>,
    mut client: TraceServiceClient<tonic::transport::Channel>,
    collector: String,
    resource: Resource,
    metrics: TraceMetrics,
) {
    let errors = weft_listener::Throttle::new(Duration::from_secs(10));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                metrics.exported.inc_by(n);
            }
            Err(status) => {
                metrics
                    .dropped
                    .get_or_create(&DropLabels {
                        reason: "export_failed",
                    })
                    .inc_by(n);
                if let Some(suppressed) = errors.allow() {
                    tracing::warn!(%collector, error = %status.message(), spans = n, suppressed, "trace export failed; spans dropped");
                }
            }
        }
    }
}
