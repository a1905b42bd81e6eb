//! `weft check`: is the mesh healthy, and if not, what to do about it.
//!
//! Checks the control plane (reachable, ready), the identity it signs with
//! (trust anchor and issuer valid, far enough from expiry, the issuer
//! chaining to an anchor) and every proxy in the targets file (ready,
//! certified, clock close enough to this machine's that certificates mean
//! the same thing to both). With `--kubernetes`, checks a cluster instead
//! (see [`kubernetes`]).

mod kubernetes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use weft_identity::{CertInfo, verify_signed_by};

use crate::fetch;
use crate::source::Output;
use crate::targets::{self, Target};

const ANCHOR_WARN: Duration = Duration::from_secs(30 * 24 * 3600);
const ISSUER_WARN: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_SKEW: Duration = Duration::from_secs(20);

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The proxies to check: a Prometheus file_sd JSON file of admin
    /// addresses; a group labelled role=control names the control plane's
    /// admin address (and its gRPC address in label `grpc`) [default: the
    /// file `weft demo` writes]
    #[arg(long, env = "WEFT_TARGETS", value_name = "FILE")]
    targets: Option<PathBuf>,
    /// The control plane's gRPC address [default: from the targets file,
    /// else 127.0.0.1:8086]
    #[arg(long, env = "WEFT_CONTROL_ADDR")]
    control: Option<String>,
    /// The control plane's admin address [default: from the targets file,
    /// else 127.0.0.1:9990]
    #[arg(long, env = "WEFT_CONTROL_ADMIN")]
    control_admin: Option<String>,
    #[command(flatten)]
    tls: crate::control::TlsArgs,
    /// Check weft on a Kubernetes cluster (API, weft-control's RBAC, the
    /// webhook and its certificate, the control-plane pods, trust anchors)
    /// instead of the proxies in a targets file.
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: before installing, check that the cluster and
    /// this user can take `weft install`'s output.
    #[arg(long, requires = "kubernetes")]
    pre: bool,
    /// With --kubernetes: the cluster's kubeconfig [default: KUBECONFIG,
    /// else ~/.kube/config, else in-cluster]
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the namespace weft is installed in.
    #[arg(long, default_value = "weft", requires = "kubernetes")]
    namespace: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, serde::Serialize)]
struct Check {
    section: &'static str,
    name: String,
    status: Status,
    detail: String,
    /// What to do, for a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn push(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        result: Result<String, (Status, String, String)>,
    ) {
        let (status, detail, hint) = match result {
            Ok(detail) => (Status::Ok, detail, None),
            Err((status, detail, hint)) => (status, detail, Some(hint)),
        };
        self.0.push(Check {
            section,
            name: name.into(),
            status,
            detail,
            hint,
        });
    }
}

fn fail(
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Result<String, (Status, String, String)> {
    Err((Status::Fail, detail.into(), hint.into()))
}

fn warn(
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Result<String, (Status, String, String)> {
    Err((Status::Warn, detail.into(), hint.into()))
}

fn days(d: Duration) -> String {
    let days = d.as_secs_f64() / 86400.0;
    if days >= 2.0 {
        format!("{days:.0} days")
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

fn when(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Where the control plane is: flags, else the targets file, else the
/// defaults weft-control listens on.
fn control_addrs(args: &Args, listed: &[Target]) -> (String, String) {
    let (grpc, admin) = targets::control_of(listed);
    (
        args.control
            .clone()
            .or(grpc)
            .unwrap_or_else(|| targets::DEFAULT_CONTROL.into()),
        args.control_admin
            .clone()
            .or(admin)
            .unwrap_or_else(|| targets::DEFAULT_CONTROL_ADMIN.into()),
    )
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = Report::default();
    if args.kubernetes {
        kubernetes::run(
            &mut report,
            kubernetes::Options {
                kubeconfig: args.kubeconfig.as_deref(),
                namespace: &args.namespace,
                pre: args.pre,
            },
        )
        .await;
    } else {
        mesh(&args, &mut report).await;
    }
    conclude(&report, args.output)
}

/// `weft check`'s results for the mesh in `targets` (the default file when
/// `None`), as the JSON `-o json` prints: for the dashboard.
pub(crate) async fn collect(targets: Option<PathBuf>) -> serde_json::Value {
    let Ok(control_name) = weft_channel::DEFAULT_NAME.parse() else {
        return serde_json::json!([]);
    };
    let args = Args {
        targets,
        control: None,
        control_admin: None,
        tls: crate::control::TlsArgs {
            trust_anchors: None,
            control_name,
        },
        kubernetes: false,
        pre: false,
        kubeconfig: None,
        namespace: "weft".into(),
        output: Output::Json,
    };
    let mut report = Report::default();
    mesh(&args, &mut report).await;
    serde_json::to_value(&report.0).unwrap_or_default()
}

/// The control plane, its identity and the proxies in the targets file.
async fn mesh(args: &Args, report: &mut Report) {
    let path = args.targets.clone().unwrap_or_else(targets::default_path);
    let loaded = targets::load(&path);
    let listed = loaded.as_ref().map_or(&[][..], Vec::as_slice);
    let (grpc, admin) = control_addrs(args, listed);
    let anchors = args.tls.anchors(listed);
    let control_up = control(
        report,
        &grpc,
        &admin,
        anchors.as_deref(),
        &args.tls.control_name,
    )
    .await;
    if control_up {
        identity(report, &admin).await;
        if let Some(anchors) = &anchors {
            inbound(report, &grpc, &admin, anchors, &args.tls.control_name).await;
        }
    }
    if let Err(e) = &loaded {
        report.push(
            "proxies",
            "targets file",
            fail(
                format!("{}", e.root_cause()),
                format!(
                    "start `weft demo`, or pass --targets FILE listing every proxy's admin address (looked at {})",
                    path.display()
                ),
            ),
        );
    }
    let proxies: Vec<&Target> = listed.iter().filter(|t| t.is_proxy()).collect();
    if proxies.is_empty() && !listed.is_empty() {
        report.push("proxies", "targets", warn("the targets file lists no proxies", "add a group per proxy: {\"targets\": [\"<admin ip:port>\"], \"labels\": {\"workload\": ..}}"));
    }
    let checks = futures_util::future::join_all(proxies.iter().map(|t| proxy(t))).await;
    for (name, result) in checks {
        report.push("proxies", name, result);
    }
    for prober in listed.iter().filter(|t| t.is_probe()) {
        probes(report, prober.admin).await;
    }
}

fn conclude(report: &Report, output: Output) -> anyhow::Result<()> {
    let failed = report.0.iter().filter(|c| c.status == Status::Fail).count();
    let warned = report.0.iter().filter(|c| c.status == Status::Warn).count();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report.0)?),
        Output::Table => print_report(&report.0),
    }
    if failed > 0 {
        anyhow::bail!("{failed} checks failed, {warned} warnings");
    }
    if output == Output::Table {
        println!(
            "\nall checks passed{}",
            if warned > 0 {
                format!(" ({warned} warnings)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn print_report(checks: &[Check]) {
    let mut section = "";
    for c in checks {
        if c.section != section {
            section = c.section;
            println!("{section}");
        }
        let mark = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        println!("  [{mark}] {}: {}", c.name, c.detail);
        if let Some(h) = &c.hint {
            println!("         -> {h}");
        }
    }
}

/// Whether the control plane's admin port answered.
async fn control(
    report: &mut Report,
    grpc: &str,
    admin: &str,
    anchors: Option<&std::path::Path>,
    name: &weft_identity::Name,
) -> bool {
    let reachable = match anchors {
        Some(anchors) => match crate::control::connect(grpc, anchors, name).await {
            Ok(_) => Ok(format!("gRPC over TLS 1.3 at {grpc}, proved {name}")),
            Err(e) => fail(
                format!("{e:#}"),
                "start weft-control, or pass --control ADDR (its --listen address), --trust-anchors FILE (the mesh's ca.crt) and --control-name NAME (its --name)",
            ),
        },
        None => warn(
            format!("cannot verify the control channel at {grpc}: no trust anchors known"),
            "pass --trust-anchors FILE (the mesh's ca.crt) or set WEFT_TRUST_ANCHORS",
        ),
    };
    report.push("control plane", "reachable", reachable);
    let ready = match fetch::get(&format!("http://{admin}/ready")).await {
        Ok(f) if f.status.is_success() => Ok(format!("admin at {admin}")),
        Ok(f) => fail(
            format!("{admin}/ready answered {}: {}", f.status, f.body.trim()),
            "read weft-control's log: it says why it is not ready",
        ),
        Err(e) => fail(
            format!("{e:#}"),
            "start weft-control, or pass --control-admin ADDR (its --admin-listen address)",
        ),
    };
    let up = ready.is_ok();
    report.push("control plane", "ready", ready);
    up
}

#[derive(serde::Deserialize)]
struct IdentityJson {
    anchors_pem: String,
    issuer_pem: String,
}

async fn identity(report: &mut Report, admin: &str) {
    const S: &str = "identity";
    let json = match fetch::get_ok(&format!("http://{admin}/identity")).await {
        Ok(f) => match serde_json::from_str::<IdentityJson>(&f.body) {
            Ok(j) => j,
            Err(e) => {
                report.push(
                    S,
                    "certificates",
                    fail(
                        format!("{admin}/identity: {e}"),
                        "upgrade weft-control to match this CLI",
                    ),
                );
                return;
            }
        },
        Err(e) => {
            let hint = if format!("{e:#}").contains("--identity-dir") {
                "run weft-control with --identity-dir (made by `weft identity init`) so the mesh has mTLS"
            } else {
                "upgrade weft-control to match this CLI"
            };
            report.push(
                S,
                "certificates",
                fail(
                    format!("cannot read the control plane's certificates: {e:#}"),
                    hint,
                ),
            );
            return;
        }
    };
    let now = SystemTime::now();
    let anchors = match certs("the control plane's anchors", &json.anchors_pem) {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => {
            report.push(
                S,
                "trust anchor",
                fail(
                    "the trust anchors file holds no certificate",
                    "run `weft identity init` to make a CA",
                ),
            );
            return;
        }
        Err(e) => {
            report.push(
                S,
                "trust anchor",
                fail(
                    e,
                    "replace the trust anchors file with the CA's PEM certificate",
                ),
            );
            return;
        }
    };
    for (_, info) in &anchors {
        let name = format!("trust anchor {}", info.subject);
        report.push(S, name, validity(info, now, ANCHOR_WARN, "make a new CA with `weft identity init --force` and give its ca.crt to every proxy (WEFT_PROXY_TRUST_ANCHORS) before the old one expires"));
    }
    let issuer = match certs("the control plane's issuer", &json.issuer_pem).map(|mut v| v.pop()) {
        Ok(Some(i)) => i,
        Ok(None) | Err(_) => {
            report.push(
                S,
                "issuer",
                fail(
                    "the control plane sent no issuer certificate",
                    "check weft-control's --identity-dir",
                ),
            );
            return;
        }
    };
    let (issuer_der, issuer_info) = &issuer;
    report.push(
        S,
        format!("issuer {}", issuer_info.subject),
        validity(issuer_info, now, ISSUER_WARN, "run `weft identity rotate-issuer --dir <identity dir>`: weft-control uses the new issuer within a second and proxies pick it up as they renew"),
    );
    let chained = anchors
        .iter()
        .find(|(a, _)| verify_signed_by(issuer_der, a).is_ok());
    let chain = match chained {
        Some((_, anchor)) if issuer_info.not_after > anchor.not_after => warn(
            format!(
                "signed by {}, but outlives it ({} > {})",
                anchor.subject,
                when(issuer_info.not_after),
                when(anchor.not_after)
            ),
            "rotate the trust anchor before it expires: leaves stop verifying then, whatever the issuer says",
        ),
        Some((_, anchor)) => Ok(format!("issuer is signed by {}", anchor.subject)),
        None => fail(
            "the issuer is not signed by any trust anchor: proxies will refuse every certificate it issues",
            "make the issuer from this CA (`weft identity rotate-issuer`), or distribute the anchor that signed it",
        ),
    };
    report.push(S, "chain", chain);
    if !issuer_info.is_ca {
        report.push(
            S,
            "issuer is a CA",
            fail(
                "the issuer certificate has CA:FALSE",
                "rotate the issuer with `weft identity rotate-issuer`",
            ),
        );
    }
}

/// `weft probe`'s latest results: each service through the mesh and
/// directly, so a mesh failure is told from the service's own.
async fn probes(report: &mut Report, admin: SocketAddr) {
    const S: &str = "probes";
    let results = match crate::probe::fetch(admin).await {
        Ok(r) => r,
        Err(e) => {
            report.push(
                S,
                format!("weft probe at {admin}"),
                fail(
                    format!("{e:#}"),
                    "is `weft probe` running? (its --listen address is the target)",
                ),
            );
            return;
        }
    };
    for r in &results {
        let result = match crate::probe::verdict(r) {
            Ok(detail) => Ok(detail),
            Err((true, detail, hint)) => fail(detail, hint),
            Err((false, detail, hint)) => warn(detail, hint),
        };
        report.push(S, r.probe.clone(), result);
    }
}

/// Every port with inbound policy: one that admits no client at all is
/// almost always a mistake (every request to it is refused).
async fn inbound(
    report: &mut Report,
    grpc: &str,
    admin: &str,
    anchors: &std::path::Path,
    name: &weft_identity::Name,
) {
    const S: &str = "inbound policy";
    let fetched = match crate::control::connect(grpc, anchors, name).await {
        Ok(channel) => crate::authz::fetch(channel, admin, None, &[]).await,
        Err(e) => Err(e),
    };
    let (default, policies) = match fetched {
        Ok(p) => p,
        Err(e) => {
            report.push(
                S,
                "servers",
                warn(
                    format!("cannot read inbound policy: {e:#}"),
                    "upgrade weft-control to match this CLI",
                ),
            );
            return;
        }
    };
    if policies.is_empty() {
        report.push(
            S,
            "servers",
            Ok(format!(
                "no server lists inbound policy; every port: {default}"
            )),
        );
    }
    for p in &policies {
        let authorizations: std::collections::BTreeSet<&str> = p
            .server
            .authorizations
            .iter()
            .chain(p.server.routes.iter().flat_map(|r| r.authorizations.iter()))
            .map(|a| &*a.name)
            .collect();
        let result = if crate::authz::admits_no_one(&p.server) {
            warn(
                "admits no client: every request and connection to it is refused",
                format!(
                    "add an authorization under servers.\"{}\".ports.\"{}\" in the destinations file, or give the port a default other than deny (`weft authz {}` shows what it allows)",
                    p.identity, p.port, p.identity
                ),
            )
        } else {
            Ok(format!(
                "{} authorizations on {} routes",
                authorizations.len(),
                p.server.routes.len().max(1)
            ))
        };
        report.push(S, format!("{}:{}", p.identity, p.port), result);
    }
}

fn certs(what: &str, pem: &str) -> Result<Vec<(Vec<u8>, CertInfo)>, String> {
    let ders = weft_identity::parse_pem_certs(std::path::Path::new(what), pem)
        .map_err(|e| e.to_string())?;
    ders.into_iter()
        .map(|d| {
            let info = CertInfo::parse(&d)?;
            Ok((d.to_vec(), info))
        })
        .collect()
}

fn validity(
    info: &CertInfo,
    now: SystemTime,
    warn_within: Duration,
    what_to_do: &str,
) -> Result<String, (Status, String, String)> {
    if now < info.not_before {
        return fail(
            format!("not valid before {}", when(info.not_before)),
            "check this machine's clock and the control plane's",
        );
    }
    match info.not_after.duration_since(now) {
        Err(e) => fail(
            format!(
                "expired {} ago, at {}",
                days(e.duration()),
                when(info.not_after)
            ),
            what_to_do,
        ),
        Ok(left) if left < warn_within => warn(
            format!("expires in {}, at {}", days(left), when(info.not_after)),
            what_to_do,
        ),
        Ok(left) => Ok(format!(
            "valid for {} more (until {})",
            days(left),
            when(info.not_after)
        )),
    }
}

/// A proxy: answering, ready, certified, and its clock close to ours.
async fn proxy(t: &Target) -> (String, Result<String, (Status, String, String)>) {
    let name = format!("{} at {}", t.workload(), t.admin);
    (name, proxy_check(t.admin).await)
}

async fn proxy_check(admin: SocketAddr) -> Result<String, (Status, String, String)> {
    let asked = SystemTime::now();
    let ready = match fetch::get(&format!("http://{admin}/ready")).await {
        Ok(f) => f,
        Err(e) => {
            return fail(
                format!("not answering: {e:#}"),
                "is it running? restart it (its log says why it stopped), or remove it from the targets file",
            );
        }
    };
    let answered = SystemTime::now();
    if !ready.status.is_success() {
        let hint = if ready.body.contains("certificate") {
            "it has no certificate: check its WEFT_PROXY_IDENTITY_TOKEN_FILE and weft-control's log (refused Certify calls are logged with the reason)"
        } else {
            "read the proxy's log"
        };
        return fail(format!("not ready: {}", ready.body.trim()), hint);
    }
    // The Date header has one-second resolution; allow for it.
    let mut notes = vec!["ready".to_string()];
    if let Some(date) = ready.date {
        let mid = asked + answered.duration_since(asked).unwrap_or_default() / 2;
        let skew = match date.duration_since(mid) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration().saturating_sub(Duration::from_secs(1)),
        };
        if skew > MAX_SKEW {
            return fail(
                format!("its clock is {}s off this machine's", skew.as_secs()),
                "synchronise clocks (chrony or systemd-timesyncd): certificates are only valid within their time window",
            );
        }
        notes.push(format!("clock within {}s", skew.as_secs().max(1)));
    }
    let metrics = match fetch::get_ok(&format!("http://{admin}/metrics")).await {
        Ok(f) => f.body,
        Err(e) => {
            return fail(
                format!("cannot read its metrics: {e:#}"),
                "read the proxy's log",
            );
        }
    };
    let expiry = metrics
        .lines()
        .find_map(|l| l.strip_prefix("identity_cert_expiration_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    if expiry <= 0.0 {
        return warn(
            format!(
                "{}, but it has no identity: its traffic is not mutual TLS",
                notes.join(", ")
            ),
            "give it WEFT_PROXY_IDENTITY_NAME, WEFT_PROXY_IDENTITY_TOKEN_FILE and WEFT_PROXY_TRUST_ANCHORS",
        );
    }
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(expiry);
    match not_after.duration_since(SystemTime::now()) {
        Err(e) => fail(
            format!(
                "its certificate expired {} ago and was not renewed",
                days(e.duration())
            ),
            "it cannot reach weft-control or is refused: read both logs (renewal is attempted at 70% of the lifetime)",
        ),
        Ok(left) => {
            notes.push(format!("certified for {} more", days(left)));
            Ok(notes.join(", "))
        }
    }
}
