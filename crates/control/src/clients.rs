//! Open streams per client, so one client (a proxy that follows random
//! names, a runaway script) cannot make the control plane hold without
//! bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};
use weft_channel::Peer;
use weft_identity::Name;

impl Clients {
    /// `max` streams per client at once.
    pub(crate) fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }
}

/// Who a stream is counted against: the identity its connection proved,
/// else the address it came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    Identity(Name),
    Addr(IpAddr),
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Identity(n) => write!(f, "{n}"),
            Self::Addr(a) => write!(f, "{a} (no client certificate)"),
        }
    }
}

/// Open streams per client, so one client (a proxy that follows random
/// names, a runaway script) cannot make the control plane hold without
/// bound.
pub(crate) struct Clients {
    max: u32,
    open: Mutex<HashMap<ClientKey, u32>>,
}

/// One stream counted against its client until dropped.
pub(crate) struct ClientSlot {
    clients: Arc<Clients>,
    key: ClientKey,
}

impl Clients {
    fn acquire(self: &Arc<Self>, key: ClientKey) -> Result<ClientSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            return Err(Status::resource_exhausted(format!(
                "{key} already follows {} names, the most one client may (weft-control --max-names-per-client)",
                self.max
            )));
        }
        *n += 1;
        Ok(ClientSlot {
            clients: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Clients {
    /// Counts one more stream against the client making `request`.
    pub(crate) fn acquire_for<T>(
        self: &Arc<Self>,
        request: &Request<T>,
    ) -> Result<ClientSlot, Status> {
        let key = match request.extensions().get::<Peer>() {
            Some(Peer {
                identity: Some(n), ..
            }) => ClientKey::Identity(n.clone()),
            Some(p) => ClientKey::Addr(p.addr.ip()),
            None => ClientKey::Addr(IpAddr::from([0, 0, 0, 0])),
        };
        self.acquire(key)
    }
}
