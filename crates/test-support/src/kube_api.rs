//! A Kubernetes API server double: no API server can run on these machines,
//! so the Kubernetes code is tested against this, which speaks the parts of
//! the real protocol weft uses, as the real one does: lists carrying a
//! `resourceVersion` (with equality label selectors); gets by name (404
//! `NotFound` `Status` when absent); watches from a version as a chunked
//! stream of JSON events, with `BOOKMARK`s when asked for, ended at
//! `timeoutSeconds`; a watch from a compacted version answered with a `410
//! Gone` `ERROR` event (the client must list again); `403 Forbidden`
//! `Status` replies for what the client is denied; `TokenReview`s;
//! `SubjectAccessReview`s evaluated by RBAC's rules over the (Cluster)Roles
//! and (Cluster)RoleBindings it holds, and `SelfSubjectAccessReview`s (the
//! client is an administrator unless denied); `/version`; and the pod proxy
//! (`pods/NAME:PORT/proxy/PATH`, relayed to the pod's `status.podIP`).
//! Objects are `k8s-openapi` types or JSON documents (a manifest's),
//! stored as the API serves them. What it does not do (field and set-based
//! label selectors, pagination, writes other than reviews, admission) is
//! not needed by weft and is refused with 400 rather than ignored.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The resources the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Pods,
    ConfigMaps,
    Secrets,
    ServiceAccounts,
    Namespaces,
    Deployments,
    ClusterRoles,
    ClusterRoleBindings,
    Roles,
    RoleBindings,
    MutatingWebhookConfigurations,
}

/// How the API serves a resource: its group's path, plural, kind, apiVersion
/// and whether its objects live in a namespace.
struct Kind {
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    api_version: &'static str,
    namespaced: bool,
}

impl Resource {
    const ALL: [Resource; 13] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Pods,
        Resource::ConfigMaps,
        Resource::Secrets,
        Resource::ServiceAccounts,
        Resource::Namespaces,
        Resource::Deployments,
        Resource::ClusterRoles,
        Resource::ClusterRoleBindings,
        Resource::Roles,
        Resource::RoleBindings,
        Resource::MutatingWebhookConfigurations,
    ];

    fn info(self) -> Kind {
        let (group, plural, kind, api_version, namespaced) = match self {
            Resource::Services => ("/api/v1", "services", "Service", "v1", true),
            Resource::EndpointSlices => (
                "/apis/discovery.k8s.io/v1",
                "endpointslices",
                "EndpointSlice",
                "discovery.k8s.io/v1",
                true,
            ),
            Resource::Pods => ("/api/v1", "pods", "Pod", "v1", true),
            Resource::ConfigMaps => ("/api/v1", "configmaps", "ConfigMap", "v1", true),
            Resource::Secrets => ("/api/v1", "secrets", "Secret", "v1", true),
            Resource::ServiceAccounts => {
                ("/api/v1", "serviceaccounts", "ServiceAccount", "v1", true)
            }
            Resource::Namespaces => ("/api/v1", "namespaces", "Namespace", "v1", false),
            Resource::Deployments => (
                "/apis/apps/v1",
                "deployments",
                "Deployment",
                "apps/v1",
                true,
            ),
            Resource::ClusterRoles => (
                "/apis/rbac.authorization.k8s.io/v1",
                "clusterroles",
                "ClusterRole",
                "rbac.authorization.k8s.io/v1",
                false,
            ),
            Resource::ClusterRoleBindings => (
                "/apis/rbac.authorization.k8s.io/v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                "rbac.authorization.k8s.io/v1",
                false,
            ),
            Resource::Roles => (
                "/apis/rbac.authorization.k8s.io/v1",
                "roles",
                "Role",
                "rbac.authorization.k8s.io/v1",
                true,
            ),
            Resource::RoleBindings => (
                "/apis/rbac.authorization.k8s.io/v1",
                "rolebindings",
                "RoleBinding",
                "rbac.authorization.k8s.io/v1",
                true,
            ),
            Resource::MutatingWebhookConfigurations => (
                "/apis/admissionregistration.k8s.io/v1",
                "mutatingwebhookconfigurations",
                "MutatingWebhookConfiguration",
                "admissionregistration.k8s.io/v1",
                false,
            ),
        };
        Kind {
            group,
            plural,
            kind,
            api_version,
            namespaced,
        }
    }

    fn kind(self) -> &'static str {
        self.info().kind
    }

    fn api_version(self) -> &'static str {
        self.info().api_version
    }

    /// The API group as RBAC names it ("" for the core group).
    fn rbac_group(self) -> &'static str {
        let group = self.info().group;
        group
            .strip_prefix("/apis/")
            .and_then(|g| g.rsplit_once('/'))
            .map_or("", |(g, _)| g)
    }

    fn of<K: k8s_openapi::Resource>() -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == K::KIND)
    }

    fn of_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == kind)
    }
}

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    /// Changes still watchable, oldest first.
    history: VecDeque<Event>,
    /// Versions at or below this are compacted: watching from one is 410.
    compacted: u64,
    /// (verb, resource) the client may not do.
    denied: HashSet<(String, Resource)>,
    /// What `/version` reports: major, minor.
    version: (String, String),
    /// BOOKMARK events sent so far.
    bookmarks: u64,
    /// Bearer token → the user the TokenReview authenticates (with its
    /// audiences), or absent: not authenticated.
    tokens: HashMap<String, (String, Vec<String>)>,
    uid: u64,
}

/// The double, listening on loopback over plain HTTP.
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    /// Ends every open watch (as the real server does at its timeout).
    close_watches: broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many changes a watch may resume from before they are compacted.
const HISTORY: usize = 10_000;

impl ApiServer {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1000,
            compacted: 0,
            version: ("1".into(), "33".into()),
            ..Default::default()
        }));
        let (events, _) = broadcast::channel(65_536);
        let (close_watches, _) = broadcast::channel(4);
        let shared = Shared {
            state: state.clone(),
            events: events.clone(),
            close: close_watches.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            events,
            close_watches,
            task,
        })
    }

    /// Writes a kubeconfig for this server at `path` (what `--kubeconfig`
    /// and KUBECONFIG take).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> anyhow::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\nusers:\n- name: weft\n  user: {{}}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: weft\ncurrent-context: double\n",
                self.url()
            ),
        )?;
        Ok(())
    }

    /// The base URL clients are configured with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces `object` (keyed by namespace and name), as
    /// `ADDED` or `MODIFIED`; returns its new resourceVersion.
    pub fn apply<K>(&self, object: &K) -> anyhow::Result<u64>
    where
        K: k8s_openapi::Resource + serde::Serialize,
    {
        let mut value = serde_json::to_value(object)?;
        value["kind"] = json!(K::KIND);
        value["apiVersion"] = json!(K::API_VERSION);
        self.apply_value(value)
    }

    /// [`ApiServer::apply`] for an object as JSON (a document of a
    /// manifest, say), its resource told by `kind`; namespaced objects
    /// without a namespace go to `default`, as `kubectl apply` puts them.
    pub fn apply_value(&self, mut value: Value) -> anyhow::Result<u64> {
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let resource = Resource::of_kind(&kind)
            .ok_or_else(|| anyhow::anyhow!("the double does not serve kind {kind:?}"))?;
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        anyhow::ensure!(!name.is_empty(), "{kind} without a name");
        let ns = if resource.info().namespaced {
            let ns = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            value["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let key = (resource, ns, name);
        let kind = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let uid = match st.objects.get(&key) {
            Some(old) => old["metadata"]["uid"].clone(),
            None => {
                st.uid += 1;
                json!(format!("00000000-0000-0000-0000-{:012}", st.uid))
            }
        };
        value["apiVersion"] = json!(resource.api_version());
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        value["metadata"]["uid"] = uid;
        st.objects.insert(key, value.clone());
        self.record(&mut st, resource, kind, value);
        Ok(rv)
    }

    /// Deletes the object `namespace/name` of `K`, as `DELETED`.
    pub fn delete<K: k8s_openapi::Resource>(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let resource = Resource::of::<K>()
            .ok_or_else(|| anyhow::anyhow!("the double does not serve {}", K::KIND))?;
        let namespace = if resource.info().namespaced {
            namespace
        } else {
            ""
        };
        let mut st = self.lock();
        let mut value = st
            .objects
            .remove(&(resource, namespace.to_string(), name.to_string()))
            .ok_or_else(|| anyhow::anyhow!("no {} {namespace}/{name}", K::KIND))?;
        st.rv += 1;
        value["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        self.record(&mut st, resource, "DELETED", value);
        Ok(())
    }

    /// Forgets every change so far, as etcd compaction does: a client
    /// watching from an older version is told 410 Gone and must list again.
    /// Open watches are ended, so clients come back with their versions.
    pub fn compact(&self) {
        {
            let mut st = self.lock();
            // A revision of its own, so that every client's last version,
            // however current, is now too old.
            st.rv += 1;
            st.compacted = st.rv;
            st.history.clear();
        }
        let _ = self.close_watches.send(());
    }

    /// Ends every open watch, as the server does at a watch's timeout.
    pub fn end_watches(&self) {
        let _ = self.close_watches.send(());
    }

    /// From now on, requests for `resource` get 403 Forbidden (RBAC).
    pub fn forbid(&self, resource: Resource) {
        for verb in ["get", "list", "watch"] {
            self.deny(verb, resource);
        }
    }

    /// From now on, the client may not `verb` `resource`: such requests
    /// get 403 Forbidden and SelfSubjectAccessReviews of it are not
    /// allowed. (Everything else is allowed: the client is an
    /// administrator.)
    pub fn deny(&self, verb: &str, resource: Resource) {
        self.lock().denied.insert((verb.to_string(), resource));
        let _ = self.close_watches.send(());
    }

    /// The version `/version` reports, as major and minor.
    pub fn set_version(&self, major: &str, minor: &str) {
        self.lock().version = (major.to_string(), minor.to_string());
    }

    /// A TokenReview of `token` authenticates `username` for `audiences`.
    pub fn accept_token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.lock().tokens.insert(
            token.to_string(),
            (
                username.to_string(),
                audiences.iter().map(|a| a.to_string()).collect(),
            ),
        );
    }

    /// BOOKMARK events sent to watchers so far.
    pub fn bookmarks_sent(&self) -> u64 {
        self.lock().bookmarks
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn record(&self, st: &mut State, resource: Resource, kind: &'static str, object: Value) {
        let event = Event {
            rv: st.rv,
            resource,
            kind,
            object,
        };
        st.history.push_back(event.clone());
        while st.history.len() > HISTORY {
            if let Some(old) = st.history.pop_front() {
                st.compacted = old.rv;
            }
        }
        let _ = self.events.send(event);
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    close: broadcast::Sender<()>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A `Status` object, as the API server reports errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, &status(code, reason, message))
}

/// What a request's path names.
enum Target {
    /// A resource's objects: all, or one namespace's.
    Collection(Resource, Option<String>),
    /// One object, by namespace ("" for cluster-scoped ones) and name.
    Object(Resource, String, String),
    /// `pods/{name}:{port}/proxy/{path}`: relayed to the pod, as the API
    /// server does.
    PodProxy {
        namespace: String,
        pod: String,
        port: u16,
        path: String,
    },
}

fn route(path: &str) -> Option<Target> {
    Resource::ALL.into_iter().find_map(|r| {
        let info = r.info();
        let rest = path.strip_prefix(info.group)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.splitn(6, '/').collect();
        let plural = info.plural;
        match (info.namespaced, parts.as_slice()) {
            (_, [p]) if *p == plural => Some(Target::Collection(r, None)),
            (false, [p, name]) if *p == plural => {
                Some(Target::Object(r, String::new(), name.to_string()))
            }
            (true, ["namespaces", ns, p]) if *p == plural => {
                Some(Target::Collection(r, Some(ns.to_string())))
            }
            (true, ["namespaces", ns, p, name]) if *p == plural => {
                Some(Target::Object(r, ns.to_string(), name.to_string()))
            }
            (true, ["namespaces", ns, "pods", target, "proxy", tail @ ..])
                if r == Resource::Pods =>
            {
                let (pod, port) = target.rsplit_once(':')?;
                Some(Target::PodProxy {
                    namespace: ns.to_string(),
                    pod: pod.to_string(),
                    port: port.parse().ok()?,
                    path: format!("/{}", tail.first().copied().unwrap_or_default()),
                })
            }
            _ => None,
        }
    })
}

/// An equality-based label selector (`a=b,c==d`), the only form the
/// double understands.
fn selector(query: &HashMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let Some(raw) = query.get("labelSelector").filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(|term| {
            let (k, v) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| {
                    format!("the double supports only equality selectors, not {term:?}")
                })?;
            if k.ends_with('!') {
                return Err(format!(
                    "the double supports only equality selectors, not {term:?}"
                ));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A request's JSON body, or the 400 the API server answers a bad one with.
async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bad = |e: String| error(StatusCode::BAD_REQUEST, "BadRequest", &e);
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| bad(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
}

/// What an access review asks about.
struct Attributes {
    verb: String,
    group: String,
    resource: String,
    namespace: String,
    name: String,
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let has = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == "*" || x == want))
    };
    has("apiGroups", &a.group)
        && has("resources", &a.resource)
        && has("verbs", &a.verb)
        && rule["resourceNames"]
            .as_array()
            .is_none_or(|n| n.is_empty() || n.iter().any(|x| x == a.name.as_str()))
}

/// RBAC as the API server evaluates it from the (Cluster)Roles and
/// (Cluster)RoleBindings it holds: the binding that allows, if any.
fn rbac_allows(
    objects: &BTreeMap<(Resource, String, String), Value>,
    user: &str,
    groups: &[String],
    a: &Attributes,
) -> Option<String> {
    let subject = |s: &Value, binding_ns: &str| match s["kind"].as_str() {
        Some("ServiceAccount") => {
            user == format!(
                "system:serviceaccount:{}:{}",
                s["namespace"].as_str().unwrap_or(binding_ns),
                s["name"].as_str().unwrap_or_default()
            )
        }
        Some("User") => s["name"] == user,
        Some("Group") => groups.iter().any(|g| s["name"] == g.as_str()),
        _ => false,
    };
    objects.iter().find_map(|((r, ns, name), binding)| {
        let role_ref = &binding["roleRef"];
        let role_key = match r {
            Resource::ClusterRoleBindings => (Resource::ClusterRoles, String::new()),
            Resource::RoleBindings if *ns == a.namespace => match role_ref["kind"].as_str() {
                Some("Role") => (Resource::Roles, ns.clone()),
                _ => (Resource::ClusterRoles, String::new()),
            },
            _ => return None,
        };
        let bound = binding["subjects"]
            .as_array()
            .is_some_and(|subjects| subjects.iter().any(|s| subject(s, ns)));
        if !bound {
            return None;
        }
        let role = objects.get(&(
            role_key.0,
            role_key.1,
            role_ref["name"].as_str().unwrap_or_default().to_string(),
        ))?;
        role["rules"]
            .as_array()?
            .iter()
            .any(|rule| rule_allows(rule, a))
            .then(|| format!("RBAC: allowed by {} {name:?}", r.kind()))
    })
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        if req.method() == Method::POST {
            return match path.as_str() {
                "/apis/authentication.k8s.io/v1/tokenreviews" => self.token_review(req).await,
                "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                    self.access_review(req, false).await
                }
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" => {
                    self.access_review(req, true).await
                }
                _ => error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "the double creates only reviews",
                ),
            };
        }
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the double serves reads only",
            );
        }
        if path == "/version" {
            let (major, minor) = self.lock().version.clone();
            return full(
                StatusCode::OK,
                &json!({
                    "major": major,
                    "minor": minor,
                    "gitVersion": format!("v{major}.{minor}.0"),
                    "platform": "linux/amd64",
                }),
            );
        }
        let Some(target) = route(&path) else {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route {path}"),
            );
        };
        let (resource, namespace, verb) = match &target {
            Target::PodProxy {
                namespace,
                pod,
                port,
                path,
            } => return self.pod_proxy(namespace, pod, *port, path).await,
            Target::Object(r, ns, _) => (*r, Some(ns.clone()), "get"),
            Target::Collection(r, ns) => {
                let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
                (*r, ns.clone(), if watch { "watch" } else { "list" })
            }
        };
        if self.lock().denied.contains(&(verb.to_string(), resource)) {
            let info = resource.info();
            let scope = match namespace.as_deref() {
                Some(ns) if !ns.is_empty() => format!("in the namespace \"{ns}\""),
                _ => "at the cluster scope".into(),
            };
            return error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{} is forbidden: User \"system:serviceaccount:weft:weft-control\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                    info.plural,
                    info.plural,
                    resource.rbac_group(),
                ),
            );
        }
        for unsupported in ["fieldSelector", "continue"] {
            if query.get(unsupported).is_some_and(|v| !v.is_empty()) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("the double does not support {unsupported}"),
                );
            }
        }
        let labels = match selector(&query) {
            Ok(l) => l,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        match target {
            Target::Object(r, ns, name) => self.get(r, ns, name),
            _ if verb == "watch" && !labels.is_empty() => error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the double does not support labelSelector on watches",
            ),
            _ if verb == "watch" => self.watch(resource, namespace, &query),
            _ => self.list(resource, namespace, &labels),
        }
    }

    fn get(&self, resource: Resource, namespace: String, name: String) -> Response<Body> {
        let st = self.lock();
        match st.objects.get(&(resource, namespace, name.clone())) {
            Some(v) => full(StatusCode::OK, v),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", resource.info().plural),
            ),
        }
    }

    /// Relays a GET to the pod's IP, as `kubectl get --raw
    /// /api/v1/namespaces/NS/pods/NAME:PORT/proxy/PATH` does through a
    /// real API server.
    async fn pod_proxy(&self, namespace: &str, pod: &str, port: u16, path: &str) -> Response<Body> {
        let ip = {
            let st = self.lock();
            let Some(object) =
                st.objects
                    .get(&(Resource::Pods, namespace.to_string(), pod.to_string()))
            else {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{pod}\" not found"),
                );
            };
            object["status"]["podIP"]
                .as_str()
                .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        };
        let unavailable = |why: String| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!("error trying to reach service: {why}"),
            )
        };
        let Some(ip) = ip else {
            return unavailable(format!("pod {pod} has no IP"));
        };
        let relay = async {
            let stream = tokio::net::TcpStream::connect((ip, port)).await?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, format!("{ip}:{port}"))
                .body(Full::new(Bytes::new()))?;
            let rsp = send.send_request(req).await?;
            let status = rsp.status();
            let body = rsp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        match tokio::time::timeout(Duration::from_secs(5), relay).await {
            Ok(Ok((status, body))) => {
                let mut rsp = Response::new(Full::new(body).boxed());
                *rsp.status_mut() = status;
                rsp
            }
            Ok(Err(e)) => unavailable(format!("dial tcp {ip}:{port}: {e:#}")),
            Err(_) => unavailable(format!("dial tcp {ip}:{port}: timed out")),
        }
    }

    async fn access_review(&self, req: Request<Incoming>, own: bool) -> Response<Body> {
        let review = match read_json(req).await {
            Ok(v) => v,
            Err(rsp) => return rsp,
        };
        let ra = &review["spec"]["resourceAttributes"];
        if !ra.is_object() {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the double reviews resourceAttributes only",
            );
        }
        let field = |k: &str| ra[k].as_str().unwrap_or_default().to_string();
        let attrs = Attributes {
            verb: field("verb"),
            group: field("group"),
            resource: field("resource"),
            namespace: field("namespace"),
            name: field("name"),
        };
        let st = self.lock();
        let status = if own {
            let denied = Resource::ALL.into_iter().any(|r| {
                r.info().plural == attrs.resource
                    && r.rbac_group() == attrs.group
                    && st.denied.contains(&(attrs.verb.clone(), r))
            });
            if denied {
                json!({"allowed": false, "reason": "denied by the double"})
            } else {
                json!({"allowed": true, "reason": "the client is an administrator"})
            }
        } else {
            let user = review["spec"]["user"].as_str().unwrap_or_default();
            let groups: Vec<String> = review["spec"]["groups"]
                .as_array()
                .map(|g| {
                    g.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            match rbac_allows(&st.objects, user, &groups, &attrs) {
                Some(reason) => json!({"allowed": true, "reason": reason}),
                None => json!({"allowed": false}),
            }
        };
        let mut out = review.clone();
        out["status"] = status;
        full(StatusCode::CREATED, &out)
    }

    fn list(
        &self,
        resource: Resource,
        namespace: Option<String>,
        labels: &[(String, String)],
    ) -> Response<Body> {
        let st = self.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == resource && namespace.as_ref().is_none_or(|n| n == ns))
            .filter(|(_, v)| {
                labels
                    .iter()
                    .all(|(k, want)| v["metadata"]["labels"][k] == want.as_str())
            })
            .map(|(_, v)| v.clone())
            .collect();
        full(
            StatusCode::OK,
            &json!({
                "apiVersion": resource.api_version(),
                "kind": format!("{}List", resource.kind()),
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(
        &self,
        resource: Resource,
        namespace: Option<String>,
        query: &HashMap<String, String>,
    ) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_secs);
        let matches = {
            let namespace = namespace.clone();
            move |e: &Event| {
                e.resource == resource
                    && namespace
                        .as_ref()
                        .is_none_or(|n| e.object["metadata"]["namespace"] == json!(n))
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        // Replay from `from`, then follow live: subscribe first so that
        // nothing falls between the two.
        let mut live = self.events.subscribe();
        let mut close = self.close.subscribe();
        // Everything up to `last_rv` is replayed (from the history, or, for
        // a watch from no version, as the current objects ADDED); live
        // events after it follow.
        let (replay, gone, mut last_rv) = {
            let st = self.lock();
            if from != 0 && from < st.compacted {
                (Vec::new(), true, st.rv)
            } else if from == 0 {
                let replay = st
                    .objects
                    .iter()
                    .filter(|((r, ns, _), _)| {
                        *r == resource && namespace.as_ref().is_none_or(|n| n == ns)
                    })
                    .map(|(_, v)| Event {
                        rv: st.rv,
                        resource,
                        kind: "ADDED",
                        object: v.clone(),
                    })
                    .collect();
                (replay, false, st.rv)
            } else {
                let replay: Vec<Event> = st
                    .history
                    .iter()
                    .filter(|e| e.rv > from && matches(e))
                    .cloned()
                    .collect();
                (replay, false, st.rv)
            }
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            if gone {
                let _ = tx
                    .send(line(json!({
                        "type": "ERROR",
                        "object": status(StatusCode::GONE, "Expired", "too old resource version"),
                    })))
                    .await;
                return;
            }
            for e in replay {
                if tx
                    .send(line(json!({"type": e.kind, "object": e.object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = close.recv() => return,
                    _ = tick.tick(), if bookmarks => {
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": resource.api_version(),
                                "kind": resource.kind(),
                                "metadata": {"resourceVersion": last_rv.to_string()},
                            },
                        });
                        if tx.send(line(bookmark)).await.is_err() {
                            return;
                        }
                        if let Ok(mut st) = state.lock() {
                            st.bookmarks += 1;
                        }
                    }
                    e = live.recv() => match e {
                        Ok(e) if e.rv > last_rv => {
                            last_rv = e.rv;
                            if matches(&e) && tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Fell behind: the client must start over.
                        Err(_) => return,
                    },
                }
            }
        });
        let frames =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let body = StreamBody::new(frames);
        let mut rsp = Response::new(BodyExt::boxed(body));
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        rsp
    }

    async fn token_review(&self, req: Request<Incoming>) -> Response<Body> {
        let review = match read_json(req).await {
            Ok(v) => v,
            Err(rsp) => return rsp,
        };
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let known = self.lock().tokens.get(token).cloned();
        let status = match known {
            Some((user, audiences))
                if wanted.is_empty() || wanted.iter().any(|w| audiences.contains(w)) =>
            {
                json!({
                    "authenticated": true,
                    "user": {"username": user},
                    "audiences": if wanted.is_empty() { audiences } else { wanted },
                })
            }
            _ => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        let mut out = review.clone();
        out["status"] = status;
        out["apiVersion"] = json!("authentication.k8s.io/v1");
        out["kind"] = json!("TokenReview");
        full(StatusCode::CREATED, &out)
    }
}
