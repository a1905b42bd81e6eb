//! Which local user opened a connection: the uid that owns the client's
//! socket, from the kernel's socket tables (`/proc/net/tcp`, `tcp6`). Per
//! node, workloads that share the host's address are told apart by it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The uid owning the TCP socket in this network namespace whose local
/// address is `client` (the peer of a connection the proxy accepted);
/// `None` when the client is not local or its socket is gone.
pub fn owner_uid(client: SocketAddr) -> Option<u32> {
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .find_map(|path| {
            let table = std::fs::read_to_string(path).ok()?;
            find(&table, client)
        })
}

/// The uid of the socket bound to `client` in one table's text.
fn find(table: &str, client: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let (local, uid) = parse_line(line)?;
        (local == client).then_some(uid)
    })
}

/// `sl local_address rem_address st tx:rx tr:when retrnsmt uid ...`.
fn parse_line(line: &str) -> Option<(SocketAddr, u32)> {
    let mut fields = line.split_whitespace();
    let local = parse_addr(fields.nth(1)?)?;
    let uid = fields.nth(5)?.parse().ok()?;
    Some((local, uid))
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word as the kernel holds it, printed as a native integer.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_tables_are_read_as_it_writes_them() {
        // Lines as /proc/net/tcp and tcp6 print them on a little-endian host.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:E2A4 01 00000000:00000000 00:00000000 00000000  2301        0 1234 1 0000000000000000 20 4 30 10 -1\n";
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0000000000000000FFFF00000100007F:9C40 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 99 1 0000000000000000 20 4 30 10 -1\n   1: 000080FE00000000FF23F2ABFE2C9E11:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     7        0 98 1 0000000000000000 100 0 0 10 0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(
                find(v4, "127.0.0.1:8080".parse().expect("addr")),
                Some(2301)
            );
            assert_eq!(find(v4, "127.0.0.1:8081".parse().expect("addr")), None);
            // A v4-mapped dual-stack socket is the IPv4 client it serves.
            assert_eq!(
                find(v6, "127.0.0.1:40000".parse().expect("addr")),
                Some(1001)
            );
            assert_eq!(
                find(v6, "[fe80::ff:23f2:abfe:2c9e:11]:80".parse().expect("addr")),
                None
            );
        }
    }

    #[test]
    fn this_processs_own_socket_is_found_with_its_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let me = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u32>().ok())
            })
            .expect("uid");
        assert_eq!(owner_uid(client.local_addr().expect("addr")), Some(me));
    }
}
