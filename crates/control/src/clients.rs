//! Open streams per client, so one client (a proxy that follows random
//! names, a runaway script) cannot make the control plane hold without
//! bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};
use weft_channel::Peer;
use weft_identity::Name;

/// How many streams clients may hold open.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// Per client: an identity, or an address without a certificate.
    pub per_client: u32,
    /// Every client without a certificate together: anyone who can reach
    /// the port is one, from as many addresses as they have, so their
    /// names (and the DNS lookups behind them) are bounded in total.
    pub uncertified: u32,
}

impl Clients {
    pub(crate) fn new(limits: ClientLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new(Open::default()),
        })
    }
}

#[derive(Default)]
struct Open {
    by_client: HashMap<ClientKey, u32>,
    /// The sum over `ClientKey::Addr` keys.
    uncertified: u32,
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
    limits: ClientLimits,
    open: Mutex<Open>,
}

/// One stream counted against its client until dropped.
pub(crate) struct ClientSlot {
    clients: Arc<Clients>,
    key: ClientKey,
}

impl Clients {
    fn acquire(self: &Arc<Self>, key: ClientKey) -> Result<ClientSlot, Status> {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let open = &mut *guard;
        let uncertified = matches!(key, ClientKey::Addr(_));
        if uncertified && open.uncertified >= self.limits.uncertified {
            return Err(Status::resource_exhausted(format!(
                "clients without a certificate already follow {} names together, the most they may (weft-control --max-names-uncertified); {key} is refused",
                self.limits.uncertified
            )));
        }
        let n = open.by_client.entry(key.clone()).or_default();
        if *n >= self.limits.per_client {
            return Err(Status::resource_exhausted(format!(
                "{key} already follows {} names, the most one client may (weft-control --max-names-per-client)",
                self.limits.per_client
            )));
        }
        *n += 1;
        if uncertified {
            open.uncertified += 1;
        }
        Ok(ClientSlot {
            clients: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut guard = self.clients.open.lock().unwrap_or_else(|p| p.into_inner());
        let open = &mut *guard;
        if let Some(n) = open.by_client.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_client.remove(&self.key);
            }
            if matches!(self.key, ClientKey::Addr(_)) {
                open.uncertified = open.uncertified.saturating_sub(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_without_a_certificate_share_one_bound() {
        let clients = Clients::new(ClientLimits {
            per_client: 3,
            uncertified: 4,
        });
        let addr = |last: u8| ClientKey::Addr(IpAddr::from([10, 0, 0, last]));
        let mut held = Vec::new();
        for last in 1..=4 {
            held.push(clients.acquire(addr(last)).expect("within the bound"));
        }
        // A fifth address is refused though it follows nothing yet.
        let refused = clients.acquire(addr(5)).err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::ResourceExhausted));
        // An identity is counted on its own.
        let name = ClientKey::Identity("web.demo".parse().expect("name"));
        held.push(clients.acquire(name).expect("certified clients are apart"));
        // A slot given back makes room.
        held.remove(0);
        clients.acquire(addr(5)).expect("room again");
    }
}
