//! `weft probe`: checks every configured service on a schedule, both
//! through the mesh (an outbound proxy) and directly (the service's own
//! address), so a failure of the mesh is told apart from a failure of the
//! service. HTTP probes GET a path and expect a status; gRPC probes call
//! `grpc.health.v1.Health/Check` and expect SERVING. Results are served
//! for Prometheus (`probe_success`, `probe_latency_ms`, labelled
//! `path="mesh|direct"`) and as JSON (`/probes.json`) for `weft check`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The probes (YAML; see the README's "Health probing").
    #[arg(long, env = "WEFT_PROBES", value_name = "FILE")]
    probes: PathBuf,
    /// Where `/metrics`, `/probes.json` and `/ready` are served.
    #[arg(long, env = "WEFT_PROBE_LISTEN", default_value = "127.0.0.1:9995")]
    listen: SocketAddr,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The outbound proxy the mesh path goes through.
    proxy: SocketAddr,
    #[serde(default = "default_interval", with = "humantime_serde_shim")]
    interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde_shim")]
    timeout: Duration,
    probes: Vec<ProbeSpec>,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Durations as humantime strings (`500ms`, `10s`).
mod humantime_serde_shim {
    use serde::Deserialize;

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(serde::Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ProbeSpec {
    name: String,
    /// The authority clients use, e.g. `api.demo:8080`.
    authority: String,
    /// The service's own address, around the mesh.
    direct: SocketAddr,
    /// HTTP: the path to GET (default `/`) and the status expected.
    #[serde(default)]
    http: Option<HttpSpec>,
    /// gRPC: `Health/Check` of this service name (`""`: the server).
    #[serde(default)]
    grpc: Option<GrpcSpec>,
}

#[derive(serde::Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    #[serde(default = "root")]
    path: String,
    #[serde(default = "ok")]
    status: u16,
}

fn root() -> String {
    "/".into()
}

fn ok() -> u16 {
    200
}

#[derive(serde::Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct GrpcSpec {
    #[serde(default)]
    service: String,
}

/// One run of one probe on one path.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Outcome {
    pub ok: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the epoch.
    pub at: u64,
}

/// The latest outcome of one probe on both paths.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Result_ {
    pub probe: String,
    pub kind: String,
    pub authority: String,
    pub mesh: Option<OutcomeView>,
    pub direct: Option<OutcomeView>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct OutcomeView {
    pub ok: bool,
    pub latency_ms: f64,
    #[serde(default)]
    pub error: Option<String>,
    pub at: u64,
}

impl From<&Outcome> for OutcomeView {
    fn from(o: &Outcome) -> Self {
        Self {
            ok: o.ok,
            latency_ms: o.latency_ms,
            error: o.error.clone(),
            at: o.at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Labels {
    probe: String,
    path: &'static str,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Path {
    Mesh,
    Direct,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Mesh => "mesh",
            Path::Direct => "direct",
        }
    }
}

struct State {
    registry: Registry,
    success: Family<Labels, Gauge>,
    latency: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    latest: Mutex<HashMap<(String, Path), Outcome>>,
    specs: Vec<ProbeSpec>,
}

/// An HTTP GET of `path` with `authority`, to `to`: in absolute form when
/// `to` is a proxy, which routes by it.
async fn http_get(
    to: SocketAddr,
    authority: &str,
    path: &str,
    absolute: bool,
) -> anyhow::Result<u16> {
    let stream = tokio::net::TcpStream::connect(to).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let uri = if absolute {
        format!("http://{authority}{path}")
    } else {
        path.to_string()
    };
    let req = http::Request::get(uri)
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status().as_u16();
    let _ = rsp.into_body().collect().await;
    driver.abort();
    Ok(status)
}

async fn grpc_check(to: SocketAddr, authority: &str, service: &str) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))?
        .origin(format!("http://{authority}").parse()?)
        .connect()
        .await?;
    let rsp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    let status = rsp.into_inner().status;
    // 1: SERVING.
    anyhow::ensure!(status == 1, "health status {status}, not SERVING");
    Ok(())
}

async fn run_one(spec: &ProbeSpec, path: Path, proxy: SocketAddr, timeout: Duration) -> Outcome {
    let (to, via_proxy) = match path {
        Path::Mesh => (proxy, true),
        Path::Direct => (spec.direct, false),
    };
    let started = Instant::now();
    let attempt = async {
        if let Some(g) = &spec.grpc {
            grpc_check(to, &spec.authority, &g.service).await
        } else {
            let h = spec.http.clone().unwrap_or(HttpSpec {
                path: root(),
                status: ok(),
            });
            let status = http_get(to, &spec.authority, &h.path, via_proxy).await?;
            anyhow::ensure!(
                status == h.status,
                "answered {status}, expected {}",
                h.status
            );
            Ok(())
        }
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("no answer within {timeout:?}")),
    };
    Outcome {
        ok: result.is_ok(),
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        error: result.err().map(|e| format!("{e:#}")),
        at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

impl State {
    fn record(&self, probe: &str, path: Path, outcome: Outcome) {
        let labels = Labels {
            probe: probe.to_string(),
            path: path.as_str(),
        };
        self.success
            .get_or_create(&labels)
            .set(i64::from(outcome.ok));
        self.latency.get_or_create(&labels).set(outcome.latency_ms);
        if let Ok(mut latest) = self.latest.lock() {
            latest.insert((probe.to_string(), path), outcome);
        }
    }

    fn results(&self) -> Vec<Result_> {
        let latest = match self.latest.lock() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        };
        self.specs
            .iter()
            .map(|s| Result_ {
                probe: s.name.clone(),
                kind: if s.grpc.is_some() { "grpc" } else { "http" }.into(),
                authority: s.authority.clone(),
                mesh: latest.get(&(s.name.clone(), Path::Mesh)).map(Into::into),
                direct: latest.get(&(s.name.clone(), Path::Direct)).map(Into::into),
            })
            .collect()
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<File> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, path)
}

/// A probes file's text; `path` names it in errors.
fn parse(text: &str, path: &std::path::Path) -> anyhow::Result<File> {
    let file: File = serde_saphyr::from_str(text)
        .with_context(|| format!("{} is not a probes file", path.display()))?;
    let mut names = std::collections::HashSet::new();
    for (i, p) in file.probes.iter().enumerate() {
        anyhow::ensure!(
            names.insert(p.name.as_str()),
            "{}: probes[{i}].name {:?} is used twice",
            path.display(),
            p.name
        );
        anyhow::ensure!(
            !(p.http.is_some() && p.grpc.is_some()),
            "{}: probes[{i}] ({}) is either http or grpc, not both",
            path.display(),
            p.name
        );
        p.authority.parse::<weft_detect::Authority>().map_err(|_| {
            anyhow::anyhow!(
                "{}: probes[{i}].authority {:?} must be host:port",
                path.display(),
                p.authority
            )
        })?;
    }
    Ok(file)
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let file = load(&args.probes)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    probe(file, listener).await
}

/// Starts probing as the probes file `yaml` says (the demo's own), served
/// on `listener`; stops when the task is dropped.
pub(crate) async fn spawn(
    yaml: &str,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let file = parse(yaml, std::path::Path::new("(the demo's probes)"))?;
    Ok(tokio::spawn(probe(file, listener)))
}

async fn probe(file: File, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let success = Family::<Labels, Gauge>::default();
    let latency = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register(
        "probe_success",
        "Whether the probe's last run succeeded (1) or not (0), through the mesh or directly",
        success.clone(),
    );
    registry.register(
        "probe_latency_ms",
        "The probe's last run's duration, in milliseconds",
        latency.clone(),
    );
    let state = Arc::new(State {
        registry,
        success,
        latency,
        latest: Mutex::new(HashMap::new()),
        specs: file.probes.clone(),
    });
    eprintln!(
        "weft probe: serving http://{}/metrics and /probes.json; {} probes every {:?}",
        listener.local_addr()?,
        file.probes.len(),
        file.interval
    );
    // The server stops with the probing (the demo drops it).
    let served = state.clone();
    // Scrapers and `weft check`s at once.
    let _server = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(crate::serve::http1(
        listener,
        64,
        "weft probe",
        move |req| {
            let rsp = respond(&served, &req);
            async move { rsp }
        },
    )));
    let mut tick = tokio::time::interval(file.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let runs = file.probes.iter().flat_map(|spec| {
            [Path::Mesh, Path::Direct].map(|path| {
                let state = state.clone();
                let spec = spec.clone();
                let (proxy, timeout) = (file.proxy, file.timeout);
                async move {
                    let outcome = run_one(&spec, path, proxy, timeout).await;
                    state.record(&spec.name, path, outcome);
                }
            })
        });
        futures_util::future::join_all(runs).await;
    }
}

/// `/metrics`, `/probes.json` and `/ready`.
fn respond(
    state: &State,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (
                    http::StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode\n".into(),
                ),
            }
        }
        "/probes.json" => (
            http::StatusCode::OK,
            "application/json",
            serde_json::to_string(&state.results()).unwrap_or_else(|_| "[]".into()),
        ),
        "/ready" => (http::StatusCode::OK, "text/plain", "ready\n".into()),
        _ => (
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /probes.json or /ready\n".into(),
        ),
    };
    let mut rsp = http::Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    rsp
}

/// The latest results the `weft probe` whose admin address is `admin`
/// serves.
pub(crate) async fn fetch(admin: SocketAddr) -> anyhow::Result<Vec<Result_>> {
    let f = crate::fetch::get_ok(&format!("http://{admin}/probes.json")).await?;
    serde_json::from_str(&f.body).map_err(|e| anyhow::anyhow!("{admin}/probes.json: {e}"))
}

/// What `weft check` says of one probe's latest results.
pub(crate) fn verdict(r: &Result_) -> Result<String, (bool, String, String)> {
    let says = |o: &Option<OutcomeView>| match o {
        None => "not run yet".to_string(),
        Some(o) if o.ok => format!("ok in {:.1} ms", o.latency_ms),
        Some(o) => o.error.clone().unwrap_or_else(|| "failed".into()),
    };
    let ok = |o: &Option<OutcomeView>| o.as_ref().map(|o| o.ok);
    match (ok(&r.mesh), ok(&r.direct)) {
        (Some(true), Some(true)) => Ok(format!(
            "{} {}: mesh {}, direct {}",
            r.kind,
            r.authority,
            says(&r.mesh),
            says(&r.direct)
        )),
        (Some(false), Some(true)) => Err((
            true,
            format!(
                "the mesh path fails ({}) while the service answers directly ({}): a mesh failure",
                says(&r.mesh),
                says(&r.direct)
            ),
            format!(
                "look at the proxies (`weft check` above), discovery (`weft endpoints {}`) and policy (`weft authz`)",
                r.authority
            ),
        )),
        (_, Some(false)) => Err((
            true,
            format!(
                "the service itself fails: direct {}, mesh {}",
                says(&r.direct),
                says(&r.mesh)
            ),
            "the application, not the mesh: read its log".to_string(),
        )),
        _ => Err((
            false,
            "not run yet".into(),
            "wait one probe interval".into(),
        )),
    }
}
