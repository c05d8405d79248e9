//! The client's request body on its way to the app, with the body size limit enforced as the
//! bytes stream through.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::Rejected;
use crate::outbound::half_close::HalfClose;

/// The client's request body on its way to the app. Enforces the body size limit as the bytes
/// stream through, and turns a failure to read the body into [`Rejected`], so the client is
/// answered with a 4xx (and the app's half-sent request is aborted), not a 502.
#[derive(Debug)]
pub(crate) struct RequestBody {
    /// What was read ahead of the send ([`RequestBody::buffer`]), given out first. Boxed:
    /// rare, and the body moves with every request.
    ahead: Option<Box<Ahead>>,
    /// `None` once read to its end ahead, or for a body made by tidegate.
    inner: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
    /// A half-closing client's connection: once its stream has ended, a body still waiting
    /// for bytes has been cut short.
    half_close: Option<HalfClose>,
}

/// What a body read ahead of its send.
#[derive(Debug)]
struct Ahead {
    /// The bytes read.
    data: Option<Bytes>,
    /// The frame (or failure) that stopped the reading, given out next.
    next: Option<Result<Frame<Bytes>, Rejected>>,
}

/// A request body after [`RequestBody::buffer`]: the body to send, and a copy of all of it if
/// it was small enough to be sent again.
#[derive(Debug)]
pub(crate) struct Buffered {
    /// The body to send.
    pub(crate) body: RequestBody,
    /// All of it, if it ended within the bound.
    pub(crate) copy: Option<Bytes>,
}

// === impl RequestBody ===

impl RequestBody {
    /// Wraps `inner`; more than `limit` bytes (if set) fail the body with
    /// [`Rejected::BodyTooLarge`]. With `half_close`, a body cut short by the client's end of
    /// stream fails with [`Rejected::BodyCut`].
    pub(crate) fn new(
        inner: Incoming,
        limit: Option<u64>,
        half_close: Option<HalfClose>,
    ) -> RequestBody {
        RequestBody {
            ahead: None,
            inner: Some(inner),
            limit,
            seen: 0,
            half_close,
        }
    }

    /// An empty body, for a copy of a bodiless request.
    pub(crate) fn empty() -> RequestBody {
        RequestBody::from_bytes(Bytes::new())
    }

    /// A body of `bytes`, for a request sent again.
    pub(crate) fn from_bytes(bytes: Bytes) -> RequestBody {
        RequestBody {
            ahead: (!bytes.is_empty()).then(|| {
                Box::new(Ahead {
                    data: Some(bytes),
                    next: None,
                })
            }),
            inner: None,
            limit: None,
            seen: 0,
            half_close: None,
        }
    }

    /// Reads the body ahead while it fits in `max` bytes, so that the request can be sent
    /// again. A body that ends within `max` comes back whole with a copy; a larger one, one
    /// with trailers, or one that fails comes back as it was (what was read, then the rest,
    /// or the failure), without a copy.
    pub(crate) async fn buffer(mut self, max: usize) -> Buffered {
        let mut read = BytesMut::new();
        let next = loop {
            if self.is_end_stream() {
                break None;
            }
            match self.frame().await {
                None => break None,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if read.len() + data.len() <= max => read.extend_from_slice(&data),
                    Ok(data) => break Some(Ok(Frame::data(data))),
                    Err(trailers) => break Some(Ok(trailers)),
                },
                Some(Err(rejected)) => break Some(Err(rejected)),
            }
        };
        let read = read.freeze();
        let copy = next.is_none().then(|| read.clone());
        let data = (!read.is_empty()).then_some(read);
        self.ahead = (data.is_some() || next.is_some()).then(|| Box::new(Ahead { data, next }));
        Buffered { body: self, copy }
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
        if let Some(ahead) = this.ahead.as_mut() {
            if let Some(data) = ahead.data.take() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let next = ahead.next.take();
            this.ahead = None;
            if let Some(next) = next {
                return Poll::Ready(Some(next));
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(polled) => polled,
            Poll::Pending => {
                // hyper waits for bytes the client's ended stream will not bring.
                if this
                    .half_close
                    .as_ref()
                    .is_some_and(|h| h.ended(cx.waker()))
                {
                    this.half_close = None;
                    return Poll::Ready(Some(Err(Rejected::BodyCut)));
                }
                return Poll::Pending;
            }
        };
        match polled {
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
        self.ahead.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let Some(ahead) = &self.ahead else {
            return rest;
        };
        let data = ahead.data.as_ref().map_or(0, |b| b.len() as u64);
        let next = match &ahead.next {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |b| b.len() as u64),
            _ => 0,
        };
        let ahead = data + next;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}
