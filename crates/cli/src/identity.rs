//! `weft identity`: the trust anchor, the issuer and bootstrap tokens.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use weft_identity::{CaDir, CertInfo, Name, TokenKey};

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a trust anchor, an issuer it signs, and a token key in DIR;
    /// the anchor's private key goes outside DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Where the trust anchor's private key is written: never inside
        /// DIR, which weft-control serves from [default: DIR-anchor.key,
        /// beside DIR]. Move it offline; it is needed only to rotate the
        /// issuer.
        #[arg(long, value_name = "PATH")]
        anchor_key_out: Option<PathBuf>,
        /// The domain the CA certificates are named under.
        #[arg(long, default_value = "weft.local")]
        trust_domain: Name,
        /// Replace an existing trust anchor (every proxy must then be given
        /// the new ca.crt).
        #[arg(long)]
        force: bool,
    },
    /// Mint a bootstrap token that lets a proxy be certified as NAME. A
    /// proxy needs it only for its first certificate: renewals are proved
    /// by the certificate it holds.
    Token {
        name: Name,
        #[arg(long)]
        dir: PathBuf,
        /// How long the token may be used to obtain a first certificate.
        #[arg(long, alias = "valid-for", default_value = "12h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A single-use token: the control plane accepts it once and
        /// refuses it afterwards (it remembers it until it expires).
        #[arg(long)]
        once: bool,
    },
    /// Write a workload's private key (`key.p8`, PKCS#8 DER, mode 0600)
    /// and a certificate signing request for NAME (`csr.der`) into DIR:
    /// the identity directory linkerd2-proxy reads
    /// (`LINKERD2_PROXY_IDENTITY_DIR`), which then certifies itself with
    /// weft-control. weft-proxy makes its own.
    Csr {
        name: Name,
        #[arg(long)]
        dir: PathBuf,
        /// Replace a key already in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Replace the issuer with a new one signed by the same trust anchor;
    /// a running weft-control picks it up within a second.
    RotateIssuer {
        #[arg(long)]
        dir: PathBuf,
        /// The trust anchor's private key [default: DIR-anchor.key, where
        /// `weft identity init` put it].
        #[arg(long, value_name = "PATH")]
        anchor_key: Option<PathBuf>,
        #[arg(long, default_value = "weft.local")]
        trust_domain: Name,
    },
}

pub(crate) fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            anchor_key_out,
            trust_domain,
            force,
        } => {
            let ca = ca_dir(&dir, anchor_key_out);
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
            println!(
                "next: weft identity token NAME --dir {}; weft-control --identity-dir {}",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Command::Token {
            name,
            dir,
            ttl,
            once,
        } => {
            let ca = CaDir::new(&dir);
            if !ca.token_key().exists() {
                anyhow::bail!(
                    "{} does not exist (run `weft identity init --dir {}` first)",
                    ca.token_key().display(),
                    dir.display()
                );
            }
            let key: TokenKey = ca.read_token_key()?;
            let now = SystemTime::now();
            let token = if once {
                key.mint_once(&name, ttl, now)?
            } else {
                key.mint(&name, ttl, now)
            };
            println!("{token}");
            Ok(())
        }
        Command::Csr { name, dir, force } => {
            let key_path = dir.join("key.p8");
            if key_path.exists() && !force {
                anyhow::bail!(
                    "{} exists: a workload keeps its key (pass --force to replace it)",
                    key_path.display()
                );
            }
            let (key, csr) = weft_identity::new_csr(&name)
                .with_context(|| format!("making a key and CSR for {name}"))?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            write_private(&key_path, &key.serialize_der())?;
            let csr_path = dir.join("csr.der");
            std::fs::write(&csr_path, &csr)
                .with_context(|| format!("writing {}", csr_path.display()))?;
            println!("key  {}", key_path.display());
            println!("csr  {}  for {name}", csr_path.display());
            Ok(())
        }
        Command::RotateIssuer {
            dir,
            anchor_key,
            trust_domain,
        } => {
            let ca = ca_dir(&dir, anchor_key);
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

/// Writes `bytes` readable by the owner only, from the moment it exists.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn ca_dir(dir: &std::path::Path, anchor_key: Option<PathBuf>) -> CaDir {
    match anchor_key {
        Some(key) => CaDir::with_anchor_key(dir, key),
        None => CaDir::new(dir),
    }
}

fn first_cert(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let certs = weft_identity::read_pem_certs(path)?;
    certs
        .first()
        .map(|c| c.to_vec())
        .with_context(|| format!("{}: no certificate", path.display()))
}
