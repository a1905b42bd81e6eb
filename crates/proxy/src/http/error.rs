//! Failures the proxy itself answers for, and the responses that say so.
//! Every error becomes a response; nothing on the request path panics.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::body::ProxyBody;

/// What gRPC's `grpc-message` must percent-encode: everything outside
/// printable ASCII (non-ASCII is always encoded), and `%` itself.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// A `grpc-message` value for `message`, percent-encoded as gRPC requires.
pub(super) fn grpc_message(message: &str) -> HeaderValue {
    HeaderValue::from_str(&utf8_percent_encode(message, GRPC_MESSAGE).to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("proxy%20error"))
}

/// Who reads an error response: the local application (outbound) may see
/// everything, including upstream addresses; a remote client (inbound) is
/// told what failed but nothing about the inside of this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    Local,
    Remote,
}

/// Names the proxy's own errors on responses, as Linkerd's proxy does, so
/// a client (or an operator with curl) can tell the proxy's failures from
/// the application's.
pub const PROXY_ERROR_HEADER: &str = "l5d-proxy-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no authority (no Host header, absolute URI or :authority)")]
    NoAuthority,
    #[error(transparent)]
    BadAuthority(#[from] weft_detect::AuthorityError),
    #[error("no endpoints available for {0}")]
    NoEndpoints(String),
    #[error(transparent)]
    Route(#[from] crate::route::RouteError),
    #[error("{0}")]
    Connect(String),
    #[error("upstream {addr} failed: {reason}")]
    Upstream {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error(
        "no inbound target: the original destination is unknown and WEFT_PROXY_INBOUND_FORWARD is not set"
    )]
    NoInboundTarget,
    #[error("{0} is this proxy's own listener: the request would loop")]
    Loop(std::net::SocketAddr),
    #[error("more than one Host header")]
    DuplicateHost,
    #[error(transparent)]
    BadPath(#[from] weft_detect::PathError),
    #[error(
        "the request declares a body of {0} bytes, beyond the 1 TiB a proxied request may have"
    )]
    TooLarge(u64),

    #[error("the request body is malformed or was cut short: {0}")]
    ClientBody(String),
    #[error("{addr} sent no response headers within {timeout:?}")]
    ResponseTimeout {
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("the request timed out after {}", humantime::format_duration(*.0))]
    Timeout(std::time::Duration),
    #[error("no route of {0} matches the request")]
    NoRoute(String),
    #[error(transparent)]
    Denied(#[from] weft_authz::Denied),
    #[error(
        "{addr} is at capacity: {in_flight} requests in flight and none finished within {waited:?}"
    )]
    Saturated {
        addr: std::net::SocketAddr,
        in_flight: usize,
        waited: std::time::Duration,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoAuthority
            | Self::BadAuthority(_)
            | Self::DuplicateHost
            | Self::BadPath(_)
            | Self::TooLarge(_)
            | Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            Self::NoEndpoints(_)
            | Self::Route(_)
            | Self::Connect(_)
            | Self::NoInboundTarget
            | Self::Saturated { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::ResponseTimeout { .. } | Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Loop(_) => StatusCode::LOOP_DETECTED,
            Self::Denied(weft_authz::Denied::NoRoute { .. }) => StatusCode::NOT_FOUND,
            Self::Denied(weft_authz::Denied::Unauthorized { .. }) => StatusCode::FORBIDDEN,
            Self::Denied(weft_authz::Denied::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A short, stable name for the `error` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoAuthority
            | Self::BadAuthority(_)
            | Self::DuplicateHost
            | Self::BadPath(_)
            | Self::TooLarge(_) => "bad_request",
            Self::ClientBody(_) => "client_body",
            Self::ResponseTimeout { .. } => "response_timeout",
            Self::Timeout(_) => "timeout",
            Self::NoRoute(_) => "no_route",
            Self::Saturated { .. } => "saturated",
            Self::NoEndpoints(_) => "no_endpoints",
            Self::Route(
                crate::route::RouteError::ControlRefused { .. }
                | crate::route::RouteError::TooManyNames { .. },
            ) => "discovery_refused",
            Self::Route(_) => "resolve",
            Self::Connect(_) => "connect",
            Self::Upstream { .. } => "upstream",
            Self::NoInboundTarget => "no_target",
            Self::Loop(_) => "loop",
            Self::Denied(weft_authz::Denied::NoRoute { .. }) => "route_not_found",
            Self::Denied(weft_authz::Denied::Unauthorized { .. }) => "unauthorized",
            Self::Denied(weft_authz::Denied::RateLimited { .. }) => "rate_limited",
        }
    }

    /// gRPC clients read failures from `grpc-status`, not the HTTP status:
    /// they get a trailers-only response with UNAVAILABLE (14), or
    /// INTERNAL (13) when the request itself was unusable.
    pub fn grpc_status(&self) -> u32 {
        match self {
            Self::ResponseTimeout { .. } | Self::Timeout(_) => 4, // DEADLINE_EXCEEDED
            Self::NoRoute(_) => 12,                               // UNIMPLEMENTED
            Self::Denied(weft_authz::Denied::NoRoute { .. }) => 5, // NOT_FOUND
            Self::Denied(weft_authz::Denied::Unauthorized { .. }) => 7, // PERMISSION_DENIED
            Self::Denied(weft_authz::Denied::RateLimited { .. }) => 8, // RESOURCE_EXHAUSTED
            _ if self.status() == StatusCode::BAD_REQUEST => 13,
            _ => 14,
        }
    }

    /// What a remote client is told: the kind of failure, never an address
    /// or another detail of the host's inside.
    fn public_message(&self) -> String {
        match self {
            Self::Connect(_) => "cannot connect to the application".into(),
            Self::Upstream { .. } => "the application's connection failed".into(),
            Self::ResponseTimeout { timeout, .. } => {
                format!("the application sent no response headers within {timeout:?}")
            }
            Self::Saturated { .. } => "the application is at capacity".into(),
            Self::Loop(_) => "the request would loop".into(),
            Self::NoInboundTarget => "no application to forward to".into(),
            Self::ClientBody(_) => "the request body is malformed or was cut short".into(),
            other => other.to_string(),
        }
    }

    pub fn to_response(&self, grpc: bool, audience: Audience) -> Response<ProxyBody> {
        let message = match audience {
            Audience::Local => self.to_string(),
            Audience::Remote => self.public_message(),
        };
        let header = HeaderValue::from_str(&message)
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        let mut rsp = if grpc {
            let mut rsp = Response::new(ProxyBody::Full(Full::new(Bytes::new())));
            let h = rsp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            h.insert("grpc-message", grpc_message(&message));
            rsp
        } else {
            let mut rsp = Response::new(ProxyBody::Full(Full::new(Bytes::from(format!(
                "{message}\n"
            )))));
            *rsp.status_mut() = self.status();
            rsp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            rsp
        };
        rsp.headers_mut().insert(PROXY_ERROR_HEADER, header);
        if let Self::Denied(weft_authz::Denied::RateLimited { retry_after, .. }) = self {
            // Whole seconds, rounded up: never sooner than a token is free.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            rsp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        // gRPC keeps printable ASCII (space included) and encodes the rest,
        // and `%` itself, as UTF-8 bytes.
        assert_eq!(
            grpc_message("no endpoints: 50% down"),
            "no endpoints: 50%25 down"
        );
        assert_eq!(grpc_message("caf\u{e9}\n"), "caf%C3%A9%0A");
    }

    #[test]
    fn remote_clients_learn_no_addresses() {
        let e = ProxyError::Upstream {
            addr: "10.1.2.3:8080".parse().expect("addr"),
            reason: "connection reset".into(),
        };
        let rsp = e.to_response(false, Audience::Remote);
        let header = rsp.headers()[PROXY_ERROR_HEADER].to_str().unwrap_or("");
        assert!(!header.contains("10.1.2.3"), "{header}");
        let rsp = e.to_response(false, Audience::Local);
        let header = rsp.headers()[PROXY_ERROR_HEADER].to_str().unwrap_or("");
        assert!(header.contains("10.1.2.3:8080"), "{header}");
    }
}
