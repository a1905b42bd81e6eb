//! `io.linkerd.proxy.inbound.InboundServerPolicies`: the policy of one port
//! of one workload, from the destinations file's `servers:`.
//!
//! A workload is named by the identity it serves as (`api.demo`, what weft
//! proxies send). Linkerd's Kubernetes forms (`ns:pod`, `{"ns":..,"pod":..}`)
//! are refused with a message saying so: they name pods, and pods'
//! policies come from a cluster's policy resources, which weft does not
//! read yet. A port the file does not list gets the server's `default`,
//! else the mesh-wide `--default-inbound-policy`. `WatchPort` sends the
//! policy at once and again whenever it changes, never the same twice.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use linkerd2_proxy_api::inbound::inbound_server_policies_server::InboundServerPolicies;
use linkerd2_proxy_api::inbound::{PortSpec as ApiPort, Server};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use weft_authz::{DefaultPolicy, PortSpec};
use weft_destinations::{DETECT_TIMEOUT, Destinations, ServerSpec};

use crate::clients::{ClientSlot, Clients};
use crate::metrics::{Metrics, OpenStream};

pub struct InboundPolicyService {
    /// The destinations file, when there is one.
    file: Option<watch::Receiver<Arc<Destinations>>>,
    default: DefaultPolicy,
    metrics: Metrics,
    clients: Arc<Clients>,
}

impl InboundPolicyService {
    pub fn new(
        file: Option<watch::Receiver<Arc<Destinations>>>,
        default: DefaultPolicy,
        metrics: Metrics,
        max_per_client: u32,
    ) -> Self {
        Self {
            file,
            default,
            metrics,
            clients: Clients::new(max_per_client),
        }
    }
}

/// The identity a `PortSpec.workload` names.
fn workload(w: &str) -> Result<String, Status> {
    let w = w.trim();
    if w.starts_with('{') || w.contains(':') {
        return Err(Status::invalid_argument(format!(
            "workload {w:?} names a Kubernetes pod; weft-control serves inbound policy by the identity a workload serves as (its proxy's identity name, e.g. api.demo)"
        )));
    }
    // Names are case-insensitive; the file's are kept lower-cased.
    w.to_ascii_lowercase()
        .parse::<weft_identity::Name>()
        .map(|n| n.as_str().to_string())
        .map_err(|e| {
            Status::invalid_argument(format!(
                "workload {w:?} is not an identity name: {}",
                e.reason
            ))
        })
}

fn port(p: u32) -> Result<u16, Status> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("port {p} is not a TCP port")))
}

/// The spec in force for `identity`'s `port`.
fn spec(
    servers: &HashMap<String, ServerSpec>,
    identity: &str,
    port: u16,
    mesh: DefaultPolicy,
) -> PortSpec {
    match servers.get(identity) {
        Some(s) => s
            .ports
            .get(&port)
            .cloned()
            .unwrap_or_else(|| s.default.unwrap_or(mesh).port_spec(DETECT_TIMEOUT)),
        None => mesh.port_spec(DETECT_TIMEOUT),
    }
}

fn encode(spec: &PortSpec) -> Result<Server, Status> {
    // The file's parser compiled every spec already; this cannot fail
    // for one it accepted.
    weft_policy_api::inbound::encode(spec).map_err(|e| Status::internal(e.to_string()))
}

type ServerStream = Pin<Box<dyn Stream<Item = Result<Server, Status>> + Send>>;

#[tonic::async_trait]
impl InboundServerPolicies for InboundPolicyService {
    type WatchPortStream = ServerStream;

    async fn get_port(&self, request: Request<ApiPort>) -> Result<Response<Server>, Status> {
        let identity = workload(&request.get_ref().workload)?;
        let port = port(request.get_ref().port)?;
        let spec = match &self.file {
            Some(f) => spec(&f.borrow().servers, &identity, port, self.default),
            None => spec(&HashMap::new(), &identity, port, self.default),
        };
        self.metrics.update_sent("get_port");
        Ok(Response::new(encode(&spec)?))
    }

    async fn watch_port(
        &self,
        request: Request<ApiPort>,
    ) -> Result<Response<Self::WatchPortStream>, Status> {
        let identity = workload(&request.get_ref().workload)?;
        let port = port(request.get_ref().port)?;
        let slot = self.clients.acquire_for(&request)?;
        Ok(Response::new(Box::pin(updates(
            identity,
            port,
            self.file.clone(),
            self.default,
            self.metrics.clone(),
            slot,
        ))))
    }
}

/// One `WatchPort` stream. Holds no task: it is polled by the connection.
fn updates(
    identity: String,
    port: u16,
    file: Option<watch::Receiver<Arc<Destinations>>>,
    mesh: DefaultPolicy,
    metrics: Metrics,
    slot: ClientSlot,
) -> impl Stream<Item = Result<Server, Status>> + Send {
    struct State {
        identity: String,
        port: u16,
        file: Option<watch::Receiver<Arc<Destinations>>>,
        mesh: DefaultPolicy,
        last: Option<PortSpec>,
        metrics: Metrics,
        _open: OpenStream,
        _slot: ClientSlot,
    }
    let state = State {
        _open: metrics.stream_opened("watch_port"),
        _slot: slot,
        identity,
        port,
        file,
        mesh,
        last: None,
        metrics,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.last.is_some() {
                match s.file.as_mut() {
                    Some(f) => f.changed().await.ok()?,
                    // No file: the default never changes.
                    None => std::future::pending::<()>().await,
                }
            }
            let next = match s.file.as_mut() {
                Some(f) => spec(&f.borrow_and_update().servers, &s.identity, s.port, s.mesh),
                None => spec(&HashMap::new(), &s.identity, s.port, s.mesh),
            };
            if s.last.as_ref() != Some(&next) {
                let encoded = encode(&next);
                tracing::debug!(identity = %s.identity, port = s.port, server = %next.name, "inbound policy update");
                s.last = Some(next);
                s.metrics.update_sent("watch_port");
                return Some((encoded, s));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_identities() {
        assert_eq!(workload("API.demo").ok().as_deref(), Some("api.demo"));
        for (bad, says) in [
            ("default:web-abc", "names a Kubernetes pod"),
            (
                "{\"ns\":\"default\",\"pod\":\"web\"}",
                "names a Kubernetes pod",
            ),
            ("not a name", "is not an identity name"),
        ] {
            let e = workload(bad)
                .err()
                .map(|s| s.message().to_string())
                .unwrap_or_default();
            assert!(e.contains(&format!("{bad:?}")) && e.contains(says), "{e}");
        }
    }
}
