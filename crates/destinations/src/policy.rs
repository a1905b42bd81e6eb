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
    /// First match wins. Empty: every request goes to the destination's
    /// own endpoints.
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub matches: RouteMatch,
    /// At least one; picked by weight.
    pub backends: Vec<RouteBackend>,
    /// Overrides the destination's timeout for this route.
    pub timeout: Option<Duration>,
}

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
    humantime::parse_duration(text)
        .map_err(|e| format!("{at}: {text:?} is not a duration such as 500ms or 2s ({e})"))
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
            name: r.name,
            matches: RouteMatch {
                path_prefix: r.matches.path_prefix,
                method,
                headers,
            },
            backends,
            timeout: timeout(&format!("{at}.timeout"), r.timeout.as_deref())?,
        });
    }
    Ok(Policy {
        timeout: timeout(&format!("{at}.timeout"), destination_timeout)?,
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
        };
        let n = 20_000;
        let to_a = (0..n)
            .filter(|_| route.pick_backend().map(|x| &x.destination) == Some(&a))
            .count();
        let share = to_a as f64 / n as f64;
        assert!((0.88..0.92).contains(&share), "{share}");
    }
}
