//! Service discovery: several backends, one answer per authority.
//!
//! Every backend answers "what are the endpoints of `host:port`" as a
//! watch, and says [`Resolution::Unknown`] for names it does not know.
//! [`Discovery`] asks its backends in order and the first that knows a name
//! wins, so a file entry can override etcd, and DNS only answers for names
//! nobody else knows. Kubernetes EndpointSlices will be one more backend.

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

/// Every backend, in priority order.
#[derive(Clone)]
pub struct Discovery {
    backends: Arc<[Arc<dyn Backend>]>,
}

impl Discovery {
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Self {
        Self {
            backends: backends.into(),
        }
    }

    pub fn watch(&self, authority: &Authority) -> Watch {
        Watch {
            sources: self
                .backends
                .iter()
                .map(|b| (b.name(), b.watch(authority)))
                .collect(),
        }
    }
}

/// One authority followed across every backend.
pub struct Watch {
    sources: Vec<(&'static str, watch::Receiver<Resolution>)>,
}

impl Watch {
    /// The first backend's answer that knows the name, and which backend
    /// gave it; `Pending` while a backend before it is still finding out.
    pub fn current(&mut self) -> (Option<&'static str>, Resolution) {
        for (name, rx) in &mut self.sources {
            let r = rx.borrow_and_update().clone();
            if r != Resolution::Unknown {
                return (Some(name), r);
            }
        }
        (None, Resolution::Unknown)
    }

    /// Waits until any backend's answer changes. Returns false when every
    /// backend has gone away (the control plane is shutting down).
    pub async fn changed(&mut self) -> bool {
        if self.sources.is_empty() {
            std::future::pending::<()>().await;
        }
        let futures = self
            .sources
            .iter_mut()
            .map(|(_, rx)| Box::pin(rx.changed()));
        let (result, _, _) = futures_util::future::select_all(futures).await;
        result.is_ok()
    }
}

/// The shared bookkeeping of a backend: one watch channel per authority
/// anyone follows, so a thousand streams for one service cost one channel.
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
