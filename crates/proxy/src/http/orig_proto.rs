//! HTTP/1 carried over HTTP/2 between meshed proxies, as Linkerd does it:
//! the outbound proxy sends an HTTP/1 request on its one multiplexed
//! HTTP/2 connection to the peer proxy, saying the original version in
//! `l5d-orig-proto`; the inbound proxy takes the header off and sends the
//! request to its application as HTTP/1.1, and says the response's version
//! in the same header on the way back. Neither application sees a
//! difference; between the proxies, a hundred client connections become
//! one.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};

/// A `HeaderName` rather than a string: looked up on every inbound HTTP/2
/// request, it is then neither parsed nor lower-cased each time.
pub(super) const HEADER: HeaderName = HeaderName::from_static("l5d-orig-proto");

/// The HTTP/2 form of an HTTP/1 request that `prepare_uri` has put in
/// origin form with a `Host`: `http://{Host}{path}`. `None` when the Host
/// is no authority (the request then goes as HTTP/1).
pub(super) fn h2_uri<B>(req: &Request<B>) -> Option<Uri> {
    let host = req.headers().get(header::HOST)?.as_bytes();
    let authority = http::uri::Authority::try_from(host).ok()?;
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .ok()
}

/// Rewrites an HTTP/1 request to go over HTTP/2: `:authority` says what
/// `Host` said, and the header says the original version (hop-by-hop
/// headers, `Transfer-Encoding` among them, are already gone).
pub(super) fn upgrade<B>(req: &mut Request<B>, uri: Uri) {
    let orig = match req.version() {
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    req.headers_mut().remove(header::HOST);
    req.headers_mut()
        .insert(HEADER, HeaderValue::from_static(orig));
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
}

/// The response to an upgraded request, as the HTTP/1 client expects it.
pub(super) fn restore_response<B>(rsp: &mut Response<B>) {
    let version = match rsp.headers_mut().remove(&HEADER) {
        Some(v) if v.as_bytes().starts_with(b"HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    *rsp.version_mut() = version;
}

/// Inbound: whether an HTTP/2 request is an upgraded HTTP/1 one, taking
/// the header off. The value may go on (`HTTP/1.1; absolute-form`); an
/// unknown version is left alone and the request goes as HTTP/2.
pub(super) fn downgrade(headers: &mut HeaderMap) -> bool {
    let Some(v) = headers.get(&HEADER) else {
        return false;
    };
    let known = v.as_bytes().starts_with(b"HTTP/1.1") || v.as_bytes().starts_with(b"HTTP/1.0");
    if known {
        headers.remove(&HEADER);
    } else {
        tracing::debug!(value = ?v, "unknown {HEADER} version; forwarding as HTTP/2");
    }
    known
}

/// Inbound: tells the upgrading proxy which version the application
/// answered in.
pub(super) fn mark_response<B>(rsp: &mut Response<B>) {
    let v = match rsp.version() {
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    rsp.headers_mut()
        .insert(HEADER, HeaderValue::from_static(v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_then_downgrade_restores_the_request() {
        let mut req = Request::builder()
            .uri("/v1/items?x=1")
            .header(header::HOST, "api.demo:8080")
            .header("x-app", "1")
            .body(())
            .unwrap_or_default();
        let uri = h2_uri(&req).map(|u| u.to_string());
        assert_eq!(uri.as_deref(), Some("http://api.demo:8080/v1/items?x=1"));
        let uri = h2_uri(&req).unwrap_or_default();
        upgrade(&mut req, uri);
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers()[HEADER], "HTTP/1.1");

        assert!(downgrade(req.headers_mut()));
        assert!(req.headers().get(HEADER).is_none());
        assert_eq!(req.headers()["x-app"], "1");
    }

    #[test]
    fn a_host_that_is_no_authority_is_not_upgraded() {
        let req = Request::builder()
            .uri("/")
            .header(header::HOST, "a b")
            .body(())
            .unwrap_or_default();
        assert!(h2_uri(&req).is_none());
    }

    #[test]
    fn linkerds_absolute_form_marker_is_understood_and_unknown_versions_are_not() {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_static("HTTP/1.1; absolute-form"));
        assert!(downgrade(&mut h));
        assert!(h.is_empty());
        h.insert(HEADER, HeaderValue::from_static("HTTP/3"));
        assert!(!downgrade(&mut h));
    }

    #[test]
    fn the_response_version_makes_the_round_trip() {
        let mut rsp = Response::new(());
        *rsp.version_mut() = Version::HTTP_10;
        mark_response(&mut rsp);
        *rsp.version_mut() = Version::HTTP_2;
        restore_response(&mut rsp);
        assert_eq!(rsp.version(), Version::HTTP_10);
        assert!(rsp.headers().get(HEADER).is_none());
    }
}
