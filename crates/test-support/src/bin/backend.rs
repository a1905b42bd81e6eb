//! `weft-test-backend`: the test backend as a process, for benchmarks and
//! the demo: HTTP/1.1 + HTTP/2 on one port (see `weft_test_support::backend`).

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Name returned in bodies and the x-backend header.
    #[arg(long, default_value = "backend")]
    name: String,
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
        weft_test_support::backend::serve(listener, args.name).await;
        Ok(())
    })
}
