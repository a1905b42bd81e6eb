//! `weft identity`: the trust anchor, the issuer and bootstrap tokens.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use weft_identity::{CaDir, CertInfo, Name, TokenKey};

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a trust anchor, an issuer it signs, and a token key in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The domain the CA certificates are named under.
        #[arg(long, default_value = "weft.local")]
        trust_domain: Name,
        /// Replace an existing trust anchor (every proxy must then be given
        /// the new ca.crt).
        #[arg(long)]
        force: bool,
    },
    /// Mint a bootstrap token that lets a proxy be certified as NAME.
    Token {
        name: Name,
        #[arg(long)]
        dir: PathBuf,
        /// How long the token may be used to obtain certificates.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// Replace the issuer with a new one signed by the same trust anchor;
    /// a running weft-control picks it up within a second.
    RotateIssuer {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "weft.local")]
        trust_domain: Name,
    },
}

pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            trust_domain,
            force,
        } => {
            let ca = CaDir::new(&dir);
            ca.init(&trust_domain, force)?;
            let issuer =
                CertInfo::parse(&first_cert(&ca.issuer_cert())?).map_err(anyhow::Error::msg)?;
            println!(
                "trust anchor  {}  (give this file to every proxy: WEFT_PROXY_TRUST_ANCHORS)",
                ca.anchor_cert().display()
            );
            println!(
                "anchor key    {}  (needed only to rotate the issuer; keep it offline)",
                ca.anchor_key().display()
            );
            println!(
                "issuer        {}  expires {}",
                ca.issuer_cert().display(),
                humantime::format_rfc3339_seconds(issuer.not_after)
            );
            println!("token key     {}", ca.token_key().display());
            println!("next: weft identity token NAME --dir {}", dir.display());
            Ok(())
        }
        Command::Token {
            name,
            dir,
            valid_for,
        } => {
            let ca = CaDir::new(&dir);
            let path = ca.token_key();
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {} (run `weft identity init` first)",
                    path.display()
                )
            })?;
            let key = TokenKey::from_hex(&text).with_context(|| path.display().to_string())?;
            println!("{}", key.mint(&name, valid_for, SystemTime::now()));
            Ok(())
        }
        Command::RotateIssuer { dir, trust_domain } => {
            let ca = CaDir::new(&dir);
            ca.rotate_issuer(&trust_domain)?;
            let issuer =
                CertInfo::parse(&first_cert(&ca.issuer_cert())?).map_err(anyhow::Error::msg)?;
            println!(
                "new issuer {}  expires {}",
                ca.issuer_cert().display(),
                humantime::format_rfc3339_seconds(issuer.not_after)
            );
            Ok(())
        }
    }
}

fn first_cert(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let certs = weft_identity::read_pem_certs(path)?;
    certs
        .first()
        .map(|c| c.to_vec())
        .with_context(|| format!("{}: no certificate", path.display()))
}
