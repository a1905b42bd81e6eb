//! Reading and writing the CA directory, with errors that name the file.

use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{} already exists: replacing the trust anchor breaks every proxy that trusts it (pass --force to do it anyway)", path.display())]
    Exists { path: PathBuf },
    #[error("{} is readable by {who} (mode {mode:04o}): a private key must be readable by its owner only; run `chmod 600 {}`", path.display(), path.display())]
    Exposed {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error("{} holds the trust anchor's private key, but this directory is served by the control plane; move it somewhere offline (e.g. `mv {} /secure/place/`) and pass that path to `weft identity rotate-issuer --anchor-key` when rotating", path.display(), path.display())]
    AnchorKeyServed { path: PathBuf },
    #[error("the trust anchor's key {} must be outside {}, the directory weft-control serves from", key.display(), dir.display())]
    AnchorKeyInside { key: PathBuf, dir: PathBuf },
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
}

impl CaError {
    pub(crate) fn generate(what: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |source| Self::Generate { what, source }
    }
}

pub(crate) fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a private key, refusing one that others could have read.
pub(crate) fn read_secret(path: &Path) -> Result<String, CaError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::Exposed {
            path: path.to_path_buf(),
            mode,
            who: if mode & 0o007 != 0 {
                "others"
            } else {
                "its group"
            },
        });
    }
    read(path)
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

pub(crate) fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    write(path, text, 0o644)
}

/// Keys are readable by their owner only.
pub(crate) fn write_secret(path: &Path, text: &str) -> Result<(), CaError> {
    write(path, text, 0o600)
}

/// Writes through a temporary file and a rename, so a reader polling the
/// file never sees half of it. The temporary file is new (never a leftover
/// with looser permissions), named after its target (two files written
/// together never share one), and has its final mode before the first
/// byte.
fn write(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".{}.{}.tmp", std::process::id(), fastrand::u64(..)));
    let tmp = PathBuf::from(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; never widened it, but a
        // public file should be readable as promised.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Every certificate in a PEM file, in order.
pub fn parse_pem_certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Invalid {
            path: path.to_path_buf(),
            reason: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM file of certificates (trust anchors, a chain).
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    parse_pem_certs(path, &read(path)?)
}
