//! The bridge from hyper's `&self` service to the connection's tower stack.
//!
//! hyper calls its service through a shared reference, while a tower service needs `&mut self`
//! and a `poll_ready` before each call. The usual bridge clones the whole stack for every
//! request (and drops it after), which for tidegate's stack means a dozen reference counts
//! taken and released per request. The connection owns its stack alone, and hyper calls it
//! from the connection's task one request at a time, so a `RefCell` gives the `&mut` without
//! any clone; a stack that is not ready at once is served by a clone that waits, as before.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

use futures_util::future::Either;
use http::Request;
use tower::Service;
use tower::util::{Oneshot, ServiceExt};

/// A tower service owned by one connection, callable by hyper.
#[derive(Debug)]
pub(super) struct HyperService<S> {
    inner: RefCell<S>,
}

impl<S> HyperService<S> {
    /// Wraps the connection's stack.
    pub(super) fn new(inner: S) -> HyperService<S> {
        HyperService {
            inner: RefCell::new(inner),
        }
    }
}

impl<S, B> hyper::service::Service<Request<B>> for HyperService<S>
where
    S: Service<Request<B>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Oneshot<S, Request<B>>>;

    fn call(&self, request: Request<B>) -> Self::Future {
        // hyper never calls while a previous `call` is still on the stack, so the borrow
        // cannot fail.
        let mut inner = self.inner.borrow_mut();
        match inner.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(inner.call(request)),
            // Not ready (or failed): a clone waits for readiness (or reports the error)
            // in the request's own future, woken by the real task.
            _ => Either::Right(inner.clone().oneshot(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::service::Service as _;

    use super::*;

    /// Counts its clones; ready only after `ready_after` polls of `poll_ready`.
    #[derive(Debug)]
    struct Probe {
        clones: Arc<AtomicUsize>,
        ready_after: usize,
        polls: usize,
    }

    impl Clone for Probe {
        fn clone(&self) -> Probe {
            self.clones.fetch_add(1, Ordering::Relaxed);
            Probe {
                clones: self.clones.clone(),
                ready_after: self.ready_after,
                polls: self.polls,
            }
        }
    }

    impl Service<Request<()>> for Probe {
        type Response = &'static str;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, Self::Error>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.polls += 1;
            if self.polls > self.ready_after {
                Poll::Ready(Ok(()))
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            assert!(self.polls > self.ready_after, "called before ready");
            self.polls = 0;
            Box::pin(async { Ok("served") })
        }
    }

    fn probe(ready_after: usize) -> (HyperService<Probe>, Arc<AtomicUsize>) {
        let clones = Arc::new(AtomicUsize::new(0));
        let service = HyperService::new(Probe {
            clones: clones.clone(),
            ready_after,
            polls: 0,
        });
        (service, clones)
    }

    #[tokio::test]
    async fn a_ready_stack_is_called_without_a_clone() {
        let (service, clones) = probe(0);
        for _ in 0..3 {
            assert_eq!(service.call(Request::new(())).await, Ok("served"));
        }
        assert_eq!(clones.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_stack_not_ready_yet_is_served_by_a_clone_that_waits() {
        let (service, clones) = probe(2);
        assert_eq!(service.call(Request::new(())).await, Ok("served"));
        assert_eq!(clones.load(Ordering::Relaxed), 1);
    }
}
