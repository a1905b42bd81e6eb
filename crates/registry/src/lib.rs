//! The etcd registry: where service instances are recorded, and how an
//! instance keeps its record alive.
//!
//! Key layout, under a prefix (default `/weft/`):
//!
//! ```text
//! /weft/services/<host>:<port>/endpoints/<ip>:<port>   {"weight":1,"identity":"api.demo"}
//! ```
//!
//! The service is the authority clients use; each endpoint key carries the
//! instance's address, and its JSON value the optional weight (default 1)
//! and identity. Instances write their key under a lease they keep alive,
//! so a dead instance disappears when its lease expires.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use weft_detect::Authority;

pub mod etcd;

use etcd::{Etcd, EtcdError};

pub const DEFAULT_PREFIX: &str = "/weft/";
/// Lease time-to-live for a registration: how long a crashed instance
/// stays listed.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The keys under one prefix.
#[derive(Clone, Debug)]
pub struct Layout {
    prefix: String,
}

impl Default for Layout {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// Every service key starts with this.
    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }

    pub fn endpoint_key(&self, service: &Authority, addr: SocketAddr) -> String {
        format!("{}{service}/endpoints/{addr}", self.services())
    }

    /// The service and address an endpoint key names; `None` for any other
    /// key under the prefix.
    pub fn parse_key(&self, key: &str) -> Option<(Authority, SocketAddr)> {
        let rest = key.strip_prefix(&self.services())?;
        let (service, addr) = rest.split_once("/endpoints/")?;
        Some((service.parse().ok()?, addr.parse().ok()?))
    }
}

/// The value of an endpoint key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointValue {
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn one() -> u32 {
    1
}

fn is_one(w: &u32) -> bool {
    *w == 1
}

impl EndpointValue {
    /// Parses a value; an empty value means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self {
                weight: 1,
                identity: None,
            });
        }
        serde_json::from_slice(bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd {endpoints:?}: {source}")]
    Etcd {
        endpoints: Vec<String>,
        #[source]
        source: EtcdError,
    },
    #[error("etcd {endpoints:?}: the lease expired")]
    LeaseExpired { endpoints: Vec<String> },
    #[error("encoding the endpoint value: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One instance's registration.
#[derive(Clone, Debug)]
pub struct Registration {
    pub etcd: Vec<String>,
    pub layout: Layout,
    pub service: Authority,
    pub addr: SocketAddr,
    pub value: EndpointValue,
    pub ttl: Duration,
}

impl Registration {
    /// Keeps the instance registered until `shutdown`, then removes it at
    /// once (revoking the lease) rather than waiting for the lease to run
    /// out. Losing etcd is logged and retried; it never stops the caller.
    pub async fn maintain(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.hold(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(service = %self.service, addr = %self.addr, error = %e, retry_in = ?backoff, "etcd registration lost; retrying");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn err(&self) -> impl Fn(EtcdError) -> RegistryError + '_ {
        |source| RegistryError::Etcd {
            endpoints: self.etcd.clone(),
            source,
        }
    }

    /// One lease: grant, put, keep alive until shutdown or failure.
    async fn hold(&self, shutdown: &CancellationToken) -> Result<(), RegistryError> {
        let mut client = Etcd::connect(&self.etcd).await.map_err(self.err())?;
        let ttl = self.ttl.as_secs().max(2) as i64;
        let lease = client.lease_grant(ttl).await.map_err(self.err())?;
        let key = self.layout.endpoint_key(&self.service, self.addr);
        let value = serde_json::to_vec(&self.value)?;
        client
            .put(key.clone(), value, lease)
            .await
            .map_err(self.err())?;
        tracing::info!(%key, lease, ttl, etcd = client.url(), "registered in etcd");
        let mut keeper = client.lease_keep_alive(lease).await.map_err(self.err())?;
        let mut tick = tokio::time::interval(Duration::from_secs((ttl / 3).max(1) as u64));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    if let Err(e) = client.lease_revoke(lease).await {
                        tracing::info!(error = %e, "could not revoke the lease; it will expire");
                    } else {
                        tracing::info!(%key, "deregistered from etcd");
                    }
                    return Ok(());
                }
                _ = tick.tick() => keeper.renew().await.map_err(self.err())?,
                msg = keeper.message() => match msg.map_err(self.err())? {
                    // A TTL of 0 means the lease is gone (etcd restarted
                    // with lost state, or it expired): register again.
                    Some(r) if r.ttl > 0 => {}
                    _ => return Err(RegistryError::LeaseExpired {
                        endpoints: self.etcd.clone(),
                    }),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let l = Layout::new("/weft");
        let svc: Authority = "api.demo:8080".parse().expect("authority");
        let addr: SocketAddr = "10.0.0.1:4143".parse().expect("addr");
        let key = l.endpoint_key(&svc, addr);
        assert_eq!(key, "/weft/services/api.demo:8080/endpoints/10.0.0.1:4143");
        assert_eq!(l.parse_key(&key), Some((svc, addr)));
        assert_eq!(l.parse_key("/weft/services/api.demo:8080/other"), None);
        assert_eq!(l.parse_key("/elsewhere/x"), None);
    }

    #[test]
    fn values_default_and_refuse_typos() {
        assert_eq!(EndpointValue::parse(b"").map(|v| v.weight).ok(), Some(1));
        let v = EndpointValue::parse(br#"{"identity":"api.demo"}"#).expect("valid");
        assert_eq!((v.weight, v.identity.as_deref()), (1, Some("api.demo")));
        assert!(EndpointValue::parse(br#"{"wieght":2}"#).is_err());
        let json = serde_json::to_string(&EndpointValue {
            weight: 1,
            identity: None,
        })
        .expect("json");
        assert_eq!(json, "{}");
    }
}
