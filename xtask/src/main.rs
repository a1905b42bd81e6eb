//! Project tasks: `cargo xtask demo` and `cargo xtask bench`.

mod bench;
mod hosts;
mod idle;
mod mesh;
mod order;
mod origproto;
mod policy;
mod procs;
mod versus;

use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <demo [weft demo flags] | bench [--duration SECS] [--rounds N] [--watchers N] [--services N] [--only fan-out|policy|authz|trace|hosts|versus|orig-proto|idle] [--quick] [--out FILE] [--strict]>";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    match task.as_deref() {
        Some("demo") => demo(&rest),
        Some("bench") => bench::run(&rest),
        Some("order") => order::run(),
        _ => bail!("{USAGE}"),
    }
}

/// Builds every binary in release mode, then runs `weft demo`.
fn demo(args: &[String]) -> anyhow::Result<()> {
    build_release()?;
    let weft = procs::target_dir()?.join("release/weft");
    let status = weft_test_support::process::std_command(&weft)
        .arg("demo")
        .args(args)
        .status()
        .with_context(|| format!("running {}", weft.display()))?;
    if !status.success() {
        bail!("weft demo failed: {status}");
    }
    Ok(())
}

/// Builds the proxy as it ships (docker/Dockerfile): glibc linked
/// statically, so it maps no shared libc, libm or loader whole (1.7 MiB of
/// idle RSS) and needs nothing from its image. Cargo applies the flag only
/// with an explicit `--target`, which keeps proc-macros dynamic. On a host
/// that is not glibc Linux, the plain release build is what ships.
pub(crate) fn build_shipped_proxy() -> anyhow::Result<()> {
    match build_static_proxy(None)? {
        Some(bin) => procs::ship(bin),
        None => eprintln!("bench: the host is not glibc Linux; measuring the plain release proxy"),
    }
    Ok(())
}

/// The shipped proxy, and the linker's map of it (where each function
/// landed), for `cargo xtask order`. Not a build with symbols kept: that
/// changes the profile, which changes the names of most functions.
pub(crate) fn build_proxy_with_map(map: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    build_static_proxy(Some(map))?.context("cargo xtask order needs a glibc Linux host")
}

/// The static proxy's path, or `None` where there is no glibc to link.
fn build_static_proxy(map: Option<&std::path::Path>) -> anyhow::Result<Option<std::path::PathBuf>> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let host = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")?;
    if !host.ends_with("-linux-gnu") {
        return Ok(None);
    }
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", &host, "--config"])
        .arg(format!(
            "target.{host}.rustflags=[\"-C\", \"target-feature=+crt-static\"]"
        ))
        .args(["-p", "weft-proxy", "--bin", "weft-proxy"]);
    if let Some(map) = map {
        cmd.env("WEFT_PROXY_LINK_MAP", map);
    }
    let status = cmd.status().context("running cargo build (static proxy)")?;
    if !status.success() {
        bail!("cargo build --release --target {host} (static proxy) failed");
    }
    Ok(Some(
        procs::target_dir()?.join(&host).join("release/weft-proxy"),
    ))
}

/// Cargo, without what `cargo run` told xtask about xtask: ring's build
/// script watches `CARGO_MANIFEST_DIR`, so inheriting it made every
/// `cargo xtask bench` rebuild ring and all that depends on it (five
/// minutes) after any plain `cargo build`, and the other way round.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || matches!(
                &*name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*name);
        }
    }
    cmd
}

pub(crate) fn build_release() -> anyhow::Result<()> {
    let status = cargo()
        .args([
            "build",
            "--release",
            "--bins",
            "-p",
            "weft-proxy",
            "-p",
            "weft",
            "-p",
            "weft-control",
            "-p",
            "weft-test-support",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(())
}
