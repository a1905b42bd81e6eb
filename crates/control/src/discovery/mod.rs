//! Service discovery: several backends, one answer per authority.
//!
//! Every backend answers "what are the endpoints of `host:port`" as a
//! watch, and says [`Resolution::Unknown`] for names it does not know.
//! [`Discovery`] asks its backends in order and the first that knows a name
//! wins, so a file entry can override etcd, and DNS only answers for names
//! nobody else knows; Kubernetes (Services and EndpointSlices) is one more.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use weft_detect::Authority;
use weft_identity::Name;

pub mod dns;
pub mod etcd;
pub mod file;
pub mod kubernetes;

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    /// The name the endpoint's proxy proves; `None` for an unmeshed endpoint.
    pub identity: Option<Name>,
}

/// What a backend knows about a service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub endpoints: BTreeMap<SocketAddr, Endpoint>,
    pub opaque: bool,
    /// Routes, timeouts, retries, breaker: the file's, or the defaults for
    /// backends that only know endpoints.
    pub policy: weft_destinations::Policy,
    /// The service's name, when it was found by one of its own addresses
    /// (a virtual IP): a client that asked by address is told the name.
    /// `None` when it was asked for by name, or when the address is one
    /// endpoint's (a pod), which has no service of its own.
    pub name: Option<Authority>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The backend is still finding out (a DNS lookup in flight): lower
    /// priority backends must not answer for it yet.
    Pending,
    /// The backend has never heard of this name.
    Unknown,
    /// The service exists; it may have no endpoints right now.
    Known(Arc<Service>),
}

/// A discovery source.
pub trait Backend: Send + Sync + 'static {
    /// Shown in logs and `weft endpoints`.
    fn name(&self) -> &'static str;
    /// Follows one authority. The receiver's first value is the backend's
    /// current answer.
    fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution>;
}

/// What a name several backends know means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overlap {
    /// The first backend that knows it answers alone.
    #[default]
    Shadow,
    /// Every backend that knows it contributes endpoints (the first one's
    /// policy and protocol; an address listed twice is the first one's):
    /// a Kubernetes Service and the hosts behind etcd as one service.
    Merge,
}

/// Every backend, in priority order.
#[derive(Clone)]
pub struct Discovery {
    backends: Arc<[Arc<dyn Backend>]>,
    overlap: Overlap,
}

impl Discovery {
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Self {
        Self::with_overlap(backends, Overlap::Shadow)
    }

    pub fn with_overlap(backends: Vec<Arc<dyn Backend>>, overlap: Overlap) -> Self {
        Self {
            backends: backends.into(),
            overlap,
        }
    }

    pub fn watch(&self, authority: &Authority) -> Watch {
        Watch {
            backends: self.backends.clone(),
            authority: authority.clone(),
            sources: self.backends.iter().map(|_| None).collect(),
            overlap: self.overlap,
        }
    }
}

/// Every endpoint a backend knows, by address, so that an `IP:port`
/// authority (a redirected connection's original destination) is answered
/// with the endpoint that owns it: its identity, so the proxy uses mutual
/// TLS, and its protocol; and every service address (a virtual IP), which
/// is answered with the service: its endpoints and policy. Built once per
/// snapshot.
#[derive(Debug, Default)]
pub struct AddressIndex(HashMap<SocketAddr, Arc<Service>>);

impl AddressIndex {
    /// From `(service, endpoints, opaque)`; an address two services share
    /// is answered as the first (in authority order) lists it.
    pub fn build<'a>(
        services: impl IntoIterator<Item = (&'a Authority, &'a BTreeMap<SocketAddr, Endpoint>, bool)>,
    ) -> Self {
        let mut services: Vec<_> = services.into_iter().collect();
        services.sort_by_cached_key(|s| s.0.to_string());
        let mut index = HashMap::new();
        for (_, endpoints, opaque) in services {
            for (addr, e) in endpoints {
                index.entry(*addr).or_insert_with(|| {
                    Arc::new(Service {
                        endpoints: BTreeMap::from([(*addr, e.clone())]),
                        opaque,
                        policy: Default::default(),
                        name: None,
                    })
                });
            }
        }
        Self(index)
    }

    /// `addr` is the own address (a virtual IP) of the service `name`: it
    /// answers with the whole service and its name, ahead of an endpoint at
    /// the same address.
    pub fn insert_service(&mut self, addr: SocketAddr, name: &Authority, service: &Service) {
        let service = Service {
            name: Some(name.clone()),
            ..service.clone()
        };
        self.0.insert(addr, Arc::new(service));
    }

    /// The endpoint `authority` names, if it is an `IP:port` in the index.
    pub fn resolve(&self, authority: &Authority) -> Resolution {
        let Some(addr) = authority.socket_addr() else {
            return Resolution::Unknown;
        };
        match self.0.get(&addr) {
            Some(service) => Resolution::Known(service.clone()),
            None => Resolution::Unknown,
        }
    }
}

/// One authority followed across the backends. A backend is asked only
/// while every backend before it says `Unknown`, so lower ones (DNS, which
/// polls) do no work for names a higher one answers.
pub struct Watch {
    backends: Arc<[Arc<dyn Backend>]>,
    authority: Authority,
    sources: Vec<Option<watch::Receiver<Resolution>>>,
    overlap: Overlap,
}

impl Watch {
    /// The first backend's answer that knows the name (merged with the
    /// later ones' under [`Overlap::Merge`]), and which backend gave it;
    /// `Pending` while a backend before it is still finding out.
    pub fn current(&mut self) -> (Option<&'static str>, Resolution) {
        let mut answer = (None, Resolution::Unknown);
        for (backend, source) in self.backends.iter().zip(self.sources.iter_mut()) {
            let settled = match answer.1 {
                Resolution::Unknown => false,
                // Nothing after a backend still finding out may answer
                // before it does.
                Resolution::Pending => true,
                Resolution::Known(_) => self.overlap == Overlap::Shadow,
            };
            if settled {
                // Dropping the receiver tells the backend nobody here
                // needs the name any more.
                *source = None;
                continue;
            }
            let rx = source.get_or_insert_with(|| backend.watch(&self.authority));
            let r = rx.borrow_and_update().clone();
            match (&mut answer.1, r) {
                (_, Resolution::Unknown) => {}
                // A later backend still finding out does not hold back
                // what an earlier one knows.
                (Resolution::Known(_), Resolution::Pending) => {}
                (Resolution::Known(first), Resolution::Known(more)) => {
                    let merged = Arc::make_mut(first);
                    for (addr, e) in &more.endpoints {
                        merged.endpoints.entry(*addr).or_insert_with(|| e.clone());
                    }
                }
                (_, r) => answer = (Some(backend.name()), r),
            }
        }
        answer
    }

    /// Waits until the answer of any backend asked changes. Returns false
    /// when they have all gone away (the control plane is shutting down).
    pub async fn changed(&mut self) -> bool {
        let mut live = self.sources.iter_mut().flatten();
        let (first, second) = (live.next(), live.next());
        match (first, second) {
            (None, _) => std::future::pending().await,
            // The usual case, a name one backend answers: waited on in
            // place, with nothing allocated per wait (a hundred thousand
            // streams wait here).
            (Some(rx), None) => rx.changed().await.is_ok(),
            (Some(a), Some(b)) => {
                let mut futures = vec![Box::pin(a.changed()), Box::pin(b.changed())];
                futures.extend(live.map(|rx| Box::pin(rx.changed())));
                let (result, _, _) = futures_util::future::select_all(futures).await;
                result.is_ok()
            }
        }
    }
}

/// The shared bookkeeping of a backend: one watch channel per authority
/// anyone follows, so a thousand streams for one service cost one channel.
///
/// Lock order: a backend must never call into `Watches` while holding a
/// lock of its own, because `subscribe` computes a new channel's first
/// value (which reads the backend's state) under the channel map's lock.
/// Backends keep their state as immutable snapshots, published by swapping
/// a pointer before `update`/`update_all` is called.
#[derive(Default)]
pub struct Watches {
    senders: Mutex<HashMap<Authority, watch::Sender<Resolution>>>,
}

impl Watches {
    /// Subscribes to `authority`, creating its channel with `initial` if
    /// nobody follows it yet.
    pub fn subscribe(
        &self,
        authority: &Authority,
        initial: impl FnOnce() -> Resolution,
    ) -> watch::Receiver<Resolution> {
        let mut senders = self.lock();
        if let Some(tx) = senders.get(authority) {
            return tx.subscribe();
        }
        // Channels nobody follows any more are dropped here, when the map
        // would grow, rather than on a timer.
        senders.retain(|_, tx| tx.receiver_count() > 0);
        let (tx, rx) = watch::channel(initial());
        senders.insert(authority.clone(), tx);
        rx
    }

    /// Publishes `resolve(authority)` to every followed authority, notifying
    /// only those whose answer changed.
    pub fn update_all(&self, mut resolve: impl FnMut(&Authority) -> Resolution) {
        for (authority, tx) in self.lock().iter() {
            let next = resolve(authority);
            tx.send_if_modified(|cur| {
                if *cur == next {
                    false
                } else {
                    *cur = next;
                    true
                }
            });
        }
    }

    /// Publishes `next` for one authority; false when nobody follows it.
    pub fn update(&self, authority: &Authority, next: Resolution) -> bool {
        let senders = self.lock();
        let Some(tx) = senders.get(authority) else {
            return false;
        };
        tx.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
        tx.receiver_count() > 0
    }

    pub fn is_followed(&self, authority: &Authority) -> bool {
        self.lock()
            .get(authority)
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Authority, watch::Sender<Resolution>>> {
        match self.senders.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose answers the test sets, counting who follows.
    #[derive(Default)]
    struct Scripted {
        watches: Watches,
        answer: Mutex<HashMap<Authority, Resolution>>,
    }

    impl Scripted {
        fn set(&self, a: &Authority, r: Resolution) {
            if let Ok(mut m) = self.answer.lock() {
                m.insert(a.clone(), r.clone());
            }
            self.watches.update(a, r);
        }
    }

    impl Backend for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution> {
            let initial = self
                .answer
                .lock()
                .ok()
                .and_then(|m| m.get(authority).cloned())
                .unwrap_or(Resolution::Unknown);
            self.watches.subscribe(authority, || initial)
        }
    }

    fn known() -> Resolution {
        Resolution::Known(Arc::new(Service::default()))
    }

    #[test]
    fn an_address_finds_the_endpoint_that_owns_it() {
        let api: Authority = "api.demo:8080".parse().expect("authority");
        let addr: SocketAddr = "10.0.0.5:8080".parse().expect("addr");
        let endpoint = Endpoint {
            addr,
            weight: NonZeroU32::MIN,
            identity: Some("api.demo".parse().expect("name")),
        };
        let eps = BTreeMap::from([(addr, endpoint.clone())]);
        let index = AddressIndex::build([(&api, &eps, true)]);
        let Resolution::Known(s) = index.resolve(&"10.0.0.5:8080".parse().expect("authority"))
        else {
            panic!("not found");
        };
        assert_eq!(s.endpoints.values().collect::<Vec<_>>(), [&endpoint]);
        assert!(s.opaque);
        for other in ["10.0.0.5:9090", "10.0.0.6:8080", "api.demo:8080"] {
            assert_eq!(
                index.resolve(&other.parse().expect("authority")),
                Resolution::Unknown,
                "{other}"
            );
        }
    }

    #[tokio::test]
    async fn lower_backends_are_asked_only_for_names_the_higher_ones_do_not_know() {
        let high = Arc::new(Scripted::default());
        let low = Arc::new(Scripted::default());
        let discovery = Discovery::new(vec![high.clone(), low.clone()]);
        let a: Authority = "api.demo:8080".parse().expect("authority");
        high.set(&a, known());

        let mut w = discovery.watch(&a);
        assert_eq!(w.current().1, known());
        assert!(
            !low.watches.is_followed(&a),
            "DNS-like backend asked anyway"
        );

        // The name leaves the file: the next backend is asked now.
        high.set(&a, Resolution::Unknown);
        assert!(w.changed().await);
        assert_eq!(w.current().1, Resolution::Unknown);
        assert!(low.watches.is_followed(&a));

        // Back in the file: the lower backend is let go again.
        high.set(&a, known());
        assert!(w.changed().await);
        assert_eq!(w.current(), (Some("scripted"), known()));
        assert!(!low.watches.is_followed(&a));
    }

    fn with_endpoint(addr: &str, identity: Option<&str>) -> Resolution {
        let addr: SocketAddr = addr.parse().expect("addr");
        Resolution::Known(Arc::new(Service {
            endpoints: BTreeMap::from([(
                addr,
                Endpoint {
                    addr,
                    weight: NonZeroU32::MIN,
                    identity: identity.map(|i| i.parse().expect("name")),
                },
            )]),
            ..Default::default()
        }))
    }

    #[tokio::test]
    async fn merged_names_take_endpoints_from_every_backend_that_knows_them() {
        let kubernetes = Arc::new(Scripted::default());
        let etcd = Arc::new(Scripted::default());
        let a: Authority = "api.demo:80".parse().expect("authority");
        kubernetes.set(&a, with_endpoint("10.0.0.1:8080", Some("api.demo")));
        etcd.set(&a, with_endpoint("192.168.1.5:8080", None));
        let endpoints = |r: Resolution| match r {
            Resolution::Known(s) => s
                .endpoints
                .keys()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };

        // Shadowed: the first backend alone.
        let shadow = Discovery::new(vec![kubernetes.clone(), etcd.clone()]);
        assert_eq!(endpoints(shadow.watch(&a).current().1), ["10.0.0.1:8080"]);

        // Merged: both, and a change in either reaches the stream.
        let merge = Discovery::with_overlap(vec![kubernetes.clone(), etcd.clone()], Overlap::Merge);
        let mut w = merge.watch(&a);
        assert_eq!(
            endpoints(w.current().1),
            ["10.0.0.1:8080", "192.168.1.5:8080"]
        );
        etcd.set(&a, with_endpoint("192.168.1.6:8080", None));
        assert!(w.changed().await);
        assert_eq!(
            endpoints(w.current().1),
            ["10.0.0.1:8080", "192.168.1.6:8080"]
        );
        kubernetes.set(&a, Resolution::Unknown);
        assert!(w.changed().await);
        assert_eq!(endpoints(w.current().1), ["192.168.1.6:8080"]);
    }
}
