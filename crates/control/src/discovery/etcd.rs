//! etcd v3 as a discovery backend: instances register themselves under a
//! lease (see `weft-registry` for the key layout); this backend lists the
//! prefix once and then follows it with a watch, so a put, a delete or an
//! expired lease reaches every stream within milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;
use weft_detect::Authority;
use weft_registry::{EndpointValue, Layout};

use super::{Backend, Endpoint, Resolution, Service, Watches};

type State = HashMap<Authority, BTreeMap<SocketAddr, Endpoint>>;

pub struct EtcdBackend {
    state: Mutex<State>,
    watches: Watches,
}

impl EtcdBackend {
    /// Starts following etcd at `endpoints`. An unreachable etcd is logged
    /// and retried; until it answers, it knows no names.
    pub fn start(endpoints: Vec<String>, layout: Layout) -> Arc<Self> {
        let this = Arc::new(Self {
            state: Mutex::default(),
            watches: Watches::default(),
        });
        tokio::spawn(follow(Arc::downgrade(&this), endpoints, layout));
        this
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn publish(&self) {
        let state = self.lock();
        self.watches.update_all(|a| resolve(&state, a));
    }
}

fn resolve(state: &State, authority: &Authority) -> Resolution {
    match state.get(authority) {
        Some(eps) if !eps.is_empty() => Resolution::Known(Arc::new(Service {
            endpoints: eps.clone(),
            opaque: false,
        })),
        _ => Resolution::Unknown,
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution> {
        self.watches
            .subscribe(authority, || resolve(&self.lock(), authority))
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
) -> Result<(), etcd_client::Error> {
    let mut client = Client::connect(endpoints, None).await?;
    let prefix = layout.services();
    let listed = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut fresh = State::new();
    for kv in listed.kvs() {
        if let Some((service, endpoint)) = endpoint(layout, kv) {
            fresh
                .entry(service)
                .or_default()
                .insert(endpoint.addr, endpoint);
        }
    }
    let Some(backend) = this.upgrade() else {
        return Ok(());
    };
    tracing::info!(services = fresh.len(), revision, "etcd listed");
    *backend.lock() = fresh;
    backend.publish();
    drop(backend);
    *backoff = Duration::from_millis(200);

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch(prefix, Some(options)).await?;
    while let Some(rsp) = stream.message().await? {
        if rsp.canceled() {
            // Compacted past our revision, usually: list again.
            return Ok(());
        }
        let Some(backend) = this.upgrade() else {
            return Ok(());
        };
        {
            let mut state = backend.lock();
            for event in rsp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        if let Some((service, endpoint)) = endpoint(layout, kv) {
                            state
                                .entry(service)
                                .or_default()
                                .insert(endpoint.addr, endpoint);
                        }
                    }
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key());
                        if let Some((service, addr)) = layout.parse_key(&key)
                            && let Some(eps) = state.get_mut(&service)
                        {
                            eps.remove(&addr);
                            if eps.is_empty() {
                                state.remove(&service);
                            }
                        }
                    }
                }
            }
        }
        backend.publish();
    }
    Ok(())
}

/// The endpoint an etcd key describes; a key or value that does not parse
/// is logged and skipped (never served as something it is not).
fn endpoint(layout: &Layout, kv: &KeyValue) -> Option<(Authority, Endpoint)> {
    let key = String::from_utf8_lossy(kv.key());
    let (service, addr) = layout.parse_key(&key)?;
    let value = match EndpointValue::parse(kv.value()) {
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
