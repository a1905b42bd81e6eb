//! Retry budgets: retries may add at most a share of recent requests, plus
//! a small floor, so a failing service is never hit by a retry storm.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window budgets are counted over, in one-second slots.
const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_secs(1);

/// Requests and retries of the last 10 s.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    origin: Instant,
    /// The slot `slots[0]` stands for, in seconds since `origin`.
    head: u64,
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl RetryBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(State {
                origin: now,
                head: 0,
                requests: [0; SLOTS],
                retries: [0; SLOTS],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request (a first try).
    pub fn deposit(&self, now: Instant) {
        let mut s = self.lock();
        let i = s.advance(now);
        s.requests[i] += 1;
    }

    /// Takes one retry from the budget if `ratio` × the window's requests
    /// plus `min_per_second` × the window's seconds allow it.
    pub fn withdraw(&self, ratio: f64, min_per_second: u32, now: Instant) -> bool {
        let mut s = self.lock();
        let i = s.advance(now);
        let requests: u64 = s.requests.iter().sum();
        let retries: u64 = s.retries.iter().sum();
        let allowed =
            ratio * requests as f64 + f64::from(min_per_second) * SLOTS as f64 * SLOT.as_secs_f64();
        if (retries + 1) as f64 > allowed {
            return false;
        }
        s.retries[i] += 1;
        true
    }
}

impl State {
    /// Moves the window to `now` and returns the current slot's index.
    fn advance(&mut self, now: Instant) -> usize {
        let t = now.saturating_duration_since(self.origin).as_secs();
        let current = self.head + SLOTS as u64 - 1;
        if t > current {
            let shift = (t - current).min(SLOTS as u64) as usize;
            self.requests.rotate_left(shift);
            self.retries.rotate_left(shift);
            for i in SLOTS - shift..SLOTS {
                self.requests[i] = 0;
                self.retries[i] = 0;
            }
            self.head = t + 1 - SLOTS as u64;
        }
        (t.saturating_sub(self.head) as usize).min(SLOTS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_plus_a_floor_over_ten_seconds() {
        let t = Instant::now();
        let b = RetryBudget::new(t);
        // No floor: 20 % of 100 requests is 20 retries.
        for _ in 0..100 {
            b.deposit(t);
        }
        let granted = (0..50).filter(|_| b.withdraw(0.2, 0, t)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the window has forgotten them.
        let later = t + Duration::from_secs(11);
        assert!(!b.withdraw(0.2, 0, later));
        // A floor of 1 per second allows 10 over the window.
        let granted = (0..50).filter(|_| b.withdraw(0.0, 1, later)).count();
        assert_eq!(granted, 10);
    }
}
