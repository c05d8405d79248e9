//! Turns every failure into a response from tidegate itself. The only place statuses for
//! failures are chosen, by whose fault it was:
//!
//! | cause                         | status | header                                  |
//! |-------------------------------|--------|-----------------------------------------|
//! | shed (queue, route, draining, queue delay, evicted, coalescing) | 503 | `tidegate-shed: <reason>`, `Retry-After` |
//! | connect refused / no socket   | 502    | `tidegate-error: upstream-connect`       |
//! | connection reset / closed     | 502    | `tidegate-error: upstream-reset`         |
//! | connect timeout               | 504    | `tidegate-error: upstream-connect-timeout` |
//! | response timeout              | 504    | `tidegate-error: upstream-timeout`       |
//! | request breaks a limit        | 413, 414, 431 | `tidegate-error: <limit>`        |
//! | bad `Host`, malformed body    | 400    | `tidegate-error: bad-host` / `bad-body`  |
//! | anything else                 | 500    | `tidegate-error: internal`               |

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use tower::{Layer, Service};

use crate::config::LiveConfig;
use crate::error::{
    BoxError, ErrorChain, Overloaded, Rejected, UpstreamConnect, UpstreamConnectTimeout,
    UpstreamReset, UpstreamTimeout, find_cause, is_caused_by,
};
use crate::outbound::response_body::ResponseBody;

/// Header naming why tidegate refused a request.
pub(crate) const TIDEGATE_SHED: HeaderName = HeaderName::from_static("tidegate-shed");
/// Header naming the failure tidegate answered for.
pub(crate) const TIDEGATE_ERROR: HeaderName = HeaderName::from_static("tidegate-error");

/// How `Retry-After` is chosen for refusals: `base` plus a random whole number of seconds up
/// to `jitter`, so refused clients do not come back in lockstep.
#[derive(Copy, Clone, Debug)]
pub(crate) struct RetryAfter {
    /// Smallest value sent.
    pub base: Duration,
    /// Largest random addition.
    pub jitter: Duration,
}

/// Layer producing [`Rescue`].
#[derive(Clone, Debug)]
pub(crate) struct RescueLayer {
    live: LiveConfig,
}

/// Maps the inner service's errors to responses; its own error type is [`Infallible`].
#[derive(Clone, Debug)]
pub(crate) struct Rescue<S> {
    inner: S,
    live: LiveConfig,
}

pin_project_lite::pin_project! {
    /// Future returned by [`Rescue`]: the inner future, its error turned into a response.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        http1: bool,
        live: LiveConfig,
    }
}

// === impl RetryAfter ===

impl RetryAfter {
    /// Picks a value in whole seconds (at least 1); `base` overrides the configured base.
    pub(crate) fn pick(&self, base: Option<Duration>) -> u64 {
        let base = base.unwrap_or(self.base).as_secs().max(1);
        let jitter = self.jitter.as_secs();
        base + if jitter == 0 {
            0
        } else {
            fastrand::u64(0..=jitter)
        }
    }
}

// === impl RescueLayer ===

impl RescueLayer {
    /// A rescue layer; the `Retry-After` policy is read from the live config on each refusal.
    pub(crate) fn new(live: LiveConfig) -> RescueLayer {
        RescueLayer { live }
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            live: self.live.clone(),
        }
    }
}

// === impl Rescue ===

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            // The inner services never fail readiness; if one did, `call` reports it.
            Poll::Ready(Err(_)) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        ResponseFuture {
            http1: request.version() <= Version::HTTP_11,
            inner: self.inner.call(request),
            live: self.live.clone(),
        }
    }
}

// === impl ResponseFuture ===

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, BoxError>>,
{
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let error = match ready!(this.inner.poll(cx)) {
            Ok(response) => return Poll::Ready(Ok(response)),
            Err(error) => error,
        };
        let config = this.live.load();
        let retry_after = RetryAfter {
            base: config.args.retry_after,
            jitter: config.args.retry_after_jitter,
        };
        let mut response = to_response(&*error, retry_after);
        // A client that broke the protocol or a limit does not get to send more on this
        // connection (its framing may be off).
        if *this.http1 && is_caused_by::<Rejected>(&*error) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}

/// The response tidegate sends for `error`.
pub(crate) fn to_response(
    error: &(dyn std::error::Error + 'static),
    retry_after: RetryAfter,
) -> Response<ResponseBody> {
    if let Some(shed) = find_cause::<Overloaded>(error) {
        let mut rsp = local(StatusCode::SERVICE_UNAVAILABLE, "overloaded, retry later\n");
        let h = rsp.headers_mut();
        h.insert(
            TIDEGATE_SHED,
            HeaderValue::from_static(shed.reason.as_str()),
        );
        h.insert(
            header::RETRY_AFTER,
            seconds(retry_after.pick(shed.retry_after)),
        );
        return rsp;
    }
    if let Some(rejected) = find_cause::<Rejected>(error) {
        tracing::debug!(error = %ErrorChain(error), "Rejected a request");
        let mut rsp = local(rejected.status(), format!("{rejected}\n"));
        rsp.headers_mut()
            .insert(TIDEGATE_ERROR, HeaderValue::from_static(rejected.as_str()));
        return rsp;
    }
    let (status, kind, body) = if is_caused_by::<UpstreamConnectTimeout>(error) {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-connect-timeout",
            "upstream connect timed out\n",
        )
    } else if is_caused_by::<UpstreamTimeout>(error) {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "upstream timed out\n",
        )
    } else if is_caused_by::<UpstreamConnect>(error) {
        (
            StatusCode::BAD_GATEWAY,
            "upstream-connect",
            "upstream unreachable\n",
        )
    } else if is_caused_by::<UpstreamReset>(error) {
        (
            StatusCode::BAD_GATEWAY,
            "upstream-reset",
            "upstream closed the connection\n",
        )
    } else {
        tracing::warn!(error = %ErrorChain(error), "Internal error");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal proxy error\n",
        )
    };
    tracing::debug!(error = %ErrorChain(error), status = status.as_u16(), "Answering for the app");
    let mut rsp = local(status, body);
    rsp.headers_mut()
        .insert(TIDEGATE_ERROR, HeaderValue::from_static(kind));
    rsp
}

fn local(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    // No `Content-Length` field: the body's size is exact, and hyper writes it from that
    // (without the allocation a numeric header value costs).
    let mut rsp = Response::new(ResponseBody::Local(Some(body.into())));
    *rsp.status_mut() = status;
    // Room for every field a local response gets, so that the map is allocated once.
    *rsp.headers_mut() = http::HeaderMap::with_capacity(5);
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rsp
}

/// A number of seconds as a header value; the small ones `Retry-After` usually takes are
/// static, so that a refusal does not allocate for it.
fn seconds(n: u64) -> HeaderValue {
    const SMALL: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ShedReason;

    const RETRY: RetryAfter = RetryAfter {
        base: Duration::from_secs(1),
        jitter: Duration::from_secs(2),
    };

    #[test]
    fn shed_is_503_with_reason_and_retry_after() {
        let rsp = to_response(
            &Overloaded {
                reason: ShedReason::QueueTimeout,
                retry_after: None,
            },
            RETRY,
        );
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()[TIDEGATE_SHED], "queue-timeout");
        let secs: u64 = rsp.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&secs));
    }

    #[test]
    fn route_retry_after_overrides_the_base() {
        let shed = Overloaded {
            reason: ShedReason::RouteFull,
            retry_after: Some(Duration::from_secs(30)),
        };
        let secs: u64 = to_response(&shed, RETRY).headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((30..=32).contains(&secs), "{secs}");
    }

    #[test]
    fn seconds_render_small_and_large_values_alike() {
        for n in [0, 1, 9, 10, 11, 60, 3600, u64::MAX] {
            assert_eq!(seconds(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn jitter_spreads_retry_after() {
        let seen: std::collections::HashSet<u64> = (0..200).map(|_| RETRY.pick(None)).collect();
        assert!(seen.len() > 1, "{seen:?}");
        assert!(seen.iter().all(|s| (1..=3).contains(s)));
    }

    #[test]
    fn upstream_failures_map_by_fault() {
        let connect = UpstreamConnect(Box::new(std::io::Error::other("refused")));
        assert_eq!(to_response(&connect, RETRY).status(), 502);
        assert_eq!(to_response(&UpstreamTimeout, RETRY).status(), 504);
        assert_eq!(to_response(&UpstreamConnectTimeout, RETRY).status(), 504);
        let other = std::io::Error::other("boom");
        let rsp = to_response(&other, RETRY);
        assert_eq!(rsp.status(), 500);
        assert_eq!(rsp.headers()[TIDEGATE_ERROR], "internal");
    }
}
