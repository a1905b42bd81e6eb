//! A real OTLP/gRPC trace receiver (`TraceService/Export`, from the
//! `opentelemetry-proto` crate), keeping every span it is sent, for tests
//! and the benchmark to check what proxies export.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;

/// One received span with the resource it came with.
#[derive(Clone, Debug)]
pub struct Received {
    pub resource: Option<Resource>,
    pub span: Span,
}

#[derive(Clone, Default)]
struct Store {
    spans: Arc<Mutex<Vec<Received>>>,
    /// Keep only a count (the benchmark's receiver).
    count_only: bool,
    count: Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut n = 0;
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    n += 1;
                    if !self.count_only {
                        got.push(Received {
                            resource: rs.resource.clone(),
                            span,
                        });
                    }
                }
            }
        }
        self.count
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if !got.is_empty() {
            let mut spans = match self.spans.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            spans.extend(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver, listening until dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    store: Store,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Listens on `addr` (port 0: any); `count_only` keeps counts, not spans.
    pub async fn start_on(addr: SocketAddr, count_only: bool) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let store = Store {
            count_only,
            ..Default::default()
        };
        let service = TraceServiceServer::new(store.clone());
        let task = tokio::spawn(async move {
            let incoming = tokio_stream_listener(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self { addr, store, task })
    }

    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, false).await
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        match self.store.spans.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The count of spans received, shared.
    pub fn counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.store.count.clone()
    }

    /// How many spans were received.
    pub fn count(&self) -> u64 {
        self.store.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `done` holds for the spans received (exports are
    /// batched: up to a second late), or `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return Ok(spans);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "not received within {timeout:?}: {} spans",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| s);
        Some((accepted, l))
    })
}
