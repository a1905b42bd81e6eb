//! Configuration from `WEFT_PROXY_*` environment variables. Every variable
//! is parsed before any error is returned, so one start reports every bad
//! value by name; the binary exits with code 64 (EX_USAGE) before binding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

mod workloads;
pub use workloads::WorkloadConfig;

pub const ENV_OUTBOUND_LISTEN: &str = "WEFT_PROXY_OUTBOUND_LISTEN";
pub const ENV_INBOUND_LISTEN: &str = "WEFT_PROXY_INBOUND_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "WEFT_PROXY_ADMIN_LISTEN";
pub const ENV_DESTINATIONS: &str = "WEFT_PROXY_DESTINATIONS";
pub const ENV_INBOUND_FORWARD: &str = "WEFT_PROXY_INBOUND_FORWARD";
pub const ENV_LOG: &str = "WEFT_PROXY_LOG";
pub const ENV_DETECT_TIMEOUT: &str = "WEFT_PROXY_DETECT_TIMEOUT";
pub const ENV_CONNECT_TIMEOUT: &str = "WEFT_PROXY_CONNECT_TIMEOUT";
pub const ENV_SHUTDOWN_GRACE: &str = "WEFT_PROXY_SHUTDOWN_GRACE";
pub const ENV_DNS_REFRESH: &str = "WEFT_PROXY_DNS_REFRESH";
pub const ENV_CORES: &str = "WEFT_PROXY_CORES";
pub const ENV_CONTROL_ADDR: &str = "WEFT_PROXY_CONTROL_ADDR";
pub const ENV_IDENTITY_NAME: &str = "WEFT_PROXY_IDENTITY_NAME";
pub const ENV_IDENTITY_TOKEN_FILE: &str = "WEFT_PROXY_IDENTITY_TOKEN_FILE";
pub const ENV_TRUST_ANCHORS: &str = "WEFT_PROXY_TRUST_ANCHORS";
pub const ENV_CONTROL_NAME: &str = "WEFT_PROXY_CONTROL_NAME";
pub const ENV_REGISTER: &str = "WEFT_PROXY_REGISTER";
pub const ENV_REGISTER_ADDR: &str = "WEFT_PROXY_REGISTER_ADDR";
pub const ENV_ETCD: &str = "WEFT_PROXY_ETCD";
pub const ENV_HEADER_READ_TIMEOUT: &str = "WEFT_PROXY_HEADER_READ_TIMEOUT";
pub const ENV_HTTP2_IDLE_TIMEOUT: &str = "WEFT_PROXY_HTTP2_IDLE_TIMEOUT";
pub const ENV_HTTP2_KEEPALIVE_INTERVAL: &str = "WEFT_PROXY_HTTP2_KEEPALIVE_INTERVAL";
pub const ENV_HTTP2_KEEPALIVE_TIMEOUT: &str = "WEFT_PROXY_HTTP2_KEEPALIVE_TIMEOUT";
pub const ENV_HTTP2_MAX_CONCURRENT_STREAMS: &str = "WEFT_PROXY_HTTP2_MAX_CONCURRENT_STREAMS";
pub const ENV_MAX_HEADER_BYTES: &str = "WEFT_PROXY_MAX_HEADER_BYTES";
pub const ENV_INBOUND_RESPONSE_TIMEOUT: &str = "WEFT_PROXY_INBOUND_RESPONSE_TIMEOUT";
pub const ENV_TCP_IDLE_TIMEOUT: &str = "WEFT_PROXY_TCP_IDLE_TIMEOUT";
pub const ENV_MAX_CONNECTIONS: &str = "WEFT_PROXY_MAX_CONNECTIONS";
pub const ENV_ENDPOINT_MAX_IN_FLIGHT: &str = "WEFT_PROXY_ENDPOINT_MAX_IN_FLIGHT";
pub const ENV_ENDPOINT_QUEUE_TIMEOUT: &str = "WEFT_PROXY_ENDPOINT_QUEUE_TIMEOUT";
pub const ENV_DISCOVERY_IDLE_TIMEOUT: &str = "WEFT_PROXY_DISCOVERY_IDLE_TIMEOUT";
pub const ENV_DNS_TIMEOUT: &str = "WEFT_PROXY_DNS_TIMEOUT";
pub const ENV_INBOUND_AUTHORITIES: &str = "WEFT_PROXY_INBOUND_AUTHORITIES";
pub const ENV_METRICS_MAX_AUTHORITIES: &str = "WEFT_PROXY_METRICS_MAX_AUTHORITIES";
pub const ENV_WORKLOADS: &str = "WEFT_PROXY_WORKLOADS";
pub const ENV_UPGRADE_TIMEOUT: &str = "WEFT_PROXY_UPGRADE_TIMEOUT";
pub const ENV_REUSE_PORT: &str = "WEFT_PROXY_REUSE_PORT";
pub const ENV_ORIG_PROTO: &str = "WEFT_PROXY_ORIG_PROTO";
pub const ENV_TRACE_COLLECTOR: &str = "WEFT_PROXY_TRACE_COLLECTOR";
pub const ENV_TRACE_SAMPLE: &str = "WEFT_PROXY_TRACE_SAMPLE";
pub const ENV_TRACE_SLOW: &str = "WEFT_PROXY_TRACE_SLOW";
pub const ENV_TRACE_QUEUE: &str = "WEFT_PROXY_TRACE_QUEUE";
pub const ENV_INBOUND_SERVER: &str = "WEFT_PROXY_INBOUND_SERVER";
pub const ENV_INBOUND_DEFAULT_POLICY: &str = "WEFT_PROXY_INBOUND_DEFAULT_POLICY";
pub const ENV_RATE_LIMIT_CLIENTS: &str = "WEFT_PROXY_RATE_LIMIT_CLIENTS";

/// The longest the proxy may wait for a silent client before treating the
/// connection as server-speaks-first: beyond this, protocols like SMTP and
/// MySQL would visibly stall.
pub const MAX_DETECT_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub outbound_listen: SocketAddr,
    /// More outbound listeners (`[::1]:4140` beside `127.0.0.1:4140`, for
    /// IPv6 traffic redirected by `weft init`).
    pub outbound_listen_also: Vec<SocketAddr>,
    pub inbound_listen: SocketAddr,
    pub inbound_listen_also: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    /// Static destinations, when no control plane is configured.
    pub destinations: Option<PathBuf>,
    /// Where inbound traffic goes when its original destination is unknown.
    pub inbound_forward: Option<SocketAddr>,
    pub log: String,
    #[serde(with = "humantime_serde_compat")]
    pub detect_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// How long a DNS answer for an unknown authority is reused.
    #[serde(with = "humantime_serde_compat")]
    pub dns_refresh: Duration,
    /// Cores: a thread with its own current-thread runtime each.
    pub cores: usize,
    /// How long a process started by SIGUSR2 has to become ready before
    /// it is stopped and this one keeps serving.
    #[serde(with = "humantime_serde_compat")]
    pub upgrade_timeout: Duration,
    /// Bind the traffic listeners with SO_REUSEPORT, so a second proxy can
    /// share the ports (the rolling alternative to SIGUSR2).
    pub reuse_port: bool,
    /// Carry outbound HTTP/1 requests to meshed proxies over HTTP/2
    /// (`l5d-orig-proto`), multiplexed on one connection per endpoint.
    pub orig_proto: bool,
    /// The control plane: destinations come from it instead of the file,
    /// and certificates, when an identity is configured.
    pub control: Option<ControlConfig>,
    /// This proxy's identity: name and token file together, or neither.
    pub identity: Option<IdentityConfig>,
    /// Per-node mode: the local workloads, each with its own identity.
    pub workloads: Vec<WorkloadConfig>,
    /// Register the local service in etcd under this authority.
    pub register: Option<RegisterConfig>,
    /// What a peer can make the proxy hold, and for how long.
    pub limits: Limits,
    /// Inbound authorities that get metric series of their own (besides the
    /// proxy's identity and registered service); the rest are `other`.
    pub inbound_authorities: Vec<AuthorityPattern>,
    /// Tracing, when a collector is configured.
    pub trace: Option<TraceConfig>,
    /// The server whose inbound policy applies (an entry of the policy's
    /// `servers`); default: this proxy's identity.
    pub inbound_server: Option<String>,
    /// Who may reach a port no policy lists.
    #[serde(serialize_with = "serialize_display")]
    pub inbound_default_policy: weft_authz::DefaultPolicy,
}

/// Where spans go and which are kept.
#[derive(Clone, Debug, Serialize)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector, `host:port`.
    pub collector: String,
    /// Head sampling probability for requests that bring no decision.
    pub sample: f64,
    /// Requests slower than this are always exported.
    #[serde(with = "humantime_serde_compat")]
    pub slow: Duration,
    /// Spans waiting for export at most; more are dropped and counted.
    pub queue: usize,
}

/// Bounds and timeouts on everything a remote peer can make the proxy hold.
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// An HTTP/1 request head must arrive within this (also how long an
    /// idle keep-alive connection is kept); an HTTP/2 connection must start
    /// its first request within this; a client that has sent part of a
    /// request but not enough to detect its protocol waits at most this.
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection with no request in flight for this long is
    /// closed gracefully (GOAWAY).
    #[serde(with = "humantime_serde_compat")]
    pub http2_idle_timeout: Duration,
    /// HTTP/2 PINGs, both sides: how often, and how long an answer may take
    /// before the connection is closed.
    #[serde(with = "humantime_serde_compat")]
    pub http2_keepalive_interval: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub http2_keepalive_timeout: Duration,
    /// Streams an HTTP/2 client may have open on one connection.
    pub http2_max_concurrent_streams: u32,
    /// Request or response header block size (HTTP/2 header list; HTTP/1
    /// read buffer).
    pub max_header_bytes: u32,
    /// Inbound: how long the application may take to send response
    /// headers; gRPC requests are bounded by their own `grpc-timeout`
    /// instead (a stream's headers may legitimately wait for its first
    /// message).
    #[serde(with = "humantime_serde_compat")]
    pub inbound_response_timeout: Duration,
    /// Opaque TCP, CONNECT tunnels and upgraded connections with no bytes
    /// either way for this long are closed.
    #[serde(with = "humantime_serde_compat")]
    pub tcp_idle_timeout: Duration,
    /// Open connections per listener; beyond it new ones are closed at
    /// once (logged and counted).
    pub max_connections: usize,
    /// Requests in flight to one endpoint (HTTP/1 connections or HTTP/2
    /// streams); a request beyond it waits at most the queue timeout for a
    /// slot, then gets 503.
    pub endpoint_max_in_flight: usize,
    #[serde(with = "humantime_serde_compat")]
    pub endpoint_queue_timeout: Duration,
    /// A name nobody has asked for in this long stops being followed (its
    /// control-plane stream closed, its DNS answer forgotten).
    #[serde(with = "humantime_serde_compat")]
    pub discovery_idle_timeout: Duration,
    /// A DNS lookup may take this long; a failed one is remembered for the
    /// DNS refresh period.
    #[serde(with = "humantime_serde_compat")]
    pub dns_timeout: Duration,
    /// Distinct authorities with metric series of their own, per direction;
    /// the rest are counted as `authority="other"`.
    pub metrics_max_authorities: usize,
    /// Clients with a rate-limit bucket of their own, per rate-limited
    /// port; the least recently seen is forgotten beyond it.
    pub rate_limit_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            http2_idle_timeout: Duration::from_secs(300),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
            http2_max_concurrent_streams: 256,
            max_header_bytes: 64 * 1024,
            inbound_response_timeout: Duration::from_secs(60),
            tcp_idle_timeout: Duration::from_secs(3600),
            max_connections: 10_000,
            endpoint_max_in_flight: 1_000,
            endpoint_queue_timeout: Duration::from_millis(500),
            discovery_idle_timeout: Duration::from_secs(600),
            dns_timeout: Duration::from_secs(2),
            metrics_max_authorities: 1_000,
            rate_limit_clients: 10_000,
        }
    }
}

/// An inbound authority allowed its own metric series: `host`, `host:port`
/// or `*.suffix` (any port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AuthorityPattern {
    Exact(String),
    Host(String),
    Suffix(String),
}

impl AuthorityPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(suffix) = s.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains(':') {
                return Err(format!("{s:?}: a wildcard is *.domain, with no port"));
            }
            return Ok(Self::Suffix(format!(".{suffix}")));
        }
        if s.contains(':') {
            let a: weft_detect::Authority = s
                .parse()
                .map_err(|_| format!("{s:?} is not host or host:port"))?;
            return Ok(Self::Exact(a.to_string()));
        }
        if s.is_empty() {
            return Err("empty entry".into());
        }
        Ok(Self::Host(s))
    }

    pub fn matches(&self, authority: &weft_detect::Authority) -> bool {
        match self {
            Self::Exact(a) => authority.to_string() == *a,
            Self::Host(h) => authority.bare_host() == h,
            Self::Suffix(s) => authority.bare_host().ends_with(s.as_str()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RegisterConfig {
    #[serde(serialize_with = "serialize_display")]
    pub service: weft_detect::Authority,
    pub etcd: Vec<String>,
    /// The address peers reach this proxy's inbound side at; by default
    /// the inbound listener's own address.
    pub addr: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdentityConfig {
    #[serde(serialize_with = "serialize_display")]
    pub name: weft_identity::Name,
    /// Read only when the proxy holds no valid certificate (at start, or
    /// after one lapsed): renewals are proved by the certificate itself.
    /// The token never appears in the config dump or the log.
    pub token_file: PathBuf,
}

/// The control channel: TLS 1.3 to `addr`, which must prove `name` with a
/// certificate chaining to `trust_anchors`.
#[derive(Clone, Debug, Serialize)]
pub struct ControlConfig {
    pub addr: String,
    #[serde(serialize_with = "serialize_display")]
    pub name: weft_identity::Name,
    /// Also what peer proxies' certificates must chain to.
    pub trust_anchors: PathBuf,
}

/// One rejected variable: its name, the value given and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}={value:?}: {reason}")]
pub struct InvalidVar {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct ConfigError(pub Vec<InvalidVar>);

impl Config {
    /// The inbound authorities with metric series of their own: the
    /// configured list, plus this proxy's identity name and registered
    /// service. Empty means "no list": every authority, up to the cap.
    pub fn inbound_patterns(&self) -> Vec<AuthorityPattern> {
        let mut patterns = self.inbound_authorities.clone();
        if let Some(id) = &self.identity {
            patterns.push(AuthorityPattern::Host(id.name.as_str().to_string()));
        }
        if let Some(r) = &self.register {
            patterns.push(AuthorityPattern::Exact(r.service.to_string()));
        }
        patterns
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars().collect())
    }

    /// Parses from an explicit map, so tests need not touch the process
    /// environment.
    pub fn from_vars(vars: HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut p = Parser {
            vars,
            errors: Vec::new(),
        };
        let default_addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        let (outbound_listen, outbound_listen_also) = p
            .parse(ENV_OUTBOUND_LISTEN, "127.0.0.1:4140", parse_addrs)
            .unwrap_or((default_addr, Vec::new()));
        let (inbound_listen, inbound_listen_also) = p
            .parse(ENV_INBOUND_LISTEN, "0.0.0.0:4143", parse_addrs)
            .unwrap_or((default_addr, Vec::new()));
        let mut config = Config {
            outbound_listen,
            outbound_listen_also,
            inbound_listen,
            inbound_listen_also,
            admin_listen: p
                .parse(ENV_ADMIN_LISTEN, "127.0.0.1:4191", parse_addr)
                .unwrap_or(default_addr),
            destinations: p.optional(ENV_DESTINATIONS, parse_path),
            inbound_forward: p.optional(ENV_INBOUND_FORWARD, parse_addr),
            log: p
                .parse(ENV_LOG, "info", |s| Ok(s.to_string()))
                .unwrap_or_default(),
            detect_timeout: p
                .parse(ENV_DETECT_TIMEOUT, "200ms", |s| {
                    let d = parse_duration(s)?;
                    if d.is_zero() || d > MAX_DETECT_TIMEOUT {
                        return Err(format!(
                            "must be more than 0 and at most {}",
                            humantime::format_duration(MAX_DETECT_TIMEOUT)
                        ));
                    }
                    Ok(d)
                })
                .unwrap_or(MAX_DETECT_TIMEOUT),
            connect_timeout: p
                .parse(ENV_CONNECT_TIMEOUT, "1s", parse_positive_duration)
                .unwrap_or_default(),
            shutdown_grace: p
                .parse(ENV_SHUTDOWN_GRACE, "30s", parse_duration)
                .unwrap_or_default(),
            dns_refresh: p
                .parse(ENV_DNS_REFRESH, "5s", parse_positive_duration)
                .unwrap_or_default(),
            cores: p
                .parse(ENV_CORES, &default_cores().to_string(), |s| {
                    match s.parse::<usize>() {
                        Ok(n) if (1..=512).contains(&n) => Ok(n),
                        _ => Err("must be a whole number from 1 to 512".into()),
                    }
                })
                .unwrap_or(1),
            upgrade_timeout: p
                .parse(ENV_UPGRADE_TIMEOUT, "30s", parse_positive_duration)
                .unwrap_or_default(),
            reuse_port: p
                .parse(ENV_REUSE_PORT, "false", parse_bool)
                .unwrap_or_default(),
            orig_proto: p
                .parse(ENV_ORIG_PROTO, "true", parse_bool)
                .unwrap_or_default(),
            control: None,
            identity: None,
            workloads: Vec::new(),
            register: None,
            limits: Limits::default(),
            inbound_authorities: Vec::new(),
            trace: None,
            inbound_server: p.optional(ENV_INBOUND_SERVER, |s| {
                s.parse::<weft_identity::Name>()
                    .map(|n| n.as_str().to_string())
                    .map_err(|e| e.reason.to_string())
            }),
            inbound_default_policy: p
                .parse(ENV_INBOUND_DEFAULT_POLICY, "allow-all", |s| s.parse())
                .unwrap_or_default(),
        };
        config.limits = p.limits();
        config.trace = p.trace();
        config.inbound_authorities = p
            .optional(ENV_INBOUND_AUTHORITIES, |s| {
                s.split(',')
                    .filter(|e| !e.trim().is_empty())
                    .map(AuthorityPattern::parse)
                    .collect()
            })
            .unwrap_or_default();
        let service = p.optional(ENV_REGISTER, |s| {
            s.parse::<weft_detect::Authority>()
                .map_err(|_| "must be name:port, such as api.demo:8080".to_string())
        });
        let etcd = p.optional(ENV_ETCD, |s| {
            let urls: Vec<String> = s
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
            if urls
                .iter()
                .all(|u| u.starts_with("http://") || u.starts_with("https://"))
            {
                Ok(urls)
            } else {
                Err("must be comma-separated http:// URLs".into())
            }
        });
        let register_addr = p.optional(ENV_REGISTER_ADDR, parse_addr);
        match (service, etcd) {
            (Some(service), Some(etcd)) => {
                config.register = Some(RegisterConfig {
                    service,
                    etcd,
                    addr: register_addr,
                });
            }
            (Some(_), None) if !p.vars.contains_key(ENV_ETCD) => p.errors.push(InvalidVar {
                name: ENV_REGISTER,
                value: p.vars.get(ENV_REGISTER).cloned().unwrap_or_default(),
                reason: format!("registering needs {ENV_ETCD}"),
            }),
            _ => {}
        }
        config.control = p.control();
        config.identity = p.identity(config.control.is_some());
        let p_upgrading = p.vars.contains_key(crate::upgrade::ENV_UPGRADE_FROM);
        config.workloads = p
            .optional(ENV_WORKLOADS, |s| {
                workloads::load(std::path::Path::new(s), p_upgrading)
            })
            .unwrap_or_default();
        if !config.workloads.is_empty() {
            let value = p.vars.get(ENV_WORKLOADS).cloned().unwrap_or_default();
            if !p.vars.contains_key(ENV_CONTROL_ADDR) {
                p.errors.push(InvalidVar {
                    name: ENV_WORKLOADS,
                    value: value.clone(),
                    reason: format!(
                        "workloads are certified by the control plane: set {ENV_CONTROL_ADDR}"
                    ),
                });
            }
            if p.vars.contains_key(ENV_IDENTITY_NAME) {
                p.errors.push(InvalidVar {
                    name: ENV_WORKLOADS,
                    value,
                    reason: format!("set either {ENV_WORKLOADS} (per-node mode) or {ENV_IDENTITY_NAME}, not both"),
                });
            }
        }
        if p.vars.contains_key(ENV_CONTROL_ADDR) && config.destinations.is_some() {
            p.errors.push(InvalidVar {
                name: ENV_DESTINATIONS,
                value: config
                    .destinations
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                reason: format!("set either {ENV_DESTINATIONS} or {ENV_CONTROL_ADDR}, not both"),
            });
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log) {
            p.errors.push(InvalidVar {
                name: ENV_LOG,
                value: config.log.clone(),
                reason: format!("not a tracing filter: {e}"),
            });
        }
        if p.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(p.errors))
        }
    }
}

struct Parser {
    vars: HashMap<String, String>,
    errors: Vec<InvalidVar>,
}

impl Parser {
    fn limits(&mut self) -> Limits {
        let d = Limits::default();
        let dur = |v: Duration| humantime::format_duration(v).to_string();
        let duration = |p: &mut Self, name, default: Duration| {
            p.parse(name, &dur(default), parse_positive_duration)
                .unwrap_or(default)
        };
        let header_read_timeout = duration(self, ENV_HEADER_READ_TIMEOUT, d.header_read_timeout);
        let http2_idle_timeout = duration(self, ENV_HTTP2_IDLE_TIMEOUT, d.http2_idle_timeout);
        let http2_keepalive_interval = duration(
            self,
            ENV_HTTP2_KEEPALIVE_INTERVAL,
            d.http2_keepalive_interval,
        );
        let http2_keepalive_timeout =
            duration(self, ENV_HTTP2_KEEPALIVE_TIMEOUT, d.http2_keepalive_timeout);
        let inbound_response_timeout = duration(
            self,
            ENV_INBOUND_RESPONSE_TIMEOUT,
            d.inbound_response_timeout,
        );
        let tcp_idle_timeout = duration(self, ENV_TCP_IDLE_TIMEOUT, d.tcp_idle_timeout);
        let endpoint_queue_timeout =
            duration(self, ENV_ENDPOINT_QUEUE_TIMEOUT, d.endpoint_queue_timeout);
        let discovery_idle_timeout =
            duration(self, ENV_DISCOVERY_IDLE_TIMEOUT, d.discovery_idle_timeout);
        let dns_timeout = duration(self, ENV_DNS_TIMEOUT, d.dns_timeout);
        let count = |p: &mut Self, name, default: usize, min: usize, max: usize| {
            p.parse(name, &default.to_string(), |s| match s.parse::<usize>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(format!("must be a whole number from {min} to {max}")),
            })
            .unwrap_or(default)
        };
        let http2_max_concurrent_streams = count(
            self,
            ENV_HTTP2_MAX_CONCURRENT_STREAMS,
            d.http2_max_concurrent_streams as usize,
            1,
            100_000,
        ) as u32;
        let max_header_bytes = count(
            self,
            ENV_MAX_HEADER_BYTES,
            d.max_header_bytes as usize,
            8 * 1024,
            16 * 1024 * 1024,
        ) as u32;
        let max_connections = count(self, ENV_MAX_CONNECTIONS, d.max_connections, 1, 10_000_000);
        let endpoint_max_in_flight = count(
            self,
            ENV_ENDPOINT_MAX_IN_FLIGHT,
            d.endpoint_max_in_flight,
            1,
            10_000_000,
        );
        let metrics_max_authorities = count(
            self,
            ENV_METRICS_MAX_AUTHORITIES,
            d.metrics_max_authorities,
            1,
            1_000_000,
        );
        let rate_limit_clients = count(
            self,
            ENV_RATE_LIMIT_CLIENTS,
            d.rate_limit_clients,
            1,
            10_000_000,
        );
        Limits {
            rate_limit_clients,
            header_read_timeout,
            http2_idle_timeout,
            http2_keepalive_interval,
            http2_keepalive_timeout,
            http2_max_concurrent_streams,
            max_header_bytes,
            inbound_response_timeout,
            tcp_idle_timeout,
            max_connections,
            endpoint_max_in_flight,
            endpoint_queue_timeout,
            discovery_idle_timeout,
            dns_timeout,
            metrics_max_authorities,
        }
    }

    /// Tracing: all four variables are read only with a collector.
    fn trace(&mut self) -> Option<TraceConfig> {
        let collector = self.optional(ENV_TRACE_COLLECTOR, |s| {
            s.parse::<weft_detect::Authority>()
                .map(|a| a.to_string())
                .map_err(|_| "must be host:port, such as 127.0.0.1:4317".to_string())
        });
        let sample = self
            .parse(ENV_TRACE_SAMPLE, "0.01", |s| match s.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
                _ => Err("must be a probability from 0 to 1, such as 0.01".to_string()),
            })
            .unwrap_or(0.01);
        let slow = self
            .parse(ENV_TRACE_SLOW, "1s", parse_positive_duration)
            .unwrap_or(Duration::from_secs(1));
        let queue = self
            .parse(ENV_TRACE_QUEUE, "2048", |s| match s.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
                _ => Err("must be a whole number from 1 to 1000000".to_string()),
            })
            .unwrap_or(2048);
        Some(TraceConfig {
            collector: collector?,
            sample,
            slow,
            queue,
        })
    }

    /// The control plane's address, the name it must prove and the trust
    /// anchors that prove it: an address needs the anchors.
    fn control(&mut self) -> Option<ControlConfig> {
        let addr = self.optional(ENV_CONTROL_ADDR, |s| {
            s.parse::<weft_detect::Authority>()
                .map(|a| a.to_string())
                .map_err(|_| "must be host:port, such as 127.0.0.1:8086".to_string())
        });
        let name = self.parse(ENV_CONTROL_NAME, weft_channel::DEFAULT_NAME, |s| {
            s.parse::<weft_identity::Name>()
                .map_err(|e| e.reason.to_string())
        });
        let trust_anchors = self.optional(ENV_TRUST_ANCHORS, |s| {
            weft_identity::read_pem_certs(std::path::Path::new(s))
                .map(|_| PathBuf::from(s))
                .map_err(|e| e.to_string())
        });
        let given = |v: &str| self.vars.get(v).is_some_and(|s| !s.is_empty());
        match (given(ENV_CONTROL_ADDR), given(ENV_TRUST_ANCHORS)) {
            (true, false) => {
                self.errors.push(InvalidVar {
                    name: ENV_CONTROL_ADDR,
                    value: self.vars.get(ENV_CONTROL_ADDR).cloned().unwrap_or_default(),
                    reason: format!(
                        "the control channel is TLS: set {ENV_TRUST_ANCHORS} to the mesh's trust anchors (ca.crt from `weft identity init`) so the control plane can be verified"
                    ),
                });
                None
            }
            (false, true) => {
                self.errors.push(InvalidVar {
                    name: ENV_TRUST_ANCHORS,
                    value: self.vars.get(ENV_TRUST_ANCHORS).cloned().unwrap_or_default(),
                    reason: format!(
                        "trust anchors verify the control plane and peers' certificates: set {ENV_CONTROL_ADDR} too"
                    ),
                });
                None
            }
            _ => Some(ControlConfig {
                addr: addr?,
                name: name?,
                trust_anchors: trust_anchors?,
            }),
        }
    }

    /// The identity variables go together, and need a control plane to
    /// certify against.
    fn identity(&mut self, has_control: bool) -> Option<IdentityConfig> {
        let name = self.optional(ENV_IDENTITY_NAME, |s| {
            s.parse::<weft_identity::Name>()
                .map_err(|e| e.reason.to_string())
        });
        // Taking over from a process (SIGUSR2), the certificate comes with
        // the sockets: the token file may be long gone.
        let upgrading = self.vars.contains_key(crate::upgrade::ENV_UPGRADE_FROM);
        let token_file = self.optional(ENV_IDENTITY_TOKEN_FILE, |s| {
            if upgrading {
                return Ok(PathBuf::from(s));
            }
            std::fs::read_to_string(s)
                .map_err(|e| format!("cannot read the token: {e}"))
                .and_then(|t| {
                    if t.trim().is_empty() {
                        Err("the token file is empty".into())
                    } else {
                        Ok(PathBuf::from(s))
                    }
                })
        });
        let all = [ENV_IDENTITY_NAME, ENV_IDENTITY_TOKEN_FILE];
        let set = all
            .into_iter()
            .filter(|v| self.vars.get(*v).is_some_and(|s| !s.is_empty()))
            .collect::<Vec<_>>();
        if set.is_empty() {
            return None;
        }
        if set.len() < all.len() {
            let missing: Vec<_> = all.into_iter().filter(|v| !set.contains(v)).collect();
            self.errors.push(InvalidVar {
                name: set[0],
                value: self.vars.get(set[0]).cloned().unwrap_or_default(),
                reason: format!("identity also needs {}", missing.join(" and ")),
            });
            return None;
        }
        if !has_control {
            if !self.vars.contains_key(ENV_CONTROL_ADDR) {
                self.errors.push(InvalidVar {
                    name: ENV_IDENTITY_NAME,
                    value: self
                        .vars
                        .get(ENV_IDENTITY_NAME)
                        .cloned()
                        .unwrap_or_default(),
                    reason: format!(
                        "identity needs {ENV_CONTROL_ADDR} and {ENV_TRUST_ANCHORS}: the control plane certifies it"
                    ),
                });
            }
            return None;
        }
        Some(IdentityConfig {
            name: name?,
            token_file: token_file?,
        })
    }

    fn parse<T>(
        &mut self,
        name: &'static str,
        default: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self
            .vars
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_string());
        self.check(name, value, f)
    }

    fn optional<T>(
        &mut self,
        name: &'static str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.vars.get(name).cloned()?;
        if value.is_empty() {
            return None;
        }
        self.check(name, value, f)
    }

    fn check<T>(
        &mut self,
        name: &'static str,
        value: String,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        match f(value.trim()) {
            Ok(v) => Some(v),
            Err(reason) => {
                self.errors.push(InvalidVar {
                    name,
                    value,
                    reason,
                });
                None
            }
        }
    }
}

/// One core by default, as a sidecar should: it shares its host with the
/// application it serves.
fn default_cores() -> usize {
    1
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("not an IP:port socket address ({e})"))
}

/// One listening address or several, comma-separated (at most 4; say
/// `127.0.0.1:4140,[::1]:4140` for both address families).
fn parse_addrs(s: &str) -> Result<(SocketAddr, Vec<SocketAddr>), String> {
    let addrs = s
        .split(',')
        .map(|a| parse_addr(a.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut unique = addrs.clone();
    unique.sort();
    unique.dedup();
    match addrs.split_first() {
        None => Err("must name an address".into()),
        Some(_) if addrs.len() > 4 => Err("at most 4 addresses".into()),
        Some(_) if unique.len() < addrs.len() => Err("an address is listed twice".into()),
        Some((first, rest)) => Ok((*first, rest.to_vec())),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// No setting is meant to be longer than a day (`MAX_DURATION`), and a
/// far longer one would overflow the deadline arithmetic built on it.
fn parse_duration(s: &str) -> Result<Duration, String> {
    weft_destinations::parse_duration(s)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

fn serialize_display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Durations in the config dump read as humans write them ("30s").
mod humantime_serde_compat {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_vars(HashMap::new()).expect("defaults are valid");
        assert_eq!(c.outbound_listen.to_string(), "127.0.0.1:4140");
        assert_eq!(c.inbound_listen.to_string(), "0.0.0.0:4143");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:4191");
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert!(c.detect_timeout <= MAX_DETECT_TIMEOUT);
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.inbound_response_timeout, Duration::from_secs(60));
    }

    #[test]
    fn limits_and_allow_lists_are_parsed_and_named() {
        let c = Config::from_vars(vars(&[
            (ENV_HTTP2_IDLE_TIMEOUT, "2s"),
            (ENV_MAX_CONNECTIONS, "500"),
            (
                ENV_INBOUND_AUTHORITIES,
                "api.demo:8080, web.demo ,*.batch.demo",
            ),
        ]))
        .expect("valid");
        assert_eq!(c.limits.http2_idle_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.max_connections, 500);
        let a = |s: &str| s.parse::<weft_detect::Authority>().expect("authority");
        let allowed = |s: &str| c.inbound_authorities.iter().any(|p| p.matches(&a(s)));
        assert!(allowed("api.demo:8080") && !allowed("api.demo:9090"));
        assert!(allowed("web.demo:1") && allowed("x.batch.demo:80"));
        assert!(!allowed("batch.demo:80") && !allowed("evil.demo:80"));

        let err = Config::from_vars(vars(&[
            (ENV_MAX_CONNECTIONS, "0"),
            (ENV_TCP_IDLE_TIMEOUT, "0s"),
            (ENV_INBOUND_AUTHORITIES, "*.x:80"),
        ]))
        .expect_err("invalid");
        let text = err.to_string();
        for name in [
            ENV_MAX_CONNECTIONS,
            ENV_TCP_IDLE_TIMEOUT,
            ENV_INBOUND_AUTHORITIES,
        ] {
            assert!(text.contains(name), "{text}");
        }
    }

    #[test]
    fn a_listener_per_address_family() {
        let c = Config::from_vars(vars(&[(ENV_OUTBOUND_LISTEN, "127.0.0.1:4140, [::1]:4140")]))
            .expect("valid");
        assert_eq!(c.outbound_listen.to_string(), "127.0.0.1:4140");
        assert_eq!(
            c.outbound_listen_also,
            ["[::1]:4140".parse().expect("addr")]
        );
        for (bad, why) in [
            ("127.0.0.1:4140,127.0.0.1:4140", "listed twice"),
            ("127.0.0.1:4140,", "not an IP:port"),
            ("[::1]:1,[::1]:2,[::1]:3,[::1]:4,[::1]:5", "at most 4"),
        ] {
            let err = Config::from_vars(vars(&[(ENV_INBOUND_LISTEN, bad)])).expect_err(bad);
            let text = err.to_string();
            assert!(
                text.contains(ENV_INBOUND_LISTEN) && text.contains(why),
                "{text}"
            );
        }
    }

    #[test]
    fn every_bad_value_is_named() {
        let err = Config::from_vars(vars(&[
            (ENV_OUTBOUND_LISTEN, "nowhere"),
            (ENV_SHUTDOWN_GRACE, "soon"),
            (ENV_DETECT_TIMEOUT, "10s"),
            (ENV_LOG, "[[["),
            (ENV_HEADER_READ_TIMEOUT, "292471208677years"),
        ]))
        .expect_err("invalid");
        let names: Vec<_> = err.0.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                ENV_OUTBOUND_LISTEN,
                ENV_DETECT_TIMEOUT,
                ENV_SHUTDOWN_GRACE,
                ENV_HEADER_READ_TIMEOUT,
                ENV_LOG
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("WEFT_PROXY_OUTBOUND_LISTEN=\"nowhere\""),
            "{text}"
        );
        assert!(text.contains("longer than 1day"), "{text}");
    }

    #[test]
    fn identity_is_all_or_nothing_and_needs_a_control_plane() {
        let err = Config::from_vars(vars(&[(ENV_IDENTITY_NAME, "web.demo")])).expect_err("partial");
        let text = err.to_string();
        assert!(text.contains(ENV_IDENTITY_TOKEN_FILE), "{text}");

        let err = Config::from_vars(vars(&[
            (ENV_IDENTITY_NAME, "Web"),
            (ENV_IDENTITY_TOKEN_FILE, "/nonexistent/token"),
            (ENV_TRUST_ANCHORS, "/nonexistent/ca.crt"),
            (ENV_CONTROL_ADDR, "127.0.0.1:8086"),
            (ENV_CONTROL_NAME, "-bad-"),
        ]))
        .expect_err("bad values");
        let names: Vec<_> = err.0.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                ENV_CONTROL_NAME,
                ENV_TRUST_ANCHORS,
                ENV_IDENTITY_NAME,
                ENV_IDENTITY_TOKEN_FILE,
            ]
        );

        // The control channel is TLS: an address without anchors to verify
        // it is refused, and says what to set.
        let err = Config::from_vars(vars(&[(ENV_CONTROL_ADDR, "127.0.0.1:8086")]))
            .expect_err("no anchors");
        assert!(err.to_string().contains(ENV_TRUST_ANCHORS), "{err}");

        let err = Config::from_vars(vars(&[
            (ENV_CONTROL_ADDR, "127.0.0.1:8086"),
            (ENV_DESTINATIONS, "/etc/weft/destinations.yaml"),
        ]))
        .expect_err("both sources");
        assert!(err.to_string().contains("not both"), "{err}");
    }
}
