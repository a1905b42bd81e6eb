//! weft's data plane: a transparent L7 proxy. Outbound it routes requests by
//! authority and balances them per request; inbound it forwards to the local
//! application; both detect the protocol of every connection.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod control;
pub use weft_destinations as destinations;
pub mod endpoint;
pub mod http;
pub mod identity;
pub mod io;
pub mod metrics;
pub mod orig_dst;
pub mod route;
pub mod server;
pub mod tap;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::endpoint::EndpointSettings;
use crate::metrics::{Direction, Metrics};
use crate::route::Router;
use crate::server::Side;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{var}: {source}")]
    Destinations {
        var: &'static str,
        #[source]
        source: destinations::DestinationsError,
    },
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot start the admin server's thread: {0}")]
    AdminThread(#[source] std::io::Error),
    #[error("{var}: {source}")]
    Control {
        var: &'static str,
        #[source]
        source: weft_channel::ChannelError,
    },
    #[error(
        "{}: the inbound listener is a wildcard address; set {} to the address peers reach",
        config::ENV_REGISTER,
        config::ENV_REGISTER_ADDR
    )]
    RegisterAddr,
    #[error("{var}: {source}")]
    Tls {
        var: &'static str,
        #[source]
        source: tls::TlsError,
    },
}

impl RunError {
    /// Exit code: 64 (EX_USAGE) when the configuration is at fault.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Destinations { .. }
            | RunError::Control { .. }
            | RunError::Tls { .. }
            | RunError::RegisterAddr => 64,
            _ => 1,
        }
    }
}

async fn bind(which: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    weft_listener::bind(addr).map_err(|source| RunError::Bind {
        which,
        addr,
        source,
    })
}

/// Runs the proxy until SIGTERM or SIGINT, then drains in-flight work for
/// up to the configured grace period.
pub async fn run(config: Config) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;

    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();

    let roots = match &config.control {
        Some(c) => Some(
            weft_channel::load_roots(&c.trust_anchors).map_err(|source| RunError::Control {
                var: config::ENV_TRUST_ANCHORS,
                source,
            })?,
        ),
        None => None,
    };
    let tls = match (&config.identity, &roots) {
        (Some(id), Some(roots)) => Some(Arc::new(
            tls::Tls::new(id.name.clone(), roots.clone()).map_err(|source| RunError::Tls {
                var: config::ENV_TRUST_ANCHORS,
                source,
            })?,
        )),
        _ => None,
    };
    let control = match (&config.control, roots) {
        (Some(c), Some(roots)) => Some(
            control::Control::new(
                &c.addr,
                roots,
                &c.name,
                tls.as_ref().map(|t| t.cert()),
                config.identity.as_ref().map(|id| id.name.to_string()),
            )
            .map_err(|source| RunError::Control {
                var: config::ENV_CONTROL_ADDR,
                source,
            })?,
        ),
        _ => None,
    };
    if let (Some(tls), Some(control), Some(id)) = (&tls, &control, &config.identity) {
        tokio::spawn(identity::maintain(
            tls.clone(),
            control.clone(),
            id.token_file.clone(),
            metrics.identity.clone(),
        ));
    }

    let limits = Arc::new(config.limits.clone());
    let settings = |direction, tls: Option<Arc<tls::Tls>>| EndpointSettings {
        connect_timeout: config.connect_timeout,
        tcp_metrics: metrics.tcp.clone(),
        direction,
        tls,
        limits: limits.clone(),
    };
    let max_authorities = config.limits.metrics_max_authorities;
    let outbound_labels = Arc::new(metrics::AuthorityLabels::new(
        Direction::outbound,
        Vec::new(),
        max_authorities,
        &metrics.label_overflow,
    ));
    let inbound_labels = Arc::new(metrics::AuthorityLabels::new(
        Direction::inbound,
        config.inbound_patterns(),
        max_authorities,
        &metrics.label_overflow,
    ));
    // Outbound connections to meshed endpoints are mutual TLS; inbound ones
    // go to the local application, in plaintext.
    let outbound_router = Router::new(
        settings(Direction::outbound, tls.clone()),
        config.dns_refresh,
        control.clone(),
        outbound_labels.clone(),
    );
    let inbound_router = Router::new(
        settings(Direction::inbound, None),
        config.dns_refresh,
        None,
        inbound_labels.clone(),
    );
    for (direction, router) in [
        (Direction::outbound, &outbound_router),
        (Direction::inbound, &inbound_router),
    ] {
        let router = Arc::downgrade(router);
        metrics.breakers.add(
            direction,
            Box::new(move || {
                router
                    .upgrade()
                    .map(|r| r.endpoint_health())
                    .unwrap_or_default()
            }),
        );
    }
    if let Some(path) = &config.destinations {
        let rx = destinations::watch(path.clone()).map_err(|source| RunError::Destinations {
            var: config::ENV_DESTINATIONS,
            source,
        })?;
        outbound_router.follow(rx);
    }

    let admin_listener = bind("admin", config.admin_listen).await?;
    let outbound_listener = bind("outbound", config.outbound_listen).await?;
    let inbound_listener = bind("inbound", config.inbound_listen).await?;
    let inbound_addr = inbound_listener.local_addr();
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        outbound = %addr(&outbound_listener),
        inbound = %addr(&inbound_listener),
        admin = %addr(&admin_listener),
        "listening"
    );

    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        ready: ready.clone(),
        config: config.clone(),
        tls: tls.clone(),
    });
    let admin_shutdown = CancellationToken::new();
    let admin_thread = spawn_admin(admin, admin_listener, admin_shutdown.clone())?;

    for (direction, router, listener, labels) in [
        (
            Direction::outbound,
            outbound_router,
            outbound_listener,
            outbound_labels,
        ),
        (
            Direction::inbound,
            inbound_router,
            inbound_listener,
            inbound_labels,
        ),
    ] {
        let listen_addr = listener.local_addr().map_err(|source| RunError::Bind {
            which: "local address",
            addr: config.outbound_listen,
            source,
        })?;
        let side = Arc::new(Side {
            listen_addr,
            direction,
            router,
            metrics: metrics.clone(),
            detect_timeout: config.detect_timeout,
            inbound_forward: config.inbound_forward,
            tls: match direction {
                Direction::inbound => tls.clone(),
                Direction::outbound => None,
            },
            limits: limits.clone(),
            labels,
        });
        let name = match direction {
            Direction::outbound => "outbound",
            Direction::inbound => "inbound",
        };
        let listener = weft_listener::Listener::new(listener, name, config.limits.max_connections);
        tokio::spawn(side.accept_loop(listener, shutdown.clone(), tracker.clone()));
    }
    let deregister = CancellationToken::new();
    let mut registered = None;
    if let Some(reg) = &config.register {
        let addr = match reg.addr {
            Some(a) => a,
            None => {
                let a = inbound_addr.map_err(|source| RunError::Bind {
                    which: "inbound local address",
                    addr: config.inbound_listen,
                    source,
                })?;
                if a.ip().is_unspecified() {
                    return Err(RunError::RegisterAddr);
                }
                a
            }
        };
        let registration = weft_registry::Registration {
            etcd: reg.etcd.clone(),
            layout: weft_registry::Layout::default(),
            service: reg.service.clone(),
            addr,
            value: weft_registry::EndpointValue {
                weight: 1,
                identity: config.identity.as_ref().map(|i| i.name.to_string()),
            },
            ttl: weft_registry::DEFAULT_TTL,
        };
        registered = Some(tokio::spawn(registration.maintain(deregister.clone())));
    }
    ready.store(true, Ordering::Release);

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = sigint.recv() => tracing::info!("SIGINT: draining"),
    }
    ready.store(false, Ordering::Release);
    // Leave discovery first, so peers stop choosing this instance while it
    // drains.
    deregister.cancel();
    if let Some(task) = registered {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.shutdown_grace, remaining = tracker.len(), "grace period over; closing remaining connections");
    }
    admin_shutdown.cancel();
    let _ = tokio::task::spawn_blocking(move || admin_thread.join()).await;
    tracing::info!("stopped");
    Ok(())
}

/// The admin server runs on a thread of its own, so a scrape (or a slow
/// tap client) never takes time from the proxy's request path, which on
/// the default one-core runtime has a single thread.
fn spawn_admin(
    admin: Arc<admin::Admin>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<std::thread::JoinHandle<()>, RunError> {
    let addr = listener.local_addr().ok();
    let std_listener = listener.into_std().map_err(|source| RunError::Bind {
        which: "admin",
        addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::AdminThread)?;
    std::thread::Builder::new()
        .name("weft-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(l) => admin.serve(l, shutdown).await,
                    Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                }
            })
        })
        .map_err(RunError::AdminThread)
}
