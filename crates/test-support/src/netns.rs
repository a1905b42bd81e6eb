//! Network namespaces of a test's own ("hosts"), joined by veth pairs, for
//! iptables capture and transparent proxying with real kernels rules.
//! Needs root and iproute2; everything is deleted on drop.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The command prefix that runs what follows as `nobody` (uid and gid
/// 65534, no groups): an application that is not the proxy's user, so
/// `weft init`'s capture applies to it.
pub const AS_NOBODY: [&str; 7] = [
    "setpriv",
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
    "--",
];

/// Runs `cmd`, failing with its output unless it succeeded.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// A network namespace with `lo` up.
pub struct Netns {
    pub name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// A fresh namespace; `tag` makes its name readable in `ip netns`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!(
            "weft-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `args` as a command inside the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs `args` inside the namespace; its stdout, if it succeeded.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(&mut self.command(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `args` inside the namespace, killed when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        let child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Child(child))
    }

    /// A veth pair between this namespace and `other`, with `here` and
    /// `there` (CIDR notation, e.g. 10.98.0.1/24; several comma-separated,
    /// IPv6 too) on its two ends.
    pub fn link(&self, other: &Netns, here: &str, there: &str) -> anyhow::Result<()> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (format!("wa{n}"), format!("wb{n}"));
        self.exec(&[
            "ip",
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ])?;
        self.add_addrs(&a, here)?;
        self.exec(&["ip", "link", "set", &a, "up"])?;
        other.add_addrs(&b, there)?;
        other.exec(&["ip", "link", "set", &b, "up"])?;
        Ok(())
    }

    /// `cidrs` (comma-separated, IPv4 or IPv6) on `dev`; IPv6 ones usable
    /// at once (no duplicate address detection).
    fn add_addrs(&self, dev: &str, cidrs: &str) -> anyhow::Result<()> {
        for cidr in cidrs.split(',').map(str::trim) {
            let mut args = vec!["ip", "addr", "add", cidr, "dev", dev];
            if cidr.contains(':') {
                args.push("nodad");
            }
            self.exec(&args)?;
        }
        Ok(())
    }

    /// A veth pair between this namespace and the test's own (root)
    /// namespace, `here` on this end and `root` on the other: how a
    /// namespace reaches a process the test runs itself (a control plane
    /// listening on 0.0.0.0).
    pub fn link_root(&self, here: &str, root: &str) -> anyhow::Result<()> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (format!("wr{n}"), format!("wn{n}"));
        run(Command::new("ip").args([
            "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &self.name,
        ]))?;
        run(Command::new("ip").args(["addr", "add", root, "dev", &a]))?;
        run(Command::new("ip").args(["link", "set", &a, "up"]))?;
        self.exec(&["ip", "addr", "add", here, "dev", &b])?;
        self.exec(&["ip", "link", "set", &b, "up"])?;
        Ok(())
    }

    /// The namespace's nat table as `iptables-save` prints it, without
    /// the comment and counter lines that change from run to run.
    pub fn nat_rules(&self) -> anyhow::Result<String> {
        self.saved("iptables-save")
    }

    /// The same for IPv6 (`ip6tables-save`).
    pub fn nat_rules_v6(&self) -> anyhow::Result<String> {
        self.saved("ip6tables-save")
    }

    fn saved(&self, save: &str) -> anyhow::Result<String> {
        let out = self.exec(&[save, "-t", "nat"])?;
        Ok(out
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.strip_prefix(':') {
                // ":CHAIN POLICY [packets:bytes]": the counters vary.
                Some(chain) => chain.rsplit_once(' ').map_or(l, |(c, _)| c).to_string(),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
