//! Flags, each with a `WEFT_CONTROL_*` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// weft-control: discovery and identity for weft proxies, over the Linkerd
/// proxy API (Destination and Identity).
#[derive(Clone, Debug, clap::Parser)]
#[command(version, about)]
pub struct Config {
    /// gRPC listener for the Destination and Identity APIs (TLS 1.3 only).
    #[arg(long, env = "WEFT_CONTROL_LISTEN", default_value = "127.0.0.1:8086")]
    pub listen: SocketAddr,

    /// The identity weft-control's own certificate names (issued from the
    /// issuer at start and renewed); proxies expect it as
    /// WEFT_PROXY_CONTROL_NAME.
    #[arg(long, env = "WEFT_CONTROL_NAME", default_value = weft_channel::DEFAULT_NAME)]
    pub name: weft_identity::Name,

    /// Most connections held open on the gRPC listener; more are closed at
    /// once (and logged).
    #[arg(long, env = "WEFT_CONTROL_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most names one client (an identity, or an address for clients
    /// without a certificate) may follow at once, over all its connections;
    /// more streams are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "WEFT_CONTROL_MAX_NAMES_PER_CLIENT", default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_names_per_client: u32,

    /// Most names every client without a certificate may follow at once,
    /// together (from however many addresses): what anyone who reaches the
    /// port can make the control plane follow, and look up in DNS.
    #[arg(long, env = "WEFT_CONTROL_MAX_NAMES_UNCERTIFIED", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_names_uncertified: u32,

    /// Admin listener: /ready, /live, /metrics.
    #[arg(
        long,
        env = "WEFT_CONTROL_ADMIN_LISTEN",
        default_value = "127.0.0.1:9990"
    )]
    pub admin_listen: SocketAddr,

    /// YAML destinations file (the proxy's format, plus per-endpoint
    /// `identity`), followed for changes. The first discovery backend asked.
    #[arg(long, env = "WEFT_CONTROL_DESTINATIONS")]
    pub destinations: Option<PathBuf>,

    /// Who may reach a workload's port that no `servers:` entry of the
    /// destinations file lists: deny, allow-authenticated or allow-all.
    #[arg(
        long,
        env = "WEFT_CONTROL_DEFAULT_INBOUND_POLICY",
        default_value = "allow-all"
    )]
    pub default_inbound_policy: weft_authz::DefaultPolicy,

    /// etcd v3 endpoints (comma-separated URLs), followed for instances
    /// registered under the prefix. Asked after the destinations file.
    #[arg(long, env = "WEFT_CONTROL_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// The etcd key prefix (see weft-registry for the layout).
    #[arg(long, env = "WEFT_CONTROL_ETCD_PREFIX", default_value = weft_registry::DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    /// Follow a Kubernetes cluster's Services and EndpointSlices (in-cluster
    /// configuration, else KUBECONFIG or --kubeconfig). Asked after the
    /// destinations file and before etcd and DNS.
    #[arg(long, env = "WEFT_CONTROL_KUBERNETES")]
    pub kubernetes: bool,

    /// The kubeconfig file to reach the cluster with (implies --kubernetes).
    #[arg(long, env = "WEFT_CONTROL_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The cluster's DNS domain: Services answer as
    /// `<svc>.<ns>.svc.<cluster domain>:<port>`.
    #[arg(
        long,
        env = "WEFT_CONTROL_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,

    /// The mesh's trust domain (`weft identity init --trust-domain`): a
    /// meshed pod's identity is
    /// `<serviceaccount>.<namespace>.serviceaccount.identity.<trust domain>`.
    #[arg(long, env = "WEFT_CONTROL_TRUST_DOMAIN", default_value = "weft.local")]
    pub trust_domain: String,

    /// The order backends are asked in (those enabled): a name the first
    /// knows is its, unless --discovery-overlap merge.
    #[arg(
        long,
        env = "WEFT_CONTROL_DISCOVERY_ORDER",
        value_delimiter = ',',
        default_value = "file,kubernetes,etcd,dns",
        value_parser = parse_backend
    )]
    pub discovery_order: Vec<String>,

    /// A name several backends know: `shadow` (the first answers alone) or
    /// `merge` (every one's endpoints: a Kubernetes Service and the hosts
    /// registered in etcd under the same name as one service).
    #[arg(long, env = "WEFT_CONTROL_DISCOVERY_OVERLAP", default_value = "shadow")]
    pub discovery_overlap: Overlap,

    /// Serve the pod injection webhook (`POST /inject`, HTTPS) here, e.g.
    /// 0.0.0.0:8443; needs --webhook-cert and --webhook-key.
    #[arg(long, env = "WEFT_CONTROL_WEBHOOK_LISTEN", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_listen: Option<SocketAddr>,

    /// The webhook's certificate chain (PEM), for the name the cluster
    /// calls it by (the MutatingWebhookConfiguration's caBundle signs it).
    #[arg(long, env = "WEFT_CONTROL_WEBHOOK_CERT", value_name = "FILE")]
    pub webhook_cert: Option<PathBuf>,

    /// The webhook certificate's private key (PEM).
    #[arg(long, env = "WEFT_CONTROL_WEBHOOK_KEY", value_name = "FILE")]
    pub webhook_key: Option<PathBuf>,

    /// The images injected pods run: `<registry>/weft-proxy:<version>` and
    /// `<registry>/weft:<version>`.
    #[arg(
        long,
        env = "WEFT_CONTROL_INJECT_REGISTRY",
        default_value = "ghcr.io/weft"
    )]
    pub inject_registry: String,

    #[arg(long, env = "WEFT_CONTROL_INJECT_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pub inject_version: String,

    /// The namespace the control plane runs in (where injected proxies
    /// find it).
    #[arg(long, env = "WEFT_CONTROL_NAMESPACE", default_value = "weft")]
    pub namespace: String,

    /// Answer names no other backend knows from DNS (A/AAAA; SRV for names
    /// starting with `_`).
    #[arg(long, env = "WEFT_CONTROL_DNS", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns: bool,

    /// The DNS server to ask instead of the system's (resolv.conf).
    #[arg(long, env = "WEFT_CONTROL_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// How often followed names are looked up again.
    #[arg(long, env = "WEFT_CONTROL_DNS_REFRESH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dns_refresh: Duration,

    /// Directory made by `weft identity init`: ca.crt, issuer.crt,
    /// issuer.key and token.key (never the trust anchor's key).
    #[arg(long, env = "WEFT_CONTROL_IDENTITY_DIR")]
    pub identity_dir: PathBuf,

    /// Where used single-use tokens are remembered until they expire
    /// [default: spent-tokens in the identity directory].
    #[arg(long, env = "WEFT_CONTROL_SPENT_TOKENS", value_name = "FILE")]
    pub spent_tokens: Option<PathBuf>,

    /// Lifetime of the certificates the Identity API signs.
    #[arg(long, env = "WEFT_CONTROL_LEAF_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub leaf_lifetime: Duration,

    /// tracing filter.
    #[arg(long, env = "WEFT_CONTROL_LOG", default_value = "info")]
    pub log: String,
}

/// What a name several backends know means (see `discovery::Overlap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Overlap {
    Shadow,
    Merge,
}

impl From<Overlap> for crate::discovery::Overlap {
    fn from(o: Overlap) -> Self {
        match o {
            Overlap::Shadow => Self::Shadow,
            Overlap::Merge => Self::Merge,
        }
    }
}

fn parse_backend(s: &str) -> Result<String, String> {
    match s.trim() {
        b @ ("file" | "kubernetes" | "etcd" | "dns") => Ok(b.to_string()),
        other => Err(format!(
            "{other:?} is not a discovery backend (file, kubernetes, etcd, dns)"
        )),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 24h, 90m)"))?;
    if d < Duration::from_secs(60) {
        return Err("must be at least 1m: proxies renew at 70 % of it".into());
    }
    Ok(d)
}
