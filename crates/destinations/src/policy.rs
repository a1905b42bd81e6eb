//! Traffic policy of a destination: its timeout, its breaker, and the
//! routes that send matching requests to weighted backends. The YAML keys
//! are a contract: extend them, never change what one means.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use weft_balance::BreakerConfig;
use weft_detect::Authority;

/// What a destination does with requests beyond choosing an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The whole request, until response headers; `None` is no bound.
    pub timeout: Option<Duration>,
    /// Failure accrual for this destination's endpoints (on by default).
    pub breaker: BreakerConfig,
    /// Retries after a failed first try; `None`: never.
    pub retry: Option<Retry>,
    /// A second try when the first is slow; `None`: never.
    pub hedge: Option<Hedge>,
    /// First match wins. Empty: every request goes to the destination's
    /// own endpoints.
    pub routes: Vec<Route>,
}

impl Policy {
    /// Every duration the policy holds: its timeout, breaker backoffs and
    /// hedge delay, and each route's.
    pub fn durations(&self) -> Vec<Duration> {
        let hedge = |h: &Option<Hedge>| match h {
            Some(Hedge::After(d)) => Some(*d),
            _ => None,
        };
        let mut out = vec![self.breaker.min_open, self.breaker.max_open];
        out.extend(self.timeout);
        out.extend(hedge(&self.hedge));
        for r in &self.routes {
            out.extend(r.timeout);
            out.extend(hedge(&r.hedge));
        }
        out
    }
}

/// When and how much to try again.
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Tries after the first.
    pub attempts: u32,
    pub on: RetryOn,
    pub budget: Budget,
}

impl Eq for Retry {}

/// What failures are worth another try.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Every 5xx.
    pub any_5xx: bool,
    /// These statuses (e.g. 502, 503, 504, 429).
    pub statuses: Vec<u16>,
    /// The connect failed (nothing was sent).
    pub connect_error: bool,
    /// The connection or stream broke before the response headers.
    pub reset: bool,
    /// gRPC status codes, from a trailers-only response.
    pub grpc: Vec<u32>,
}

impl RetryOn {
    /// Whether a response with this HTTP status and (for gRPC, from the
    /// headers) status code is retried.
    pub fn status(&self, status: u16, grpc: Option<u32>) -> bool {
        match grpc {
            Some(code) => self.grpc.contains(&code),
            None => (self.any_5xx && status >= 500) || self.statuses.contains(&status),
        }
    }
}

/// Retries may add at most `ratio` × the requests of the last 10 s, plus
/// `min_per_second`, so a failing service never gets a retry storm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for Budget {
    /// Linkerd's defaults: 20 %, and 10 per second.
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Shared, since every request it serves is labelled with it.
    pub name: std::sync::Arc<str>,
    pub matches: RouteMatch,
    /// At least one; picked by weight.
    pub backends: Vec<RouteBackend>,
    /// Overrides the destination's timeout for this route.
    pub timeout: Option<Duration>,
    /// Overrides the destination's retry policy for this route.
    pub retry: Option<Retry>,
    /// Overrides the destination's hedging for this route.
    pub hedge: Option<Hedge>,
}

/// When the first try has not answered after `after`, an identical one
/// goes to another endpoint; the first answer wins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hedge {
    After(Duration),
    /// The destination's recent latency at this quantile (0.5 to 0.999).
    Percentile(f64),
}

impl Eq for Hedge {}

/// Every condition given must hold; an empty match matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    pub path_prefix: Option<String>,
    /// Upper case, as on the wire.
    pub method: Option<String>,
    /// Header name (lower case) → exact value.
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteBackend {
    /// Another destination (resolved like any other name), or the route's
    /// own destination, meaning its own endpoints.
    pub destination: Authority,
    pub weight: u32,
}

impl RouteMatch {
    /// Whether a request with this method, path and headers matches.
    pub fn matches<'a>(
        &self,
        method: &str,
        path: &str,
        mut header: impl FnMut(&str) -> Option<&'a str>,
    ) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path_has_prefix(path, p))
            && self
                .headers
                .iter()
                .all(|(k, v)| header(k) == Some(v.as_str()))
    }
}

/// Prefixes match whole path segments: `/api` matches `/api` and
/// `/api/x`, not `/apix`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

impl Route {
    /// A backend, chosen with probability proportional to its weight.
    pub fn pick_backend(&self) -> Option<&RouteBackend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..total);
        for b in &self.backends {
            let w = u64::from(b.weight);
            if r < w {
                return Some(b);
            }
            r -= w;
        }
        None
    }
}

// The file's shape. Unknown keys are errors, so a misspelt or not yet
// supported key (`retry`, `hedge`) is refused rather than ignored.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakerModel {
    consecutive_failures: Option<u32>,
    min_open: Option<String>,
    max_open: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteModel {
    name: String,
    #[serde(default, rename = "match")]
    matches: MatchModel,
    backends: Vec<BackendModel>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retry: Option<RetryModel>,
    #[serde(default)]
    hedge: Option<HedgeModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HedgeModel {
    after: String,
}

fn hedge(at: &str, model: Option<HedgeModel>) -> Result<Option<Hedge>, String> {
    let Some(m) = model else { return Ok(None) };
    let at = format!("{at}.after");
    if let Some(p) = m.after.strip_prefix('p') {
        // p50..p99, or p9NN for 0.9NN.
        let digits = p.len() == 2 || (p.len() == 3 && p.starts_with('9'));
        let q = p
            .parse::<u32>()
            .ok()
            .filter(|_| digits)
            .map(|n| f64::from(n) / 10f64.powi(p.len() as i32))
            .filter(|q| (0.5..=0.999).contains(q))
            .ok_or_else(|| {
                format!(
                    "{at}: {:?} is not a percentile from p50 to p999 (e.g. p95, p99)",
                    m.after
                )
            })?;
        return Ok(Some(Hedge::Percentile(q)));
    }
    let d = duration(&at, &m.after)?;
    if d.is_zero() {
        return Err(format!("{at}: must be more than 0"));
    }
    Ok(Some(Hedge::After(d)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryModel {
    attempts: u32,
    on: Option<Vec<String>>,
    budget: Option<BudgetModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetModel {
    ratio: Option<f64>,
    min_per_second: Option<u32>,
}

/// gRPC's status names, for `grpc:<name>` in `retry.on`.
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// The name `retry.on` gives gRPC status `code` (`unavailable` for 14).
pub fn grpc_status_name(code: u32) -> Option<&'static str> {
    GRPC_CODES.get(usize::try_from(code).ok()?).copied()
}

/// The most tries after the first: more is a retry storm by configuration.
const MAX_ATTEMPTS: u32 = 10;

fn retry(at: &str, model: Option<RetryModel>) -> Result<Option<Retry>, String> {
    let Some(m) = model else { return Ok(None) };
    if m.attempts == 0 || m.attempts > MAX_ATTEMPTS {
        return Err(format!(
            "{at}.attempts: {} must be from 1 to {MAX_ATTEMPTS} (leave retry out for none)",
            m.attempts
        ));
    }
    let words = m.on.unwrap_or_else(|| {
        ["5xx", "connect-error", "reset", "grpc:unavailable"]
            .map(String::from)
            .to_vec()
    });
    let mut on = RetryOn::default();
    for (i, w) in words.iter().enumerate() {
        let at = format!("{at}.on[{i}]");
        let w = w.to_ascii_lowercase();
        match w.as_str() {
            "5xx" => on.any_5xx = true,
            "connect-error" => on.connect_error = true,
            "reset" => on.reset = true,
            _ => {
                if let Some(name) = w.strip_prefix("grpc:") {
                    let name = name.replace('_', "-");
                    let code = GRPC_CODES
                        .iter()
                        .position(|c| *c == name)
                        .filter(|&c| c != 0)
                        .ok_or_else(|| {
                            format!("{at}: {w:?} is not a gRPC status (e.g. grpc:unavailable)")
                        })?;
                    on.grpc.push(code as u32);
                } else {
                    let status: u16 = w.parse().ok().filter(|s| (400..600).contains(s)).ok_or_else(|| {
                        format!(
                            "{at}: {w:?} is none of 5xx, a status from 400 to 599, connect-error, reset, grpc:<status>"
                        )
                    })?;
                    on.statuses.push(status);
                }
            }
        }
    }
    let defaults = Budget::default();
    let budget = match m.budget {
        None => defaults,
        Some(b) => Budget {
            ratio: b.ratio.unwrap_or(defaults.ratio),
            min_per_second: b.min_per_second.unwrap_or(defaults.min_per_second),
        },
    };
    if !(0.0..=1.0).contains(&budget.ratio) {
        return Err(format!(
            "{at}.budget.ratio: {} must be from 0 to 1",
            budget.ratio
        ));
    }
    Ok(Some(Retry {
        attempts: m.attempts,
        on,
        budget,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MatchModel {
    path_prefix: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendModel {
    destination: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// `at` says where in the file a value is, for errors: the path of keys.
pub(crate) fn duration(at: &str, text: &str) -> Result<Duration, String> {
    crate::parse_duration(text).map_err(|e| format!("{at}: {e}"))
}

fn timeout(at: &str, text: Option<&str>) -> Result<Option<Duration>, String> {
    text.map(|t| {
        let d = duration(at, t)?;
        if d.is_zero() {
            return Err(format!(
                "{at}: must be more than 0 (leave it out for no timeout)"
            ));
        }
        Ok(d)
    })
    .transpose()
}

pub(crate) fn build(
    at: &str,
    destination_timeout: Option<&str>,
    destination_retry: Option<RetryModel>,
    destination_hedge: Option<HedgeModel>,
    breaker: Option<BreakerModel>,
    routes: Vec<RouteModel>,
) -> Result<Policy, String> {
    let defaults = BreakerConfig::default();
    let breaker = match breaker {
        None => defaults,
        Some(b) => {
            let at = format!("{at}.breaker");
            let config = BreakerConfig {
                consecutive_failures: b
                    .consecutive_failures
                    .unwrap_or(defaults.consecutive_failures),
                min_open: b
                    .min_open
                    .map(|t| duration(&format!("{at}.min_open"), &t))
                    .transpose()?
                    .unwrap_or(defaults.min_open),
                max_open: b
                    .max_open
                    .map(|t| duration(&format!("{at}.max_open"), &t))
                    .transpose()?
                    .unwrap_or(defaults.max_open),
            };
            if config.min_open.is_zero() || config.max_open < config.min_open {
                return Err(format!(
                    "{at}: needs 0 < min_open <= max_open (got {:?} and {:?})",
                    config.min_open, config.max_open
                ));
            }
            config
        }
    };
    let mut names = std::collections::HashSet::new();
    let mut built = Vec::with_capacity(routes.len());
    for (i, r) in routes.into_iter().enumerate() {
        let at = format!("{at}.routes[{i}]");
        if r.name.is_empty() || !names.insert(r.name.clone()) {
            return Err(format!(
                "{at}.name: {:?} must be non-empty and unique within the destination",
                r.name
            ));
        }
        if r.backends.is_empty() {
            return Err(format!("{at}.backends: a route needs at least one backend"));
        }
        let mut backends = Vec::with_capacity(r.backends.len());
        for (j, b) in r.backends.into_iter().enumerate() {
            let at = format!("{at}.backends[{j}]");
            let destination: Authority = b.destination.parse().map_err(|_| {
                format!(
                    "{at}.destination: {:?} must be host:port (e.g. api-v2.demo:8080)",
                    b.destination
                )
            })?;
            if b.weight == 0 {
                return Err(format!("{at}.weight: must be at least 1"));
            }
            backends.push(RouteBackend {
                destination,
                weight: b.weight,
            });
        }
        let method = r.matches.method.map(|m| m.to_ascii_uppercase());
        if let Some(m) = &method
            && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(format!("{at}.match.method: {m:?} is not an HTTP method"));
        }
        if let Some(p) = &r.matches.path_prefix
            && !p.starts_with('/')
        {
            return Err(format!("{at}.match.path_prefix: {p:?} must start with /"));
        }
        let headers = r
            .matches
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        built.push(Route {
            name: r.name.into(),
            matches: RouteMatch {
                path_prefix: r.matches.path_prefix,
                method,
                headers,
            },
            backends,
            timeout: timeout(&format!("{at}.timeout"), r.timeout.as_deref())?,
            retry: retry(&format!("{at}.retry"), r.retry)?,
            hedge: hedge(&format!("{at}.hedge"), r.hedge)?,
        });
    }
    Ok(Policy {
        timeout: timeout(&format!("{at}.timeout"), destination_timeout)?,
        retry: retry(&format!("{at}.retry"), destination_retry)?,
        hedge: hedge(&format!("{at}.hedge"), destination_hedge)?,
        breaker,
        routes: built,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/x", "/api/"));
        assert!(path_has_prefix("/api?q=1", "/api"));
        assert!(!path_has_prefix("/apix", "/api"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn backends_are_picked_by_weight() {
        let a: Authority = "a.test:80".parse().expect("authority");
        let b: Authority = "b.test:80".parse().expect("authority");
        let route = Route {
            name: "split".into(),
            matches: RouteMatch::default(),
            backends: vec![
                RouteBackend {
                    destination: a.clone(),
                    weight: 9,
                },
                RouteBackend {
                    destination: b,
                    weight: 1,
                },
            ],
            timeout: None,
            retry: None,
            hedge: None,
        };
        let n = 20_000;
        let to_a = (0..n)
            .filter(|_| route.pick_backend().map(|x| &x.destination) == Some(&a))
            .count();
        let share = to_a as f64 / n as f64;
        assert!((0.88..0.92).contains(&share), "{share}");
    }
}
