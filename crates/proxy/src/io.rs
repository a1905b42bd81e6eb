//! Stream wrappers: replaying the bytes read for detection, and counting
//! bytes for the `tcp_*` metrics.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use std::sync::{Arc, OnceLock};

use crate::metrics::{Direction, Peer, TcpLabels, TcpMetrics, TlsLabel};

/// A stream whose first bytes were already read (for protocol detection)
/// and are served again before the rest.
#[derive(Debug)]
pub struct PrefixedIo<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a connection's TLS turned out to be (and, per node, which
/// workload it is for), decided by the server after it already read bytes
/// (detection, the handshake): set once.
#[derive(Clone, Debug, Default)]
pub struct TlsSlot(Arc<OnceLock<(TlsLabel, Option<Arc<str>>)>>);

impl TlsSlot {
    pub fn set(&self, tls: TlsLabel, workload: Option<Arc<str>>) {
        let _ = self.0.set((tls, workload));
    }
}

/// The series one connection counts into.
#[derive(Debug)]
struct Counters {
    read: Counter,
    written: Counter,
    open: Gauge,
    closed: Counter,
}

/// Counts bytes in both directions and keeps `tcp_open_connections` true
/// for as long as the stream lives. An accepted connection's series are
/// chosen once its TLS is known; bytes read before that are added then.
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    metrics: TcpMetrics,
    direction: Direction,
    peer: Peer,
    slot: TlsSlot,
    counters: Option<Counters>,
    pending: (u64, u64),
}

impl<T> CountingIo<T> {
    /// A connection whose TLS is known now (an upstream we dialled).
    pub fn new(
        inner: T,
        metrics: &TcpMetrics,
        direction: Direction,
        peer: Peer,
        tls: TlsLabel,
        workload: Option<Arc<str>>,
    ) -> Self {
        let slot = TlsSlot::default();
        slot.set(tls, workload);
        Self::deferred(inner, metrics, direction, peer, slot)
    }

    /// A connection whose TLS `slot` will say (an accepted one).
    pub fn deferred(
        inner: T,
        metrics: &TcpMetrics,
        direction: Direction,
        peer: Peer,
        slot: TlsSlot,
    ) -> Self {
        let mut io = Self {
            inner,
            metrics: metrics.clone(),
            direction,
            peer,
            slot,
            counters: None,
            pending: (0, 0),
        };
        io.resolve();
        io
    }

    /// The counters, once the TLS label is known.
    fn resolve(&mut self) -> Option<&Counters> {
        if self.counters.is_none() {
            let (tls, workload) = self.slot.0.get()?.clone();
            self.open_with(tls, workload);
        }
        self.counters.as_ref()
    }

    fn open_with(&mut self, tls: TlsLabel, workload: Option<Arc<str>>) {
        let labels = TcpLabels {
            direction: self.direction,
            peer: self.peer,
            tls,
            workload,
        };
        let m = &self.metrics;
        m.open_total.get_or_create(&labels).inc();
        let counters = Counters {
            read: m.read_bytes_total.get_or_create(&labels).clone(),
            written: m.write_bytes_total.get_or_create(&labels).clone(),
            open: m.open_connections.get_or_create(&labels).clone(),
            closed: m.close_total.get_or_create(&labels).clone(),
        };
        counters.open.inc();
        counters.read.inc_by(self.pending.0);
        counters.written.inc_by(self.pending.1);
        self.counters = Some(counters);
    }

    fn count_read(&mut self, n: u64) {
        match self.resolve() {
            Some(c) => {
                c.read.inc_by(n);
            }
            None => self.pending.0 += n,
        }
    }

    fn count_written(&mut self, n: u64) {
        match self.resolve() {
            Some(c) => {
                c.written.inc_by(n);
            }
            None => self.pending.1 += n,
        }
    }
}

impl<T> Drop for CountingIo<T> {
    fn drop(&mut self) {
        // A connection that ended before its TLS was known (failed
        // detection or handshake) is counted as plaintext.
        if self.resolve().is_none() {
            self.open_with(TlsLabel::Plain, None);
        }
        if let Some(c) = &self.counters {
            c.open.dec();
            c.closed.inc();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.count_read(n as u64);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.count_written(n as u64);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.count_written(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection to an upstream endpoint: plain TCP, or mutual TLS to a
/// meshed peer. Boxed TLS state keeps the plain case small.
pub enum UpstreamIo {
    Plain(CountingIo<tokio::net::TcpStream>),
    Tls(Box<tokio_rustls::client::TlsStream<CountingIo<tokio::net::TcpStream>>>),
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamIo::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            UpstreamIo::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// Relays bytes both ways until either side closes, or until nothing has
/// moved in either direction for `idle`: the one implementation of a
/// splice, for opaque TCP, CONNECT tunnels and upgraded connections alike.
/// Returns the bytes copied each way, or `TimedOut` when idle.
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: std::time::Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = tokio::time::Instant::now();
    // Milliseconds since `start` of the last byte moved; both halves are
    // polled by this one task, so relaxed ordering is enough.
    let last = std::sync::atomic::AtomicU64::new(0);
    let mut a = Active {
        inner: a,
        start,
        last: &last,
    };
    let mut b = Active {
        inner: b,
        start,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let moved =
            std::time::Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
        let deadline = start + moved + idle;
        tokio::select! {
            r = &mut copy => return r,
            () = tokio::time::sleep_until(deadline) => {
                let again = std::time::Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
                if again == moved {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
                }
            }
        }
    }
}

/// Records when bytes last moved through it.
struct Active<'a, T: ?Sized> {
    inner: &'a mut T,
    start: tokio::time::Instant,
    last: &'a std::sync::atomic::AtomicU64,
}

impl<T: ?Sized> Active<'_, T> {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Active<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Active<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefix_is_replayed_before_the_stream() {
        let inner: &[u8] = b" world";
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        io.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
