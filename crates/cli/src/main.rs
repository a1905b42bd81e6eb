//! `weft`: the operator's CLI.

mod authz;
mod check;
mod control;
mod dashboard;
mod demo;
mod edges;
mod endpoints;
mod fetch;
mod golden;
mod identity;
mod init;
mod inject;
mod install;
mod probe;
mod routes;
mod serve;
mod source;
mod stat;
mod tap;
mod targets;
mod top;
mod window;

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
    /// Run a meshed sample application on this machine (HTTP/1.1 front end,
    /// an HTTP and a gRPC service, all mutual TLS) with traffic, until
    /// Ctrl-C or --duration.
    Demo(demo::Args),
    /// Golden metrics per service (success rate, RPS, latency percentiles,
    /// mTLS share), or per edge with --to/--from.
    Stat(stat::Args),
    /// The busiest routes (method and path, gRPC method), live.
    Top(top::Args),
    /// Who talks to whom, with the identities each side proved.
    Edges(edges::Args),
    /// Check the control plane, the mesh's certificates and every proxy,
    /// saying what to do about each problem.
    Check(check::Args),
    /// Show what discovery says about a service now (the control plane's
    /// Destination view).
    Endpoints(endpoints::Args),
    /// Serve a live web dashboard of the mesh: services, who calls whom,
    /// check results.
    Dashboard(dashboard::Args),
    /// Check every configured service on a schedule, through the mesh and
    /// directly, and serve the results (Prometheus and JSON).
    Probe(probe::Args),
    /// Show who may reach a workload's ports and routes (inbound policy as
    /// proxies get it from the control plane), with rate limits.
    Authz(authz::Args),
    /// Show a service's traffic policy as proxies get it from the control
    /// plane: routes in match order, backends and weights, timeout,
    /// retries, hedging, breaker.
    Routes(routes::Args),
    /// Capture this network namespace's TCP traffic for the proxy
    /// (iptables, in chains WEFT_PREROUTING and WEFT_OUTPUT); --remove
    /// takes them out.
    Init(init::Args),
    /// Add weft's capture step and proxy (a native sidecar) to the
    /// Kubernetes workloads in a file (or stdin) that ask for it.
    Inject(inject::Args),
    /// Print the manifest that installs weft on a Kubernetes cluster
    /// (control plane, RBAC, identity, injection webhook), for
    /// `kubectl apply -f -`.
    Install(install::Args),
    /// Manage the mesh's certificate authority and bootstrap tokens.
    #[command(subcommand)]
    Identity(identity::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline commands need no runtime.
    let command = match cli.command {
        Command::Identity(c) => return exit(identity::run(c)),
        Command::Init(args) => return exit(init::run(args)),
        Command::Inject(args) => return exit(inject::run(args)),
        Command::Install(args) => return exit(install::run(args)),
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
            Command::Stat(args) => stat::run(args).await,
            Command::Edges(args) => edges::run(args).await,
            Command::Top(args) => top::run(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Endpoints(args) => endpoints::run(args).await,
            Command::Routes(args) => routes::run(args).await,
            Command::Authz(args) => authz::run(args).await,
            Command::Probe(args) => probe::run(args).await,
            Command::Dashboard(args) => dashboard::run(args).await,
            Command::Identity(_) | Command::Init(_) | Command::Inject(_) | Command::Install(_) => {
                Ok(())
            }
        }
    });
    // Background tasks (traffic, servers) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    exit(result)
}

/// Errors print their whole cause chain.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            ExitCode::from(2)
        }
    }
}
