//! Admission control: a global concurrency cap, per-route bulkheads and one bounded FIFO queue.
//!
//! A request first takes its route's permit, then a global one, both from process-wide
//! semaphores (tokio's are FIFO). When either is not free at once the request takes a place in
//! the queue (bounded by `--max-queue`, all routes together) and waits at most
//! `--queue-timeout`. A request whose client disconnects while queued drops its wait and its
//! queue place. The [`Admission`] it gets is held until the exchange with the app is over.

mod layer;
mod route;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use self::layer::{Admitted, Limit, LimitLayer, ResponseFuture};
pub use self::route::{RouteLimit, RouteTable};
use crate::error::{Overloaded, ShedReason};
use crate::metrics::Metrics;

/// Label used for requests that match no `--route`.
pub const DEFAULT_ROUTE: &str = "default";

/// Settings of the [`Limiter`].
#[derive(Debug, Clone, Default)]
pub struct LimitConfig {
    /// Global cap on requests in flight; `None` is unlimited.
    pub max_concurrency: Option<u32>,
    /// Requests that may wait, all routes together.
    pub max_queue: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// Route bulkheads.
    pub routes: Vec<RouteLimit>,
}

/// Process-wide admission state, cheap to clone.
#[derive(Clone, Debug)]
pub struct Limiter {
    shared: Arc<Shared>,
}

/// Proof that a request was admitted; dropping it frees the slot(s) and updates the gauges.
#[derive(Debug)]
pub struct Admission {
    shared: Arc<Shared>,
    route: Option<usize>,
    _global: Option<OwnedSemaphorePermit>,
    _route: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct Shared {
    global: Option<Arc<Semaphore>>,
    routes: RouteTable,
    route_state: Vec<RouteState>,
    default_route: RouteCounters,
    max_queue: usize,
    queue_timeout: Duration,
    queued: AtomicUsize,
    draining: AtomicBool,
    in_flight: IntGauge,
    queued_gauge: IntGauge,
    queue_wait: prometheus::Histogram,
}

#[derive(Debug)]
struct RouteState {
    semaphore: Arc<Semaphore>,
    /// Requests waiting for this route's permit, bounded by `max_waiting`.
    waiting: AtomicUsize,
    max_waiting: usize,
    counters: RouteCounters,
}

/// Pre-resolved per-route series, so that refusing touches no label map.
#[derive(Debug)]
struct RouteCounters {
    in_flight: IntGauge,
    queued: IntGauge,
    shed: [IntCounter; ShedReason::ALL.len()],
}

/// Decrements the queue counters when a queued request is admitted, refused or cancelled.
struct QueuePlace<'a> {
    shared: &'a Shared,
    counters: &'a RouteCounters,
}

/// A place among the requests waiting for one route's permit.
struct RouteWait<'a>(&'a AtomicUsize);

// === impl Limiter ===

impl Limiter {
    /// Builds the limiter and publishes its limits as gauges.
    pub fn new(config: &LimitConfig, metrics: &Metrics) -> Limiter {
        let route_state = config
            .routes
            .iter()
            .map(|r| {
                metrics
                    .route_concurrency_limit
                    .with_label_values(&[&r.prefix])
                    .set(i64::from(r.limit));
                RouteState {
                    semaphore: Arc::new(Semaphore::new(r.limit as usize)),
                    waiting: AtomicUsize::new(0),
                    // A full route may queue at most as many requests as it may run, so
                    // that it cannot fill the shared queue and starve the other routes.
                    max_waiting: (r.limit as usize).min(config.max_queue),
                    counters: RouteCounters::new(metrics, &r.prefix),
                }
            })
            .collect();
        metrics
            .concurrency_limit
            .set(config.max_concurrency.map_or(0, i64::from));
        metrics.queue_limit.set(config.max_queue as i64);
        Limiter {
            shared: Arc::new(Shared {
                global: config
                    .max_concurrency
                    .map(|n| Arc::new(Semaphore::new(n as usize))),
                routes: RouteTable::new(&config.routes),
                route_state,
                default_route: RouteCounters::new(metrics, DEFAULT_ROUTE),
                max_queue: config.max_queue,
                queue_timeout: config.queue_timeout,
                queued: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                in_flight: metrics.in_flight.clone(),
                queued_gauge: metrics.queued.clone(),
                queue_wait: metrics.queue_wait.clone(),
            }),
        }
    }

    /// Admits a request for `path`, waiting in the queue if needed.
    ///
    /// Cancel-safe: dropping the future before it resolves leaves the queue and holds nothing.
    pub async fn acquire(&self, path: &str) -> Result<Admission, Overloaded> {
        let shared = &self.shared;
        let route = shared.routes.find(path);
        let counters = shared.counters(route);
        if shared.draining.load(Ordering::Relaxed) {
            return Err(shared.refuse(counters, ShedReason::Draining));
        }
        let route_sem = route.map(|i| &shared.route_state[i].semaphore);

        // Fast path: both permits free, no queueing.
        let mut route_permit = match route_sem {
            Some(sem) => sem.clone().try_acquire_owned().ok(),
            None => None,
        };
        let route_ok = route_sem.is_none() || route_permit.is_some();
        if route_ok {
            match &shared.global {
                None => return Ok(shared.admit(route, None, route_permit)),
                Some(global) => {
                    if let Ok(permit) = global.clone().try_acquire_owned() {
                        return Ok(shared.admit(route, Some(permit), route_permit));
                    }
                }
            }
        }

        // Slow path: take a queue place or refuse at once.
        let route_wait = match route {
            Some(i) if !route_ok => match reserve(
                &shared.route_state[i].waiting,
                shared.route_state[i].max_waiting,
            ) {
                Some(wait) => Some(RouteWait(wait)),
                None => return Err(shared.refuse(counters, ShedReason::RouteFull)),
            },
            _ => None,
        };
        let Some(place) = shared.enqueue(counters) else {
            drop(route_permit);
            let reason = if route_ok {
                ShedReason::QueueFull
            } else {
                ShedReason::RouteFull
            };
            return Err(shared.refuse(counters, reason));
        };
        let start = Instant::now();
        let deadline = start + shared.queue_timeout;
        let wait = async {
            if route_permit.is_none()
                && let Some(sem) = route_sem
            {
                route_permit = Some(sem.clone().acquire_owned().await.map_err(|_| ())?);
            }
            match &shared.global {
                Some(global) => global
                    .clone()
                    .acquire_owned()
                    .await
                    .map(Some)
                    .map_err(|_| ()),
                None => Ok(None),
            }
        };
        let waited = tokio::time::timeout_at(deadline, wait).await;
        drop(route_wait);
        drop(place);
        match waited {
            Ok(Ok(global_permit)) => {
                shared.queue_wait.observe(start.elapsed().as_secs_f64());
                Ok(shared.admit(route, global_permit, route_permit))
            }
            // A semaphore is closed only when the drain gives up on queued requests.
            Ok(Err(())) => Err(shared.refuse(counters, ShedReason::Draining)),
            Err(_elapsed) => Err(shared.refuse(counters, ShedReason::QueueTimeout)),
        }
    }

    /// From now on every request is refused with `draining`.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Refuses new requests and every queued one with `draining` (used when the drain timeout
    /// hits, so that queued clients get an answer rather than a reset).
    pub fn close(&self) {
        self.start_draining();
        if let Some(global) = &self.shared.global {
            global.close();
        }
        for route in &self.shared.route_state {
            route.semaphore.close();
        }
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// The queue bound.
    pub fn max_queue(&self) -> usize {
        self.shared.max_queue
    }

    /// Requests holding an admission now.
    pub fn in_flight(&self) -> i64 {
        self.shared.in_flight.get()
    }
}

// === impl Shared ===

impl Shared {
    fn counters(&self, route: Option<usize>) -> &RouteCounters {
        match route {
            Some(i) => &self.route_state[i].counters,
            None => &self.default_route,
        }
    }

    fn admit(
        self: &Arc<Self>,
        route: Option<usize>,
        global: Option<OwnedSemaphorePermit>,
        route_permit: Option<OwnedSemaphorePermit>,
    ) -> Admission {
        self.in_flight.inc();
        self.counters(route).in_flight.inc();
        Admission {
            shared: self.clone(),
            route,
            _global: global,
            _route: route_permit,
        }
    }

    fn enqueue<'a>(&'a self, counters: &'a RouteCounters) -> Option<QueuePlace<'a>> {
        reserve(&self.queued, self.max_queue)?;
        self.queued_gauge.inc();
        counters.queued.inc();
        Some(QueuePlace {
            shared: self,
            counters,
        })
    }

    fn refuse(&self, counters: &RouteCounters, reason: ShedReason) -> Overloaded {
        counters.shed[reason as usize].inc();
        Overloaded { reason }
    }
}

// === impl RouteCounters ===

impl RouteCounters {
    fn new(metrics: &Metrics, route: &str) -> RouteCounters {
        RouteCounters {
            in_flight: metrics.route_in_flight.with_label_values(&[route]),
            queued: metrics.route_queued.with_label_values(&[route]),
            shed: ShedReason::ALL.map(|r| metrics.shed.with_label_values(&[r.as_str(), route])),
        }
    }
}

/// Increments `count` if it is below `max`.
fn reserve(count: &AtomicUsize, max: usize) -> Option<&AtomicUsize> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| count)
}

// === impl RouteWait ===

impl Drop for RouteWait<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl QueuePlace ===

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        self.shared.queued_gauge.dec();
        self.counters.queued.dec();
    }
}

// === impl Admission ===

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.in_flight.dec();
        self.shared.counters(self.route).in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(n: u32, q: usize, routes: &[&str]) -> (Limiter, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new().unwrap());
        let cfg = LimitConfig {
            max_concurrency: Some(n),
            max_queue: q,
            queue_timeout: Duration::from_secs(1),
            routes: routes
                .iter()
                .map(|r| RouteLimit::parse(r).unwrap())
                .collect(),
        };
        (Limiter::new(&cfg, &metrics), metrics)
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_the_limit_then_queues_then_refuses() {
        let (limiter, metrics) = limiter(1, 1, &[]);
        let first = limiter.acquire("/").await.unwrap();
        let l2 = limiter.clone();
        let queued = tokio::spawn(async move { l2.acquire("/").await });
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued(), 1);
        let refused = limiter.acquire("/").await.unwrap_err();
        assert_eq!(refused.reason, ShedReason::QueueFull);
        drop(first);
        let second = queued.await.unwrap().unwrap();
        assert_eq!(limiter.queued(), 0);
        assert_eq!(metrics.in_flight.get(), 1);
        drop(second);
        assert_eq!(metrics.in_flight.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_timeout_refuses() {
        let (limiter, metrics) = limiter(1, 1, &[]);
        let _held = limiter.acquire("/").await.unwrap();
        let err = limiter.acquire("/").await.unwrap_err();
        assert_eq!(err.reason, ShedReason::QueueTimeout);
        assert_eq!(metrics.queued.get(), 0);
        assert_eq!(
            metrics
                .shed
                .with_label_values(&["queue-timeout", DEFAULT_ROUTE])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_route_does_not_block_other_routes() {
        let (limiter, _m) = limiter(3, 0, &["/slow=1"]);
        let _slow = limiter.acquire("/slow/a").await.unwrap();
        let err = limiter.acquire("/slow").await.unwrap_err();
        assert_eq!(err.reason, ShedReason::RouteFull);
        let _fast1 = limiter.acquire("/fast").await.unwrap();
        let _fast2 = limiter.acquire("/slowly").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_route_queues_at_most_its_limit() {
        let (limiter, _m) = limiter(4, 8, &["/slow=2"]);
        let _a = limiter.acquire("/slow").await.unwrap();
        let _b = limiter.acquire("/slow").await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let l = limiter.clone();
            waiters.push(tokio::spawn(async move { l.acquire("/slow").await }));
        }
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued(), 2);
        let err = limiter.acquire("/slow").await.unwrap_err();
        assert_eq!(err.reason, ShedReason::RouteFull);
        // Other routes still find room in the shared queue and free global slots.
        let _c = limiter.acquire("/fast").await.unwrap();
        let _d = limiter.acquire("/fast").await.unwrap();
        let l = limiter.clone();
        let fast_waiter = tokio::spawn(async move { l.acquire("/fast").await });
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued(), 3);
        drop(_c);
        assert!(fast_waiter.await.unwrap().is_ok());
        for w in waiters {
            w.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_wait_frees_its_queue_place() {
        let (limiter, metrics) = limiter(1, 1, &[]);
        let held = limiter.acquire("/").await.unwrap();
        let l2 = limiter.clone();
        let waiter = tokio::spawn(async move { l2.acquire("/").await });
        tokio::task::yield_now().await;
        assert_eq!(metrics.queued.get(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(metrics.queued.get(), 0);
        assert_eq!(limiter.queued(), 0);
        drop(held);
        // The cancelled waiter did not take the freed slot.
        let _again = limiter.acquire("/").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn close_refuses_queued_requests() {
        let (limiter, metrics) = limiter(1, 1, &["/r=1"]);
        let _held = limiter.acquire("/").await.unwrap();
        let l2 = limiter.clone();
        let queued = tokio::spawn(async move { l2.acquire("/r").await });
        tokio::task::yield_now().await;
        limiter.close();
        let err = queued.await.unwrap().unwrap_err();
        assert_eq!(err.reason, ShedReason::Draining);
        assert_eq!(metrics.queued.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_refuses_everything() {
        let (limiter, _m) = limiter(1, 1, &[]);
        limiter.start_draining();
        assert_eq!(
            limiter.acquire("/").await.unwrap_err().reason,
            ShedReason::Draining
        );
    }
}
