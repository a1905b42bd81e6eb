//! Real peers for weft's tests, demo and benchmarks: HTTP/1.1 + HTTP/2
//! servers, a gRPC server, raw TCP servers, HTTP clients that speak through
//! a proxy, and harnesses that run the real `weft-proxy` and `weft-control` binaries.
#![forbid(unsafe_code)]

pub mod backend;
pub mod browser;
pub mod cli;
pub mod client;
pub mod control;
pub mod dns;
pub mod etcd;
pub mod grpc;
pub mod kube_api;
pub mod load;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod tcp;

/// Polls `ready` every `every` until it says yes, failing with "`what`
/// never ..." after `timeout`: how every harness waits for its process.
pub async fn wait_until<F, Fut>(
    timeout: std::time::Duration,
    every: std::time::Duration,
    what: &str,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !ready().await {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// Finds a binary built by this workspace next to the running executable
/// (`target/<profile>/` or its `deps/` directory).
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(std::path::Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent().map(std::path::Path::to_path_buf);
    }
    anyhow::bail!(
        "binary {name} not found beside {}; build it first (cargo build --workspace --bins; add --release for release binaries)",
        exe.display()
    )
}

/// A destinations file in a temporary directory of its own, removed when
/// dropped.
pub struct DestinationsFile {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

/// Destinations as `(authority, [(address, weight)])`.
pub type DestinationList<'a> = [(&'a str, &'a [(std::net::SocketAddr, u32)])];

impl DestinationsFile {
    pub fn new(destinations: &DestinationList<'_>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("destinations.yaml");
        write_destinations(&path, destinations)?;
        Ok(Self { dir, path })
    }

    /// A file with exactly `yaml` in it.
    pub fn from_yaml(yaml: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("destinations.yaml");
        write_atomically(&path, yaml)?;
        Ok(Self { dir, path })
    }

    /// Replaces the contents with `yaml`, atomically.
    pub fn write_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        write_atomically(&self.path, yaml)
    }

    /// Replaces the contents, atomically.
    pub fn write(&self, destinations: &DestinationList<'_>) -> anyhow::Result<()> {
        write_destinations(&self.path, destinations)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The path as the proxy's environment wants it.
    pub fn path_str(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The directory, for other files a test needs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Writes a destinations file in the proxy's format: each authority with
/// its `(address, weight)` endpoints.
pub fn write_destinations(
    path: &std::path::Path,
    destinations: &[(&str, &[(std::net::SocketAddr, u32)])],
) -> anyhow::Result<()> {
    let mut yaml = String::from("destinations:\n");
    for (authority, endpoints) in destinations {
        yaml.push_str(&format!("  \"{authority}\":\n    endpoints:"));
        if endpoints.is_empty() {
            yaml.push_str(" []\n");
            continue;
        }
        yaml.push('\n');
        for (addr, weight) in endpoints.iter() {
            yaml.push_str(&format!("      - addr: {addr}\n        weight: {weight}\n"));
        }
    }
    write_atomically(path, &yaml)
}

/// Write-then-rename, as config management does, so a reader never sees a
/// half-written file.
fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
