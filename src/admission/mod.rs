//! Admission control: a global concurrency cap (fixed or adaptive), per-route bulkheads and one
//! bounded, ordered queue.
//!
//! A request first takes its route's permit (a FIFO semaphore), then a global slot from
//! `slots`. When either is not free at once the request takes a place in the queue (bounded
//! by `--max-queue`, all routes together; a full route may hold at most as many places as it
//! has slots) and waits at most `--queue-timeout`. The global wait list is ordered by priority
//! class, then first attempts before retries, then arrival (FIFO, or LIFO under overload), and
//! expires stale waiters under overload (controlled delay). A request whose client disconnects
//! while queued drops its wait and its place. The [`Admission`] it gets is held until the
//! exchange with the app is over; its release is a latency sample for `--max-concurrency auto`
//! ([`adaptive`]). Limits can change live ([`Limiter::reconfigure`]): requests holding a slot
//! keep it.

pub(crate) mod adaptive;
mod classify;
mod gate;
pub(crate) mod metrics;
mod permit;
mod queue;
mod routes;
mod slots;
mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Method;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use self::adaptive::{AdaptiveConfig, Update};
use self::classify::Classifier;
pub(crate) use self::classify::{ClassifyConfig, RequestClass};
use self::gate::Gate;
use self::metrics::AdmissionMetrics;
use self::permit::Sample;
pub(crate) use self::permit::{Admission, Admitted};
pub(crate) use self::queue::Entry;
pub(crate) use self::routes::RouteRef;
use self::routes::{RouteCounters, RouteSlots, RouteState, Routes};
pub(crate) use self::slots::Discipline;
use self::slots::{Slots, UNLIMITED};
pub(crate) use crate::config::route::{RouteSpec, RouteTable};
use crate::config::{Config, MaxConcurrency};
use crate::error::{Overloaded, Rejected, ShedReason};
use crate::metrics::RequestMetrics;

/// Label used for requests that match no route.
pub(crate) const DEFAULT_ROUTE: &str = "default";

/// Settings of the [`Limiter`].
#[derive(Debug, Clone, Default)]
pub struct LimitConfig {
    /// Global cap on requests in flight; `None` is unlimited (ignored when `adaptive` is set).
    pub max_concurrency: Option<u32>,
    /// `--max-concurrency auto`: the bounds and algorithm of the adaptive limit.
    pub adaptive: Option<AdaptiveConfig>,
    /// Slots only critical requests may take (at most half the limit).
    pub reserved_slots: u32,
    /// Queue order and controlled delay.
    pub discipline: Discipline,
    /// How requests are sorted into priority classes and retries.
    pub classify: ClassifyConfig,
    /// Estimate `Retry-After` from the queue, within these bounds (`--retry-after-from-queue`).
    pub retry_after_estimate: Option<(Duration, Duration)>,
    /// Requests that may wait, all routes together.
    pub max_queue: usize,
    /// Longest wait in the queue.
    pub queue_timeout: Duration,
    /// Routes.
    pub routes: Vec<RouteSpec>,
    /// Largest request body in bytes for requests whose route sets none; `None` is unlimited.
    pub max_request_body: Option<u64>,
}

impl LimitConfig {
    /// The limiter's settings from the configuration in force.
    pub fn new(config: &Config) -> LimitConfig {
        let a = &config.args;
        LimitConfig {
            max_concurrency: a.fixed_concurrency(),
            adaptive: (a.max_concurrency == Some(MaxConcurrency::Auto)).then_some(AdaptiveConfig {
                algorithm: a.adaptive_algorithm,
                min: a.min_concurrency,
                max: a.max_concurrency_ceiling,
            }),
            reserved_slots: a.reserved_slots,
            discipline: Discipline {
                codel_target: a.queue_codel_target,
                codel_interval: a.queue_codel_interval,
                lifo: a.queue_lifo,
            },
            classify: ClassifyConfig {
                priority_header: a.priority_header.clone(),
                retry_header: a.retry_header.clone(),
                retry_memory: a.retry_memory,
            },
            retry_after_estimate: a
                .retry_after_from_queue
                .then_some((a.retry_after, a.retry_after_max)),
            max_queue: config.max_queue(),
            queue_timeout: a.queue_timeout,
            routes: a.routes.clone(),
            max_request_body: a.max_request_body.map(|b| b.as_u64()),
        }
    }
}

/// One snapshot of the limiter's settings, for the lookups of one request.
pub(crate) struct InForce<'a> {
    limiter: &'a Limiter,
    settings: arc_swap::Guard<Arc<LimitConfig>>,
}

/// Process-wide admission state, cheap to clone.
#[derive(Clone, Debug)]
pub struct Limiter {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    global: Arc<Slots>,
    routes: ArcSwap<Routes>,
    default_route: RouteCounters,
    /// The settings in force, swapped whole by [`Limiter::reconfigure`]: the one way the
    /// limiter's live settings reach the request path (the slots and route gates are
    /// resized in place from it).
    settings: ArcSwap<LimitConfig>,
    /// Clients recently refused (`--retry-memory`).
    classifier: Classifier,
    /// The adaptive limit last written to the log.
    logged_limit: AtomicU32,
    queued: AtomicUsize,
    draining: AtomicBool,
    metrics: Arc<AdmissionMetrics>,
    requests: Arc<RequestMetrics>,
}

// === impl Limiter ===

impl Limiter {
    /// Builds the limiter and publishes its limits as gauges.
    pub fn new(
        config: &LimitConfig,
        metrics: Arc<AdmissionMetrics>,
        requests: Arc<RequestMetrics>,
    ) -> Limiter {
        let shared = Arc::new(Shared {
            global: Arc::new(Slots::new(UNLIMITED)),
            routes: ArcSwap::from_pointee(Routes {
                specs: Vec::new(),
                table: RouteTable::default(),
                states: Vec::new(),
            }),
            default_route: RouteCounters::new(&metrics, DEFAULT_ROUTE),
            settings: ArcSwap::from_pointee(config.clone()),
            classifier: Classifier::default(),
            logged_limit: AtomicU32::new(0),
            queued: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            metrics,
            requests,
        });
        let limiter = Limiter { shared };
        limiter.reconfigure(config);
        limiter
    }

    /// Applies new limits, queue settings and routes in place. Requests holding a slot keep
    /// it; a lowered limit holds once enough of them have finished. Routes with the same
    /// pattern and methods keep their slots and counters; an adaptive limit keeps what it
    /// learned.
    pub fn reconfigure(&self, config: &LimitConfig) {
        let shared = &self.shared;
        let limit = shared.global.configure(
            global_size(config),
            config.adaptive,
            config.reserved_slots as usize,
            config.discipline,
        );
        shared.logged_limit.store(limit as u32, Ordering::Relaxed);
        shared.settings.store(Arc::new(config.clone()));
        let old = shared.routes.load();
        let mut by_key: HashMap<String, &Arc<RouteState>> = old
            .specs
            .iter()
            .zip(&old.states)
            .map(|(spec, state)| (spec.key(), state))
            .collect();
        let metrics = &shared.metrics;
        let states = config
            .routes
            .iter()
            .map(|spec| {
                let size = spec.limit.map_or(gate::UNLIMITED, |n| n as usize);
                // A full route may queue at most as many requests as it may run, so that it
                // cannot fill the shared queue and starve the other routes.
                let max_waiting = spec
                    .limit
                    .map_or(config.max_queue, |n| (n as usize).min(config.max_queue));
                metrics
                    .route_concurrency_limit
                    .with_label_values(&[&spec.name])
                    .set(spec.limit.map_or(0, i64::from));
                let slots = match by_key.remove(&spec.key()) {
                    Some(state) if state.spec.name == spec.name => {
                        state.slots.gate.resize(size);
                        state
                            .slots
                            .max_waiting
                            .store(max_waiting, Ordering::Release);
                        state.slots.clone()
                    }
                    _ => Arc::new(RouteSlots {
                        gate: Gate::new(size),
                        waiting: AtomicUsize::new(0),
                        max_waiting: AtomicUsize::new(max_waiting),
                        counters: RouteCounters::new(metrics, &spec.name),
                    }),
                };
                Arc::new(RouteState {
                    spec: spec.clone(),
                    slots,
                })
            })
            .collect();
        shared.routes.store(Arc::new(Routes {
            table: RouteTable::new(&config.routes),
            specs: config.routes.clone(),
            states,
        }));
        metrics
            .concurrency_limit
            .set(if limit == UNLIMITED { 0 } else { limit as i64 });
        metrics.queue_limit.set(config.max_queue as i64);
    }

    /// The route a `method` request for `path` belongs to, with its body limit (the route's
    /// own, else `--max-request-body`). The request path uses [`Limiter::in_force`].
    #[cfg(test)]
    pub(crate) fn route(&self, method: &Method, path: &str) -> RouteRef {
        self.route_with(&self.shared.settings.load(), method, path)
    }

    fn route_with(&self, settings: &LimitConfig, method: &Method, path: &str) -> RouteRef {
        let routes = self.shared.routes.load();
        let route = routes
            .table
            .find(&routes.specs, method, path)
            .map(|i| routes.states[i].clone());
        let max_request_body = route
            .as_ref()
            .and_then(|r| r.spec.max_request_body)
            .or(settings.max_request_body);
        RouteRef {
            route,
            max_request_body,
        }
    }

    /// The settings in force, for the route stage's lookups with one snapshot.
    pub(crate) fn in_force(&self) -> InForce<'_> {
        InForce {
            limiter: self,
            settings: self.shared.settings.load(),
        }
    }

    fn classify_with(
        &self,
        settings: &LimitConfig,
        headers: &http::HeaderMap,
        route: &RouteRef,
        client: Option<std::net::IpAddr>,
    ) -> RequestClass {
        let route_priority = route.route.as_ref().and_then(|r| r.spec.priority);
        let class =
            self.shared
                .classifier
                .classify(&settings.classify, headers, route_priority, client);
        if class.retry {
            self.shared.metrics.retries_seen.inc();
        }
        class
    }

    /// Admits a `method` request for `path` as a normal first attempt, waiting in the queue if
    /// needed.
    ///
    /// Cancel-safe: dropping the future before it resolves leaves the queue and holds nothing.
    #[cfg(test)]
    pub(crate) async fn acquire(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<Admission, Overloaded> {
        self.admit(self.route(method, path), RequestClass::default())
            .await
    }

    /// Admits a request on `route` of `class`, waiting in the queue if needed. Cancel-safe,
    /// like [`Limiter::acquire`]. The request path uses [`Limiter::enter`] (the `limit` layer).
    #[cfg(test)]
    pub(crate) async fn admit(
        &self,
        route: RouteRef,
        class: RequestClass,
    ) -> Result<Admission, Overloaded> {
        match self.enter(route, class)? {
            Entry::Admitted(admission) => Ok(admission),
            Entry::Queued(queued) => queued.wait().await,
        }
    }

    /// Counts a refusal for `reason` of a request on `route` that never reached the queue
    /// (a coalesced follower), and returns it with its `Retry-After`.
    pub(crate) fn refuse_on(&self, route: &RouteRef, reason: ShedReason) -> Overloaded {
        self.shared.refuse(route.route.as_deref(), None, reason)
    }

    /// Counts a request refused for breaking a limit, and returns the refusal.
    pub fn reject(&self, rejected: Rejected) -> Rejected {
        self.shared.requests.count_rejection(&rejected);
        rejected
    }

    /// From now on every request is refused with `draining`.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Refuses new requests and every queued one with `draining` (used when the drain timeout
    /// hits, so that queued clients get an answer rather than a reset).
    pub fn close(&self) {
        self.start_draining();
        self.shared.global.close();
        for route in &self.shared.routes.load().states {
            route.slots.gate.close();
        }
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// The queue bound.
    pub fn max_queue(&self) -> usize {
        self.shared.settings.load().max_queue
    }

    /// The `Retry-After` a refusal would carry now with `--retry-after-from-queue`.
    pub fn retry_after_estimate(&self) -> Option<Duration> {
        self.shared.retry_after_estimate()
    }
}

fn global_size(config: &LimitConfig) -> usize {
    config.max_concurrency.map_or(UNLIMITED, |n| n as usize)
}

// === impl InForce ===

impl InForce<'_> {
    /// The route a `method` request for `path` belongs to, with its body limit (the route's
    /// own, else `--max-request-body`).
    pub(crate) fn route(&self, method: &Method, path: &str) -> RouteRef {
        self.limiter.route_with(&self.settings, method, path)
    }

    /// The priority class and retry mark of a request on `route` from `client`.
    pub(crate) fn classify(
        &self,
        headers: &http::HeaderMap,
        route: &RouteRef,
        client: Option<std::net::IpAddr>,
    ) -> RequestClass {
        self.limiter
            .classify_with(&self.settings, headers, route, client)
    }
}

// === impl Shared ===

impl Shared {
    fn admit(
        self: &Arc<Self>,
        route: Option<Arc<RouteState>>,
        route_permit: Option<OwnedSemaphorePermit>,
        max_request_body: Option<u64>,
    ) -> Admission {
        self.metrics.in_flight.inc();
        route
            .as_ref()
            .map_or(&self.default_route, |r| &r.slots.counters)
            .in_flight
            .inc();
        Admission {
            shared: self.clone(),
            route,
            since: Instant::now(),
            sample: Sample::Held,
            route_permit,
            max_request_body,
        }
    }

    /// The series of `route`, or of requests on no route.
    fn counters<'a>(&'a self, route: Option<&'a RouteState>) -> &'a RouteCounters {
        route.map_or(&self.default_route, |r| &r.slots.counters)
    }

    /// Counts a refusal for `reason` of a request on `route` from `client`, and returns it
    /// with its `Retry-After`: the route's own, else (except when draining) the queue's
    /// estimate.
    fn refuse(
        &self,
        route: Option<&RouteState>,
        client: Option<std::net::IpAddr>,
        reason: ShedReason,
    ) -> Overloaded {
        self.refuse_with(&self.settings.load(), route, client, reason)
    }

    /// [`Shared::refuse`] with the settings in force given.
    fn refuse_with(
        &self,
        settings: &LimitConfig,
        route: Option<&RouteState>,
        client: Option<std::net::IpAddr>,
        reason: ShedReason,
    ) -> Overloaded {
        self.counters(route).shed[reason as usize].inc();
        self.classifier
            .note_refused(settings.classify.retry_memory, client);
        let route_retry_after = route.and_then(|r| r.spec.retry_after);
        let retry_after = match reason {
            ShedReason::Draining => route_retry_after,
            _ => route_retry_after
                .or_else(|| self.estimate_with(settings, || self.global.service_rate())),
        };
        Overloaded {
            reason,
            retry_after,
        }
    }

    /// Little's law: the time the queue ahead needs at the recent service rate, within the
    /// configured bounds. `None` when the estimate is off.
    fn retry_after_estimate(&self) -> Option<Duration> {
        self.retry_after_at(|| self.global.service_rate())
    }

    /// [`Shared::retry_after_estimate`] with the service rate given (read only if needed).
    fn retry_after_at(&self, rate: impl FnOnce() -> f64) -> Option<Duration> {
        self.estimate_with(&self.settings.load(), rate)
    }

    /// [`Shared::retry_after_at`] with the settings in force given.
    fn estimate_with(
        &self,
        settings: &LimitConfig,
        rate: impl FnOnce() -> f64,
    ) -> Option<Duration> {
        let (low, high) = settings.retry_after_estimate?;
        let (low, high) = (low.as_millis() as u64, high.as_millis() as u64);
        let rate = rate();
        let ahead = self.queued.load(Ordering::Relaxed) as f64 + 1.0;
        let ms = if rate > 0.0 {
            (ahead / rate * 1000.0) as u64
        } else {
            high
        };
        Some(Duration::from_millis(ms.clamp(low, high)))
    }

    /// Publishes an adaptive limit's move, and logs it when it is large.
    fn on_update(&self, update: Update) {
        self.metrics.concurrency_limit.set(i64::from(update.limit));
        if update.probe {
            tracing::debug!(
                limit = update.limit,
                baseline_latency_ms = update.baseline.as_secs_f64() * 1e3,
                "Adaptive concurrency baseline probe"
            );
            return;
        }
        let logged = self.logged_limit.load(Ordering::Relaxed);
        let moved = update.limit.abs_diff(logged);
        if moved >= 2 && moved as f64 >= 0.25 * logged as f64 {
            self.logged_limit.store(update.limit, Ordering::Relaxed);
            tracing::info!(
                limit = update.limit,
                previous = logged,
                recent_latency_ms = update.recent.as_secs_f64() * 1e3,
                baseline_latency_ms = update.baseline.as_secs_f64() * 1e3,
                "Adaptive concurrency limit moved"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n: u32, q: usize, routes: &[&str]) -> LimitConfig {
        LimitConfig {
            max_concurrency: Some(n),
            max_queue: q,
            queue_timeout: Duration::from_secs(1),
            routes: routes
                .iter()
                .map(|r| RouteSpec::parse_flag(r).unwrap())
                .collect(),
            ..LimitConfig::default()
        }
    }

    fn limiter(n: u32, q: usize, routes: &[&str]) -> (Limiter, Arc<AdmissionMetrics>) {
        let metrics = crate::app::Metrics::new().unwrap();
        let limiter = Limiter::new(
            &config(n, q, routes),
            metrics.admission.clone(),
            metrics.requests.clone(),
        );
        (limiter, metrics.admission)
    }

    async fn get(limiter: &Limiter, path: &str) -> Result<Admission, Overloaded> {
        limiter.acquire(&Method::GET, path).await
    }

    fn spawn_get(
        limiter: &Limiter,
        path: &'static str,
    ) -> tokio::task::JoinHandle<Result<Admission, Overloaded>> {
        let l = limiter.clone();
        tokio::spawn(async move { l.acquire(&Method::GET, path).await })
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_the_limit_then_queues_then_refuses() {
        let (limiter, metrics) = limiter(1, 1, &[]);
        let first = get(&limiter, "/").await.unwrap();
        let queued = spawn_get(&limiter, "/");
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued(), 1);
        let refused = get(&limiter, "/").await.unwrap_err();
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
        let _held = get(&limiter, "/").await.unwrap();
        let err = get(&limiter, "/").await.unwrap_err();
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
        let _slow = get(&limiter, "/slow/a").await.unwrap();
        let err = get(&limiter, "/slow").await.unwrap_err();
        assert_eq!(err.reason, ShedReason::RouteFull);
        let _fast1 = get(&limiter, "/fast").await.unwrap();
        let _fast2 = get(&limiter, "/slowly").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_route_queues_at_most_its_limit() {
        let (limiter, _m) = limiter(4, 8, &["/slow=2"]);
        let _a = get(&limiter, "/slow").await.unwrap();
        let _b = get(&limiter, "/slow").await.unwrap();
        let waiters: Vec<_> = (0..2).map(|_| spawn_get(&limiter, "/slow")).collect();
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued(), 2);
        let err = get(&limiter, "/slow").await.unwrap_err();
        assert_eq!(err.reason, ShedReason::RouteFull);
        // Other routes still find room in the shared queue and free global slots.
        let c = get(&limiter, "/fast").await.unwrap();
        let _d = get(&limiter, "/fast").await.unwrap();
        let fast_waiter = spawn_get(&limiter, "/fast");
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued(), 3);
        drop(c);
        assert!(fast_waiter.await.unwrap().is_ok());
        for w in waiters {
            w.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_wait_frees_its_queue_place() {
        let (limiter, metrics) = limiter(1, 1, &[]);
        let held = get(&limiter, "/").await.unwrap();
        let waiter = spawn_get(&limiter, "/");
        tokio::task::yield_now().await;
        assert_eq!(metrics.queued.get(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(metrics.queued.get(), 0);
        assert_eq!(limiter.queued(), 0);
        drop(held);
        // The cancelled waiter did not take the freed slot.
        let _again = get(&limiter, "/").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn close_refuses_queued_requests() {
        let (limiter, metrics) = limiter(1, 1, &["/r=1"]);
        let _held = get(&limiter, "/").await.unwrap();
        let queued = spawn_get(&limiter, "/r");
        tokio::task::yield_now().await;
        limiter.close();
        let err = queued.await.unwrap().unwrap_err();
        assert_eq!(err.reason, ShedReason::Draining);
        assert_eq!(metrics.queued.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn enter_admits_only_to_free_slots_and_never_while_draining() {
        let (limiter, metrics) = limiter(2, 1, &["/r=1"]);
        let class = RequestClass::default();
        let route = |path| limiter.route(&Method::GET, path);
        let admitted = |entry: &Result<Entry, Overloaded>| matches!(entry, Ok(Entry::Admitted(_)));
        let on_r = limiter.enter(route("/r"), class);
        assert!(admitted(&on_r));
        // The route's one permit is taken: not admitted, and no slot is held for it.
        let waiting = limiter.enter(route("/r"), class);
        assert!(!admitted(&waiting));
        assert_eq!(metrics.in_flight.get(), 1);
        drop(waiting);
        let other = limiter.enter(route("/"), class);
        assert!(admitted(&other));
        // Both global slots are taken.
        let full = limiter.enter(route("/"), class);
        assert!(!admitted(&full));
        assert_eq!(metrics.in_flight.get(), 2);
        drop((on_r, other, full));
        limiter.start_draining();
        let refused = limiter.enter(route("/"), class).unwrap_err();
        assert_eq!(refused.reason, ShedReason::Draining);
        assert_eq!((metrics.in_flight.get(), limiter.queued()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn enter_queues_or_refuses_at_once_and_a_dropped_place_frees_the_queue() {
        let (limiter, metrics) = limiter(1, 1, &[]);
        let class = RequestClass::default();
        let route = || limiter.route(&Method::GET, "/");
        let Ok(Entry::Admitted(held)) = limiter.enter(route(), class) else {
            panic!("the free slot is taken");
        };
        let Ok(Entry::Queued(queued)) = limiter.enter(route(), class) else {
            panic!("a free queue place is taken");
        };
        assert_eq!((limiter.queued(), metrics.queued.get()), (1, 1));
        // The queue is full: refused without waiting.
        let refused = limiter.enter(route(), class).unwrap_err();
        assert_eq!(refused.reason, ShedReason::QueueFull);
        drop(queued);
        assert_eq!((limiter.queued(), metrics.queued.get()), (0, 0));
        // Once the slot is free again: admitted at once.
        drop(held);
        assert!(matches!(
            limiter.enter(route(), class),
            Ok(Entry::Admitted(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_refuses_everything() {
        let (limiter, _m) = limiter(1, 1, &[]);
        limiter.start_draining();
        assert_eq!(
            get(&limiter, "/").await.unwrap_err().reason,
            ShedReason::Draining
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_limit_keeps_held_slots_and_applies_as_they_free() {
        let (limiter, metrics) = limiter(3, 0, &["/slow=2"]);
        let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| get(&limiter, "/"))).await;
        limiter.reconfigure(&config(1, 0, &["/slow=1"]));
        assert_eq!(metrics.concurrency_limit.get(), 1);
        assert_eq!(metrics.in_flight.get(), 3, "held slots are kept");
        let mut held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
        held.pop();
        held.pop();
        // Two freed, but the limit is 1 and one is still held.
        assert_eq!(
            get(&limiter, "/").await.unwrap_err().reason,
            ShedReason::QueueFull
        );
        held.pop();
        let _one = get(&limiter, "/").await.unwrap();
        assert_eq!(
            get(&limiter, "/").await.unwrap_err().reason,
            ShedReason::QueueFull
        );
    }

    #[tokio::test(start_paused = true)]
    async fn switching_between_fixed_and_auto_keeps_held_slots() {
        let (limiter, metrics) = limiter(8, 0, &[]);
        let held: Vec<_> = futures_util::future::join_all((0..6).map(|_| get(&limiter, "/"))).await;
        let auto = LimitConfig {
            adaptive: Some(AdaptiveConfig {
                algorithm: adaptive::Algorithm::Gradient,
                min: 3,
                max: 20,
            }),
            ..config(8, 0, &[])
        };
        limiter.reconfigure(&auto);
        assert_eq!(limiter.state().mode, "auto");
        assert_eq!(
            metrics.concurrency_limit.get(),
            3,
            "auto starts at its minimum"
        );
        assert_eq!(metrics.in_flight.get(), 6, "held slots are kept");
        assert_eq!(
            get(&limiter, "/").await.unwrap_err().reason,
            ShedReason::QueueFull
        );
        drop(held);
        let again: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| get(&limiter, "/"))).await;
        assert!(again.iter().all(Result::is_ok));
        limiter.reconfigure(&config(5, 0, &[]));
        assert_eq!(limiter.state().mode, "fixed");
        let _more: Vec<_> =
            futures_util::future::join_all((0..2).map(|_| get(&limiter, "/"))).await;
        assert_eq!(metrics.in_flight.get(), 5);
        assert_eq!(
            get(&limiter, "/").await.unwrap_err().reason,
            ShedReason::QueueFull
        );
    }

    fn auto_limiter() -> (Limiter, Arc<AdmissionMetrics>) {
        let metrics = crate::app::Metrics::new().unwrap();
        let config = LimitConfig {
            adaptive: Some(AdaptiveConfig {
                algorithm: adaptive::Algorithm::Gradient,
                min: 10,
                max: 100,
            }),
            ..config(1, 0, &[])
        };
        let limiter = Limiter::new(&config, metrics.admission.clone(), metrics.requests.clone());
        (limiter, metrics.admission)
    }

    /// Holds ten admissions for 200 ms, adjusting each with `adjust`, and returns the recent
    /// latency the adaptive limit saw.
    async fn recent_latency_after(adjust: fn(&mut Admission)) -> Option<f64> {
        let (limiter, _m) = auto_limiter();
        let mut held: Vec<_> = futures_util::future::join_all((0..10).map(|_| get(&limiter, "/")))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        held.iter_mut().for_each(adjust);
        tokio::time::advance(Duration::from_millis(200)).await;
        drop(held);
        limiter.state().slots.adaptive.unwrap().recent_latency
    }

    #[tokio::test(start_paused = true)]
    async fn samples_end_at_the_response_head_and_refused_connections_give_none() {
        let held = recent_latency_after(|_| {}).await.unwrap();
        assert!((held - 0.2).abs() < 0.01, "the time held: {held}");
        let fixed = recent_latency_after(Admission::sample_now).await.unwrap();
        assert!(fixed < 0.01, "the time until sample_now: {fixed}");
        assert_eq!(recent_latency_after(Admission::skip_sample).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_and_routes_apply_at_once() {
        let (limiter, metrics) = limiter(1, 0, &["/slow=1"]);
        let _a = get(&limiter, "/slow").await.unwrap();
        limiter.reconfigure(&config(3, 0, &["/slow=2", "/new=1"]));
        let _b = get(&limiter, "/slow").await.unwrap();
        assert_eq!(
            get(&limiter, "/slow").await.unwrap_err().reason,
            ShedReason::RouteFull
        );
        let _c = get(&limiter, "/new").await.unwrap();
        assert_eq!(
            get(&limiter, "/new").await.unwrap_err().reason,
            ShedReason::RouteFull
        );
        assert_eq!(
            metrics.route_in_flight.with_label_values(&["/slow"]).get(),
            2,
            "the route kept its series across the reload"
        );
    }
}
