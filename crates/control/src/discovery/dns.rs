//! DNS as the last discovery backend: A/AAAA for `host:port`, and SRV for
//! names that start with `_` (`_grpc._tcp.api.demo:80`: the records give
//! the ports). Names are looked up while someone follows them, every
//! refresh period; a failed lookup keeps the last answer, and a name that
//! does not exist is `Unknown`, so proxies fall back to their own DNS.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::watch;
use weft_detect::Authority;

use super::{Backend, Endpoint, Resolution, Service, Watches};

/// Lookups in flight at once, at most: each holds sockets (A and AAAA,
/// UDP then TCP: up to six while a server does not answer), and a flood
/// of followed names once drove the control plane to its fd limit.
const MAX_LOOKUPS: usize = 16;
/// A whole lookup (an SRV name and each of its targets) within this.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);

pub struct DnsBackend {
    resolver: TokioResolver,
    lookups: tokio::sync::Semaphore,
    refresh: Duration,
    watches: Watches,
    polling: Mutex<HashSet<Authority>>,
    this: Weak<DnsBackend>,
}

#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct DnsError(String);

impl DnsBackend {
    /// Uses the system's resolver configuration, or `server` (for tests and
    /// private zones) when given.
    pub fn new(server: Option<SocketAddr>, refresh: Duration) -> Result<Arc<Self>, DnsError> {
        let builder = match server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => Resolver::builder_tokio().map_err(|e| DnsError(e.to_string()))?,
        };
        let mut builder = builder;
        // A stream's first answer waits on this lookup: fail fast.
        builder.options_mut().timeout = Duration::from_secs(2);
        builder.options_mut().attempts = 1;
        let resolver = builder.build().map_err(|e| DnsError(e.to_string()))?;
        Ok(Arc::new_cyclic(|this| Self {
            resolver,
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
            refresh,
            watches: Watches::default(),
            polling: Mutex::default(),
            this: this.clone(),
        }))
    }

    /// One lookup, waiting its turn among [`MAX_LOOKUPS`] and bounded by
    /// [`LOOKUP_DEADLINE`]: `None` when it failed (keep the last answer).
    async fn lookup(&self, authority: &Authority) -> Option<Resolution> {
        if authority.socket_addr().is_some() {
            return Some(Resolution::Unknown);
        }
        let Ok(_permit) = self.lookups.acquire().await else {
            return None;
        };
        match tokio::time::timeout(LOOKUP_DEADLINE, self.lookup_now(authority)).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(%authority, deadline = ?LOOKUP_DEADLINE, "DNS lookup timed out; keeping the last answer");
                None
            }
        }
    }

    async fn lookup_now(&self, authority: &Authority) -> Option<Resolution> {
        let host = authority.bare_host();
        let result: Result<Vec<(SocketAddr, u32)>, _> = if host.starts_with('_') {
            self.srv(host).await
        } else {
            self.resolver
                .lookup_ip(format!("{host}."))
                .await
                .map(|ips| {
                    ips.iter()
                        .map(|ip| (SocketAddr::new(ip, authority.port()), 1))
                        .collect()
                })
        };
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                let endpoints: BTreeMap<SocketAddr, Endpoint> = addrs
                    .into_iter()
                    .map(|(addr, weight)| {
                        let weight = NonZeroU32::new(weight).unwrap_or(NonZeroU32::MIN);
                        (
                            addr,
                            Endpoint {
                                addr,
                                weight,
                                identity: None,
                            },
                        )
                    })
                    .collect();
                Some(Resolution::Known(Arc::new(Service {
                    endpoints,
                    opaque: false,
                    policy: Default::default(),
                    name: None,
                })))
            }
            Ok(_) => Some(Resolution::Unknown),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Some(Resolution::Unknown),
            Err(e) => {
                tracing::info!(%authority, error = %e, "DNS lookup failed; keeping the last answer");
                None
            }
        }
    }

    async fn srv(
        &self,
        name: &str,
    ) -> Result<Vec<(SocketAddr, u32)>, hickory_resolver::net::NetError> {
        let records = self.resolver.srv_lookup(format!("{name}.")).await?;
        let mut out = Vec::new();
        for record in records.answers() {
            let RData::SRV(srv) = &record.data else {
                continue;
            };
            // SRV weight 0 means "no preference": the same as weight 1 here.
            let weight = u32::from(srv.weight).max(1);
            match self.resolver.lookup_ip(srv.target.clone()).await {
                Ok(ips) => out.extend(ips.iter().map(|ip| (SocketAddr::new(ip, srv.port), weight))),
                Err(e) => {
                    tracing::info!(target = %srv.target, error = %e, "SRV target did not resolve")
                }
            }
        }
        Ok(out)
    }

    /// Looks `authority` up every refresh period while anyone follows it.
    async fn poll(weak: Weak<Self>, authority: Authority) {
        let mut answered = false;
        loop {
            let Some(this) = weak.upgrade() else { return };
            match this.lookup(&authority).await {
                Some(r) => {
                    this.watches.update(&authority, r);
                    answered = true;
                }
                // With no answer ever, say so rather than keep streams
                // waiting: proxies then use their own DNS.
                None if !answered => {
                    this.watches.update(&authority, Resolution::Unknown);
                }
                None => {}
            }
            {
                // Checked under the lock a new follower takes to start a
                // poller, so a name is never left without one.
                let mut polling = match this.polling.lock() {
                    Ok(p) => p,
                    Err(p) => p.into_inner(),
                };
                if !this.watches.is_followed(&authority) {
                    polling.remove(&authority);
                    return;
                }
            }
            let refresh = this.refresh;
            drop(this);
            tokio::time::sleep(refresh).await;
        }
    }
}

impl Backend for DnsBackend {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution> {
        let rx = self.watches.subscribe(authority, || Resolution::Pending);
        let start = self
            .polling
            .lock()
            .map(|mut p| p.insert(authority.clone()))
            .unwrap_or(false);
        if start {
            tokio::spawn(Self::poll(self.this.clone(), authority.clone()));
        }
        rx
    }
}
