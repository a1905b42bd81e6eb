//! Breaker state per endpoint, read from the routers at scrape time: how
//! often each endpoint was ejected, and whether it is out now. Only
//! endpoints ejected at least once have series.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Direction;

/// One endpoint's breaker, as a router reports it.
pub struct EndpointHealth {
    pub addr: SocketAddr,
    pub ejections: u64,
    pub open: bool,
}

type Source = Box<dyn Fn() -> Vec<EndpointHealth> + Send + Sync>;

/// Filled once the routers exist (after the registry).
#[derive(Clone, Default)]
pub struct BreakerSources(Arc<Mutex<Vec<(Direction, Source)>>>);

impl std::fmt::Debug for BreakerSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BreakerSources(..)")
    }
}

impl BreakerSources {
    pub fn add(&self, direction: Direction, source: Source) {
        if let Ok(mut s) = self.0.lock() {
            s.push((direction, source));
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    direction: Direction,
    endpoint: String,
}

#[derive(Debug)]
pub(super) struct BreakerCollector(pub(super) BreakerSources);

impl Collector for BreakerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(sources) = self.0.0.lock() else {
            return Ok(());
        };
        let mut rows = Vec::new();
        for (direction, source) in sources.iter() {
            for h in source() {
                if h.ejections > 0 {
                    let labels = EndpointLabels {
                        direction: *direction,
                        endpoint: h.addr.to_string(),
                    };
                    rows.push((labels, h.ejections, h.open));
                }
            }
        }
        drop(sources);
        let mut m = encoder.encode_descriptor(
            "endpoint_breaker_ejections",
            "Times the breaker took the endpoint out of balancing",
            None,
            MetricType::Counter,
        )?;
        for (labels, ejections, _) in &rows {
            ConstCounter::new(*ejections).encode(m.encode_family(labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "endpoint_breaker_open",
            "1 while the breaker has the endpoint out of balancing (or probing)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, _, open) in &rows {
            ConstGauge::new(i64::from(*open)).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }
}
