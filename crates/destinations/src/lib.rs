//! The destinations file: static service discovery in YAML. `weft-proxy`
//! reads it when no control plane is configured, and `weft-control` serves
//! it as its embedded discovery backend. The file is polled; a bad edit is
//! logged and the last good version stays in force.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

mod changes;
mod policy;
mod servers;
pub use policy::{
    Budget, Hedge, Policy, Retry, RetryOn, Route, RouteBackend, RouteMatch, grpc_status_name,
};
pub use servers::{DETECT_TIMEOUT, ServerSpec};

/// The longest duration any policy may hold (a timeout, a backoff, a
/// hedge delay), whether from a file or from the control plane: far
/// beyond any sensible value, and far enough below what `Instant +
/// Duration` can hold that arithmetic on it never overflows (a value
/// near `i64::MAX` seconds aborted the proxy).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A duration as people write it (`500ms`, `2s`), at most [`MAX_DURATION`]:
/// the one parser for the destinations file and the proxy's settings.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 500ms or 2s ({e})"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{text:?} is longer than {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}
use weft_detect::Authority;
use weft_identity::Name;

/// How often the file is checked where inotify cannot tell when it
/// changed. Changes must apply within 1 s.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// A changed file is read again after this long and applied only if it
/// reads the same: a writer still in the middle of rewriting it in place
/// (an editor, a config tool) is not caught half-way.
const SETTLE: Duration = Duration::from_millis(50);

/// The endpoints of every statically known authority, and the inbound
/// policy of every listed server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destinations {
    pub by_authority: HashMap<Authority, Destination>,
    /// By lower-cased identity.
    pub servers: HashMap<String, ServerSpec>,
}

/// One service: its endpoints and how to talk to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    pub endpoints: Vec<EndpointSpec>,
    /// The service's own addresses (a virtual IP, a Kubernetes ClusterIP):
    /// a connection to one of them is routed as to this destination.
    pub addresses: Vec<SocketAddr>,
    /// Connections are relayed as bytes, never parsed as HTTP.
    pub opaque: bool,
    /// Timeout, breaker and routes.
    pub policy: Policy,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    /// The identity the endpoint's proxy proves with its certificate. When
    /// set, clients open mutual TLS to it and require exactly this name.
    pub identity: Option<Name>,
    /// What the endpoint accepts beyond what its application speaks.
    pub hint: ProtocolHint,
}

/// Discovery's protocol hint for an endpoint (the Destination API's
/// `ProtocolHint`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProtocolHint {
    /// Nothing known: requests go as the client sent them.
    #[default]
    Unknown,
    /// A meshed proxy, whose inbound side takes HTTP/2 whatever the
    /// application behind it speaks: HTTP/1 requests may be carried to it
    /// over HTTP/2 (`l5d-orig-proto`) and restored there.
    Http2,
}

impl ProtocolHint {
    /// The hint for an endpoint named in a destinations file or by
    /// weft-control: one with an identity is reached through its proxy.
    pub fn of_identity(identity: Option<&Name>) -> Self {
        match identity {
            Some(_) => Self::Http2,
            None => Self::Unknown,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DestinationsError {
    #[error("cannot read destinations file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a thread to follow destinations file {path}: {source}")]
    Follow {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("destinations file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    // Required: a file without it is far more likely half-written than
    // meant to be empty, so "no destinations" must be said explicitly.
    destinations: HashMap<String, DestinationModel>,
    #[serde(default)]
    servers: HashMap<String, servers::ServerModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationModel {
    #[serde(default)]
    endpoints: Vec<EndpointModel>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    opaque: bool,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retry: Option<policy::RetryModel>,
    #[serde(default)]
    hedge: Option<policy::HedgeModel>,
    #[serde(default)]
    breaker: Option<policy::BreakerModel>,
    #[serde(default)]
    routes: Vec<policy::RouteModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointModel {
    addr: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    identity: Option<String>,
}

fn default_weight() -> u32 {
    1
}

impl Destinations {
    pub fn parse(path: &Path, text: &str) -> Result<Self, DestinationsError> {
        let invalid = |reason: String| DestinationsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let blank = text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        });
        if blank {
            return Err(invalid(
                "the file is empty (being rewritten?); write `destinations: {}` for none".into(),
            ));
        }
        let model: FileModel = serde_saphyr::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut by_authority = HashMap::new();
        // Which destination each service address belongs to.
        let mut owners: HashMap<SocketAddr, Authority> = HashMap::new();
        for (name, dest) in model.destinations {
            let authority: Authority = name.parse().map_err(|_| {
                invalid(format!(
                    "destination {name:?} must be host:port (e.g. svc.test:8080)"
                ))
            })?;
            let mut endpoints = Vec::with_capacity(dest.endpoints.len());
            for ep in dest.endpoints {
                let addr: SocketAddr = ep.addr.parse().map_err(|_| {
                    invalid(format!(
                        "destination {name:?}: endpoint addr {:?} is not an IP:port",
                        ep.addr
                    ))
                })?;
                let weight = NonZeroU32::new(ep.weight).ok_or_else(|| {
                    invalid(format!(
                        "destination {name:?}: endpoint {addr} has weight 0 (must be at least 1)"
                    ))
                })?;
                let identity = ep
                    .identity
                    .map(|i| i.parse::<Name>())
                    .transpose()
                    .map_err(|e| invalid(format!("destination {name:?}: endpoint {addr}: {e}")))?;
                endpoints.push(EndpointSpec {
                    addr,
                    weight,
                    hint: ProtocolHint::of_identity(identity.as_ref()),
                    identity,
                });
            }
            let policy = policy::build(
                &format!("destinations.{name:?}"),
                dest.timeout.as_deref(),
                dest.retry,
                dest.hedge,
                dest.breaker,
                dest.routes,
            )
            .map_err(invalid)?;
            let mut addresses = Vec::with_capacity(dest.addresses.len());
            for a in &dest.addresses {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    invalid(format!(
                        "destination {name:?}: address {a:?} is not an IP:port"
                    ))
                })?;
                if let Some(other) = owners.insert(addr, authority.clone()) {
                    return Err(invalid(format!(
                        "address {addr} is listed by both {other} and {authority}"
                    )));
                }
                addresses.push(addr);
            }
            let destination = Destination {
                endpoints,
                addresses,
                opaque: dest.opaque,
                policy,
            };
            if by_authority
                .insert(authority.clone(), destination)
                .is_some()
            {
                return Err(invalid(format!(
                    "destination {authority} is listed twice (names are case-insensitive)"
                )));
            }
        }
        let servers = servers::build(model.servers).map_err(invalid)?;
        Ok(Self {
            by_authority,
            servers,
        })
    }
}

/// Loads the file once (failing if it is bad: a proxy must not start on a
/// config it cannot read) and then follows it. The file is small, so each
/// look simply re-reads it: no mtime-granularity blind spots. It is followed
/// on a thread of its own (ending when every receiver is gone), woken by
/// inotify (`changes`): an idle proxy does not wake for it, where polling on
/// the runtime took 860 µs of CPU a second, each poll a hand-off to tokio's
/// blocking pool and back.
pub fn watch(path: PathBuf) -> Result<watch::Receiver<Arc<Destinations>>, DestinationsError> {
    let last_text = read(&path)?;
    let first = Destinations::parse(&path, &last_text)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    let followed = path.clone();
    std::thread::Builder::new()
        .name("weft-destinations".into())
        .spawn(move || follow(&followed, last_text, &tx))
        .map_err(|source| DestinationsError::Follow { path, source })?;
    Ok(rx)
}

fn read(path: &Path) -> Result<String, DestinationsError> {
    std::fs::read_to_string(path).map_err(|source| DestinationsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn follow(path: &Path, mut last_text: String, tx: &watch::Sender<Arc<Destinations>>) {
    let mut changes = changes::Changes::new(path);
    let mut unreadable = false;
    loop {
        changes.wait();
        if tx.is_closed() {
            return;
        }
        let text = match read(path) {
            Ok(t) => t,
            Err(e) => {
                if !unreadable {
                    tracing::warn!(error = %e, "cannot read destinations; keeping the last good version");
                    unreadable = true;
                }
                continue;
            }
        };
        unreadable = false;
        if text == last_text {
            continue;
        }
        std::thread::sleep(SETTLE);
        match read(path) {
            Ok(again) if again == text => {}
            // Still changing: look again at the next tick.
            _ => continue,
        }
        match Destinations::parse(path, &text) {
            Ok(d) => {
                tracing::info!(path = %path.display(), destinations = d.by_authority.len(), "destinations reloaded");
                tx.send_replace(Arc::new(d));
            }
            Err(e) => {
                tracing::warn!(error = %e, "bad destinations edit ignored; keeping the last good version");
            }
        }
        last_text = text;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Destinations, DestinationsError> {
        Destinations::parse(Path::new("d.yaml"), text)
    }

    #[test]
    fn documented_format() {
        let d = parse(
            r#"
destinations:
  "svc.test:8080":
    endpoints:
      - addr: 127.0.0.1:18081
      - addr: 127.0.0.1:18082
        weight: 2
        identity: svc.demo
"#,
        )
        .expect("valid");
        let a: Authority = "svc.test:8080".parse().expect("authority");
        let eps = &d.by_authority[&a].endpoints;
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].weight.get(), 2);
        assert_eq!(eps[0].identity, None);
        assert_eq!(
            eps[1].identity.as_ref().map(|n| n.as_str()),
            Some("svc.demo")
        );
        assert!(!d.by_authority[&a].opaque);
    }

    #[test]
    fn service_addresses_belong_to_one_destination() {
        let d = parse(
            "destinations:\n  \"api.demo:80\":\n    addresses: [\"10.96.0.10:80\"]\n    endpoints: [{addr: \"10.0.0.5:8080\"}]\n",
        )
        .expect("valid");
        let a: Authority = "api.demo:80".parse().expect("authority");
        assert_eq!(
            d.by_authority[&a].addresses,
            vec!["10.96.0.10:80".parse::<SocketAddr>().expect("addr")]
        );
        let e = parse("destinations:\n  \"a:1\":\n    addresses: [\"10.96.0.10\"]\n")
            .expect_err("no port");
        assert!(
            e.to_string()
                .contains("address \"10.96.0.10\" is not an IP:port"),
            "{e}"
        );
        let e = parse(
            "destinations:\n  \"a:1\":\n    addresses: [\"10.96.0.10:80\"]\n  \"b:1\":\n    addresses: [\"10.96.0.10:80\"]\n",
        )
        .expect_err("shared");
        assert!(
            e.to_string().contains("10.96.0.10:80 is listed by both"),
            "{e}"
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = parse("destinations:\n  svc.test:\n    endpoints: []\n").expect_err("no port");
        assert!(e.to_string().contains("must be host:port"), "{e}");
        let e = parse("destinations:\n  \"a:1\":\n    endpoints:\n      - addr: nope\n")
            .expect_err("bad addr");
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let e = parse("destinations:\n  \"a:1\":\n    endpoints:\n      - addr: 1.2.3.4:5\n        weight: 0\n").expect_err("zero");
        assert!(e.to_string().contains("weight 0"), "{e}");
        let e = parse("destinations:\n  \"a:1\":\n    endpoints:\n      - addr: 1.2.3.4:5\n        identity: Web\n").expect_err("bad identity");
        assert!(
            e.to_string().contains("1.2.3.4:5") && e.to_string().contains("\"Web\""),
            "{e}"
        );
        let e = parse("destinatons: {}\n").expect_err("typo");
        assert!(e.to_string().contains("d.yaml"), "{e}");
    }

    #[test]
    fn policy_keys() {
        let d = parse(
            r#"
destinations:
  "api.demo:8080":
    endpoints: [{addr: 127.0.0.1:1}]
    timeout: 2s
    retry:
      attempts: 2
      on: [5xx, connect-error, reset, "grpc:unavailable", "grpc:resource-exhausted", 429]
      budget: {ratio: 0.2}
    hedge: {after: 50ms}
    breaker: {consecutive_failures: 5, min_open: 1s, max_open: 30s}
    routes:
      - name: canary-header
        match: {path_prefix: /, method: get, headers: {X-Canary: "1"}}
        backends: [{destination: "api-v2.demo:8080", weight: 1}]
      - name: split
        match: {path_prefix: /}
        backends:
          - {destination: "api.demo:8080", weight: 90}
          - {destination: "api-v2.demo:8080", weight: 10}
        timeout: 500ms
        hedge: {after: p95}
"#,
        )
        .expect("valid");
        let a: Authority = "api.demo:8080".parse().expect("authority");
        let p = &d.by_authority[&a].policy;
        assert_eq!(p.timeout, Some(Duration::from_secs(2)));
        assert_eq!(p.breaker.consecutive_failures, 5);
        assert_eq!(p.breaker.max_open, Duration::from_secs(30));
        assert_eq!(p.routes.len(), 2);
        let canary = &p.routes[0].matches;
        assert_eq!(canary.method.as_deref(), Some("GET"));
        assert_eq!(
            canary.headers.get("x-canary").map(String::as_str),
            Some("1")
        );
        assert!(canary.matches("GET", "/x", |h| (h == "x-canary").then_some("1")));
        assert!(!canary.matches("GET", "/x", |_| None));
        assert!(!canary.matches("POST", "/x", |_| Some("1")));
        assert_eq!(p.routes[1].timeout, Some(Duration::from_millis(500)));
        let retry = p.retry.as_ref().expect("retry");
        assert_eq!(retry.attempts, 2);
        assert!(retry.on.any_5xx && retry.on.connect_error && retry.on.reset);
        assert_eq!(retry.on.grpc, [14, 8]);
        assert_eq!(retry.on.statuses, [429]);
        assert!(retry.on.status(503, None) && retry.on.status(429, None));
        assert!(!retry.on.status(404, None) && !retry.on.status(200, Some(13)));
        assert!(retry.on.status(200, Some(14)));
        assert_eq!(retry.budget.min_per_second, 10);
        assert_eq!(p.hedge, Some(Hedge::After(Duration::from_millis(50))));
        assert_eq!(p.routes[1].hedge, Some(Hedge::Percentile(0.95)));
        assert_eq!(p.routes[1].backends[0].weight, 90);
        // Defaults: no timeout, the breaker on, no routes.
        let d = parse("destinations:\n  \"b:1\":\n    endpoints: []\n").expect("valid");
        let p = &d.by_authority[&"b:1".parse().expect("authority")].policy;
        assert_eq!(*p, Policy::default());
        assert_eq!(p.breaker.consecutive_failures, 7);
    }

    #[test]
    fn policy_errors_name_the_key() {
        let cases = [
            ("timeout: soon", "destinations.\"a:1\".timeout: \"soon\""),
            (
                "timeout: 0s",
                "destinations.\"a:1\".timeout: must be more than 0",
            ),
            (
                "timeout: 292471208677years",
                "destinations.\"a:1\".timeout: \"292471208677years\" is longer than 1day",
            ),
            (
                "breaker: {min_open: 1s, max_open: 100000h}",
                "destinations.\"a:1\".breaker.max_open: \"100000h\" is longer than 1day",
            ),
            (
                "breaker: {min_open: 5s, max_open: 1s}",
                "destinations.\"a:1\".breaker: needs 0 < min_open <= max_open",
            ),
            (
                "routes: [{name: r, backends: []}]",
                "destinations.\"a:1\".routes[0].backends: a route needs at least one backend",
            ),
            (
                "routes: [{name: r, backends: [{destination: nope}]}]",
                "destinations.\"a:1\".routes[0].backends[0].destination: \"nope\"",
            ),
            (
                "routes: [{name: r, backends: [{destination: \"b:1\", weight: 0}]}]",
                "routes[0].backends[0].weight: must be at least 1",
            ),
            (
                "routes: [{name: r, backends: [{destination: \"b:1\"}]}, {name: r, backends: [{destination: \"b:1\"}]}]",
                "routes[1].name: \"r\" must be non-empty and unique",
            ),
            (
                "routes: [{name: r, match: {path_prefix: api}, backends: [{destination: \"b:1\"}]}]",
                "routes[0].match.path_prefix: \"api\" must start with /",
            ),
            (
                "retry: {attempts: 0}",
                "retry.attempts: 0 must be from 1 to 10",
            ),
            (
                "retry: {attempts: 2, on: [5xx, grpc:unavailible]}",
                "retry.on[1]: \"grpc:unavailible\" is not a gRPC status",
            ),
            (
                "retry: {attempts: 2, on: [teapot]}",
                "retry.on[0]: \"teapot\" is none of",
            ),
            (
                "retry: {attempts: 2, budget: {ratio: 2}}",
                "retry.budget.ratio: 2 must be from 0 to 1",
            ),
        ];
        for (yaml, want) in cases {
            let text = format!("destinations:\n  \"a:1\":\n    {yaml}\n");
            let e = parse(&text).expect_err(yaml).to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        // A key weft does not know is refused, not ignored.
        let e =
            parse("destinations:\n  \"a:1\":\n    hedging: {after: 50ms}\n").expect_err("unknown");
        assert!(e.to_string().contains("hedging"), "{e}");
    }

    #[test]
    fn no_destinations_must_be_said_explicitly() {
        assert!(
            parse("destinations: {}\n")
                .expect("valid")
                .by_authority
                .is_empty()
        );
        for half_written in ["", "\n  \n", "# weft destinations\n"] {
            let e = parse(half_written).expect_err("empty is a bad edit");
            assert!(e.to_string().contains("destinations: {}"), "{e}");
        }
        let e = parse("other: 1\n").expect_err("missing key");
        assert!(e.to_string().contains("destinations"), "{e}");
    }
}
