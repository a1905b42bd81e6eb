//! `io.linkerd.proxy.inbound.InboundServerPolicies`: the policy of one port
//! of one workload, from the destinations file's `servers:`.
//!
//! A workload is named by the identity it serves as (`api.demo`, what weft
//! proxies send), or, with `--kubernetes`, as Linkerd's proxies name it: a
//! pod (`ns:pod`, or `{"ns":"..","pod":".."}`), which serves as its
//! ServiceAccount's identity. A port the file does not list gets the
//! server's `default`, else the mesh-wide `--default-inbound-policy`.
//! `WatchPort` sends the policy at once and again whenever it changes,
//! never the same twice.

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

/// What a pod serves as: `(namespace, pod) -> identity`.
pub type PodIdentity = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

pub struct InboundPolicyService {
    /// The destinations file, when there is one.
    file: Option<watch::Receiver<Arc<Destinations>>>,
    /// With Kubernetes: pods' identities.
    pods: Option<PodIdentity>,
    default: DefaultPolicy,
    metrics: Metrics,
    clients: Arc<Clients>,
}

impl InboundPolicyService {
    pub fn new(
        file: Option<watch::Receiver<Arc<Destinations>>>,
        pods: Option<PodIdentity>,
        default: DefaultPolicy,
        metrics: Metrics,
        limits: crate::clients::ClientLimits,
    ) -> Self {
        Self {
            file,
            pods,
            default,
            metrics,
            clients: Clients::new(limits),
        }
    }
}

#[derive(serde::Deserialize)]
struct PodRef {
    ns: String,
    pod: Option<String>,
    external_workload: Option<String>,
}

/// The namespace and pod a Kubernetes-form workload names, if it is one.
fn pod_ref(w: &str) -> Option<Result<(String, String), Status>> {
    if w.starts_with('{') {
        let parsed = serde_json::from_str::<PodRef>(w)
            .map_err(|e| Status::invalid_argument(format!("workload {w:?}: {e}")))
            .and_then(|r| match (r.pod, r.external_workload) {
                (Some(pod), _) => Ok((r.ns, pod)),
                (None, Some(_)) => Err(Status::invalid_argument(format!(
                    "workload {w:?} is an ExternalWorkload, which weft does not follow; name it by its identity instead"
                ))),
                (None, None) => Err(Status::invalid_argument(format!(
                    "workload {w:?} names no pod"
                ))),
            });
        return Some(parsed);
    }
    let (ns, pod) = w.split_once(':')?;
    Some(Ok((ns.to_string(), pod.to_string())))
}

/// The identity a `PortSpec.workload` names.
fn workload(w: &str, pods: Option<&PodIdentity>) -> Result<String, Status> {
    let w = w.trim();
    if let Some(pod) = pod_ref(w) {
        let (ns, name) = pod?;
        let Some(pods) = pods else {
            return Err(Status::invalid_argument(format!(
                "workload {w:?} names a Kubernetes pod, and this weft-control does not follow a cluster (--kubernetes); name the workload by the identity it serves as, e.g. api.demo"
            )));
        };
        return pods(&ns, &name).ok_or_else(|| {
            Status::not_found(format!(
                "no pod {ns}/{name} in the cluster (yet): its policy follows once it is listed"
            ))
        });
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
        let identity = workload(&request.get_ref().workload, self.pods.as_ref())?;
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
        let identity = workload(&request.get_ref().workload, self.pods.as_ref())?;
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
    fn workloads_are_identities_or_pods() {
        assert_eq!(workload("API.demo", None).ok().as_deref(), Some("api.demo"));
        let pods: PodIdentity = Arc::new(|ns, pod| {
            (ns == "demo" && pod == "web-1")
                .then(|| "web.demo.serviceaccount.identity.weft.local".to_string())
        });
        for form in ["demo:web-1", "{\"ns\":\"demo\",\"pod\":\"web-1\"}"] {
            assert_eq!(
                workload(form, Some(&pods)).ok().as_deref(),
                Some("web.demo.serviceaccount.identity.weft.local")
            );
        }
        let missing = workload("demo:gone", Some(&pods)).err();
        assert_eq!(missing.map(|s| s.code()), Some(tonic::Code::NotFound));
        for (bad, says) in [
            ("default:web-abc", "does not follow a cluster"),
            (
                "{\"ns\":\"default\",\"pod\":\"web\"}",
                "does not follow a cluster",
            ),
            (
                "{\"ns\":\"default\",\"external_workload\":\"vm\"}",
                "is an ExternalWorkload",
            ),
            ("not a name", "is not an identity name"),
        ] {
            let e = workload(bad, None)
                .err()
                .map(|s| s.message().to_string())
                .unwrap_or_default();
            assert!(e.contains(&format!("{bad:?}")) && e.contains(says), "{e}");
        }
    }
}
