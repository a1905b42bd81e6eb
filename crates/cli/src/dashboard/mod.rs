//! `weft dashboard`: the mesh in a browser, live. A page (embedded in the
//! binary: it works offline) shows every service's golden metrics, a graph
//! of who calls whom with each edge's success rate and identities, and
//! `weft check`'s results; the server pushes a fresh snapshot every
//! `--refresh` over server-sent events, from the same sources as `weft
//! stat` (the proxies' admin ports, or Prometheus).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::{Semaphore, watch};

use crate::source::Source;
use crate::window::{self, Window};

mod tap;

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");
/// Browsers (tabs) connected at once; more are answered 503.
const MAX_CLIENTS: usize = 64;
/// The window each snapshot reports on, when scraping the proxies.
const WINDOW: Duration = Duration::from_secs(10);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// Live taps open at once: each holds a connection to every proxy.
const MAX_TAPS: usize = 8;
/// Checks run less often than traffic refreshes: they dial every proxy.
const CHECK_EVERY: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Where the dashboard is served.
    #[arg(long, env = "WEFT_DASHBOARD_LISTEN", default_value = "127.0.0.1:50750")]
    listen: SocketAddr,
    /// How often the page is updated.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    #[command(flatten)]
    source: Source,
}

#[derive(serde::Serialize)]
struct Snapshot {
    /// Seconds since the epoch.
    at: u64,
    source: &'static str,
    window_seconds: f64,
    services: Vec<crate::golden::Golden>,
    /// Per service and route (the policy's route names, gRPC methods).
    routes: Vec<RouteRow>,
    edges: Vec<crate::edges::Row>,
    /// Each probe through the mesh and directly, with `weft check`'s
    /// verdict.
    probes: Vec<ProbeRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checks: Option<serde_json::Value>,
    /// Why there are no figures this round, when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct RouteRow {
    service: String,
    route: String,
    #[serde(flatten)]
    golden: crate::golden::Golden,
}

#[derive(serde::Serialize)]
struct ProbeRow {
    #[serde(flatten)]
    result: crate::probe::Result_,
    /// `ok`, `warn` or `fail`, as `weft check` would say.
    status: &'static str,
    detail: String,
}

/// The latest results of every `weft probe` in the targets; a prober that
/// does not answer is a failed row of its own.
async fn probes(source: &Source) -> Vec<ProbeRow> {
    let Ok(probers) = source.probers() else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for p in probers {
        match tokio::time::timeout(Duration::from_secs(2), crate::probe::fetch(p.admin)).await {
            Ok(Ok(results)) => rows.extend(results.into_iter().map(|r| {
                let (status, detail) = match crate::probe::verdict(&r) {
                    Ok(d) => ("ok", d),
                    Err((true, d, hint)) => ("fail", format!("{d} → {hint}")),
                    Err((false, d, hint)) => ("warn", format!("{d} → {hint}")),
                };
                ProbeRow {
                    result: r,
                    status,
                    detail,
                }
            })),
            Ok(Err(e)) => rows.push(ProbeRow::unreachable(&p, format!("{e:#}"))),
            Err(_) => rows.push(ProbeRow::unreachable(&p, "no answer within 2 s".into())),
        }
    }
    rows
}

impl ProbeRow {
    fn unreachable(p: &crate::targets::Target, why: String) -> Self {
        ProbeRow {
            result: crate::probe::Result_ {
                probe: format!("weft probe at {}", p.admin),
                kind: "-".into(),
                authority: String::new(),
                mesh: None,
                direct: None,
            },
            status: "fail",
            detail: format!("{why} → is `weft probe` running?"),
        }
    }
}

/// Per service and route, as the receiving proxies measured it.
fn routes(w: &Window) -> Vec<RouteRow> {
    // A separator no authority or route label holds.
    const SEP: char = '\u{1f}';
    crate::golden::aggregate(w, |l| {
        (l.get("direction").map(String::as_str) == Some("inbound")).then(|| {
            format!(
                "{}{SEP}{}",
                l.get("authority").map_or("", String::as_str),
                l.get("route").map_or("default", String::as_str)
            )
        })
    })
    .into_iter()
    .map(|g| {
        let (service, route) = g
            .name
            .split_once(SEP)
            .unwrap_or((g.name.as_str(), "default"));
        RouteRow {
            service: service.to_string(),
            route: route.to_string(),
            golden: g.clone(),
        }
    })
    .collect()
}

/// Rolling scrapes of the proxies: each refresh adds one, and the window
/// runs from the oldest kept (up to [`WINDOW`] ago) to the newest.
struct Rolling {
    scrapes: VecDeque<(
        Instant,
        Vec<crate::targets::Target>,
        Vec<Option<window::Snapshot>>,
    )>,
}

impl Rolling {
    async fn next(&mut self, source: &Source) -> anyhow::Result<Window> {
        let targets = source.targets()?;
        let now = Instant::now();
        let snapshots = window::snapshots(&targets).await;
        self.scrapes.push_back((now, targets, snapshots));
        while self
            .scrapes
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > WINDOW)
            && self.scrapes.len() > 2
        {
            self.scrapes.pop_front();
        }
        let (Some(first), Some(last)) = (self.scrapes.front(), self.scrapes.back()) else {
            return Ok(Window::default());
        };
        // The same targets in both, or the window starts now.
        if first
            .1
            .iter()
            .map(|t| t.admin)
            .ne(last.1.iter().map(|t| t.admin))
        {
            let last = self.scrapes.pop_back();
            self.scrapes.clear();
            self.scrapes.extend(last);
            return Ok(Window::default());
        }
        Ok(Window::across(
            &first.2,
            &last.2,
            last.0.duration_since(first.0),
        ))
    }
}

async fn collect(args: &Args, tx: watch::Sender<Arc<String>>) {
    let mut rolling = Rolling {
        scrapes: VecDeque::new(),
    };
    let mut tick = tokio::time::interval(args.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check: Option<(Instant, serde_json::Value)> = None;
    loop {
        tick.tick().await;
        let window = match &args.source.prometheus {
            Some(url) => window::query_prometheus(url, Duration::from_secs(60)).await,
            None => rolling.next(&args.source).await,
        };
        let (window, error) = match window {
            Ok(w) => (w, None),
            Err(e) => {
                eprintln!("dashboard: no figures this round: {e:#}");
                (Window::default(), Some(format!("{e:#}")))
            }
        };
        if last_check
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= CHECK_EVERY)
        {
            let checks = crate::check::collect(args.source.targets.clone()).await;
            last_check = Some((Instant::now(), checks));
        }
        let snapshot = Snapshot {
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source: args.source.name(),
            window_seconds: window.seconds,
            services: crate::golden::by_service(&window),
            routes: routes(&window),
            edges: crate::edges::edges(&window),
            probes: probes(&args.source).await,
            checks: last_check.as_ref().map(|(_, c)| c.clone()),
            error,
        };
        match serde_json::to_string(&snapshot) {
            Ok(json) => {
                tx.send_replace(Arc::new(json));
            }
            Err(e) => eprintln!("dashboard: {e}"),
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut rsp = Response::new(Full::new(body.into()).boxed());
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    rsp
}

/// Server-sent events: the current snapshot, then every new one.
fn events(
    mut rx: watch::Receiver<Arc<String>>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    let stream = futures_util::stream::unfold(
        (rx.clone(), permit, true),
        |(mut rx, permit, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let data = rx.borrow_and_update().clone();
            let frame = Frame::data(Bytes::from(format!("data: {data}\n\n")));
            Some((Ok::<_, Infallible>(frame), (rx, permit, false)))
        },
    );
    rx.mark_changed();
    sse(BodyExt::boxed(StreamBody::new(stream)))
}

/// A server-sent event stream.
fn sse(body: Body) -> Response<Body> {
    let mut rsp = Response::new(body);
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    rsp
}

/// What a page asks about the chosen service: its endpoints, as discovery
/// gives them to proxies (the control plane's Destination API).
async fn endpoints(
    req: &Request<Incoming>,
    targets: Option<std::path::PathBuf>,
    lookups: &Semaphore,
) -> Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let service = req
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "service"))
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if service.parse::<weft_detect::Authority>().is_err() {
        return reply(
            StatusCode::BAD_REQUEST,
            TEXT,
            format!("service {service:?} must be host:port\n"),
        );
    }
    let Ok(_permit) = lookups.try_acquire() else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "busy\n");
    };
    let looked_up = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = crate::control::channel_from_targets(targets).await?;
        crate::endpoints::fetch(channel, &service).await
    })
    .await;
    match looked_up {
        Ok(Ok(view)) => match serde_json::to_string(&view) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        },
        Ok(Err(e)) => reply(StatusCode::BAD_GATEWAY, TEXT, format!("{e:#}\n")),
        Err(_) => reply(
            StatusCode::GATEWAY_TIMEOUT,
            TEXT,
            "the control plane did not answer within 10 s\n",
        ),
    }
}

/// What every connection shares.
struct State {
    args: Arc<Args>,
    snapshots: watch::Receiver<Arc<String>>,
    /// Pages following `/events`.
    clients: Arc<Semaphore>,
    /// Endpoint lookups at once (each a TLS connection to the control
    /// plane).
    lookups: Semaphore,
    /// Live taps at once (each holds a connection to every proxy).
    taps: Arc<Semaphore>,
}

async fn handle(req: Request<Incoming>, state: &State) -> Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "/app.js" => reply(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "/app.css" => reply(StatusCode::OK, "text/css; charset=utf-8", APP_CSS),
        "/api/snapshot" => reply(
            StatusCode::OK,
            "application/json",
            state.snapshots.borrow().as_str().to_string(),
        ),
        "/api/endpoints" => {
            endpoints(&req, state.args.source.targets.clone(), &state.lookups).await
        }
        "/api/tap" => match state.taps.clone().try_acquire_owned() {
            Ok(permit) => {
                tap::serve(req.uri().query().unwrap_or(""), &state.args.source, permit).await
            }
            Err(_) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("more than {MAX_TAPS} taps are open; close one\n"),
            ),
        },
        "/events" => match state.clients.clone().try_acquire_owned() {
            Ok(permit) => events(state.snapshots.clone(), permit),
            Err(_) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("more than {MAX_CLIENTS} pages are open\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = watch::channel(Arc::new(
        serde_json::json!({"at": 0, "source": args.source.name(), "window_seconds": 0.0, "services": [], "routes": [], "edges": [], "probes": []})
            .to_string(),
    ));
    eprintln!(
        "weft dashboard: http://{addr}/ (from {}; Ctrl-C stops it)",
        args.source.name()
    );
    let args = Arc::new(args);
    let collector = args.clone();
    tokio::spawn(async move { collect(&collector, tx).await });
    let state = Arc::new(State {
        args,
        snapshots: rx,
        clients: Arc::new(Semaphore::new(MAX_CLIENTS)),
        lookups: Semaphore::new(8),
        taps: Arc::new(Semaphore::new(MAX_TAPS)),
    });
    crate::serve::http1(listener, MAX_CONNECTIONS, "dashboard", move |req| {
        let state = state.clone();
        async move { handle(req, &state).await }
    })
    .await;
    Ok(())
}
