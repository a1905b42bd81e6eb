//! `weft init`: capture a network namespace's TCP traffic for the proxy with
//! iptables, in chains of weft's own so that `--remove` takes out exactly
//! what was put in. The same code is the Kubernetes init container.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::Context;

const CHAIN_IN: &str = "WEFT_PREROUTING";
const CHAIN_OUT: &str = "WEFT_OUTPUT";

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The uid the proxy runs as: its own connections are never captured
    /// (required unless --inbound-only).
    #[arg(long, env = "WEFT_INIT_PROXY_UID")]
    proxy_uid: Option<u32>,
    /// The proxy's outbound listener, where the applications' connections
    /// are redirected.
    #[arg(long, env = "WEFT_INIT_OUTBOUND_PORT", default_value_t = 4140)]
    outbound_port: u16,
    /// The proxy's inbound listener, where connections to this host are
    /// redirected.
    #[arg(long, env = "WEFT_INIT_INBOUND_PORT", default_value_t = 4143)]
    inbound_port: u16,
    /// The proxy's admin port, never captured.
    #[arg(long, env = "WEFT_INIT_ADMIN_PORT", default_value_t = 4191)]
    admin_port: u16,
    /// Inbound ports left alone (comma-separated; ranges as 8000-8100).
    #[arg(long, env = "WEFT_INIT_SKIP_INBOUND_PORTS", value_delimiter = ',', value_parser = parse_ports)]
    skip_inbound_ports: Vec<Ports>,
    /// Destination ports of outbound connections left alone.
    #[arg(long, env = "WEFT_INIT_SKIP_OUTBOUND_PORTS", value_delimiter = ',', value_parser = parse_ports)]
    skip_outbound_ports: Vec<Ports>,
    /// Destination networks of outbound connections left alone (e.g.
    /// 169.254.169.254/32 for a cloud metadata service; IPv4 or IPv6).
    #[arg(long, env = "WEFT_INIT_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    skip_outbound_cidrs: Vec<Cidr>,
    /// Capture only connections to this host.
    #[arg(long, env = "WEFT_INIT_INBOUND_ONLY", conflicts_with = "outbound_only")]
    inbound_only: bool,
    /// Capture only connections from this host.
    #[arg(long, env = "WEFT_INIT_OUTBOUND_ONLY")]
    outbound_only: bool,
    /// Which iptables back end: whichever already holds rules (auto), or
    /// legacy or nft.
    #[arg(long, env = "WEFT_INIT_IPTABLES", default_value = "auto")]
    iptables: Mode,
    /// Capture IPv6 too (ip6tables): when the namespace has IPv6 and
    /// ip6tables is installed (auto), always (on: an error if it cannot),
    /// or never (off). The proxy must then listen on IPv6 as well.
    #[arg(long, env = "WEFT_INIT_IPV6", default_value = "auto")]
    ipv6: Ipv6,
    /// Print the rules and the back end, change nothing.
    #[arg(long, env = "WEFT_INIT_DRY_RUN")]
    dry_run: bool,
    /// Delete weft's chains and the jumps to them, and nothing else.
    #[arg(long, conflicts_with_all = ["inbound_only", "outbound_only", "proxy_uid"])]
    remove: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Auto,
    Legacy,
    Nft,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Ipv6 {
    Auto,
    On,
    Off,
}

/// An address family's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// A port or an inclusive range of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ports(u16, u16);

impl std::fmt::Display for Ports {
    /// In iptables' `--dport` syntax.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}

fn parse_ports(s: &str) -> Result<Ports, String> {
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "{s:?} is not a port (1-65535) or a range like 8000-8100"
        )),
        Ok(n) => Ok(n),
    };
    match s.split_once('-') {
        None => port(s).map(|p| Ports(p, p)),
        Some((lo, hi)) => {
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(format!("{s:?}: the range is backwards"));
            }
            Ok(Ports(lo, hi))
        }
    }
}

/// A network in CIDR notation (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr(IpAddr, u8);

impl Cidr {
    fn family(&self) -> Family {
        match self.0 {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let bad = || format!("{s:?} is not a network such as 10.0.0.0/8 or fd00::/8");
    let (addr, len) = match s.trim().split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s.trim(), None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = match len {
        Some(l) => l.parse().map_err(|_| bad())?,
        None => max,
    };
    if len > max {
        return Err(bad());
    }
    Ok(Cidr(addr, len))
}

/// The programs of one back end for one address family.
struct Tables {
    iptables: &'static str,
    save: &'static str,
    restore: &'static str,
}

/// The iptables programs of one back end.
struct Backend {
    name: &'static str,
    v4: Tables,
    v6: Tables,
}

impl Backend {
    fn tables(&self, family: Family) -> &Tables {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

const LEGACY: Backend = Backend {
    name: "legacy",
    v4: Tables {
        iptables: "iptables-legacy",
        save: "iptables-legacy-save",
        restore: "iptables-legacy-restore",
    },
    v6: Tables {
        iptables: "ip6tables-legacy",
        save: "ip6tables-legacy-save",
        restore: "ip6tables-legacy-restore",
    },
};
const NFT: Backend = Backend {
    name: "nft",
    v4: Tables {
        iptables: "iptables-nft",
        save: "iptables-nft-save",
        restore: "iptables-nft-restore",
    },
    v6: Tables {
        iptables: "ip6tables-nft",
        save: "ip6tables-nft-save",
        restore: "ip6tables-nft-restore",
    },
};
/// Whatever `iptables` on the PATH is, on hosts with neither suffixed name.
const PLAIN: Backend = Backend {
    name: "iptables",
    v4: Tables {
        iptables: "iptables",
        save: "iptables-save",
        restore: "iptables-restore",
    },
    v6: Tables {
        iptables: "ip6tables",
        save: "ip6tables-save",
        restore: "ip6tables-restore",
    },
};

fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file()))
    })
}

/// Rules a back end holds (lines starting `-A`), or `None` when it cannot
/// be read (not installed, no permission, kernel module missing).
fn rule_count(b: &Backend) -> Option<usize> {
    let out = Command::new(b.v4.save)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count()
    })
}

/// The back end to use: the one asked for, or, as Kubernetes' own
/// iptables wrapper decides, the one the host's rules are already in (a
/// rule in the other would never see the packets), nft when neither has
/// any.
fn choose(mode: Mode) -> anyhow::Result<&'static Backend> {
    let need = |b: &'static Backend| -> anyhow::Result<&'static Backend> {
        anyhow::ensure!(
            installed(b.v4.iptables) && installed(b.v4.restore),
            "{} and {} are not on the PATH (Debian: apt install iptables)",
            b.v4.iptables,
            b.v4.restore
        );
        Ok(b)
    };
    match mode {
        Mode::Legacy => need(&LEGACY),
        Mode::Nft => need(&NFT),
        Mode::Auto => {
            let legacy = installed(LEGACY.v4.restore)
                .then(|| rule_count(&LEGACY))
                .flatten();
            let nft = installed(NFT.v4.restore)
                .then(|| rule_count(&NFT))
                .flatten();
            match (legacy, nft) {
                (Some(l), Some(n)) if l > n => Ok(&LEGACY),
                (_, Some(_)) => Ok(&NFT),
                (Some(_), None) => Ok(&LEGACY),
                (None, None) if installed(PLAIN.v4.restore) => Ok(&PLAIN),
                (None, None) => anyhow::bail!(
                    "iptables is not installed (no iptables-nft, iptables-legacy or iptables on the PATH; Debian: apt install iptables)"
                ),
            }
        }
    }
}

/// Effective uid and whether CAP_NET_ADMIN is effective, from
/// /proc/self/status (no libc needed).
fn privileges() -> Option<(u32, bool)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let euid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
    let caps = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    const CAP_NET_ADMIN: u64 = 12;
    Some((euid, caps & (1 << CAP_NET_ADMIN) != 0))
}

/// The `iptables-restore --noflush` input that installs the capture.
/// Declaring a chain flushes it, so applying it again yields the same
/// rules; the jumps into the chains are added only where missing.
fn ruleset(args: &Args, family: Family, jumps: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut r = String::from("*nat\n");
    let inbound = !args.outbound_only;
    let outbound = !args.inbound_only;
    if inbound {
        writeln!(r, ":{CHAIN_IN} - [0:0]")?;
    }
    if outbound {
        writeln!(r, ":{CHAIN_OUT} - [0:0]")?;
    }
    if inbound {
        // The proxy's own ports first: connections to them are the
        // proxy's business already.
        for port in [args.inbound_port, args.admin_port] {
            writeln!(r, "-A {CHAIN_IN} -p tcp --dport {port} -j RETURN")?;
        }
        for p in &args.skip_inbound_ports {
            writeln!(r, "-A {CHAIN_IN} -p tcp --dport {p} -j RETURN")?;
        }
        writeln!(r, "-A {CHAIN_IN} -i lo -j RETURN")?;
        writeln!(
            r,
            "-A {CHAIN_IN} -p tcp -j REDIRECT --to-ports {}",
            args.inbound_port
        )?;
    }
    if outbound {
        let uid = args.proxy_uid.context(
            "--proxy-uid (WEFT_INIT_PROXY_UID) is required to capture outbound traffic: without it the proxy's own connections would be sent back to itself",
        )?;
        writeln!(r, "-A {CHAIN_OUT} -m owner --uid-owner {uid} -j RETURN")?;
        writeln!(r, "-A {CHAIN_OUT} -o lo -j RETURN")?;
        for c in args
            .skip_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
            writeln!(r, "-A {CHAIN_OUT} -d {c} -j RETURN")?;
        }
        for p in &args.skip_outbound_ports {
            writeln!(r, "-A {CHAIN_OUT} -p tcp --dport {p} -j RETURN")?;
        }
        writeln!(
            r,
            "-A {CHAIN_OUT} -p tcp -j REDIRECT --to-ports {}",
            args.outbound_port
        )?;
    }
    for (builtin, chain) in jumps {
        writeln!(r, "-A {builtin} -j {chain}")?;
    }
    r.push_str("COMMIT\n");
    Ok(r)
}

/// Whether `builtin` already jumps to `chain`.
fn has_jump(b: &Tables, builtin: &str, chain: &str) -> bool {
    Command::new(b.iptables)
        .args(["-w", "-t", "nat", "-C", builtin, "-j", chain])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn iptables(b: &Tables, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(b.iptables)
        .arg("-w")
        .args(args)
        .output()
        .with_context(|| format!("running {}", b.iptables))
}

/// [`iptables`], failing with its error unless it succeeded.
fn iptables_ok(b: &Tables, args: &[&str]) -> anyhow::Result<()> {
    let out = iptables(b, args)?;
    anyhow::ensure!(
        out.status.success(),
        "{} {}: {}",
        b.iptables,
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deletes every jump from `builtin` to `chain`, then the chain.
fn remove_chain(b: &Tables, builtin: &str, chain: &str) -> anyhow::Result<bool> {
    let mut removed = false;
    while has_jump(b, builtin, chain) {
        iptables_ok(b, &["-t", "nat", "-D", builtin, "-j", chain])?;
        removed = true;
    }
    // -F fails when the chain does not exist: nothing to delete then.
    if iptables(b, &["-t", "nat", "-F", chain])?.status.success() {
        iptables_ok(b, &["-t", "nat", "-X", chain])?;
        removed = true;
    }
    Ok(removed)
}

fn ensure_privileged() -> anyhow::Result<()> {
    match privileges() {
        Some((0, _)) | Some((_, true)) => Ok(()),
        Some((uid, false)) => anyhow::bail!(
            "weft init changes this network namespace's iptables rules: run it as root or with CAP_NET_ADMIN (running as uid {uid} without it)"
        ),
        // Unknown: let iptables say.
        None => Ok(()),
    }
}

/// Whether IPv6 rules go in too: `--ipv6`, and for `auto` whether the
/// namespace has IPv6 and the back end has ip6tables.
fn families(args: &Args, b: &Backend) -> anyhow::Result<Vec<Family>> {
    let possible = installed(b.v6.iptables)
        && installed(b.v6.restore)
        && std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty());
    match args.ipv6 {
        Ipv6::Off => Ok(vec![Family::V4]),
        Ipv6::Auto if !possible => Ok(vec![Family::V4]),
        Ipv6::On if !possible => anyhow::bail!(
            "--ipv6 on: this namespace has no IPv6 (/proc/net/if_inet6 is empty) or {} is not on the PATH",
            b.v6.restore
        ),
        _ => Ok(vec![Family::V4, Family::V6]),
    }
}

/// Installs the rules of one family; says what it captured.
fn install(args: &Args, t: &Tables, family: Family) -> anyhow::Result<()> {
    let jumps: Vec<(&str, &str)> = wanted_jumps(args)
        .into_iter()
        .filter(|(builtin, chain)| !has_jump(t, builtin, chain))
        .collect();
    let rules = ruleset(args, family, &jumps)?;
    let mut child = Command::new(t.restore)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", t.restore))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .with_context(|| format!("writing the rules to {}", t.restore))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {}", t.restore))?;
    anyhow::ensure!(
        out.status.success(),
        "{} refused the rules: {}\nthe rules were:\n{rules}",
        t.restore,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // A direction captured before and not now: its chain goes.
    if args.outbound_only {
        remove_chain(t, "PREROUTING", CHAIN_IN)?;
    }
    if args.inbound_only {
        remove_chain(t, "OUTPUT", CHAIN_OUT)?;
    }
    Ok(())
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if args.dry_run && !args.remove {
        // A dry run must work anywhere, even with no iptables at all.
        let backend = choose(args.iptables).ok();
        let families = match backend {
            Some(b) => families(&args, b)?,
            None if args.ipv6 == Ipv6::On => vec![Family::V4, Family::V6],
            None => vec![Family::V4],
        };
        let jumps = wanted_jumps(&args);
        println!(
            "# iptables back end: {}",
            backend.map_or("none found", |b| b.name)
        );
        for family in families {
            if family == Family::V6 {
                println!("# ip6tables");
            }
            print!("{}", ruleset(&args, family, &jumps)?);
        }
        return Ok(());
    }
    ensure_privileged()?;
    let b = choose(args.iptables)?;
    if args.remove {
        if args.dry_run {
            println!("# iptables back end: {}", b.name);
            for (builtin, chain) in [("PREROUTING", CHAIN_IN), ("OUTPUT", CHAIN_OUT)] {
                println!("-D {builtin} -j {chain}\n-F {chain}\n-X {chain}");
            }
            return Ok(());
        }
        let mut removed = false;
        for family in [Family::V4, Family::V6] {
            let t = b.tables(family);
            // No ip6tables (or no IPv6): nothing of ours can be there.
            if family == Family::V6 && !installed(t.iptables) {
                continue;
            }
            removed |= remove_chain(t, "PREROUTING", CHAIN_IN)?;
            removed |= remove_chain(t, "OUTPUT", CHAIN_OUT)?;
        }
        println!(
            "weft init: {} ({})",
            if removed {
                "removed weft's capture rules"
            } else {
                "no weft rules were installed"
            },
            b.name
        );
        return Ok(());
    }
    let families = families(&args, b)?;
    for family in &families {
        install(&args, b.tables(*family), *family)?;
    }
    let mut what = Vec::new();
    if !args.outbound_only {
        what.push(format!("inbound TCP to port {}", args.inbound_port));
    }
    if let (false, Some(uid)) = (args.inbound_only, args.proxy_uid) {
        what.push(format!(
            "outbound TCP to port {} (not uid {uid}'s)",
            args.outbound_port
        ));
    }
    println!(
        "weft init: capturing {} ({}, {})",
        what.join(" and "),
        b.name,
        if families.contains(&Family::V6) {
            "IPv4 and IPv6"
        } else {
            "IPv4"
        }
    );
    Ok(())
}

fn wanted_jumps(args: &Args) -> Vec<(&'static str, &'static str)> {
    let mut jumps = Vec::new();
    if !args.outbound_only {
        jumps.push(("PREROUTING", CHAIN_IN));
    }
    if !args.inbound_only {
        jumps.push(("OUTPUT", CHAIN_OUT));
    }
    jumps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges() {
        assert_eq!(parse_ports("22"), Ok(Ports(22, 22)));
        assert_eq!(parse_ports("8000-8100"), Ok(Ports(8000, 8100)));
        assert_eq!(Ports(8000, 8100).to_string(), "8000:8100");
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("9-1").is_err());
        assert!(parse_ports("http").is_err());
    }

    #[test]
    fn networks() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").map(|c| c.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            parse_cidr("10.1.2.3").map(|c| c.to_string()),
            Ok("10.1.2.3/32".into())
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert_eq!(
            parse_cidr("fd00::/8").map(|c| (c.to_string(), c.family())),
            Ok(("fd00::/8".into(), Family::V6))
        );
        assert_eq!(
            parse_cidr("::1").map(|c| c.to_string()),
            Ok("::1/128".into())
        );
        assert!(parse_cidr("fd00::/129").is_err());
    }
}
