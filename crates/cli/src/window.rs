//! How much each response counter grew over a window, from either source:
//! two scrapes of every proxy (embedded mode) or a real Prometheus.
//!
//! Both sources give the same shape (one value per series, labelled with
//! the metric's labels and its target's labels), so every command computes
//! its numbers with one piece of code whatever the source.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::join_all;

use crate::fetch;
use crate::targets::Target;

pub(crate) type Labels = BTreeMap<String, String>;

/// One series' increase over the window.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug, Default)]
pub(crate) struct Window {
    pub seconds: f64,
    /// `response_total` increases.
    pub responses: Vec<Series>,
    /// `response_latency_ms_bucket` increases, labelled with `le`.
    pub latency: Vec<Series>,
}

/// One scrape of one proxy, reduced to the series weft reads.
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot {
    responses: BTreeMap<Labels, f64>,
    latency: BTreeMap<Labels, f64>,
}

fn labels_of(sample: &prometheus_parse::Sample, target: &Labels) -> Labels {
    let mut labels: Labels = target.clone();
    for (k, v) in sample.labels.iter() {
        labels.insert(k.clone(), v.clone());
    }
    labels
}

impl Snapshot {
    pub(crate) fn parse(text: &str, target: &Labels) -> anyhow::Result<Self> {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .context("not Prometheus text exposition")?;
        let mut out = Snapshot::default();
        for sample in &scrape.samples {
            match (&*sample.metric, &sample.value) {
                (
                    "response_total",
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v),
                ) => {
                    *out.responses.entry(labels_of(sample, target)).or_default() += v;
                }
                ("response_latency_ms", prometheus_parse::Value::Histogram(buckets)) => {
                    let base = labels_of(sample, target);
                    for b in buckets {
                        let mut labels = base.clone();
                        labels.insert("le".into(), format_le(b.less_than));
                        *out.latency.entry(labels).or_default() += b.count;
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

fn format_le(le: f64) -> String {
    if le.is_infinite() {
        "+Inf".into()
    } else {
        le.to_string()
    }
}

/// A counter's increase: a series that is new or went backwards (the proxy
/// restarted) counts from zero.
fn increase(after: &BTreeMap<Labels, f64>, before: &BTreeMap<Labels, f64>) -> Vec<Series> {
    after
        .iter()
        .filter_map(|(labels, &a)| {
            let b = before.get(labels).copied().unwrap_or(0.0);
            let value = if a >= b { a - b } else { a };
            (value > 0.0).then(|| Series {
                labels: labels.clone(),
                value,
            })
        })
        .collect()
}

impl Window {
    /// The increases between two rounds of scrapes of the same targets;
    /// a target missing from either round is left out.
    pub(crate) fn across(
        before: &[Option<Snapshot>],
        after: &[Option<Snapshot>],
        elapsed: Duration,
    ) -> Self {
        let mut w = Window {
            seconds: elapsed.as_secs_f64().max(1e-3),
            ..Window::default()
        };
        for (b, a) in before.iter().zip(after) {
            if let (Some(b), Some(a)) = (b, a) {
                w.add(b, a);
            }
        }
        w
    }

    fn add(&mut self, before: &Snapshot, after: &Snapshot) {
        self.responses
            .extend(increase(&after.responses, &before.responses));
        self.latency
            .extend(increase(&after.latency, &before.latency));
    }
}

/// The labels a target contributes to its series.
fn target_labels(t: &Target) -> Labels {
    let mut labels = t.labels.clone();
    labels
        .entry("instance".into())
        .or_insert_with(|| t.admin.to_string());
    labels
}

pub(crate) async fn snapshot(t: &Target) -> anyhow::Result<Snapshot> {
    let f = fetch::get_ok(&format!("http://{}/metrics", t.admin)).await?;
    Snapshot::parse(&f.body, &target_labels(t))
}

/// Scrapes every target, reporting (not failing on) the ones that do not
/// answer: one stopped proxy must not hide the rest of the mesh.
pub(crate) async fn snapshots(targets: &[Target]) -> Vec<Option<Snapshot>> {
    join_all(targets.iter().map(|t| async move {
        match snapshot(t).await {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("weft: skipping proxy {} ({}): {e:#}", t.admin, t.workload());
                None
            }
        }
    }))
    .await
}

/// Embedded mode: scrapes every proxy now and again after `window`.
pub(crate) async fn sample(targets: &[Target], window: Duration) -> anyhow::Result<Window> {
    anyhow::ensure!(!targets.is_empty(), "the targets file lists no proxies");
    let first = snapshots(targets).await;
    anyhow::ensure!(
        first.iter().any(Option::is_some),
        "none of the {} proxies answered",
        targets.len()
    );
    let started = Instant::now();
    progress(targets.len(), window, started).await;
    let second = snapshots(targets).await;
    Ok(Window::across(&first, &second, started.elapsed()))
}

/// Waits out the window, showing how much is left on a terminal and one
/// line otherwise (scripts and tests read it as "sampling has started").
async fn progress(n: usize, window: Duration, started: Instant) {
    let tty = std::io::stderr().is_terminal();
    eprintln!(
        "weft: sampling {n} proxies over {}",
        humantime::format_duration(window)
    );
    if !tty {
        tokio::time::sleep(window).await;
        return;
    }
    loop {
        let left = window.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        eprint!("\r  {:>3}s left ", left.as_secs_f64().ceil());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    eprint!("\r              \r");
}

/// Prometheus mode: the same increases, computed by Prometheus. The
/// expression counts a series that is new in the window, or that was reset
/// (its proxy restarted), from zero, so request counts are exact rather
/// than `increase()`'s extrapolation.
pub(crate) async fn query_prometheus(base: &str, window: Duration) -> anyhow::Result<Window> {
    let secs = window.as_secs().max(1);
    let range = format!("{secs}s");
    let responses = query(base, &increase_expr("response_total", &range)).await?;
    let latency = query(base, &increase_expr("response_latency_ms_bucket", &range)).await?;
    Ok(Window {
        seconds: secs as f64,
        responses,
        latency,
    })
}

fn increase_expr(metric: &str, range: &str) -> String {
    format!("({metric} - {metric} offset {range}) >= 0 or {metric}")
}

#[derive(serde::Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: Option<ApiData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct ApiData {
    result: Vec<ApiSample>,
}

#[derive(serde::Deserialize)]
struct ApiSample {
    metric: Labels,
    value: (f64, String),
}

async fn query(base: &str, expr: &str) -> anyhow::Result<Vec<Series>> {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .finish();
    let url = format!("{}/api/v1/query?{q}", base.trim_end_matches('/'));
    let f = fetch::get(&url)
        .await
        .with_context(|| format!("asking Prometheus at {base}"))?;
    let api: ApiResponse = serde_json::from_str(&f.body)
        .with_context(|| format!("Prometheus at {base} answered {}: not its API", f.status))?;
    if api.status != "success" {
        anyhow::bail!(
            "Prometheus at {base} refused the query {expr:?}: {}",
            api.error.unwrap_or_default()
        );
    }
    let data = api.data.context("Prometheus answered without data")?;
    let mut out = Vec::new();
    for s in data.result {
        let value: f64 = s
            .value
            .1
            .parse()
            .with_context(|| format!("Prometheus sent a non-number {:?}", s.value.1))?;
        if value > 0.0 {
            out.push(Series {
                labels: s.metric,
                value,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE response_total counter\n\
        response_total{direction=\"inbound\",authority=\"a:80\",classification=\"success\"} 5\n\
        # TYPE response_latency_ms histogram\n\
        response_latency_ms_bucket{direction=\"inbound\",authority=\"a:80\",le=\"1\"} 4\n\
        response_latency_ms_bucket{direction=\"inbound\",authority=\"a:80\",le=\"+Inf\"} 5\n\
        response_latency_ms_sum{direction=\"inbound\",authority=\"a:80\"} 4\n\
        response_latency_ms_count{direction=\"inbound\",authority=\"a:80\"} 5\n";

    #[test]
    fn increases_count_new_and_reset_series_from_zero() -> anyhow::Result<()> {
        let target: Labels = [("workload".to_string(), "a".to_string())].into();
        let before = Snapshot::parse(BEFORE, &target)?;
        let after = Snapshot::parse(
            &BEFORE
                .replace("} 5\n", "} 9\n")
                .replace("classification=\"success\"} 9", "classification=\"success\"} 9\nresponse_total{direction=\"inbound\",authority=\"b:80\",classification=\"success\"} 2"),
            &target,
        )?;
        let w = Window::across(
            &[Some(before.clone())],
            &[Some(after.clone())],
            Duration::from_secs(2),
        );
        let mut got: Vec<(String, f64)> = w
            .responses
            .iter()
            .map(|s| (s.labels["authority"].clone(), s.value))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, vec![("a:80".into(), 4.0), ("b:80".into(), 2.0)]);
        assert!(w.responses.iter().all(|s| s.labels["workload"] == "a"));
        let inf: Vec<f64> = w
            .latency
            .iter()
            .filter(|s| s.labels["le"] == "+Inf")
            .map(|s| s.value)
            .collect();
        assert_eq!(inf, vec![4.0]);
        // A restarted proxy's smaller counter is all new.
        let w = Window::across(&[Some(after)], &[Some(before)], Duration::from_secs(2));
        assert!(w.responses.iter().any(|s| s.value == 5.0));
        Ok(())
    }
}
