//! The control channel: how proxies and the operator's CLI reach
//! weft-control, and how weft-control accepts them.
//!
//! Everything on it is TLS 1.3. The client checks the control plane's
//! certificate against the mesh's trust anchors and an expected name
//! ([`DEFAULT_NAME`] unless configured), so whoever sits on the path can
//! neither read a bootstrap token nor rewrite a Destination answer. A client
//! may present its own workload certificate; the server then knows, from
//! the handshake alone, which identity is calling ([`Peer`]). Clients
//! without one (a proxy being bootstrapped, the CLI) are still served, and
//! each API decides what an anonymous caller may do.

mod client;
pub mod codec;
mod server;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
pub use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use weft_identity::{CertInfo, Name};

pub use client::{ClientTls, connect, lazy};
pub use server::{Conn, Peer, ServerTls, incoming};

/// The name weft-control's certificate carries, and the name clients
/// expect, when neither side is told otherwise.
pub const DEFAULT_NAME: &str = "weft-control.weft.local";

/// gRPC over TLS negotiates HTTP/2 by ALPN.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("trust anchors {path}: {reason}")]
    TrustAnchors { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("control plane address {addr}: {reason}")]
    Addr { addr: String, reason: String },
    /// `reason` is the whole cause chain: tonic's own message is only
    /// "transport error", and the cause (a certificate for the wrong name,
    /// an unknown issuer) is what an operator needs.
    #[error("connecting to the control plane at {addr}: {reason}")]
    Connect { addr: String, reason: String },
}

/// An error and its causes on one line, each said once: many libraries'
/// messages are only "transport error", and the cause is what an operator
/// needs. Every weft binary reports errors this way.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The one crypto provider weft uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads PEM trust anchors into a root store; errors name the file and the
/// certificate that is not usable.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, ChannelError> {
    let err = |reason: String| ChannelError::TrustAnchors {
        path: path.display().to_string(),
        reason,
    };
    let anchors = weft_identity::read_pem_certs(path).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in anchors.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            err(format!(
                "certificate {} is not a usable trust anchor: {e}",
                i + 1
            ))
        })?;
    }
    Ok(Arc::new(roots))
}

/// A certificate that is replaced on renewal while handshakes keep reading
/// it: both a server and a client resolver, so one proxy certificate serves
/// inbound mTLS, outbound mTLS and the control channel.
#[derive(Debug, Default)]
pub struct CurrentCert(ArcSwapOption<CertifiedKey>);

impl CurrentCert {
    pub fn set(&self, key: CertifiedKey) {
        self.0.store(Some(Arc::new(key)));
    }

    pub fn is_set(&self) -> bool {
        self.0.load().is_some()
    }

    /// The certificate installed now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }

    /// The leaf's expiry, if a certificate is installed.
    pub fn not_after(&self) -> Option<std::time::SystemTime> {
        let key = self.0.load_full()?;
        Some(CertInfo::parse(key.end_entity_cert().ok()?).ok()?.not_after)
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

/// The identity a certificate names (its first DNS subject alternative
/// name).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Name> {
    CertInfo::parse(cert)
        .ok()?
        .dns_names
        .first()
        .and_then(|n| n.parse().ok())
}

/// A certificate chain and the key generated for it, as rustls serves
/// them.
pub fn certified_key(
    key: &weft_identity::KeyPair,
    chain: Vec<CertificateDer<'static>>,
) -> Result<CertifiedKey, rustls::Error> {
    certified_key_der(key.serialize_der(), chain)
}

/// [`certified_key`] from the key's PKCS#8 DER.
pub fn certified_key_der(
    pkcs8: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
) -> Result<CertifiedKey, rustls::Error> {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    let signing = provider().key_provider.load_private_key(private)?;
    Ok(CertifiedKey::new(chain, signing))
}
