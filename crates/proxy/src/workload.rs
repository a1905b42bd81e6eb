//! Per-node mode: one proxy serving several local workloads, each with its
//! own identity. An outbound connection belongs to the workload whose
//! address it comes from (or whose user owns the client's socket) and is
//! sent with that workload's certificate (its
//! own router: its connections are authenticated as it, so they are never
//! shared with another workload); inbound mutual TLS is terminated with the
//! certificate its SNI names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::route::Router;
use crate::tls::Tls;

/// One local workload as the proxy serves it.
#[derive(Debug)]
pub struct Workload {
    /// The `workload` metric label.
    pub name: Arc<str>,
    pub tls: Arc<Tls>,
    /// Outbound, presenting this workload's certificate.
    pub router: Arc<Router>,
}

/// The workloads by address and by identity; empty outside per-node mode.
#[derive(Debug, Default)]
pub struct Workloads {
    all: Vec<Arc<Workload>>,
    by_addr: HashMap<IpAddr, Arc<Workload>>,
    by_uid: HashMap<u32, Arc<Workload>>,
}

impl Workloads {
    /// From each workload with its addresses and uids.
    pub fn new(
        workloads: impl IntoIterator<Item = (Arc<Workload>, Vec<IpAddr>, Vec<u32>)>,
    ) -> Self {
        let mut this = Self::default();
        for (w, addrs, uids) in workloads {
            for a in addrs {
                this.by_addr.insert(a, w.clone());
            }
            for u in uids {
                this.by_uid.insert(u, w.clone());
            }
            this.all.push(w);
        }
        this
    }

    /// The workload an outbound connection from `client` comes from: by
    /// its address, else (when workloads are told apart by user) by the
    /// uid owning the client's socket, looked up off the runtime's thread.
    pub async fn of_client(&self, client: std::net::SocketAddr) -> Option<&Arc<Workload>> {
        if let Some(w) = self.by_addr(client.ip()) {
            return Some(w);
        }
        if self.by_uid.is_empty() {
            return None;
        }
        let uid = tokio::task::spawn_blocking(move || crate::owner::owner_uid(client))
            .await
            .ok()
            .flatten()?;
        self.by_uid.get(&uid)
    }

    /// The workload a connection from (or to) `ip` belongs to.
    pub fn by_addr(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        if self.by_addr.is_empty() {
            return None;
        }
        // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        self.by_addr.get(&ip.to_canonical())
    }

    /// The workload whose identity a TLS client asked for (SNI).
    pub fn by_identity(&self, name: &str) -> Option<&Arc<Workload>> {
        self.all.iter().find(|w| w.tls.name.as_str() == name)
    }

    /// Every workload holds a certificate.
    pub fn certified(&self) -> bool {
        self.all.iter().all(|w| w.tls.has_cert())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.all.iter()
    }
}
