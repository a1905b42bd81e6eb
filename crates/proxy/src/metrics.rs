//! Golden metrics, named and labelled as Linkerd's proxy names them so
//! existing dashboards and queries work unchanged.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub mod authz;
pub mod breaker;
mod process;

/// Response latency buckets in milliseconds, as Linkerd exports them.
const LATENCY_BUCKETS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue, serde::Serialize)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Peer {
    /// The side that connected to the proxy.
    src,
    /// The side the proxy connected to.
    dst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Classification {
    success,
    failure,
}

/// Whether a connection was mutual TLS, and who the peer proved to be.
/// Encoded as Linkerd does: `tls="true"` with `client_id` (inbound) or
/// `server_id` (outbound), else `tls="no_identity"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TlsLabel {
    Plain,
    Mutual { peer_id: Arc<str> },
}

fn encode_tls(
    direction: Direction,
    tls: &TlsLabel,
    encoder: &mut LabelSetEncoder,
) -> Result<(), std::fmt::Error> {
    match tls {
        TlsLabel::Plain => EncodeLabel::encode(&("tls", "no_identity"), encoder.encode_label()),
        TlsLabel::Mutual { peer_id } => {
            EncodeLabel::encode(&("tls", "true"), encoder.encode_label())?;
            let key = match direction {
                Direction::inbound => "client_id",
                Direction::outbound => "server_id",
            };
            EncodeLabel::encode(&(key, &**peer_id), encoder.encode_label())
        }
    }
}

/// `direction`, `authority` and `route`, first in every route-level label
/// set.
fn encode_route(
    direction: Direction,
    dst: &Dst,
    encoder: &mut LabelSetEncoder,
) -> Result<(), std::fmt::Error> {
    EncodeLabel::encode(&("direction", direction), encoder.encode_label())?;
    EncodeLabel::encode(&("authority", &*dst.authority), encoder.encode_label())?;
    EncodeLabel::encode(&("route", &*dst.route), encoder.encode_label())?;
    if let Some(w) = &dst.workload {
        EncodeLabel::encode(&("workload", &**w), encoder.encode_label())?;
    }
    Ok(())
}

/// Where a request went, as route-level series say it: the authority the
/// client named and the route it took (the policy's route name, a gRPC
/// call's `/package.Service/Method`, else `default`), both bounded.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dst {
    pub authority: Arc<str>,
    pub route: Arc<str>,
    /// Per-node mode: the local workload the request is for or from.
    pub workload: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteLabels {
    pub direction: Direction,
    pub dst: Dst,
    /// Known for inbound requests (the connection's); outbound requests are
    /// counted before an endpoint, and so a peer, is chosen.
    pub tls: Option<TlsLabel>,
}

impl EncodeLabelSet for RouteLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_route(self.direction, &self.dst, encoder)?;
        if let Some(tls) = &self.tls {
            encode_tls(self.direction, tls, encoder)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub dst: Dst,
    pub status_code: u16,
    pub tls: TlsLabel,
}

impl EncodeLabelSet for LatencyLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_route(self.direction, &self.dst, encoder)?;
        EncodeLabel::encode(&("status_code", self.status_code), encoder.encode_label())?;
        encode_tls(self.direction, &self.tls, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResponseLabels {
    pub direction: Direction,
    pub dst: Dst,
    /// `None` when there was no response: the client cancelled first.
    pub status_code: Option<u16>,
    pub classification: Classification,
    /// Only gRPC responses carry this label, as with Linkerd.
    pub grpc_status_code: Option<u32>,
    /// Set when the proxy, not the application, produced the failure.
    pub error: Option<&'static str>,
    pub tls: TlsLabel,
}

impl EncodeLabelSet for ResponseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_route(self.direction, &self.dst, encoder)?;
        if let Some(code) = self.status_code {
            EncodeLabel::encode(&("status_code", code), encoder.encode_label())?;
        }
        EncodeLabel::encode(
            &("classification", self.classification),
            encoder.encode_label(),
        )?;
        if let Some(code) = self.grpc_status_code {
            EncodeLabel::encode(&("grpc_status_code", code), encoder.encode_label())?;
        }
        if let Some(error) = self.error {
            EncodeLabel::encode(&("error", error), encoder.encode_label())?;
        }
        encode_tls(self.direction, &self.tls, encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// The authority label of every route-level series, bounded: on inbound
/// only authorities this proxy serves (its identity's name, its registered
/// service, `WEFT_PROXY_INBOUND_AUTHORITIES`) get series of their own when
/// any is configured; and in either direction at most `max` distinct
/// authorities do. Everything else is counted as `authority="other"`, so a
/// client choosing `Host` headers cannot grow the metrics (or a scrape)
/// without bound.
///
/// It also bounds the `route` label of gRPC calls (their method) per
/// authority label *and in total*: the two bounds must not multiply (1,000
/// authorities × 100 methods once made a scrape of 3 million lines).
#[derive(Debug)]
pub struct AuthorityLabels {
    direction: Direction,
    allowed: Vec<crate::config::AuthorityPattern>,
    max: usize,
    admitted: std::sync::RwLock<std::collections::HashMap<weft_detect::Authority, Arc<str>>>,
    other: Arc<str>,
    overflow: Counter,
    methods: std::sync::RwLock<Methods>,
}

/// gRPC method labels admitted, by authority label.
#[derive(Debug, Default)]
struct Methods {
    by_authority: std::collections::HashMap<Arc<str>, std::collections::HashSet<Arc<str>>>,
    total: usize,
}

/// Distinct gRPC methods with series of their own, per authority label.
pub const MAX_METHODS: usize = 100;
/// Distinct (authority, gRPC method) label pairs per direction.
pub const MAX_METHOD_SERIES: usize = 1_000;

/// `/package.Service/Method`: two non-empty segments of identifier
/// characters, at most 256 bytes.
fn is_grpc_method(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    let ident = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    path.len() <= 256 && ident(service) && ident(method)
}

/// The label of every authority folded together.
pub const OTHER_AUTHORITY: &str = "other";

impl AuthorityLabels {
    pub fn new(
        direction: Direction,
        allowed: Vec<crate::config::AuthorityPattern>,
        max: usize,
        overflow: &Family<DirectionLabels, Counter>,
    ) -> Self {
        Self {
            direction,
            allowed,
            max,
            admitted: Default::default(),
            other: OTHER_AUTHORITY.into(),
            overflow: overflow
                .get_or_create(&DirectionLabels { direction })
                .clone(),
            methods: Default::default(),
        }
    }

    /// The `route` label of a gRPC call to `authority` (a label from
    /// here or a target's): its `/package.Service/Method` while both
    /// bounds allow a new one; `other` beyond them, or for a path that is
    /// no gRPC method (a client cannot mint series).
    pub fn grpc_method(&self, authority: &Arc<str>, path: &str) -> Arc<str> {
        if !is_grpc_method(path) {
            return self.other.clone();
        }
        if let Some(m) = self
            .methods
            .read()
            .ok()
            .and_then(|m| m.by_authority.get(authority)?.get(path).cloned())
        {
            return m;
        }
        let Ok(mut methods) = self.methods.write() else {
            return self.other.clone();
        };
        let Methods {
            by_authority,
            total,
        } = &mut *methods;
        if *total >= MAX_METHOD_SERIES && !by_authority.contains_key(authority) {
            return self.other.clone();
        }
        let seen = by_authority.entry(authority.clone()).or_default();
        if let Some(m) = seen.get(path) {
            return m.clone();
        }
        if seen.len() >= MAX_METHODS || *total >= MAX_METHOD_SERIES {
            return self.other.clone();
        }
        let m: Arc<str> = path.into();
        seen.insert(m.clone());
        *total += 1;
        m
    }

    pub fn label(&self, authority: &weft_detect::Authority) -> Arc<str> {
        if let Some(l) = self
            .admitted
            .read()
            .ok()
            .and_then(|m| m.get(authority).cloned())
        {
            return l;
        }
        let allowed = self.allowed.is_empty() || self.allowed.iter().any(|p| p.matches(authority));
        if allowed && let Ok(mut m) = self.admitted.write() {
            if let Some(l) = m.get(authority) {
                return l.clone();
            }
            if m.len() < self.max {
                let l: Arc<str> = authority.to_string().into();
                m.insert(authority.clone(), l.clone());
                return l;
            }
        }
        tracing::trace!(direction = ?self.direction, %authority, "authority folded into \"other\"");
        self.other.clone()
    }

    /// Counts a request whose label is `other`.
    pub fn count(&self, label: &Arc<str>) {
        if Arc::ptr_eq(label, &self.other) {
            self.overflow.inc();
        }
    }
}

/// A connection's series: Linkerd's `tcp_*` labels, with the TLS the
/// connection turned out to have (`client_id` for an accepted mutual TLS
/// one, `server_id` for a dialled one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub direction: Direction,
    pub peer: Peer,
    pub tls: TlsLabel,
    /// Per-node mode: the local workload the connection is from or for.
    pub workload: Option<Arc<str>>,
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabel::encode(&("direction", self.direction), encoder.encode_label())?;
        EncodeLabel::encode(&("peer", self.peer), encoder.encode_label())?;
        if let Some(w) = &self.workload {
            EncodeLabel::encode(&("workload", &**w), encoder.encode_label())?;
        }
        // `client_id` names who connected to us; `server_id` whom we dialled.
        let side = match self.peer {
            Peer::src => Direction::inbound,
            Peer::dst => Direction::outbound,
        };
        encode_tls(side, &self.tls, encoder)
    }
}

/// A direction and the authority a client named.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    pub direction: Direction,
    pub authority: String,
}

/// Every metric the proxy exports. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub request_total: Family<RouteLabels, Counter>,
    pub response_total: Family<ResponseLabels, Counter>,
    pub response_latency_ms: Family<LatencyLabels, Histogram>,
    pub tcp: TcpMetrics,
    pub identity: IdentityMetrics,
    /// Connections closed at accept because a listener was at its cap.
    pub accept_refused: Family<DirectionLabels, Counter>,
    /// Requests whose authority was counted as `other`.
    pub label_overflow: Family<DirectionLabels, Counter>,
    /// Tries after the first, by logical authority.
    pub retries: Family<RetryLabels, Counter>,
    /// Second tries sent because the first was slow.
    pub hedges: Family<RetryLabels, Counter>,
    /// Inbound policy decisions.
    pub authz: authz::AuthzMetrics,
    /// Span export.
    pub trace: crate::trace::TraceMetrics,
    /// Where the breaker state of endpoints is read from at scrape time.
    pub breakers: breaker::BreakerSources,
    /// Live per-request events; not exported, streamed from `/tap`.
    pub tap: crate::tap::Tap,
    registry: Arc<Registry>,
}

/// Certificate state, named as Linkerd's proxy names it.
#[derive(Clone, Debug, Default)]
pub struct IdentityMetrics {
    expiration: Gauge,
    refreshes: Gauge,
}

impl IdentityMetrics {
    /// A new certificate valid until `not_after` is in use.
    pub fn refreshed(&self, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.expiration.set(secs as i64);
        self.refreshes.inc();
    }
}

#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    pub open_total: Family<TcpLabels, Counter>,
    pub close_total: Family<TcpLabels, Counter>,
    pub open_connections: Family<TcpLabels, Gauge>,
    pub read_bytes_total: Family<TcpLabels, Counter>,
    pub write_bytes_total: Family<TcpLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let request_total = Family::<RouteLabels, Counter>::default();
        let response_total = Family::<ResponseLabels, Counter>::default();
        let response_latency_ms = Family::<LatencyLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        let tcp = TcpMetrics::default();
        registry.register(
            "request",
            "Requests the proxy received, by direction and authority",
            request_total.clone(),
        );
        registry.register(
            "response",
            "Responses completed (at end of stream), classified by HTTP status and gRPC status",
            response_total.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from receiving a request to the response headers, in milliseconds",
            response_latency_ms.clone(),
        );
        registry.register("tcp_open", "Connections opened", tcp.open_total.clone());
        registry.register("tcp_close", "Connections closed", tcp.close_total.clone());
        registry.register(
            "tcp_open_connections",
            "Connections currently open",
            tcp.open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from peers",
            tcp.read_bytes_total.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to peers",
            tcp.write_bytes_total.clone(),
        );
        let identity = IdentityMetrics::default();
        registry.register(
            "identity_cert_expiration_timestamp_seconds",
            "When this proxy's current certificate expires (0: not certified yet)",
            identity.expiration.clone(),
        );
        // A gauge only ever incremented: Linkerd exports this name without
        // the _total suffix a counter would get.
        registry.register(
            "identity_cert_refresh_count",
            "Certificates this proxy has obtained",
            identity.refreshes.clone(),
        );
        let accept_refused = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tcp_accept_refused",
            "Connections closed at accept because the listener was at WEFT_PROXY_MAX_CONNECTIONS",
            accept_refused.clone(),
        );
        let label_overflow = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "metrics_authority_overflow",
            "Requests counted under authority=\"other\": not an authority this proxy serves, or beyond WEFT_PROXY_METRICS_MAX_AUTHORITIES",
            label_overflow.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "retry_requests",
            "Requests sent again after a failed try (the authority is the one the client named)",
            retries.clone(),
        );
        let hedges = Family::<RetryLabels, Counter>::default();
        registry.register(
            "hedge_requests",
            "Second tries sent because the first had not answered in time",
            hedges.clone(),
        );
        let authz = authz::AuthzMetrics::default();
        authz.register(&mut registry);
        let trace = crate::trace::TraceMetrics::default();
        trace.register(&mut registry);
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        let breakers = breaker::BreakerSources::default();
        registry.register_collector(Box::new(breaker::BreakerCollector(breakers.clone())));
        Self {
            authz,
            trace,
            retries,
            hedges,
            breakers,
            accept_refused,
            label_overflow,
            request_total,
            response_total,
            response_latency_ms,
            tcp,
            identity,
            tap: crate::tap::Tap::new(),
            registry: Arc::new(registry),
        }
    }

    /// Counts one retry of a request to `authority`.
    pub fn retry(&self, direction: Direction, authority: &str) {
        self.retries
            .get_or_create(&RetryLabels {
                direction,
                authority: authority.to_string(),
            })
            .inc();
    }

    /// Counts one hedge of a request to `authority`.
    pub fn hedge(&self, direction: Direction, authority: &str) {
        self.hedges
            .get_or_create(&RetryLabels {
                direction,
                authority: authority.to_string(),
            })
            .inc();
    }

    /// The exposition text for `/metrics`, in the Prometheus text format
    /// (0.0.4) that Linkerd's proxy serves and every scraper reads.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut open_metrics = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry)?;
        Ok(to_prometheus_text(&open_metrics))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics names a counter family without its `_total` suffix and ends
/// with `# EOF`; the Prometheus text format names the family as its samples
/// are named and has no terminator. Everything else is the same.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_eof_is_dropped() {
        let m = Metrics::new();
        m.request_total
            .get_or_create(&RouteLabels {
                direction: Direction::outbound,
                dst: Dst {
                    authority: "a:1".into(),
                    route: "default".into(),
                    workload: None,
                },
                tls: None,
            })
            .inc();
        let text = m.encode().expect("encodes");
        assert!(text.contains("# TYPE request_total counter\n"), "{text}");
        assert!(text.contains("# HELP request_total Requests"), "{text}");
        assert!(
            text.contains(
                "request_total{direction=\"outbound\",authority=\"a:1\",route=\"default\"} 1\n"
            ),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
