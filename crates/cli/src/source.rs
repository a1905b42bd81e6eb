//! Where traffic figures come from: the proxies themselves or Prometheus.
//! Shared by every command that shows traffic.

use std::path::PathBuf;
use std::time::Duration;

use crate::targets::{self, Target};
use crate::window::{self, Window};

#[derive(clap::Args, Debug)]
pub(crate) struct Source {
    /// The proxies to scrape: a Prometheus file_sd JSON file of admin
    /// addresses, labelled with `workload` and `identity` [default: the
    /// file `weft demo` writes]
    #[arg(long, env = "WEFT_TARGETS", value_name = "FILE")]
    pub targets: Option<PathBuf>,
    /// Ask this Prometheus (which scrapes the proxies) instead of scraping
    /// them here, e.g. http://127.0.0.1:9090
    #[arg(long, env = "WEFT_PROMETHEUS", value_name = "URL")]
    pub prometheus: Option<String>,
    /// The window to report on, e.g. 10s or 5m [default: 10s scraping the
    /// proxies (the command waits that long), 1m with Prometheus]
    #[arg(short = 't', long = "window", value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
}

impl Source {
    /// The proxies among the targets (a control plane may be listed too).
    pub(crate) fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let path = self.targets.clone().unwrap_or_else(targets::default_path);
        Ok(targets::load(&path)?
            .into_iter()
            .filter(|t| t.is_proxy())
            .collect())
    }

    /// The `weft probe`s among the targets.
    pub(crate) fn probers(&self) -> anyhow::Result<Vec<Target>> {
        let path = self.targets.clone().unwrap_or_else(targets::default_path);
        Ok(targets::load(&path)?
            .into_iter()
            .filter(|t| t.is_probe())
            .collect())
    }

    pub(crate) fn name(&self) -> &'static str {
        if self.prometheus.is_some() {
            "prometheus"
        } else {
            "proxies"
        }
    }

    /// The counters' increases over the window.
    pub(crate) async fn window(&self) -> anyhow::Result<Window> {
        match &self.prometheus {
            Some(url) => {
                let w = self.window.unwrap_or(Duration::from_secs(60));
                anyhow::ensure!(
                    w >= Duration::from_secs(1),
                    "-t must be at least 1s with Prometheus"
                );
                window::query_prometheus(url, w).await
            }
            None => {
                let w = self.window.unwrap_or(Duration::from_secs(10));
                anyhow::ensure!(!w.is_zero(), "-t must be longer than 0s");
                window::sample(&self.targets()?, w).await
            }
        }
    }
}

/// `name` names `value`: exactly, or as its host without the port
/// (`web.demo` names `web.demo:8080`).
pub(crate) fn names(name: &str, value: &str) -> bool {
    value == name
        || value
            .rsplit_once(':')
            .is_some_and(|(host, port)| host == name && port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_matches_with_or_without_port() {
        assert!(names("web.demo", "web.demo:8080"));
        assert!(names("web.demo:8080", "web.demo:8080"));
        assert!(!names("web", "web.demo:8080"));
        assert!(!names("web.demo:80", "web.demo:8080"));
    }
}
