//! The destinations file as a discovery backend: the embedded default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use weft_destinations::{Destinations, DestinationsError};
use weft_detect::Authority;

use super::{AddressIndex, Backend, Endpoint, Resolution, Service, Watches};

pub struct FileBackend {
    current: Mutex<Arc<Snapshot>>,
    watches: Watches,
    /// The file as last read, for what else it holds (inbound policy).
    file: watch::Receiver<Arc<Destinations>>,
}

/// One version of the file, with its endpoints indexed by address.
struct Snapshot {
    destinations: Arc<Destinations>,
    addresses: AddressIndex,
}

impl Snapshot {
    fn new(destinations: Arc<Destinations>) -> Self {
        let services: Vec<_> = destinations
            .by_authority
            .iter()
            .map(|(a, d)| (a, endpoints(d), d.opaque))
            .collect();
        let mut addresses = AddressIndex::build(services.iter().map(|(a, e, o)| (*a, e, *o)));
        // A service's own addresses answer with the whole service.
        for (authority, d) in &destinations.by_authority {
            if let Resolution::Known(service) = resolve(&destinations, authority) {
                for addr in &d.addresses {
                    addresses.insert_service(*addr, authority, &service);
                }
            }
        }
        Self {
            destinations,
            addresses,
        }
    }

    fn resolve(&self, authority: &Authority) -> Resolution {
        match resolve(&self.destinations, authority) {
            Resolution::Unknown => self.addresses.resolve(authority),
            known => known,
        }
    }
}

impl FileBackend {
    /// Loads the file (failing if it is bad) and follows its changes.
    pub fn start(path: PathBuf) -> Result<Arc<Self>, DestinationsError> {
        let mut rx = weft_destinations::watch(path)?;
        let first = rx.borrow_and_update().clone();
        let this = Arc::new(Self {
            current: Mutex::new(Arc::new(Snapshot::new(first))),
            watches: Watches::default(),
            file: rx.clone(),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(this) = weak.upgrade() else { return };
                let next = Arc::new(Snapshot::new(rx.borrow_and_update().clone()));
                if let Ok(mut cur) = this.current.lock() {
                    *cur = next.clone();
                }
                this.watches.update_all(|a| next.resolve(a));
            }
        });
        Ok(this)
    }
}

impl FileBackend {
    /// Follows the file itself.
    pub fn file(&self) -> watch::Receiver<Arc<Destinations>> {
        self.file.clone()
    }
}

fn resolve(d: &Destinations, authority: &Authority) -> Resolution {
    let Some(dest) = d.by_authority.get(authority) else {
        return Resolution::Unknown;
    };
    Resolution::Known(Arc::new(Service {
        endpoints: endpoints(dest),
        opaque: dest.opaque,
        policy: dest.policy.clone(),
        name: None,
    }))
}

fn endpoints(dest: &weft_destinations::Destination) -> BTreeMap<std::net::SocketAddr, Endpoint> {
    dest.endpoints
        .iter()
        .map(|e| {
            (
                e.addr,
                Endpoint {
                    addr: e.addr,
                    weight: e.weight,
                    identity: e.identity.clone(),
                },
            )
        })
        .collect()
}

impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution> {
        self.watches.subscribe(authority, || {
            let d = match self.current.lock() {
                Ok(d) => d.clone(),
                Err(p) => p.into_inner().clone(),
            };
            d.resolve(authority)
        })
    }
}
