//! Scenario g: weft against HAProxy with the same number of threads, and
//! both against the direct path, judged only on what a shared 2-core VM
//! measures stably: throughput ratios, CPU µs per request, p50 added at a
//! fixed rate, RSS. p99 is printed beside the direct path's own p99 (the
//! noise floor), never judged. Rounds interleave the contenders, and every
//! judged figure shows its spread over rounds.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::bench::{Reference, Target, percentile, start_proxy};
use crate::procs::{Proc, free_port, wait_listening};

const AUTHORITY: &str = "bench.test:8080";

/// Targets (issue 15).
const MIN_RATIO_ONE_THREAD: f64 = 1.1;
const MIN_RATIO_TWO_THREADS: f64 = 1.0;
const MAX_CPU_RATIO_AT_1K: f64 = 0.9;
const MAX_IDLE_RSS_MIB: f64 = 5.0;
const MAX_PEAK_RSS_MIB: f64 = 12.0;
/// `--quick` fails only below this: a gross regression, never noise.
const QUICK_FLOOR_RATIO: f64 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Load {
    /// HTTP/1.1 keep-alive, 32 connections, as fast as possible.
    H1Max,
    /// h2c, 16 connections × 16 concurrent streams.
    H2Mux,
    /// h2c, 64 connections × 1 stream.
    H2Single,
    /// HTTP/1.1 at 1,000 requests/s (10 connections × 100/s).
    H1Rate,
    /// h2c at 1,000 requests/s.
    H2Rate,
}

/// Named in the JSON as in the table.
impl Serialize for Load {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl Load {
    const ALL: [Load; 5] = [
        Load::H1Max,
        Load::H2Mux,
        Load::H2Single,
        Load::H1Rate,
        Load::H2Rate,
    ];

    fn name(self) -> &'static str {
        match self {
            Load::H1Max => "h1 max 32 conns",
            Load::H2Mux => "h2c max 16x16",
            Load::H2Single => "h2c max 64x1",
            Load::H1Rate => "h1 1k rps",
            Load::H2Rate => "h2c 1k rps",
        }
    }

    fn h1(self) -> bool {
        matches!(self, Load::H1Max | Load::H1Rate)
    }

    fn h2load(
        self,
        url: &str,
        authority: Option<&str>,
        secs: u64,
        log: &Path,
    ) -> anyhow::Result<crate::bench::H2loadResult> {
        let mut run = weft_test_support::load::H2load::new(url, log);
        run.h1 = self.h1();
        run.duration_secs = secs;
        // No warm-up: the CPU read from /proc must cover exactly the
        // requests counted.
        run.warm_up_secs = 0;
        run.authority = authority.map(str::to_string);
        match self {
            Load::H1Max => run.clients = 32,
            Load::H2Mux => {
                run.clients = 16;
                run.streams = 16;
            }
            Load::H2Single => run.clients = 64,
            Load::H1Rate | Load::H2Rate => {
                run.clients = 10;
                run.rps = Some(100);
            }
        }
        run.run()
    }
}

/// Who carries the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Who {
    Direct,
    Haproxy,
    Weft,
}

struct Contender {
    who: Who,
    threads: usize,
    proc: Option<Proc>,
    h1: SocketAddr,
    h2: SocketAddr,
    authority: Option<&'static str>,
    idle_rss: u64,
}

impl Contender {
    fn label(&self) -> String {
        match self.who {
            Who::Direct => "direct".into(),
            Who::Haproxy => format!("HAProxy nbthread {}", self.threads),
            Who::Weft => format!("weft CORES={}", self.threads),
        }
    }

    fn cpu(&self) -> f64 {
        self.proc.as_ref().map_or(0.0, Proc::cpu_seconds)
    }

    fn user_system(&self) -> (f64, f64) {
        self.proc
            .as_ref()
            .map_or((0.0, 0.0), Proc::user_system_seconds)
    }
}

/// One round of one load on one contender.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Run {
    rps: f64,
    requests: u64,
    failed: u64,
    cpu_us_per_request: f64,
    /// The kernel's part of that CPU (system / user + system, in ticks;
    /// NaN, serialized as null, when the run used too little CPU to
    /// tell): a proxy's floor is the kernel's socket work, the same for
    /// any proxy making the same syscalls.
    kernel_share: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Row {
    load: Load,
    who: Who,
    threads: usize,
    label: String,
    /// Every round, in order.
    rounds: Vec<Run>,
    /// Over all rounds' requests.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    peak_rss_bytes: u64,
}

impl Row {
    fn mean(&self, f: impl Fn(&Run) -> f64) -> f64 {
        self.rounds.iter().map(&f).sum::<f64>() / self.rounds.len().max(1) as f64
    }

    fn spread(&self, f: impl Fn(&Run) -> f64) -> (f64, f64) {
        spread(self.rounds.iter().map(f))
    }
}

pub(crate) fn spread(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

#[derive(Debug, Serialize)]
pub(crate) struct Versus {
    seconds_per_run: u64,
    rounds: u64,
    rows: Vec<Row>,
    weft_idle_rss_bytes: u64,
    haproxy_idle_rss_bytes: u64,
    /// CPU an idle contender uses, µs per second, one thread each (NaN in
    /// quick mode).
    weft_idle_cpu_us_per_s: f64,
    haproxy_idle_cpu_us_per_s: f64,
    pub(crate) targets: Vec<Target>,
    pub(crate) references: Vec<Reference>,
}

/// The least CPU a run must use for its user/kernel split to be shown:
/// the split comes from 10 ms ticks (scaled by the kernel to the exact
/// runtime), so a run at 1k RPS, about ten ticks, gives noise.
const MIN_SPLIT_SECONDS: f64 = 0.5;

/// How long the started contenders are watched doing nothing, together,
/// before any load: a sidecar idles most of its life, times 500 pods.
const IDLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// HAProxy's connection limit in the throughput runs.
pub(crate) const HAPROXY_MAXCONN: usize = 4096;

fn haproxy(dir: &Path, threads: usize, backend: SocketAddr) -> anyhow::Result<Contender> {
    let (proc, h1, h2) = start_haproxy(dir, Some(threads), HAPROXY_MAXCONN, backend)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle_rss = proc.rss_bytes();
    Ok(Contender {
        who: Who::Haproxy,
        threads,
        proc: Some(proc),
        h1,
        h2,
        authority: None,
        idle_rss,
    })
}

/// HAProxy with an HTTP/1.1 and an h2c frontend to `backend`, with
/// `threads` threads or its default (one per CPU), accepting up to
/// `maxconn` connections.
pub(crate) fn start_haproxy(
    dir: &Path,
    threads: Option<usize>,
    maxconn: usize,
    backend: SocketAddr,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let (h1, h2) = (free_port()?, free_port()?);
    let nbthread = threads.map_or(String::new(), |t| format!("  nbthread {t}\n"));
    let cfg = dir.join(format!("haproxy-{}.cfg", threads.unwrap_or(0)));
    std::fs::write(
        &cfg,
        format!(
            "global\n{nbthread}  maxconn {maxconn}\n\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
             frontend h1\n  bind {h1}\n  default_backend be_h1\n\n\
             frontend h2\n  bind {h2} proto h2\n  default_backend be_h2\n\n\
             backend be_h1\n  http-reuse always\n  server s1 {backend}\n\n\
             backend be_h2\n  server s1 {backend} proto h2\n"
        ),
    )?;
    if let Some(bin) = crate::procs::on_path("haproxy") {
        crate::procs::start_cold(&bin)?;
    }
    let child = weft_test_support::process::std_command("haproxy")
        .args(["-f", &cfg.display().to_string(), "-db"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting haproxy (Debian package haproxy)")?;
    let proc = Proc { child };
    wait_listening(h1)?;
    wait_listening(h2)?;
    Ok((proc, h1, h2))
}

fn weft(dir: &Path, threads: usize, backend: SocketAddr) -> anyhow::Result<Contender> {
    let destinations = dir.join("versus-destinations.yaml");
    std::fs::write(
        &destinations,
        format!("destinations:\n  \"{AUTHORITY}\":\n    endpoints:\n      - addr: {backend}\n"),
    )?;
    let proxy = crate::procs::proxy_bin()?;
    crate::procs::start_cold(&proxy)?;
    let (proc, outbound, _) = start_proxy(
        &proxy,
        &[
            (
                "WEFT_PROXY_DESTINATIONS",
                destinations.display().to_string(),
            ),
            ("WEFT_PROXY_CORES", threads.to_string()),
        ],
    )?;
    // Let the allocator and runtime settle before calling it idle.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let idle_rss = proc.rss_bytes();
    Ok(Contender {
        who: Who::Weft,
        threads,
        proc: Some(proc),
        h1: outbound,
        h2: outbound,
        authority: Some(AUTHORITY),
        idle_rss,
    })
}

pub(crate) fn run(dir: &Path, seconds: u64, rounds: u64, quick: bool) -> anyhow::Result<Versus> {
    let (_backend, backend) = crate::bench::start_backend()?;
    let mut contenders = vec![Contender {
        who: Who::Direct,
        threads: 0,
        proc: None,
        h1: backend,
        h2: backend,
        authority: None,
        idle_rss: 0,
    }];
    let threads: &[usize] = if quick { &[1] } else { &[1, 2] };
    for &t in threads {
        contenders.push(haproxy(dir, t, backend)?);
        contenders.push(weft(dir, t, backend)?);
    }
    eprintln!(
        "bench g: {} against backend {backend}, {seconds} s per run, {rounds} rounds, interleaved; nothing pinned; weft is {}",
        contenders
            .iter()
            .map(Contender::label)
            .collect::<Vec<_>>()
            .join(", "),
        crate::procs::proxy_bin()?.display()
    );
    let idle_cpu: Vec<f64> = if quick {
        vec![f64::NAN; contenders.len()]
    } else {
        let before: Vec<f64> = contenders.iter().map(Contender::cpu).collect();
        std::thread::sleep(IDLE_WINDOW);
        contenders
            .iter()
            .zip(before)
            .map(|(c, b)| (c.cpu() - b) * 1e6 / IDLE_WINDOW.as_secs_f64())
            .collect()
    };
    let idle_cpu_of = |who: Who| {
        contenders
            .iter()
            .zip(&idle_cpu)
            .find(|(c, _)| c.who == who && c.threads == 1)
            .map_or(f64::NAN, |(_, &cpu)| cpu)
    };
    let (weft_idle_cpu, haproxy_idle_cpu) = (idle_cpu_of(Who::Weft), idle_cpu_of(Who::Haproxy));
    let log = dir.join("versus-h2load.log");
    let mut rows = Vec::new();
    for load in Load::ALL {
        let mut runs: Vec<Vec<Run>> = contenders.iter().map(|_| Vec::new()).collect();
        let mut latencies: Vec<Vec<f64>> = contenders.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, c) in contenders.iter().enumerate() {
                let url = format!("http://{}/", if load.h1() { c.h1 } else { c.h2 });
                let before = c.cpu();
                let (user0, sys0) = c.user_system();
                let r = load
                    .h2load(&url, c.authority, seconds, &log)
                    .with_context(|| format!("{} through {}", load.name(), c.label()))?;
                let cpu = c.cpu() - before;
                let (user1, sys1) = c.user_system();
                let (user, sys) = (user1 - user0, sys1 - sys0);
                let requests = r.total();
                runs[i].push(Run {
                    rps: r.rps,
                    requests,
                    failed: r.failed + r.status_5xx,
                    cpu_us_per_request: cpu * 1e6 / requests.max(1) as f64,
                    kernel_share: if user + sys >= MIN_SPLIT_SECONDS {
                        sys / (user + sys)
                    } else {
                        f64::NAN
                    },
                    p50_us: percentile(&r.latencies_us, 50.0),
                    p99_us: percentile(&r.latencies_us, 99.0),
                    max_us: r.latencies_us.last().copied().unwrap_or(f64::NAN),
                });
                latencies[i].extend(r.latencies_us);
            }
        }
        for ((c, rounds), mut lat) in contenders.iter().zip(runs).zip(latencies) {
            lat.sort_by(|a, b| a.total_cmp(b));
            let row = Row {
                load,
                who: c.who,
                threads: c.threads,
                label: c.label(),
                rounds,
                p50_us: percentile(&lat, 50.0),
                p99_us: percentile(&lat, 99.0),
                max_us: lat.last().copied().unwrap_or(f64::NAN),
                peak_rss_bytes: c.proc.as_ref().map_or(0, Proc::peak_rss_bytes),
            };
            eprintln!(
                "  {:<16} {:<20} {:>8.0} req/s {:>6.1} µs CPU/req  p50 {:>6.0} µs",
                load.name(),
                row.label,
                row.mean(|r| r.rps),
                row.mean(|r| r.cpu_us_per_request),
                row.p50_us
            );
            rows.push(row);
        }
    }
    let weft_idle = contenders
        .iter()
        .find(|c| c.who == Who::Weft && c.threads == 1)
        .map_or(0, |c| c.idle_rss);
    let haproxy_idle = contenders
        .iter()
        .find(|c| c.who == Who::Haproxy && c.threads == 1)
        .map_or(0, |c| c.idle_rss);
    let mut v = Versus {
        seconds_per_run: seconds,
        rounds,
        rows,
        weft_idle_rss_bytes: weft_idle,
        haproxy_idle_rss_bytes: haproxy_idle,
        weft_idle_cpu_us_per_s: weft_idle_cpu,
        haproxy_idle_cpu_us_per_s: haproxy_idle_cpu,
        targets: Vec::new(),
        references: Vec::new(),
    };
    judge(&mut v, quick);
    Ok(v)
}

fn judge(v: &mut Versus, quick: bool) {
    let row = |load: Load, who: Who, threads: usize| {
        v.rows
            .iter()
            .find(|r| r.load == load && r.who == who && r.threads == threads)
    };
    let mut targets = Vec::new();
    let mut references = Vec::new();
    // Ratios round by round (both ran in the same round), so the spread
    // shows whether the difference is real.
    let ratio = |a: &Row, b: &Row, f: fn(&Run) -> f64| -> (f64, (f64, f64)) {
        let per_round: Vec<f64> = a
            .rounds
            .iter()
            .zip(&b.rounds)
            .map(|(x, y)| f(x) / f(y))
            .collect();
        let mean = per_round.iter().sum::<f64>() / per_round.len().max(1) as f64;
        (mean, spread(per_round.into_iter()))
    };
    for threads in [1, 2] {
        let min = if quick {
            QUICK_FLOOR_RATIO
        } else if threads == 1 {
            MIN_RATIO_ONE_THREAD
        } else {
            MIN_RATIO_TWO_THREADS
        };
        for load in [Load::H2Mux, Load::H2Single, Load::H1Max] {
            let (Some(w), Some(h)) = (
                row(load, Who::Weft, threads),
                row(load, Who::Haproxy, threads),
            ) else {
                continue;
            };
            let (m, range) = ratio(w, h, |r| r.rps);
            targets.push(Target {
                name: format!(
                    "{} throughput, weft / HAProxy, {threads} thread{} (rounds {:.2}–{:.2})",
                    load.name(),
                    if threads == 1 { "" } else { "s" },
                    range.0,
                    range.1
                ),
                measured: m,
                limit: min,
                unit: "×",
                pass: m >= min,
            });
            let (c, crange) = ratio(w, h, |r| r.cpu_us_per_request);
            references.push(Reference {
                name: cpu_name(load, threads, w, h, crange),
                measured: c,
                unit: "×",
            });
            // Where the difference is: the kernel's socket work is about
            // the same for both (the same syscalls per request), so the
            // gap is user space.
            let kernel = |r: &Row| r.mean(|x| x.cpu_us_per_request * x.kernel_share);
            let user = |r: &Row| r.mean(|x| x.cpu_us_per_request) - kernel(r);
            let (wu, hu) = (user(w), user(h));
            references.push(Reference {
                name: format!(
                    "{} user-space CPU µs/request, weft / HAProxy, {threads} thread(s): {wu:.1} vs {hu:.1} (kernel {:.1} vs {:.1})",
                    load.name(),
                    kernel(w),
                    kernel(h)
                ),
                measured: wu / hu,
                unit: "×",
            });
        }
        if quick {
            continue;
        }
        for load in [Load::H1Rate, Load::H2Rate] {
            let (Some(w), Some(h), Some(d)) = (
                row(load, Who::Weft, threads),
                row(load, Who::Haproxy, threads),
                row(load, Who::Direct, 0),
            ) else {
                continue;
            };
            let (c, crange) = ratio(w, h, |r| r.cpu_us_per_request);
            targets.push(Target {
                name: cpu_name(load, threads, w, h, crange),
                measured: c,
                limit: MAX_CPU_RATIO_AT_1K,
                unit: "×",
                pass: c <= MAX_CPU_RATIO_AT_1K,
            });
            // p50 added: judged against HAProxy's own addition.
            let added = |r: &Row| {
                r.rounds
                    .iter()
                    .zip(&d.rounds)
                    .map(|(x, y)| x.p50_us - y.p50_us)
                    .collect::<Vec<_>>()
            };
            let (wa, ha) = (added(w), added(h));
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let (wr, hr) = (spread(wa.iter().copied()), spread(ha.iter().copied()));
            targets.push(Target {
                name: format!(
                    "{} p50 added, weft − HAProxy, {threads} thread(s): {:.0} (rounds {:.0}–{:.0}) vs {:.0} ({:.0}–{:.0}) µs",
                    load.name(),
                    mean(&wa),
                    wr.0,
                    wr.1,
                    mean(&ha),
                    hr.0,
                    hr.1
                ),
                measured: mean(&wa) - mean(&ha),
                limit: 0.0,
                unit: "µs",
                pass: mean(&wa) <= mean(&ha),
            });
            references.push(Reference {
                name: format!(
                    "{} p99 µs (not judged): weft {:.0}, HAProxy {:.0}, direct {:.0} (the noise floor)",
                    load.name(),
                    w.p99_us,
                    h.p99_us,
                    d.p99_us
                ),
                measured: w.p99_us - d.p99_us,
                unit: "µs added",
            });
        }
    }
    if !quick {
        let idle = v.weft_idle_rss_bytes as f64 / 1048576.0;
        targets.push(Target {
            name: format!(
                "weft idle RSS (HAProxy nbthread 1: {:.1} MiB)",
                v.haproxy_idle_rss_bytes as f64 / 1048576.0
            ),
            measured: idle,
            limit: MAX_IDLE_RSS_MIB,
            unit: "MiB",
            pass: idle <= MAX_IDLE_RSS_MIB,
        });
        // The sidecar's default is one core: that is judged; two cores
        // (two runtimes, two sets of upstream connections, a second malloc
        // arena) are reported beside it.
        let peak_mib = |who: Who, threads: usize| {
            v.rows
                .iter()
                .filter(|r| r.who == who && r.threads == threads)
                .map(|r| r.peak_rss_bytes)
                .max()
                .unwrap_or(0) as f64
                / 1048576.0
        };
        let (peak, hpeak) = (peak_mib(Who::Weft, 1), peak_mib(Who::Haproxy, 1));
        targets.push(Target {
            name: format!(
                "weft peak RSS after the max-throughput runs, 1 thread (HAProxy: {hpeak:.1} MiB)"
            ),
            measured: peak,
            limit: MAX_PEAK_RSS_MIB,
            unit: "MiB",
            pass: peak <= MAX_PEAK_RSS_MIB,
        });
        references.push(Reference {
            name: format!(
                "weft idle CPU, 1 thread, over {} s (HAProxy nbthread 1: {:.0} µs/s)",
                IDLE_WINDOW.as_secs(),
                v.haproxy_idle_cpu_us_per_s
            ),
            measured: v.weft_idle_cpu_us_per_s,
            unit: "µs/s",
        });
        let (peak2, hpeak2) = (peak_mib(Who::Weft, 2), peak_mib(Who::Haproxy, 2));
        references.push(Reference {
            name: format!("weft peak RSS, 2 threads (HAProxy nbthread 2: {hpeak2:.1} MiB)"),
            measured: peak2,
            unit: "MiB",
        });
    }
    v.targets = targets;
    v.references = references;
}

/// A CPU-per-request comparison's name, with both means and the range
/// of the per-round ratio.
fn cpu_name(load: Load, threads: usize, weft: &Row, haproxy: &Row, range: (f64, f64)) -> String {
    format!(
        "{} CPU µs/request, weft / HAProxy, {threads} thread(s): {:.1} vs {:.1} (rounds {:.2}–{:.2})",
        load.name(),
        weft.mean(|r| r.cpu_us_per_request),
        haproxy.mean(|r| r.cpu_us_per_request),
        range.0,
        range.1
    )
}

pub(crate) fn table(v: &Versus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ng: weft vs HAProxy, same threads ({} rounds × {} s, interleaved; mean and min–max over rounds)\n\n\
         | load | path | req/s | CPU µs/req | kernel % | p50 µs | p99 µs | max µs | failed |\n|---|---|---:|---:|---:|---:|---:|---:|---:|",
        v.rounds, v.seconds_per_run
    );
    for r in &v.rows {
        let (lo, hi) = r.spread(|x| x.rps);
        let (clo, chi) = r.spread(|x| x.cpu_us_per_request);
        let cpu = if r.who == Who::Direct {
            "–".to_string()
        } else {
            format!(
                "{:.1} ({clo:.1}–{chi:.1})",
                r.mean(|x| x.cpu_us_per_request)
            )
        };
        let share = r.mean(|x| x.kernel_share);
        let kernel = if r.who == Who::Direct || share.is_nan() {
            "–".to_string()
        } else {
            format!("{:.0}", 100.0 * share)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} ({lo:.0}–{hi:.0}) | {cpu} | {kernel} | {:.0} | {:.0} | {:.0} | {} |",
            r.load.name(),
            r.label,
            r.mean(|x| x.rps),
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.rounds.iter().map(|x| x.failed).sum::<u64>()
        );
    }
    out
}
