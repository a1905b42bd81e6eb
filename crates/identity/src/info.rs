//! What a certificate says, for checks and metrics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The parts of a certificate weft looks at.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub subject: String,
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    spki: Vec<u8>,
}

impl CertInfo {
    /// Parses a DER certificate; the error says what is wrong with it.
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let dns_names = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subjectAltName: {e}"))?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let time = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Ok(Self {
            subject: cert.subject().to_string(),
            dns_names,
            not_before: time(cert.validity().not_before.timestamp()),
            not_after: time(cert.validity().not_after.timestamp()),
            is_ca: cert.is_ca(),
            spki: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    pub(crate) fn matches_key(&self, key: &KeyPair) -> bool {
        self.spki == key.public_key_raw()
    }
}

/// Whether `child` was signed by `parent`'s key.
pub fn verify_signed_by(child: &[u8], parent: &[u8]) -> Result<(), String> {
    let (_, child) = X509Certificate::from_der(child).map_err(|e| e.to_string())?;
    let (_, parent) = X509Certificate::from_der(parent).map_err(|e| e.to_string())?;
    child
        .verify_signature(Some(parent.public_key()))
        .map_err(|_| format!("{} is not signed by {}", child.subject(), parent.subject()))
}

/// A DER certificate as PEM text.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
