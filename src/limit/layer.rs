//! The tower layer in front of the proxy: admission happens in `call`, not `poll_ready`,
//! because hyper drives every request with its own clone of the stack.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service, ServiceExt};

use super::{Admission, Limiter, RouteRef};
use crate::error::{BoxError, Rejected};

/// A request that holds an [`Admission`]; the inner service must keep the admission alive
/// until its exchange with the app is over.
#[derive(Debug)]
pub struct Admitted<R> {
    /// The request.
    pub request: R,
    /// The slot(s) it holds.
    pub admission: Admission,
}

/// Layer producing [`Limit`].
#[derive(Clone, Debug)]
pub struct LimitLayer {
    limiter: Limiter,
    client: Option<IpAddr>,
}

/// Admits each request through a shared [`Limiter`] before calling the inner service.
#[derive(Clone, Debug)]
pub struct Limit<S> {
    inner: S,
    limiter: Limiter,
    /// The connection's client, for `--retry-memory`.
    client: Option<IpAddr>,
}

/// Future returned by [`Limit`].
pub type ResponseFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

// === impl LimitLayer ===

impl LimitLayer {
    /// A layer admitting requests through `limiter` (shared by every connection).
    pub fn new(limiter: Limiter) -> LimitLayer {
        LimitLayer {
            limiter,
            client: None,
        }
    }

    /// The layer for one client connection from `addr`.
    pub fn for_client(&self, addr: SocketAddr) -> LimitLayer {
        LimitLayer {
            limiter: self.limiter.clone(),
            client: Some(addr.ip().to_canonical()),
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limiter: self.limiter.clone(),
            client: self.client,
        }
    }
}

// === impl Limit ===

impl<S, B> Service<Request<B>> for Limit<S>
where
    S: Service<Admitted<Request<B>>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: waiting happens per request in `call`, where it is bounded and
        // cancellable. The inner service is driven to readiness after admission.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let mut inner = self.inner.clone();
        let limiter = self.limiter.clone();
        let client = self.client;
        Box::pin(async move {
            // The coalescing layer in front may have looked the route up already.
            let route = match request.extensions_mut().remove::<RouteRef>() {
                Some(route) => route,
                None => limiter.route(request.method(), request.uri().path()),
            };
            // A body declared too large is refused before it takes a slot or a queue place.
            if let Some(limit) = route.max_request_body()
                && declared_length(&request).is_some_and(|len| len > limit)
            {
                return Err(limiter.reject(Rejected::BodyTooLarge { limit }).into());
            }
            let class = limiter.classify(request.headers(), &route, client);
            let admission = limiter.admit(route, class).await?;
            inner
                .ready()
                .await
                .map_err(Into::into)?
                .call(Admitted { request, admission })
                .await
                .map_err(Into::into)
        })
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_test::{assert_pending, assert_ready_ok};
    use tower_test::mock;

    use super::*;
    use crate::error::{Overloaded, ShedReason, find_cause};
    use crate::limit::LimitConfig;
    use crate::metrics::Metrics;

    type Mock = mock::Mock<Admitted<Request<()>>, &'static str>;
    type Handle = mock::Handle<Admitted<Request<()>>, &'static str>;

    fn setup(n: u32, q: usize) -> (Limit<Mock>, Handle, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new().unwrap());
        let limiter = Limiter::new(
            &LimitConfig {
                max_concurrency: Some(n),
                max_queue: q,
                queue_timeout: Duration::from_secs(1),
                routes: vec![],
                ..LimitConfig::default()
            },
            &metrics,
        );
        let (service, handle) = mock::pair();
        (LimitLayer::new(limiter).layer(service), handle, metrics)
    }

    fn req() -> Request<()> {
        Request::get("/").body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_when_full_and_recovers_when_a_slot_frees() {
        let (mut svc, mut handle, metrics) = setup(1, 0);
        let mut first = tokio_test::task::spawn(svc.call(req()));
        assert_pending!(first.poll());
        let (admitted, respond) = handle.next_request().await.unwrap();

        let err = svc.call(req()).await.unwrap_err();
        let shed = find_cause::<Overloaded>(&*err).unwrap();
        assert_eq!(shed.reason, ShedReason::QueueFull);

        respond.send_response("ok");
        assert_ready_ok!(first.poll());
        assert_eq!(
            metrics.in_flight.get(),
            1,
            "admission lives as long as the exchange"
        );
        drop(admitted);
        assert_eq!(metrics.in_flight.get(), 0);

        let mut second = tokio_test::task::spawn(svc.call(req()));
        assert_pending!(second.poll());
        let (_admitted, respond) = handle.next_request().await.unwrap();
        respond.send_response("again");
        assert_eq!(assert_ready_ok!(second.poll()), "again");
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_propagate_and_free_the_slot() {
        let (mut svc, mut handle, metrics) = setup(1, 0);
        let call = tokio::spawn(svc.call(req()));
        let (admitted, respond) = handle.next_request().await.unwrap();
        drop(admitted);
        respond.send_error(std::io::Error::other("boom"));
        let err = call.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(metrics.in_flight.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_is_admitted_when_a_slot_frees() {
        let (mut svc, mut handle, metrics) = setup(1, 1);
        let _first = tokio::spawn(svc.call(req()));
        let (held, _respond1) = handle.next_request().await.unwrap();
        let second = tokio::spawn(svc.call(req()));
        tokio::task::yield_now().await;
        assert_eq!(metrics.queued.get(), 1);
        drop(held);
        let (_admitted, respond2) = handle.next_request().await.unwrap();
        respond2.send_response("second");
        assert_eq!(second.await.unwrap().unwrap(), "second");
        assert_eq!(metrics.queued.get(), 0);
    }
}
