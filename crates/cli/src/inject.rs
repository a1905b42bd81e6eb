//! `weft inject FILE|-`: the workloads in Kubernetes YAML or JSON that ask
//! for it (annotation `weft.io/inject: enabled` on the workload or its pod
//! template; every workload with `--all`) get weft's capture step and
//! proxy; everything else passes through unchanged. What was injected and
//! what was not is said on stderr, so the output can be piped to kubectl.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context;
use weft_inject::{Outcome, Settings, inject_object};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The manifests (multi-document YAML, JSON, `List`s); `-` for stdin.
    file: PathBuf,
    /// Inject every workload, not only those that ask for it (those that
    /// say `weft.io/inject: disabled` are still left alone).
    #[arg(long)]
    all: bool,
    /// Where the images come from.
    #[arg(long, env = "WEFT_INJECT_REGISTRY", default_value = "ghcr.io/weft")]
    registry: String,
    /// The images' version.
    #[arg(long, env = "WEFT_INJECT_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// The control plane's namespace (where proxies find it).
    #[arg(long, default_value = "weft")]
    control_namespace: String,
    /// The mesh's trust domain (`weft identity init --trust-domain`).
    #[arg(long, default_value = "weft.local")]
    trust_domain: String,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let mut settings = Settings::new(&args.registry, &args.version, &args.control_namespace);
    settings.trust_domain = args.trust_domain.clone();
    let json = text.trim_start().starts_with(['{', '[']);
    let mut docs: Vec<serde_json::Value> = if json {
        vec![serde_json::from_str(&text).context("the input is not JSON")?]
    } else {
        serde_saphyr::from_multiple(&text).context("the input is not YAML")?
    };
    docs.retain(|d| !d.is_null());
    for doc in &mut docs {
        let what = format!(
            "{} {}",
            doc["kind"].as_str().unwrap_or("?"),
            doc["metadata"]["name"].as_str().unwrap_or("(list)")
        );
        for outcome in inject_object(doc, &settings, args.all)? {
            match outcome {
                Outcome::Injected => eprintln!("weft inject: {what}: injected"),
                Outcome::Skipped(why) => eprintln!("weft inject: {what}: skipped ({why})"),
            }
        }
    }
    if json {
        for doc in &docs {
            println!("{}", serde_json::to_string_pretty(doc)?);
        }
    } else {
        print!(
            "{}",
            serde_saphyr::to_string_multiple(&docs).context("writing YAML")?
        );
    }
    Ok(())
}
