//! An executor for one connection's HTTP/2 streams: hyper hands it a
//! future per stream (and, as a client, per request and for the
//! connection itself), and the connection's own task polls them all, so
//! a stream costs no task of its own — no aligned task allocation, no
//! trip through the scheduler when the connection's frames wake it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;

type Spawned = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Default)]
struct Shared {
    queue: Mutex<Vec<Spawned>>,
    waker: AtomicWaker,
}

/// Hands futures to the [`Driven`] it was made with.
#[derive(Clone, Default)]
pub struct LocalExec(Arc<Shared>);

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match self.0.queue.lock() {
            Ok(mut q) => q.push(Box::pin(fut)),
            // Poisoned only by a panic, which aborts this process.
            Err(_) => {
                tokio::spawn(fut);
                return;
            }
        }
        self.0.waker.wake();
    }
}

/// Runs `main` and everything its executor was given, on the task that
/// polls it; ready when `main` is and every future it started has ended.
pub struct Driven<M: Future> {
    main: Pin<Box<M>>,
    out: Option<M::Output>,
    tasks: FuturesUnordered<Spawned>,
    exec: LocalExec,
}

impl<M: Future> Driven<M> {
    pub fn new(main: M, exec: LocalExec) -> Self {
        Self {
            main: Box::pin(main),
            out: None,
            tasks: FuturesUnordered::new(),
            exec,
        }
    }

    pub fn main(&mut self) -> Pin<&mut M> {
        self.main.as_mut()
    }
}

impl<M: Future> Unpin for Driven<M> {}

impl<M: Future> Future for Driven<M> {
    type Output = M::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<M::Output> {
        let this = &mut *self;
        this.exec.0.waker.register(cx.waker());
        loop {
            if this.out.is_none()
                && let Poll::Ready(out) = this.main.as_mut().poll(cx)
            {
                this.out = Some(out);
            }
            let queued = match this.exec.0.queue.lock() {
                Ok(mut q) => std::mem::take(&mut *q),
                Err(_) => Vec::new(),
            };
            let started = !queued.is_empty();
            this.tasks.extend(queued);
            while let Poll::Ready(Some(())) = this.tasks.poll_next_unpin(cx) {}
            if !started {
                break;
            }
        }
        match this.out.take() {
            Some(out) if this.tasks.is_empty() => Poll::Ready(out),
            out => {
                this.out = out;
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn runs_what_main_starts_and_ends_after_it_all() {
        let exec = LocalExec::default();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let main = {
            let (exec, done) = (exec.clone(), done.clone());
            async move {
                // One that ends at once, one that waits for the outside.
                let d = done.clone();
                exec.execute(async move {
                    d.fetch_add(1, Ordering::SeqCst);
                });
                let d = done.clone();
                exec.execute(async move {
                    let _ = rx.await;
                    d.fetch_add(1, Ordering::SeqCst);
                });
                7
            }
        };
        let driven = tokio::spawn(Driven::new(main, exec.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert!(!driven.is_finished(), "main is done, one future is not");
        // Started from outside the driving task: it is woken to run it.
        let d = done.clone();
        exec.execute(async move {
            d.fetch_add(10, Ordering::SeqCst);
        });
        let _ = tx.send(());
        let out = tokio::time::timeout(Duration::from_secs(5), driven).await;
        assert_eq!(out.ok().and_then(Result::ok), Some(7));
        assert_eq!(done.load(Ordering::SeqCst), 12);
    }
}
