//! weft's control plane: tells proxies where services are (Destination)
//! and who they are (Identity), over the published Linkerd proxy API.

use std::net::SocketAddr;
use std::sync::Arc;

use linkerd2_proxy_api::identity::identity_server::IdentityServer;
use linkerd2_proxy_api::inbound::inbound_server_policies_server::InboundServerPoliciesServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_policy_api::server::OutboundPoliciesServer;

pub mod admin;
mod clients;
pub mod config;
pub mod destination;
pub mod discovery;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod spent;
pub mod token_review;
pub mod webhook;

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
    #[error("control channel TLS: {0}")]
    Channel(#[from] weft_channel::ChannelError),
    #[error(transparent)]
    Dns(#[from] discovery::dns::DnsError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("--kubernetes: {0}")]
    Kubernetes(String),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    weft_listener::bind(addr).map_err(|source| RunError::Bind { addr, source })
}

/// A client must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Streams per connection beyond the names one client may follow: its
/// `Certify` calls and health checks.
const EXTRA_STREAMS: u32 = 16;

/// The cluster's client: from `kubeconfig`, else in-cluster configuration
/// or KUBECONFIG.
pub async fn kubernetes_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, RunError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| RunError::Kubernetes(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| RunError::Kubernetes(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            RunError::Kubernetes(format!(
                "no cluster configuration (in-cluster or KUBECONFIG): {e}"
            ))
        })?,
    };
    kube::Client::try_from(config).map_err(|e| RunError::Kubernetes(e.to_string()))
}

/// Serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let metrics = metrics::Metrics::new();
    let mut backends: Vec<Arc<dyn discovery::Backend>> = Vec::new();
    let mut file = None;
    if let Some(path) = &config.destinations {
        let backend = discovery::file::FileBackend::start(path.clone())?;
        file = Some(backend.file());
        backends.push(backend);
    }
    let kubernetes = if config.kubernetes || config.kubeconfig.is_some() {
        Some(kubernetes_client(config.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    let mut pods: Option<inbound::PodIdentity> = None;
    if let Some(client) = &kubernetes {
        let backend = discovery::kubernetes::KubernetesBackend::start(
            client.clone(),
            discovery::kubernetes::Naming {
                cluster_domain: config.cluster_domain.clone(),
                trust_domain: config.trust_domain.clone(),
            },
        );
        let weak = Arc::downgrade(&backend);
        pods = Some(Arc::new(move |ns: &str, pod: &str| {
            weak.upgrade()?.pod_identity(ns, pod)
        }));
        backends.push(backend);
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
    // The order asked for; backends not enabled are skipped.
    backends.sort_by_key(|b| {
        config
            .discovery_order
            .iter()
            .position(|n| n.as_str() == b.name())
            .unwrap_or(usize::MAX)
    });
    let discovery = discovery::Discovery::with_overlap(backends, config.discovery_overlap.into());
    let dir = weft_identity::CaDir::new(&config.identity_dir);
    let spent = config
        .spent_tokens
        .clone()
        .unwrap_or_else(|| config.identity_dir.join("spent-tokens"));
    let mut identity =
        identity::IdentityService::load(dir.clone(), config.leaf_lifetime, spent, metrics.clone())?;
    if let Some(client) = kubernetes {
        identity = identity.with_reviewer(token_review::TokenReviewer::new(
            client,
            config.trust_domain.clone(),
        ));
    }
    let view = identity.view(&dir);
    let own_cert = identity.serve_cert(config.name.clone())?;
    let tls =
        weft_channel::ServerTls::new(weft_channel::load_roots(&dir.anchor_cert())?, own_cert)?;

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
        "weft-control listening grpc={grpc_addr} admin={admin_addr} name={} tls=1.3",
        config.name
    );
    tokio::spawn(admin::serve(
        admin,
        admin::Admin {
            metrics: metrics.clone(),
            identity: Some(view),
            file: file.clone(),
            default_inbound: config.default_inbound_policy,
        },
        shutdown.clone(),
    ));
    if let (Some(addr), Some(cert), Some(key)) = (
        config.webhook_listen,
        &config.webhook_cert,
        &config.webhook_key,
    ) {
        let tls = webhook::tls_config(cert, key)?;
        let listener = webhook::bind(addr)?;
        let mut settings = weft_inject::Settings::new(
            &config.inject_registry,
            &config.inject_version,
            &config.namespace,
        );
        settings.trust_domain = config.trust_domain.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(webhook::serve(listener, tls, Arc::new(settings), shutdown));
    }

    let incoming = weft_channel::incoming(
        weft_listener::Listener::new(grpc, "control", config.max_connections as usize),
        tls,
        HANDSHAKE_TIMEOUT,
    );
    let limits = clients::ClientLimits {
        per_client: config.max_names_per_client,
        uncertified: config.max_names_uncertified,
    };
    let router = tonic::transport::Server::builder()
        // Proxies hold one long-lived connection; keep-alives find dead ones.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        // A proxy follows every name it routes to on one connection, with
        // two streams each: endpoints and policy.
        .max_concurrent_streams(Some(
            config
                .max_names_per_client
                .saturating_mul(2)
                .saturating_add(EXTRA_STREAMS),
        ))
        .http2_max_header_list_size(Some(16 * 1024))
        .add_service(destination::DestinationServer::new(
            destination::DestinationService::new(discovery.clone(), metrics.clone(), limits),
        ))
        .add_service(OutboundPoliciesServer::new(
            outbound::OutboundPolicyService::new(discovery, metrics.clone(), limits),
        ))
        .add_service(InboundServerPoliciesServer::new(
            inbound::InboundPolicyService::new(
                file,
                pods,
                config.default_inbound_policy,
                metrics,
                limits,
            ),
        ))
        .add_service(IdentityServer::new(identity));
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}
