use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::breaker::{Breaker, BreakerConfig, Outcome};

/// How fast observed latency is forgotten, and what an endpoint with no
/// history is assumed to cost.
#[derive(Clone, Copy, Debug)]
pub struct PeakEwmaConfig {
    /// Time constant of the exponential decay: after this long without a
    /// new sample an estimate has decayed to ~37 %.
    pub decay: Duration,
    /// Latency assumed for a fresh endpoint, so it is neither flooded nor
    /// starved before it has answered.
    pub default_rtt: Duration,
}

impl Default for PeakEwmaConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// The live load of one endpoint: requests in flight and a peak-EWMA of
/// response latency. Shared by every balancer that can pick the endpoint, so
/// its history survives destination reloads.
#[derive(Debug)]
pub struct Load {
    pending: AtomicU32,
    estimate: Mutex<Estimate>,
    decay_ns: f64,
    breaker: Mutex<Breaker>,
    /// The breaker is closed with no failure counted: picks, starts and
    /// successes then need not take its lock (the common case, per
    /// request).
    healthy: AtomicBool,
    ejections: AtomicU64,
}

#[derive(Debug)]
struct Estimate {
    rtt_ns: f64,
    stamp: Instant,
    /// Answers seen, up to [`WARMUP`]. Until the first, `rtt_ns` is only
    /// the default guess; while warming up it is the fastest answer so
    /// far. Replacing the guess outright, lower or higher, is what lets a
    /// fresh proxy tell a slow replica from its first answers instead of
    /// seeing every endpoint at the default until the decay wears it down;
    /// taking the fastest of a few keeps one unlucky first answer (a
    /// connect, a cold cache, a descheduled thread) from branding an
    /// endpoint slow for the seconds the decay takes.
    samples: u8,
    /// The latest answer's latency.
    last_ns: f64,
}

/// Latency differences below this are noise on a shared host (one
/// descheduled thread costs more), and worth less than the weights and
/// the in-flight counts: endpoints faster than this are balanced on
/// those alone.
const RTT_FLOOR_NS: f64 = 2_000_000.0;

/// Latency estimates within this factor of each other are the same
/// latency: equally fast endpoints differ by about this much on a busy
/// host, and were the marginally faster one always preferred, weights
/// would stop mattering and one endpoint would take nearly everything.
const RTT_TIE: f64 = 1.5;

/// Costs closer than this (relative) are a tie, which goes to the first,
/// weighted, draw.
const COST_TOLERANCE: f64 = 0.1;

/// What an endpoint costs the balancer at one instant: peak-EWMA latency
/// times the requests in flight, plus one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// Zero while the endpoint is being tried out.
    rtt_ns: f64,
    pending: u32,
}

impl Cost {
    pub fn value(&self) -> f64 {
        self.rtt_ns * f64::from(self.pending + 1)
    }

    /// Whether this endpoint is clearly cheaper than `other`; otherwise
    /// the two tie. Similar latencies count as equal, so between equally
    /// fast endpoints the requests in flight alone decide (one against
    /// none is decisive) and the draw's weights split the rest, while a
    /// slow endpoint loses unless the fast one is queueing.
    pub fn cheaper_than(&self, other: &Cost) -> bool {
        let (lo, hi) = if self.rtt_ns <= other.rtt_ns {
            (self.rtt_ns, other.rtt_ns)
        } else {
            (other.rtt_ns, self.rtt_ns)
        };
        let (mine, theirs) = if hi <= lo * RTT_TIE {
            (lo, lo)
        } else {
            (self.rtt_ns, other.rtt_ns)
        };
        mine * f64::from(self.pending + 1)
            < theirs * f64::from(other.pending + 1) * (1.0 - COST_TOLERANCE)
    }
}

/// Answers an endpoint is judged on before peak-EWMA takes over; until
/// then it is tried whenever it has nothing in flight.
const WARMUP: u8 = 3;

impl Load {
    pub fn new(config: PeakEwmaConfig) -> Self {
        Self {
            pending: AtomicU32::new(0),
            estimate: Mutex::new(Estimate {
                rtt_ns: config.default_rtt.as_nanos() as f64,
                stamp: Instant::now(),
                samples: 0,
                last_ns: 0.0,
            }),
            // A zero decay would divide by zero below; a nanosecond is
            // "forget immediately", which is what zero means.
            decay_ns: (config.decay.as_nanos() as f64).max(1.0),
            breaker: Mutex::new(Breaker::new(BreakerConfig::default())),
            healthy: AtomicBool::new(true),
            ejections: AtomicU64::new(0),
        }
    }

    /// Runs `f` on the breaker, then notes whether it is healthy.
    fn with_breaker<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut b);
        self.healthy.store(b.is_healthy(), Ordering::Release);
        out
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The breaker settings of the destination this endpoint serves (the
    /// last one configured wins when several share it).
    pub fn set_breaker(&self, config: BreakerConfig) {
        self.with_breaker(|b| b.config = config);
    }

    /// Whether the breaker has the endpoint out of balancing at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        !self.is_healthy() && self.with_breaker(|b| b.ejected(now))
    }

    /// Whether the breaker is open (ejected, or probing).
    pub fn breaker_open(&self) -> bool {
        !self.is_healthy() && self.with_breaker(|b| b.is_open())
    }

    /// How many times the breaker has ejected the endpoint.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    fn record_outcome(&self, outcome: Outcome, probe: bool) {
        // A success or nothing, on a healthy breaker, changes nothing.
        if outcome != Outcome::Failure && !probe && self.is_healthy() {
            return;
        }
        if self.with_breaker(|b| b.record(outcome, probe, Instant::now())) {
            self.ejections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Marks a request as started. The returned guard keeps it counted as
    /// in flight until dropped.
    pub fn start(self: &std::sync::Arc<Self>) -> Pending {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let probe = !self.is_healthy() && self.with_breaker(|b| b.start(started));
        Pending {
            load: self.clone(),
            started,
            observed: false,
            probe,
            outcome: None,
        }
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The balancer's cost: the decayed latency estimate and the requests
    /// this endpoint is already working on.
    pub fn cost(&self) -> Cost {
        self.cost_at(Instant::now())
    }

    /// [`Load::cost`] as of `now`: comparisons must use one instant, or the
    /// endpoint asked second looks cheaper merely for having decayed longer.
    ///
    /// An endpoint still warming up with nothing in flight costs nothing:
    /// it is tried, one request at a time, until its first answers say
    /// what it is worth. While a request is out it costs its estimate (the
    /// default guess before any answer), so a new endpoint is never
    /// flooded before it has answered.
    pub fn cost_at(&self, now: Instant) -> Cost {
        let pending = self.pending();
        let (rtt, samples) = match self.estimate.lock() {
            Ok(mut e) => (e.decay_to(now, self.decay_ns), e.samples),
            Err(poisoned) => {
                let e = poisoned.into_inner();
                (e.rtt_ns, e.samples)
            }
        };
        let rtt_ns = if samples < WARMUP && pending == 0 {
            0.0
        } else {
            rtt.max(RTT_FLOOR_NS)
        };
        Cost { rtt_ns, pending }
    }

    /// Current latency estimate, for introspection.
    pub fn rtt_estimate(&self) -> Duration {
        let ns = match self.estimate.lock() {
            Ok(e) => e.rtt_ns,
            Err(poisoned) => poisoned.into_inner().rtt_ns,
        };
        Duration::from_nanos(ns as u64)
    }

    /// Takes in an answer's latency.
    fn observe(&self, rtt: Duration) {
        self.observe_sample(rtt, Sample::Answer);
    }

    fn observe_sample(&self, rtt: Duration, kind: Sample) {
        let rtt_ns = rtt.as_nanos() as f64;
        let now = Instant::now();
        if let Ok(mut e) = self.estimate.lock() {
            if kind == Sample::Failure {
                // A failure is never outvoted by faster answers: it ends
                // the warm-up and counts as a peak.
                e.samples = WARMUP;
            } else if e.samples < WARMUP {
                e.rtt_ns = if e.samples == 0 {
                    rtt_ns
                } else {
                    e.rtt_ns.min(rtt_ns)
                };
                e.samples += 1;
                e.stamp = now;
                e.last_ns = rtt_ns;
                return;
            }
            let previous = std::mem::replace(&mut e.last_ns, rtt_ns);
            // Peak sensitivity: slowness is believed at once, but a single
            // slow answer between fast ones is a blip (a descheduled
            // thread), not the endpoint: an answer raises the estimate as
            // far as the answer before it also reached. A failure needs
            // no second opinion.
            let peak = match kind {
                Sample::Failure => rtt_ns,
                Sample::Answer => rtt_ns.min(previous),
            };
            if peak > e.rtt_ns {
                e.rtt_ns = peak;
                e.stamp = now;
            } else {
                let elapsed = now.saturating_duration_since(e.stamp).as_nanos() as f64;
                let w = (-elapsed / self.decay_ns).exp();
                e.rtt_ns = e.rtt_ns * w + rtt_ns * (1.0 - w);
                e.stamp = now;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sample {
    Answer,
    Failure,
}

impl Estimate {
    /// With no samples the estimate drifts towards zero, so an idle
    /// endpoint is eventually tried again.
    fn decay_to(&mut self, now: Instant, decay_ns: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        if elapsed > 0.0 {
            self.rtt_ns *= (-elapsed / decay_ns).exp();
            self.stamp = now;
        }
        self.rtt_ns
    }
}

/// A request in flight on an endpoint.
#[derive(Debug)]
pub struct Pending {
    load: std::sync::Arc<Load>,
    started: Instant,
    observed: bool,
    /// This request is the one probing an ejected endpoint.
    probe: bool,
    /// What the breaker has been told, at most once.
    outcome: Option<Outcome>,
}

impl Pending {
    /// Records the time from start to the response (headers); the request
    /// stays in flight until the guard is dropped (end of the body).
    pub fn observe_response(&mut self) {
        if !self.observed {
            self.observed = true;
            self.load.observe(self.started.elapsed());
        }
    }
}

impl Pending {
    /// Records a failure to reach the endpoint (refused or timed-out
    /// connect) as a very slow response, so the balancer steers away from
    /// it until the estimate decays.
    pub fn observe_failure(&mut self) {
        self.observed = true;
        self.load.observe_sample(FAILURE_PENALTY, Sample::Failure);
        self.record(Outcome::Failure);
    }

    /// Tells the breaker how the request ended (once; later calls are
    /// ignored). A failure also counts as a very slow response, so an
    /// endpoint that fails fast does not look cheap to the balancer.
    pub fn record(&mut self, outcome: Outcome) {
        if self.outcome.is_some() {
            return;
        }
        self.outcome = Some(outcome);
        if outcome == Outcome::Failure {
            self.observed = true;
            self.load.observe_sample(FAILURE_PENALTY, Sample::Failure);
        }
        self.load.record_outcome(outcome, self.probe);
    }
}

/// The latency a failed attempt counts as.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

impl Drop for Pending {
    /// A request given up before its response (the client cancelled, a
    /// timeout fired, the upstream failed) counts as a failure: a hung
    /// endpoint must not look cheap because nothing ever finishes there.
    fn drop(&mut self) {
        if !self.observed {
            self.load
                .observe_sample(self.started.elapsed().max(FAILURE_PENALTY), Sample::Failure);
        }
        if self.outcome.is_none() {
            self.load.record_outcome(Outcome::Neutral, self.probe);
        }
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn peaks_are_believed_at_once_and_decay_slowly() {
        let load = Arc::new(Load::new(PeakEwmaConfig {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(1),
        }));
        for _ in 0..WARMUP {
            load.observe(Duration::from_millis(1));
        }
        // One slow answer among fast ones is a blip...
        load.observe(Duration::from_millis(50));
        assert!(load.rtt_estimate() < Duration::from_millis(2));
        // ...two in a row are the endpoint.
        load.observe(Duration::from_millis(60));
        assert!(load.rtt_estimate() >= Duration::from_millis(49));
        load.observe(Duration::from_millis(1));
        // Nearly no time has passed, so the peak still dominates.
        assert!(load.rtt_estimate() >= Duration::from_millis(40));
    }

    /// The default is a guess: the first answers replace it even when
    /// lower, so a fast endpoint and a slow one differ from their first
    /// answers, not only once the decay has worn the default down; one
    /// unlucky answer among them does not brand an endpoint slow.
    #[test]
    fn the_first_answers_replace_the_default() {
        let fast = Load::new(PeakEwmaConfig::default());
        let slow = Load::new(PeakEwmaConfig::default());
        for ms in [8, 1, 1] {
            fast.observe(Duration::from_millis(ms));
        }
        for _ in 0..WARMUP {
            slow.observe(Duration::from_millis(10));
        }
        assert!(fast.rtt_estimate() <= Duration::from_millis(1));
        assert!(slow.rtt_estimate() >= Duration::from_millis(9));
        // After the warm-up, answers below the estimate only pull it down
        // slowly.
        slow.observe(Duration::from_millis(1));
        assert!(slow.rtt_estimate() >= Duration::from_millis(9));
    }

    /// A failure during the warm-up is not outvoted by fast answers.
    #[test]
    fn a_failure_ends_the_warm_up() {
        let load = Arc::new(Load::new(PeakEwmaConfig::default()));
        load.observe(Duration::from_millis(1));
        load.start().observe_failure();
        load.observe(Duration::from_millis(1));
        assert!(load.rtt_estimate() >= FAILURE_PENALTY / 2);
    }

    /// A fresh endpoint is tried before any judged one, but only one
    /// request at a time until its warm-up is over.
    #[test]
    fn a_fresh_endpoint_is_explored_then_judged() {
        let fresh = Arc::new(Load::new(PeakEwmaConfig::default()));
        let known = Load::new(PeakEwmaConfig::default());
        for _ in 0..WARMUP {
            known.observe(Duration::from_micros(500));
        }
        for _ in 0..WARMUP {
            let now = Instant::now();
            assert!(fresh.cost_at(now).cheaper_than(&known.cost_at(now)));
            let mut first = fresh.start();
            let now = Instant::now();
            assert!(known.cost_at(now).cheaper_than(&fresh.cost_at(now)));
            std::thread::sleep(Duration::from_millis(5));
            first.observe_response();
        }
        let now = Instant::now();
        assert!(
            known.cost_at(now).cheaper_than(&fresh.cost_at(now)),
            "judged by its 5 ms answer"
        );
    }

    /// Latencies within 1.5x are equal, and then in-flight counts decide;
    /// beyond that latency decides unless the fast one is queueing.
    #[test]
    fn similar_latencies_tie_and_in_flight_decides() {
        let c = |ms: f64, pending| Cost {
            rtt_ns: ms * 1e6,
            pending,
        };
        assert!(!c(3.0, 0).cheaper_than(&c(4.0, 0)));
        assert!(!c(4.0, 0).cheaper_than(&c(3.0, 0)));
        assert!(c(4.0, 0).cheaper_than(&c(3.0, 1)));
        assert!(c(3.0, 1).cheaper_than(&c(10.0, 0)));
        assert!(c(10.0, 0).cheaper_than(&c(3.0, 3)));
        assert!(c(0.0, 0).cheaper_than(&c(3.0, 0)), "trying out");
        assert!(!c(0.0, 0).cheaper_than(&c(0.0, 0)));
    }

    #[test]
    fn pending_counts_guards() {
        let load = Arc::new(Load::new(PeakEwmaConfig::default()));
        let base = load.cost().value();
        let mut a = load.start();
        let mut b = load.start();
        assert_eq!(load.pending(), 2);
        assert!(load.cost().value() > base * 2.5);
        a.observe_response();
        b.observe_response();
        drop(a);
        drop(b);
        assert_eq!(load.pending(), 0);
    }

    #[test]
    fn a_request_abandoned_before_its_response_counts_as_a_failure() {
        let load = Arc::new(Load::new(PeakEwmaConfig::default()));
        let mut answered = load.start();
        answered.observe_response();
        drop(answered);
        assert!(load.rtt_estimate() < FAILURE_PENALTY / 2);
        drop(load.start());
        assert!(load.rtt_estimate() >= FAILURE_PENALTY);
    }
}
