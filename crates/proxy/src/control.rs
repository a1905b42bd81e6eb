//! The proxy's side of the control plane: a gRPC channel, and per
//! authority the proxy routes to, one Destination `Get` stream (its
//! endpoints) and one OutboundPolicies `Watch` stream (its routes,
//! timeouts, retries and breaker).
//!
//! The control plane is never on the request path: streams update targets
//! in the background, and while the control plane is away the proxy keeps
//! the last endpoints it was told and reconnects with backoff.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{
    GetDestination, WeightedAddr, protocol_hint, tls_identity, update,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use weft_channel::{ChannelError, ClientTls, CurrentCert};
use weft_destinations::{EndpointSpec, ProtocolHint};
use weft_detect::Authority;
use weft_identity::Name;

use crate::route::{Router, Target};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The control channel (TLS 1.3, the control plane's name verified): one
/// lazily connected channel shared by every Destination stream, which
/// reconnects by itself.
#[derive(Clone, Debug)]
pub struct Control {
    pub addr: String,
    tls: ClientTls,
    channel: Channel,
    /// Who asks, for `TrafficSpec.source_workload`: this proxy's identity.
    workload: Arc<str>,
}

impl Control {
    /// `cert`, this proxy's certificate once it has one, is presented on
    /// every connection made after it is installed.
    pub fn new(
        addr: &str,
        roots: Arc<rustls::RootCertStore>,
        name: &Name,
        cert: Option<Arc<CurrentCert>>,
        workload: Option<String>,
    ) -> Result<Self, ChannelError> {
        let cert = cert.map(|c| c as Arc<dyn rustls::client::ResolvesClientCert>);
        let tls = ClientTls::new(roots, name, cert)?;
        let channel = weft_channel::lazy(addr, &tls, CONNECT_TIMEOUT)?;
        Ok(Self {
            addr: addr.to_string(),
            tls,
            channel,
            workload: workload.unwrap_or_default().into(),
        })
    }

    /// A connection of its own, made now: certificate renewal must present
    /// the certificate held now, not reuse a connection opened before the
    /// proxy had one.
    pub async fn connect_fresh(&self) -> Result<Channel, ChannelError> {
        weft_channel::connect(&self.addr, &self.tls, CONNECT_TIMEOUT).await
    }

    /// Follows `authority` until the router goes away, keeping `target`'s
    /// endpoints current. `first` fires on the first answer.
    pub(crate) async fn follow(
        self,
        authority: Authority,
        router: Weak<Router>,
        target: Arc<Target>,
        first: oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            let request = GetDestination {
                scheme: "k8s".into(),
                path: authority.to_string(),
                context_token: String::new(),
            };
            let mut client = DestinationClient::new(self.channel.clone());
            match client.get(request).await {
                Ok(rsp) => {
                    let mut stream = rsp.into_inner();
                    // A new stream starts from scratch: its first message
                    // describes the whole set.
                    let mut state: Option<BTreeMap<SocketAddr, EndpointSpec>> = None;
                    loop {
                        let update = match stream.message().await {
                            Ok(Some(u)) => u,
                            Ok(None) => {
                                tracing::info!(%authority, "destination stream ended; reconnecting");
                                break;
                            }
                            Err(status) => {
                                tracing::info!(%authority, error = %status.message(), "destination stream failed; keeping the last endpoints");
                                break;
                            }
                        };
                        backoff = BACKOFF_MIN;
                        let Some(router) = router.upgrade() else {
                            return;
                        };
                        let endpoints = state.get_or_insert_with(BTreeMap::new);
                        let known = apply(endpoints, update.update);
                        let specs: Vec<EndpointSpec> = endpoints.values().cloned().collect();
                        router.update_controlled(&target, &specs, known);
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    let Some(router) = router.upgrade() else {
                        return;
                    };
                    router.refuse_controlled(&target, status.message());
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
                Err(status) => {
                    tracing::debug!(%authority, error = %status.message(), "control plane unavailable");
                }
            }
            if router.strong_count() == 0 {
                return;
            }
            // Jitter spreads a fleet's reconnects after a control plane
            // restart.
            let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl Control {
    /// Follows the outbound policy of `authority` until the router goes
    /// away, keeping `target`'s policy current. `first` fires on the first
    /// policy (or when the control plane has no policy API).
    pub(crate) async fn follow_policy(
        self,
        authority: Authority,
        router: Weak<Router>,
        target: Arc<Target>,
        first: oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            match weft_policy_api::client::watch(self.channel.clone(), &authority, &self.workload)
                .await
            {
                Ok(mut stream) => loop {
                    let msg = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            tracing::info!(%authority, "policy stream ended; reconnecting");
                            break;
                        }
                        Err(status) => {
                            tracing::info!(%authority, error = %status.message(), "policy stream failed; keeping the last policy");
                            break;
                        }
                    };
                    backoff = BACKOFF_MIN;
                    let Some(router) = router.upgrade() else {
                        return;
                    };
                    match weft_policy_api::decode(&authority, &msg) {
                        Ok(policy) => router.update_policy(&target, policy),
                        Err(e) => {
                            tracing::warn!(%authority, error = %e, "outbound policy refused; keeping the last good one")
                        }
                    }
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                },
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    // An older control plane: endpoints only, default policy.
                    tracing::info!(%authority, "the control plane serves no outbound policies; using the defaults");
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                    return;
                }
                Err(status) => {
                    tracing::debug!(%authority, error = %status.message(), "control plane unavailable");
                }
            }
            if router.strong_count() == 0 {
                return;
            }
            let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl Control {
    /// Follows the inbound policy of `identity`'s `port` until every
    /// receiver of `tx` is gone. A policy that does not decode denies
    /// everything on the port (enforcing part of an authorization policy
    /// is not enforcing it); a failed stream keeps the last policy.
    pub(crate) async fn follow_port(
        self,
        identity: Arc<str>,
        port: u16,
        tx: tokio::sync::watch::Sender<Option<Arc<weft_authz::Server>>>,
        limit_clients: std::num::NonZeroUsize,
    ) {
        use linkerd2_proxy_api::inbound::PortSpec;
        use linkerd2_proxy_api::inbound::inbound_server_policies_client::InboundServerPoliciesClient;
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut client = InboundServerPoliciesClient::new(self.channel.clone());
            let request = PortSpec {
                workload: identity.to_string(),
                port: u32::from(port),
            };
            let stream = tokio::select! {
                _ = tx.closed() => return,
                r = client.watch_port(request) => r,
            };
            match stream {
                Ok(rsp) => {
                    let mut stream = rsp.into_inner();
                    loop {
                        let msg = tokio::select! {
                            _ = tx.closed() => return,
                            m = stream.message() => m,
                        };
                        let server = match msg {
                            Ok(Some(m)) => m,
                            Ok(None) => {
                                tracing::info!(%identity, port, "inbound policy stream ended; reconnecting");
                                break;
                            }
                            Err(status) => {
                                tracing::info!(%identity, port, error = %status.message(), "inbound policy stream failed; keeping the last policy");
                                break;
                            }
                        };
                        backoff = BACKOFF_MIN;
                        let server = match weft_policy_api::inbound::decode(server, limit_clients) {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(%identity, port, error = %e, "inbound policy refused; denying every client on the port");
                                crate::authz::deny_all(&e.server)
                            }
                        };
                        tx.send_replace(Some(Arc::new(server)));
                    }
                }
                Err(status) => {
                    tracing::debug!(%identity, port, error = %status.message(), "inbound policy unavailable");
                }
            }
            let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Applies one update; returns whether the service is known (`None` when
/// the update does not say).
fn apply(
    endpoints: &mut BTreeMap<SocketAddr, EndpointSpec>,
    update: Option<update::Update>,
) -> Option<bool> {
    match update? {
        update::Update::Add(set) => {
            for a in set.addrs {
                if let Some(spec) = spec(a) {
                    endpoints.insert(spec.addr, spec);
                }
            }
            Some(true)
        }
        update::Update::Remove(set) => {
            for a in set.addrs {
                if let Ok(addr) = SocketAddr::try_from(a) {
                    endpoints.remove(&addr);
                }
            }
            None
        }
        update::Update::NoEndpoints(n) => {
            endpoints.clear();
            Some(n.exists)
        }
    }
}

fn spec(a: WeightedAddr) -> Option<EndpointSpec> {
    let addr = SocketAddr::try_from(a.addr?).ok()?;
    let identity = a.tls_identity.and_then(|t| {
        let name = match (t.server_name, t.strategy) {
            (Some(n), _) => n.name,
            (None, Some(tls_identity::Strategy::DnsLikeIdentity(d))) => d.name,
            _ => return None,
        };
        match name.parse::<Name>() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "endpoint identity ignored");
                None
            }
        }
    });
    let hint = match a.protocol_hint.and_then(|h| h.protocol) {
        Some(protocol_hint::Protocol::H2(_)) => ProtocolHint::Http2,
        _ => ProtocolHint::Unknown,
    };
    Some(EndpointSpec {
        addr,
        hint,
        // Weight 0 would take an endpoint out of rotation without removing
        // it; the API means "unweighted".
        weight: NonZeroU32::new(a.weight).unwrap_or(NonZeroU32::MIN),
        identity,
    })
}
