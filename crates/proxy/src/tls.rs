//! Mutual TLS between proxies: this proxy's certificate (which rotates), the
//! trust anchors it checks peers against, and the rustls configurations for
//! both directions. TLS 1.3 only, ring as the crypto provider.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_channel::CurrentCert;
pub use weft_channel::{identity_of, provider};
use weft_identity::Name;

/// A certificate with its key, as an upgrade hands it over (DER).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct HeldCert {
    pub name: String,
    #[serde(with = "b64")]
    pub pkcs8: Vec<u8>,
    #[serde(with = "b64_list")]
    pub chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for HeldCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("HeldCert")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    pub(super) fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

mod b64_list {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    pub(super) fn serialize<S: serde::Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|c| STANDARD.encode(c)))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        let texts: Vec<String> = serde::Deserialize::deserialize(d)?;
        texts
            .into_iter()
            .map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The proxy's TLS identity and configurations. The certificate is swapped
/// in place on renewal; configurations never need rebuilding.
pub struct Tls {
    pub name: Name,
    current: Arc<CurrentCert>,
    /// The current certificate's key (PKCS#8), kept only to hand it to
    /// the process an upgrade starts.
    key: std::sync::Mutex<Option<Vec<u8>>>,
    pub roots: Arc<RootCertStore>,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// `roots` are the trust anchors every peer chains to.
    pub fn new(name: Name, roots: Arc<RootCertStore>) -> Result<Self, TlsError> {
        let current = Arc::new(CurrentCert::default());
        let provider = provider();
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_client_cert_resolver(current.clone());
        // Every TLS client of the inbound side is a proxy: it must present
        // a certificate from the same trust anchors. Plaintext clients are
        // still served (permissive), just not over TLS.
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(current.clone());
        Ok(Self {
            name,
            current,
            key: Default::default(),
            roots,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Installs a renewed certificate (`pkcs8`: its key); new handshakes
    /// use it at once.
    pub fn set_cert(&self, key: CertifiedKey, pkcs8: Vec<u8>) {
        if let Ok(mut k) = self.key.lock() {
            *k = Some(pkcs8);
        }
        self.current.set(key);
    }

    /// The certificate held now with its key, for an upgrade's new
    /// process: it serves at once, with no token and no control plane.
    pub fn held(&self) -> Option<HeldCert> {
        let pkcs8 = self.key.lock().ok()?.clone()?;
        let current = self.current.current()?;
        Some(HeldCert {
            name: self.name.to_string(),
            pkcs8,
            chain: current.cert.iter().map(|c| c.to_vec()).collect(),
        })
    }

    /// Installs a certificate handed over by the process this one
    /// replaces, if it is for this identity and still valid.
    pub fn install_held(&self, held: HeldCert) -> Result<(), String> {
        if held.name != self.name.as_str() {
            return Err(format!("it is for {}, not {}", held.name, self.name));
        }
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> = held
            .chain
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        let leaf = chain.first().ok_or("an empty chain")?;
        let not_after = weft_identity::CertInfo::parse(leaf)?.not_after;
        if not_after <= std::time::SystemTime::now() {
            return Err("it has expired".into());
        }
        let key = weft_channel::certified_key_der(held.pkcs8.clone(), chain)
            .map_err(|e| e.to_string())?;
        self.set_cert(key, held.pkcs8);
        Ok(())
    }

    pub fn has_cert(&self) -> bool {
        self.current.is_set()
    }

    /// The certificate as a resolver, for the control channel's client
    /// side: the control plane knows this proxy by it.
    pub fn cert(&self) -> Arc<CurrentCert> {
        self.current.clone()
    }

    /// Opens TLS to a peer proxy that must prove `peer` (its certificate's
    /// only name, chaining to the trust anchors).
    pub async fn connect<I>(
        &self,
        io: I,
        peer: &Name,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<I>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(peer.as_str().to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(self.client.clone())
            .connect(name, io)
            .await
    }

    /// Terminates TLS from a peer proxy; returns the stream and the
    /// client's identity.
    pub async fn accept<I>(
        &self,
        io: I,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<I>, Option<Name>)>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio_rustls::TlsAcceptor::from(self.server.clone())
            .accept(io)
            .await?;
        let client_id = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(identity_of);
        Ok((stream, client_id))
    }
}
