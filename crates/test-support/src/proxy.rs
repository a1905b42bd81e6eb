//! Runs the real `weft-proxy` binary on loopback ports chosen by the OS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::process::Logged;

pub struct Proxy {
    pub process: Logged,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl Proxy {
    /// Starts the proxy with `env` on top of loopback, port-0 listeners, and
    /// waits until `/ready` answers 200.
    pub async fn start(bin: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let proxy = Self::spawn(&[], bin, env).await?;
        proxy.wait_ready(Duration::from_secs(10)).await?;
        Ok(proxy)
    }

    /// Starts the proxy under `wrapper` (e.g. `ip netns exec NAME`) and
    /// returns once it listens; readiness is the caller's to check, since
    /// its admin port may not be reachable from here.
    pub async fn spawn(wrapper: &[&str], bin: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut vars: HashMap<String, String> = [
            ("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:0"),
            ("WEFT_PROXY_INBOUND_LISTEN", "127.0.0.1:0"),
            ("WEFT_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
            ("WEFT_PROXY_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in env {
            vars.insert(k.to_string(), v.to_string());
        }
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = crate::process::command(program);
                c.args(args).arg(bin);
                c
            }
            None => crate::process::command(bin),
        };
        if let Some(path) = std::env::var_os("PATH") {
            vars.insert("PATH".into(), path.to_string_lossy().into_owned());
        }
        command.env_clear().envs(&vars);
        let process = Logged::spawn(command, "weft-proxy").await?;
        Ok(Self {
            outbound: process.addr("outbound")?,
            inbound: process.addr("inbound")?,
            admin: process.addr("admin")?,
            process,
        })
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        self.process.wait_ready(self.admin, timeout).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.process.terminate()
    }

    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.process.wait(timeout).await
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Peak resident set size (VmHWM) in bytes, from procfs.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmHWM:")
    }

    /// Resident set size now (VmRSS) in bytes, from procfs.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmRSS:")
    }

    /// A `/proc/PID/status` field given in kB, in bytes.
    fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let pid = self.pid().context("proxy already exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?
            .parse()?;
        Ok(kib * 1024)
    }
}
