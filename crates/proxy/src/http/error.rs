//! Failures the proxy itself answers for, and the responses that say so.
//! Every error becomes a response; nothing on the request path panics.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::body::ProxyBody;

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
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoAuthority | Self::BadAuthority(_) => StatusCode::BAD_REQUEST,
            Self::NoEndpoints(_) | Self::Route(_) | Self::Connect(_) | Self::NoInboundTarget => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Loop(_) => StatusCode::LOOP_DETECTED,
        }
    }

    /// A short, stable name for the `error` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoAuthority | Self::BadAuthority(_) => "bad_request",
            Self::NoEndpoints(_) => "no_endpoints",
            Self::Route(_) => "resolve",
            Self::Connect(_) => "connect",
            Self::Upstream { .. } => "upstream",
            Self::NoInboundTarget => "no_target",
            Self::Loop(_) => "loop",
        }
    }

    /// gRPC clients read failures from `grpc-status`, not the HTTP status:
    /// they get a trailers-only response with UNAVAILABLE (14), or
    /// INTERNAL (13) when the request itself was unusable.
    pub fn grpc_status(&self) -> u32 {
        match self.status() {
            StatusCode::BAD_REQUEST => 13,
            _ => 14,
        }
    }

    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        let message = self.to_string();
        let header = HeaderValue::from_str(&message)
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        let mut rsp = if grpc {
            let mut rsp = Response::new(ProxyBody::Full(Full::new(Bytes::new())));
            let h = rsp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            h.insert("grpc-message", header.clone());
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
        rsp
    }
}
