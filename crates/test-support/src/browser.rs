//! Real browsers for the pages weft serves, each with a throwaway profile:
//! headless Chromium (Debian `chromium`) run once per page, and Firefox
//! ESR driven over WebDriver BiDi, the remote protocol built into it (no
//! geckodriver needed).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// Headless Chromium on `url`: the DOM once the page settles
/// (`--dump-dom`), or a screenshot to `png`. Pages that never finish (a
/// live stream) settle after three seconds of virtual time.
pub async fn chromium(url: &str, profile: &Path, png: Option<&Path>) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.env("HOME", profile)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
            "--window-size=1280,1400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("chromium").display()
        ))
        .kill_on_drop(true);
    match png {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.arg(url).output())
        .await
        .context("chromium did not finish within 60 s")??;
    anyhow::ensure!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Firefox and one BiDi session with its first tab. Killed on
/// drop.
pub struct Firefox {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws: Socket,
    next_id: u64,
    context: String,
}

impl Firefox {
    /// Starts `firefox-esr` (or `firefox`) headless and opens a session.
    pub async fn start() -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let binary = if which("firefox-esr") {
            "firefox-esr"
        } else {
            "firefox"
        };
        // Nothing phones home or waits on a first-run page.
        std::fs::write(
            profile.path().join("user.js"),
            [
                r#"user_pref("browser.shell.checkDefaultBrowser", false);"#,
                r#"user_pref("datareporting.policy.dataSubmissionEnabled", false);"#,
                r#"user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);"#,
                r#"user_pref("app.update.disabledForTesting", true);"#,
                r#"user_pref("network.captive-portal-service.enabled", false);"#,
                r#"user_pref("browser.startup.homepage_override.mstone", "ignore");"#,
            ]
            .join("\n"),
        )?;
        let mut child = tokio::process::Command::new(binary)
            .env("HOME", profile.path())
            .env("MOZ_HEADLESS", "1")
            .args(["--headless", "--no-remote", "--remote-debugging-port=0"])
            .arg("--profile")
            .arg(profile.path())
            .arg("--window-size=1280,1400")
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{binary} (Debian: apt-get install firefox-esr)"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let ws_url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("WebDriver BiDi listening on ") {
                    return anyhow::Ok(url.trim().to_string());
                }
            }
            anyhow::bail!("{binary} exited before its remote agent listened")
        })
        .await
        .with_context(|| format!("{binary}'s remote agent did not listen within 60 s"))??;
        // The rest of its chatter is drained, so it never blocks on a pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(format!("{ws_url}/session"))
            .await
            .context("connecting to Firefox's BiDi endpoint")?;
        let mut firefox = Firefox {
            _child: child,
            _profile: profile,
            ws,
            next_id: 0,
            context: String::new(),
        };
        firefox
            .call("session.new", json!({"capabilities": {}}))
            .await?;
        let tree = firefox.call("browsingContext.getTree", json!({})).await?;
        firefox.context = tree["contexts"][0]["context"]
            .as_str()
            .with_context(|| format!("no browsing context: {tree}"))?
            .to_string();
        Ok(firefox)
    }

    /// One command; its result, or the error it answered.
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await?;
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(msg) = self.ws.next().await {
                let Message::Text(text) = msg? else { continue };
                let v: Value = serde_json::from_str(&text)?;
                if v["id"] != id {
                    continue; // an event
                }
                if v["type"] == "error" {
                    anyhow::bail!("{method}: {} {}", v["error"], v["message"]);
                }
                return Ok(v["result"].clone());
            }
            anyhow::bail!("Firefox closed the session")
        })
        .await
        .with_context(|| format!("{method}: no answer within 60 s"))?
    }

    /// Loads `url` and waits for its `load` event.
    pub async fn open(&mut self, url: &str) -> anyhow::Result<()> {
        let context = self.context.clone();
        self.call(
            "browsingContext.navigate",
            json!({"context": context, "url": url, "wait": "complete"}),
        )
        .await?;
        Ok(())
    }

    /// The value of a JavaScript expression in the page (strings, numbers,
    /// booleans; `null` otherwise).
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let context = self.context.clone();
        let r = self
            .call(
                "script.evaluate",
                json!({"expression": expression, "target": {"context": context}, "awaitPromise": true}),
            )
            .await?;
        if r["type"] == "exception" {
            anyhow::bail!("{expression}: {}", r["exceptionDetails"]["text"]);
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is `true`.
    pub async fn wait_for(&mut self, expression: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.eval(expression).await? == Value::Bool(true) {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{expression} was not true within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's HTML as rendered now.
    pub async fn dom(&mut self) -> anyhow::Result<String> {
        Ok(self
            .eval("document.documentElement.outerHTML")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&mut self, png: &Path) -> anyhow::Result<()> {
        let context = self.context.clone();
        let r = self
            .call(
                "browsingContext.captureScreenshot",
                json!({"context": context, "origin": "document"}),
            )
            .await?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("no screenshot data")?)?;
        std::fs::write(png, data)?;
        Ok(())
    }
}

fn which(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()))
}
