//! The shutdown walk, once the lifecycle has left `serving`: *delay* (readiness failing, still
//! serving), *drain* (listeners closed, in-flight work finishing within `--drain-timeout`),
//! *exit*. Each phase is a step of its own and is exported as `tidegate_shutdown_phase`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::lanes::Lanes;
use crate::admission::Limiter;
use crate::app::Metrics;
use crate::config::{Config, LiveConfig};
use crate::drain::{DrainOutcome, Lifecycle, Phase};

/// How long refused queued requests get to be written when the drain timeout hits.
const REFUSAL_FLUSH: Duration = Duration::from_millis(250);

/// What the walk acts on.
pub(super) struct Walk {
    pub(super) live: LiveConfig,
    pub(super) lifecycle: Lifecycle,
    pub(super) metrics: Arc<Metrics>,
    pub(super) limiter: Limiter,
    pub(super) lanes: Lanes,
    pub(super) background: TaskTracker,
}

/// Walks delay → drain → exit with the timings in force when shutdown started (later reloads
/// do not change them).
pub(super) async fn walk(mut walk: Walk) -> DrainOutcome {
    let config = walk.live.load();
    delay(&walk, &config).await;
    let outcome = drain(&mut walk, &config).await;
    finish(&walk, outcome);
    outcome
}

/// Keeps serving with readiness failing for `--shutdown-delay`, unless the delay is skipped.
async fn delay(walk: &Walk, config: &Config) {
    let args = &config.args;
    walk.metrics.drain.shutdown_phase.set(Phase::Delay as i64);
    tracing::info!(
        delay_ms = args.shutdown_delay.as_millis() as u64,
        "Shutdown: delay (readiness failing, still serving)"
    );
    tokio::select! {
        _ = tokio::time::sleep(args.shutdown_delay) => {}
        _ = walk.lifecycle.delay_skipped() => tracing::info!("Shutdown: delay skipped"),
    }
}

/// Closes the listeners and waits for connections, tunnels and abandoned exchanges for at most `--drain-timeout`;
/// at the deadline, queued requests are refused (503 `draining`) rather than reset.
async fn drain(walk: &mut Walk, config: &Config) -> DrainOutcome {
    let args = &config.args;
    walk.lifecycle.advance(Phase::Drain);
    walk.metrics.drain.shutdown_phase.set(Phase::Drain as i64);
    tracing::info!(
        in_flight = walk.metrics.admission.in_flight.get(),
        connections = walk.metrics.connections.connections_open.get(),
        timeout_ms = args.drain_timeout.as_millis() as u64,
        "Shutdown: drain (listener closing, finishing in-flight requests)"
    );
    walk.lanes.listeners_closed().await;
    let connections = walk.lanes.connections.clone();
    connections.close();
    walk.background.close();
    let all_done = async {
        connections.wait().await;
        walk.background.wait().await;
    };
    match tokio::time::timeout(args.drain_timeout, all_done).await {
        Ok(()) => DrainOutcome::Complete,
        Err(_elapsed) => {
            let cut = DrainOutcome::TimedOut {
                in_flight: walk.metrics.admission.in_flight.get().max(0) as u64,
                connections: walk.metrics.connections.connections_open.get().max(0) as u64,
            };
            walk.limiter.close();
            let _ = tokio::time::timeout(REFUSAL_FLUSH, connections.wait()).await;
            cut
        }
    }
}

/// Logs and exports the outcome, and moves the lifecycle to `exited`.
fn finish(walk: &Walk, outcome: DrainOutcome) {
    match outcome {
        DrainOutcome::Complete => tracing::info!("Shutdown: drained"),
        DrainOutcome::TimedOut {
            in_flight,
            connections,
        } => {
            walk.metrics.drain.drain_cut.set(in_flight as i64);
            tracing::warn!(
                in_flight,
                connections,
                "Shutdown: drain timed out; {in_flight} requests cut off"
            );
        }
    }
    walk.metrics.drain.shutdown_phase.set(Phase::Exited as i64);
    walk.lifecycle.finish(outcome);
}
