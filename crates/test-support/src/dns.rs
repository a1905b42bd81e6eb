//! A real DNS server (Debian `dnsmasq-base`) on a loopback port, serving
//! the records a test gives it and NXDOMAIN for the rest of `.demo`.

use std::net::{SocketAddr, UdpSocket};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Child;

pub struct Dns {
    _child: Child,
    pub addr: SocketAddr,
}

impl Dns {
    /// `records` are dnsmasq options such as `--host-record=api.demo,10.0.0.7`
    /// or `--srv-host=_grpc._tcp.api.demo,api.demo,9000,0,5`.
    pub async fn start(records: &[&str]) -> anyhow::Result<Self> {
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = crate::process::command("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--user=root",
                "--local=/demo/",
            ])
            .arg(format!("--port={port}"))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        // Ready once it answers on TCP (it serves both).
        crate::wait_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            "dnsmasq never listened",
            || async { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await?;
        Ok(Self {
            _child: child,
            addr,
        })
    }
}
