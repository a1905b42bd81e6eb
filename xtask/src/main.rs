//! Project tasks: `cargo xtask demo` and `cargo xtask bench`.

mod bench;
mod mesh;
mod procs;

use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <demo [weft demo flags] | bench [--duration SECS] [--rounds N] [--watchers N] [--services N] [--only fan-out] [--out FILE] [--strict]>";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    match task.as_deref() {
        Some("demo") => demo(&rest),
        Some("bench") => bench::run(&rest),
        _ => bail!("{USAGE}"),
    }
}

/// etcd-client's build needs a protoc; .cargo/config.toml points PROTOC at
/// protox in .tools/, installed here on first use.
fn ensure_protox(cargo: &str) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .join(".tools");
    if root.join("bin/protox").is_file() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing protox (a protoc in Rust, for etcd-client's build) into .tools; once only"
    );
    let status = Command::new(cargo)
        .args([
            "install",
            "protox",
            "--version",
            "0.10.0",
            "--features",
            "bin",
            "--locked",
            "--root",
        ])
        .arg(&root)
        .status()
        .context("running cargo install protox")?;
    if !status.success() {
        bail!("cargo install protox failed");
    }
    Ok(())
}

/// Builds every binary in release mode, then runs `weft demo`.
fn demo(args: &[String]) -> anyhow::Result<()> {
    build_release()?;
    let weft = procs::target_dir()?.join("release/weft");
    let status = Command::new(&weft)
        .arg("demo")
        .args(args)
        .status()
        .with_context(|| format!("running {}", weft.display()))?;
    if !status.success() {
        bail!("weft demo failed: {status}");
    }
    Ok(())
}

pub(crate) fn build_release() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ensure_protox(&cargo)?;
    let status = Command::new(&cargo)
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
