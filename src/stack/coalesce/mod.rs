//! Request coalescing: identical idempotent GETs share one exchange with the app.
//!
//! Opt-in per route (`coalesce = true`); without such a route the layer passes requests
//! through untouched. The first eligible request for a key (the *leader*)
//! goes through admission to the app as usual; identical requests arriving while it is in
//! flight (*followers*) take no slot and no queue place: they wait for the leader's response
//! and get a copy of it. This is the "cache the hot route" fix for a burst of identical
//! expensive requests, without a cache server.
//!
//! - **Key**: method, authority, path and query, plus the request's `Authorization` and
//!   `Cookie` (different users never share), and, checked once the response is known, the
//!   request headers it names in `Vary`.
//! - **Eligible requests**: `GET` or `HEAD` without a body, not an upgrade, and without
//!   `Cache-Control: no-store`/`no-cache` or `Pragma: no-cache`.
//! - **Shareable responses**: not `Cache-Control: no-store`/`private`, no `Set-Cookie`, no
//!   `Vary: *`, no trailers, and a body of at most `--coalesce-max-body`. Otherwise, or if the
//!   leader fails (an error, a refusal, its client leaving before the head), followers are sent
//!   to the app on their own, as if coalescing were off.
//!
//! Followers are bounded like the queue: at most `--coalesce-max-waiting` wait at once, each
//! at most `--coalesce-max-wait`; the excess and the late are refused (`503 coalesce-full`,
//! `coalesce-wait`), so a hung app cannot pile them up.
//!
//! With `coalesce_cache` on the route, shareable responses with an explicit lifetime are also
//! kept for a while (`cache`), and identical requests are answered from there.
//!
//! The leader's response body is read from the app in full (it is at most
//! `--coalesce-max-body`) before anyone gets it, so followers wait for the app, never for the
//! leader's client; the leader's client then gets it like the followers. A body that turns out
//! larger is streamed on to the leader after what was read, and the followers go alone.

mod cache;
pub(crate) mod metrics;
mod rules;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::TryFutureExt;
use futures_util::future::{Either, MapErr};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::{Layer, Service};

use self::metrics::{CoalesceMetrics, CoalesceOutcome};
use self::rules::{Key, bypasses_cache, key, shareable, vary_matches};
use super::route::Routed;
use crate::admission::{Limiter, RouteRef};
use crate::config::LiveConfig;
use crate::error::{BoxError, Overloaded, ShedReason};
use crate::metrics::LabelValues;
use crate::outbound::response_body::{ResponseBody, Resumed};

/// Layer producing [`Coalesce`].
#[derive(Clone, Debug)]
pub(crate) struct CoalesceLayer {
    shared: Arc<Shared>,
}

/// Lets identical GETs on coalescing routes share one exchange with the app.
#[derive(Clone, Debug)]
pub(crate) struct Coalesce<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Future of a coalesced (leader or follower) request.
pub(crate) type CoalescedFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

/// Future returned by [`Coalesce`]: the inner service's own, unboxed, for requests that are
/// not coalesced.
pub(crate) type ResponseFuture<F, E> = Either<MapErr<F, fn(E) -> BoxError>, CoalescedFuture>;

#[derive(Debug)]
struct Shared {
    live: LiveConfig,
    limiter: Limiter,
    metrics: Arc<CoalesceMetrics>,
    /// Followers waiting now, bounded by `--coalesce-max-waiting`.
    waiting: AtomicUsize,
    flights: Mutex<HashMap<Key, Arc<Flight>>>,
    cache: cache::Cache,
}

/// One leader's exchange, as followers see it.
#[derive(Debug)]
struct Flight {
    outcome: watch::Sender<Option<Arc<Outcome>>>,
    /// The leader's request headers, to compare the ones the response's `Vary` names.
    request_headers: HeaderMap,
}

#[derive(Debug)]
enum Outcome {
    /// The response, complete, for followers whose `Vary` headers match the leader's.
    Shared(Arc<SharedResponse>),
    /// Followers go to the app on their own.
    Alone,
}

/// A complete response, shared with followers and kept in the cache.
#[derive(Debug)]
struct SharedResponse {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

/// Held by the leader until it publishes; publishes `Alone` if dropped first.
#[derive(Debug)]
struct Publisher {
    shared: Arc<Shared>,
    key: Key,
    flight: Arc<Flight>,
}

/// A follower's place among those waiting; given back when dropped.
struct Waiting<'a>(&'a Shared);

// === impl CoalesceLayer ===

impl CoalesceLayer {
    /// A layer sharing one set of flights across every connection.
    pub(crate) fn new(
        live: LiveConfig,
        limiter: Limiter,
        metrics: Arc<CoalesceMetrics>,
    ) -> CoalesceLayer {
        CoalesceLayer {
            shared: Arc::new(Shared {
                live,
                limiter,
                metrics,
                waiting: AtomicUsize::new(0),
                flights: Mutex::new(HashMap::new()),
                cache: cache::Cache::default(),
            }),
        }
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Coalesce<S> {
        Coalesce {
            inner,
            shared: self.shared.clone(),
        }
    }
}

// === impl Coalesce ===

impl<S, B> Service<Routed<Request<B>>> for Coalesce<S>
where
    S: Service<Routed<Request<B>>, Response = Response<ResponseBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Routed<Request<B>>) -> Self::Future {
        let shared = &self.shared;
        let coalesces = request.route.coalesces();
        let cache_for = request.route.coalesce_cache();
        if cache_for.is_some() && !matches!(*request.request.method(), Method::GET | Method::HEAD) {
            return self.invalidating(request);
        }
        let key = if coalesces {
            key(&request.request)
        } else {
            None
        };
        let Some(key) = key else {
            return self.passthrough(request);
        };
        // Only a client that does not ask for a fresh copy is served from the cache; its
        // response may be stored either way.
        if cache_for.is_some()
            && !bypasses_cache(request.request.headers())
            && let Some(response) = shared.cache.get(&key, request.request.headers())
        {
            shared
                .metrics
                .coalesced
                .with_label_values(&[CoalesceOutcome::Cached.as_label()])
                .inc();
            return Either::Right(Box::pin(std::future::ready(Ok(response))));
        }
        // The clone is ready (tower's contract) only if this one is: swap them.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = shared.clone();
        Either::Right(Box::pin(async move {
            let joined = shared.join(&key, request.request.headers());
            match joined {
                Joined::Leader(publisher) => {
                    let response = inner.call(request).await.map_err(Into::into)?;
                    publisher.publish(response, cache_for).await
                }
                Joined::Follower(flight) => {
                    let headers = request.request.headers();
                    match shared.follow(&flight, headers, &request.route).await? {
                        Some(response) => Ok(response),
                        None => inner.call(request).await.map_err(Into::into),
                    }
                }
            }
        }))
    }
}

impl<S> Coalesce<S> {
    /// A request that changes what a cached URI answers: once it succeeds, the URI's stored
    /// responses are dropped.
    fn invalidating<B>(
        &mut self,
        request: Routed<Request<B>>,
    ) -> ResponseFuture<S::Future, S::Error>
    where
        S: Service<Routed<Request<B>>, Response = Response<ResponseBody>> + Send,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let uri = rules::uri_of(&request.request);
        let future = self.inner.call(request);
        let shared = self.shared.clone();
        Either::Right(Box::pin(async move {
            let response = future.await.map_err(Into::into)?;
            if response.status().is_success() || response.status().is_redirection() {
                let usage = shared.cache.invalidate(&uri.0, &uri.1);
                shared.publish_usage(usage);
            }
            Ok(response)
        }))
    }

    fn passthrough<B>(&mut self, request: Routed<Request<B>>) -> ResponseFuture<S::Future, S::Error>
    where
        S: Service<Routed<Request<B>>>,
        S::Error: Into<BoxError>,
    {
        let into: fn(S::Error) -> BoxError = Into::into;
        Either::Left(self.inner.call(request).map_err(into))
    }
}

enum Joined {
    Leader(Publisher),
    Follower(Arc<Flight>),
}

// === impl Shared ===

impl Shared {
    fn publish_usage(&self, usage: cache::Usage) {
        self.metrics
            .coalesce_cache_entries
            .set(usage.entries as i64);
        self.metrics.coalesce_cache_bytes.set(usage.bytes as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Flight>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(self: &Arc<Self>, key: &Key, headers: &HeaderMap) -> Joined {
        let mut flights = self.lock();
        if let Some(flight) = flights.get(key) {
            return Joined::Follower(flight.clone());
        }
        let (outcome, _) = watch::channel(None);
        let flight = Arc::new(Flight {
            outcome,
            request_headers: headers.clone(),
        });
        flights.insert(key.clone(), flight.clone());
        Joined::Leader(Publisher {
            shared: self.clone(),
            key: key.clone(),
            flight,
        })
    }

    /// Waits for the leader, within `--coalesce-max-waiting` and `--coalesce-max-wait`; the
    /// shared response, or `None` to go to the app alone.
    async fn follow(
        &self,
        flight: &Flight,
        headers: &HeaderMap,
        route: &RouteRef,
    ) -> Result<Option<Response<ResponseBody>>, Overloaded> {
        let (max_waiting, max_wait) = {
            let config = self.live.peek();
            (
                config.args.coalesce_max_waiting,
                config.args.coalesce_max_wait,
            )
        };
        let Some(waiting) = Waiting::take(self, max_waiting as usize) else {
            return Err(self.limiter.refuse_on(route, ShedReason::CoalesceFull));
        };
        let mut outcome = flight.outcome.subscribe();
        let result = tokio::time::timeout(max_wait, outcome.wait_for(Option::is_some)).await;
        drop(waiting);
        let result = match result {
            Ok(result) => result.ok().and_then(|o| o.clone()),
            Err(_elapsed) => return Err(self.limiter.refuse_on(route, ShedReason::CoalesceWait)),
        };
        let response = match result.as_deref() {
            Some(Outcome::Shared(response))
                if vary_matches(&response.headers, &flight.request_headers, headers) =>
            {
                Some(response.to_response())
            }
            _ => None,
        };
        let outcome = if response.is_some() {
            CoalesceOutcome::Shared
        } else {
            CoalesceOutcome::Alone
        };
        self.metrics
            .coalesced
            .with_label_values(&[outcome.as_label()])
            .inc();
        Ok(response)
    }
}

// === impl Publisher ===

impl Publisher {
    /// Reads the leader's response body from the app (up to `--coalesce-max-body`), hands
    /// a copy to the followers, and returns the response for the leader's own client. A
    /// response that cannot be shared sends the followers alone; the leader still gets all of
    /// it (what was read, then the rest as it streams).
    async fn publish(
        self,
        response: Response<ResponseBody>,
        cache_for: Option<Duration>,
    ) -> Result<Response<ResponseBody>, BoxError> {
        if !shareable(response.headers()) {
            self.finish(Outcome::Alone);
            return Ok(response);
        }
        let max = self.shared.live.peek().args.coalesce_max_body.as_u64() as usize;
        let (parts, mut body) = response.into_parts();
        if body.size_hint().upper().is_some_and(|n| n as usize > max) {
            self.finish(Outcome::Alone);
            return Ok(Response::from_parts(parts, body));
        }
        let mut copy = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    self.finish(Outcome::Alone);
                    return Err(error.into());
                }
            };
            match frame.into_data() {
                Ok(data) if copy.len() + data.len() <= max => copy.extend_from_slice(&data),
                // Too large to share, or trailers: the leader gets everything, the followers
                // go alone.
                other => {
                    self.finish(Outcome::Alone);
                    let next = match other {
                        Ok(data) => Frame::data(data),
                        Err(frame) => frame,
                    };
                    let resumed = Resumed::new(copy.freeze(), next, body);
                    return Ok(Response::from_parts(
                        parts,
                        ResponseBody::Resumed(Box::new(resumed)),
                    ));
                }
            }
        }
        let shared_response = SharedResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers.clone(),
            body: copy.freeze(),
        };
        let body = shared_response.body();
        let shared_response = Arc::new(shared_response);
        if let Some(fresh) =
            cache_for.and_then(|limit| rules::freshness(parts.status, &parts.headers, limit))
        {
            let max = self.shared.live.peek().args.coalesce_cache_size.as_u64() as usize;
            let usage = self.shared.cache.put(
                self.key.clone(),
                shared_response.clone(),
                self.flight.request_headers.clone(),
                fresh,
                max,
            );
            self.shared.publish_usage(usage);
        }
        self.finish(Outcome::Shared(shared_response));
        Ok(Response::from_parts(parts, body))
    }

    fn finish(mut self, outcome: Outcome) {
        self.send(outcome);
    }

    fn send(&mut self, outcome: Outcome) {
        // Later requests start a new flight from here on.
        let mut flights = self.shared.lock();
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
        drop(flights);
        self.flight.outcome.send_replace(Some(Arc::new(outcome)));
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.flight.outcome.borrow().is_none() {
            self.send(Outcome::Alone);
        }
    }
}

// === impl SharedResponse ===

impl SharedResponse {
    fn body(&self) -> ResponseBody {
        ResponseBody::Local((!self.body.is_empty()).then(|| self.body.clone()))
    }

    fn to_response(&self) -> Response<ResponseBody> {
        let mut response = Response::new(self.body());
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = self.headers.clone();
        response
    }
}

// === impl Waiting ===

impl<'a> Waiting<'a> {
    /// A place among at most `max` followers waiting, if one is free.
    fn take(shared: &'a Shared, max: usize) -> Option<Waiting<'a>> {
        shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        shared.metrics.coalesce_waiting.inc();
        Some(Waiting(shared))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.coalesce_waiting.dec();
    }
}
