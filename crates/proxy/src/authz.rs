//! The inbound policy in force: for each identity this proxy serves as and
//! each port, the compiled `weft_authz::Server` deciding who gets in, from
//! the destinations file (static mode) or the control plane's
//! `InboundServerPolicies` (one `WatchPort` per port in use). Read once per
//! request (an atomic load and a lookup), replaced whole when the policy
//! changes, so new requests see a change at once and requests in flight
//! are never cut. A port whose policy did not change keeps its `Server`,
//! and with it its rate-limit buckets.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weft_authz::{Client, DefaultPolicy, Denied, PortSpec, Server};
use weft_destinations::{DETECT_TIMEOUT, Destinations, ServerSpec};

use crate::control::Control;
use crate::metrics::authz::{AuthzLabels, RateLimitLabels};
use crate::metrics::{Metrics, TlsLabel};

/// One serving identity's compiled ports.
struct Ports {
    spec: ServerSpec,
    /// For its unlisted ports.
    default: Arc<Server>,
    ports: HashMap<u16, Arc<Server>>,
}

pub struct Authz {
    servers: ArcSwap<HashMap<String, Ports>>,
    /// Bumped on every static policy change, so open opaque connections
    /// are checked again.
    generation: watch::Sender<u64>,
    /// For identities no policy lists (and proxies without identity), and
    /// while the control plane has not answered.
    mesh_default: Arc<Server>,
    limit_clients: NonZeroUsize,
    /// With a control plane: the ports followed by `WatchPort`, bounded
    /// (a client can dial any port of a transparently meshed host), the
    /// least recently used dropped first (its stream ends with it).
    control: Option<(Control, Mutex<Watched>)>,
}

type PortRx = watch::Receiver<Option<Arc<Server>>>;
/// Followed ports by (identity, port).
type Watched = lru::LruCache<(Arc<str>, u16), PortRx>;

/// Most ports followed at once per proxy.
const MAX_WATCHED_PORTS: usize = 256;
/// How long a connection to a port not followed yet waits for the control
/// plane's first answer before the mesh-wide default applies.
const FIRST_ANSWER: std::time::Duration = std::time::Duration::from_secs(1);

fn compiled(spec: &PortSpec, limit_clients: NonZeroUsize) -> Arc<Server> {
    match weft_authz::compile(spec, limit_clients) {
        Ok(s) => Arc::new(s),
        // Specs are checked as they are read (the file parser compiles
        // them); should one still fail, refusing is the safe answer.
        Err(e) => {
            tracing::warn!(server = %spec.name, error = %e, "inbound policy does not compile; denying");
            Arc::new(deny_all(&spec.name))
        }
    }
}

/// A server that admits no one: what a policy this proxy cannot enforce
/// becomes.
pub fn deny_all(name: &str) -> Server {
    Server {
        name: name.into(),
        protocol: weft_authz::Protocol::Detect {
            timeout: DETECT_TIMEOUT,
        },
        authorizations: Vec::new(),
        routes: Vec::new(),
        limiter: None,
    }
}

/// The server standing for a default policy.
fn default_server(policy: DefaultPolicy, limit_clients: NonZeroUsize) -> Arc<Server> {
    compiled(&policy.port_spec(DETECT_TIMEOUT), limit_clients)
}

/// One port's policy, as a connection holds it: read again for every
/// request, so changes apply to requests on open connections too.
pub enum Port {
    Static {
        authz: Arc<Authz>,
        identity: Option<Arc<str>>,
        port: u16,
        generation: watch::Receiver<u64>,
    },
    Watched {
        rx: PortRx,
        fallback: Arc<Server>,
    },
}

impl Port {
    pub fn current(&self) -> Arc<Server> {
        match self {
            Self::Static {
                authz,
                identity,
                port,
                ..
            } => authz.static_server(identity.as_deref(), *port),
            Self::Watched { rx, fallback } => {
                rx.borrow().clone().unwrap_or_else(|| fallback.clone())
            }
        }
    }

    /// Waits until the policy may have changed; never returns once it
    /// can no longer change.
    async fn changed(&mut self) {
        let changed = match self {
            Self::Static { generation, .. } => generation.changed().await,
            Self::Watched { rx, .. } => rx.changed().await,
        };
        if changed.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Authz {
    /// `control`: inbound policy comes from its `InboundServerPolicies`,
    /// else from the destinations file ([`Authz::follow`]).
    pub fn new(
        mesh_default: DefaultPolicy,
        limit_clients: usize,
        control: Option<Control>,
    ) -> Arc<Self> {
        let limit_clients = NonZeroUsize::new(limit_clients).unwrap_or(NonZeroUsize::MIN);
        let watched = NonZeroUsize::new(MAX_WATCHED_PORTS).unwrap_or(NonZeroUsize::MIN);
        Arc::new(Self {
            servers: ArcSwap::from_pointee(HashMap::new()),
            generation: watch::channel(0).0,
            mesh_default: default_server(mesh_default, limit_clients),
            limit_clients,
            control: control.map(|c| (c, Mutex::new(lru::LruCache::new(watched)))),
        })
    }

    /// The policy of `port` for clients reaching `identity`; with a
    /// control plane, followed from the first connection to it on (which
    /// waits up to a second for the first answer).
    pub async fn port(self: &Arc<Self>, identity: Option<Arc<str>>, port: u16) -> Port {
        let (Some((control, watched)), Some(id)) = (&self.control, &identity) else {
            return Port::Static {
                authz: self.clone(),
                // The file's names are kept lower-cased.
                identity: identity.map(|id| id.to_ascii_lowercase().into()),
                port,
                generation: self.generation.subscribe(),
            };
        };
        let mut rx = {
            let mut watched = match watched.lock() {
                Ok(w) => w,
                Err(p) => p.into_inner(),
            };
            let key = (id.clone(), port);
            match watched.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    tokio::spawn(control.clone().follow_port(
                        id.clone(),
                        port,
                        tx,
                        self.limit_clients,
                    ));
                    watched.put(key, rx.clone());
                    rx
                }
            }
        };
        if rx.borrow().is_none() {
            let answered = tokio::time::timeout(FIRST_ANSWER, rx.wait_for(Option::is_some)).await;
            if !matches!(answered, Ok(Ok(_))) {
                tracing::warn!(identity = %id, port, default = %self.mesh_default.name, "no inbound policy from the control plane yet; the mesh-wide default applies");
            }
        }
        Port::Watched {
            rx,
            fallback: self.mesh_default.clone(),
        }
    }

    /// Static mode's policy of `port` for a client reaching `identity`.
    fn static_server(&self, identity: Option<&str>, port: u16) -> Arc<Server> {
        let servers = self.servers.load();
        // Lower-cased once per connection (`port`), not per request.
        let Some(ports) = identity.and_then(|id| servers.get(id)) else {
            return self.mesh_default.clone();
        };
        ports.ports.get(&port).unwrap_or(&ports.default).clone()
    }

    /// Replaces the policy with `specs`, keeping every port whose spec is
    /// unchanged as it is.
    pub fn apply(&self, specs: &HashMap<String, ServerSpec>) {
        let old = self.servers.load();
        let mut next = HashMap::with_capacity(specs.len());
        for (id, spec) in specs {
            let previous = old.get(id);
            let default = match (previous, spec.default) {
                (Some(p), d) if p.spec.default == d => p.default.clone(),
                (_, Some(d)) => default_server(d, self.limit_clients),
                (_, None) => self.mesh_default.clone(),
            };
            let ports = spec
                .ports
                .iter()
                .map(|(port, s)| {
                    let kept = previous
                        .and_then(|p| Some((p.spec.ports.get(port)?, p.ports.get(port)?)))
                        .filter(|(old, _)| *old == s)
                        .map(|(_, server)| server.clone());
                    (
                        *port,
                        kept.unwrap_or_else(|| compiled(s, self.limit_clients)),
                    )
                })
                .collect();
            next.insert(
                id.clone(),
                Ports {
                    spec: spec.clone(),
                    default,
                    ports,
                },
            );
        }
        self.servers.store(Arc::new(next));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Static mode: follows the destinations file's `servers:`.
    pub fn follow(self: &Arc<Self>, mut rx: watch::Receiver<Arc<Destinations>>) {
        let current = rx.borrow_and_update().clone();
        self.apply(&current.servers);
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(authz) = this.upgrade() else { return };
                let current = rx.borrow_and_update().clone();
                authz.apply(&current.servers);
            }
        });
    }
}

/// What an inbound connection's policy decisions need: its port's policy,
/// the application's address, and who the client is.
pub struct InboundConn {
    pub port: Port,
    pub target_addr: std::net::SocketAddr,
    pub client: std::net::SocketAddr,
}

impl InboundConn {
    /// The policy in force now.
    pub fn server(&self) -> Arc<Server> {
        self.port.current()
    }

    fn client<'a>(&self, tls: &'a TlsLabel) -> Client<'a> {
        Client {
            addr: self.client.ip(),
            identity: match tls {
                TlsLabel::Mutual { peer_id } => Some(peer_id),
                TlsLabel::Plain => None,
            },
        }
    }

    fn labels(
        &self,
        server: &Server,
        route: Option<&Arc<str>>,
        authz: Option<&Arc<str>>,
        tls: &TlsLabel,
    ) -> AuthzLabels {
        AuthzLabels {
            target_addr: self.target_addr,
            server: server.name.clone(),
            route: route.cloned(),
            authz: authz.cloned(),
            tls: tls.clone(),
        }
    }

    /// Whether a non-HTTP connection may go on; counted either way.
    /// Whether the connection-level policy admits the client, uncounted:
    /// a question asked before there is a connection to count.
    pub fn admits_connection(&self, tls: &TlsLabel) -> bool {
        self.server()
            .authorize_connection(&self.client(tls))
            .is_ok()
    }

    pub fn authorize_connection(&self, metrics: &Metrics, tls: &TlsLabel) -> bool {
        let server = self.server();
        match server.authorize_connection(&self.client(tls)) {
            Ok(a) => {
                metrics
                    .authz
                    .tcp_allow
                    .get_or_create(&self.labels(&server, None, Some(&a.name), tls))
                    .inc();
                true
            }
            Err(denied) => {
                metrics
                    .authz
                    .tcp_deny
                    .get_or_create(&self.labels(&server, None, None, tls))
                    .inc();
                tracing::debug!(client = %self.client, %denied, "connection refused");
                false
            }
        }
    }

    /// Runs `relay` (an authorized opaque connection) until it ends or a
    /// policy change no longer admits the client: then the connection is
    /// closed, as Linkerd's proxy does, and counted.
    pub async fn while_authorized<F: std::future::Future<Output = ()>>(
        mut self,
        relay: F,
        metrics: &Metrics,
        tls: &TlsLabel,
    ) {
        tokio::pin!(relay);
        loop {
            tokio::select! {
                _ = &mut relay => return,
                _ = self.port.changed() => {
                    let server = self.server();
                    if server.authorize_connection(&self.client(tls)).is_err() {
                        metrics
                            .authz
                            .tcp_terminate
                            .get_or_create(&self.labels(&server, None, None, tls))
                            .inc();
                        tracing::info!(client = %self.client, server = %server.name, "connection closed: the policy no longer admits its client");
                        return;
                    }
                }
            }
        }
    }

    /// Whether a request may go on; counted either way.
    pub fn authorize_request(
        &self,
        metrics: &Metrics,
        tls: &TlsLabel,
        method: &http::Method,
        path: &str,
    ) -> Result<(), Denied> {
        let server = self.server();
        let client = self.client(tls);
        match server.authorize_request(&client, method, path, std::time::Instant::now()) {
            Ok(permit) => {
                metrics
                    .authz
                    .http_allow
                    .get_or_create(&self.labels(
                        &server,
                        Some(&permit.route.name),
                        Some(&permit.authorization.name),
                        tls,
                    ))
                    .inc();
                Ok(())
            }
            Err((route, denied)) => {
                let route = route.map(|r| &r.name);
                match &denied {
                    Denied::NoRoute { .. } => metrics
                        .authz
                        .http_route_not_found
                        .get_or_create(&self.labels(&server, None, None, tls))
                        .inc(),
                    Denied::Unauthorized { .. } => metrics
                        .authz
                        .http_deny
                        .get_or_create(&self.labels(&server, route, None, tls))
                        .inc(),
                    Denied::RateLimited { scope, .. } => metrics
                        .authz
                        .rate_limited
                        .get_or_create(&RateLimitLabels {
                            target_addr: self.target_addr,
                            server: server.name.clone(),
                            limit: scope.as_str(),
                            tls: tls.clone(),
                        })
                        .inc(),
                };
                tracing::debug!(client = %self.client, %denied, "request refused");
                Err(denied)
            }
        }
    }
}
