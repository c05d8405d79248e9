//! Response bodies: the app's streamed body holding its admission until it ends, or a short
//! body tidegate writes itself.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::ClientAbort;
use crate::error::Rejected;
use crate::health::Progress;
use crate::limit::Admission;
use crate::upstream::Lease;

/// The body of every response the proxy lane sends.
#[derive(Debug)]
pub enum ResponseBody {
    /// Streamed from the app.
    Upstream(UpstreamBody),
    /// Written by tidegate (refusals, errors, coalesced copies); empty when `None` was given.
    Local(Option<Bytes>),
    /// A coalescing leader's body that could not be shared: what was read, then the rest.
    Replay(Box<crate::coalesce::Replay>),
}

/// What an exchange with the app holds until it is over: the slot, and the progress clock
/// that `/app/livez` reads.
#[derive(Debug)]
pub struct ExchangeGuard {
    admission: Admission,
    progress: Progress,
    on_abort: ClientAbort,
}

/// The app's response body. Holds its [`ExchangeGuard`] until the last frame is read, and
/// then gives its connection back to the pool (an HTTP/1.1 connection is reusable only once
/// the whole body has been read; one that fails mid-body is closed instead).
///
/// When the client goes away first and `--on-client-abort finish` is set, the rest of the body
/// is read and discarded in the background, so the slot is held until the app is done.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Option<Incoming>,
    guard: Option<ExchangeGuard>,
    lease: Option<Lease>,
}

/// The client's request body on its way to the app. Enforces the body size limit as the bytes
/// stream through, and turns a failure to read the body into [`Rejected`], so the client is
/// answered with a 4xx (and the app's half-sent request is aborted), not a 502.
#[derive(Debug)]
pub struct RequestBody {
    /// `None` for an empty body made by tidegate (a bodiless request sent again).
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
}

// === impl RequestBody ===

impl RequestBody {
    /// Wraps `inner`; more than `limit` bytes (if set) fail the body with
    /// [`Rejected::BodyTooLarge`].
    pub fn new(inner: Incoming, limit: Option<u64>) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            limit,
            seen: 0,
        }
    }

    /// An empty body, for a copy of a bodiless request.
    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            limit: None,
            seen: 0,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Rejected;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Rejected>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if let Some(limit) = this.limit
                        && this.seen > limit
                    {
                        return Poll::Ready(Some(Err(Rejected::BodyTooLarge { limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(Rejected::Body(error)))),
            None => Poll::Ready(None),
        }
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

// === impl ResponseBody ===

impl ResponseBody {
    /// A body written by tidegate.
    pub fn local(text: &'static str) -> ResponseBody {
        ResponseBody::Local(Some(Bytes::from_static(text.as_bytes())))
    }

    /// An empty body.
    pub fn empty() -> ResponseBody {
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
            ResponseBody::Replay(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Local(bytes) => bytes.is_none(),
            ResponseBody::Replay(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Replay(body) => body.size_hint(),
        }
    }
}

// === impl ExchangeGuard ===

impl ExchangeGuard {
    /// Ties an admission to the exchange it admitted.
    pub fn new(admission: Admission, progress: Progress, on_abort: ClientAbort) -> ExchangeGuard {
        ExchangeGuard {
            admission,
            progress,
            on_abort,
        }
    }

    /// The admission, to adjust its latency sample.
    pub fn admission_mut(&mut self) -> &mut Admission {
        &mut self.admission
    }

    /// The app finished the exchange: note its progress and free the slot.
    pub fn complete(self) {
        self.progress.record();
        drop(self.admission);
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    /// Wraps the app's body; `guard` and `lease` are released when the body ends.
    pub fn new(inner: Incoming, guard: ExchangeGuard, lease: Option<Lease>) -> UpstreamBody {
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
        let (Some(guard), Some(body)) = (self.guard.take(), self.inner.take()) else {
            return;
        };
        if guard.on_abort == ClientAbort::Cancel {
            // Dropping the body closes the upstream connection; the slot frees now.
            return;
        }
        let lease = self.lease.take();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(discard_rest(body, guard, lease));
            }
            Err(_) => tracing::debug!("No runtime to finish an abandoned exchange"),
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
