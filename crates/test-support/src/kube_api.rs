//! A Kubernetes API server double: no API server can run on these machines,
//! so the Kubernetes code is tested against this, which speaks the parts of
//! the real protocol weft uses, as the real one does: lists carrying a
//! `resourceVersion`; watches from one as a chunked stream of JSON events,
//! with `BOOKMARK`s when asked for, ended at `timeoutSeconds`; a watch from
//! a compacted version answered with a `410 Gone` `ERROR` event (the client
//! must list again); `403 Forbidden` `Status` replies for resources it is
//! told to refuse; and `TokenReview` creation. Objects are `k8s-openapi`
//! types, serialised as the API serves them. What it does not do (field and
//! label selectors, pagination, server-side apply, admission) is not
//! needed by weft and is refused with 400 rather than ignored.

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
}

impl Resource {
    const ALL: [Resource; 3] = [Resource::Services, Resource::EndpointSlices, Resource::Pods];

    /// The API group path and plural name.
    fn path(self) -> (&'static str, &'static str) {
        match self {
            Resource::Services => ("/api/v1", "services"),
            Resource::EndpointSlices => ("/apis/discovery.k8s.io/v1", "endpointslices"),
            Resource::Pods => ("/api/v1", "pods"),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Pods => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn of<K: k8s_openapi::Resource>() -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == K::KIND)
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
    forbidden: HashSet<Resource>,
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
        K: k8s_openapi::Resource
            + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>
            + serde::Serialize,
    {
        let resource = Resource::of::<K>()
            .ok_or_else(|| anyhow::anyhow!("the double does not serve {}", K::KIND))?;
        let meta = object.metadata();
        let name = meta.name.clone().unwrap_or_default();
        let ns = meta.namespace.clone().unwrap_or_default();
        anyhow::ensure!(!name.is_empty(), "{} without a name", K::KIND);
        let mut value = serde_json::to_value(object)?;
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
        value["kind"] = json!(resource.kind());
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
        self.lock().forbidden.insert(resource);
        let _ = self.close_watches.send(());
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

/// The resource and namespace a path names: `{group}/{plural}` or
/// `{group}/namespaces/{ns}/{plural}`.
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    Resource::ALL.into_iter().find_map(|r| {
        let (group, plural) = r.path();
        let rest = path.strip_prefix(group)?.strip_prefix('/')?;
        if rest == plural {
            return Some((r, None));
        }
        let rest = rest.strip_prefix("namespaces/")?;
        let (ns, tail) = rest.split_once('/')?;
        (tail == plural).then(|| (r, Some(ns.to_string())))
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
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if req.method() == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            return self.token_review(req).await;
        }
        let Some((resource, namespace)) = route(&path) else {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route {path}"),
            );
        };
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "the double serves reads only",
            );
        }
        if self.lock().forbidden.contains(&resource) {
            let (group, plural) = resource.path();
            return error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{plural} is forbidden: User \"system:serviceaccount:weft:weft-control\" cannot list resource \"{plural}\" in API group \"{}\" at the cluster scope",
                    group
                        .trim_start_matches("/apis/")
                        .trim_start_matches("/api")
                        .trim_end_matches("/v1")
                ),
            );
        }
        for unsupported in ["labelSelector", "fieldSelector", "continue"] {
            if query.get(unsupported).is_some_and(|v| !v.is_empty()) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("the double does not support {unsupported}"),
                );
            }
        }
        let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
        if watch {
            self.watch(resource, namespace, &query)
        } else {
            self.list(resource, namespace)
        }
    }

    fn list(&self, resource: Resource, namespace: Option<String>) -> Response<Body> {
        let st = self.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == resource && namespace.as_ref().is_none_or(|n| n == ns))
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
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let review: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
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
