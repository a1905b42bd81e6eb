//! h2load (Debian's nghttp2-client), the load generator of the tests and
//! the benchmark: one way to run it and read what it saw.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// One h2load run.
#[derive(Clone, Debug)]
pub struct H2load {
    pub url: String,
    /// HTTP/1.1 (keep-alive) rather than h2c.
    pub h1: bool,
    pub clients: u32,
    /// Concurrent streams per connection (h2c only).
    pub streams: u32,
    /// Requests per second per client; `None` for as fast as possible.
    pub rps: Option<u32>,
    pub duration_secs: u64,
    pub warm_up_secs: u64,
    pub authority: Option<String>,
    /// Per-request log (start µs, status, µs to the end of the response).
    pub log: PathBuf,
    /// Runs h2load under this command (e.g. `ip netns exec NS setpriv
    /// --reuid nobody ...`); empty for none.
    pub prefix: Vec<String>,
}

/// What one run saw.
#[derive(Clone, Debug, Default)]
pub struct H2loadResult {
    pub succeeded: u64,
    /// Failed, errored or timed out (h2load's three ways to lose a request).
    pub failed: u64,
    /// Responses with a 5xx status (h2load counts them as succeeded).
    pub status_5xx: u64,
    pub rps: f64,
    /// Per request: (start, µs since the epoch; latency µs), in start order.
    pub requests: Vec<(u64, f64)>,
    /// Every latency, sorted, in µs.
    pub latencies_us: Vec<f64>,
    pub stdout: String,
}

impl H2loadResult {
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed
    }
}

impl H2load {
    pub fn new(url: impl Into<String>, log: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            h1: false,
            clients: 1,
            streams: 1,
            rps: None,
            duration_secs: 5,
            warm_up_secs: 0,
            authority: None,
            log: log.into(),
            prefix: Vec::new(),
        }
    }

    /// Runs to the end (blocking).
    pub fn run(&self) -> anyhow::Result<H2loadResult> {
        // h2load appends to its log file; each run must start from nothing.
        let _ = std::fs::remove_file(&self.log);
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = crate::process::std_command(program);
                c.args(args).arg("h2load");
                c
            }
            None => crate::process::std_command("h2load"),
        };
        if self.h1 {
            cmd.arg("--h1");
        }
        cmd.args(["-c", &self.clients.to_string()]);
        if !self.h1 && self.streams > 1 {
            cmd.args(["-m", &self.streams.to_string()]);
        }
        if let Some(rps) = self.rps {
            cmd.arg(format!("--rps={rps}"));
        }
        if let Some(a) = &self.authority {
            cmd.args(["-H", &format!(":authority: {a}")]);
        }
        cmd.args(["-D", &self.duration_secs.to_string()]);
        if self.warm_up_secs > 0 {
            cmd.args(["--warm-up-time", &self.warm_up_secs.to_string()]);
        }
        cmd.arg(format!("--log-file={}", self.log.display()))
            .arg(&self.url);
        let out = cmd
            .output()
            .context("running h2load (Debian package nghttp2-client)")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "h2load {} failed: {stdout}{}",
                self.url,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let requests_line = stdout
            .lines()
            .find(|l| l.starts_with("requests:"))
            .with_context(|| format!("no requests line in h2load output:\n{stdout}"))?;
        let number_before = |word: &str| -> u64 {
            requests_line
                .split(',')
                .find(|p| p.trim().ends_with(word))
                .and_then(|p| p.split_whitespace().rev().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let succeeded = number_before("succeeded");
        let failed = number_before("failed") + number_before("errored") + number_before("timeout");
        let rps = stdout
            .lines()
            .find(|l| l.starts_with("finished in"))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        let status_5xx = stdout
            .lines()
            .find(|l| l.starts_with("status codes:"))
            .and_then(|l| l.split(',').find(|p| p.trim().ends_with("5xx")))
            .and_then(|p| p.split_whitespace().rev().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let log_text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        let mut requests: Vec<(u64, f64)> = log_text
            .lines()
            .filter_map(|l| {
                let mut cols = l.split('\t');
                let start = cols.next()?.trim().parse().ok()?;
                let latency = cols.nth(1)?.trim().parse().ok()?;
                Some((start, latency))
            })
            .collect();
        requests.sort_by_key(|r| r.0);
        let mut latencies_us: Vec<f64> = requests.iter().map(|r| r.1).collect();
        latencies_us.sort_by(|a, b| a.total_cmp(b));
        Ok(H2loadResult {
            succeeded,
            failed,
            status_5xx,
            rps,
            requests,
            latencies_us,
            stdout,
        })
    }
}

/// One oha run (`cargo install oha`): a fixed rate of requests over
/// keep-alive connections that, unlike h2load, opens a new connection when
/// a server closes one (GOAWAY, `Connection: close`), as applications do.
#[derive(Clone, Debug)]
pub struct Oha {
    pub url: String,
    pub http2: bool,
    pub connections: u32,
    /// Requests per second, all connections together.
    pub rate: u32,
    pub requests: u64,
}

/// What one oha run saw.
#[derive(Clone, Debug, Default)]
pub struct OhaResult {
    /// Responses by status code.
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// Requests that got no response, by error.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub slowest_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl OhaResult {
    pub fn responses(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn failed(&self) -> u64 {
        self.errors.values().sum::<u64>()
            + self
                .statuses
                .iter()
                .filter(|(s, _)| !s.starts_with('2'))
                .map(|(_, n)| n)
                .sum::<u64>()
    }
}

impl Oha {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            http2: false,
            connections: 10,
            rate: 1000,
            requests: 1000,
        }
    }

    /// Runs to the end (blocking).
    pub fn run(&self) -> anyhow::Result<OhaResult> {
        let mut cmd = crate::process::std_command("oha");
        cmd.args(["--no-tui", "--output-format", "json"])
            .args(["-c", &self.connections.to_string()])
            .args(["-q", &self.rate.to_string()])
            .args(["-n", &self.requests.to_string()]);
        if self.http2 {
            cmd.arg("--http2");
        }
        cmd.arg(&self.url);
        let out = cmd
            .output()
            .context("running oha (cargo install oha --locked)")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "oha {} failed: {stdout}{}",
                self.url,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("oha printed no JSON:\n{stdout}"))?;
        let counts = |key: &str| -> std::collections::BTreeMap<String, u64> {
            json[key]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) * 1000.0;
        Ok(OhaResult {
            statuses: counts("statusCodeDistribution"),
            errors: counts("errorDistribution"),
            slowest_ms: ms(&json["summary"]["slowest"]),
            p50_ms: ms(&json["latencyPercentiles"]["p50"]),
            p99_ms: ms(&json["latencyPercentiles"]["p99"]),
        })
    }
}

/// What [`steady`] saw.
#[derive(Clone, Debug, Default)]
pub struct SteadyResult {
    pub ok: u64,
    /// Requests sent a second time because a GOAWAY failed the first try.
    pub resent: u64,
    /// Each request that got no 2xx, with why.
    pub failed: Vec<String>,
    pub slowest: std::time::Duration,
    /// Every request's latency (retries included), in ms, in no order.
    pub latencies_ms: Vec<f64>,
}

/// `total` GETs of `url` at `rate` per second from `workers` concurrent
/// callers through hyper-util's pooled client over h2c (prior knowledge):
/// how a Rust service (reqwest, tonic) calls another. A request failed by
/// the server's GOAWAY (refused by the client's connection after it, or
/// on a stream above the GOAWAY's last stream id) was not processed, and
/// is sent once more on a new connection, as RFC 9113 (sections 6.8 and
/// 8.7) allows and Go's net/http and grpc-go do; hyper's client reports it
/// instead, and oha counts it as a failure.
pub async fn steady_h2c(
    url: &str,
    rate: u32,
    total: u64,
    workers: u32,
) -> anyhow::Result<SteadyResult> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri: http::Uri = url.parse()?;
    let period = std::time::Duration::from_secs_f64(f64::from(workers) / f64::from(rate.max(1)));
    let per_worker = total / u64::from(workers.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = client.clone();
        let uri = uri.clone();
        tasks.spawn(async move {
            let mut r = SteadyResult::default();
            // Workers start spread over one period, so the rate is even.
            let offset = period.mul_f64(f64::from(w) / f64::from(workers.max(1)));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for _ in 0..per_worker {
                tick.tick().await;
                let started = std::time::Instant::now();
                let mut outcome = Err(String::new());
                for attempt in 0..2 {
                    let req = match http::Request::get(uri.clone()).body(Empty::new()) {
                        Ok(req) => req,
                        Err(e) => {
                            outcome = Err(e.to_string());
                            break;
                        }
                    };
                    outcome = match client.request(req).await {
                        Ok(rsp) if rsp.status().is_success() => {
                            match rsp.into_body().collect().await {
                                Ok(_) => Ok(()),
                                Err(e) => Err(format!("body: {e}")),
                            }
                        }
                        Ok(rsp) => Err(format!("status {}", rsp.status())),
                        Err(e) if attempt == 0 && refused_by_goaway(&e) => {
                            r.resent += 1;
                            continue;
                        }
                        Err(e) => Err(format!("{e:?}")),
                    };
                    break;
                }
                r.slowest = r.slowest.max(started.elapsed());
                r.latencies_ms
                    .push(started.elapsed().as_secs_f64() * 1000.0);
                match outcome {
                    Ok(()) => r.ok += 1,
                    Err(e) => r.failed.push(e),
                }
            }
            r
        });
    }
    let mut all = SteadyResult::default();
    while let Some(r) = tasks.join_next().await {
        let r = r?;
        all.ok += r.ok;
        all.resent += r.resent;
        all.failed.extend(r.failed);
        all.slowest = all.slowest.max(r.slowest);
        all.latencies_ms.extend(r.latencies_ms);
    }
    Ok(all)
}

/// Whether the server's graceful GOAWAY failed this request, which it then
/// did not process.
fn refused_by_goaway(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = err.source();
    }
    false
}
