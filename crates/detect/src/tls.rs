//! The server name a TLS ClientHello asks for: the inbound proxy terminates
//! TLS addressed to its own identity and relays any other TLS untouched.

/// The verdict on the bytes of a connection that starts with a TLS record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHello<'a> {
    /// The first record is not complete yet: read at least this many bytes
    /// in total.
    NeedMore(usize),
    /// A well-formed ClientHello, with its SNI host name if it has one.
    Parsed { server_name: Option<&'a str> },
    /// Not a ClientHello this parser understands; relay it as opaque.
    Invalid,
}

const RECORD_HEADER: usize = 5;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const HOST_NAME: u8 = 0x00;

/// Parses the ClientHello in the first TLS record of `buf`. Never panics.
pub fn client_hello(buf: &[u8]) -> ClientHello<'_> {
    if buf.len() < RECORD_HEADER {
        return ClientHello::NeedMore(RECORD_HEADER);
    }
    if buf[0] != HANDSHAKE || buf[1] != 0x03 {
        return ClientHello::Invalid;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let end = RECORD_HEADER + record_len;
    if buf.len() < end {
        return ClientHello::NeedMore(end);
    }
    match parse_handshake(&buf[RECORD_HEADER..end]) {
        Some(server_name) => ClientHello::Parsed { server_name },
        None => ClientHello::Invalid,
    }
}

/// A cursor that fails instead of panicking on short input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<Reader<'a>> {
        let len = match len_bytes {
            1 => usize::from(self.u8()?),
            2 => usize::from(self.u16()?),
            _ => return None,
        };
        self.take(len).map(Reader)
    }
}

/// `Some(sni)` for a well-formed ClientHello (whose SNI may be absent).
fn parse_handshake(record: &[u8]) -> Option<Option<&str>> {
    let mut r = Reader(record);
    if r.u8()? != CLIENT_HELLO {
        return None;
    }
    // A ClientHello split over several records is legal but rare; it is
    // treated as one without a name.
    let len = r.u24()?;
    let mut hello = Reader(r.take(len)?);
    hello.take(2)?; // legacy_version
    hello.take(32)?; // random
    hello.vec(1)?; // legacy_session_id
    hello.vec(2)?; // cipher_suites
    hello.vec(1)?; // legacy_compression_methods
    if hello.0.is_empty() {
        return Some(None);
    }
    let mut extensions = hello.vec(2)?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec(2)?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut names = data.vec(2)?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec(2)?;
            if name_type == HOST_NAME {
                return std::str::from_utf8(name.0).ok().map(Some);
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with `sni` (if any) and one other extension.
    fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        // supported_versions: TLS 1.3
        ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            ext.extend_from_slice(&[0x00, 0x00]);
            ext.extend_from_slice(&(n + 5).to_be_bytes());
            ext.extend_from_slice(&(n + 3).to_be_bytes());
            ext.push(0x00);
            ext.extend_from_slice(&n.to_be_bytes());
            ext.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![HANDSHAKE, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_the_server_name() {
        let h = hello(Some("web.demo"));
        assert_eq!(
            client_hello(&h),
            ClientHello::Parsed {
                server_name: Some("web.demo")
            }
        );
        assert_eq!(
            client_hello(&hello(None)),
            ClientHello::Parsed { server_name: None }
        );
    }

    #[test]
    fn asks_for_the_whole_record() {
        let h = hello(Some("web.demo"));
        assert_eq!(client_hello(&h[..3]), ClientHello::NeedMore(5));
        assert_eq!(client_hello(&h[..10]), ClientHello::NeedMore(h.len()));
    }

    #[test]
    fn truncated_or_foreign_input_is_invalid() {
        let mut h = hello(Some("web.demo"));
        // Claim a longer extension block than there is: its length sits
        // before the 7-byte supported_versions and 17-byte SNI extensions.
        let n = h.len();
        h[n - 26] = 0xff;
        assert_eq!(client_hello(&h), ClientHello::Invalid);
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), ClientHello::Invalid);
    }
}
