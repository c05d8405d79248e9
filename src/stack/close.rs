//! Once shutdown starts, HTTP/1.x responses carry `Connection: close`, so that clients with
//! pooled keep-alive connections reconnect (and reach another pod) instead of reusing this one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::drain::Lifecycle;

/// Layer producing [`CloseOnShutdown`].
#[derive(Clone, Debug)]
pub(crate) struct CloseOnShutdownLayer {
    lifecycle: Lifecycle,
}

/// Adds `Connection: close` to HTTP/1.x responses sent once shutdown has started.
#[derive(Clone, Debug)]
pub(crate) struct CloseOnShutdown<S> {
    inner: S,
    lifecycle: Lifecycle,
}

pin_project! {
    /// Future returned by [`CloseOnShutdown`]: checks the phase when the response is ready,
    /// so a long request started before SIGTERM still closes its connection.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        lifecycle: Option<Lifecycle>,
    }
}

// === impl CloseOnShutdownLayer ===

impl CloseOnShutdownLayer {
    /// A layer that watches `lifecycle`.
    pub(crate) fn new(lifecycle: Lifecycle) -> CloseOnShutdownLayer {
        CloseOnShutdownLayer { lifecycle }
    }
}

impl<S> Layer<S> for CloseOnShutdownLayer {
    type Service = CloseOnShutdown<S>;

    fn layer(&self, inner: S) -> CloseOnShutdown<S> {
        CloseOnShutdown {
            inner,
            lifecycle: self.lifecycle.clone(),
        }
    }
}

// === impl CloseOnShutdown ===

impl<S, B, RB> Service<Request<B>> for CloseOnShutdown<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // HTTP/2 has no Connection header: those connections get GOAWAY from the server loop.
        let http1 = request.version() <= Version::HTTP_11;
        ResponseFuture {
            inner: self.inner.call(request),
            lifecycle: http1.then(|| self.lifecycle.clone()),
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(lifecycle)) = (&mut result, this.lifecycle.as_ref())
            && lifecycle.is_shutting_down()
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(result)
    }
}
