//! weft's control plane: tells proxies where services are (Destination)
//! and who they are (Identity), over the published Linkerd proxy API.

use std::net::SocketAddr;
use std::sync::Arc;

use linkerd2_proxy_api::destination::destination_server::DestinationServer;
use linkerd2_proxy_api::identity::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod config;
pub mod destination;
pub mod discovery;
pub mod identity;
pub mod metrics;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Destinations(#[from] weft_destinations::DestinationsError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Dns(#[from] discovery::dns::DnsError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })
}

/// Serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = metrics::Metrics::new();
    let mut backends: Vec<Arc<dyn discovery::Backend>> = Vec::new();
    if let Some(path) = &config.destinations {
        backends.push(discovery::file::FileBackend::start(path.clone())?);
    }
    if !config.etcd.is_empty() {
        backends.push(discovery::etcd::EtcdBackend::start(
            config.etcd.clone(),
            weft_registry::Layout::new(&config.etcd_prefix),
        ));
    }
    if config.dns {
        backends.push(discovery::dns::DnsBackend::new(
            config.dns_server,
            config.dns_refresh,
        )?);
    }
    let discovery = discovery::Discovery::new(backends);
    let identity = match &config.identity_dir {
        Some(dir) => {
            let dir = weft_identity::CaDir::new(dir);
            let service = identity::IdentityService::load(
                dir.clone(),
                config.leaf_lifetime,
                metrics.clone(),
            )?;
            let view = service.view(&dir);
            Some((service, view))
        }
        None => None,
    };
    let (identity, view) = identity.unzip();

    let grpc = bind(config.listen).await?;
    let admin = bind(config.admin_listen).await?;
    let grpc_addr = grpc.local_addr().map_err(|source| RunError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| RunError::Bind {
        addr: config.admin_listen,
        source,
    })?;
    tracing::info!(
        "weft-control listening grpc={grpc_addr} admin={admin_addr} identity={}",
        identity.is_some()
    );
    tokio::spawn(admin::serve(admin, metrics.clone(), view, shutdown.clone()));

    let router = tonic::transport::Server::builder()
        // Proxies hold one long-lived connection; keep-alives find dead ones.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(DestinationServer::new(
            destination::DestinationService::new(discovery, metrics),
        ))
        .add_optional_service(identity.map(IdentityServer::new));
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
