//! Whether a client that half-closes its connection is still answered.
//!
//! Some clients (`nc`, some balancers and health checkers) send their request, then shut down
//! their sending side and wait for the answer; nginx and HAProxy answer them. TCP cannot tell
//! that end of stream from a client that has left until a write is met by a reset, and hyper
//! takes it for the client leaving. tidegate answers a half-closed HTTP/1.1 client (with
//! `--on-client-abort finish`) once its request has been admitted to the app. Before that,
//! while the request waits in the queue, the end of stream means the client left, as before:
//! the request leaves the queue and takes no slot. A body the end of stream cuts short fails
//! (`400 bad-body`), as it did.
//!
//! One [`HalfClose`] per HTTP/1.1 client connection: the inbound side starts each request
//! with it and tells it when the client's stream ends; the proxy marks the request admitted;
//! the request body, waiting for bytes, learns from it that none will come.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Waker;

use futures_util::task::AtomicWaker;

/// Where the connection's current request stands, for its client's half-close.
#[derive(Clone, Debug, Default)]
pub(crate) struct HalfClose(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// Whether the current request was admitted to the app (not queued, refused, or not
    /// started).
    admitted: AtomicBool,
    /// Set once the client's stream ended while its request was admitted.
    ended: AtomicBool,
    /// The request body waiting for bytes, woken when the client's stream ends.
    body: AtomicWaker,
}

impl HalfClose {
    /// A new request started on the connection.
    pub(crate) fn new_request(&self) {
        self.0.admitted.store(false, Ordering::Release);
    }

    /// The request was admitted to the app.
    pub(crate) fn admitted(&self) {
        self.0.admitted.store(true, Ordering::Release);
    }

    /// Whether a half-close now leaves a request to answer: it was admitted.
    pub(crate) fn answerable(&self) -> bool {
        self.0.admitted.load(Ordering::Acquire)
    }

    /// The client's stream ended while its request was admitted.
    pub(crate) fn client_ended(&self) {
        self.0.ended.store(true, Ordering::Release);
        self.0.body.wake();
    }

    /// Whether the client's stream has ended, for a body waiting for more bytes; `waker` is
    /// woken when it does.
    pub(crate) fn ended(&self, waker: &Waker) -> bool {
        self.0.body.register(waker);
        self.0.ended.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_admitted_request_is_answered_after_a_half_close() {
        let state = HalfClose::default();
        assert!(!state.answerable(), "nothing started");
        state.new_request();
        assert!(!state.answerable(), "queued");
        state.admitted();
        assert!(state.answerable());
        state.new_request();
        assert!(!state.answerable(), "the next request starts over");
    }

    #[test]
    fn a_waiting_body_learns_that_the_stream_ended() {
        let state = HalfClose::default();
        let waker = futures_util::task::noop_waker();
        assert!(!state.ended(&waker));
        state.client_ended();
        assert!(state.ended(&waker));
    }
}
