//! Child processes the benchmark starts, and what procfs says about them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub(crate) fn target_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target")))
}

static SHIPPED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// From now on, [`proxy_bin`] is `bin`.
pub(crate) fn ship(bin: PathBuf) {
    let _ = SHIPPED.set(bin);
}

/// The proxy binary every scenario measures: the one that ships, once
/// built, else the plain release build.
pub(crate) fn proxy_bin() -> anyhow::Result<PathBuf> {
    match SHIPPED.get() {
        Some(p) => Ok(p.clone()),
        None => Ok(target_dir()?.join("release/weft-proxy")),
    }
}

/// Drops `bin`'s pages from the page cache (those no process maps), so the
/// next start reads it from disk as a freshly pulled image would. How a
/// file entered the page cache changes how much the kernel maps around
/// each fault: a freshly copied proxy binary measured 6.5 MiB idle, the
/// same file read from disk 5.9 MiB.
pub(crate) fn start_cold(bin: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(bin).with_context(|| format!("opening {}", bin.display()))?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("dropping {} from the page cache", bin.display()))?;
    Ok(())
}

/// `name` as found on `PATH`.
pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A child killed on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds so far: the scheduler's nanosecond count summed over
    /// the process's threads (`/proc/PID/task/*/schedstat`), so a few
    /// thousand requests at 1k RPS are not read in 10 ms ticks; the tick
    /// count from `/proc/PID/stat` when schedstat is not there.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid()));
        let ns: Option<u64> = tasks.ok().and_then(|dir| {
            dir.map(|t| {
                let t = t.ok()?;
                let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
                stat.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
        });
        match ns {
            Some(ns) if ns > 0 => ns as f64 / 1e9,
            _ => self.cpu_ticks_seconds(),
        }
    }

    /// User + system CPU seconds, in 10 ms ticks.
    fn cpu_ticks_seconds(&self) -> f64 {
        let (user, system) = self.user_system_seconds();
        user + system
    }

    /// User and system (kernel) CPU seconds so far, in 10 ms ticks
    /// (`/proc/PID/stat`): coarse, for splitting a run of seconds.
    pub(crate) fn user_system_seconds(&self) -> (f64, f64) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) else {
            return (0.0, 0.0);
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return (0.0, 0.0);
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) / 100.0, ticks(12) / 100.0)
    }

    fn status_kib(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    pub(crate) fn rss_bytes(&self) -> u64 {
        self.status_kib("VmRSS:") * 1024
    }

    pub(crate) fn peak_rss_bytes(&self) -> u64 {
        self.status_kib("VmHWM:") * 1024
    }
}

/// Spawns `cmd` and waits for a stdout/stderr line containing `marker`,
/// returning the process and that line.
pub(crate) fn spawn_until(
    name: &str,
    mut cmd: Command,
    marker: &str,
    from_stderr: bool,
) -> anyhow::Result<(Proc, String)> {
    if from_stderr {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pipe: Box<dyn std::io::Read + Send> = if from_stderr {
        Box::new(child.stderr.take().context("no stderr")?)
    } else {
        Box::new(child.stdout.take().context("no stdout")?)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&marker) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    let proc = Proc { child };
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(line) => Ok((proc, line)),
        Err(_) => bail!("{name} did not start"),
    }
}

/// The `key=ADDR` field of a log line.
pub(crate) fn field(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    let start = line
        .find(&format!("{key}="))
        .with_context(|| format!("no {key}= in {line:?}"))?
        + key.len()
        + 1;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Ok(rest[..end].parse()?)
}

/// A loopback address with a port the OS just had free.
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits until `addr` accepts TCP connections.
pub(crate) fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} never accepted connections");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
