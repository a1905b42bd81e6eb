//! One upstream address and the pooled HTTP clients that reach it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use weft_balance::{Load, PeakEwmaConfig};

use crate::io::CountingIo;
use crate::metrics::{Direction, Peer, TcpMetrics};

/// Idle upstream connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub type UpstreamClient = Client<Connector, Incoming>;

/// An upstream endpoint: its address, its load (shared by every balancer
/// that can pick it) and one client per HTTP version, each with its own
/// pool: HTTP/1.1 keep-alive connections, or one multiplexed HTTP/2
/// connection.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub load: Arc<Load>,
    pub http1: UpstreamClient,
    pub http2: UpstreamClient,
    pub connector: Connector,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, settings: &EndpointSettings) -> Self {
        let connector = Connector {
            addr,
            timeout: settings.connect_timeout,
            metrics: settings.tcp_metrics.clone(),
            direction: settings.direction,
        };
        let mut h1 = Client::builder(TokioExecutor::new());
        h1.pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // The request came in with its own Host; a proxy must not
            // invent one.
            .set_host(false)
            .retry_canceled_requests(true);
        let mut h2 = Client::builder(TokioExecutor::new());
        h2.http2_only(true)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_adaptive_window(true)
            .set_host(false);
        Self {
            addr,
            load: Arc::new(Load::new(PeakEwmaConfig::default())),
            http1: h1.build(connector.clone()),
            http2: h2.build(connector.clone()),
            connector,
        }
    }
}

/// What every endpoint of one direction shares.
#[derive(Clone, Debug)]
pub struct EndpointSettings {
    pub connect_timeout: Duration,
    pub tcp_metrics: TcpMetrics,
    pub direction: Direction,
}

/// Connects to one fixed address whatever the request URI says: routing
/// already happened when the endpoint was picked.
#[derive(Clone, Debug)]
pub struct Connector {
    addr: SocketAddr,
    timeout: Duration,
    metrics: TcpMetrics,
    direction: Direction,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type UpstreamIo = CountingIo<TcpStream>;

impl Connector {
    pub async fn connect(&self) -> Result<UpstreamIo, ConnectError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    timeout: self.timeout,
                });
            }
            Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
            Ok(Ok(s)) => s,
        };
        // Latency matters more than packet count for request/response.
        let _ = stream.set_nodelay(true);
        Ok(CountingIo::new(
            stream,
            &self.metrics,
            self.direction,
            Peer::dst,
        ))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect().await.map(TokioIo::new) })
    }
}

impl Connection for CountingIo<TcpStream> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}
