//! A real Prometheus (Debian `prometheus`) on a loopback port, for one test.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Child;

pub struct Prometheus {
    _child: Child,
    _data: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) and waits until it is ready.
    pub async fn start(config: &str) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let config_path = data.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = crate::process::command("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting prometheus (Debian package prometheus)")?;
        crate::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "prometheus never became ready",
            || async { crate::metrics::get_text(addr, "/-/ready").await.is_ok() },
        )
        .await?;
        Ok(Self {
            _child: child,
            _data: data,
            addr,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
