//! What one client connection is doing, for its two timeouts.
//!
//! A connection is *busy* while a request is in flight (from the moment its head is parsed to
//! the moment its response body is done) and *idle* otherwise. An idle connection is closed
//! after `--idle-timeout`; once the first byte of a new request head arrives on an idle
//! HTTP/1 connection, the whole head must arrive within `--header-read-timeout`. hyper's own
//! header timer cannot tell the two apart (it starts when hyper waits for a head, so it also
//! cuts idle keep-alive connections), hence this tracker: the connection's IO
//! (`conn_io::ConnIo`) notes reads, the service wrapper [`Track`] notes request boundaries.
//!
//! The same tracker tells when an idle HTTP/1 connection may be *parked* (`--park-idle-after`):
//! its hyper connection is ended without closing the socket, which frees hyper's buffers, and
//! a new one is started on the socket's next byte. Only a connection whose last exchange had no
//! request body and kept the connection alive is parked: hyper is then known to be between
//! messages, and not about to close the connection itself (which parking would prevent).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::{HeaderMap, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::Service;

use crate::outbound::half_close::HalfClose;
use crate::outbound::headers::connection_has;

/// `head_since` when no request head has started.
const NONE: u64 = u64::MAX;

/// Shared between a connection's IO, its service and its driver.
#[derive(Debug)]
pub(super) struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the last request finished (ms since `epoch`); meaningful while none is in flight.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (ms since `epoch`), or [`NONE`].
    head_since: AtomicU64,
    /// Whether the last exchange had no request body and kept the connection alive: hyper has
    /// nothing left to read for it and will not close the connection on its own.
    parkable: AtomicBool,
    /// Set while the driver ends hyper's connection to park it: shutting the IO down then
    /// leaves the socket open.
    parking: AtomicBool,
    /// Set when a deadline may have moved, until the driver sees it; its one waiter is the
    /// driver (an atomic flag and waker: cheaper than a `Notify` on every request).
    changed: AtomicBool,
    driver: AtomicWaker,
    /// Set on an HTTP/1.1 connection whose client is answered after a half-close.
    half_close: Option<HalfClose>,
}

/// Why the driver should close a connection now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Expiry {
    /// No request for `--idle-timeout`: close gracefully.
    Idle,
    /// A request head took longer than `--header-read-timeout`: close at once.
    Header,
    /// Idle for `--park-idle-after`: free the connection's buffers, keep the socket.
    Park,
}

/// Counts one request in flight until dropped (with its response body).
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

/// A service wrapper that counts each request in flight until its response body is done.
#[derive(Debug, Clone)]
pub(super) struct Track<S> {
    inner: S,
    activity: Arc<Activity>,
}

pin_project! {
    /// Future of [`Track`].
    pub(super) struct TrackFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

pin_project! {
    /// A response body that holds its request's [`InFlight`] until it is dropped.
    #[derive(Debug)]
    pub(super) struct TrackedBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

// === impl Activity ===

impl Activity {
    /// A connection accepted at `accepted`, whose first request head has started arriving;
    /// `half_close` if its client is answered after a half-close.
    pub(super) fn new(accepted: Instant, half_close: Option<HalfClose>) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: accepted,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            parkable: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            changed: AtomicBool::new(false),
            driver: AtomicWaker::new(),
            half_close,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request head was parsed: the connection is busy until the returned guard drops.
    /// `parkable` is whether the request lets the connection be parked once it is done: it has
    /// no body and does not ask to close the connection.
    pub(super) fn start_request(self: &Arc<Self>, parkable: bool) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Release);
        if let Some(half_close) = &self.half_close {
            half_close.new_request();
        }
        self.parkable.store(parkable, Ordering::Release);
        // No wake-up: a busy connection has no deadline, and the driver re-checks the state
        // when its current timer fires. Only changes that bring a deadline forward notify.
        InFlight(self.clone())
    }

    /// Whether a request is in flight.
    pub(super) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// The client's stream ended. Returns whether that is a half-close to answer: a request
    /// in flight and admitted (`outbound::half_close`); if so, its body learns of the end.
    pub(super) fn on_end_of_stream(&self) -> bool {
        let Some(half_close) = &self.half_close else {
            return false;
        };
        let answers = half_close.answerable() && self.busy();
        if answers {
            half_close.client_ended();
        }
        answers
    }

    /// Bytes arrived from the client.
    pub(super) fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_since
                .compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.notify_driver();
        }
    }

    /// When the connection expires if nothing changes, and why; `None` while busy.
    /// `header_timeout` and `park_after` are `None` where they do not apply (HTTP/2; a
    /// connection already parked).
    pub(super) fn deadline(
        &self,
        idle_timeout: Duration,
        header_timeout: Option<Duration>,
        park_after: Option<Duration>,
    ) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Acquire);
        let at = |ms: u64, after: Duration| self.epoch + Duration::from_millis(ms) + after;
        if let Some(timeout) = header_timeout
            && head != NONE
        {
            return Some((at(head, timeout), Expiry::Header));
        }
        let idle_since = self.idle_since.load(Ordering::Acquire);
        match park_after {
            Some(after)
                if after < idle_timeout
                    && head == NONE
                    && self.parkable.load(Ordering::Acquire) =>
            {
                Some((at(idle_since, after), Expiry::Park))
            }
            _ => Some((at(idle_since, idle_timeout), Expiry::Idle)),
        }
    }

    /// The response closes the connection: hyper will, so it must not be parked.
    fn closing(&self) {
        self.parkable.store(false, Ordering::Release);
    }

    /// Marks the connection as being parked (or no longer): see [`Activity::parking`].
    pub(super) fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Release);
    }

    /// Whether the driver is ending hyper's connection to park it, so that shutting the IO
    /// down must leave the socket open.
    pub(super) fn parking(&self) -> bool {
        self.parking.load(Ordering::Acquire)
    }

    /// Resolves when the connection goes idle or a new head starts arriving (at once if that
    /// happened since the last time it resolved).
    pub(super) fn changed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.driver.register(cx.waker());
            if self.changed.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    fn notify_driver(&self) {
        self.changed.store(true, Ordering::Release);
        self.driver.wake();
    }
}

// === impl InFlight ===

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity
                .idle_since
                .store(activity.now_ms(), Ordering::Release);
            activity.head_since.store(NONE, Ordering::Release);
            activity.notify_driver();
        }
    }
}

// === impl Track ===

impl<S> Track<S> {
    /// Wraps the connection's service.
    pub(super) fn new(inner: S, activity: Arc<Activity>) -> Track<S> {
        Track { inner, activity }
    }
}

impl<S, B, R> Service<Request<B>> for Track<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    B: Body,
{
    type Response = Response<TrackedBody<R>>;
    type Error = S::Error;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let parkable =
            request.body().is_end_stream() && keeps_alive(request.version(), request.headers());
        let in_flight = self.activity.start_request(parkable);
        TrackFuture {
            inner: self.inner.call(request),
            in_flight: Some(in_flight),
        }
    }
}

impl<F, R, E> Future for TrackFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<TrackedBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let in_flight = this.in_flight.take();
        // hyper frames the response for the client's HTTP version whatever the app spoke; only
        // a `Connection: close` that reaches hyper (tidegate's own, during shutdown) closes.
        if let Some(in_flight) = &in_flight
            && connection_has(response.headers(), "close")
        {
            in_flight.0.closing();
        }
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, in_flight })))
    }
}

/// Whether an HTTP/1 request surely leaves its connection open after its response: HTTP/1.1
/// without `Connection: close` (RFC 9112 §9.3). Never HTTP/1.0: even with `keep-alive`, hyper
/// closes after a response whose length it cannot tell an HTTP/1.0 client.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11 && !connection_has(headers, "close")
}

// === impl TrackedBody ===

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEAD: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn busy_idle_and_head_deadlines() {
        let start = Instant::now();
        let activity = Activity::new(start, None);
        // The first head is arriving from the start.
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), None),
            Some((start + HEAD, Expiry::Header))
        );
        let request = activity.start_request(false);
        assert_eq!(activity.deadline(IDLE, Some(HEAD), None), None, "busy");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(request);
        let idle_from = start + Duration::from_secs(100);
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), None),
            Some((idle_from + IDLE, Expiry::Idle))
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        activity.on_read();
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), None),
            Some((idle_from + Duration::from_secs(30) + HEAD, Expiry::Header))
        );
        // HTTP/2 has no head timeout: reads (PINGs, SETTINGS) do not keep it alive either.
        assert_eq!(
            activity.deadline(IDLE, None, None),
            Some((idle_from + IDLE, Expiry::Idle))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn park_deadline_only_after_parkable_exchanges() {
        const PARK: Option<Duration> = Some(Duration::from_millis(100));
        const PARKABLE: bool = true;
        let start = Instant::now();
        let activity = Activity::new(start, None);
        // The first head is arriving: its timeout applies, not parking.
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), PARK),
            Some((start + HEAD, Expiry::Header))
        );
        drop(activity.start_request(PARKABLE));
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), PARK),
            Some((start + Duration::from_millis(100), Expiry::Park))
        );
        // Bytes of the next head arrived: not parked under them.
        activity.on_read();
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), PARK).map(|(_, e)| e),
            Some(Expiry::Header)
        );
        // A request with a body (hyper may still be reading it) or one that closes the
        // connection: it only idles.
        drop(activity.start_request(!PARKABLE));
        assert_eq!(
            activity.deadline(IDLE, Some(HEAD), PARK).map(|(_, e)| e),
            Some(Expiry::Idle)
        );
        // Parking at or after the idle timeout never happens.
        drop(activity.start_request(PARKABLE));
        assert_eq!(
            activity
                .deadline(IDLE, Some(HEAD), Some(IDLE))
                .map(|(_, e)| e),
            Some(Expiry::Idle)
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_field() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::CONNECTION, value.parse().unwrap());
            headers
        };
        assert!(keeps_alive(Version::HTTP_11, &HeaderMap::new()));
        assert!(!keeps_alive(Version::HTTP_11, &with("Close")));
        assert!(!keeps_alive(Version::HTTP_11, &with("te, close")));
        assert!(!keeps_alive(Version::HTTP_10, &HeaderMap::new()));
        assert!(!keeps_alive(Version::HTTP_10, &with("keep-alive")));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_starts_when_the_last_of_several_requests_ends() {
        let activity = Activity::new(Instant::now(), None);
        let a = activity.start_request(false);
        let b = activity.start_request(false);
        drop(a);
        assert_eq!(activity.deadline(IDLE, None, None), None);
        drop(b);
        assert!(activity.deadline(IDLE, None, None).is_some());
    }
}
