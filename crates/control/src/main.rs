//! The `weft-control` binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Configuration errors exit 64 (EX_USAGE), as weft-proxy's do.
const EX_USAGE: u8 = 64;

/// clap names the flag; a value that came from the environment is named by
/// its variable too, since that is where the operator must fix it.
fn config() -> Result<weft_control::Config, ExitCode> {
    let err = match weft_control::Config::try_parse() {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return Err(ExitCode::SUCCESS);
    }
    let _ = err.print();
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a.clone(),
        _ => String::new(),
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let flag = arg
        .trim_start_matches("--")
        .split(' ')
        .next()
        .unwrap_or_default();
    let var = format!("WEFT_CONTROL_{}", flag.replace('-', "_").to_uppercase());
    if !flag.is_empty() && std::env::var(&var).is_ok_and(|v| v == value) {
        eprintln!("(the value came from {var}={value:?})");
    }
    Err(ExitCode::from(EX_USAGE))
}

fn main() -> ExitCode {
    let config = match config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    runtime.spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        signal.cancel();
    });
    match runtime.block_on(weft_control::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-control: {}", weft_channel::error_chain(&e));
            ExitCode::from(EX_USAGE)
        }
    }
}
