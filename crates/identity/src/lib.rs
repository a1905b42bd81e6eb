//! weft's workload identity.
//!
//! A trust anchor (long-lived root) signs an issuer (intermediate); the
//! control plane holds the issuer and signs short-lived leaves for
//! workloads. A workload generates its key itself and sends only a CSR,
//! with a bootstrap token that proves which [`Name`] it may claim.

mod ca;
mod files;
mod info;
mod name;
mod token;

pub use ca::{
    ANCHOR_LIFETIME, CaDir, CsrError, ISSUER_LIFETIME, Issuer, LEAF_LIFETIME, Leaf, MAX_CSR_BYTES,
    new_csr,
};
pub use files::{CaError, parse_pem_certs, read_pem_certs};
pub use info::{CertInfo, to_pem, verify_signed_by};
pub use name::{Name, NameError};
pub use token::{Grant, TokenError, TokenKey};

pub use rcgen::{Error as CertError, KeyPair};
