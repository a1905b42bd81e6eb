//! The destinations file as a discovery backend: the embedded default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use weft_destinations::{Destinations, DestinationsError};
use weft_detect::Authority;

use super::{Backend, Endpoint, Resolution, Service, Watches};

pub struct FileBackend {
    current: Mutex<Arc<Destinations>>,
    watches: Watches,
}

impl FileBackend {
    /// Loads the file (failing if it is bad) and follows its changes.
    pub fn start(path: PathBuf) -> Result<Arc<Self>, DestinationsError> {
        let mut rx = weft_destinations::watch(path)?;
        let this = Arc::new(Self {
            current: Mutex::new(rx.borrow_and_update().clone()),
            watches: Watches::default(),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(this) = weak.upgrade() else { return };
                let next = rx.borrow_and_update().clone();
                if let Ok(mut cur) = this.current.lock() {
                    *cur = next.clone();
                }
                this.watches.update_all(|a| resolve(&next, a));
            }
        });
        Ok(this)
    }
}

fn resolve(d: &Destinations, authority: &Authority) -> Resolution {
    let Some(dest) = d.by_authority.get(authority) else {
        return Resolution::Unknown;
    };
    let endpoints: BTreeMap<_, _> = dest
        .endpoints
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
        .collect();
    Resolution::Known(Arc::new(Service {
        endpoints,
        opaque: dest.opaque,
        policy: dest.policy.clone(),
    }))
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
            resolve(&d, authority)
        })
    }
}
