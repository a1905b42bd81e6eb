//! The client side: a tonic channel whose connections are TLS 1.3 to a
//! server that must prove the control plane's name.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use weft_identity::Name;

use crate::{ALPN_H2, ChannelError, provider};

/// How a client reaches the control plane: the trust anchors, the name the
/// control plane must prove, and optionally this client's own certificate.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// `cert`, when given, is presented to the control plane: the server
    /// then knows this client's identity without a token.
    pub fn new(
        roots: Arc<RootCertStore>,
        control_name: &Name,
        cert: Option<Arc<dyn ResolvesClientCert>>,
    ) -> Result<Self, ChannelError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut config = match cert {
            Some(cert) => builder.with_client_cert_resolver(cert),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // A resumed session proves nothing new: the server would see the
        // identity (or the anonymity) of the session's first handshake, so
        // a proxy bootstrapped anonymously could never renew by its
        // certificate. Every connection is a full handshake.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(control_name.as_str().to_string()).map_err(|e| {
            ChannelError::Addr {
                addr: control_name.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            config: Arc::new(config),
            name,
        })
    }

    async fn connect_io(
        self,
        addr: String,
    ) -> std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect(&addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(self.config)
            .connect(self.name, tcp)
            .await?;
        Ok(TokioIo::new(tls))
    }
}

fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, ChannelError> {
    // The scheme says what the connection is; the connector below makes it
    // so (tonic's own TLS is not used, so it never sees this).
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| ChannelError::Addr {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(connect_timeout)
        // Proxies hold one long-lived connection; keep-alives find dead
        // ones.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint)
}

fn connector(
    addr: &str,
    tls: &ClientTls,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    let addr = addr.to_string();
    let tls = tls.clone();
    tower::service_fn(move |_: Uri| tls.clone().connect_io(addr.clone()))
}

/// A channel that connects on first use and reconnects by itself: for
/// long-lived clients (a proxy's Destination streams).
pub fn lazy(
    addr: &str,
    tls: &ClientTls,
    connect_timeout: Duration,
) -> Result<Channel, ChannelError> {
    Ok(endpoint(addr, connect_timeout)?.connect_with_connector_lazy(connector(addr, tls)))
}

/// A channel connected now, on a connection of its own: for one-shot
/// clients, and for certificate renewal, which must present the client
/// certificate held *now* rather than reuse a connection opened before it
/// existed.
pub async fn connect(
    addr: &str,
    tls: &ClientTls,
    connect_timeout: Duration,
) -> Result<Channel, ChannelError> {
    endpoint(addr, connect_timeout)?
        .connect_with_connector(connector(addr, tls))
        .await
        .map_err(|e| ChannelError::Connect {
            addr: addr.to_string(),
            reason: crate::error_chain(&e),
        })
}
