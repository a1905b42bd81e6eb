//! From an authority to the set of endpoints that serve it: static
//! destinations or the control plane first, then DNS for names nobody
//! knows (like a plain forward proxy: unknown traffic is forwarded, never
//! dropped).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weft_balance::{Load, Set};
use weft_detect::Authority;

use tokio::sync::OnceCell;
use weft_identity::Name;

use crate::control::Control;
use crate::destinations::{Destinations, EndpointSpec, Policy, ProtocolHint};
use crate::endpoint::{Endpoint, EndpointSettings};
use crate::metrics::AuthorityLabels;

/// How long a request for a name new to this proxy waits for the control
/// plane's first answer before falling back to DNS.
const CONTROL_FIRST_ANSWER: Duration = Duration::from_secs(1);
/// Names followed on the control plane, at most: weft-control's default
/// `--max-names-per-client`, so the proxy's bound is met before the
/// control plane's. A new name beyond it fails (it may be a meshed
/// service, which DNS would reach in plaintext). Names unused for the
/// discovery idle timeout are let go first.
const MAX_CONTROLLED_TARGETS: usize = 2_000;
/// Failed DNS lookups remembered at most, so a client naming random hosts
/// cannot grow the negative cache.
const MAX_NEGATIVE: usize = 10_000;

/// DNS-resolved and literal-address targets, each map, beyond this many
/// are forgotten wholesale: a bound on memory when clients name many
/// distinct hosts or addresses (a target and its endpoint cost about 4 KiB:
/// 10,000 of them held 46 MiB), the same as the control plane's.
const MAX_DYNAMIC_TARGETS: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("DNS lookup for {authority} failed: {source}")]
    Resolve {
        authority: Authority,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS lookup for {authority} took longer than {timeout:?}")]
    ResolveTimeout {
        authority: Authority,
        timeout: Duration,
    },
    #[error("DNS lookup for {authority} failed less than {ttl:?} ago: {reason}")]
    NegativelyCached {
        authority: Authority,
        ttl: Duration,
        reason: String,
    },
    /// The control plane would not follow the name (this proxy follows too
    /// many): going to DNS instead could send a meshed service's traffic
    /// in plaintext, so the request fails.
    #[error("the control plane refused to follow {authority}: {reason}")]
    ControlRefused {
        authority: Authority,
        reason: String,
    },
    #[error(
        "this proxy already follows {max} names on the control plane; {authority} is not sent to DNS instead, since it may be meshed"
    )]
    TooManyNames { authority: Authority, max: usize },
}

/// Where the endpoints of a target come from.
#[derive(Debug)]
enum Source {
    /// The destinations file.
    Discovery,
    /// A Destination stream from the control plane. `known` is false while
    /// the control plane says it has never heard of the name (or has not
    /// answered yet): requests then go to DNS. `refused` says why the
    /// control plane would not follow it: requests then fail.
    Control {
        known: AtomicBool,
        refused: Mutex<Option<String>>,
    },
    /// A DNS answer, refreshed when older than the router's refresh period.
    Dns {
        resolved_at: Mutex<Instant>,
        refreshing: AtomicBool,
    },
    /// A literal address: an IP authority, an original destination, the
    /// inbound application.
    Fixed,
}

/// A logical destination: the name a client used, and the endpoints
/// currently serving it.
#[derive(Debug)]
pub struct Target {
    pub authority: Authority,
    /// The metric label for `authority`, chosen once (see
    /// [`crate::metrics::AuthorityLabels`]).
    pub label: Arc<str>,
    set: ArcSwap<Set<Arc<Endpoint>>>,
    /// Timeout, breaker and routes (the file's; the default elsewhere).
    pub policy: ArcSwap<Policy>,
    /// Retries spent against requests, for this logical destination.
    pub budget: weft_balance::RetryBudget,
    /// Recent latency, for hedging at a percentile.
    pub latency: weft_balance::LatencyWindow,
    source: Source,
    /// When a request last named this target, in seconds since the
    /// router started: names nobody uses are let go.
    used: AtomicU64,
    /// The control-plane stream following this target, stopped when the
    /// target is let go.
    follower: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Target {
    fn new(authority: Authority, label: Arc<str>, set: Set<Arc<Endpoint>>, source: Source) -> Self {
        Self {
            label,
            authority,
            set: ArcSwap::from_pointee(set),
            policy: ArcSwap::from_pointee(Policy::default()),
            budget: weft_balance::RetryBudget::default(),
            latency: weft_balance::LatencyWindow::default(),
            source,
            used: AtomicU64::new(0),
            follower: Mutex::new(None),
        }
    }

    /// Picks an endpoint for one request or connection, passing over
    /// endpoints whose recent connects failed while another is available.
    pub fn pick(&self) -> Option<(Arc<Endpoint>, Arc<Load>)> {
        let set = self.set.load();
        let mut fallback = None;
        for _ in 0..PICKS_PAST_FAILING {
            let (e, l) = set.pick()?;
            if !e.backing_off() {
                return Some((e.clone(), l.clone()));
            }
            fallback.get_or_insert((e.clone(), l.clone()));
        }
        // Every draw was failing: try one anyway, or nothing would ever
        // find out that it recovered.
        fallback
    }

    /// Like [`Target::pick`], preferring an endpoint not in `tried` (a
    /// retry goes elsewhere when there is elsewhere to go).
    pub fn pick_excluding(&self, tried: &[SocketAddr]) -> Option<(Arc<Endpoint>, Arc<Load>)> {
        let mut first = None;
        for _ in 0..PICKS_PAST_FAILING {
            let picked = self.pick()?;
            if !tried.contains(&picked.0.addr) {
                return Some(picked);
            }
            first.get_or_insert(picked);
        }
        first
    }

    /// How many endpoints the target has now.
    pub fn len(&self) -> usize {
        self.set.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.set.load().iter().map(|(e, _)| e.addr).collect()
    }
}

/// Draws the balancer makes to find an endpoint not in connect backoff.
const PICKS_PAST_FAILING: usize = 4;

type EndpointKey = (SocketAddr, Option<Name>, ProtocolHint);

#[derive(Debug)]
pub struct Router {
    settings: EndpointSettings,
    dns_refresh: Duration,
    /// Endpoints by address and identity, so a reload keeps pools and load
    /// history (and a changed identity gets fresh, differently secured
    /// connections).
    endpoints: Mutex<HashMap<EndpointKey, Weak<Endpoint>>>,
    discovered: ArcSwap<HashMap<Authority, Arc<Target>>>,
    control: Option<Control>,
    controlled: Mutex<HashMap<Authority, Arc<OnceCell<Arc<Target>>>>>,
    /// One warning a minute when new names meet `MAX_CONTROLLED_TARGETS`.
    too_many_names: weft_listener::Throttle,
    dynamic: RwLock<HashMap<Authority, Arc<Target>>>,
    /// Names DNS recently failed to resolve, and why.
    negative: Mutex<HashMap<Authority, (Instant, String)>>,
    fixed: RwLock<HashMap<SocketAddr, Arc<Target>>>,
    labels: Arc<AuthorityLabels>,
    idle: Duration,
    dns_timeout: Duration,
    started: Instant,
}

impl Router {
    pub fn new(
        settings: EndpointSettings,
        dns_refresh: Duration,
        control: Option<Control>,
        labels: Arc<AuthorityLabels>,
    ) -> Arc<Self> {
        let limits = settings.limits.clone();
        let router = Arc::new(Self {
            control,
            controlled: Mutex::default(),
            too_many_names: weft_listener::Throttle::new(Duration::from_secs(60)),
            settings,
            dns_refresh,
            endpoints: Mutex::default(),
            discovered: ArcSwap::from_pointee(HashMap::new()),
            dynamic: RwLock::default(),
            negative: Mutex::default(),
            fixed: RwLock::default(),
            labels,
            idle: limits.discovery_idle_timeout,
            dns_timeout: limits.dns_timeout,
            started: Instant::now(),
        });
        let weak = Arc::downgrade(&router);
        let every = (router.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(router) = weak.upgrade() else { return };
                router.evict_idle();
            }
        });
        router
    }

    fn target(&self, authority: Authority, set: Set<Arc<Endpoint>>, source: Source) -> Target {
        let label = self.labels.label(&authority);
        let t = Target::new(authority, label, set, source);
        self.touch(&t);
        t
    }

    fn now_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn touch(&self, t: &Target) {
        t.used.store(self.now_secs(), Ordering::Relaxed);
    }

    /// Lets go of names no request has used for the idle timeout: their
    /// control-plane streams close and their DNS answers are forgotten.
    fn evict_idle(&self) {
        let now = self.now_secs();
        let idle = self.idle.as_secs();
        let stale = |t: &Target| now.saturating_sub(t.used.load(Ordering::Relaxed)) >= idle;
        let mut evicted = 0;
        if let Ok(mut controlled) = self.controlled.lock() {
            controlled.retain(|_, cell| match cell.get() {
                Some(t) if stale(t) => {
                    if let Some(task) = t.follower.lock().ok().and_then(|mut f| f.take()) {
                        task.abort();
                    }
                    evicted += 1;
                    false
                }
                _ => true,
            });
        }
        if let Ok(mut dynamic) = self.dynamic.write() {
            let before = dynamic.len();
            dynamic.retain(|_, t| !stale(t));
            evicted += before - dynamic.len();
        }
        if let Ok(mut negative) = self.negative.lock() {
            negative.retain(|_, (at, _)| at.elapsed() < self.dns_refresh);
        }
        if evicted > 0 {
            tracing::debug!(evicted, "idle names let go");
            if let Ok(mut eps) = self.endpoints.lock() {
                eps.retain(|_, w| w.strong_count() > 0);
            }
        }
    }

    /// Applies every new destinations version until the sender goes away.
    pub fn follow(self: &Arc<Self>, mut rx: watch::Receiver<Arc<Destinations>>) {
        self.apply(&rx.borrow_and_update());
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(router) = this.upgrade() else { return };
                let d = rx.borrow_and_update().clone();
                router.apply(&d);
            }
        });
    }

    /// Replaces the discovered targets. Targets that still exist are updated
    /// in place, so requests holding them see the change; in-flight requests
    /// keep the endpoint they picked.
    pub fn apply(&self, d: &Destinations) {
        let current = self.discovered.load();
        let mut next = HashMap::with_capacity(d.by_authority.len());
        for (authority, destination) in &d.by_authority {
            let set = self.build_set(&destination.endpoints);
            for (_, load) in set.iter() {
                load.set_breaker(destination.policy.breaker);
            }
            let target = match current.get(authority) {
                Some(t) => {
                    t.set.store(Arc::new(set));
                    t.clone()
                }
                None => Arc::new(self.target(authority.clone(), set, Source::Discovery)),
            };
            if **target.policy.load() != destination.policy {
                target.policy.store(Arc::new(destination.policy.clone()));
            }
            // A connection to one of the service's own addresses (its
            // original destination) is routed as to the service.
            for addr in &destination.addresses {
                next.insert(Authority::from_socket_addr(*addr), target.clone());
            }
            next.insert(authority.clone(), target);
        }
        self.discovered.store(Arc::new(next));
        if let Ok(mut eps) = self.endpoints.lock() {
            eps.retain(|_, w| w.strong_count() > 0);
        }
    }

    /// Breaker state of every endpoint this router knows.
    pub fn endpoint_health(&self) -> Vec<crate::metrics::breaker::EndpointHealth> {
        let Ok(eps) = self.endpoints.lock() else {
            return Vec::new();
        };
        eps.values()
            .filter_map(Weak::upgrade)
            .map(|e| crate::metrics::breaker::EndpointHealth {
                addr: e.addr,
                ejections: e.load.ejections(),
                open: e.load.breaker_open(),
            })
            .collect()
    }

    fn endpoint(
        &self,
        addr: SocketAddr,
        identity: Option<&Name>,
        hint: ProtocolHint,
    ) -> Arc<Endpoint> {
        let mut eps = match self.endpoints.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let key = (addr, identity.cloned(), hint);
        if let Some(e) = eps.get(&key).and_then(Weak::upgrade) {
            return e;
        }
        let e = Arc::new(Endpoint::new(addr, identity.cloned(), hint, &self.settings));
        eps.insert(key, Arc::downgrade(&e));
        // A dead entry still holds its endpoint's allocation (a `Weak`
        // keeps the block): sweep them whenever the map doubles, so
        // clients naming ever new addresses cannot grow it (12,000 such
        // addresses once held 6.5 MiB this way).
        if eps.len() >= 1024 && eps.len().is_power_of_two() {
            eps.retain(|_, w| w.strong_count() > 0);
        }
        e
    }

    fn build_set(&self, specs: &[EndpointSpec]) -> Set<Arc<Endpoint>> {
        let items: Vec<_> = specs
            .iter()
            .map(|s| {
                let e = self.endpoint(s.addr, s.identity.as_ref(), s.hint);
                let load = e.load.clone();
                (e, load, s.weight.get())
            })
            .collect();
        // Weights are NonZero by construction, so this cannot fail.
        Set::new(items).unwrap_or_else(|_| Set::empty())
    }

    fn single(&self, addr: SocketAddr) -> Set<Arc<Endpoint>> {
        let e = self.endpoint(addr, None, ProtocolHint::Unknown);
        let load = e.load.clone();
        Set::new([(e, load, 1)]).unwrap_or_else(|_| Set::empty())
    }

    /// The target a client means by `authority`.
    pub async fn resolve(
        self: &Arc<Self>,
        authority: &Authority,
    ) -> Result<Arc<Target>, RouteError> {
        if let Some(t) = self.discovered.load().get(authority) {
            return Ok(t.clone());
        }
        // The control plane knows an address when it is a meshed endpoint
        // (its identity: mutual TLS with no configuration) or a service's;
        // any other address is forwarded as it is.
        if self.control.is_some()
            && let Some(t) = Box::pin(self.resolve_controlled(authority)).await?
        {
            return Ok(t);
        }
        if let Ok(ip) = authority.bare_host().parse::<IpAddr>() {
            return Ok(self.fixed(SocketAddr::new(ip, authority.port()), Some(authority)));
        }
        let cached = self
            .dynamic
            .read()
            .ok()
            .and_then(|m| m.get(authority).cloned());
        if let Some(t) = cached {
            self.touch(&t);
            self.refresh_if_stale(&t);
            return Ok(t);
        }
        if let Some((at, reason)) = self
            .negative
            .lock()
            .ok()
            .and_then(|n| n.get(authority).cloned())
            && at.elapsed() < self.dns_refresh
        {
            return Err(RouteError::NegativelyCached {
                authority: authority.clone(),
                ttl: self.dns_refresh,
                reason,
            });
        }
        // Boxed: the DNS lookup is the cold path, and keeping its state out
        // of line keeps every request's future small.
        let set = match Box::pin(self.lookup(authority)).await {
            Ok(set) => set,
            Err(e) => {
                if let Ok(mut n) = self.negative.lock() {
                    if n.len() >= MAX_NEGATIVE {
                        n.clear();
                    }
                    n.insert(authority.clone(), (Instant::now(), e.to_string()));
                }
                return Err(e);
            }
        };
        let target = Arc::new(self.target(
            authority.clone(),
            set,
            Source::Dns {
                resolved_at: Mutex::new(Instant::now()),
                refreshing: AtomicBool::new(false),
            },
        ));
        if let Ok(mut m) = self.dynamic.write() {
            if m.len() >= MAX_DYNAMIC_TARGETS {
                m.clear();
            }
            m.entry(authority.clone()).or_insert_with(|| target.clone());
        }
        Ok(target)
    }

    /// The control plane's target for `authority`, if the control plane
    /// knows the name. The first request for a name opens its stream and
    /// waits (briefly) for the first answer; later ones never wait.
    async fn resolve_controlled(
        self: &Arc<Self>,
        authority: &Authority,
    ) -> Result<Option<Arc<Target>>, RouteError> {
        let Some(control) = self.control.as_ref() else {
            return Ok(None);
        };
        let cell = {
            let mut controlled = match self.controlled.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match controlled.get(authority) {
                Some(c) => c.clone(),
                None if controlled.len() >= MAX_CONTROLLED_TARGETS => {
                    if let Some(suppressed) = self.too_many_names.allow() {
                        tracing::warn!(%authority, max = MAX_CONTROLLED_TARGETS, suppressed, "too many names followed on the control plane; failing requests for new ones rather than sending them to DNS");
                    }
                    return Err(RouteError::TooManyNames {
                        authority: authority.clone(),
                        max: MAX_CONTROLLED_TARGETS,
                    });
                }
                None => {
                    let c = Arc::new(OnceCell::new());
                    controlled.insert(authority.clone(), c.clone());
                    c
                }
            }
        };
        let target = cell
            .get_or_init(|| async {
                let target = Arc::new(self.target(
                    authority.clone(),
                    Set::empty(),
                    Source::Control {
                        known: AtomicBool::new(false),
                        refused: Mutex::new(None),
                    },
                ));
                let (endpoints_tx, endpoints_rx) = tokio::sync::oneshot::channel();
                let (policy_tx, policy_rx) = tokio::sync::oneshot::channel();
                let endpoints = control.clone().follow(
                    authority.clone(),
                    Arc::downgrade(self),
                    target.clone(),
                    endpoints_tx,
                );
                let policy = control.clone().follow_policy(
                    authority.clone(),
                    Arc::downgrade(self),
                    target.clone(),
                    policy_tx,
                );
                let task = tokio::spawn(async move {
                    tokio::join!(endpoints, policy);
                });
                if let Ok(mut f) = target.follower.lock() {
                    *f = Some(task.abort_handle());
                }
                // The first request waits for the policy too, so it gets
                // the timeout and retries a later one would.
                let both = async {
                    let _ = tokio::join!(endpoints_rx, policy_rx);
                };
                if tokio::time::timeout(CONTROL_FIRST_ANSWER, both).await.is_err() {
                    tracing::info!(%authority, "no full answer from the control plane yet; using what it said and DNS meanwhile");
                }
                target
            })
            .await;
        self.touch(target);
        match &target.source {
            Source::Control { known, .. } if known.load(Ordering::Acquire) => {
                Ok(Some(target.clone()))
            }
            Source::Control { refused, .. } => match refused.lock().ok().and_then(|r| r.clone()) {
                Some(reason) => Err(RouteError::ControlRefused {
                    authority: authority.clone(),
                    reason,
                }),
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// The control plane refused to follow `target` (`reason`): its
    /// requests fail until it answers.
    pub(crate) fn refuse_controlled(&self, target: &Target, reason: &str) {
        if let Source::Control { refused, .. } = &target.source
            && let Ok(mut r) = refused.lock()
        {
            if r.is_none() {
                tracing::warn!(authority = %target.authority, reason, "the control plane refused to follow a name; its requests fail rather than go to DNS");
            }
            *r = Some(reason.to_string());
        }
    }

    /// Applies a control-plane answer to `target`. `known: None` leaves the
    /// known/unknown state as it was.
    pub(crate) fn update_controlled(
        &self,
        target: &Target,
        specs: &[EndpointSpec],
        known: Option<bool>,
    ) {
        let set = self.build_set(specs);
        let breaker = target.policy.load().breaker;
        for (_, load) in set.iter() {
            load.set_breaker(breaker);
        }
        target.set.store(Arc::new(set));
        if let Source::Control { known: k, refused } = &target.source {
            if let Some(v) = known {
                k.store(v, Ordering::Release);
            }
            if let Ok(mut r) = refused.lock() {
                *r = None;
            }
        }
        tracing::debug!(authority = %target.authority, endpoints = specs.len(), ?known, "destination update");
        if let Ok(mut eps) = self.endpoints.lock() {
            eps.retain(|_, w| w.strong_count() > 0);
        }
    }

    /// Applies a control-plane policy to `target`: its breaker to the
    /// endpoints it has now, the rest to requests from now on.
    pub(crate) fn update_policy(&self, target: &Target, policy: Policy) {
        for (_, load) in target.set.load().iter() {
            load.set_breaker(policy.breaker);
        }
        tracing::debug!(authority = %target.authority, routes = policy.routes.len(), "policy update");
        if **target.policy.load() != policy {
            target.policy.store(Arc::new(policy));
        }
    }

    /// A target for one literal address (inbound application, original
    /// destination).
    pub fn fixed(&self, addr: SocketAddr, authority: Option<&Authority>) -> Arc<Target> {
        if let Some(t) = self.fixed.read().ok().and_then(|m| m.get(&addr).cloned()) {
            return t;
        }
        let authority = authority
            .cloned()
            .unwrap_or_else(|| Authority::from_socket_addr(addr));
        let target = Arc::new(self.target(authority, self.single(addr), Source::Fixed));
        if let Ok(mut m) = self.fixed.write() {
            if m.len() >= MAX_DYNAMIC_TARGETS {
                m.clear();
            }
            return m.entry(addr).or_insert(target).clone();
        }
        target
    }

    async fn lookup(&self, authority: &Authority) -> Result<Set<Arc<Endpoint>>, RouteError> {
        let lookup = tokio::net::lookup_host((authority.bare_host(), authority.port()));
        let addrs: Vec<SocketAddr> = tokio::time::timeout(self.dns_timeout, lookup)
            .await
            .map_err(|_| RouteError::ResolveTimeout {
                authority: authority.clone(),
                timeout: self.dns_timeout,
            })?
            .map_err(|source| RouteError::Resolve {
                authority: authority.clone(),
                source,
            })?
            .collect();
        let specs: Vec<EndpointSpec> = addrs
            .into_iter()
            .map(|addr| EndpointSpec {
                addr,
                weight: std::num::NonZeroU32::MIN,
                identity: None,
                hint: ProtocolHint::Unknown,
            })
            .collect();
        Ok(self.build_set(&specs))
    }

    fn refresh_if_stale(self: &Arc<Self>, target: &Arc<Target>) {
        let Source::Dns {
            resolved_at,
            refreshing,
        } = &target.source
        else {
            return;
        };
        let stale = resolved_at
            .lock()
            .map(|t| t.elapsed() >= self.dns_refresh)
            .unwrap_or(true);
        if !stale || refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let router = self.clone();
        let target = target.clone();
        tokio::spawn(async move {
            match router.lookup(&target.authority).await {
                // An empty or failed answer keeps the last good endpoints.
                Ok(set) if !set.is_empty() => target.set.store(Arc::new(set)),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "DNS refresh failed; keeping previous endpoints")
                }
            }
            if let Source::Dns {
                resolved_at,
                refreshing,
            } = &target.source
            {
                if let Ok(mut t) = resolved_at.lock() {
                    *t = Instant::now();
                }
                refreshing.store(false, Ordering::Release);
            }
        });
    }
}
