//! Spawning a weft binary and learning its ports from its log.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A child process whose stderr is collected, killed on drop.
pub struct Logged {
    pub child: Child,
    /// The log line announcing the listeners.
    pub listening: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    /// Spawns `command` (stderr piped) and waits up to 10 s for the line
    /// containing " listening ".
    pub async fn spawn(mut command: Command, what: &str) -> anyhow::Result<Self> {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
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
        let listening = match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(line)) => line,
            _ => {
                let status = child.try_wait().ok().flatten();
                let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                anyhow::bail!("{what} did not start (exit: {status:?}):\n{log}");
            }
        };
        Ok(Self {
            child,
            listening,
            log,
        })
    }

    /// The `name=ADDR` field of the listening line.
    pub fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let line = &self.listening;
        let start = line
            .find(&format!("{name}="))
            .with_context(|| format!("no {name}= in {line:?}"))?
            + name.len()
            + 1;
        let rest = &line[start..];
        let end = rest.find(' ').unwrap_or(rest.len());
        Ok(rest[..end].parse()?)
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("process already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }

    /// Polls `GET admin/ready` until it answers 200.
    pub async fn wait_ready(&self, admin: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if crate::metrics::get_text(admin, "/ready").await.is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
