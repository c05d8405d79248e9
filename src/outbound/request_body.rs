//! The client's request body on its way to the app, with the body size limit enforced as the
//! bytes stream through.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::Rejected;

/// The client's request body on its way to the app. Enforces the body size limit as the bytes
/// stream through, and turns a failure to read the body into [`Rejected`], so the client is
/// answered with a 4xx (and the app's half-sent request is aborted), not a 502.
#[derive(Debug)]
pub(crate) struct RequestBody {
    /// `None` for an empty body made by tidegate (a bodiless request sent again).
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
}

// === impl RequestBody ===

impl RequestBody {
    /// Wraps `inner`; more than `limit` bytes (if set) fail the body with
    /// [`Rejected::BodyTooLarge`].
    pub(crate) fn new(inner: Incoming, limit: Option<u64>) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            limit,
            seen: 0,
        }
    }

    /// An empty body, for a copy of a bodiless request.
    pub(crate) fn empty() -> RequestBody {
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
