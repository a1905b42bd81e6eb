//! Traffic-policy scenarios for `cargo xtask bench`: each starts its own
//! backends (`weft-test-backend` with injected failures or latency) and a
//! fresh proxy (cold start matters), and drives it with h2load at 1k RPS
//! or flat out.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::bench::{Mode, Proto, Target, h2load, percentile, start_proxy};
use crate::procs::{Proc, spawn_until, target_dir};

const AUTHORITY: &str = "api.bench:80";

#[derive(Debug, Serialize)]
pub(crate) struct PolicyRow {
    pub(crate) scenario: &'static str,
    pub(crate) variant: String,
    pub(crate) requests: u64,
    /// Transport failures and 5xx responses.
    pub(crate) failed: u64,
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// Proxy CPU per request.
    pub(crate) cpu_us_per_request: f64,
    /// Lowest and highest CPU per request over the rounds, when the
    /// scenario ran in rounds.
    pub(crate) cpu_us_per_request_range: Option<(f64, f64)>,
    /// Against the scenario's first variant, round by round, when the
    /// variants took turns.
    pub(crate) paired: Option<Paired>,
}

/// One variant against the scenario's first, each round compared with
/// the same round's first variant, so that what the machine did in that
/// round (a neighbour's load, the CPU's clock) divides out. The median
/// round is the figure: one disturbed round moves it by one place, not
/// by its size.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Paired {
    pub(crate) rounds: usize,
    /// CPU per request, this variant's over the first's, in per cent more.
    pub(crate) cpu_more_pct_median: f64,
    pub(crate) cpu_more_pct_range: (f64, f64),
    /// Requests per second, this variant's over the first's.
    pub(crate) rps_ratio_median: f64,
    pub(crate) rps_ratio_range: (f64, f64),
}

impl Paired {
    /// `first` holds the first variant's (CPU per request, req/s) by round.
    fn of(rounds: &[PolicyRow], first: &[(f64, f64)]) -> Option<Paired> {
        let pairs = rounds.iter().zip(first);
        let cpu: Vec<f64> = pairs
            .clone()
            .map(|(r, (cpu, _))| (r.cpu_us_per_request / cpu - 1.0) * 100.0)
            .filter(|v| v.is_finite())
            .collect();
        let rps: Vec<f64> = pairs
            .map(|(r, (_, rps))| r.rps / rps)
            .filter(|v| v.is_finite())
            .collect();
        Some(Paired {
            rounds: cpu.len(),
            cpu_more_pct_median: median(&cpu)?,
            cpu_more_pct_range: range(&cpu)?,
            rps_ratio_median: median(&rps)?,
            rps_ratio_range: range(&rps)?,
        })
    }
}

/// The costs judged: what a policy adds to each request, the median of
/// its paired rounds, against the goal of 5 %.
pub(crate) fn targets(rows: &[PolicyRow]) -> Vec<Target> {
    [
        (
            "d:",
            "3 routes",
            "CPU per request added by a 3-route policy (h2c max)",
        ),
        (
            "e:",
            "20 authorizations + rate limit",
            "CPU per request added by 20 authorizations and a rate limit (inbound, h2c max)",
        ),
    ]
    .into_iter()
    .filter_map(|(scenario, variant, name)| {
        let row = rows
            .iter()
            .find(|r| r.scenario.starts_with(scenario) && r.variant == variant)?;
        let p = row.paired?;
        let (lo, hi) = p.cpu_more_pct_range;
        Some(Target {
            name: format!(
                "{name}, median of {} paired rounds ({lo:+.1} to {hi:+.1} %)",
                p.rounds
            ),
            measured: p.cpu_more_pct_median,
            limit: 5.0,
            unit: "%",
            pass: p.cpu_more_pct_median <= 5.0,
        })
    })
    .collect()
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().reduce(f64::min)?;
    let hi = v.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// Rounds of the interleaved scenarios (d), (e), (f) in the full run.
const ROUNDS: usize = 4;

/// One row for several rounds: totals, CPU per request over them all and
/// its spread, and the median round's latencies.
fn combine(scenario: &'static str, variant: &str, mut rounds: Vec<PolicyRow>) -> PolicyRow {
    let requests: u64 = rounds.iter().map(|r| r.requests).sum();
    let cpu_us: f64 = rounds
        .iter()
        .map(|r| r.cpu_us_per_request * r.requests as f64)
        .sum();
    let cpu: Vec<f64> = rounds.iter().map(|r| r.cpu_us_per_request).collect();
    let range = range(&cpu);
    rounds.sort_by(|a, b| a.p50_us.total_cmp(&b.p50_us));
    let mid = &rounds[rounds.len() / 2];
    PolicyRow {
        scenario,
        variant: variant.to_string(),
        requests,
        failed: rounds.iter().map(|r| r.failed).sum(),
        rps: rounds.iter().map(|r| r.rps).sum::<f64>() / rounds.len().max(1) as f64,
        p50_us: mid.p50_us,
        p99_us: mid.p99_us,
        cpu_us_per_request: cpu_us / requests.max(1) as f64,
        cpu_us_per_request_range: range,
        paired: None,
    }
}

/// Proxies side by side taking turns, round after round, so a noisy
/// neighbour lands on all alike; one row per variant, with its spread and
/// its rounds paired with the first variant's. Every other round runs the
/// variants in reverse, so that whatever drifts within a round (the
/// backend's warmth, the page cache, a neighbour starting) favours none.
fn interleaved(
    scenario: &'static str,
    dir: &Path,
    variants: &[(&'static str, (Proc, SocketAddr))],
    round: Drive,
    rounds: usize,
) -> anyhow::Result<Vec<PolicyRow>> {
    let mut by_variant: Vec<Vec<PolicyRow>> = variants.iter().map(|_| Vec::new()).collect();
    for n in 0..rounds {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if n % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (variant, (p, addr)) = &variants[i];
            by_variant[i].push(measure(scenario, *variant, dir, (p, *addr), round, || {})?);
        }
    }
    let first: Vec<(f64, f64)> = by_variant
        .first()
        .map(|r| {
            r.iter()
                .map(|row| (row.cpu_us_per_request, row.rps))
                .collect()
        })
        .unwrap_or_default();
    Ok(variants
        .iter()
        .zip(by_variant)
        .enumerate()
        .map(|(i, ((variant, _), rounds))| {
            let paired = (i > 0).then(|| Paired::of(&rounds, &first)).flatten();
            PolicyRow {
                paired,
                ..combine(scenario, variant, rounds)
            }
        })
        .collect())
}

pub(crate) fn backend(name: &str, flags: &[&str]) -> anyhow::Result<(Proc, SocketAddr)> {
    let bin = target_dir()?.join("release/weft-test-backend");
    let mut cmd = weft_test_support::process::std_command(bin);
    cmd.args(["--listen", "127.0.0.1:0", "--name", name])
        .args(flags);
    let (proc, line) = spawn_until("backend", cmd, "listening ", false)?;
    let addr = line
        .trim_start_matches("listening ")
        .trim()
        .parse()
        .context("backend address")?;
    Ok((proc, addr))
}

/// A fresh proxy routing `AUTHORITY` to `endpoints` with `policy` (YAML
/// lines at the destination's indentation).
fn proxy(dir: &Path, endpoints: &[SocketAddr], policy: &str) -> anyhow::Result<(Proc, SocketAddr)> {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{{addr: {e}}}")).collect();
    let file = dir.join(format!("policy-{}.yaml", unique_suffix()));
    std::fs::write(
        &file,
        format!(
            "destinations:\n  \"{AUTHORITY}\":\n    endpoints: [{}]\n{policy}",
            list.join(", ")
        ),
    )?;
    let bin = crate::procs::proxy_bin()?;
    let (p, outbound, _) = start_proxy(
        &bin,
        &[("WEFT_PROXY_DESTINATIONS", file.display().to_string())],
    )?;
    Ok((p, outbound))
}

fn unique_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// How h2load drives a scenario.
#[derive(Clone, Copy)]
struct Drive {
    proto: Proto,
    mode: Mode,
    secs: u64,
}

fn measure(
    scenario: &'static str,
    variant: impl Into<String>,
    dir: &Path,
    proxy: (&Proc, SocketAddr),
    drive: Drive,
    during: impl FnOnce(),
) -> anyhow::Result<PolicyRow> {
    let (proc, outbound) = proxy;
    let Drive { proto, mode, secs } = drive;
    let cpu_before = proc.cpu_seconds();
    let log = dir.join("policy-h2load.log");
    let url = format!("http://{outbound}/");
    let r = std::thread::scope(|s| {
        let run = s.spawn(|| h2load(proto, mode, &url, Some(AUTHORITY), secs, &log));
        during();
        run.join()
            .map_err(|_| anyhow::anyhow!("h2load thread panicked"))?
    })?;
    let cpu = proc.cpu_seconds() - cpu_before;
    let lat = &r.latencies_us;
    let row = PolicyRow {
        scenario,
        variant: variant.into(),
        requests: r.total(),
        failed: r.failed + r.status_5xx,
        rps: r.rps,
        p50_us: percentile(lat, 50.0),
        p99_us: percentile(lat, 99.0),
        cpu_us_per_request: cpu * 1e6 / r.total().max(1) as f64,
        cpu_us_per_request_range: None,
        paired: None,
    };
    eprintln!(
        "  {:<28} {:<28} {:>8.0} req/s  p50 {:>8.0} µs  p99 {:>9.0} µs  failed {:>5}  {:>5.1} µs CPU/req",
        row.scenario,
        row.variant,
        row.rps,
        row.p50_us,
        row.p99_us,
        row.failed,
        row.cpu_us_per_request
    );
    Ok(row)
}

pub(crate) fn run(dir: &Path, secs: u64) -> anyhow::Result<Vec<PolicyRow>> {
    let mut rows = Vec::new();
    let rate = Drive {
        proto: Proto::H1,
        mode: Mode::Rate1k,
        secs,
    };
    let max = Drive {
        proto: Proto::H2c,
        mode: Mode::Max,
        secs,
    };

    // (a) One of three replicas killed half-way through, at 1k RPS.
    for (variant, policy) in [
        ("no retries", ""),
        ("retry: {attempts: 2}", "    retry: {attempts: 2}\n"),
    ] {
        let mut replicas = Vec::new();
        for name in ["a", "b", "c"] {
            replicas.push(backend(name, &[])?);
        }
        let addrs: Vec<SocketAddr> = replicas.iter().map(|(_, a)| *a).collect();
        let (p, out) = proxy(dir, &addrs, policy)?;
        let victim = replicas.pop();
        rows.push(measure(
            "a: 1 of 3 killed mid-run",
            variant,
            dir,
            (&p, out),
            rate,
            move || {
                std::thread::sleep(Duration::from_secs(secs / 2 + 1));
                drop(victim);
            },
        )?);
    }

    // (b) One of five replicas slower, from a freshly started proxy. A
    // 1 ms delay answers in about 2 ms (the backend's timer ticks in
    // milliseconds; see the all-healthy p50 less scenario (a)'s), so ten
    // and thirty times slower are 20 and 60 ms.
    for (variant, slow_delay) in [
        ("all healthy (~2 ms)", None),
        ("1 of 5 10x slower (20 ms)", Some("20ms")),
        ("1 of 5 30x slower (60 ms)", Some("60ms")),
    ] {
        let mut replicas = Vec::new();
        for i in 0..5 {
            let delay = match (i, slow_delay) {
                (0, Some(d)) => d,
                _ => "1ms",
            };
            replicas.push(backend(&format!("r{i}"), &["--delay", delay])?);
        }
        let addrs: Vec<SocketAddr> = replicas.iter().map(|(_, a)| *a).collect();
        let (p, out) = proxy(dir, &addrs, "")?;
        rows.push(measure(
            "b: slow replica, cold start",
            variant,
            dir,
            (&p, out),
            rate,
            || {},
        )?);
    }

    // (c) One replica answers 10 % of requests 100 ms late (the balancer
    // alone mostly steers around it), and every replica answers 5 % late
    // (nothing to steer to: hedging's case).
    for (shape, late) in [
        (
            "c: 1 of 3 replicas 10% late by 100ms",
            [Some("10:100ms"), None, None],
        ),
        ("c: all 3 replicas 5% late by 100ms", [Some("20:100ms"); 3]),
    ] {
        for (variant, policy) in [
            ("no hedging", ""),
            ("hedge: {after: p90}", "    hedge: {after: p90}\n"),
        ] {
            let mut replicas = Vec::new();
            for (i, slow) in late.iter().enumerate() {
                let flags: Vec<&str> = slow.map(|s| vec!["--slow", s]).unwrap_or_default();
                replicas.push(backend(&format!("r{i}"), &flags)?);
            }
            let addrs: Vec<SocketAddr> = replicas.iter().map(|(_, a)| *a).collect();
            let (p, out) = proxy(dir, &addrs, policy)?;
            rows.push(measure(shape, variant, dir, (&p, out), rate, || {})?);
        }
    }

    // (d) The policy layer's own cost: flat out over h2c, no policy vs
    // three routes (all to the same replica).
    let routes = "    routes:\n      - name: canary\n        match: {headers: {x-canary: \"1\"}}\n        backends: [{destination: \"api.bench:80\"}]\n      - name: api\n        match: {path_prefix: /api}\n        backends: [{destination: \"api.bench:80\"}]\n      - name: rest\n        backends: [{destination: \"api.bench:80\", weight: 90}, {destination: \"api.bench:80\", weight: 10}]\n";
    let one = backend("one", &[])?;
    let variants = [
        ("no policy", proxy(dir, &[one.1], "")?),
        ("3 routes", proxy(dir, &[one.1], routes)?),
    ];
    let round = Drive {
        secs: (secs / 2).max(2),
        ..max
    };
    rows.extend(interleaved(
        "d: policy cost (h2c max)",
        dir,
        &variants,
        round,
        ROUNDS,
    )?);
    rows.extend(inbound_authz(dir, &one, round, ROUNDS)?);
    rows.extend(run_trace(dir, secs)?);
    Ok(rows)
}

/// (f) Tracing's cost: flat out over h2c through an outbound proxy, with
/// tracing off, and exporting to a real OTLP receiver at 0 %, 1 % and
/// 100 % head sampling, interleaved round after round.
pub(crate) fn run_trace(dir: &Path, secs: u64) -> anyhow::Result<Vec<PolicyRow>> {
    let one = backend("one", &[])?;
    let (_receiver, collector) = backend("otlp", &["--mode", "otlp"])?;
    let round = Drive {
        proto: Proto::H2c,
        mode: Mode::Max,
        secs: (secs / 2).max(2),
    };
    let traced = |sample: &str| -> anyhow::Result<(Proc, SocketAddr)> {
        let list = format!("{{addr: {}}}", one.1);
        let file = dir.join(format!("trace-{}.yaml", unique_suffix()));
        std::fs::write(
            &file,
            format!("destinations:\n  \"{AUTHORITY}\":\n    endpoints: [{list}]\n"),
        )?;
        let bin = crate::procs::proxy_bin()?;
        let mut env = vec![("WEFT_PROXY_DESTINATIONS", file.display().to_string())];
        if !sample.is_empty() {
            env.push(("WEFT_PROXY_TRACE_COLLECTOR", collector.to_string()));
            env.push(("WEFT_PROXY_TRACE_SAMPLE", sample.to_string()));
            // Ample queue: the figure is the cost of tracing, not of
            // dropping.
            env.push(("WEFT_PROXY_TRACE_QUEUE", "100000".to_string()));
        }
        let (p, outbound, _) = start_proxy(&bin, &env)?;
        Ok((p, outbound))
    };
    let variants = [
        ("tracing off", traced("")?),
        ("0% sampled", traced("0")?),
        ("1% sampled", traced("0.01")?),
        ("100% sampled", traced("1")?),
    ];
    interleaved("f: tracing cost (h2c max)", dir, &variants, round, ROUNDS)
}

/// Scenario (e) alone: `secs` in all for each variant, in `rounds`
/// paired rounds.
pub(crate) fn run_authz(dir: &Path, secs: u64, rounds: u64) -> anyhow::Result<Vec<PolicyRow>> {
    let one = backend("one", &[])?;
    let round = Drive {
        proto: Proto::H2c,
        mode: Mode::Max,
        secs: (secs / rounds.max(1)).max(2),
    };
    inbound_authz(dir, &one, round, usize::try_from(rounds)?)
}

/// An inbound proxy in front of `app`, serving as `api.bench`, with the
/// inbound policy `servers` (YAML at the file's top level).
fn inbound_proxy(dir: &Path, app: SocketAddr, servers: &str) -> anyhow::Result<(Proc, SocketAddr)> {
    let file = dir.join(format!("authz-{}.yaml", unique_suffix()));
    std::fs::write(&file, format!("destinations: {{}}\n{servers}"))?;
    let bin = crate::procs::proxy_bin()?;
    let (p, _, inbound) = start_proxy(
        &bin,
        &[
            ("WEFT_PROXY_DESTINATIONS", file.display().to_string()),
            ("WEFT_PROXY_INBOUND_FORWARD", app.to_string()),
            ("WEFT_PROXY_INBOUND_SERVER", "api.bench".to_string()),
        ],
    )?;
    Ok((p, inbound))
}

/// (e) The inbound policy's own cost: flat out over h2c to the inbound
/// side, the mesh-wide default (allow-all: a decision per request all the
/// same) vs 20 authorizations with routes, the one that admits the
/// benchmark's plaintext client last, and a rate limit high enough never
/// to refuse (so every request takes a token from the total and from its
/// client's bucket).
fn inbound_authz(
    dir: &Path,
    app: &(Proc, SocketAddr),
    round: Drive,
    rounds: usize,
) -> anyhow::Result<Vec<PolicyRow>> {
    let mut servers = format!(
        "servers:\n  \"api.bench\":\n    ports:\n      \"{}\":\n        default: deny\n        rate_limit: {{total_rps: 10000000, per_client_rps: 10000000}}\n        authorizations:\n",
        app.1.port()
    );
    for i in 0..19 {
        servers.push_str(&format!(
            "          - {{name: svc-{i}, clients: {{identities: [\"svc-{i}.bench\", \"*.team-{i}.bench\"]}}, routes: [{{path_prefix: /api/{i}/, methods: [GET, POST]}}]}}\n"
        ));
    }
    servers.push_str("          - {name: local, clients: {networks: [127.0.0.0/8]}, routes: [{path_prefix: /}]}\n");
    let variants = [
        ("default allow-all", inbound_proxy(dir, app.1, "")?),
        (
            "20 authorizations + rate limit",
            inbound_proxy(dir, app.1, &servers)?,
        ),
    ];
    interleaved(
        "e: inbound authz cost (h2c max)",
        dir,
        &variants,
        round,
        rounds,
    )
}
