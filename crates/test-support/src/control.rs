//! Runs the real `weft-control` binary on loopback ports chosen by the OS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

use crate::mesh::MeshCa;
use crate::process::Logged;

pub struct Control {
    pub process: Logged,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The trust anchors its certificate chains to.
    pub anchors: PathBuf,
}

impl Control {
    /// Starts `weft-control` serving `ca`'s identity directory, with `args`,
    /// on port-0 listeners (unless `args` name others), and waits until it
    /// is ready.
    pub async fn start(bin: &Path, ca: &MeshCa, args: &[&str]) -> anyhow::Result<Self> {
        let mut command = crate::process::command(bin);
        command.env_clear();
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--admin-listen") {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        command.arg("--identity-dir").arg(&ca.dir.dir);
        command.args(args);
        let process = Logged::spawn(command, "weft-control").await?;
        let grpc = process.addr("grpc")?;
        let admin = process.addr("admin")?;
        process.wait_ready(admin, Duration::from_secs(10)).await?;
        Ok(Self {
            process,
            grpc,
            admin,
            anchors: ca.dir.anchor_cert(),
        })
    }

    /// A TLS channel to the control plane, as a client without a
    /// certificate (the CLI, a proxy before its first one) makes it.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        self.channel_as(None).await
    }

    /// The same, presenting `cert` as the client certificate.
    pub async fn channel_as(
        &self,
        cert: Option<Arc<weft_channel::CurrentCert>>,
    ) -> anyhow::Result<Channel> {
        let roots = weft_channel::load_roots(&self.anchors)?;
        let name = weft_channel::DEFAULT_NAME.parse()?;
        let cert = cert.map(|c| c as Arc<dyn weft_channel::ResolvesClientCert>);
        let tls = weft_channel::ClientTls::new(roots, &name, cert)?;
        Ok(weft_channel::connect(&self.grpc.to_string(), &tls, Duration::from_secs(5)).await?)
    }
}
