//! `io.linkerd.proxy.destination.Destination`: endpoint and profile streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use linkerd2_proxy_api::destination::{
    self as api, AddrSet, DestinationProfile, GetDestination, NoEndpoints, ProtocolHint,
    RetryBudget, TlsIdentity, Update, WeightedAddr, WeightedAddrSet,
    destination_server::Destination, protocol_hint, tls_identity, update,
};
use std::collections::VecDeque;
use std::sync::Arc;

use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::{Request, Response, Status};
use weft_channel::codec::Lean;
use weft_detect::Authority;

use crate::clients::{ClientSlot, Clients};
use crate::discovery::{Discovery, Endpoint, Resolution, Watch};
use crate::metrics::{Metrics, OpenStream};

pub struct DestinationService {
    discovery: Discovery,
    metrics: Metrics,
    clients: Arc<Clients>,
}

impl DestinationService {
    /// `max_per_client` bounds the streams (followed names) one client
    /// holds open at once.
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

/// The Destination service as tonic serves it, but with
/// [`weft_channel::codec::Lean`] buffers: the generated server gives each
/// stream an 8 KiB encode buffer for its whole life, most of what an idle
/// `Get` stream costs.
#[derive(Clone)]
pub struct DestinationServer(Arc<DestinationService>);

impl DestinationServer {
    pub fn new(service: DestinationService) -> Self {
        Self(Arc::new(service))
    }
}

impl tonic::server::NamedService for DestinationServer {
    const NAME: &'static str = api::destination_server::SERVICE_NAME;
}

const GET: &str = "/io.linkerd.proxy.destination.Destination/Get";
const GET_PROFILE: &str = "/io.linkerd.proxy.destination.Destination/GetProfile";

struct GetSvc(Arc<DestinationService>);

impl tonic::server::ServerStreamingService<GetDestination> for GetSvc {
    type Response = Update;
    type ResponseStream = UpdateStream;
    type Future = BoxFuture<Response<UpdateStream>, Status>;

    fn call(&mut self, request: Request<GetDestination>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.get(request).await })
    }
}

struct GetProfileSvc(Arc<DestinationService>);

impl tonic::server::ServerStreamingService<GetDestination> for GetProfileSvc {
    type Response = DestinationProfile;
    type ResponseStream = ProfileStream;
    type Future = BoxFuture<Response<ProfileStream>, Status>;

    fn call(&mut self, request: Request<GetDestination>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.get_profile(request).await })
    }
}

impl<B> Service<http::Request<B>> for DestinationServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.0.clone();
        match req.uri().path() {
            GET => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(Lean::default());
                Ok(grpc.server_streaming(GetSvc(inner), req).await)
            }),
            GET_PROFILE => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(Lean::default());
                Ok(grpc.server_streaming(GetProfileSvc(inner), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;
type ProfileStream = Pin<Box<dyn Stream<Item = Result<DestinationProfile, Status>> + Send>>;

fn parse_path(dst: &GetDestination) -> Result<Authority, Status> {
    dst.path.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "path {:?} must be host:port, such as web.demo:8080",
            dst.path
        ))
    })
}

#[tonic::async_trait]
impl Destination for DestinationService {
    type GetStream = UpdateStream;
    type GetProfileStream = ProfileStream;

    async fn get(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let authority = parse_path(request.get_ref())?;
        let slot = self.clients.acquire_for(&request)?;
        let watch = self.discovery.watch(&authority);
        Ok(Response::new(Box::pin(updates(
            authority,
            watch,
            self.metrics.clone(),
            slot,
        ))))
    }

    async fn get_profile(
        &self,
        request: Request<GetDestination>,
    ) -> Result<Response<Self::GetProfileStream>, Status> {
        let authority = parse_path(request.get_ref())?;
        let slot = self.clients.acquire_for(&request)?;
        let watch = self.discovery.watch(&authority);
        Ok(Response::new(Box::pin(profiles(
            authority,
            watch,
            self.metrics.clone(),
            slot,
        ))))
    }
}

/// One `Get` stream. No task and no channel per stream: the stream itself
/// waits on discovery when polled, so an idle stream costs only its state
/// (a hundred thousand streams are a common fan-out).
fn updates(
    authority: Authority,
    watch: Watch,
    metrics: Metrics,
    slot: ClientSlot,
) -> impl Stream<Item = Result<Update, Status>> + Send {
    struct State {
        authority: Authority,
        watch: Watch,
        diff: Diff,
        queue: VecDeque<Update>,
        started: bool,
        metrics: Metrics,
        _open: OpenStream,
        _slot: ClientSlot,
    }
    let state = State {
        _open: metrics.stream_opened("get"),
        _slot: slot,
        authority,
        watch,
        diff: Diff::default(),
        queue: VecDeque::new(),
        started: false,
        metrics,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(update) = s.queue.pop_front() {
                tracing::debug!(authority = %s.authority, ?update, "destination update");
                s.metrics.update_sent("get");
                return Some((Ok(update), s));
            }
            if s.started && !s.watch.changed().await {
                return None;
            }
            s.started = true;
            let (_, resolution) = s.watch.current();
            s.queue.extend(s.diff.next(&resolution));
        }
    })
}

/// One `GetProfile` stream: a profile whenever it changes.
fn profiles(
    authority: Authority,
    watch: Watch,
    metrics: Metrics,
    slot: ClientSlot,
) -> impl Stream<Item = Result<DestinationProfile, Status>> + Send {
    struct State {
        authority: Authority,
        watch: Watch,
        last: Option<DestinationProfile>,
        started: bool,
        metrics: Metrics,
        _open: OpenStream,
        _slot: ClientSlot,
    }
    let state = State {
        _open: metrics.stream_opened("get_profile"),
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
            let next = profile(&s.authority, &resolution);
            if s.last.as_ref() != Some(&next) {
                s.last = Some(next.clone());
                s.metrics.update_sent("get_profile");
                return Some((Ok(next), s));
            }
        }
    })
}

/// The default retry budget: retries may add 20 % load, at least 10 per
/// second, counted over 10 s, as Linkerd's defaults.
fn retry_budget() -> RetryBudget {
    RetryBudget {
        retry_ratio: 0.2,
        min_retries_per_second: 10,
        ttl: Some(prost_types::Duration {
            seconds: Duration::from_secs(10).as_secs() as i64,
            nanos: 0,
        }),
    }
}

fn profile(authority: &Authority, resolution: &Resolution) -> DestinationProfile {
    match resolution {
        // An unknown name has no fully qualified name, as the API asks.
        Resolution::Pending | Resolution::Unknown => DestinationProfile {
            retry_budget: Some(retry_budget()),
            ..Default::default()
        },
        // Asked by address, the name is the service's whose address it is;
        // an endpoint's own address has none.
        Resolution::Known(service) => DestinationProfile {
            fully_qualified_name: match (&service.name, authority.socket_addr()) {
                (Some(name), _) => name.bare_host().to_string(),
                (None, Some(_)) => String::new(),
                (None, None) => authority.bare_host().to_string(),
            },
            opaque_protocol: service.opaque,
            retry_budget: Some(retry_budget()),
            ..Default::default()
        },
    }
}

/// What one `Get` stream has told its client, and so what to tell it next.
#[derive(Default)]
pub(crate) struct Diff {
    /// `None` until the first message: every stream starts with one. The
    /// answer it was built from, shared with discovery and every other
    /// stream of the name, never a copy of it.
    sent: Option<Resolution>,
}

/// Whether the name exists, and its endpoints.
fn endpoints_of(resolution: &Resolution) -> (bool, &BTreeMap<SocketAddr, Endpoint>) {
    static NONE: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    match resolution {
        Resolution::Pending | Resolution::Unknown => (false, &NONE),
        Resolution::Known(s) => (true, &s.endpoints),
    }
}

impl Diff {
    /// The messages that bring the client from what it was told to
    /// `resolution`. The first call always yields at least one message.
    pub(crate) fn next(&mut self, resolution: &Resolution) -> Vec<Update> {
        // Nothing to say until discovery has an answer.
        if *resolution == Resolution::Pending {
            return Vec::new();
        }
        let (known, next) = endpoints_of(resolution);
        let mut out = Vec::new();
        match &self.sent {
            None if next.is_empty() => out.push(no_endpoints(known)),
            None => out.push(add(next.values())),
            Some(sent) => {
                let (was_known, prev) = endpoints_of(sent);
                let removed: Vec<_> = prev
                    .keys()
                    .filter(|a| !next.contains_key(a))
                    .map(|a| (*a).into())
                    .collect();
                if !removed.is_empty() {
                    out.push(Update {
                        update: Some(update::Update::Remove(AddrSet { addrs: removed })),
                    });
                }
                let changed: Vec<&Endpoint> = next
                    .values()
                    .filter(|e| prev.get(&e.addr) != Some(e))
                    .collect();
                if !changed.is_empty() {
                    out.push(add(changed.into_iter()));
                }
                // The service came or went: say so, so a client can fall
                // back to DNS (or stop doing so).
                if next.is_empty() && (was_known != known || !prev.is_empty()) {
                    out.push(no_endpoints(known));
                }
            }
        }
        self.sent = Some(resolution.clone());
        out
    }
}

fn no_endpoints(exists: bool) -> Update {
    Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    }
}

fn add<'a>(endpoints: impl Iterator<Item = &'a Endpoint>) -> Update {
    Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs: endpoints.map(weighted_addr).collect(),
            metric_labels: Default::default(),
        })),
    }
}

pub(crate) fn weighted_addr(e: &Endpoint) -> WeightedAddr {
    let tls_identity = e.identity.as_ref().map(|name| TlsIdentity {
        server_name: Some(tls_identity::DnsLikeIdentity {
            name: name.to_string(),
        }),
        strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
            tls_identity::DnsLikeIdentity {
                name: name.to_string(),
            },
        )),
    });
    // A meshed endpoint is a proxy, whose inbound side accepts HTTP/2
    // (HTTP/1 carried with `l5d-orig-proto`) whatever the application
    // speaks.
    let protocol_hint = match weft_destinations::ProtocolHint::of_identity(e.identity.as_ref()) {
        weft_destinations::ProtocolHint::Http2 => Some(ProtocolHint {
            protocol: Some(protocol_hint::Protocol::H2(protocol_hint::H2 {})),
            opaque_transport: None,
        }),
        weft_destinations::ProtocolHint::Unknown => None,
    };
    WeightedAddr {
        addr: Some(e.addr.into()),
        weight: e.weight.get(),
        tls_identity,
        protocol_hint,
        ..Default::default()
    }
}

/// The endpoint set a sequence of updates describes: what a client builds.
/// Used by tests and `weft endpoints`.
pub fn apply_update(
    state: &mut BTreeMap<SocketAddr, WeightedAddr>,
    update: &Update,
) -> Option<bool> {
    match update.update.as_ref()? {
        update::Update::Add(set) => {
            for a in &set.addrs {
                if let Some(addr) = a.addr.and_then(|t| SocketAddr::try_from(t).ok()) {
                    state.insert(addr, a.clone());
                }
            }
            None
        }
        update::Update::Remove(set) => {
            for a in &set.addrs {
                if let Ok(addr) = SocketAddr::try_from(*a) {
                    state.remove(&addr);
                }
            }
            None
        }
        update::Update::NoEndpoints(api::NoEndpoints { exists }) => {
            state.clear();
            Some(*exists)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::Arc;

    use super::*;
    use crate::discovery::Service;

    fn ep(port: u16, weight: u32) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: NonZeroU32::new(weight).expect("nonzero"),
            identity: Some("web.demo".parse().expect("name")),
        }
    }

    fn known(eps: &[Endpoint]) -> Resolution {
        Resolution::Known(Arc::new(Service {
            endpoints: eps.iter().map(|e| (e.addr, e.clone())).collect(),
            opaque: false,
            policy: Default::default(),
            name: None,
        }))
    }

    fn kinds(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u.update.as_ref().expect("set") {
                update::Update::Add(s) => format!("add{}", s.addrs.len()),
                update::Update::Remove(s) => format!("remove{}", s.addrs.len()),
                update::Update::NoEndpoints(n) => format!("none:{}", n.exists),
            })
            .collect()
    }

    #[test]
    fn first_message_always_says_something() {
        assert_eq!(
            kinds(&Diff::default().next(&Resolution::Unknown)),
            ["none:false"]
        );
        assert_eq!(kinds(&Diff::default().next(&known(&[]))), ["none:true"]);
        assert_eq!(
            kinds(&Diff::default().next(&known(&[ep(1, 1), ep(2, 1)]))),
            ["add2"]
        );
    }

    #[test]
    fn changes_are_sent_as_differences() {
        let mut d = Diff::default();
        d.next(&known(&[ep(1, 1), ep(2, 1)]));
        assert!(d.next(&known(&[ep(1, 1), ep(2, 1)])).is_empty());
        assert_eq!(
            kinds(&d.next(&known(&[ep(1, 1), ep(2, 3), ep(3, 1)]))),
            ["add2"]
        );
        assert_eq!(kinds(&d.next(&known(&[ep(3, 1)]))), ["remove2"]);
        assert_eq!(kinds(&d.next(&known(&[]))), ["remove1", "none:true"]);
        assert_eq!(kinds(&d.next(&Resolution::Unknown)), ["none:false"]);
        assert_eq!(kinds(&d.next(&known(&[ep(4, 1)]))), ["add1"]);
    }

    #[test]
    fn a_client_rebuilds_the_same_set() {
        let mut d = Diff::default();
        let mut state = BTreeMap::new();
        for r in [
            known(&[ep(1, 1), ep(2, 1)]),
            known(&[ep(2, 5), ep(3, 1)]),
            known(&[ep(3, 1)]),
        ] {
            for u in d.next(&r) {
                apply_update(&mut state, &u);
            }
            let Resolution::Known(s) = &r else { continue };
            let got: Vec<(SocketAddr, u32)> = state.iter().map(|(a, w)| (*a, w.weight)).collect();
            let want: Vec<(SocketAddr, u32)> = s
                .endpoints
                .values()
                .map(|e| (e.addr, e.weight.get()))
                .collect();
            assert_eq!(got, want);
        }
        let w = state.values().next().expect("one");
        let id = w.tls_identity.as_ref().and_then(|t| t.server_name.as_ref());
        assert_eq!(id.map(|n| n.name.as_str()), Some("web.demo"));
    }
}
