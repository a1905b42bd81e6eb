//! Golden metrics (success rate, requests per second, latency percentiles,
//! mTLS share) for groups of series over a window.

use std::collections::BTreeMap;

use crate::window::{Labels, Window};

/// One group's golden metrics over a window.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Golden {
    pub name: String,
    pub requests: u64,
    pub successes: u64,
    pub success_rate: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Share of the responses that travelled over mutual TLS.
    pub mtls_share: f64,
    /// Refused by the server's inbound policy (403, and 404 for no route).
    pub denied: u64,
    /// Refused by its rate limit (429).
    pub rate_limited: u64,
}

/// Value at quantile `q` of a cumulative histogram, interpolating linearly
/// inside the bucket, as Prometheus's `histogram_quantile` does.
pub(crate) fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let in_bucket = count - prev.1;
            if in_bucket <= 0.0 {
                return le;
            }
            return prev.0 + (le - prev.0) * (rank - prev.1) / in_bucket;
        }
        prev = (le, count);
    }
    prev.0
}

fn le_of(labels: &Labels) -> Option<f64> {
    match labels.get("le")?.as_str() {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        s => s.parse().ok(),
    }
}

#[derive(Default)]
struct Acc {
    total: f64,
    ok: f64,
    tls: f64,
    denied: f64,
    limited: f64,
    buckets: Vec<(f64, f64)>,
}

/// Groups the window's series by `key` (None leaves a series out) and
/// computes each group's golden metrics, busiest first.
pub(crate) fn aggregate(w: &Window, key: impl Fn(&Labels) -> Option<String>) -> Vec<Golden> {
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for s in &w.responses {
        let Some(k) = key(&s.labels) else { continue };
        let acc = groups.entry(k).or_default();
        acc.total += s.value;
        if s.labels.get("classification").map(String::as_str) == Some("success") {
            acc.ok += s.value;
        }
        if s.labels.get("tls").map(String::as_str) == Some("true") {
            acc.tls += s.value;
        }
        // The proxy names its own refusals in `error`.
        match s.labels.get("error").map(String::as_str) {
            Some("unauthorized" | "route_not_found") => acc.denied += s.value,
            Some("rate_limited") => acc.limited += s.value,
            _ => {}
        }
    }
    for s in &w.latency {
        let (Some(k), Some(le)) = (key(&s.labels), le_of(&s.labels)) else {
            continue;
        };
        if let Some(acc) = groups.get_mut(&k) {
            match acc.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, n)) => *n += s.value,
                None => acc.buckets.push((le, s.value)),
            }
        }
    }
    let mut out: Vec<Golden> = groups
        .into_iter()
        .filter(|(_, a)| a.total > 0.0)
        .map(|(name, mut a)| {
            a.buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
            Golden {
                name,
                requests: a.total.round() as u64,
                successes: a.ok.round() as u64,
                success_rate: a.ok / a.total,
                rps: a.total / w.seconds,
                p50_ms: quantile(&a.buckets, 0.50),
                p95_ms: quantile(&a.buckets, 0.95),
                p99_ms: quantile(&a.buckets, 0.99),
                mtls_share: a.tls / a.total,
                denied: a.denied.round() as u64,
                rate_limited: a.limited.round() as u64,
            }
        })
        .collect();
    out.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.name.cmp(&b.name)));
    out
}

/// Per service, as the receiving proxies measured it (inbound, by
/// authority).
pub(crate) fn by_service(w: &Window) -> Vec<Golden> {
    aggregate(w, |l| {
        (l.get("direction").map(String::as_str) == Some("inbound"))
            .then(|| l.get("authority").cloned())
            .flatten()
    })
}

/// A table with `header` naming the first column.
pub(crate) fn table(header: &str, rows: &[Golden]) -> String {
    let width = rows
        .iter()
        .map(|r| r.name.len())
        .chain([header.len(), 20])
        .max()
        .unwrap_or(20);
    let mut out = format!(
        "{:<width$} {:>9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>9} {:>7} {:>7}\n",
        header, "SUCCESS", "RPS", "P50", "P95", "P99", "MTLS", "REQUESTS", "DENIED", "LIMITED"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<width$} {:>8.2}% {:>8.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>5.0}% {:>9} {:>7} {:>7}\n",
            r.name,
            r.success_rate * 100.0,
            r.rps,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.mtls_share * 100.0,
            r.requests,
            r.denied,
            r.rate_limited,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Series;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [
            (1.0, 50.0),
            (2.0, 90.0),
            (5.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(&b, 0.5) - 1.0).abs() < 1e-9);
        assert!((quantile(&b, 0.7) - 1.5).abs() < 1e-9);
        assert!((quantile(&b, 0.95) - 3.5).abs() < 1e-9);
        assert!(quantile(&[], 0.5).is_nan());
    }

    fn series(pairs: &[(&str, &str)], value: f64) -> Series {
        Series {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    #[test]
    fn groups_count_successes_and_mutual_tls() {
        let w = Window {
            seconds: 10.0,
            responses: vec![
                series(
                    &[("a", "x"), ("classification", "success"), ("tls", "true")],
                    90.0,
                ),
                series(
                    &[
                        ("a", "x"),
                        ("classification", "failure"),
                        ("tls", "no_identity"),
                    ],
                    10.0,
                ),
                series(&[("a", "y"), ("classification", "success")], 5.0),
                series(
                    &[
                        ("a", "y"),
                        ("classification", "failure"),
                        ("error", "unauthorized"),
                    ],
                    3.0,
                ),
                series(
                    &[
                        ("a", "y"),
                        ("classification", "failure"),
                        ("error", "rate_limited"),
                    ],
                    2.0,
                ),
            ],
            latency: vec![
                series(&[("a", "x"), ("le", "1")], 50.0),
                series(&[("a", "x"), ("le", "2")], 100.0),
                series(&[("a", "x"), ("le", "+Inf")], 100.0),
            ],
        };
        let rows = aggregate(&w, |l| l.get("a").cloned());
        assert_eq!(rows.len(), 2);
        let x = &rows[0];
        assert_eq!((x.name.as_str(), x.requests, x.successes), ("x", 100, 90));
        assert!((x.success_rate - 0.9).abs() < 1e-9);
        assert!((x.rps - 10.0).abs() < 1e-9);
        assert!((x.mtls_share - 0.9).abs() < 1e-9);
        assert!((x.p50_ms - 1.0).abs() < 1e-9);
        assert!(rows[1].p99_ms.is_nan());
        assert_eq!(
            (rows[1].denied, rows[1].rate_limited, rows[0].denied),
            (3, 2, 0)
        );
    }
}
