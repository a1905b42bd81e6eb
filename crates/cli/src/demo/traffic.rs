//! The demo's traffic generator: steady HTTP/1.1 requests to the front end
//! through the client's proxy, from a few connections so that one slow
//! response does not hold up the rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use weft_test_support::client;

const WORKERS: u32 = 4;

/// Starts the generator; each task returns its count of transport errors.
pub(crate) fn start(
    proxy: SocketAddr,
    authority: &'static str,
    rps: u32,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<u64>> {
    let workers = WORKERS.min(rps);
    let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rps));
    (0..workers)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                // Spread the workers over one period.
                tokio::time::sleep(period / workers * i).await;
                worker(proxy, authority, period, stop).await
            })
        })
        .collect()
}

/// A steady clock: sleeping "the rest of the period" after each request
/// would drift below the asked rate by the timer's granularity.
async fn worker(
    proxy: SocketAddr,
    authority: &'static str,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut errors = 0;
    let mut conn = None;
    let mut clock = tokio::time::interval(period);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let paths = ["/", "/orders", "/users/42", "/search?q=mesh"];
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        clock.tick().await;
        if conn.is_none() {
            conn = client::Conn::connect(proxy, false).await.ok();
        }
        n += 1;
        if let Some(c) = conn.as_mut()
            && c.get(authority, paths[n % paths.len()]).await.is_err()
        {
            errors += 1;
            conn = None;
        }
    }
    errors
}
