//! The server side: weft-listener's accept loop, TLS 1.3 handshakes off
//! that loop with a deadline, and the caller's verified identity attached
//! to every request.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::{ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use weft_identity::Name;
use weft_listener::{Listener, Throttle};

use crate::{ALPN_H2, ChannelError, identity_of, provider};

/// Who is calling, as the handshake proved it: in every request's
/// extensions (`request.extensions().get::<Peer>()`).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The identity of the client certificate, which chained to the trust
    /// anchors and is valid now; `None` for a client that sent none.
    pub identity: Option<Name>,
}

/// The control plane's TLS: its own (renewed) certificate, and client
/// certificates verified against the trust anchors but not required.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl ServerTls {
    pub fn new(
        roots: Arc<RootCertStore>,
        cert: Arc<dyn ResolvesServerCert>,
    ) -> Result<Self, ChannelError> {
        let provider = provider();
        // Anonymous clients are allowed (a proxy before its first
        // certificate, the CLI); a certificate that is sent must verify.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(cert);
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: the caller's identity is what this handshake
        // proved, never what an earlier one did.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// One accepted, handshaken connection. It holds its listener slot until
/// it is dropped.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    _permit: OwnedSemaphorePermit,
}

/// Accepts from `listener` until the returned stream is dropped. Each
/// handshake runs in its own task and must finish within
/// `handshake_timeout`, so a slow or silent client delays no one; a client
/// that does not speak TLS 1.3 (plaintext gRPC, an old TLS) is refused and
/// logged, at most once per few seconds.
pub fn incoming(
    mut listener: Listener,
    tls: ServerTls,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let log = Arc::new(Throttle::new(Duration::from_secs(5)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept(|| {}) => a,
                () = tx.closed() => return,
            };
            let tx = tx.clone();
            let config = tls.config.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let _ = accepted.stream.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let result =
                    tokio::time::timeout(handshake_timeout, acceptor.accept(accepted.stream)).await;
                let stream = match result {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return refused(&log, accepted.peer, &e.to_string()),
                    Err(_) => {
                        return refused(
                            &log,
                            accepted.peer,
                            &format!("no TLS handshake within {handshake_timeout:?}"),
                        );
                    }
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(identity_of);
                let conn = Conn {
                    stream,
                    peer: Peer {
                        addr: accepted.peer,
                        identity,
                    },
                    _permit: accepted.permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(log: &Throttle, peer: SocketAddr, reason: &str) {
    if let Some(suppressed) = log.allow() {
        tracing::warn!(%peer, reason, suppressed, "control connection refused: the control plane speaks only TLS 1.3 (is the client configured with the trust anchors?)");
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
