use super::*;

fn known(p: Protocol) -> Detection {
    Detection::Known(p)
}

#[test]
fn http2_preface_whole_and_partial() {
    assert_eq!(detect(H2_PREFACE), known(Protocol::Http2));
    assert_eq!(
        detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
        known(Protocol::Http2)
    );
    for i in 1..H2_PREFACE.len() {
        assert_eq!(detect(&H2_PREFACE[..i]), Detection::NeedMore, "prefix {i}");
    }
}

#[test]
fn http1_well_known_methods_decide_early() {
    assert_eq!(detect(b"GET "), known(Protocol::Http1));
    assert_eq!(detect(b"POST /x HTTP/1.1\r\n"), known(Protocol::Http1));
    assert_eq!(detect(b"GE"), Detection::NeedMore);
    assert_eq!(detect(b"CONNECT a:1 HTTP/1.1\r\n"), known(Protocol::Http1));
}

#[test]
fn http1_extension_methods_need_the_whole_line() {
    assert_eq!(detect(b"PROPFIND /d HTTP/1"), Detection::NeedMore);
    assert_eq!(detect(b"PROPFIND /d HTTP/1.1\r\n"), known(Protocol::Http1));
    assert_eq!(detect(b"PROPFIND /d HTTP/1.1\n"), known(Protocol::Http1));
    assert_eq!(detect(b"PROPFIND /d SMTP/1.1\r\n"), known(Protocol::Opaque));
    assert_eq!(detect(b"EHLO example.com\r\n"), known(Protocol::Opaque));
}

#[test]
fn tls_client_hello() {
    assert_eq!(
        detect(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0, 0]),
        known(Protocol::Tls)
    );
    assert_eq!(detect(&[0x16, 0x03]), Detection::NeedMore);
    assert_eq!(
        detect(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x02]),
        known(Protocol::Opaque)
    );
    assert_eq!(detect(&[0x16, 0x02]), known(Protocol::Opaque));
}

#[test]
fn everything_else_is_opaque() {
    assert_eq!(detect(b"\x00\x01binary"), known(Protocol::Opaque));
    assert_eq!(detect(b"SSH-2.0-OpenSSH\r\n"), known(Protocol::Opaque));
    assert_eq!(detect(b"hello world"), Detection::NeedMore);
    assert_eq!(detect(b"hello world\n"), known(Protocol::Opaque));
    assert_eq!(detect(&[b'A'; 100]), known(Protocol::Opaque));
    assert_eq!(detect(b""), Detection::NeedMore);
}
