//! Response bodies: the app's streamed body holding its admission until it ends, or a short
//! body tidegate writes itself.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::admission::Admission;
use crate::outbound::abandoned::Abandoned;
use crate::outbound::pool::Lease;
use crate::outbound::progress::Progress;

/// The body of every response the proxy lane sends.
#[derive(Debug)]
pub(crate) enum ResponseBody {
    /// Streamed from the app.
    Upstream(UpstreamBody),
    /// Written by tidegate (refusals, errors, coalesced copies); empty when `None` was given.
    Local(Option<Bytes>),
    /// A body resumed after part of it was read (a coalescing leader's that could not be
    /// shared).
    Resumed(Box<Resumed>),
}

/// A response body resumed after part of it was read: what was already read, the frame that
/// stopped the reading, then the rest as it streams (a coalescing leader's body that could not
/// be shared).
#[derive(Debug)]
pub(crate) struct Resumed {
    read: Option<Bytes>,
    next: Option<Frame<Bytes>>,
    rest: ResponseBody,
}

/// What an exchange with the app holds until it is over: the slot, and the progress clock
/// that `/app/livez` reads.
#[derive(Debug)]
pub(crate) struct ExchangeGuard {
    admission: Admission,
    progress: Progress,
    /// Set with `--on-client-abort finish`.
    finisher: Option<Abandoned>,
}

/// The app's response body. Holds its [`ExchangeGuard`] until the last frame is read, and
/// then gives its connection back to the pool (an HTTP/1.1 connection is reusable only once
/// the whole body has been read; one that fails mid-body is closed instead).
///
/// When the client goes away first and `--on-client-abort finish` is set, the rest of the body
/// is read and discarded in the background, so the slot is held until the app is done.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Option<Incoming>,
    guard: Option<ExchangeGuard>,
    lease: Option<Lease>,
}

// === impl ResponseBody ===

impl ResponseBody {
    /// An empty body.
    pub(crate) fn empty() -> ResponseBody {
        ResponseBody::Local(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Resumed(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Local(bytes) => bytes.is_none(),
            ResponseBody::Resumed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Resumed(body) => body.size_hint(),
        }
    }
}

// === impl ExchangeGuard ===

impl ExchangeGuard {
    /// Ties an admission to the exchange it admitted.
    pub(crate) fn new(
        admission: Admission,
        progress: Progress,
        finisher: Option<Abandoned>,
    ) -> ExchangeGuard {
        ExchangeGuard {
            admission,
            progress,
            finisher,
        }
    }

    /// The admission, to adjust its latency sample.
    pub(crate) fn admission_mut(&mut self) -> &mut Admission {
        &mut self.admission
    }

    /// The app finished the exchange: note its progress and free the slot.
    pub(crate) fn complete(self) {
        self.progress.record();
        drop(self.admission);
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    /// Wraps the app's body; `guard` and `lease` are released when the body ends.
    pub(crate) fn new(inner: Incoming, guard: ExchangeGuard, lease: Option<Lease>) -> UpstreamBody {
        let mut body = UpstreamBody {
            inner: Some(inner),
            guard: Some(guard),
            lease,
        };
        body.release_if_ended();
        body
    }

    fn release_if_ended(&mut self) {
        if !self.inner.as_ref().is_none_or(Body::is_end_stream) {
            return;
        }
        // The connection goes back first: once the slot is free, it is ready for the next.
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
        if let Some(guard) = self.guard.take() {
            guard.complete();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        match &frame {
            Some(Ok(_)) => this.release_if_ended(),
            None => {
                this.inner = None;
                this.release_if_ended();
            }
            // The exchange is over: its slot frees, its connection closes.
            Some(Err(_)) => {
                this.inner = None;
                this.lease = None;
                this.release_if_ended();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let (Some(mut guard), Some(body)) = (self.guard.take(), self.inner.take()) else {
            return;
        };
        // With `cancel`, dropping the body closes the upstream connection; the slot frees now.
        if let Some(finisher) = guard.finisher.take() {
            let lease = self.lease.take();
            finisher.finish(discard_rest(body, guard, lease));
        }
    }
}

/// Reads what is left of an abandoned response, then frees its slot and, if the body ended
/// cleanly, gives its connection back.
async fn discard_rest(mut body: Incoming, guard: ExchangeGuard, lease: Option<Lease>) {
    let mut clean = true;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            clean = false;
            break;
        }
    }
    if clean && let Some(lease) = lease {
        lease.release();
    }
    guard.complete();
}
// === impl Resumed ===

impl Resumed {
    /// `read`, then `next`, then the rest of `rest`.
    pub(crate) fn new(read: Bytes, next: Frame<Bytes>, rest: ResponseBody) -> Resumed {
        Resumed {
            read: Some(read),
            next: Some(next),
            rest,
        }
    }
}

impl Body for Resumed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(read) = this.read.take().filter(|b| !b.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(next) = this.next.take() {
            return Poll::Ready(Some(Ok(next)));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.as_ref().is_none_or(Bytes::is_empty)
            && self.next.is_none()
            && self.rest.is_end_stream()
    }
}
