//! Running a command-line binary that says on stderr when it has started
//! the part a test must act during (a sampling window, a tap).

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStderr};

pub struct Started {
    child: Child,
    stderr: BufReader<ChildStderr>,
    said: String,
}

impl Started {
    /// Runs `bin args` and waits until a stderr line contains `marker`.
    pub async fn run(bin: &std::path::Path, args: &[&str], marker: &str) -> anyhow::Result<Self> {
        let mut child = crate::process::command(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = BufReader::new(child.stderr.take().context("no stderr")?);
        let mut run = Self {
            child,
            stderr,
            said: String::new(),
        };
        let mut line = String::new();
        while !run.said.contains(marker) {
            line.clear();
            let n = tokio::time::timeout(Duration::from_secs(20), run.stderr.read_line(&mut line))
                .await
                .with_context(|| format!("{args:?} never said {marker:?}: {}", run.said))??;
            anyhow::ensure!(
                n > 0,
                "{args:?} ended before saying {marker:?}: {}",
                run.said
            );
            run.said.push_str(&line);
        }
        Ok(run)
    }

    /// `weft probe --probes FILE` (the `weft` binary at `bin`) on a free
    /// port; it and the address its metrics and `/probes.json` are served
    /// at.
    pub async fn weft_probe(
        bin: &std::path::Path,
        probes: &std::path::Path,
    ) -> anyhow::Result<(Self, String)> {
        let probe = Self::run(
            bin,
            &[
                "probe",
                "--probes",
                &probes.to_string_lossy(),
                "--listen",
                "127.0.0.1:0",
            ],
            "serving http://",
        )
        .await?;
        let admin = probe
            .said()
            .split("serving http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .context("no address in weft probe's first line")?
            .to_string();
        Ok((probe, admin))
    }

    /// What it said on stderr up to the marker.
    pub fn said(&self) -> &str {
        &self.said
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the exit, whatever it is.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }

    /// Waits for the exit, requiring success; returns stdout and stderr.
    pub async fn finish(mut self) -> anyhow::Result<(String, String)> {
        let mut rest = String::new();
        self.stderr.read_to_string(&mut rest).await?;
        self.said.push_str(&rest);
        let out = self.child.wait_with_output().await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(out.status.success(), "{stdout}\n{}", self.said);
        Ok((stdout, self.said))
    }
}
