use std::sync::Arc;

use crate::load::Load;

/// Costs closer than this (relative) are a tie, and a tie goes to the first
/// draw. Latency estimates of equally fast endpoints differ by noise; were
/// the marginally cheaper one always preferred, weights would stop mattering.
/// Because the first draw is itself weighted, ties split by weight exactly.
const TIE_TOLERANCE: f64 = 0.1;

/// An immutable snapshot of the endpoints one destination balances over.
/// Changing the endpoints means building a new `Set`; requests in flight
/// keep the endpoint they picked, so nothing is dropped by a change.
#[derive(Debug)]
pub struct Set<E> {
    entries: Vec<Entry<E>>,
    /// Running sum of weights, for weighted sampling by binary search.
    cumulative: Vec<u64>,
}

#[derive(Debug)]
struct Entry<E> {
    endpoint: E,
    load: Arc<Load>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("endpoint weight must be at least 1")]
    ZeroWeight,
}

impl<E> Set<E> {
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
            cumulative: Vec::new(),
        }
    }

    /// Builds a set from `(endpoint, load, weight)`.
    pub fn new(items: impl IntoIterator<Item = (E, Arc<Load>, u32)>) -> Result<Self, SetError> {
        let mut entries = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for (endpoint, load, weight) in items {
            if weight == 0 {
                return Err(SetError::ZeroWeight);
            }
            total += u64::from(weight);
            cumulative.push(total);
            entries.push(Entry { endpoint, load });
        }
        Ok(Self {
            entries,
            cumulative,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&E, &Arc<Load>)> {
        self.entries.iter().map(|e| (&e.endpoint, &e.load))
    }

    /// Power of two choices: draw two distinct candidates with probability
    /// proportional to weight, keep the one with the lower load cost.
    ///
    /// Sampling by weight (rather than dividing cost by weight) keeps the
    /// traffic share proportional to weight when endpoints are equally fast,
    /// while a slow or busy endpoint still loses the comparison. The second
    /// draw excludes the first, so even with two endpoints every pick is a
    /// real comparison.
    pub fn pick(&self) -> Option<(&E, &Arc<Load>)> {
        let total = *self.cumulative.last()?;
        let ia = self.index_of(fastrand::u64(0..total));
        let a = self.entries.get(ia)?;
        if self.entries.len() == 1 {
            return Some((&a.endpoint, &a.load));
        }
        let (lo, hi) = self.bounds(ia);
        let mut r = fastrand::u64(0..total - (hi - lo));
        if r >= lo {
            r += hi - lo;
        }
        let b = self.entries.get(self.index_of(r))?;
        let now = std::time::Instant::now();
        let chosen = if b.load.cost_at(now) < a.load.cost_at(now) * (1.0 - TIE_TOLERANCE) {
            b
        } else {
            a
        };
        Some((&chosen.endpoint, &chosen.load))
    }

    /// The entry whose weight range contains `r`.
    fn index_of(&self, r: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= r)
    }

    /// The weight range `[lo, hi)` of entry `i`.
    fn bounds(&self, i: usize) -> (u64, u64) {
        let lo = if i == 0 { 0 } else { self.cumulative[i - 1] };
        (lo, self.cumulative[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::PeakEwmaConfig;
    use std::time::Duration;

    fn load() -> Arc<Load> {
        Arc::new(Load::new(PeakEwmaConfig::default()))
    }

    #[test]
    fn empty_picks_nothing() {
        assert!(Set::<u8>::empty().pick().is_none());
    }

    #[test]
    fn zero_weight_is_refused() {
        assert_eq!(
            Set::new([(1u8, load(), 0)]).err(),
            Some(SetError::ZeroWeight)
        );
    }

    #[test]
    fn weights_set_the_share_when_loads_are_equal() {
        let set = Set::new([("a", load(), 1), ("b", load(), 3)]).expect("valid");
        let mut b = 0;
        let n = 20_000;
        for _ in 0..n {
            if *set.pick().expect("non-empty").0 == "b" {
                b += 1;
            }
        }
        let share = f64::from(b) / f64::from(n);
        assert!((0.70..0.80).contains(&share), "share of b = {share}");
    }

    #[test]
    fn three_endpoints_share_by_weight() {
        let set = Set::new([(0usize, load(), 1), (1, load(), 2), (2, load(), 1)]).expect("valid");
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            counts[*set.pick().expect("non-empty").0] += 1;
        }
        let share = f64::from(counts[1]) / 40_000.0;
        assert!((0.45..0.55).contains(&share), "{counts:?}");
    }

    #[test]
    fn a_slow_endpoint_loses() {
        let slow = load();
        let fast = load();
        let mut p = slow.start();
        std::thread::sleep(Duration::from_millis(60));
        p.observe_response();
        drop(p);
        let set = Set::new([("slow", slow, 1), ("fast", fast, 1)]).expect("valid");
        let slow_picks = (0..1000)
            .filter(|_| *set.pick().expect("non-empty").0 == "slow")
            .count();
        assert!(slow_picks < 50, "slow picked {slow_picks} times");
    }

    #[test]
    fn in_flight_requests_push_traffic_away() {
        let busy = load();
        let idle = load();
        let _guards: Vec<_> = (0..10).map(|_| busy.start()).collect();
        let set = Set::new([("busy", busy.clone(), 1), ("idle", idle, 1)]).expect("valid");
        let busy_picks = (0..1000)
            .filter(|_| *set.pick().expect("non-empty").0 == "busy")
            .count();
        assert!(busy_picks < 50, "busy picked {busy_picks} times");
    }
}
