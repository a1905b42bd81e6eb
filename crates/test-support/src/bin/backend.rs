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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        // The harness reads the bound address from this line.
        println!("listening {}", listener.local_addr()?);
        match args.mode {
            Mode::Http => weft_test_support::backend::serve(listener, args.name).await,
            Mode::Echo => weft_test_support::tcp::serve(listener, None).await,
            Mode::Banner => {
                weft_test_support::tcp::serve(listener, Some(b"220 weft-test ready\r\n")).await
            }
        }
        Ok(())
    })
}
