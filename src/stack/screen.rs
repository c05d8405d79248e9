//! Refuses requests that break the request limits or HTTP's framing rules before they take a
//! slot: a request target longer than `--max-uri-bytes` (414), more header fields than
//! `--max-headers` (431), an HTTP/1.1 request without exactly one valid `Host` (400).
//!
//! hyper has already refused what cannot be parsed (invalid bytes, obs-fold, conflicting
//! `Content-Length`s, a `Transfer-Encoding` that does not end in `chunked`, a head larger than
//! `--max-header-bytes`); body limits are enforced by the limiter and the request body.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Version, header};
use tower::{Layer, Service};

use crate::config::LiveConfig;
use crate::error::{BoxError, Rejected};
use crate::metrics::RequestMetrics;
use std::sync::Arc;

/// Layer producing [`Screen`].
#[derive(Clone, Debug)]
pub(crate) struct ScreenLayer {
    live: LiveConfig,
    metrics: Arc<RequestMetrics>,
}

/// Checks each request against the limits in force before calling the inner service.
#[derive(Clone, Debug)]
pub(crate) struct Screen<S> {
    inner: S,
    live: LiveConfig,
    metrics: Arc<RequestMetrics>,
}

/// Future returned by [`Screen`]: the refusal, or the inner service's future untouched.
pub(crate) type ResponseFuture<F, T> = Either<Ready<Result<T, BoxError>>, F>;

// === impl ScreenLayer ===

impl ScreenLayer {
    /// A layer reading the limits from `live` on each request and counting refusals.
    pub(crate) fn new(live: LiveConfig, metrics: Arc<RequestMetrics>) -> ScreenLayer {
        ScreenLayer { live, metrics }
    }
}

impl<S> Layer<S> for ScreenLayer {
    type Service = Screen<S>;

    fn layer(&self, inner: S) -> Screen<S> {
        Screen {
            inner,
            live: self.live.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

// === impl Screen ===

impl<S, B> Service<Request<B>> for Screen<S>
where
    S: Service<Request<B>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limits = {
            let config = self.live.peek();
            Limits {
                max_uri_bytes: config.args.max_uri_bytes.as_u64(),
                max_headers: config.args.max_headers,
            }
        };
        match limits.check(&request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(rejected) => {
                self.metrics.count_rejection(&rejected);
                Either::Left(ready(Err(rejected.into())))
            }
        }
    }
}

/// The limits one request is checked against.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Limits {
    /// Longest request target (path and query) in bytes.
    pub max_uri_bytes: u64,
    /// Most header fields.
    pub max_headers: u32,
}

// === impl Limits ===

impl Limits {
    /// Whether `request` may go on to admission, or why not.
    pub(crate) fn check<B>(&self, request: &Request<B>) -> Result<(), Rejected> {
        let target = request
            .uri()
            .path_and_query()
            .map_or(1, |pq| pq.as_str().len());
        if target as u64 > self.max_uri_bytes {
            return Err(Rejected::UriTooLong {
                limit: self.max_uri_bytes,
            });
        }
        if request.headers().len() > self.max_headers as usize {
            return Err(Rejected::TooManyHeaders {
                limit: self.max_headers,
            });
        }
        if request.version() == Version::HTTP_11 {
            check_host(request)?;
        }
        Ok(())
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`, and it is a valid authority.
fn check_host<B>(request: &Request<B>) -> Result<(), Rejected> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Err(Rejected::BadHost("missing"));
    };
    if hosts.next().is_some() {
        return Err(Rejected::BadHost("more than one"));
    }
    // Empty is allowed when the target has no authority (RFC 9112 §3.2); anything else must
    // parse as host[:port], with no userinfo.
    let value = host.as_bytes();
    if value.is_empty() {
        return Ok(());
    }
    match http::uri::Authority::try_from(value) {
        Ok(authority) if !authority.as_str().contains('@') => Ok(()),
        _ => Err(Rejected::BadHost("not a valid host[:port]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_uri_bytes: 32,
        max_headers: 3,
    };

    fn request(target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::get(target);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn target_length_is_limited() {
        assert!(LIMITS.check(&request("/short?q=1", &["a"])).is_ok());
        let long = format!("/{}", "x".repeat(32));
        let err = LIMITS.check(&request(&long, &["a"])).unwrap_err();
        assert_eq!(err.status(), 414);
    }

    #[test]
    fn header_count_is_limited() {
        let mut req = request("/", &["a"]);
        for name in ["x-1", "x-2"] {
            req.headers_mut().insert(name, "v".parse().unwrap());
        }
        assert!(LIMITS.check(&req).is_ok());
        req.headers_mut().insert("x-3", "v".parse().unwrap());
        assert_eq!(LIMITS.check(&req).unwrap_err().status(), 431);
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        for (hosts, ok) in [
            (&[][..], false),
            (&["a.example"][..], true),
            (&["a.example:8080"][..], true),
            (&["[::1]:80"][..], true),
            (&[""][..], true),
            (&["a.example", "b.example"][..], false),
            (&["user@a.example"][..], false),
            (&["a b"][..], false),
            (&["a.example/path"][..], false),
        ] {
            let result = LIMITS.check(&request("/", hosts));
            assert_eq!(result.is_ok(), ok, "{hosts:?}: {result:?}");
        }
        let mut old = request("/", &[]);
        *old.version_mut() = Version::HTTP_10;
        assert!(LIMITS.check(&old).is_ok(), "HTTP/1.0 may omit Host");
    }
}
