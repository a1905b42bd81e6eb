//! A real gRPC server and client: the standard `grpc.health.v1.Health`
//! service from tonic-health, which needs no code generation.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// The service name the server reports as SERVING; any other name gets
/// NOT_FOUND, a real non-OK gRPC status for tests to provoke.
pub const SERVING: &str = "weft.test.Echo";

pub struct GrpcServer {
    pub addr: SocketAddr,
    pub reporter: HealthReporter,
    task: JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start() -> anyhow::Result<GrpcServer> {
    start_on("127.0.0.1:0".parse()?).await
}

pub async fn start_on(addr: SocketAddr) -> anyhow::Result<GrpcServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVING, ServingStatus::Serving)
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(GrpcServer {
        addr,
        reporter,
        task,
    })
}

/// One HTTP/2 channel to `via` (a proxy) whose requests name `authority`.
pub async fn channel_via(via: SocketAddr, authority: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{via}"))?
        .origin(format!("http://{authority}").parse()?)
        .tcp_nodelay(true);
    Ok(endpoint.connect().await?)
}

/// `Health/Check` for `service`.
pub async fn check(channel: &Channel, service: &str) -> Result<i32, tonic::Status> {
    check_with(channel, service, &http::HeaderMap::new()).await
}

/// The same, carrying `headers` as request metadata (a trace context, say,
/// as an instrumented application passes it on).
pub async fn check_with(
    channel: &Channel,
    service: &str,
    headers: &http::HeaderMap,
) -> Result<i32, tonic::Status> {
    let mut client = HealthClient::new(channel.clone());
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers.clone());
    let rsp = client.check(request).await?;
    Ok(rsp.into_inner().status)
}

/// `Health/Watch` for `service`: a server stream that stays open (its first
/// message is the current status), for tests that cancel mid-stream.
pub async fn watch(
    channel: &Channel,
    service: &str,
) -> Result<tonic::Streaming<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    let mut client = HealthClient::new(channel.clone());
    let rsp = client
        .watch(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?;
    Ok(rsp.into_inner())
}
