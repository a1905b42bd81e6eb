//! Local rate limits: a total, one per client, and overrides for named
//! clients. Each is a GCRA bucket (a token bucket kept as one timestamp)
//! holding a second's worth of burst. Per-client buckets live in an LRU of
//! fixed size, so however many clients appear, memory stays bounded; a
//! client pushed out starts again with a full bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Client;

/// A rate limit as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second for all clients together.
    pub total: Option<NonZeroU32>,
    /// Requests per second for each client: each identity, and each source
    /// address for clients without one.
    pub per_client: Option<NonZeroU32>,
    /// Limits for named identities instead of `per_client`; the identities
    /// of one override share its bucket.
    pub overrides: Vec<Override>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub identities: Vec<String>,
    pub rps: NonZeroU32,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Total,
    PerClient,
    Override,
}

impl Scope {
    /// The `limit` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::PerClient => "per_client",
            Self::Override => "override",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Total => "in total",
            Self::PerClient => "per client",
            Self::Override => "for this client",
        })
    }
}

/// One bucket: the theoretical arrival time of the next request.
#[derive(Debug)]
struct Gcra {
    tat: Option<Instant>,
}

impl Gcra {
    /// Takes a token, or says how long until one is free.
    fn take(&mut self, rps: NonZeroU32, now: Instant) -> Result<(), Duration> {
        let interval = Duration::from_secs(1) / rps.get();
        // A second's worth of requests may come at once.
        let burst = interval * (rps.get() - 1);
        let tat = self.tat.map_or(now, |t| t.max(now));
        let ahead = tat - now;
        if ahead > burst {
            return Err(ahead - burst);
        }
        self.tat = Some(tat + interval);
        Ok(())
    }
}

#[derive(Debug)]
struct Bucket {
    rps: NonZeroU32,
    state: Mutex<Gcra>,
}

impl Bucket {
    fn new(rps: NonZeroU32) -> Self {
        Self {
            rps,
            state: Mutex::new(Gcra { tat: None }),
        }
    }

    fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        state.take(self.rps, now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Identity(Box<str>),
    Addr(IpAddr),
}

/// `id` lower-cased, copied only when it has capitals (proven identities
/// hardly ever do): this is on the request path.
fn lower(id: &str) -> std::borrow::Cow<'_, str> {
    if id.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(id.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(id)
    }
}

/// A [`RateLimit`] in force, with its buckets.
#[derive(Debug)]
pub struct Limiter {
    spec: RateLimit,
    total: Option<Bucket>,
    per_client: Option<(NonZeroU32, Mutex<lru::LruCache<Key, Gcra>>)>,
    /// By lower-cased identity: the index of its override's bucket.
    overrides: HashMap<String, usize>,
    override_buckets: Vec<Bucket>,
}

impl Limiter {
    /// `clients`: how many per-client buckets are kept at most.
    pub fn new(spec: &RateLimit, clients: NonZeroUsize) -> Self {
        let mut overrides = HashMap::new();
        let mut override_buckets = Vec::new();
        for o in &spec.overrides {
            override_buckets.push(Bucket::new(o.rps));
            for id in &o.identities {
                // The first override naming an identity is its limit.
                overrides
                    .entry(id.to_ascii_lowercase())
                    .or_insert(override_buckets.len() - 1);
            }
        }
        Self {
            spec: spec.clone(),
            total: spec.total.map(Bucket::new),
            per_client: spec
                .per_client
                .map(|rps| (rps, Mutex::new(lru::LruCache::new(clients)))),
            overrides,
            override_buckets,
        }
    }

    /// The limit it enforces.
    pub fn spec(&self) -> &RateLimit {
        &self.spec
    }

    /// How many clients have a bucket now.
    pub fn clients(&self) -> usize {
        self.per_client
            .as_ref()
            .map_or(0, |(_, lru)| match lru.lock() {
                Ok(l) => l.len(),
                Err(p) => p.into_inner().len(),
            })
    }

    /// Admits a request from `client` or says which limit refused it, at
    /// what rate, and when to try again. The total is taken first: a
    /// refused client's request still counts against everyone's total, as
    /// it reached the server.
    pub fn check(&self, client: &Client<'_>, now: Instant) -> Result<(), (u32, Scope, Duration)> {
        if let Some(total) = &self.total {
            total
                .take(now)
                .map_err(|wait| (total.rps.get(), Scope::Total, wait))?;
        }
        if let Some(id) = client.identity
            && let Some(&i) = self.overrides.get(&*lower(id))
        {
            let bucket = &self.override_buckets[i];
            return bucket
                .take(now)
                .map_err(|wait| (bucket.rps.get(), Scope::Override, wait));
        }
        let Some((rps, lru)) = &self.per_client else {
            return Ok(());
        };
        let key = match client.identity {
            Some(id) => Key::Identity(lower(id).into()),
            None => Key::Addr(client.addr),
        };
        let mut lru = match lru.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        lru.get_or_insert_mut(key, || Gcra { tat: None })
            .take(*rps, now)
            .map_err(|wait| (rps.get(), Scope::PerClient, wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    fn client(addr: [u8; 4], id: Option<&'static str>) -> Client<'static> {
        Client {
            addr: IpAddr::from(addr),
            identity: id,
        }
    }

    /// Over `secs` seconds of requests every `every`, how many pass.
    fn admitted(l: &Limiter, c: &Client<'_>, start: Instant, secs: u64, every: Duration) -> usize {
        let n = (Duration::from_secs(secs).as_nanos() / every.as_nanos()) as u32;
        (0..n)
            .filter(|i| l.check(c, start + every * *i).is_ok())
            .count()
    }

    #[test]
    fn per_client_buckets_hold_their_rate_after_one_burst() {
        let spec = RateLimit {
            per_client: Some(nz(10)),
            ..Default::default()
        };
        let l = Limiter::new(&spec, NonZeroUsize::MIN.saturating_add(99));
        let now = Instant::now();
        // 100 rps offered for 20 s: a burst of 10, then 10 per second.
        let a = admitted(
            &l,
            &client([10, 0, 0, 1], Some("a.demo")),
            now,
            20,
            Duration::from_millis(10),
        );
        assert!((200..=211).contains(&a), "{a}");
        // Another client is not affected.
        let b = admitted(
            &l,
            &client([10, 0, 0, 1], Some("b.demo")),
            now,
            20,
            Duration::from_millis(10),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn refusals_say_when_to_retry() {
        let spec = RateLimit {
            total: Some(nz(2)),
            ..Default::default()
        };
        let l = Limiter::new(&spec, NonZeroUsize::MIN);
        let now = Instant::now();
        let c = client([10, 0, 0, 1], None);
        assert!(l.check(&c, now).is_ok());
        assert!(l.check(&c, now).is_ok());
        let (rps, scope, wait) =
            l.check(&c, now)
                .err()
                .unwrap_or((0, Scope::PerClient, Duration::ZERO));
        assert_eq!((rps, scope), (2, Scope::Total));
        assert_eq!(wait, Duration::from_millis(500));
        assert!(l.check(&c, now + wait).is_ok());
    }

    #[test]
    fn overrides_replace_the_per_client_limit_and_share_a_bucket() {
        let spec = RateLimit {
            per_client: Some(nz(100)),
            overrides: vec![Override {
                identities: vec!["batch.demo".into(), "etl.demo".into()],
                rps: nz(2),
            }],
            ..Default::default()
        };
        let l = Limiter::new(&spec, NonZeroUsize::MIN.saturating_add(9));
        let now = Instant::now();
        assert!(
            l.check(&client([10, 0, 0, 1], Some("batch.demo")), now)
                .is_ok()
        );
        assert!(
            l.check(&client([10, 0, 0, 2], Some("ETL.demo")), now)
                .is_ok()
        );
        assert_eq!(
            l.check(&client([10, 0, 0, 1], Some("batch.demo")), now)
                .err()
                .map(|e| e.1),
            Some(Scope::Override)
        );
        assert!(
            l.check(&client([10, 0, 0, 1], Some("web.demo")), now)
                .is_ok()
        );
    }

    #[test]
    fn clients_without_identity_are_told_apart_by_address_and_bounded() {
        let spec = RateLimit {
            per_client: Some(nz(1)),
            ..Default::default()
        };
        let cap = NonZeroUsize::MIN.saturating_add(999);
        let l = Limiter::new(&spec, cap);
        let now = Instant::now();
        assert!(l.check(&client([10, 0, 0, 1], None), now).is_ok());
        assert!(l.check(&client([10, 0, 0, 1], None), now).is_err());
        assert!(l.check(&client([10, 0, 0, 2], None), now).is_ok());
        for i in 0..100_000u32 {
            let _ = l.check(&client(i.to_be_bytes(), None), now);
        }
        assert_eq!(l.clients(), cap.get());
    }
}
