//! `process_*` metrics read from procfs at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub(super) struct ProcessCollector {
    start_time_seconds: f64,
}

impl ProcessCollector {
    pub(super) fn new() -> Self {
        let start_time_seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        Self { start_time_seconds }
    }
}

/// What procfs says about this process; any field it could not read is
/// left out of the scrape rather than reported as zero.
#[derive(Default)]
struct Sample {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

fn sample() -> Sample {
    let mut s = Sample::default();
    // Clock ticks per second are 100 on every Linux ABI we run on; reading
    // sysconf would need libc.
    const TICKS: f64 = 100.0;
    const PAGE: i64 = 4096;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may
        // contain spaces.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime = f.get(11).and_then(|v| v.parse::<f64>().ok());
            let stime = f.get(12).and_then(|v| v.parse::<f64>().ok());
            if let (Some(u), Some(st)) = (utime, stime) {
                s.cpu_seconds = Some((u + st) / TICKS);
            }
            s.virtual_bytes = f.get(20).and_then(|v| v.parse().ok());
            s.resident_bytes = f
                .get(21)
                .and_then(|v| v.parse::<i64>().ok())
                .map(|p| p * PAGE);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        s.open_fds = Some(dir.count() as i64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        s.max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok());
    }
    s
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = sample();
        if let Some(cpu) = s.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        let m = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.start_time_seconds).encode(m)?;
        Ok(())
    }
}
