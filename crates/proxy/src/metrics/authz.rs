//! Inbound authorization and rate-limit counters, named and labelled as
//! Linkerd's proxy names them (`inbound_http_authz_allow_total` and its
//! siblings), so policy dashboards and alerts carry over.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{Direction, TlsLabel, encode_tls};

/// The server, route and authorization a decision concerns. Every value is
/// bounded: local addresses, names from the policy, identities the mesh
/// certified.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthzLabels {
    pub target_addr: SocketAddr,
    pub server: Arc<str>,
    pub route: Option<Arc<str>>,
    pub authz: Option<Arc<str>>,
    pub tls: TlsLabel,
}

/// A name from a policy default (`default:deny`) is of kind `default`.
fn kind(name: &str, otherwise: &'static str) -> &'static str {
    if name.starts_with("default") {
        "default"
    } else {
        otherwise
    }
}

impl EncodeLabelSet for AuthzLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabel::encode(
            &("target_addr", self.target_addr.to_string()),
            encoder.encode_label(),
        )?;
        EncodeLabel::encode(
            &("srv_kind", kind(&self.server, "server")),
            encoder.encode_label(),
        )?;
        EncodeLabel::encode(&("srv_name", &*self.server), encoder.encode_label())?;
        if let Some(route) = &self.route {
            EncodeLabel::encode(
                &("route_kind", kind(route, "route")),
                encoder.encode_label(),
            )?;
            EncodeLabel::encode(&("route_name", &**route), encoder.encode_label())?;
        }
        if let Some(authz) = &self.authz {
            EncodeLabel::encode(
                &("authz_kind", kind(authz, "authorization")),
                encoder.encode_label(),
            )?;
            EncodeLabel::encode(&("authz_name", &**authz), encoder.encode_label())?;
        }
        encode_tls(Direction::inbound, &self.tls, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RateLimitLabels {
    pub target_addr: SocketAddr,
    pub server: Arc<str>,
    /// `total`, `per_client` or `override`.
    pub limit: &'static str,
    pub tls: TlsLabel,
}

impl EncodeLabelSet for RateLimitLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabel::encode(
            &("target_addr", self.target_addr.to_string()),
            encoder.encode_label(),
        )?;
        EncodeLabel::encode(
            &("srv_kind", kind(&self.server, "server")),
            encoder.encode_label(),
        )?;
        EncodeLabel::encode(&("srv_name", &*self.server), encoder.encode_label())?;
        EncodeLabel::encode(&("limit", self.limit), encoder.encode_label())?;
        encode_tls(Direction::inbound, &self.tls, encoder)
    }
}

#[derive(Clone, Debug, Default)]
pub struct AuthzMetrics {
    pub http_allow: Family<AuthzLabels, Counter>,
    pub http_deny: Family<AuthzLabels, Counter>,
    pub http_route_not_found: Family<AuthzLabels, Counter>,
    pub tcp_allow: Family<AuthzLabels, Counter>,
    pub tcp_deny: Family<AuthzLabels, Counter>,
    pub tcp_terminate: Family<AuthzLabels, Counter>,
    pub rate_limited: Family<RateLimitLabels, Counter>,
}

impl AuthzMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "inbound_http_authz_allow",
            "Inbound HTTP requests an authorization admitted",
            self.http_allow.clone(),
        );
        registry.register(
            "inbound_http_authz_deny",
            "Inbound HTTP requests refused (403) because no authorization of their route admitted the client",
            self.http_deny.clone(),
        );
        registry.register(
            "inbound_http_route_not_found",
            "Inbound HTTP requests refused (404) because no route of the server matched",
            self.http_route_not_found.clone(),
        );
        registry.register(
            "inbound_tcp_authz_allow",
            "Inbound non-HTTP connections an authorization admitted",
            self.tcp_allow.clone(),
        );
        registry.register(
            "inbound_tcp_authz_deny",
            "Inbound non-HTTP connections closed because no authorization admitted the client",
            self.tcp_deny.clone(),
        );
        registry.register(
            "inbound_tcp_authz_terminate",
            "Inbound non-HTTP connections closed because a policy change no longer admitted the client",
            self.tcp_terminate.clone(),
        );
        registry.register(
            "inbound_http_local_ratelimit_rate_limited",
            "Inbound HTTP requests refused (429) by the server's rate limit",
            self.rate_limited.clone(),
        );
    }
}
