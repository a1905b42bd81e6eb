//! Spawning a weft binary and learning its ports from its log.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `setpriv`, when the machine has it (util-linux: every Debian has it).
fn setpriv() -> Option<&'static std::path::Path> {
    static FOUND: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_else(|| vec!["/usr/bin".into(), "/bin".into()])
                .into_iter()
                .map(|d| d.join("setpriv"))
                .find(|p| p.is_file())
        })
        .as_deref()
}

/// The program and leading arguments that run `program` so that it is
/// killed when this process dies, however it dies (SIGKILL included):
/// `setpriv --pdeathsig KILL -- program`. The signal is armed in the child
/// before it execs, so there is no window in which it could outlive us
/// unnoticed after starting. Without setpriv, `program` alone.
pub fn guarded(program: &std::ffi::OsStr) -> (std::ffi::OsString, Vec<std::ffi::OsString>) {
    match setpriv() {
        Some(setpriv) => (
            setpriv.as_os_str().to_owned(),
            ["--pdeathsig", "KILL", "--"]
                .into_iter()
                .map(Into::into)
                .chain([program.to_owned()])
                .collect(),
        ),
        None => (program.to_owned(), Vec::new()),
    }
}

/// A tokio command for `program` that dies with this process (see
/// [`guarded`]); also killed when dropped.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let (program, args) = guarded(program.as_ref());
    let mut c = Command::new(program);
    c.args(args).kill_on_drop(true);
    c
}

/// The same for `std::process`.
pub fn std_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let (program, args) = guarded(program.as_ref());
    let mut c = std::process::Command::new(program);
    c.args(args);
    c
}

/// The processes whose parent is `pid` now (from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// CPU time (user + system) `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5), in clock ticks
    // (100 per second on Linux).
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sends the signal `name` ("TERM", "USR2", ...) to `pid`.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// A process this test did not spawn itself (one started by a process
/// under test), killed when this drops.
#[derive(Debug)]
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = signal(self.0, "KILL");
    }
}

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

    /// Waits until a logged line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.log().contains(needle) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{needle:?} not logged within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// Sends the signal `name` ("TERM", "USR2", ...).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        signal(self.pid().context("process already exited")?, name)
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
