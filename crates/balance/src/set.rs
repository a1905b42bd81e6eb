use std::sync::Arc;

use crate::load::Load;

/// Draws tried before counting out the endpoints that are not ejected.
const BLIND_DRAWS: usize = 4;

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
    ///
    /// Endpoints their breaker ejected are left out; when every endpoint is
    /// ejected the set fails open and picks among them all, since refusing
    /// every request is worse than trying one that may have recovered.
    pub fn pick(&self) -> Option<(&E, &Arc<Load>)> {
        let now = std::time::Instant::now();
        let ia = match self.draw_available(now, None) {
            Some(i) => i,
            None => self.draw(None)?,
        };
        let a = self.entries.get(ia)?;
        let Some(ib) = self.draw_available(now, Some(ia)) else {
            return Some((&a.endpoint, &a.load));
        };
        let b = self.entries.get(ib)?;
        // A tie goes to the first draw, which is weighted: equally cheap
        // endpoints split by weight exactly.
        let chosen = if b.load.cost_at(now).cheaper_than(&a.load.cost_at(now)) {
            b
        } else {
            a
        };
        Some((&chosen.endpoint, &chosen.load))
    }

    /// A weighted draw, never `exclude`; `None` when nothing else is left.
    fn draw(&self, exclude: Option<usize>) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let Some(x) = exclude else {
            return Some(self.index_of(fastrand::u64(0..total)));
        };
        let (lo, hi) = self.bounds(x);
        if total == hi - lo {
            return None;
        }
        let mut r = fastrand::u64(0..total - (hi - lo));
        if r >= lo {
            r += hi - lo;
        }
        Some(self.index_of(r))
    }

    /// A weighted draw among endpoints not ejected (and not `exclude`).
    /// A few blind draws find one almost always; only when they all land on
    /// ejected endpoints are the rest counted out, so a pick stays O(1)
    /// unless much of the set is ejected.
    fn draw_available(&self, now: std::time::Instant, exclude: Option<usize>) -> Option<usize> {
        for _ in 0..BLIND_DRAWS {
            let i = self.draw(exclude)?;
            if !self.entries[i].load.ejected(now) {
                return Some(i);
            }
        }
        let available: Vec<(usize, u64)> = (0..self.entries.len())
            .filter(|&i| Some(i) != exclude && !self.entries[i].load.ejected(now))
            .map(|i| {
                let (lo, hi) = self.bounds(i);
                (i, hi - lo)
            })
            .collect();
        let total: u64 = available.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..total);
        for (i, w) in available {
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
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

    fn eject(load: &Arc<Load>) {
        for _ in 0..crate::BreakerConfig::default().consecutive_failures {
            load.start().record(crate::Outcome::Failure);
        }
    }

    #[test]
    fn ejected_endpoints_are_left_out_until_all_are() {
        let (a, b, c) = (load(), load(), load());
        let set = Set::new([
            ("a", a.clone(), 1),
            ("b", b.clone(), 1),
            ("c", c.clone(), 1),
        ])
        .expect("valid");
        eject(&a);
        for _ in 0..3_000 {
            assert_ne!(*set.pick().expect("non-empty").0, "a");
        }
        eject(&b);
        for _ in 0..1_000 {
            assert_eq!(*set.pick().expect("non-empty").0, "c");
        }
        // Every endpoint out: fail open rather than refuse everything.
        eject(&c);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            seen.insert(*set.pick().expect("fails open").0);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
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
        // Its first answers (the warm-up) all slow.
        for _ in 0..3 {
            let mut p = slow.start();
            std::thread::sleep(Duration::from_millis(60));
            p.observe_response();
        }
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
