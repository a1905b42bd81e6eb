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

    /// Power of two choices: draw two candidates with probability
    /// proportional to weight, keep the one with the lower load cost.
    ///
    /// Sampling by weight (rather than dividing cost by weight) keeps the
    /// traffic share proportional to weight when endpoints are equally fast,
    /// while a slow or busy endpoint still loses the comparison.
    pub fn pick(&self) -> Option<(&E, &Arc<Load>)> {
        let a = self.sample()?;
        if self.entries.len() == 1 {
            return Some((&a.endpoint, &a.load));
        }
        let b = self.sample()?;
        let now = std::time::Instant::now();
        let chosen = if !std::ptr::eq(a, b)
            && b.load.cost_at(now) < a.load.cost_at(now) * (1.0 - TIE_TOLERANCE)
        {
            b
        } else {
            a
        };
        Some((&chosen.endpoint, &chosen.load))
    }

    fn sample(&self) -> Option<&Entry<E>> {
        let total = *self.cumulative.last()?;
        let r = fastrand::u64(0..total);
        let i = self.cumulative.partition_point(|&c| c <= r);
        self.entries.get(i)
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
        // Only when both draws land on "slow" (~25 %) can it be chosen.
        assert!(slow_picks < 320, "slow picked {slow_picks} times");
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
        assert!(busy_picks < 320, "busy picked {busy_picks} times");
    }
}
