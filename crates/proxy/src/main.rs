//! The `weft-proxy` binary: configuration from the environment, then run.

use std::io::IsTerminal;
use std::process::ExitCode;

use weft_proxy::config::Config;

const HELP: &str = "\
weft-proxy: weft's data plane. Configured by environment variables only.
SIGTERM/SIGINT drain and exit; SIGUSR2 starts the binary again from its
path, hands it the listeners and drains once it is ready.


  WEFT_PROXY_OUTBOUND_LISTEN   outbound listener(s), comma-separated (default 127.0.0.1:4140)
  WEFT_PROXY_INBOUND_LISTEN    inbound listener(s), comma-separated (default 0.0.0.0:4143)
  WEFT_PROXY_ADMIN_LISTEN      admin: /metrics /ready /live /env.json (default 127.0.0.1:4191)
  WEFT_PROXY_DESTINATIONS      YAML file of static destinations (followed for changes)
  WEFT_PROXY_INBOUND_FORWARD   where inbound traffic goes without an original destination
  WEFT_PROXY_LOG               tracing filter (default info)
  WEFT_PROXY_DETECT_TIMEOUT    peek timeout for silent clients, at most 300ms (default 200ms)
  WEFT_PROXY_CONNECT_TIMEOUT   upstream connect timeout (default 1s)
  WEFT_PROXY_SHUTDOWN_GRACE    drain time after SIGTERM (default 30s)
  WEFT_PROXY_DNS_REFRESH       reuse of DNS answers for unconfigured names (default 5s)
  WEFT_PROXY_CORES             cores, a thread and runtime each (default 1)
  WEFT_PROXY_WORKLOADS         per-node mode: YAML file of local workloads and identities
  WEFT_PROXY_UPGRADE_TIMEOUT   how long a process started by SIGUSR2 has to get ready (30s)
  WEFT_PROXY_REUSE_PORT        SO_REUSEPORT on the traffic listeners (default false)
  WEFT_PROXY_ORIG_PROTO        HTTP/1 to meshed proxies carried over HTTP/2 (default true)
  WEFT_PROXY_CONTROL_ADDR, _TRUST_ANCHORS, _CONTROL_NAME (weft-control.weft.local),
  _IDENTITY_NAME, _IDENTITY_TOKEN_FILE, _REGISTER, _REGISTER_ADDR, _ETCD,
  _INBOUND_AUTHORITIES: the mesh (see README)

Bounds and timeouts (see README for each):
  WEFT_PROXY_HEADER_READ_TIMEOUT (30s)  WEFT_PROXY_HTTP2_IDLE_TIMEOUT (5m)
  WEFT_PROXY_HTTP2_KEEPALIVE_INTERVAL (20s) and _TIMEOUT (10s)
  WEFT_PROXY_HTTP2_MAX_CONCURRENT_STREAMS (256)  WEFT_PROXY_MAX_HEADER_BYTES (65536)
  WEFT_PROXY_INBOUND_RESPONSE_TIMEOUT (60s)  WEFT_PROXY_TCP_IDLE_TIMEOUT (1h)
  WEFT_PROXY_MAX_CONNECTIONS (10000 per listener)
  WEFT_PROXY_ENDPOINT_MAX_IN_FLIGHT (1000) and _QUEUE_TIMEOUT (500ms)
  WEFT_PROXY_DISCOVERY_IDLE_TIMEOUT (10m)  WEFT_PROXY_DNS_TIMEOUT (2s)
  WEFT_PROXY_METRICS_MAX_AUTHORITIES (1000)

Invalid values are reported by name; the proxy then exits with code 64.
";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("weft-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "weft-proxy: unexpected argument {other:?}; configuration is by environment (see --help)"
            );
            return ExitCode::from(64);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // The main runtime is core 0; with more cores, `run` starts a
    // current-thread runtime per core (see `weft_proxy::cores`).
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(weft_proxy::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {}", weft_channel::error_chain(&e));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
