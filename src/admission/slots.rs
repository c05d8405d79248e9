//! The global slots: a concurrency limit (fixed, or moved by [`Controller`]) in front of one
//! ordered wait list.
//!
//! Waiters are served by priority class first (critical, normal, low), then first attempts
//! before requests that look like retries, then by arrival: oldest first, or newest first
//! while the queue is overloaded and LIFO is on. The queue is *overloaded* once it has not been
//! empty for `--queue-codel-interval`; then, with `--queue-codel-target` set, a request that
//! has waited longer than the target is refused instead of served (and newcomers wait at most
//! the target), which keeps the queue from turning into standing delay (controlled delay).
//!
//! Everything changes under one mutex, held for a few map operations: admission, release,
//! cancellation and the limit moving cannot race into a lost wake-up or a leaked slot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use serde::Serialize;

pub(crate) use crate::config::Priority;
use tokio::time::Instant;

use super::adaptive::{AdaptiveConfig, Controller, Update};

/// Stands for "no limit".
pub(super) const UNLIMITED: usize = usize::MAX;

/// How the queue is ordered and expired.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Discipline {
    /// Refuse requests that waited longer than this once the queue is overloaded.
    pub codel_target: Option<Duration>,
    /// How long the queue must stay non-empty to count as overloaded.
    pub codel_interval: Duration,
    /// Serve the newest waiter first while overloaded.
    pub lifo: bool,
}

/// Why a waiter left the queue without a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// It waited longer than the controlled-delay target.
    Expired,
    /// A request of a higher class took its place in a full queue.
    Evicted,
    /// The slots were closed (drain timeout).
    Closed,
}

/// The outcome of asking for a slot.
pub(super) enum Joined {
    /// A slot was free.
    Admitted,
    /// The request waits; `short` is set when the queue is overloaded and the request should
    /// wait at most the controlled-delay target.
    Queued { wait: Wait, short: Option<Duration> },
}

#[derive(Debug)]
pub(super) struct Slots {
    state: Mutex<State>,
}

/// A snapshot for `/state` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct SlotsView {
    /// The limit now (`null` when unlimited).
    pub limit: Option<usize>,
    /// Slots held.
    pub in_flight: usize,
    /// Slots only critical requests may take (at most half the limit).
    pub reserved: usize,
    /// Requests waiting for a global slot.
    pub waiting: usize,
    /// Whether the queue has been non-empty for the controlled-delay interval.
    pub overloaded: bool,
    /// Whether the newest waiter is served first now.
    pub lifo_active: bool,
    /// Completed exchanges per second, recently.
    pub service_rate: f64,
    /// Adaptive limit state, when `--max-concurrency auto`.
    pub adaptive: Option<AdaptiveView>,
    /// Queue order and controlled delay (shown by the limiter's own view).
    #[serde(skip)]
    pub discipline: Discipline,
}

/// The adaptive controller's state.
#[derive(Debug, Clone, Serialize)]
pub struct AdaptiveView {
    /// `gradient` or `aimd`.
    pub algorithm: crate::config::Algorithm,
    /// Lowest limit.
    pub min: u32,
    /// Highest limit.
    pub max: u32,
    /// Last window's average latency, in seconds.
    pub recent_latency: Option<f64>,
    /// No-load latency, in seconds.
    pub baseline_latency: Option<f64>,
    /// Whether a baseline probe holds the limit at its minimum now.
    pub probing: bool,
}

#[derive(Debug)]
struct State {
    limit: usize,
    reserved: usize,
    in_flight: usize,
    waiters: BTreeMap<Key, Arc<Waiter>>,
    seq: u64,
    closed: bool,
    nonempty_since: Option<Instant>,
    discipline: Discipline,
    adaptive: Option<Controller>,
    rate: Rate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    class: Priority,
    retry: bool,
    seq: u64,
}

#[derive(Debug)]
struct Waiter {
    key: Key,
    since: Instant,
    outcome: AtomicU8,
    waker: AtomicWaker,
}

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const EXPIRED: u8 = 2;
const EVICTED: u8 = 3;
const CLOSED: u8 = 4;

/// Waits for a slot. Dropping it before it resolves leaves the queue; a slot granted but not
/// yet taken goes to the next waiter.
#[derive(Debug)]
pub(super) struct Wait {
    slots: Arc<Slots>,
    waiter: Arc<Waiter>,
    done: bool,
}

/// Completions per second over roughly the last seconds.
#[derive(Debug)]
struct Rate {
    started: Instant,
    count: u64,
    per_second: f64,
}

// === impl Slots ===

impl Slots {
    pub(super) fn new(limit: usize) -> Slots {
        let now = Instant::now();
        Slots {
            state: Mutex::new(State {
                limit,
                reserved: 0,
                in_flight: 0,
                waiters: BTreeMap::new(),
                seq: 0,
                closed: false,
                nonempty_since: None,
                discipline: Discipline::default(),
                adaptive: None,
                rate: Rate {
                    started: now,
                    count: 0,
                    per_second: 0.0,
                },
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than refusing all traffic would, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a fixed limit (`UNLIMITED` for none), or an adaptive one, the reserved slots and
    /// the queue discipline. Returns the limit in force.
    pub(super) fn configure(
        &self,
        fixed: usize,
        adaptive: Option<AdaptiveConfig>,
        reserved: usize,
        discipline: Discipline,
    ) -> usize {
        let mut state = self.lock();
        state.limit = match (adaptive, &mut state.adaptive) {
            (Some(config), Some(controller)) => {
                controller.reconfigure(config);
                controller.limit() as usize
            }
            (Some(config), None) => {
                let controller = Controller::new(config, Instant::now());
                let limit = controller.limit() as usize;
                state.adaptive = Some(controller);
                limit
            }
            (None, _) => {
                state.adaptive = None;
                fixed
            }
        };
        state.reserved = reserved;
        state.discipline = discipline;
        let limit = state.limit;
        state.grant(Instant::now());
        limit
    }

    /// Takes a slot at once if one is free for `class` and no better-placed request waits.
    pub(super) fn try_acquire(&self, class: Priority) -> bool {
        let mut state = self.lock();
        state.try_take(class)
    }

    /// Takes a slot if one is free, else joins the wait list.
    pub(super) fn join(self: &Arc<Self>, class: Priority, retry: bool) -> Result<Joined, Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.try_take(class) {
            return Ok(Joined::Admitted);
        }
        let now = Instant::now();
        let short = state
            .discipline
            .codel_target
            .filter(|_| state.overloaded(now));
        state.seq += 1;
        let key = Key {
            class,
            retry,
            seq: state.seq,
        };
        let waiter = Arc::new(Waiter {
            key,
            since: now,
            outcome: AtomicU8::new(WAITING),
            waker: AtomicWaker::new(),
        });
        if state.waiters.is_empty() {
            state.nonempty_since = Some(now);
        }
        state.waiters.insert(key, waiter.clone());
        Ok(Joined::Queued {
            wait: Wait {
                slots: self.clone(),
                waiter,
                done: false,
            },
            short,
        })
    }

    /// Pushes the worst-placed waiter of a lower class than `class` out of the queue, to make
    /// room for a request of `class`. Returns whether one was evicted.
    pub(super) fn evict_below(&self, class: Priority) -> bool {
        let mut state = self.lock();
        let Some((&key, _)) = state.waiters.last_key_value() else {
            return false;
        };
        if key.class <= class {
            return false;
        }
        state.remove(key, EVICTED);
        true
    }

    /// Gives a slot back at `now`. `latency` is the exchange's sample for the adaptive limit,
    /// if it gives one. Returns the adaptive limit's update when a sample window ended.
    pub(super) fn release(&self, now: Instant, latency: Option<Duration>) -> Option<Update> {
        let mut state = self.lock();
        let in_flight = state.in_flight;
        state.in_flight = state.in_flight.saturating_sub(1);
        state.rate.count(now);
        let update = match (state.adaptive.as_mut(), latency) {
            (Some(c), Some(latency)) => c.sample(now, latency, in_flight),
            _ => None,
        };
        if let Some(update) = update {
            state.limit = update.limit as usize;
        }
        state.grant(now);
        update
    }

    /// Refuses every waiter and every later request.
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        while let Some((&key, _)) = state.waiters.first_key_value() {
            state.remove(key, CLOSED);
        }
    }

    /// Completed exchanges per second, recently.
    pub(super) fn service_rate(&self) -> f64 {
        self.lock().rate.read(Instant::now())
    }

    /// A snapshot of the state.
    pub(super) fn view(&self) -> SlotsView {
        let state = self.lock();
        let now = Instant::now();
        let overloaded = state.overloaded(now);
        SlotsView {
            limit: (state.limit != UNLIMITED).then_some(state.limit),
            in_flight: state.in_flight,
            reserved: state.reserved(),
            waiting: state.waiters.len(),
            overloaded,
            lifo_active: overloaded && state.discipline.lifo,
            service_rate: state.rate.read(now),
            discipline: state.discipline,
            adaptive: state.adaptive.as_ref().map(|c| {
                let config = c.config();
                AdaptiveView {
                    algorithm: config.algorithm,
                    min: config.min,
                    max: config.max,
                    recent_latency: c.recent().map(|d| d.as_secs_f64()),
                    baseline_latency: c.baseline().map(|d| d.as_secs_f64()),
                    probing: c.probing(),
                }
            }),
        }
    }
}

// === impl State ===

impl State {
    /// Slots only critical requests may use: as configured, at most half the limit.
    fn reserved(&self) -> usize {
        self.reserved.min(self.limit / 2)
    }

    fn capacity(&self, class: Priority) -> usize {
        match class {
            Priority::Critical => self.limit,
            _ => self.limit.saturating_sub(self.reserved()),
        }
    }

    fn try_take(&mut self, class: Priority) -> bool {
        // A request does not overtake waiters of its own class or a better one.
        let overtakes = self
            .waiters
            .first_key_value()
            .is_some_and(|(k, _)| k.class <= class);
        if self.closed || overtakes || self.in_flight >= self.capacity(class) {
            return false;
        }
        self.in_flight += 1;
        true
    }

    fn overloaded(&self, now: Instant) -> bool {
        self.nonempty_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.discipline.codel_interval)
    }

    /// Hands free slots to waiters, in order, expiring the ones past the controlled-delay
    /// target while overloaded.
    fn grant(&mut self, now: Instant) {
        while let Some((&first, _)) = self.waiters.first_key_value() {
            if self.in_flight >= self.capacity(first.class) {
                return;
            }
            let overloaded = self.overloaded(now);
            let key = if overloaded && self.discipline.lifo {
                // The newest of the best-placed group (same class and retry mark).
                let group_end = Key {
                    seq: u64::MAX,
                    ..first
                };
                match self.waiters.range(first..=group_end).next_back() {
                    Some((&k, _)) => k,
                    None => first,
                }
            } else {
                first
            };
            let expired = overloaded
                && self
                    .discipline
                    .codel_target
                    .zip(self.waiters.get(&key))
                    .is_some_and(|(target, w)| now.saturating_duration_since(w.since) > target);
            if expired {
                self.remove(key, EXPIRED);
                continue;
            }
            self.in_flight += 1;
            self.remove(key, GRANTED);
        }
    }

    fn remove(&mut self, key: Key, outcome: u8) {
        if let Some(waiter) = self.waiters.remove(&key) {
            waiter.outcome.store(outcome, Ordering::Release);
            waiter.waker.wake();
        }
        if self.waiters.is_empty() {
            self.nonempty_since = None;
        }
    }
}

// === impl Rate ===

impl Rate {
    fn count(&mut self, now: Instant) {
        self.count += 1;
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= Duration::from_secs(1) {
            let current = self.count as f64 / elapsed.as_secs_f64();
            self.per_second = if self.per_second == 0.0 {
                current
            } else {
                0.5 * self.per_second + 0.5 * current
            };
            self.started = now;
            self.count = 0;
        }
    }

    fn read(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= Duration::from_secs(2) {
            // No window closed lately: the app has slowed down or stopped.
            (self.count as f64 / elapsed.as_secs_f64()).min(self.per_second)
        } else {
            self.per_second
        }
    }
}

// === impl Wait ===

impl std::future::Future for Wait {
    type Output = Result<(), Refused>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.waiter.waker.register(cx.waker());
        let result = match self.waiter.outcome.load(Ordering::Acquire) {
            WAITING => return std::task::Poll::Pending,
            GRANTED => Ok(()),
            EXPIRED => Err(Refused::Expired),
            EVICTED => Err(Refused::Evicted),
            _ => Err(Refused::Closed),
        };
        self.done = true;
        std::task::Poll::Ready(result)
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.slots.lock();
        match self.waiter.outcome.load(Ordering::Acquire) {
            WAITING => state.remove(self.waiter.key, WAITING),
            GRANTED => {
                // Granted after the caller stopped waiting: pass the slot on.
                state.in_flight = state.in_flight.saturating_sub(1);
                state.grant(Instant::now());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(limit: usize, discipline: Discipline) -> Arc<Slots> {
        let slots = Arc::new(Slots::new(limit));
        slots.configure(limit, None, 0, discipline);
        slots
    }

    fn queued(joined: Result<Joined, Refused>) -> Wait {
        match joined {
            Ok(Joined::Queued { wait, .. }) => wait,
            Ok(Joined::Admitted) => panic!("admitted, expected to queue"),
            Err(e) => panic!("refused: {e:?}"),
        }
    }

    fn granted(wait: &mut Wait) -> bool {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        matches!(
            std::pin::Pin::new(wait).poll(&mut cx),
            std::task::Poll::Ready(Ok(()))
        )
    }

    use std::future::Future;

    #[tokio::test(start_paused = true)]
    async fn fifo_by_default_critical_first_retries_last() {
        let s = slots(1, Discipline::default());
        assert!(s.try_acquire(Priority::Normal));
        let mut retry = queued(s.join(Priority::Normal, true));
        let mut first = queued(s.join(Priority::Normal, false));
        let mut second = queued(s.join(Priority::Normal, false));
        let mut low = queued(s.join(Priority::Low, false));
        let mut critical = queued(s.join(Priority::Critical, false));
        let order = [&mut critical, &mut first, &mut second, &mut retry, &mut low];
        for (i, wait) in order.into_iter().enumerate() {
            s.release(Instant::now(), Some(Duration::ZERO));
            assert!(granted(wait), "waiter {i} in order");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lifo_while_overloaded() {
        let discipline = Discipline {
            codel_target: None,
            codel_interval: Duration::from_millis(100),
            lifo: true,
        };
        let s = slots(1, discipline);
        assert!(s.try_acquire(Priority::Normal));
        let mut old = queued(s.join(Priority::Normal, false));
        let mut new = queued(s.join(Priority::Normal, false));
        // Not yet overloaded: FIFO.
        s.release(Instant::now(), Some(Duration::ZERO));
        assert!(granted(&mut old));
        let mut newest = queued(s.join(Priority::Normal, false));
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(s.view().lifo_active);
        s.release(Instant::now(), Some(Duration::ZERO));
        assert!(granted(&mut newest), "overloaded: newest first");
        assert!(!granted(&mut new));
    }

    #[tokio::test(start_paused = true)]
    async fn codel_expires_stale_waiters_and_shortens_new_waits() {
        let discipline = Discipline {
            codel_target: Some(Duration::from_millis(5)),
            codel_interval: Duration::from_millis(100),
            lifo: false,
        };
        let s = slots(1, discipline);
        assert!(s.try_acquire(Priority::Normal));
        let mut stale = queued(s.join(Priority::Normal, false));
        tokio::time::advance(Duration::from_millis(150)).await;
        let Ok(Joined::Queued {
            wait: mut fresh,
            short,
        }) = s.join(Priority::Normal, false)
        else {
            panic!("expected to queue");
        };
        assert_eq!(
            short,
            Some(Duration::from_millis(5)),
            "short wait when overloaded"
        );
        s.release(Instant::now(), Some(Duration::ZERO));
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(matches!(
            std::pin::Pin::new(&mut stale).poll(&mut cx),
            std::task::Poll::Ready(Err(Refused::Expired))
        ));
        // The fresh waiter, too, waited more than 5 ms? No: it joined just now.
        assert!(granted(&mut fresh));
    }

    #[tokio::test(start_paused = true)]
    async fn reserved_slots_are_for_critical_requests() {
        let s = Arc::new(Slots::new(4));
        s.configure(4, None, 1, Discipline::default());
        for _ in 0..3 {
            assert!(s.try_acquire(Priority::Normal));
        }
        assert!(
            !s.try_acquire(Priority::Normal),
            "the fourth slot is reserved"
        );
        assert!(s.try_acquire(Priority::Critical));
        assert_eq!(s.view().in_flight, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_takes_the_worst_placed_lower_class() {
        let s = slots(1, Discipline::default());
        assert!(s.try_acquire(Priority::Normal));
        let mut normal = queued(s.join(Priority::Normal, false));
        let mut low = queued(s.join(Priority::Low, false));
        assert!(!s.evict_below(Priority::Low), "nothing below low");
        assert!(s.evict_below(Priority::Critical));
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(matches!(
            std::pin::Pin::new(&mut low).poll(&mut cx),
            std::task::Poll::Ready(Err(Refused::Evicted))
        ));
        assert!(!granted(&mut normal));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_grant_passes_the_slot_on() {
        let s = slots(1, Discipline::default());
        assert!(s.try_acquire(Priority::Normal));
        let a = queued(s.join(Priority::Normal, false));
        let mut b = queued(s.join(Priority::Normal, false));
        s.release(Instant::now(), Some(Duration::ZERO)); // granted to a, which never looks
        drop(a);
        assert!(granted(&mut b));
        assert_eq!(s.view().in_flight, 1);
        drop(b);
        assert_eq!(
            s.view().in_flight,
            1,
            "b took its slot; the caller releases it"
        );
        s.release(Instant::now(), Some(Duration::ZERO));
        assert_eq!(s.view().in_flight, 0);
        assert_eq!(s.view().waiting, 0);
    }
}
