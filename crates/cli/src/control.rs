//! The CLI's side of the control channel: TLS 1.3, the control plane's
//! certificate checked against the mesh's trust anchors and its name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use weft_identity::Name;

use crate::targets::Target;

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct TlsArgs {
    /// The mesh's trust anchors (ca.crt from `weft identity init`), which
    /// the control plane's certificate must chain to [default: label
    /// `anchors` of the targets file's control group]
    #[arg(long, env = "WEFT_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    #[arg(long, env = "WEFT_CONTROL_NAME", default_value = weft_channel::DEFAULT_NAME)]
    pub control_name: Name,
}

impl TlsArgs {
    /// The flag, else what the targets file says.
    pub(crate) fn anchors(&self, listed: &[Target]) -> Option<PathBuf> {
        self.trust_anchors
            .clone()
            .or_else(|| crate::targets::anchors_of(listed))
    }
}

/// Where the control plane is and how to trust it, for commands that ask
/// it directly.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ControlArgs {
    /// The control plane's gRPC address [default: from the targets file,
    /// else 127.0.0.1:8086]
    #[arg(long, env = "WEFT_CONTROL_ADDR")]
    control: Option<String>,
    /// A targets file naming the control plane (group labelled
    /// role=control, gRPC address in label `grpc`) [default: the file
    /// `weft demo` writes]
    #[arg(long, env = "WEFT_TARGETS", value_name = "FILE")]
    targets: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl ControlArgs {
    /// The control plane's admin address: from the targets file, else the
    /// default.
    pub(crate) fn admin(&self) -> String {
        let path = self
            .targets
            .clone()
            .unwrap_or_else(crate::targets::default_path);
        let listed = crate::targets::load(&path).unwrap_or_default();
        crate::targets::control_of(&listed)
            .1
            .unwrap_or_else(|| crate::targets::DEFAULT_CONTROL_ADMIN.into())
    }

    /// A channel to the control plane, connected now.
    pub(crate) async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        // No targets file is fine here: the flags or defaults may be right.
        let path = self
            .targets
            .clone()
            .unwrap_or_else(crate::targets::default_path);
        let listed = crate::targets::load(&path).unwrap_or_default();
        let control = self.control.clone().unwrap_or_else(|| {
            crate::targets::control_of(&listed)
                .0
                .unwrap_or_else(|| crate::targets::DEFAULT_CONTROL.into())
        });
        let anchors = self.tls.anchors(&listed).ok_or_else(no_anchors)?;
        connect(&control, &anchors, &self.tls.control_name).await
    }
}

/// A channel to the control plane the targets file names (the default
/// file when `None`), trusting the anchors it names, expecting the default
/// name.
pub(crate) async fn channel_from_targets(
    targets: Option<PathBuf>,
) -> anyhow::Result<tonic::transport::Channel> {
    let path = targets.unwrap_or_else(crate::targets::default_path);
    let listed = crate::targets::load(&path)?;
    let grpc = crate::targets::control_of(&listed)
        .0
        .unwrap_or_else(|| crate::targets::DEFAULT_CONTROL.into());
    let anchors = crate::targets::anchors_of(&listed).ok_or_else(no_anchors)?;
    let name: Name = weft_channel::DEFAULT_NAME.parse()?;
    connect(&grpc, &anchors, &name).await
}

/// A channel to the control plane at `grpc`, connected now.
pub(crate) async fn connect(
    grpc: &str,
    anchors: &Path,
    name: &Name,
) -> anyhow::Result<tonic::transport::Channel> {
    let roots = weft_channel::load_roots(anchors)?;
    let tls = weft_channel::ClientTls::new(roots, name, None)?;
    let channel = weft_channel::connect(grpc, &tls, Duration::from_secs(3))
        .await
        .with_context(|| {
            format!(
                "TLS to the control plane at {grpc}, expecting {name} signed by {}",
                anchors.display()
            )
        })?;
    Ok(channel)
}

/// The error when no trust anchors are known.
pub(crate) fn no_anchors() -> anyhow::Error {
    anyhow::anyhow!(
        "the control channel is TLS and no trust anchors are known: pass --trust-anchors FILE (the ca.crt from `weft identity init`) or set WEFT_TRUST_ANCHORS"
    )
}
