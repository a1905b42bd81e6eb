//! Recent latency percentiles of a destination, for hedging "after p95":
//! a log-bucketed histogram over the last 10–20 s, in two generations that
//! swap every 10 s, so old latencies are forgotten without a sample list.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bucket `i` holds latencies up to `FIRST × √2^i`: 100 µs to ~28 min in
/// 48 buckets, each 41 % wider than the last.
const BUCKETS: usize = 48;
const FIRST_NS: f64 = 100_000.0;
const GENERATION: Duration = Duration::from_secs(10);
/// Fewer samples than this say nothing about a tail.
const MIN_SAMPLES: u64 = 20;

#[derive(Debug)]
pub struct LatencyWindow {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    started: Instant,
    current: [u64; BUCKETS],
    previous: [u64; BUCKETS],
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                started: Instant::now(),
                current: [0; BUCKETS],
                previous: [0; BUCKETS],
            }),
        }
    }
}

fn bucket(latency: Duration) -> usize {
    let ns = latency.as_nanos() as f64;
    if ns <= FIRST_NS {
        return 0;
    }
    let i = (2.0 * (ns / FIRST_NS).log2()).ceil() as usize;
    i.min(BUCKETS - 1)
}

fn upper_bound(i: usize) -> Duration {
    Duration::from_nanos((FIRST_NS * 2f64.powf(i as f64 / 2.0)) as u64)
}

impl LatencyWindow {
    fn lock(&self, now: Instant) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let age = now.saturating_duration_since(s.started);
        if age >= GENERATION {
            s.previous = if age >= 2 * GENERATION {
                [0; BUCKETS]
            } else {
                s.current
            };
            s.current = [0; BUCKETS];
            s.started = now;
        }
        s
    }

    pub fn record(&self, latency: Duration, now: Instant) {
        self.lock(now).current[bucket(latency)] += 1;
    }

    /// The latency `q` (0–1) of recent responses stay under, within a
    /// bucket's width (41 %); `None` with too few of them.
    pub fn percentile(&self, q: f64, now: Instant) -> Option<Duration> {
        let s = self.lock(now);
        let count = |i: usize| s.current[i] + s.previous[i];
        let total: u64 = (0..BUCKETS).map(count).sum();
        if total < MIN_SAMPLES {
            return None;
        }
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for i in 0..BUCKETS {
            seen += count(i);
            if seen >= rank {
                return Some(upper_bound(i));
            }
        }
        Some(upper_bound(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_within_a_bucket_and_forgotten_after_two_generations() {
        let t = Instant::now();
        let w = LatencyWindow::default();
        assert_eq!(w.percentile(0.9, t), None);
        for i in 0..100u64 {
            let ms = if i < 90 { 1 } else { 50 };
            w.record(Duration::from_millis(ms), t);
        }
        let p50 = w.percentile(0.5, t).expect("enough");
        assert!(
            p50 >= Duration::from_millis(1) && p50 < Duration::from_micros(1500),
            "{p50:?}"
        );
        let p95 = w.percentile(0.95, t).expect("enough");
        assert!(
            p95 >= Duration::from_millis(50) && p95 < Duration::from_millis(71),
            "{p95:?}"
        );
        // Still known one generation on, forgotten two on.
        assert!(w.percentile(0.5, t + GENERATION).is_some());
        assert_eq!(w.percentile(0.5, t + GENERATION * 3), None);
    }
}
