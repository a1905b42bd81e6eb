//! Scraping a proxy's `/metrics` and reading values out of it.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// A parsed scrape.
pub struct Scrape {
    pub text: String,
    samples: Vec<prometheus_parse::Sample>,
}

pub async fn scrape(admin: SocketAddr) -> anyhow::Result<Scrape> {
    let text = get_text(admin, "/metrics").await?;
    Scrape::parse(text)
}

/// GETs a path from an admin server, expecting 200.
pub async fn get_text(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut send = crate::client::http1::<Empty<Bytes>>(admin).await?;
    let req = http::Request::get(path)
        .header(http::header::HOST, admin.to_string())
        .body(Empty::new())?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8(body.to_vec())?;
    anyhow::ensure!(status.is_success(), "GET {path}: {status}: {text}");
    Ok(text)
}

impl Scrape {
    pub fn parse(text: String) -> anyhow::Result<Self> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines)?;
        Ok(Self {
            text,
            samples: scrape.samples,
        })
    }

    /// Sum of every sample named `name` whose labels include all of
    /// `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// Cumulative bucket counts `(le, count)` of histogram `name` (without
    /// the `_bucket` suffix), summed over every series matching `labels`.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = Vec::new();
        for s in self
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        {
            if let prometheus_parse::Value::Histogram(counts) = &s.value {
                for c in counts {
                    match out.iter_mut().find(|(le, _)| *le == c.less_than) {
                        Some((_, n)) => *n += c.count,
                        None => out.push((c.less_than, c.count)),
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    pub fn samples(&self) -> &[prometheus_parse::Sample] {
        &self.samples
    }
}
