//! HTTP clients that talk to a proxy the way applications do: HTTP/1.1 in
//! absolute form (explicit proxy), HTTP/2 with `:authority`.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A TCP connection to `addr`, from the source address `from` (any
/// address on loopback, 127.0.0.0/8, is this host's) or the default.
pub async fn connect_from(from: Option<IpAddr>, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = match from {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = match ip {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An HTTP/1.1 connection to `addr`.
pub async fn http1<B>(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    http1_from(None, addr).await
}

/// An HTTP/1.1 connection to `addr` from the source address `from`.
pub async fn http1_from<B>(
    from: Option<IpAddr>,
    addr: SocketAddr,
) -> anyhow::Result<http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = connect_from(from, addr).await?;
    let (send, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
pub async fn http2<B>(addr: SocketAddr) -> anyhow::Result<http2::SendRequest<B>>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    http2_from(None, addr).await
}

/// An HTTP/2 connection to `addr` from the source address `from`.
pub async fn http2_from<B>(
    from: Option<IpAddr>,
    addr: SocketAddr,
) -> anyhow::Result<http2::SendRequest<B>>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = connect_from(from, addr).await?;
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A GET for `http://{authority}{path}`, with a matching Host header.
pub fn get(authority: &str, path: &str) -> anyhow::Result<Request<Full<Bytes>>> {
    Ok(Request::get(format!("http://{authority}{path}"))
        .header(http::header::HOST, authority)
        .body(Full::new(Bytes::new()))?)
}

/// The same request for HTTP/2: `:authority` only.
pub fn get_h2(authority: &str, path: &str) -> anyhow::Result<Request<Full<Bytes>>> {
    Ok(Request::get(format!("http://{authority}{path}"))
        .version(http::Version::HTTP_2)
        .body(Full::new(Bytes::new()))?)
}

/// Reads a whole response body as text.
pub async fn text(
    rsp: Response<Incoming>,
) -> anyhow::Result<(http::StatusCode, http::HeaderMap, String)> {
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// An HTTP/1.1 or HTTP/2 connection behind one interface, for code that
/// sends the same requests over either.
pub enum Conn {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub async fn connect(addr: SocketAddr, use_http2: bool) -> anyhow::Result<Self> {
        Ok(if use_http2 {
            Self::Http2(http2(addr).await?)
        } else {
            Self::Http1(http1(addr).await?)
        })
    }

    /// GETs `path` from `authority` and reads the whole response.
    pub async fn get(
        &mut self,
        authority: &str,
        path: &str,
    ) -> anyhow::Result<(http::StatusCode, http::HeaderMap, String)> {
        let req = match self {
            Self::Http1(_) => get(authority, path)?,
            Self::Http2(_) => get_h2(authority, path)?,
        };
        self.send(req).await
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<(http::StatusCode, http::HeaderMap, String)> {
        let rsp = match self {
            Self::Http1(send) => {
                send.ready().await?;
                send.send_request(req).await?
            }
            Self::Http2(send) => send.send_request(req).await?,
        };
        text(rsp).await
    }
}
