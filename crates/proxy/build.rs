//! Lays out the proxy's code for a small idle footprint: the functions
//! that run at start-up and on the request path, listed in
//! `link/text.order` (`cargo xtask order` writes it), are placed together,
//! so a waiting proxy maps a few hundred KiB of its code rather than most
//! of it (the kernel maps 64 KiB around each fault; scattered, the
//! start-up code alone touched seventy such blocks).
//!
//! Only where the linker is known to be LLD, which takes
//! `--symbol-ordering-file`: Rust 1.90 and later link
//! x86_64-unknown-linux-gnu with its own LLD unless a linker is
//! configured. Elsewhere the build is the same, only laid out as the
//! compiler left it.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link/text.order");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    println!("cargo:rerun-if-env-changed=WEFT_PROXY_LINK_MAP");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let lld_by_default = var("TARGET") == "x86_64-unknown-linux-gnu"
        && std::env::var_os("RUSTC_LINKER").is_none()
        // `-C linker=…`, `-C linker-flavor=…` or `-C link-self-contained=…`
        // in RUSTFLAGS may choose another.
        && !var("CARGO_ENCODED_RUSTFLAGS").contains("link")
        && rustc_minor().is_some_and(|minor| minor >= 90);
    // Only the optimised builds ship; debug builds and tests link as they were.
    if !lld_by_default || var("PROFILE") != "release" {
        return;
    }
    // `cargo xtask order` reads where each function landed from the
    // linker's map of this very build: a build with symbols kept would
    // name its functions differently.
    if let Some(map) = std::env::var_os("WEFT_PROXY_LINK_MAP").filter(|m| !m.is_empty()) {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,-Map={}",
            std::path::Path::new(&map).display()
        );
        // Names as the ordering file needs them: mangled.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-demangle");
    }
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/text.order");
    if !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names the file lists that this build lacks (code since moved or
    // renamed) are expected; they are skipped.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// The compiler's minor version: `rustc 1.95.0 (…)` → 95.
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var_os("RUSTC")?;
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    version.split('.').nth(1)?.parse().ok()
}
