//! The queue: a request that could not be admitted at once takes a place in it (and among its
//! route's waiters when its route is full), or is refused, synchronously
//! ([`Limiter::enter`]); only the wait for a slot itself is a future ([`Queued::wait`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::slots::{Joined, Refused};
use super::{Admission, Limiter, RequestClass, RouteRef, RouteState, Shared};
use crate::error::{Overloaded, ShedReason};

/// A place in the shared queue; frees it and updates the gauges when dropped.
#[derive(Debug)]
struct QueuePlace {
    shared: Arc<Shared>,
    route: Option<Arc<RouteState>>,
}

/// A place among the requests waiting for one route's permit; freed when dropped.
#[derive(Debug)]
struct RouteWait(Arc<RouteState>);

/// What [`Limiter::enter`] decided, short of a refusal.
#[derive(Debug)]
pub enum Entry {
    /// Admitted: its slot (and its route's permit) were free.
    Admitted(Admission),
    /// In the queue: [`Queued::wait`] waits for the slot.
    Queued(Queued),
}

/// A request's place in the queue (and among its route's waiters when its route is full),
/// held until [`Queued::wait`] ends or it is dropped.
#[derive(Debug)]
pub struct Queued {
    shared: Arc<Shared>,
    route: Option<Arc<RouteState>>,
    max_request_body: Option<u64>,
    class: RequestClass,
    route_permit: Option<OwnedSemaphorePermit>,
    route_wait: Option<RouteWait>,
    place: QueuePlace,
}

// === impl Limiter ===

impl Limiter {
    /// Decides at once for a request on `route` of `class`: admitted when a slot (and its
    /// route's permit) is free, else a place in the queue, or a refusal (draining, its route's
    /// waiters full, the queue full with no worse class to push out). [`Limiter::admit`] is
    /// this and [`Queued::wait`]; apart, only a request that queues needs a future.
    pub fn enter(&self, route: RouteRef, class: RequestClass) -> Result<Entry, Overloaded> {
        let shared = &self.shared;
        let RouteRef {
            route,
            max_request_body,
        } = route;
        let refuse = |reason| shared.refuse(route.as_deref(), class.client, reason);
        if shared.draining.load(Ordering::Relaxed) {
            return Err(refuse(ShedReason::Draining));
        }
        let route_permit = match &route {
            Some(r) => r.slots.gate.semaphore().clone().try_acquire_owned().ok(),
            None => None,
        };
        let route_ok = route.is_none() || route_permit.is_some();
        if route_ok && shared.global.try_acquire(class.priority) {
            return Ok(Entry::Admitted(shared.admit(
                route,
                route_permit,
                max_request_body,
            )));
        }
        // Not admitted at once: one snapshot of the settings for the rest.
        let settings = shared.settings.load();
        let refuse = |reason| shared.refuse_with(&settings, route.as_deref(), class.client, reason);
        let route_wait = match &route {
            Some(r) if !route_ok => match RouteWait::reserve(r) {
                Some(waiting) => Some(waiting),
                None => return Err(refuse(ShedReason::RouteFull)),
            },
            _ => None,
        };
        let place = match shared.enqueue(settings.max_queue, route.as_ref()) {
            Some(place) => place,
            // A full queue makes room for a better class by pushing out a worse waiter.
            None if shared.global.evict_below(class.priority) => {
                shared.enqueue_over(route.as_ref())
            }
            None => {
                drop(route_permit);
                drop(route_wait);
                return Err(refuse(if route_ok {
                    ShedReason::QueueFull
                } else {
                    ShedReason::RouteFull
                }));
            }
        };
        Ok(Entry::Queued(Queued {
            shared: shared.clone(),
            route,
            max_request_body,
            class,
            route_permit,
            route_wait,
            place,
        }))
    }
}

// === impl Shared ===

impl Shared {
    fn enqueue(
        self: &Arc<Self>,
        max_queue: usize,
        route: Option<&Arc<RouteState>>,
    ) -> Option<QueuePlace> {
        reserve(&self.queued, max_queue)?;
        Some(self.place(route))
    }

    /// A place beyond the bound, taken from a waiter that was just evicted (which frees its
    /// own as soon as its task runs).
    fn enqueue_over(self: &Arc<Self>, route: Option<&Arc<RouteState>>) -> QueuePlace {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.place(route)
    }

    fn place(self: &Arc<Self>, route: Option<&Arc<RouteState>>) -> QueuePlace {
        self.metrics.queued.inc();
        self.counters(route.map(|r| &**r)).queued.inc();
        QueuePlace {
            shared: self.clone(),
            route: route.cloned(),
        }
    }
}

// === impl Queued ===

impl Queued {
    /// Waits for a slot (and the route's permit, if it has none yet), within the queue
    /// timeout and the controlled delay. The queue place is freed as soon as the wait ends,
    /// and by dropping the future before. Cancel-safe, like [`Limiter::acquire`].
    pub async fn wait(self) -> Result<Admission, Overloaded> {
        let Queued {
            shared,
            route,
            max_request_body,
            class,
            mut route_permit,
            route_wait,
            place,
        } = self;
        let start = Instant::now();
        let timeout = shared.settings.load().queue_timeout;
        let wait = async {
            if route_permit.is_none()
                && let Some(r) = &route
            {
                let sem = r.slots.gate.semaphore().clone();
                route_permit = Some(sem.acquire_owned().await.map_err(|_| Refused::Closed)?);
            }
            match shared.global.join(class.priority, class.retry)? {
                Joined::Admitted => Ok(()),
                Joined::Queued { wait, short: None } => wait.await,
                Joined::Queued {
                    wait,
                    short: Some(short),
                } => tokio::time::timeout(short, wait)
                    .await
                    .unwrap_or(Err(Refused::Expired)),
            }
        };
        let waited = tokio::time::timeout_at(start + timeout, wait).await;
        drop(route_wait);
        drop(place);
        let refuse = |reason| Err(shared.refuse(route.as_deref(), class.client, reason));
        match waited {
            Ok(Ok(())) => {
                shared
                    .metrics
                    .queue_wait
                    .observe(start.elapsed().as_secs_f64());
                Ok(shared.admit(route, route_permit, max_request_body))
            }
            Ok(Err(Refused::Expired)) => refuse(ShedReason::QueueDelay),
            Ok(Err(Refused::Evicted)) => refuse(ShedReason::Evicted),
            // Closed only when the drain gives up on queued requests.
            Ok(Err(Refused::Closed)) => refuse(ShedReason::Draining),
            Err(_elapsed) => refuse(ShedReason::QueueTimeout),
        }
    }
}

// === impl RouteWait ===

impl RouteWait {
    /// A place among `route`'s waiters, if it has room.
    fn reserve(route: &Arc<RouteState>) -> Option<RouteWait> {
        let max = route.slots.max_waiting.load(Ordering::Acquire);
        reserve(&route.slots.waiting, max)?;
        Some(RouteWait(route.clone()))
    }
}

impl Drop for RouteWait {
    fn drop(&mut self) {
        self.0.slots.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl QueuePlace ===

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared.queued.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.queued.dec();
        shared.counters(self.route.as_deref()).queued.dec();
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
