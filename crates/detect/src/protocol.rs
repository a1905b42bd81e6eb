/// The protocol a connection speaks, as far as the proxy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// HTTP/2 with prior knowledge (the client connection preface).
    Http2,
    /// A TLS ClientHello: relayed opaquely unless the proxy terminates it.
    Tls,
    /// Anything else, including clients that say nothing first.
    Opaque,
}

/// The verdict on a prefix of a connection's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    Known(Protocol),
    /// The prefix is consistent with more than one answer: read more (up to
    /// [`MAX_PREFIX`] bytes, or until the peek timeout).
    NeedMore,
}

/// The most bytes detection ever needs; beyond this the verdict is final.
/// Long enough for a request line with a long URI, short enough to keep the
/// per-connection buffer small.
pub const MAX_PREFIX: usize = 8 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods common enough that seeing `METHOD SP` is proof of HTTP/1: hyper
/// then parses the rest, and a malformed remainder gets a 400 rather than
/// being relayed as opaque bytes.
const WELL_KNOWN_METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Longest method token accepted for extension methods.
const MAX_METHOD_LEN: usize = 32;

/// Classifies the first bytes a client sent. Never panics, for any input.
pub fn detect(buf: &[u8]) -> Detection {
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Detection::Known(Protocol::Http2);
    }
    let h2_prefix = buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf);
    if let Some(verdict) = detect_tls(buf) {
        return verdict;
    }
    match detect_http1(buf) {
        Detection::Known(Protocol::Opaque) if h2_prefix => Detection::NeedMore,
        Detection::Known(p) => Detection::Known(p),
        Detection::NeedMore => Detection::NeedMore,
    }
}

/// A TLS record header (type 22 = handshake, version 3.x) followed by a
/// handshake message of type 1 (ClientHello).
fn detect_tls(buf: &[u8]) -> Option<Detection> {
    const HANDSHAKE: u8 = 0x16;
    const CLIENT_HELLO: u8 = 0x01;
    if buf[0] != HANDSHAKE {
        return None;
    }
    let checks: [fn(u8) -> bool; 6] = [
        |b| b == HANDSHAKE,
        |b| b == 0x03,
        |b| b <= 0x04,
        |_| true,
        |_| true,
        |b| b == CLIENT_HELLO,
    ];
    for (i, check) in checks.iter().enumerate() {
        match buf.get(i) {
            None => return Some(Detection::NeedMore),
            Some(&b) if !check(b) => return Some(Detection::Known(Protocol::Opaque)),
            Some(_) => {}
        }
    }
    Some(Detection::Known(Protocol::Tls))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn detect_http1(buf: &[u8]) -> Detection {
    let opaque = Detection::Known(Protocol::Opaque);
    let method_len = buf.iter().take_while(|&&b| is_tchar(b)).count();
    if method_len == 0 || method_len > MAX_METHOD_LEN {
        return opaque;
    }
    match buf.get(method_len) {
        None => return Detection::NeedMore,
        Some(b' ') => {}
        Some(_) => return opaque,
    }
    if WELL_KNOWN_METHODS.contains(&&buf[..method_len]) {
        return Detection::Known(Protocol::Http1);
    }
    // An extension method: only a complete request line naming HTTP/1.x is
    // proof enough.
    let Some(line_end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_PREFIX {
            opaque
        } else {
            Detection::NeedMore
        };
    };
    let line = buf[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..line_end]);
    let version_ok = line.len() >= 8 && {
        let v = &line[line.len() - 8..];
        v.starts_with(b"HTTP/1.") && v[7].is_ascii_digit()
    };
    if version_ok && line.len() > method_len + 1 + 9 && line[line.len() - 9] == b' ' {
        Detection::Known(Protocol::Http1)
    } else {
        opaque
    }
}

#[cfg(test)]
mod tests;
