//! An executor for one connection's HTTP/2 streams: hyper hands it a
//! future per stream (and, as a client, per request and for the
//! connection itself), and the connection's own task polls them all, so
//! a stream costs no task of its own — no aligned task allocation, no
//! trip through the scheduler when the connection's frames wake it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::{ArcWake, AtomicWaker};

type Spawned = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds of polling the connection and its futures in one poll.
const MAX_ROUNDS: usize = 4;

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

/// Wakes the driving task and notes that `main` asked for it, so `main`
/// is polled only when woken (as its own task would be): polling a
/// connection that was not woken costs a read that finds nothing.
struct MainWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for MainWake {
    fn wake_by_ref(this: &Arc<Self>) {
        this.woken.store(true, Ordering::Release);
        this.task.wake();
    }
}

/// Runs `main` and everything its executor was given, on the task that
/// polls it; ready when `main` is and every future it started has ended.
pub struct Driven<M: Future> {
    main: Pin<Box<M>>,
    out: Option<M::Output>,
    tasks: FuturesUnordered<Spawned>,
    exec: LocalExec,
    wake: Arc<MainWake>,
    main_waker: Waker,
}

impl<M: Future> Driven<M> {
    pub fn new(main: M, exec: LocalExec) -> Self {
        let wake = Arc::new(MainWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            main: Box::pin(main),
            out: None,
            tasks: FuturesUnordered::new(),
            exec,
            main_waker: futures_util::task::waker(wake.clone()),
            wake,
        }
    }

    /// The connection, to act on it: it is polled on the next poll, since
    /// what the caller does to it (hyper's `graceful_shutdown`) may change
    /// what a poll does without waking anything.
    pub fn main(&mut self) -> Pin<&mut M> {
        self.wake.woken.store(true, Ordering::Release);
        self.main.as_mut()
    }
}

impl<M: Future> Unpin for Driven<M> {}

impl<M: Future> Future for Driven<M> {
    type Output = M::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<M::Output> {
        let this = &mut *self;
        this.exec.0.waker.register(cx.waker());
        this.wake.task.register(cx.waker());
        // A few rounds while starting futures or waking the connection
        // feed each other (a stream's response wakes the connection to
        // flush it), then the task is left to be polled again: every wake
        // has also woken it, and a wake tokio's budget makes (its
        // operations refuse until the task yields) must not spin here.
        for _ in 0..MAX_ROUNDS {
            if this.out.is_none() && this.wake.woken.swap(false, Ordering::AcqRel) {
                let mut main_cx = Context::from_waker(&this.main_waker);
                if let Poll::Ready(out) = this.main.as_mut().poll(&mut main_cx) {
                    this.out = Some(out);
                }
            }
            let queued = match this.exec.0.queue.lock() {
                Ok(mut q) => std::mem::take(&mut *q),
                Err(_) => Vec::new(),
            };
            let started = !queued.is_empty();
            this.tasks.extend(queued);
            while let Poll::Ready(Some(())) = this.tasks.poll_next_unpin(cx) {}
            let main_again = this.out.is_none() && this.wake.woken.load(Ordering::Acquire);
            if !started && !main_again {
                break;
            }
        }
        // Something started in the last round is queued still (and its
        // start woke this task): not done yet.
        let queued = this.exec.0.queue.lock().is_ok_and(|q| !q.is_empty());
        match this.out.take() {
            Some(out) if this.tasks.is_empty() && !queued => Poll::Ready(out),
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

    /// Stands in for hyper's connection on `graceful_shutdown`: told to
    /// stop, it is done on its next poll, and telling it wakes nothing.
    struct Quiet {
        stop: bool,
    }

    impl Future for Quiet {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.stop {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn what_is_done_through_main_is_seen_on_the_next_poll() {
        let mut driven = Driven::new(Quiet { stop: false }, LocalExec::default());
        let first = tokio::time::timeout(Duration::from_millis(20), &mut driven).await;
        assert!(first.is_err(), "not told to stop yet");
        driven.main().stop = true;
        let out = tokio::time::timeout(Duration::from_secs(1), &mut driven).await;
        assert!(out.is_ok(), "a stop that woke nothing must still end it");
    }
}
