//! weft's data plane: a transparent L7 proxy. Outbound it routes requests by
//! authority and balances them per request; inbound it forwards to the local
//! application; both detect the protocol of every connection.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod config;
pub mod control;
pub mod cores;
pub use weft_destinations as destinations;
pub mod endpoint;
pub mod http;
pub mod identity;
pub mod io;
pub mod local;
pub mod metrics;
pub mod orig_dst;
pub mod owner;
pub mod route;
pub mod server;
pub mod tap;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod upgrade;
pub mod workload;

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
    #[error("WEFT_PROXY_TRACE_COLLECTOR: {0}")]
    Trace(String),
    #[error(transparent)]
    Cores(#[from] cores::StartError),
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
    #[error("upgrade: {0}")]
    Upgrade(#[from] upgrade::UpgradeError),
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

/// The listener `which`: the one handed over by the process this one
/// replaces, or a fresh one.
fn listen(
    which: &'static str,
    addr: SocketAddr,
    inherited: &mut Option<upgrade::Inherited>,
    reuse_port: bool,
) -> Result<TcpListener, RunError> {
    listen_named(which, which, addr, inherited, reuse_port)
}

/// [`listen`] for the listener `name` of a side (`which`) with several.
fn listen_named(
    name: &str,
    which: &'static str,
    addr: SocketAddr,
    inherited: &mut Option<upgrade::Inherited>,
    reuse_port: bool,
) -> Result<TcpListener, RunError> {
    let bind_error = |source| RunError::Bind {
        which,
        addr,
        source,
    };
    if let Some(listener) = inherited.as_mut().and_then(|i| i.take(name, addr)) {
        return TcpListener::from_std(listener).map_err(bind_error);
    }
    weft_listener::bind_with(addr, reuse_port).map_err(bind_error)
}

/// Installs the certificate the replaced process held for `tls`'s
/// identity, so this one is ready without its token or the control plane.
fn inherit_certificate(inherited: &mut Option<upgrade::Inherited>, tls: &tls::Tls) {
    let Some(held) = inherited
        .as_mut()
        .and_then(|i| i.take_certificate(tls.name.as_str()))
    else {
        return;
    };
    if let Err(e) = tls.install_held(held) {
        tracing::warn!(identity = %tls.name, error = %e, "upgrade: the handed-over certificate is not usable; certifying afresh");
    }
}

/// Every certificate this process holds, to hand over on SIGUSR2.
fn held_certificates(
    tls: &Option<Arc<tls::Tls>>,
    workloads: &workload::Workloads,
) -> Vec<tls::HeldCert> {
    tls.iter()
        .chain(workloads.iter().map(|w| &w.tls))
        .filter_map(|t| t.held())
        .collect()
}

/// Why the proxy stops.
enum Stop {
    Signal,
    /// A new process took the listeners over.
    Upgraded,
}

/// Runs the proxy until SIGTERM or SIGINT, then drains in-flight work for
/// up to the configured grace period.
pub async fn run(config: Config) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sigusr2 = signal(SignalKind::user_defined2()).map_err(RunError::Signal)?;
    let upgrader = match upgrade::Upgrader::new(config.upgrade_timeout) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(error = %e, "SIGUSR2 upgrades are unavailable");
            None
        }
    };
    let mut inherited = upgrade::Inherited::fetch().await?;
    let process = admin::ProcessInfo::now(inherited.as_ref().map(|i| i.from_pid()));

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
    if let Some(tls) = &tls {
        inherit_certificate(&mut inherited, tls);
    }
    let control = match (&config.control, roots.clone()) {
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
    let settings = |direction, tls: Option<Arc<tls::Tls>>, workload| EndpointSettings {
        connect_timeout: config.connect_timeout,
        tcp_metrics: metrics.tcp.clone(),
        direction,
        tls,
        limits: limits.clone(),
        workload,
        orig_proto_upgrade: config.orig_proto,
        cores: config.cores,
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
        settings(Direction::outbound, tls.clone(), None),
        config.dns_refresh,
        control.clone(),
        outbound_labels.clone(),
    );
    let inbound_router = Router::new(
        settings(Direction::inbound, None, None),
        config.dns_refresh,
        None,
        inbound_labels.clone(),
    );
    // Per-node mode: each workload its own certificate, control channel
    // (renewals are proved by the workload's certificate) and outbound
    // router.
    let mut workloads = Vec::new();
    if let (Some(c), Some(roots)) = (&config.control, &roots) {
        for w in &config.workloads {
            let wtls = Arc::new(tls::Tls::new(w.identity.clone(), roots.clone()).map_err(
                |source| RunError::Tls {
                    var: config::ENV_WORKLOADS,
                    source,
                },
            )?);
            inherit_certificate(&mut inherited, &wtls);
            let wcontrol = control::Control::new(
                &c.addr,
                roots.clone(),
                &c.name,
                Some(wtls.cert()),
                Some(w.identity.to_string()),
            )
            .map_err(|source| RunError::Control {
                var: config::ENV_CONTROL_ADDR,
                source,
            })?;
            tokio::spawn(identity::maintain(
                wtls.clone(),
                wcontrol.clone(),
                w.token_file.clone(),
                metrics.identity.clone(),
            ));
            let router = Router::new(
                settings(
                    Direction::outbound,
                    Some(wtls.clone()),
                    Some(w.name.as_str().into()),
                ),
                config.dns_refresh,
                Some(wcontrol),
                outbound_labels.clone(),
            );
            let workload = Arc::new(workload::Workload {
                name: w.name.as_str().into(),
                tls: wtls,
                router,
            });
            workloads.push((workload, w.addresses.clone(), w.uids.clone()));
        }
    }
    let workloads = Arc::new(workload::Workloads::new(workloads));
    let mut routers = vec![
        (Direction::outbound, outbound_router.clone()),
        (Direction::inbound, inbound_router.clone()),
    ];
    routers.extend(
        workloads
            .iter()
            .map(|w| (Direction::outbound, w.router.clone())),
    );
    for (direction, router) in &routers {
        let direction = *direction;
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
    let tracer = match &config.trace {
        Some(t) => {
            use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
            let attr = |k: &str, v: String| KeyValue {
                key: k.into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(v)),
                }),
                ..Default::default()
            };
            let name = config
                .identity
                .as_ref()
                .map_or_else(|| "weft-proxy".to_string(), |i| i.name.to_string());
            let queue = trace::spawn_exporter(
                &t.collector,
                t.queue,
                vec![
                    attr("service.name", name),
                    attr("service.version", env!("CARGO_PKG_VERSION").into()),
                ],
                metrics.trace.clone(),
            )
            .map_err(|e| RunError::Trace(e.to_string()))?;
            Some(trace::Tracer::new(t.sample, t.slow, queue))
        }
        None => None,
    };
    let server_id: Option<Arc<str>> = config
        .inbound_server
        .as_deref()
        .or(config.identity.as_ref().map(|i| i.name.as_str()))
        .map(Into::into);
    let authz = authz::Authz::new(
        config.inbound_default_policy,
        config.limits.rate_limit_clients,
        control.clone(),
    );
    if let Some(path) = &config.destinations {
        let rx = destinations::watch(path.clone()).map_err(|source| RunError::Destinations {
            var: config::ENV_DESTINATIONS,
            source,
        })?;
        authz.follow(rx.clone());
        outbound_router.follow(rx);
    }

    let reuse = config.reuse_port;
    let admin_listener = listen("admin", config.admin_listen, &mut inherited, false)?;
    // Each side's listeners, the first named as the side, the others
    // numbered (the names say which socket is which in an upgrade).
    let mut side_listeners = |side: &'static str, first: SocketAddr, also: &[SocketAddr]| {
        std::iter::once(first)
            .chain(also.iter().copied())
            .enumerate()
            .map(|(i, addr)| {
                let name = match i {
                    0 => side.to_string(),
                    _ => format!("{side} {i}"),
                };
                let l = listen_named(&name, side, addr, &mut inherited, reuse)?;
                Ok((name, l))
            })
            .collect::<Result<Vec<_>, RunError>>()
    };
    let outbound_listeners = side_listeners(
        "outbound",
        config.outbound_listen,
        &config.outbound_listen_also,
    )?;
    let inbound_listeners = side_listeners(
        "inbound",
        config.inbound_listen,
        &config.inbound_listen_also,
    )?;
    // Kept to hand over on SIGUSR2 (the accept loops own the originals).
    let mut sockets = Vec::new();
    for (name, l) in outbound_listeners
        .iter()
        .chain(inbound_listeners.iter())
        .map(|(n, l)| (n.clone(), l))
        .chain([("admin".to_string(), &admin_listener)])
    {
        use std::os::fd::AsFd;
        match l.as_fd().try_clone_to_owned() {
            Ok(fd) => sockets.push((name, fd)),
            Err(e) => {
                tracing::warn!(error = %e, listener = name, "cannot keep the listener for upgrades")
            }
        }
    }
    let inbound_addr = inbound_listeners[0].1.local_addr();
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let also = |ls: &[(String, TcpListener)]| {
        ls.iter()
            .skip(1)
            .map(|(_, l)| addr(l))
            .collect::<Vec<_>>()
            .join(",")
    };
    tracing::info!(
        outbound = %addr(&outbound_listeners[0].1),
        inbound = %addr(&inbound_listeners[0].1),
        admin = %addr(&admin_listener),
        outbound_also = %also(&outbound_listeners),
        inbound_also = %also(&inbound_listeners),
        "listening"
    );

    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        ready: ready.clone(),
        config: config.clone(),
        tls: tls.clone(),
        workloads: workloads.clone(),
        process,
    });
    let admin_shutdown = CancellationToken::new();
    let admin_thread = spawn_admin(admin, admin_listener, admin_shutdown.clone())?;
    let cores = cores::Cores::start(config.cores, &shutdown, &tracker)?;

    for (direction, router, listeners, labels) in [
        (
            Direction::outbound,
            outbound_router,
            outbound_listeners,
            outbound_labels,
        ),
        (
            Direction::inbound,
            inbound_router,
            inbound_listeners,
            inbound_labels,
        ),
    ] {
        let mut addrs = Vec::with_capacity(listeners.len());
        for (_, l) in &listeners {
            addrs.push(l.local_addr().map_err(|source| RunError::Bind {
                which: "local address",
                addr: config.outbound_listen,
                source,
            })?);
        }
        let side = Arc::new(Side {
            listen_addrs: http::ListenAddrs::new(addrs),
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
            workloads: workloads.clone(),
            authz: authz.clone(),
            server_id: server_id.clone(),
            tracer: tracer.clone(),
            cores: cores.clone(),
        });
        let name = match direction {
            Direction::outbound => "outbound",
            Direction::inbound => "inbound",
        };
        for (_, listener) in listeners {
            let listener =
                weft_listener::Listener::new(listener, name, config.limits.max_connections);
            tokio::spawn(
                side.clone()
                    .accept_loop(listener, shutdown.clone(), tracker.clone()),
            );
        }
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
    {
        // Ready to do its work: listening and, with an identity, certified.
        // Then the old process (after SIGUSR2) drains, and a supervisor
        // speaking systemd's notify protocol learns of it (and, after an
        // upgrade, of the new main pid).
        let tls = tls.clone();
        let workloads = workloads.clone();
        tokio::spawn(async move {
            while !(tls.as_ref().is_none_or(|t| t.has_cert()) && workloads.certified()) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let upgraded = inherited.is_some();
            if let Some(handed) = inherited {
                match handed.ready().await {
                    Ok(()) => tracing::info!("upgrade: ready; the old process drains"),
                    Err(e) => tracing::warn!(error = %e, "upgrade: cannot tell the old process"),
                }
            }
            let pid = std::process::id();
            let mut states = vec![sd_notify::NotifyState::Ready];
            if upgraded {
                states.insert(0, sd_notify::NotifyState::MainPid(pid));
            }
            if let Err(e) = sd_notify::notify(&states) {
                tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
            }
        });
    }

    let stop = loop {
        tokio::select! {
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: draining");
                break Stop::Signal;
            }
            _ = sigint.recv() => {
                tracing::info!("SIGINT: draining");
                break Stop::Signal;
            }
            _ = sigusr2.recv() => {
                let Some(upgrader) = &upgrader else {
                    tracing::warn!("SIGUSR2: upgrades are unavailable (see above)");
                    continue;
                };
                tracing::info!("SIGUSR2: starting the new process");
                let fds: Vec<_> = sockets.iter().map(|(n, fd)| {
                    use std::os::fd::AsFd;
                    (n.as_str(), fd.as_fd())
                }).collect();
                // A signal to stop wins over an upgrade in progress (which
                // then stops the new process).
                let outcome = tokio::select! {
                    r = upgrader.hand_over(&fds, held_certificates(&tls, &workloads)) => r,
                    _ = sigterm.recv() => { tracing::info!("SIGTERM during upgrade: draining"); break Stop::Signal; }
                    _ = sigint.recv() => { tracing::info!("SIGINT during upgrade: draining"); break Stop::Signal; }
                };
                match outcome {
                    Ok(pid) => {
                        tracing::info!(pid, "upgrade: the new process serves; draining");
                        break Stop::Upgraded;
                    }
                    Err(e) => tracing::error!("upgrade failed, still serving: {}", weft_channel::error_chain(&e)),
                }
            }
        }
    };
    ready.store(false, Ordering::Release);
    // Stopping, the sockets must close when the accept loops stop: a copy
    // kept open would let the kernel queue connections nobody accepts.
    drop(sockets);
    match stop {
        Stop::Signal => {
            // Leave discovery first, so peers stop choosing this instance
            // while it drains.
            deregister.cancel();
            if let Some(task) = registered {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
            }
        }
        Stop::Upgraded => {
            // The new process answers the admin port from now on, and keeps
            // the registration (revoking the lease here could delete the
            // entry it re-attached to its own).
            admin_shutdown.cancel();
            drop(registered);
        }
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
