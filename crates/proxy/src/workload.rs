//! Per-node mode: one proxy serving several local workloads, each with its
//! own identity. An outbound connection belongs to the workload whose
//! address it comes from and is sent with that workload's certificate (its
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
}

impl Workloads {
    pub fn new(workloads: impl IntoIterator<Item = (Arc<Workload>, Vec<IpAddr>)>) -> Self {
        let mut this = Self::default();
        for (w, addrs) in workloads {
            for a in addrs {
                this.by_addr.insert(a, w.clone());
            }
            this.all.push(w);
        }
        this
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
