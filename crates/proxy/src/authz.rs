//! The inbound policy in force: for each identity this proxy serves as and
//! each port, the compiled `weft_authz::Server` deciding who gets in. Read
//! once per request (an atomic load and a lookup), replaced whole when the
//! policy changes, so new requests see a change at once and requests in
//! flight are never cut. A port whose policy did not change keeps its
//! `Server`, and with it its rate-limit buckets.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weft_authz::{Client, DefaultPolicy, Denied, PortSpec, Protocol, Server};
use weft_destinations::{DETECT_TIMEOUT, Destinations, ServerSpec};

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
    /// For identities no policy lists (and proxies without identity).
    mesh_default: Arc<Server>,
    limit_clients: NonZeroUsize,
}

fn compiled(spec: &PortSpec, limit_clients: NonZeroUsize) -> Arc<Server> {
    match weft_authz::compile(spec, limit_clients) {
        Ok(s) => Arc::new(s),
        // Specs are checked as they are read (the file parser compiles
        // them); should one still fail, refusing is the safe answer.
        Err(e) => {
            tracing::warn!(server = %spec.name, error = %e, "inbound policy does not compile; denying");
            default_server(DefaultPolicy::Deny, limit_clients)
        }
    }
}

/// The server standing for a default policy.
fn default_server(policy: DefaultPolicy, limit_clients: NonZeroUsize) -> Arc<Server> {
    let spec = PortSpec {
        name: format!("default:{policy}"),
        protocol: Protocol::Detect {
            timeout: DETECT_TIMEOUT,
        },
        default: policy,
        authorizations: Vec::new(),
        rate_limit: None,
    };
    match weft_authz::compile(&spec, limit_clients) {
        Ok(s) => Arc::new(s),
        Err(_) => Arc::new(Server {
            name: spec.name.into(),
            protocol: spec.protocol,
            authorizations: Vec::new(),
            routes: Vec::new(),
            limiter: None,
        }),
    }
}

impl Authz {
    pub fn new(mesh_default: DefaultPolicy, limit_clients: usize) -> Arc<Self> {
        let limit_clients = NonZeroUsize::new(limit_clients).unwrap_or(NonZeroUsize::MIN);
        Arc::new(Self {
            servers: ArcSwap::from_pointee(HashMap::new()),
            mesh_default: default_server(mesh_default, limit_clients),
            limit_clients,
        })
    }

    /// The policy of `port` for a client reaching `identity`.
    pub fn server(&self, identity: Option<&str>, port: u16) -> Arc<Server> {
        let servers = self.servers.load();
        let Some(ports) = identity.and_then(|id| servers.get(&id.to_ascii_lowercase())) else {
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

/// What an inbound connection's policy decisions need: whose policy, which
/// port, and who the client is.
pub struct InboundConn {
    pub authz: Arc<Authz>,
    /// The identity served.
    pub server_id: Option<Arc<str>>,
    /// The application's address: its port selects the policy.
    pub target_addr: std::net::SocketAddr,
    pub client: std::net::SocketAddr,
}

impl InboundConn {
    /// The policy in force now.
    pub fn server(&self) -> Arc<Server> {
        self.authz
            .server(self.server_id.as_deref(), self.target_addr.port())
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
