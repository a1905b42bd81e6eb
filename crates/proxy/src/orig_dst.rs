//! The address a connection was really sent to, before iptables
//! (`REDIRECT`) rewrote it to the proxy's listener.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` for the connection, or `None` when it was not
/// redirected: the option is missing, or names the listener itself.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    (addr != local).then_some(addr)
}
