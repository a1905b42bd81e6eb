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
/// file never sees half of it.
fn write(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
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
