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
