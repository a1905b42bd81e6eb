//! Runs the real `weft-proxy` binary on loopback ports chosen by the OS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Proxy {
    child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
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
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        if let Some(path) = std::env::var_os("PATH") {
            vars.insert("PATH".into(), path.to_string_lossy().into_owned());
        }
        let mut child = command
            .env_clear()
            .envs(&vars)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let log2 = log.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" listening ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
        let line = match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(line)) => line,
            _ => {
                let status = child.try_wait().ok().flatten();
                let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                anyhow::bail!("proxy did not start (exit: {status:?}):\n{log}");
            }
        };
        let field = |name: &str| -> anyhow::Result<SocketAddr> {
            let start = line
                .find(&format!("{name}="))
                .with_context(|| format!("no {name}= in {line:?}"))?
                + name.len()
                + 1;
            let rest = &line[start..];
            let end = rest.find(' ').unwrap_or(rest.len());
            Ok(rest[..end].parse()?)
        };
        Ok(Self {
            outbound: field("outbound")?,
            inbound: field("inbound")?,
            admin: field("admin")?,
            child,
            log,
        })
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if crate::metrics::get_text(self.admin, "/ready").await.is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "proxy never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("proxy already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Peak resident set size (VmHWM) in bytes, from procfs.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("proxy already exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .context("no VmHWM in /proc/PID/status")?
            .parse()?;
        Ok(kib * 1024)
    }
}
