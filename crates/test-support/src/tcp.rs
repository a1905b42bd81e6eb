//! Raw TCP peers: an echo server and a server-speaks-first server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running TCP server; stops when dropped.
pub struct TcpServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes every byte back.
pub async fn echo() -> anyhow::Result<TcpServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, None));
    Ok(TcpServer { addr, task })
}

/// Like SMTP or MySQL: greets first with `banner`, then echoes.
pub async fn server_first(banner: &'static [u8]) -> anyhow::Result<TcpServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, Some(banner)));
    Ok(TcpServer { addr, task })
}

/// Accepts forever: each connection gets `banner` (if any), then an echo.
pub async fn serve(listener: TcpListener, banner: Option<&'static [u8]>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            if let Some(banner) = banner
                && s.write_all(banner).await.is_err()
            {
                return;
            }
            let mut buf = [0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}
