//! A real etcd (Debian `etcd-server`) on loopback ports, for one test.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Child;

pub struct Etcd {
    _child: Child,
    _data: tempfile::TempDir,
    pub client: SocketAddr,
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Etcd {
    /// Starts etcd and waits until `/health` says so.
    pub async fn start() -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let client = free_port()?;
        let peer = free_port()?;
        let child = crate::process::command("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(data.path())
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("t=http://{peer}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd (Debian package etcd-server)")?;
        crate::wait_until(
            Duration::from_secs(15),
            Duration::from_millis(50),
            "etcd never became healthy",
            || async {
                crate::metrics::get_text(client, "/health")
                    .await
                    .is_ok_and(|body| body.contains("true"))
            },
        )
        .await?;
        Ok(Self {
            _child: child,
            _data: data,
            client,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }
}
