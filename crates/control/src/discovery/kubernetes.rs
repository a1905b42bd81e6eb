//! Kubernetes as a discovery backend: Services, their EndpointSlices and
//! the Pods behind them, followed with kube-rs watchers (a list, then a
//! watch that resumes; a relist when the server says 410 Gone). No polling.
//!
//! A Service `web` in namespace `demo` with port 80 is answered for
//! `web.demo.svc.<cluster domain>:80` and the short forms a pod's resolver
//! would expand (`web.demo.svc:80`, `web.demo:80`), with the endpoints its
//! EndpointSlices list for that port: the ready ones, or, while none is
//! ready, the serving ones (still answering, though terminating), as
//! kube-proxy does. An endpoint whose pod runs weft's proxy is meshed: its
//! identity is its ServiceAccount's,
//! `<sa>.<namespace>.serviceaccount.identity.<trust domain>`. Cluster IPs
//! answer as their Service and pod IPs as their endpoint (transparent
//! traffic).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use weft_detect::Authority;
use weft_identity::Name;

use super::{AddressIndex, Backend, Endpoint, Resolution, Service, Watches};

/// The label an EndpointSlice names its Service by.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The container injection adds: a pod running it is meshed.
pub const PROXY_CONTAINER: &str = "weft-proxy";

/// How the backend names things.
#[derive(Clone, Debug)]
pub struct Naming {
    /// `cluster.local` unless the cluster says otherwise.
    pub cluster_domain: String,
    /// The mesh's trust domain, the last labels of every identity.
    pub trust_domain: String,
}

/// The objects the watchers hold, by namespace and name.
#[derive(Default)]
struct Objects {
    services: HashMap<(String, String), KService>,
    slices: HashMap<(String, String), EndpointSlice>,
    pods: HashMap<(String, String), Pod>,
}

/// What the objects mean, rebuilt after each batch of changes.
#[derive(Default)]
struct Snapshot {
    by_authority: HashMap<Authority, Arc<Service>>,
    addresses: AddressIndex,
    /// Every pod's ServiceAccount identity, meshed or not (whatever proxy
    /// it runs, it serves as that identity), by namespace and name.
    pods: HashMap<(String, String), String>,
}

impl Snapshot {
    fn resolve(&self, authority: &Authority) -> Resolution {
        match self.by_authority.get(authority) {
            Some(s) => Resolution::Known(s.clone()),
            None => self.addresses.resolve(authority),
        }
    }
}

pub struct KubernetesBackend {
    /// Replaced whole by the one task that follows the cluster.
    snapshot: ArcSwap<Snapshot>,
    /// Until the first complete listing (or [`SYNC_GRACE`]), names the
    /// cluster does not know are `Pending`, not `Unknown`: a lower backend
    /// (DNS) must not answer for a Service merely not listed yet.
    syncing: std::sync::atomic::AtomicBool,
    watches: Watches,
}

/// How long an unreachable cluster may hold other backends' answers back.
const SYNC_GRACE: Duration = Duration::from_secs(10);

impl Backend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn watch(&self, authority: &Authority) -> watch::Receiver<Resolution> {
        let snapshot = self.snapshot.load_full();
        self.watches
            .subscribe(authority, || self.resolve(&snapshot, authority))
    }
}

impl KubernetesBackend {
    /// Follows the cluster `client` talks to. Until the first lists
    /// arrive it knows no names; API errors (403, an unreachable server)
    /// are logged and retried with backoff.
    pub fn start(client: kube::Client, naming: Naming) -> Arc<Self> {
        let this = Arc::new(Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            syncing: std::sync::atomic::AtomicBool::new(true),
            watches: Watches::default(),
        });
        tokio::spawn(follow(Arc::downgrade(&this), client, naming));
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            tokio::time::sleep(SYNC_GRACE).await;
            if let Some(this) = weak.upgrade()
                && this.syncing.load(std::sync::atomic::Ordering::Acquire)
            {
                tracing::warn!(after = ?SYNC_GRACE, "the Kubernetes API has not been listed yet; other backends answer meanwhile");
                this.synced();
            }
        });
        this
    }

    /// The identity the pod `namespace/name` serves as (its
    /// ServiceAccount's), if the cluster has it.
    pub fn pod_identity(&self, namespace: &str, name: &str) -> Option<String> {
        self.snapshot
            .load()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    fn resolve(&self, snapshot: &Snapshot, authority: &Authority) -> Resolution {
        match snapshot.resolve(authority) {
            Resolution::Unknown if self.syncing.load(std::sync::atomic::Ordering::Acquire) => {
                Resolution::Pending
            }
            r => r,
        }
    }

    /// The first listing is in (or the grace is over): unknown is unknown.
    fn synced(&self) {
        if self
            .syncing
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            let snapshot = self.snapshot.load_full();
            self.watches.update_all(|a| self.resolve(&snapshot, a));
        }
    }

    fn publish(&self, snapshot: Snapshot, complete: bool) {
        let snapshot = Arc::new(snapshot);
        self.snapshot.store(snapshot.clone());
        if complete {
            self.syncing
                .store(false, std::sync::atomic::Ordering::Release);
        }
        self.watches.update_all(|a| self.resolve(&snapshot, a));
    }
}

/// One watcher's event, tagged with its resource.
enum Change {
    Service(Box<Event<KService>>),
    Slice(Box<Event<EndpointSlice>>),
    Pod(Box<Event<Pod>>),
}

async fn follow(this: Weak<KubernetesBackend>, client: kube::Client, naming: Naming) {
    let config = watcher::Config::default();
    let services = watcher::watcher(kube::Api::<KService>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|e| e.map(|e| Change::Service(Box::new(e))))
        .boxed();
    let slices = watcher::watcher(
        kube::Api::<EndpointSlice>::all(client.clone()),
        config.clone(),
    )
    .default_backoff()
    .map(|e| e.map(|e| Change::Slice(Box::new(e))))
    .boxed();
    let pods = watcher::watcher(kube::Api::<Pod>::all(client), config)
        .default_backoff()
        .map(|e| e.map(|e| Change::Pod(Box::new(e))))
        .boxed();
    let mut changes =
        futures_util::stream::select(services, futures_util::stream::select(slices, pods));
    let mut objects = Objects::default();
    // Objects of a relist in progress, per resource.
    let mut relisting = Objects::default();
    // Which resources have been listed whole at least once.
    let mut listed = [false; 3];
    let errors = weft_listener::Throttle::new(Duration::from_secs(10));
    while let Some(first) = changes.next().await {
        // Take every change already waiting, then rebuild once.
        let mut batch = vec![first];
        while let Some(Some(more)) = changes.next().now_or_never() {
            batch.push(more);
            if batch.len() >= 4096 {
                break;
            }
        }
        let mut changed = false;
        for change in batch {
            match change {
                Ok(c) => {
                    let which = match &c {
                        Change::Service(e) => (0, matches!(**e, Event::InitDone)),
                        Change::Slice(e) => (1, matches!(**e, Event::InitDone)),
                        Change::Pod(e) => (2, matches!(**e, Event::InitDone)),
                    };
                    if which.1 {
                        listed[which.0] = true;
                    }
                    changed |= apply(&mut objects, &mut relisting, c);
                }
                Err(e) => {
                    if let Some(suppressed) = errors.allow() {
                        tracing::warn!(error = %e, suppressed, "kubernetes watch failed; retrying");
                    }
                }
            }
        }
        if !changed {
            continue;
        }
        let Some(backend) = this.upgrade() else {
            return;
        };
        backend.publish(build(&objects, &naming), listed.iter().all(|l| *l));
    }
}

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Applies one watcher event; whether the objects changed.
fn apply(objects: &mut Objects, relisting: &mut Objects, change: Change) -> bool {
    macro_rules! on {
        ($event:expr, $field:ident) => {
            match $event {
                Event::Init => {
                    relisting.$field.clear();
                    false
                }
                Event::InitApply(o) => {
                    relisting.$field.insert(key(&o.metadata), o);
                    false
                }
                Event::InitDone => {
                    objects.$field = std::mem::take(&mut relisting.$field);
                    true
                }
                Event::Apply(o) => {
                    objects.$field.insert(key(&o.metadata), o);
                    true
                }
                Event::Delete(o) => objects.$field.remove(&key(&o.metadata)).is_some(),
            }
        };
    }
    match change {
        Change::Service(e) => on!(*e, services),
        Change::Slice(e) => on!(*e, slices),
        Change::Pod(e) => on!(*e, pods),
    }
}

/// The identity of the pod `namespace/name`, when it runs weft's proxy.
fn identity(objects: &Objects, namespace: &str, pod: &str, naming: &Naming) -> Option<Name> {
    let pod = objects
        .pods
        .get(&(namespace.to_string(), pod.to_string()))?;
    let spec = pod.spec.as_ref()?;
    let meshed = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    if !meshed {
        return None;
    }
    let sa = spec.service_account_name.as_deref().unwrap_or("default");
    format!(
        "{sa}.{namespace}.serviceaccount.identity.{}",
        naming.trust_domain
    )
    .parse()
    .ok()
}

fn build(objects: &Objects, naming: &Naming) -> Snapshot {
    // Slices by the Service they belong to.
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for ((ns, _), slice) in &objects.slices {
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices
                .entry((ns.as_str(), service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    let mut by_authority = HashMap::new();
    let mut services = Vec::new();
    let mut cluster_ips = Vec::new();
    for ((ns, name), svc) in &objects.services {
        let Some(spec) = &svc.spec else { continue };
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let endpoints = endpoints(
                objects,
                slices
                    .get(&(ns.as_str(), name.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                ns,
                port.name.as_deref(),
                naming,
            );
            let service = Arc::new(Service {
                endpoints,
                opaque: false,
                policy: Default::default(),
                name: None,
            });
            let domain = &naming.cluster_domain;
            let mut fqdn = None;
            for host in [
                format!("{name}.{ns}.svc.{domain}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}"),
            ] {
                if let Ok(a) = format!("{host}:{service_port}").parse::<Authority>() {
                    fqdn.get_or_insert_with(|| a.clone());
                    by_authority.insert(a, service.clone());
                }
            }
            let Some(fqdn) = fqdn else { continue };
            for ip in spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
            {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    cluster_ips.push((
                        SocketAddr::new(ip, service_port),
                        fqdn.clone(),
                        service.clone(),
                    ));
                }
            }
            services.push(service);
        }
    }
    // Pod IPs answer as their endpoint; cluster IPs as their Service.
    let placeholder: Authority = match "kubernetes.invalid:1".parse() {
        Ok(a) => a,
        Err(_) => return Snapshot::default(),
    };
    let mut addresses = AddressIndex::build(
        services
            .iter()
            .map(|s| (&placeholder, &s.endpoints, s.opaque)),
    );
    for (addr, name, service) in cluster_ips {
        addresses.insert_service(addr, &name, &service);
    }
    let pods = objects
        .pods
        .iter()
        .map(|((ns, name), pod)| {
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            (
                (ns.clone(), name.clone()),
                format!("{sa}.{ns}.serviceaccount.identity.{}", naming.trust_domain),
            )
        })
        .collect();
    Snapshot {
        by_authority,
        addresses,
        pods,
    }
}

/// A Service port's endpoints across its slices: the ready ones, else
/// (none ready) the serving ones.
fn endpoints(
    objects: &Objects,
    slices: &[&EndpointSlice],
    namespace: &str,
    port_name: Option<&str>,
    naming: &Naming,
) -> BTreeMap<SocketAddr, Endpoint> {
    let mut ready = BTreeMap::new();
    let mut serving = BTreeMap::new();
    for slice in slices {
        // The slice's port of the same name (an unnamed Service port
        // matches the unnamed slice port).
        let Some(target) = slice.ports.iter().flatten().find_map(|p| {
            (p.name.as_deref().unwrap_or("") == port_name.unwrap_or(""))
                .then_some(p.port)
                .flatten()
        }) else {
            continue;
        };
        let Ok(target) = u16::try_from(target) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let conditions = ep.conditions.as_ref();
            // Unset conditions mean true, as the API documents.
            let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let is_serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
            let identity = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref())
                .and_then(|pod| identity(objects, namespace, pod, naming));
            for ip in &ep.addresses {
                let Ok(ip) = ip.parse::<IpAddr>() else {
                    continue;
                };
                let addr = SocketAddr::new(ip, target);
                let endpoint = Endpoint {
                    addr,
                    weight: NonZeroU32::MIN,
                    identity: identity.clone(),
                };
                if is_ready {
                    ready.insert(addr, endpoint);
                } else if is_serving {
                    serving.insert(addr, endpoint);
                }
            }
        }
    }
    if ready.is_empty() { serving } else { ready }
}
