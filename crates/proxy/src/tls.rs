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
            roots,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Installs a renewed certificate; new handshakes use it at once.
    pub fn set_cert(&self, key: CertifiedKey) {
        self.current.set(key);
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
