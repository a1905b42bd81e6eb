//! Golden metrics (success rate, requests per second, latency percentiles)
//! computed from two scrapes of a proxy's Linkerd-compatible metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_test_support::metrics::Scrape;

/// One route's golden metrics over a window.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Golden {
    pub direction: String,
    pub authority: String,
    pub requests: f64,
    pub success_rate: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Share of the responses that travelled over mutual TLS.
    pub mtls_share: f64,
}

type Key = (String, String);

/// (successes, total, over mutual TLS) per route.
fn responses(s: &Scrape) -> BTreeMap<Key, (f64, f64, f64)> {
    let mut out: BTreeMap<Key, (f64, f64, f64)> = BTreeMap::new();
    for sample in s.samples().iter().filter(|x| x.metric == "response_total") {
        let key = (
            sample.labels.get("direction").unwrap_or("").to_string(),
            sample.labels.get("authority").unwrap_or("").to_string(),
        );
        let v = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        };
        let e = out.entry(key).or_default();
        if sample.labels.get("classification") == Some("success") {
            e.0 += v;
        }
        e.1 += v;
        if sample.labels.get("tls") == Some("true") {
            e.2 += v;
        }
    }
    out
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

/// Golden metrics per (direction, authority) between `before` and `after`.
pub(crate) fn between(before: &Scrape, after: &Scrape, window: Duration) -> Vec<Golden> {
    let b = responses(before);
    let a = responses(after);
    let secs = window.as_secs_f64().max(1e-3);
    let mut out = Vec::new();
    for ((direction, authority), (ok, total, tls)) in &a {
        let (ok0, total0, tls0) = b
            .get(&(direction.clone(), authority.clone()))
            .copied()
            .unwrap_or_default();
        let requests = total - total0;
        if requests <= 0.0 {
            continue;
        }
        let labels = [
            ("direction", direction.as_str()),
            ("authority", authority.as_str()),
        ];
        let after_b = after.buckets("response_latency_ms", &labels);
        let before_b = before.buckets("response_latency_ms", &labels);
        let delta: Vec<(f64, f64)> = after_b
            .iter()
            .map(|(le, n)| {
                let n0 = before_b
                    .iter()
                    .find(|(l, _)| l == le)
                    .map(|(_, n)| *n)
                    .unwrap_or(0.0);
                (*le, n - n0)
            })
            .collect();
        out.push(Golden {
            direction: direction.clone(),
            authority: authority.clone(),
            requests,
            success_rate: (ok - ok0) / requests,
            rps: requests / secs,
            p50_ms: quantile(&delta, 0.50),
            p95_ms: quantile(&delta, 0.95),
            p99_ms: quantile(&delta, 0.99),
            mtls_share: (tls - tls0) / requests,
        });
    }
    out
}

pub(crate) fn table(rows: &[Golden]) -> String {
    let mut out = format!(
        "{:<9} {:<22} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>6}\n",
        "DIRECTION", "AUTHORITY", "REQUESTS", "SUCCESS", "RPS", "P50", "P95", "P99", "MTLS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<9} {:<22} {:>9.0} {:>8.2}% {:>8.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>5.0}%\n",
            r.direction,
            r.authority,
            r.requests,
            r.success_rate * 100.0,
            r.rps,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.mtls_share * 100.0
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
