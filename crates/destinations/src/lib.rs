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
use weft_detect::Authority;
use weft_identity::Name;

/// How often the file is checked. Changes must apply within 1 s.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// A changed file is read again after this long and applied only if it
/// reads the same: a writer still in the middle of rewriting it in place
/// (an editor, a config tool) is not caught half-way.
const SETTLE: Duration = Duration::from_millis(50);

/// The endpoints of every statically known authority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destinations {
    pub by_authority: HashMap<Authority, Destination>,
}

/// One service: its endpoints and how to talk to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    pub endpoints: Vec<EndpointSpec>,
    /// Connections are relayed as bytes, never parsed as HTTP.
    pub opaque: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: NonZeroU32,
    /// The identity the endpoint's proxy proves with its certificate. When
    /// set, clients open mutual TLS to it and require exactly this name.
    pub identity: Option<Name>,
}

#[derive(Debug, thiserror::Error)]
pub enum DestinationsError {
    #[error("cannot read destinations file {path}: {source}")]
    Read {
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationModel {
    #[serde(default)]
    endpoints: Vec<EndpointModel>,
    #[serde(default)]
    opaque: bool,
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
                    identity,
                });
            }
            let destination = Destination {
                endpoints,
                opaque: dest.opaque,
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
        Ok(Self { by_authority })
    }
}

/// Loads the file once (failing if it is bad: a proxy must not start on a
/// config it cannot read) and then follows it. The file is small, so each
/// poll simply re-reads it: no mtime-granularity blind spots.
pub fn watch(path: PathBuf) -> Result<watch::Receiver<Arc<Destinations>>, DestinationsError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| DestinationsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut last_text = read(&path)?;
    let first = Destinations::parse(&path, &last_text)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreadable = false;
        loop {
            interval.tick().await;
            if tx.is_closed() {
                return;
            }
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    if !unreadable {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read destinations; keeping the last good version");
                        unreadable = true;
                    }
                    continue;
                }
            };
            unreadable = false;
            if text == last_text {
                continue;
            }
            tokio::time::sleep(SETTLE).await;
            match tokio::fs::read_to_string(&path).await {
                Ok(again) if again == text => {}
                // Still changing: look again at the next tick.
                _ => continue,
            }
            match Destinations::parse(&path, &text) {
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
    });
    Ok(rx)
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
