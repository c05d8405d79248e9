//! The outermost layer: counts every response by status, times it to the response head, and
//! writes the access log line while `--access-log` is on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use tower::{Layer, Service};

use crate::config::LiveConfig;
use crate::metrics::RequestMetrics;

/// Tower layer that records [`Metrics`] for every request (see [`Record`]).
#[derive(Clone, Debug)]
pub(crate) struct RecordLayer {
    metrics: Arc<RequestMetrics>,
    live: LiveConfig,
}

/// Service produced by [`RecordLayer`]: counts responses, times them, writes the access log.
#[derive(Clone, Debug)]
pub(crate) struct Record<S> {
    inner: S,
    metrics: Arc<RequestMetrics>,
    live: LiveConfig,
}

pin_project_lite::pin_project! {
    /// Future returned by [`Record`]: the inner future, then the response counted and timed.
    pub(crate) struct RecordFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        metrics: Arc<RequestMetrics>,
        // Boxed: the access log is off on the hot path, and the future stays small.
        log: Option<Box<AccessLine>>,
    }
}

/// What the access log says of a request, taken before the request moves on.
#[derive(Debug)]
struct AccessLine {
    method: http::Method,
    path: String,
    version: http::Version,
}

// === impl RecordLayer ===

impl RecordLayer {
    /// A layer recording request metrics, with an access log line per request while the
    /// live config's `access_log` is on.
    pub(crate) fn new(metrics: Arc<RequestMetrics>, live: LiveConfig) -> RecordLayer {
        RecordLayer { metrics, live }
    }
}

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Record<S> {
        Record {
            inner,
            metrics: self.metrics.clone(),
            live: self.live.clone(),
        }
    }
}

// === impl Record ===

impl<S, B, RB> Service<Request<B>> for Record<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = RecordFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        let log = self.live.peek().args.access_log.then(|| {
            Box::new(AccessLine {
                method: req.method().clone(),
                path: req.uri().path().to_owned(),
                version: req.version(),
            })
        });
        RecordFuture {
            inner: self.inner.call(req),
            start,
            metrics: self.metrics.clone(),
            log,
        }
    }
}

// === impl RecordFuture ===

impl<F, RB, E> Future for RecordFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(rsp) = &result {
            let elapsed = this.start.elapsed();
            let status = rsp.status();
            this.metrics.count_response(status);
            this.metrics.request_duration.observe(elapsed.as_secs_f64());
            if let Some(line) = this.log.take() {
                tracing::info!(
                    target: "tidegate::access",
                    method = %line.method,
                    path = %line.path,
                    version = ?line.version,
                    status = status.as_u16(),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    "Request"
                );
            }
        }
        Poll::Ready(result)
    }
}
