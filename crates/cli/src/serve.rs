//! The CLI's HTTP/1.1 servers (the dashboard, `weft probe`, the demo's
//! front end) share one accept loop: connections bounded (more wait to be
//! accepted), a header timeout that also closes idle keep-alives, and a
//! pause after a failed accept (out of descriptors) rather than a spin.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Serves every request on `listener` with `handle`, at most
/// `max_connections` connections at once; `who` names it in errors.
pub(crate) async fn http1<H, F, B>(
    listener: TcpListener,
    max_connections: usize,
    who: &'static str,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connections = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(slot) = connections.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("{who}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let rsp = handle(req);
                async move { Ok::<_, Infallible>(rsp.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
