//! The route stage: each request is classified once, here, and the layers after it read the
//! result from one typed value, [`Routed`], never by looking it up again.
//!
//! What it decides: the request's route (its bulkhead, upstream timeout, `Retry-After`,
//! coalescing and cache settings), the body limit that applies (the route's, else
//! `--max-request-body`), and its class in the queue (priority, retry). A body whose declared
//! length is over the limit is refused here with a 413, before it can take a slot or a queue
//! place; a body without a declared length is checked as it streams (`outbound`).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use crate::admission::{Limiter, RequestClass, RouteRef};
use crate::error::{BoxError, Rejected};

/// A request with what the route stage decided about it.
#[derive(Debug)]
pub(crate) struct Routed<R> {
    /// The request.
    pub request: R,
    /// Its route and the body limit that applies to it.
    pub route: RouteRef,
    /// Its place in the queue order.
    pub class: RequestClass,
}

/// Layer producing [`Route`].
#[derive(Clone, Debug)]
pub(crate) struct RouteLayer {
    limiter: Limiter,
    client: Option<IpAddr>,
}

/// Classifies each request once and hands the inner service a [`Routed`] request.
#[derive(Clone, Debug)]
pub(crate) struct Route<S> {
    inner: S,
    limiter: Limiter,
    /// The connection's client, for `--retry-memory`.
    client: Option<IpAddr>,
}

pin_project_lite::pin_project! {
    /// Future returned by [`Route`]: the inner service's, or a refusal. Small beside the
    /// inner future, as every layer outside moves it.
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        /// The inner service's.
        Inner { #[pin] future: F },
        /// Refused here (`None` once returned).
        Refused { error: Option<BoxError> },
    }
}

// === impl RouteLayer ===

impl RouteLayer {
    /// A layer classifying requests with `limiter`'s routes and classifier (shared by every
    /// connection).
    pub(crate) fn new(limiter: Limiter) -> RouteLayer {
        RouteLayer {
            limiter,
            client: None,
        }
    }

    /// The layer for one client connection from `addr`.
    pub(crate) fn for_client(&self, addr: SocketAddr) -> RouteLayer {
        RouteLayer {
            limiter: self.limiter.clone(),
            client: Some(addr.ip().to_canonical()),
        }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            limiter: self.limiter.clone(),
            client: self.client,
        }
    }
}

// === impl Route ===

impl<S, B> Service<Request<B>> for Route<S>
where
    S: Service<Routed<Request<B>>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // One snapshot of the settings for the request's lookups.
        let in_force = self.limiter.in_force();
        let route = in_force.route(request.method(), request.uri().path());
        if let Some(limit) = route.max_request_body()
            && declared_length(&request).is_some_and(|len| len > limit)
        {
            let error = self.limiter.reject(Rejected::BodyTooLarge { limit });
            return ResponseFuture::Refused {
                error: Some(error.into()),
            };
        }
        let class = in_force.classify(request.headers(), &route, self.client);
        drop(in_force);
        ResponseFuture::Inner {
            future: self.inner.call(Routed {
                request,
                route,
                class,
            }),
        }
    }
}

// === impl ResponseFuture ===

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Inner { future } => future.poll(cx).map_err(Into::into),
            // `None` only if polled after completion, a contract violation: never resolve.
            ResponseFutureProj::Refused { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
        }
    }
}

/// The request's `Content-Length`, if it has a valid one (hyper has already refused invalid or
/// conflicting values on HTTP/1; on HTTP/2 the stream's data is checked against it).
fn declared_length<B>(request: &Request<B>) -> Option<u64> {
    request
        .headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
