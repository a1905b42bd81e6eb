//! `io.linkerd.proxy.outbound.OutboundPolicies`: each destination's routes,
//! backends, timeouts, retries and failure accrual, from the same
//! discovery answer its endpoints come from.
//!
//! A name no backend knows gets the default policy (one route to itself,
//! the default breaker) rather than an error, and its stream stays open:
//! if the name appears later, its policy follows.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use linkerd2_proxy_api::outbound::traffic_spec::Target;
use tonic::{Request, Response, Status};
use weft_destinations::Policy;
use weft_detect::Authority;
use weft_policy_api::server::OutboundPolicies;
use weft_policy_api::wire::{OutboundPolicy, TrafficSpec};

use linkerd2_proxy_api::destination::WeightedAddr;

use crate::clients::{ClientSlot, Clients};
use crate::destination::weighted_addr;
use crate::discovery::{Discovery, Resolution, Watch};
use crate::metrics::{Metrics, OpenStream};

/// How long `Get` waits for a backend still finding out (a DNS lookup).
const GET_PENDING: Duration = Duration::from_secs(5);

pub struct OutboundPolicyService {
    discovery: Discovery,
    metrics: Metrics,
    clients: Arc<Clients>,
}

impl OutboundPolicyService {
    /// `max_per_client` bounds the policy streams one client holds open.
    pub fn new(
        discovery: Discovery,
        metrics: Metrics,
        limits: crate::clients::ClientLimits,
    ) -> Self {
        Self {
            discovery,
            metrics,
            clients: Clients::new(limits),
        }
    }
}

fn authority(spec: &TrafficSpec) -> Result<Authority, Status> {
    match &spec.target {
        Some(Target::Authority(a)) => a.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "authority {a:?} must be host:port, such as web.demo:8080"
            ))
        }),
        Some(Target::Addr(addr)) => std::net::SocketAddr::try_from(*addr)
            .map(Authority::from_socket_addr)
            .map_err(|_| Status::invalid_argument("the target address is not an IP address")),
        None => Err(Status::invalid_argument("the traffic spec names no target")),
    }
}

/// The policy a client asking for `authority` gets. Asked by address, a
/// service's own address (a virtual IP) answers with the service's policy
/// under its name, since backends are discovered by name (linkerd2-proxy
/// panics on an address there); any other address (a pod's, or one
/// nobody knows) is forwarded to as it is, meshed if discovery knows its
/// endpoint's identity.
fn policy(authority: &Authority, resolution: &Resolution) -> OutboundPolicy {
    let service = match resolution {
        Resolution::Known(s) => Some(s),
        Resolution::Pending | Resolution::Unknown => None,
    };
    let Some(addr) = authority.socket_addr() else {
        return match service {
            Some(s) => weft_policy_api::encode(authority, &s.policy, s.opaque),
            None => weft_policy_api::encode(authority, &Policy::default(), false),
        };
    };
    match service {
        Some(s) => match &s.name {
            Some(name) => weft_policy_api::encode(name, &s.policy, s.opaque),
            None => {
                let endpoint = s.endpoints.get(&addr).map(weighted_addr);
                weft_policy_api::encode_forward(
                    endpoint.unwrap_or_else(|| unknown_addr(addr)),
                    s.opaque,
                )
            }
        },
        None => weft_policy_api::encode_forward(unknown_addr(addr), false),
    }
}

fn unknown_addr(addr: std::net::SocketAddr) -> WeightedAddr {
    WeightedAddr {
        addr: Some(addr.into()),
        weight: 1,
        ..Default::default()
    }
}

type PolicyStream = Pin<Box<dyn Stream<Item = Result<OutboundPolicy, Status>> + Send>>;

#[tonic::async_trait]
impl OutboundPolicies for OutboundPolicyService {
    type WatchStream = PolicyStream;

    async fn get(&self, request: Request<TrafficSpec>) -> Result<Response<OutboundPolicy>, Status> {
        let authority = authority(request.get_ref())?;
        let mut watch = self.discovery.watch(&authority);
        let deadline = tokio::time::Instant::now() + GET_PENDING;
        loop {
            let (_, resolution) = watch.current();
            if resolution != Resolution::Pending {
                self.metrics.update_sent("get_policy");
                return Ok(Response::new(policy(&authority, &resolution)));
            }
            match tokio::time::timeout_at(deadline, watch.changed()).await {
                Ok(true) => {}
                Ok(false) => return Err(Status::unavailable("the control plane is stopping")),
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "discovery of {authority} did not answer within {GET_PENDING:?}"
                    )));
                }
            }
        }
    }

    async fn watch(
        &self,
        request: Request<TrafficSpec>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let authority = authority(request.get_ref())?;
        let slot = self.clients.acquire_for(&request)?;
        let watch = self.discovery.watch(&authority);
        Ok(Response::new(Box::pin(policies(
            authority,
            watch,
            self.metrics.clone(),
            slot,
        ))))
    }
}

/// One `Watch` stream: the policy whenever it changes. Like `Get`
/// streams, it holds no task of its own.
fn policies(
    authority: Authority,
    watch: Watch,
    metrics: Metrics,
    slot: ClientSlot,
) -> impl Stream<Item = Result<OutboundPolicy, Status>> + Send {
    struct State {
        authority: Authority,
        watch: Watch,
        last: Option<OutboundPolicy>,
        started: bool,
        metrics: Metrics,
        _open: OpenStream,
        _slot: ClientSlot,
    }
    let state = State {
        _open: metrics.stream_opened("watch_policy"),
        _slot: slot,
        authority,
        watch,
        last: None,
        started: false,
        metrics,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.started && !s.watch.changed().await {
                return None;
            }
            s.started = true;
            let (_, resolution) = s.watch.current();
            if resolution == Resolution::Pending {
                continue;
            }
            let next = policy(&s.authority, &resolution);
            if s.last.as_ref() != Some(&next) {
                tracing::debug!(authority = %s.authority, "outbound policy update");
                s.last = Some(next.clone());
                s.metrics.update_sent("watch_policy");
                return Some((Ok(next), s));
            }
        }
    })
}
