//! Failure accrual: an endpoint that fails many times in a row is ejected
//! from balancing, then probed with one request at a time after a backoff
//! that doubles while the probes fail.

use std::time::{Duration, Instant};

/// When to eject an endpoint and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that eject the endpoint; 0 turns the breaker off.
    pub consecutive_failures: u32,
    /// The first ejection lasts this long...
    pub min_open: Duration,
    /// ...and each failed probe doubles it, up to this.
    pub max_open: Duration,
}

impl Default for BreakerConfig {
    /// On by default: 7 failures in a row, 1 s doubling to 60 s.
    fn default() -> Self {
        Self {
            consecutive_failures: 7,
            min_open: Duration::from_secs(1),
            max_open: Duration::from_secs(60),
        }
    }
}

/// How a request to an endpoint ended, as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The endpoint failed: a 5xx, a gRPC UNAVAILABLE or INTERNAL, a reset,
    /// a failed connect.
    Failure,
    /// Says nothing about the endpoint (the client went away first).
    Neutral,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Closed {
        failures: u32,
    },
    /// Ejected until `until`; after it one request may probe.
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// One probe is in flight; no other request is sent.
    Probing {
        backoff: Duration,
    },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    pub(crate) config: BreakerConfig,
    pub(crate) state: State,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed { failures: 0 },
        }
    }

    /// Whether the balancer should leave the endpoint out now.
    pub(crate) fn ejected(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => false,
            State::Open { until, .. } => now < until,
            State::Probing { .. } => true,
        }
    }

    /// A request is starting; returns whether it is the probe.
    pub(crate) fn start(&mut self, now: Instant) -> bool {
        match self.state {
            State::Open { until, backoff } if now >= until => {
                self.state = State::Probing { backoff };
                true
            }
            _ => false,
        }
    }

    /// Returns whether this outcome ejected the endpoint (closed → open).
    pub(crate) fn record(&mut self, outcome: Outcome, probe: bool, now: Instant) -> bool {
        let was_closed = matches!(self.state, State::Closed { .. });
        let limit = self.config.consecutive_failures;
        self.state = match (self.state, outcome) {
            (_, Outcome::Neutral) if probe => match self.state {
                // The probe told nothing: let the next request probe.
                State::Probing { backoff } => State::Open {
                    until: now,
                    backoff,
                },
                other => other,
            },
            (state, Outcome::Neutral) => state,
            (State::Probing { .. }, Outcome::Success) if probe => State::Closed { failures: 0 },
            (State::Probing { backoff }, Outcome::Failure) if probe => {
                let backoff = (backoff * 2).min(self.config.max_open);
                State::Open {
                    until: now + backoff,
                    backoff,
                }
            }
            (State::Closed { .. }, Outcome::Success) => State::Closed { failures: 0 },
            (State::Closed { failures }, Outcome::Failure) => {
                let failures = failures.saturating_add(1);
                if limit > 0 && failures >= limit {
                    let backoff = self.config.min_open;
                    State::Open {
                        until: now + backoff,
                        backoff,
                    }
                } else {
                    State::Closed { failures }
                }
            }
            // Requests that started before the ejection end after it: they
            // neither close nor extend it.
            (state, _) => state,
        };
        if limit == 0 {
            self.state = State::Closed { failures: 0 };
        }
        was_closed && matches!(self.state, State::Open { .. })
    }

    /// Closed with no failure counted: nothing to track for a success.
    pub(crate) fn is_healthy(&self) -> bool {
        self.state == State::Closed { failures: 0 }
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            min_open: Duration::from_secs(1),
            max_open: Duration::from_secs(4),
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        b.record(Outcome::Failure, false, t);
        b.record(Outcome::Failure, false, t);
        b.record(Outcome::Success, false, t);
        b.record(Outcome::Failure, false, t);
        b.record(Outcome::Failure, false, t);
        assert!(!b.ejected(t), "a success in between resets the count");
        b.record(Outcome::Failure, false, t);
        assert!(b.ejected(t));
        assert!(b.ejected(t + Duration::from_millis(999)));
        assert!(!b.ejected(t + Duration::from_secs(1)), "probe time");
    }

    #[test]
    fn probes_go_one_at_a_time_and_failed_probes_double_the_ejection() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            b.record(Outcome::Failure, false, t);
        }
        let t1 = t + Duration::from_secs(1);
        assert!(b.start(t1), "the first request after the ejection probes");
        assert!(b.ejected(t1), "nobody else while it is out");
        assert!(!b.start(t1));
        b.record(Outcome::Failure, true, t1);
        assert!(b.ejected(t1 + Duration::from_millis(1999)));
        let t2 = t1 + Duration::from_secs(2);
        assert!(b.start(t2));
        b.record(Outcome::Failure, true, t2);
        let t3 = t2 + Duration::from_secs(4);
        assert!(
            b.ejected(t3 - Duration::from_millis(1)),
            "capped at max_open"
        );
        assert!(b.start(t3));
        // A neutral probe (the client left) lets another request probe.
        b.record(Outcome::Neutral, true, t3);
        assert!(b.start(t3));
        b.record(Outcome::Success, true, t3);
        assert!(!b.ejected(t3) && !b.is_open());
    }

    #[test]
    fn zero_failures_means_off() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            consecutive_failures: 0,
            ..config()
        });
        for _ in 0..100 {
            b.record(Outcome::Failure, false, t);
        }
        assert!(!b.ejected(t));
    }
}
