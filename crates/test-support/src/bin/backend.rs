//! `weft-test-backend`: the test peers as a process, for benchmarks, the
//! demo and tests that run inside network namespaces.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// HTTP/1.1 + HTTP/2 on one port (see `weft_test_support::backend`).
    Http,
    /// TCP echo.
    Echo,
    /// Greets with "220 weft-test ready\r\n" first, then echoes.
    Banner,
    /// gRPC: `grpc.health.v1.Health`, `weft.test.Echo` SERVING.
    Grpc,
    /// An OTLP/gRPC trace receiver that counts the spans it is sent and
    /// prints the count when asked on stdin (any line).
    Otlp,
    /// Not a server: one gRPC `Health/Check` of `weft.test.Echo` at
    /// `--listen`, like an unmodified gRPC application calling a peer;
    /// prints the serving status and exits 0, or the error and exits 1.
    GrpcCheck,
}

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Name returned in bodies and the x-backend header.
    #[arg(long, default_value = "backend")]
    name: String,
    #[arg(long, value_enum, default_value = "http")]
    mode: Mode,
    /// HTTP: added to every response.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    delay: std::time::Duration,
    /// HTTP: every Nth request gets a 500.
    #[arg(long)]
    fail_every: Option<u64>,
    /// HTTP: every Nth request is this much slower, as `N:DURATION`
    /// (e.g. `10:100ms`).
    #[arg(long, value_parser = parse_slow)]
    slow: Option<(u64, std::time::Duration)>,
}

fn parse_slow(s: &str) -> Result<(u64, std::time::Duration), String> {
    let (n, d) = s
        .split_once(':')
        .ok_or("expected N:DURATION, e.g. 10:100ms")?;
    let n = n.parse().map_err(|_| format!("{n:?} is not a count"))?;
    let d = humantime::parse_duration(d).map_err(|e| e.to_string())?;
    Ok((n, d))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        if let Mode::GrpcCheck = args.mode {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{}", args.listen))?
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .timeout(std::time::Duration::from_secs(5));
            let channel = endpoint.connect().await?;
            let status =
                weft_test_support::grpc::check(&channel, weft_test_support::grpc::SERVING).await?;
            println!("{status}");
            return Ok(());
        }
        if let Mode::Otlp = args.mode {
            let receiver = weft_test_support::otlp::Receiver::start_on(args.listen, true).await?;
            println!("listening {}", receiver.addr);
            let count = receiver.counter();
            std::thread::spawn(move || {
                for _ in std::io::stdin().lines() {
                    println!("spans {}", count.load(std::sync::atomic::Ordering::Relaxed));
                }
            });
            std::future::pending::<()>().await;
        }
        if let Mode::Grpc = args.mode {
            let _server = weft_test_support::grpc::start_on(args.listen).await?;
            println!("listening {}", args.listen);
            std::future::pending::<()>().await;
        }
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        // The harness reads the bound address from this line.
        println!("listening {}", listener.local_addr()?);
        match args.mode {
            Mode::Http => {
                let behaviour = weft_test_support::backend::Behaviour {
                    delay: args.delay,
                    fail_every: args.fail_every,
                    slow: args.slow,
                };
                weft_test_support::backend::serve_with(
                    listener,
                    args.name,
                    Default::default(),
                    behaviour,
                )
                .await
            }
            Mode::Echo => weft_test_support::tcp::serve(listener, None).await,
            Mode::Banner => {
                weft_test_support::tcp::serve(listener, Some(b"220 weft-test ready\r\n")).await
            }
            Mode::Grpc | Mode::GrpcCheck | Mode::Otlp => {}
        }
        Ok(())
    })
}
