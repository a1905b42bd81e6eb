//! `weft`: the operator's CLI.

mod demo;
mod endpoints;
mod golden;
mod identity;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft", version, about = "weft service mesh: operator's CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local demo mesh: sample HTTP/1.1, HTTP/2 and gRPC services behind
    /// a real weft-proxy, with traffic, printing golden metrics as it goes.
    Demo(demo::Args),
    /// Show what discovery says about a service now (the control plane's
    /// Destination view).
    Endpoints(endpoints::Args),
    /// Manage the mesh's certificate authority and bootstrap tokens.
    #[command(subcommand)]
    Identity(identity::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline commands need no runtime.
    let command = match cli.command {
        Command::Identity(c) => {
            return match identity::run(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("weft: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Demo(args) => demo::run(args).await,
            Command::Endpoints(args) => endpoints::run(args).await,
            Command::Identity(_) => Ok(()),
        }
    });
    // Background tasks (traffic, servers) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::from(2)
        }
    }
}
