//! etcd v3 as a discovery backend: instances register themselves under a
//! lease (see `weft-registry` for the key layout); this backend lists the
//! prefix once and then follows it with a watch, so a put, a delete or an
//! expired lease reaches every stream within milliseconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weft_detect::Authority;
use weft_registry::etcd::{Etcd, EtcdError, Event, EventType, KeyValue};
use weft_registry::{EndpointValue, Layout};

use super::{AddressIndex, Backend, Endpoint, Resolution, Service, Watches};

/// Every service etcd lists, each an immutable snapshot shared with the
/// streams that follow it.
type State = HashMap<Authority, Arc<BTreeMap<SocketAddr, Endpoint>>>;

pub struct EtcdBackend {
    /// Replaced whole by the one task that follows etcd, never locked:
    /// readers (new streams) and the writer cannot deadlock (see
    /// [`Watches`]).
    state: ArcSwap<State>,
    /// The state's endpoints by address, swapped right after it.
    addresses: ArcSwap<AddressIndex>,
    watches: Watches,
}

fn index(state: &State) -> AddressIndex {
    AddressIndex::build(state.iter().map(|(a, eps)| (a, &**eps, false)))
}

impl EtcdBackend {
    /// Starts following etcd at `endpoints`. An unreachable etcd is logged
    /// and retried; until it answers, it knows no names.
    pub fn start(endpoints: Vec<String>, layout: Layout) -> Arc<Self> {
        let this = Arc::new(Self::new());
        tokio::spawn(follow(Arc::downgrade(&this), endpoints, layout));
        this
    }

    fn new() -> Self {
        Self {
            state: ArcSwap::from_pointee(State::new()),
            addresses: ArcSwap::from_pointee(AddressIndex::default()),
            watches: Watches::default(),
        }
    }

    /// A fresh listing: every followed name is resolved again.
    fn replace(&self, fresh: State) {
        let state = Arc::new(fresh);
        let addresses = Arc::new(index(&state));
        self.state.store(state.clone());
        self.addresses.store(addresses.clone());
        self.watches.update_all(|a| resolve(&state, &addresses, a));
    }

    /// Applies one batch of watch events; only the names they touch are
    /// resolved again.
    fn apply(&self, layout: &Layout, events: &[Event]) {
        let mut next = State::clone(&self.state.load());
        let mut touched = HashSet::new();
        let mut addrs = HashSet::new();
        for event in events {
            let Some(kv) = &event.kv else { continue };
            match event.r#type() {
                EventType::Put => {
                    if let Some((service, endpoint)) = endpoint(layout, kv) {
                        let eps = next.entry(service.clone()).or_default();
                        addrs.insert(endpoint.addr);
                        Arc::make_mut(eps).insert(endpoint.addr, endpoint);
                        touched.insert(service);
                    }
                }
                EventType::Delete => {
                    let key = String::from_utf8_lossy(&kv.key);
                    if let Some((service, addr)) = layout.parse_key(&key)
                        && let Some(eps) = next.get_mut(&service)
                    {
                        Arc::make_mut(eps).remove(&addr);
                        addrs.insert(addr);
                        if eps.is_empty() {
                            next.remove(&service);
                        }
                        touched.insert(service);
                    }
                }
            }
        }
        let state = Arc::new(next);
        let addresses = Arc::new(index(&state));
        self.state.store(state.clone());
        self.addresses.store(addresses.clone());
        let followed = touched
            .into_iter()
            .chain(addrs.into_iter().map(Authority::from_socket_addr));
        for authority in followed {
            self.watches
                .update(&authority, resolve(&state, &addresses, &authority));
        }
    }
}

fn resolve(state: &State, addresses: &AddressIndex, authority: &Authority) -> Resolution {
    match state.get(authority) {
        Some(eps) if !eps.is_empty() => Resolution::Known(Arc::new(Service {
            endpoints: BTreeMap::clone(eps),
            opaque: false,
            policy: Default::default(),
            name: None,
        })),
        _ => addresses.resolve(authority),
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution> {
        self.watches.subscribe(authority, || {
            resolve(&self.state.load(), &self.addresses.load(), authority)
        })
    }
}

async fn follow(this: Weak<EtcdBackend>, endpoints: Vec<String>, layout: Layout) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match sync(&this, &endpoints, &layout, &mut backoff).await {
            Ok(()) => tracing::info!(?endpoints, "etcd watch ended; listing again"),
            Err(e) => {
                tracing::warn!(?endpoints, error = %e, retry_in = ?backoff, "etcd unavailable; keeping the last known endpoints")
            }
        }
        if this.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Lists the prefix, then applies watch events until the watch ends.
async fn sync(
    this: &Weak<EtcdBackend>,
    endpoints: &[String],
    layout: &Layout,
    backoff: &mut Duration,
) -> Result<(), EtcdError> {
    let mut client = Etcd::connect(endpoints).await?;
    let prefix = layout.services();
    let (revision, listed) = client.get_prefix(&prefix).await?;
    let mut fresh = State::new();
    for kv in &listed {
        if let Some((service, endpoint)) = endpoint(layout, kv) {
            Arc::make_mut(fresh.entry(service).or_default()).insert(endpoint.addr, endpoint);
        }
    }
    let Some(backend) = this.upgrade() else {
        return Ok(());
    };
    tracing::info!(services = fresh.len(), revision, "etcd listed");
    backend.replace(fresh);
    drop(backend);
    *backoff = Duration::from_millis(200);

    let mut stream = client.watch_prefix(&prefix, revision + 1).await?;
    while let Some(rsp) = stream.message().await? {
        if rsp.canceled {
            // Compacted past our revision, usually: list again.
            return Ok(());
        }
        let Some(backend) = this.upgrade() else {
            return Ok(());
        };
        backend.apply(layout, &rsp.events);
    }
    Ok(())
}

/// The endpoint an etcd key describes; a key or value that does not parse
/// is logged and skipped (never served as something it is not).
fn endpoint(layout: &Layout, kv: &KeyValue) -> Option<(Authority, Endpoint)> {
    let key = String::from_utf8_lossy(&kv.key);
    let (service, addr) = layout.parse_key(&key)?;
    let value = match EndpointValue::parse(&kv.value) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(%key, error = %e, "etcd endpoint value is not valid JSON; skipped");
            return None;
        }
    };
    let Some(weight) = NonZeroU32::new(value.weight) else {
        tracing::warn!(%key, "etcd endpoint has weight 0; skipped");
        return None;
    };
    let identity = match value.identity.map(|i| i.parse()).transpose() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(%key, error = %e, "etcd endpoint identity is invalid; skipped");
            return None;
        }
    };
    Some((
        service,
        Endpoint {
            addr,
            weight,
            identity,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn put(layout: &Layout, service: &str, ip: u8) -> Event {
        let service: Authority = service.parse().expect("authority");
        let addr = SocketAddr::from(([10, 0, 0, ip], 4143));
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: layout.endpoint_key(&service, addr).into_bytes(),
                value: b"{}".to_vec(),
                ..Default::default()
            }),
        }
    }

    /// New-name `Get`s (subscribe, which reads the state) racing etcd
    /// events (which publish it), on the runtime weft-control runs: two
    /// workers. With the old lock order this deadlocked within a few
    /// thousand iterations; now it must finish, and every follower must
    /// end up with the last answer.
    #[test]
    fn new_names_racing_etcd_events_do_not_deadlock() {
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let result = rt.block_on(async {
                let backend = Arc::new(EtcdBackend::new());
                let layout = Layout::default();
                const ROUNDS: u8 = 200;
                let writer = {
                    let backend = backend.clone();
                    let layout = layout.clone();
                    tokio::spawn(async move {
                        for round in 0..ROUNDS {
                            let events: Vec<Event> = (0..50)
                                .map(|i| put(&layout, &format!("svc{i}.demo:80"), round))
                                .collect();
                            backend.apply(&layout, &events);
                            tokio::task::yield_now().await;
                        }
                    })
                };
                let mut readers = Vec::new();
                for r in 0..2 {
                    let backend = backend.clone();
                    readers.push(tokio::spawn(async move {
                        let mut held = Vec::new();
                        for i in 0..5_000 {
                            let name: Authority = format!("svc{}.demo:80", (i * 7 + r) % 50)
                                .parse()
                                .expect("authority");
                            held.push(backend.watch(&name));
                            if held.len() > 64 {
                                held.remove(0);
                            }
                            if i % 16 == 0 {
                                tokio::task::yield_now().await;
                            }
                        }
                        held
                    }));
                }
                writer.await.expect("writer");
                let mut followers = Vec::new();
                for r in readers {
                    followers.extend(r.await.expect("reader"));
                }
                // Every follower sees the final round's endpoints.
                for rx in &followers {
                    match &*rx.borrow() {
                        Resolution::Known(s) => assert_eq!(s.endpoints.len(), ROUNDS as usize),
                        other => panic!("expected endpoints, got {other:?}"),
                    }
                }
                followers.len()
            });
            let _ = done_tx.send(result);
        });
        let followers = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("subscribe and publish deadlocked");
        assert!(followers > 0);
    }
}
