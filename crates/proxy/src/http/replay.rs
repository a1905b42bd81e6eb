//! Request bodies that can be sent again. The first attempt streams the
//! client's body upstream as it arrives (nothing waits for the whole body,
//! so streaming calls keep streaming) and keeps a copy of up to
//! [`MAX_REPLAY`] bytes; a retry replays the copy and then continues from
//! the client where the first attempt stopped reading. A body larger than
//! that, or one that failed, cannot be replayed, and its request is not
//! retried.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Bodies up to this size are kept for replay.
pub(crate) const MAX_REPLAY: usize = 64 * 1024;

/// The body of a request sent upstream: the client's own, or one that
/// can be replayed.
pub enum ReqBody {
    Stream(Incoming),
    Replay(ReplayBody),
}

impl From<Incoming> for ReqBody {
    fn from(b: Incoming) -> Self {
        Self::Stream(b)
    }
}

/// One attempt's view of a shared, replayable body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Chunks of the copy this attempt has sent.
    sent: usize,
    trailers_sent: bool,
}

struct Shared {
    source: Incoming,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// Too large, or the client's body failed: no replay.
    spoiled: bool,
}

impl ReplayBody {
    pub fn new(source: Incoming) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                ended: false,
                spoiled: false,
            })),
            sent: 0,
            trailers_sent: false,
        }
    }

    /// A body for the next attempt, if this one can still be replayed.
    /// The previous attempt must be finished with (dropped) first.
    pub fn replay(&self) -> Option<Self> {
        let shared = self.lock();
        if shared.spoiled {
            return None;
        }
        drop(shared);
        Some(Self {
            shared: self.shared.clone(),
            sent: 0,
            trailers_sent: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        // What an earlier attempt already read from the client comes first.
        if let Some(chunk) = shared.chunks.get(this.sent) {
            this.sent += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if shared.ended {
            if !this.trailers_sent
                && let Some(t) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let polled = std::task::ready!(Pin::new(&mut shared.source).poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !shared.spoiled && shared.len + data.len() <= MAX_REPLAY {
                        shared.len += data.len();
                        shared.chunks.push(data.clone());
                        this.sent += 1;
                    } else {
                        shared.spoiled = true;
                        shared.chunks = Vec::new();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    shared.trailers = Some(t.clone());
                    shared.ended = true;
                    this.trailers_sent = true;
                }
                if shared.source.is_end_stream() {
                    shared.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                shared.spoiled = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                shared.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        shared.ended
            && self.sent >= shared.chunks.len()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.lock();
        if shared.ended && !shared.spoiled && shared.trailers.is_none() {
            let left: usize = shared.chunks.iter().skip(self.sent).map(Bytes::len).sum();
            return SizeHint::with_exact(left as u64);
        }
        if self.sent == 0 && !shared.spoiled && shared.chunks.is_empty() {
            return shared.source.size_hint();
        }
        SizeHint::default()
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Replay(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream(b) => b.is_end_stream(),
            ReqBody::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Replay(b) => b.size_hint(),
        }
    }
}
