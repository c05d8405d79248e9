//! The tower layer in front of the proxy: admission only, for a request the route stage has
//! classified. Admission happens in `call`, not `poll_ready`: it depends on the request (its
//! route and class), and a wait in the queue must belong to the request, bounded and cancelled
//! with it. Admission and refusal are decided in `call` and
//! cost no allocation; only a request that must queue gets a boxed wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Request;
use tower::{Layer, Service};

use super::route::Routed;
use crate::admission::{Admission, Admitted, Entry, Limiter};
use crate::error::{BoxError, Overloaded};

/// Layer producing [`Limit`].
#[derive(Clone, Debug)]
pub(crate) struct LimitLayer {
    limiter: Limiter,
}

/// Admits each request through a shared [`Limiter`] before calling the inner service.
#[derive(Clone, Debug)]
pub(crate) struct Limit<S> {
    inner: S,
    limiter: Limiter,
}

/// A queued request's wait for its slot, holding the request and the inner service (ready) to
/// call once admitted. Boxed whole, so that the future of a request admitted at once stays
/// small: every layer outside moves it.
type Wait<S, B> =
    Pin<Box<dyn Future<Output = Result<(Admission, Request<B>, S), Overloaded>> + Send>>;

pin_project_lite::pin_project! {
    /// Future returned by [`Limit`].
    pub(crate) struct ResponseFuture<S, B>
    where
        S: Service<Admitted<Request<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Admitted<Request<B>>>,
    {
        // In the queue.
        Queued { wait: Wait<S, B> },
        // Admitted: the inner service's exchange.
        Admitted { #[pin] future: S::Future },
        // Refused before admission.
        Refused { error: Option<BoxError> },
    }
}

// === impl LimitLayer ===

impl LimitLayer {
    /// A layer admitting requests through `limiter` (shared by every connection).
    pub(crate) fn new(limiter: Limiter) -> LimitLayer {
        LimitLayer { limiter }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

// === impl Limit ===

impl<S, B> Service<Routed<Request<B>>> for Limit<S>
where
    S: Service<Admitted<Request<B>>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Ready when the inner service is: waiting for a slot happens per request in `call`.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, routed: Routed<Request<B>>) -> Self::Future {
        let Routed {
            request,
            route,
            class,
        } = routed;
        match self.limiter.enter(route, class) {
            Ok(Entry::Admitted(admission)) => ResponseFuture::new(State::Admitted {
                future: self.inner.call(Admitted { request, admission }),
            }),
            Ok(Entry::Queued(queued)) => {
                // The ready service goes with the request; this layer keeps a fresh clone,
                // which is made ready on the next `poll_ready`.
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::new(State::Queued {
                    wait: Box::pin(async move {
                        let admission = queued.wait().await?;
                        Ok((admission, request, inner))
                    }),
                })
            }
            Err(overloaded) => ResponseFuture::new(State::Refused {
                error: Some(overloaded.into()),
            }),
        }
    }
}

// === impl ResponseFuture ===

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Admitted<Request<B>>>,
{
    fn new(state: State<S, B>) -> Self {
        ResponseFuture { state }
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Admitted<Request<B>>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Queued { wait } => {
                    let (admission, request, mut inner) = ready!(wait.as_mut().poll(cx))?;
                    let future = inner.call(Admitted { request, admission });
                    state.set(State::Admitted { future });
                }
                StateProj::Admitted { future } => {
                    return future.poll(cx).map_err(Into::into);
                }
                StateProj::Refused { error } => {
                    // `None` only if polled after completion, a contract violation by the
                    // caller: never resolve.
                    return match error.take() {
                        Some(error) => Poll::Ready(Err(error)),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_test::{assert_pending, assert_ready_ok};
    use tower_test::mock;

    use super::*;
    use crate::admission::LimitConfig;
    use crate::admission::metrics::AdmissionMetrics;
    use crate::error::{Overloaded, ShedReason, find_cause};

    type Mock = mock::Mock<Admitted<Request<()>>, &'static str>;
    type Handle = mock::Handle<Admitted<Request<()>>, &'static str>;

    fn setup(n: u32, q: usize) -> (Limit<Mock>, Handle, Arc<AdmissionMetrics>) {
        let metrics = crate::app::Metrics::new().unwrap();
        let limiter = Limiter::new(
            &LimitConfig {
                max_concurrency: Some(n),
                max_queue: q,
                queue_timeout: Duration::from_secs(1),
                routes: vec![],
                ..LimitConfig::default()
            },
            metrics.admission.clone(),
            metrics.requests.clone(),
        );
        let (service, handle) = mock::pair();
        (
            LimitLayer::new(limiter).layer(service),
            handle,
            metrics.admission,
        )
    }

    /// A call on `svc` as tower's contract has it: after `poll_ready` says ready.
    fn call(svc: &mut Limit<Mock>) -> ResponseFuture<Mock, ()> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let request = Request::get("/").body(()).unwrap();
        let route = svc.limiter.route(request.method(), request.uri().path());
        svc.call(Routed {
            request,
            route,
            class: Default::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_when_full_and_recovers_when_a_slot_frees() {
        let (mut svc, mut handle, metrics) = setup(1, 0);
        let mut first = tokio_test::task::spawn(call(&mut svc));
        assert_pending!(first.poll());
        let (admitted, respond) = handle.next_request().await.unwrap();

        let err = call(&mut svc).await.unwrap_err();
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

        let mut second = tokio_test::task::spawn(call(&mut svc));
        assert_pending!(second.poll());
        let (_admitted, respond) = handle.next_request().await.unwrap();
        respond.send_response("again");
        assert_eq!(assert_ready_ok!(second.poll()), "again");
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_propagate_and_free_the_slot() {
        let (mut svc, mut handle, metrics) = setup(1, 0);
        let call = tokio::spawn(call(&mut svc));
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
        let _first = tokio::spawn(call(&mut svc));
        let (held, _respond1) = handle.next_request().await.unwrap();
        let second = tokio::spawn(call(&mut svc));
        tokio::task::yield_now().await;
        assert_eq!(metrics.queued.get(), 1);
        drop(held);
        let (_admitted, respond2) = handle.next_request().await.unwrap();
        respond2.send_response("second");
        assert_eq!(second.await.unwrap().unwrap(), "second");
        assert_eq!(metrics.queued.get(), 0);
    }
}
