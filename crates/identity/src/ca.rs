//! The certificate authority: a long-lived trust anchor that signs an
//! issuer, and the issuer that signs workloads' short-lived leaves.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::Name;
use crate::files::{self, CaError};

/// Default lifetimes: an anchor outlives many issuers, an issuer outlives
/// many leaves, and a leaf lives a day (renewed well before it ends).
pub const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaves are back-dated a little so a peer whose clock is slightly behind
/// still accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Where `weft identity init` puts things: the directory weft-control
/// serves from, and the trust anchor's key, which is never in it.
#[derive(Clone, Debug)]
pub struct CaDir {
    pub dir: PathBuf,
    anchor_key: PathBuf,
}

/// The name an anchor key had inside the directory before it was kept
/// out; weft-control refuses to start while a file of this name is there.
const SERVED_ANCHOR_KEY: &str = "ca.key";

impl CaDir {
    /// `dir`, with the anchor key beside it (`<dir>-anchor.key`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let name = dir
            .file_name()
            .map_or_else(|| "weft".into(), |n| n.to_string_lossy().into_owned());
        let anchor_key = dir
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{name}-anchor.key"));
        Self { dir, anchor_key }
    }

    /// `dir`, with the anchor key at `anchor_key`.
    pub fn with_anchor_key(dir: impl Into<PathBuf>, anchor_key: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            anchor_key: anchor_key.into(),
        }
    }

    /// The trust anchors every proxy is configured with.
    pub fn anchor_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The anchor's key: needed only to mint a new issuer. Keep it offline.
    pub fn anchor_key(&self) -> &Path {
        &self.anchor_key
    }

    /// Refuses a directory that holds a trust anchor's key: whoever can
    /// read what the control plane serves from must not be able to mint
    /// issuers.
    pub fn check_served(&self) -> Result<(), CaError> {
        let inside = self.dir.join(SERVED_ANCHOR_KEY);
        if inside.exists() {
            return Err(CaError::AnchorKeyServed { path: inside });
        }
        Ok(())
    }

    /// The token key, refused if others can read it.
    pub fn read_token_key(&self) -> Result<crate::TokenKey, CaError> {
        let path = self.token_key();
        let text = files::read_secret(&path)?;
        crate::TokenKey::from_hex(&text).map_err(|e| CaError::Invalid {
            path,
            reason: e.to_string(),
        })
    }
    pub fn issuer_cert(&self) -> PathBuf {
        self.dir.join("issuer.crt")
    }
    pub fn issuer_key(&self) -> PathBuf {
        self.dir.join("issuer.key")
    }
    pub fn token_key(&self) -> PathBuf {
        self.dir.join("token.key")
    }

    /// Creates a trust anchor, an issuer it signs and a token key. Refuses
    /// to replace an existing anchor unless `force`: every proxy trusts it.
    pub fn init(&self, trust_domain: &Name, force: bool) -> Result<(), CaError> {
        if !force && self.anchor_cert().exists() {
            return Err(CaError::Exists {
                path: self.anchor_cert(),
            });
        }
        files::create_dir(&self.dir)?;
        let inside = |p: &Path| {
            p.parent()
                .map(|d| {
                    if d.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        d
                    }
                })
                .and_then(|d| d.canonicalize().ok())
        };
        if inside(&self.anchor_key) == self.dir.canonicalize().ok() {
            return Err(CaError::AnchorKeyInside {
                key: self.anchor_key.clone(),
                dir: self.dir.clone(),
            });
        }
        let now = SystemTime::now();
        let anchor_key = KeyPair::generate().map_err(CaError::generate("trust anchor key"))?;
        let mut anchor = ca_params(&format!("root.{trust_domain}"), now, ANCHOR_LIFETIME);
        anchor.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let anchor_cert = anchor
            .self_signed(&anchor_key)
            .map_err(CaError::generate("trust anchor"))?;
        files::write_public(&self.anchor_cert(), &anchor_cert.pem())?;
        files::write_secret(&self.anchor_key, &anchor_key.serialize_pem())?;
        let anchor_issuer = rcgen::Issuer::new(anchor, anchor_key);
        self.write_issuer(trust_domain, &anchor_issuer, now)?;
        let (_, hex) = crate::TokenKey::generate().map_err(|e| CaError::Invalid {
            path: self.token_key(),
            reason: e.to_string(),
        })?;
        files::write_secret(&self.token_key(), &format!("{hex}\n"))?;
        Ok(())
    }

    /// Replaces the issuer with a new one signed by the same anchor: leaves
    /// from either chain to the anchor, so rotation fails no handshake.
    pub fn rotate_issuer(&self, trust_domain: &Name) -> Result<(), CaError> {
        self.rotate_issuer_at(trust_domain, SystemTime::now())
    }

    /// [`Self::rotate_issuer`] as if it ran at `now`: the new issuer is
    /// valid for [`ISSUER_LIFETIME`] from then (tests use a past `now` to
    /// make an issuer that is about to expire, or has).
    pub fn rotate_issuer_at(&self, trust_domain: &Name, now: SystemTime) -> Result<(), CaError> {
        let anchor_pem = files::read(&self.anchor_cert())?;
        let key_pem = files::read_secret(&self.anchor_key)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: self.anchor_key.clone(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let anchor =
            rcgen::Issuer::from_ca_cert_pem(&anchor_pem, key).map_err(|e| CaError::Invalid {
                path: self.anchor_cert(),
                reason: format!("not a PEM CA certificate: {e}"),
            })?;
        self.write_issuer(trust_domain, &anchor, now)
    }

    fn write_issuer(
        &self,
        trust_domain: &Name,
        anchor: &rcgen::Issuer<'_, KeyPair>,
        now: SystemTime,
    ) -> Result<(), CaError> {
        let key = KeyPair::generate().map_err(CaError::generate("issuer key"))?;
        // A serial per issuer, so a rotated issuer is distinguishable.
        let serial = format!("issuer-{}.{trust_domain}", unix(now));
        let mut params = ca_params(&serial, now, ISSUER_LIFETIME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params
            .signed_by(&key, anchor)
            .map_err(CaError::generate("issuer certificate"))?;
        // Key first: a reader that sees the new certificate must find its key.
        files::write_secret(&self.issuer_key(), &key.serialize_pem())?;
        files::write_public(&self.issuer_cert(), &cert.pem())?;
        Ok(())
    }
}

fn ca_params(common_name: &str, now: SystemTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + lifetime).into();
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

fn dns_san(name: &Name) -> Result<SanType, rcgen::Error> {
    Ok(SanType::DnsName(name.as_str().to_string().try_into()?))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An issuer loaded from its certificate and key: signs workload leaves.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    not_after: SystemTime,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub not_after: SystemTime,
}

/// A CSR larger than this is refused unparsed: a workload's (one key, one
/// name) is a few hundred bytes.
pub const MAX_CSR_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the certificate signing request does not parse or its signature is invalid: {0}")]
    Invalid(rcgen::Error),
    #[error(
        "the certificate signing request must name exactly {requested} (as its one DNS subject alternative name), but names {count}: {first:?}{}",
        if *count > first.len() { " and more" } else { "" }
    )]
    WrongNames {
        requested: Name,
        /// How many names it has, and the first few (an error is short
        /// whatever a CSR holds).
        count: usize,
        first: Vec<String>,
    },
    #[error("the certificate signing request is {0} bytes; a workload's is under {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error("the certificate signing request asks for a CA certificate")]
    RequestsCa,
    #[error("the issuer expired; rotate it with `weft identity rotate-issuer`")]
    IssuerExpired,
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
}

impl Issuer {
    pub fn load(dir: &CaDir) -> Result<Self, CaError> {
        Self::from_files(&dir.issuer_cert(), &dir.issuer_key())
    }

    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = files::read(cert_path)?;
        let key_pem = files::read_secret(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.to_path_buf(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let cert = files::parse_pem_certs(cert_path, &cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Invalid {
                path: cert_path.to_path_buf(),
                reason: "no certificate in the file".into(),
            })?;
        let info = crate::CertInfo::parse(&cert).map_err(|reason| CaError::Invalid {
            path: cert_path.to_path_buf(),
            reason,
        })?;
        if !info.is_ca {
            return Err(CaError::Invalid {
                path: cert_path.to_path_buf(),
                reason: "not a CA certificate (basicConstraints CA:FALSE)".into(),
            });
        }
        if !info.matches_key(&key) {
            return Err(CaError::Invalid {
                path: key_path.to_path_buf(),
                reason: format!("this key does not belong to {}", cert_path.display()),
            });
        }
        let signer = rcgen::Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Invalid {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            signer,
            cert,
            not_after: info.not_after,
        })
    }

    /// The issuer's own certificate: sent with every leaf so peers can chain
    /// the leaf to the trust anchor.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a leaf for `name` from a workload's CSR. Only the CSR's public
    /// key is used: the certificate's names, usages and lifetime are the
    /// issuer's decision, and the lifetime never exceeds the issuer's own.
    pub fn certify(
        &self,
        csr_der: &[u8],
        name: &Name,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Leaf, CsrError> {
        if now >= self.not_after {
            return Err(CsrError::IssuerExpired);
        }
        if csr_der.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge(csr_der.len()));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(CsrError::Invalid)?;
        let sans = &csr.params.subject_alt_names;
        let only = match sans.as_slice() {
            [SanType::DnsName(d)] => d.as_str() == name.as_str(),
            _ => false,
        };
        if !only {
            return Err(CsrError::WrongNames {
                requested: name.clone(),
                count: sans.len(),
                first: sans
                    .iter()
                    .take(3)
                    .map(|s| match s {
                        SanType::DnsName(d) => d.as_str().to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect(),
            });
        }
        if matches!(csr.params.is_ca, IsCa::Ca(_)) {
            return Err(CsrError::RequestsCa);
        }
        let not_after = (now + lifetime).min(self.not_after);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![dns_san(name).map_err(CsrError::Sign)?];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.signer)
            .map_err(CsrError::Sign)?;
        Ok(Leaf {
            der: cert.der().clone(),
            not_after,
        })
    }
}

/// A workload's own key and the CSR that asks for `name`. The key never
/// leaves the workload; only the CSR is sent.
pub fn new_csr(name: &Name) -> Result<(KeyPair, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![dns_san(name)?];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}
