//! Shutdown phases and the signal that moves through them.
//!
//! ```text
//! Serving --SIGTERM / SIGINT / POST /drain / GET /prestop (any of them, in any order)--> Delay
//!   Delay: /readyz fails, traffic still served, HTTP/1.1 answers carry `Connection: close`,
//!          HTTP/2 connections get GOAWAY
//! Delay --after --shutdown-delay, or a second signal (not a second request)--> Drain
//!   Drain: listeners closed, idle connections closed, in-flight work finishes
//! Drain --all connections done, or --drain-timeout--> Exited
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use prometheus::{IntGauge, Registry};
use tokio::sync::{Notify, watch};

use crate::metrics::{MetricsError, reg};

/// Where tidegate is in its shutdown.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Normal operation.
    Serving = 0,
    /// Readiness fails; traffic is still served while endpoints converge.
    Delay = 1,
    /// Listeners are closed; in-flight work finishes.
    Drain = 2,
    /// The drain is over (finished or cut off); the process is about to exit.
    Exited = 3,
}

/// How the drain ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished.
    Complete,
    /// `--drain-timeout` hit with this many requests still in flight.
    TimedOut {
        /// Requests still in flight to the app.
        in_flight: u64,
        /// Client connections still open.
        connections: u64,
    },
}

/// Shared shutdown state: the current phase, and requests to move on.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    phase: Arc<watch::Sender<Phase>>,
    /// Mirror of `phase` for the per-request check, which must not take a lock.
    fast: Arc<AtomicU8>,
    outcome: Arc<watch::Sender<Option<DrainOutcome>>>,
    skip_delay: Arc<Notify>,
}

/// The shutdown walk.
#[derive(Debug)]
pub struct DrainMetrics {
    /// `tidegate_shutdown_phase`: 0 serving, 1 delay, 2 drain, 3 exiting.
    pub shutdown_phase: IntGauge,
    /// `tidegate_drain_cut_requests`: requests still in flight when the drain timeout hit.
    pub drain_cut: IntGauge,
}

// === impl Phase ===

impl Phase {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Delay => "delay",
            Phase::Drain => "drain",
            Phase::Exited => "exited",
        }
    }
}

// === impl Lifecycle ===

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    /// A lifecycle in [`Phase::Serving`].
    pub fn new() -> Lifecycle {
        Lifecycle {
            phase: Arc::new(watch::Sender::new(Phase::Serving)),
            fast: Arc::new(AtomicU8::new(Phase::Serving as u8)),
            outcome: Arc::new(watch::Sender::new(None)),
            skip_delay: Arc::new(Notify::new()),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Whether shutdown has started (a lock-free read for the data path).
    pub fn is_shutting_down(&self) -> bool {
        self.fast.load(Ordering::Relaxed) != Phase::Serving as u8
    }

    /// Starts shutdown if it has not started; never skips the delay, whoever asks (a signal,
    /// `/prestop`, `/drain`, in any order). Returns whether this call started it.
    pub fn start_shutdown(&self) -> bool {
        self.advance(Phase::Delay)
    }

    /// A receiver that sees every phase change.
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Skips the rest of the delay if shutdown is in it (a second signal). Does nothing
    /// before shutdown starts; call [`Lifecycle::start_shutdown`] first.
    pub fn skip_delay(&self) {
        if self.phase() == Phase::Delay {
            self.skip_delay.notify_one();
        }
    }

    /// Moves forward to `phase` (never backwards); returns whether the phase changed.
    pub fn advance(&self, phase: Phase) -> bool {
        self.phase.send_if_modified(|current| {
            if phase > *current {
                *current = phase;
                self.fast.store(phase as u8, Ordering::Relaxed);
                true
            } else {
                false
            }
        })
    }

    /// Waits until the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// Resolves when a second shutdown request asks to skip the delay.
    pub async fn delay_skipped(&self) {
        self.skip_delay.notified().await
    }

    /// Records how the drain ended and moves to [`Phase::Exited`].
    pub fn finish(&self, outcome: DrainOutcome) {
        self.outcome.send_replace(Some(outcome));
        self.advance(Phase::Exited);
    }

    /// Waits for the drain's outcome.
    pub async fn outcome(&self) -> DrainOutcome {
        let mut rx = self.outcome.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.unwrap_or(DrainOutcome::Complete),
            Err(_) => DrainOutcome::Complete,
        }
    }
}

// === impl DrainMetrics ===

impl DrainMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<DrainMetrics, MetricsError> {
        let r = registry;
        let m = DrainMetrics {
            shutdown_phase: reg(
                r,
                IntGauge::new(
                    "tidegate_shutdown_phase",
                    "Shutdown phase: 0 serving, 1 delay, 2 drain, 3 exiting",
                )?,
            )?,
            drain_cut: reg(
                r,
                IntGauge::new(
                    "tidegate_drain_cut_requests",
                    "Requests still in flight when the drain timeout cut them off",
                )?,
            )?,
        };
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward() {
        let life = Lifecycle::new();
        assert!(life.start_shutdown());
        assert!(!life.start_shutdown(), "idempotent");
        assert_eq!(life.phase(), Phase::Delay);
        life.advance(Phase::Serving);
        assert_eq!(life.phase(), Phase::Delay);
        life.finish(DrainOutcome::Complete);
        life.reached(Phase::Exited).await;
        assert_eq!(life.outcome().await, DrainOutcome::Complete);
    }

    #[tokio::test]
    async fn skip_delay_only_during_the_delay() {
        let life = Lifecycle::new();
        life.skip_delay(); // before shutdown: ignored
        life.start_shutdown();
        let skipped = life.delay_skipped();
        tokio::pin!(skipped);
        assert!(
            futures_util::poll!(skipped.as_mut()).is_pending(),
            "the early skip did not count"
        );
        // notify_one stores a permit, so the order of wait and notify does not matter.
        life.skip_delay();
        skipped.await;
    }
}
