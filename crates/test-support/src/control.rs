//! Runs the real `weft-control` binary on loopback ports chosen by the OS.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use crate::process::Logged;

pub struct Control {
    pub process: Logged,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Control {
    /// Starts `weft-control` with `args` on port-0 listeners (unless `args`
    /// name others) and waits until it is ready.
    pub async fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = Command::new(bin);
        command.env_clear();
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--admin-listen") {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        command.args(args);
        let process = Logged::spawn(command, "weft-control").await?;
        let grpc = process.addr("grpc")?;
        let admin = process.addr("admin")?;
        process.wait_ready(admin, Duration::from_secs(10)).await?;
        Ok(Self {
            process,
            grpc,
            admin,
        })
    }

    /// `http://ADDR`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}
