//! The control plane's own metrics.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    streams: Family<MethodLabels, Gauge>,
    updates: Family<MethodLabels, Counter>,
    certify: Family<ResultLabels, Counter>,
    issuer_expiry: Gauge,
    registry: Arc<Registry>,
}

/// Keeps a stream counted as open until dropped.
pub struct OpenStream {
    gauge: Gauge,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let streams = Family::<MethodLabels, Gauge>::default();
        let updates = Family::<MethodLabels, Counter>::default();
        let certify = Family::<ResultLabels, Counter>::default();
        let issuer_expiry = Gauge::default();
        registry.register(
            "destination_streams",
            "Destination API streams currently open",
            streams.clone(),
        );
        registry.register(
            "destination_updates",
            "Destination API messages sent",
            updates.clone(),
        );
        registry.register(
            "identity_certify",
            "Certify requests, by result (ok, denied, invalid, error)",
            certify.clone(),
        );
        registry.register(
            "identity_issuer_expiration_timestamp_seconds",
            "When the current issuer certificate expires",
            issuer_expiry.clone(),
        );
        Self {
            streams,
            updates,
            certify,
            issuer_expiry,
            registry: Arc::new(registry),
        }
    }

    pub fn stream_opened(&self, method: &'static str) -> OpenStream {
        let gauge = self.streams.get_or_create(&MethodLabels { method }).clone();
        gauge.inc();
        OpenStream { gauge }
    }

    pub fn update_sent(&self, method: &'static str) {
        self.updates.get_or_create(&MethodLabels { method }).inc();
    }

    pub fn certify(&self, result: &'static str) {
        self.certify.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn set_issuer_expiry(&self, t: SystemTime) {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.issuer_expiry.set(secs as i64);
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
