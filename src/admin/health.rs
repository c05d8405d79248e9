//! What the probes report: tidegate's own liveness (a heartbeat from the proxy runtime), its
//! readiness (serving, and the app passed its checks), and the app's liveness (progress).
//!
//! Probes answer from this cached state only; they never wait on the app.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::metrics::AdminMetrics;
use crate::admission::Limiter;
use crate::config::LiveConfig;
use crate::drain::{Lifecycle, Phase};
pub(crate) use crate::outbound::progress::{Progress, Stamp};

/// Health state shared by the proxy lane, the health checker and the admin lane.
#[derive(Clone, Debug)]
pub struct HealthState {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// `heartbeat_timeout`, `progress_window` and `unready_when_saturated` are read from here.
    live: LiveConfig,
    lifecycle: Lifecycle,
    limiter: Limiter,
    metrics: Arc<AdminMetrics>,
    heartbeat: Stamp,
    /// Heartbeats of the other proxy threads (`--runtime per-thread`).
    thread_beats: std::sync::Mutex<Vec<Stamp>>,
    progress: Progress,
    last_pass: Stamp,
    app_healthy: AtomicBool,
    saturated: AtomicBool,
}

// === impl HealthState ===

impl HealthState {
    /// Creates the state; the app counts as unhealthy until its first check passes.
    pub fn new(
        live: LiveConfig,
        lifecycle: Lifecycle,
        limiter: Limiter,
        metrics: Arc<AdminMetrics>,
    ) -> HealthState {
        HealthState {
            shared: Arc::new(Shared {
                live,
                lifecycle,
                limiter,
                metrics,
                heartbeat: Stamp::new(),
                thread_beats: std::sync::Mutex::new(Vec::new()),
                progress: Stamp::new(),
                last_pass: Stamp::new(),
                app_healthy: AtomicBool::new(false),
                saturated: AtomicBool::new(false),
            }),
        }
    }

    /// The heartbeat the proxy runtime must keep stamping.
    pub fn heartbeat(&self) -> &Stamp {
        &self.shared.heartbeat
    }

    /// A heartbeat for one more proxy thread (`--runtime per-thread`); `/livez` fails when any
    /// of them is older than `--heartbeat-timeout`.
    pub fn add_thread_heartbeat(&self) -> Stamp {
        let stamp = Stamp::new();
        if let Ok(mut beats) = self.shared.thread_beats.lock() {
            beats.push(stamp.clone());
        }
        stamp
    }

    /// The progress clock the proxy stamps when the app completes a response.
    pub fn progress(&self) -> &Progress {
        &self.shared.progress
    }

    /// `/livez`: the proxy runtime is responsive.
    pub fn livez(&self) -> Result<(), String> {
        let timeout = self.shared.live.load().args.heartbeat_timeout;
        let check = |stamp: &Stamp, which: &str| match stamp.age() {
            Some(age) if age <= timeout => Ok(()),
            Some(age) => Err(format!(
                "{which} heartbeat is {}ms old (limit {}ms)",
                age.as_millis(),
                timeout.as_millis()
            )),
            None => Err(format!("{which} has not started")),
        };
        check(&self.shared.heartbeat, "proxy runtime")?;
        if let Ok(beats) = self.shared.thread_beats.lock() {
            for (i, stamp) in beats.iter().enumerate() {
                check(stamp, &format!("proxy thread {}", i + 1))?;
            }
        }
        Ok(())
    }

    /// `/readyz`: serving, not draining, app healthy, and (optionally) not saturated.
    pub fn readyz(&self) -> Result<(), String> {
        let result = self.evaluate_ready();
        self.shared.metrics.ready.set(i64::from(result.is_ok()));
        result
    }

    fn evaluate_ready(&self) -> Result<(), String> {
        let phase = self.shared.lifecycle.phase();
        if phase != Phase::Serving {
            return Err(format!("shutting down ({})", phase.as_str()));
        }
        if !self.shared.app_healthy.load(Ordering::Relaxed) {
            return Err(if self.shared.last_pass.age().is_none() {
                "app has not passed a health check yet".into()
            } else {
                "app is failing its health checks".into()
            });
        }
        if self.shared.live.load().args.unready_when_saturated && self.saturated() {
            return Err("queue is full".into());
        }
        Ok(())
    }

    /// `/app/livez`: the app passed a check or completed a response within the window.
    pub fn app_livez(&self) -> Result<(), String> {
        let window = self.shared.live.load().args.progress_window;
        if self.shared.last_pass.within(window) || self.shared.progress.within(window) {
            return Ok(());
        }
        if self.shared.last_pass.age().is_none() && self.shared.progress.age().is_none() {
            // Never heard from the app: it is still starting, give it the window from start.
            if self.shared.heartbeat.since_created() <= window {
                return Ok(());
            }
        }
        Err(format!(
            "app made no progress for {}s (no passed check, no completed response)",
            window.as_secs()
        ))
    }

    /// Whether the queue is full, with hysteresis: saturated when full, clear again only
    /// when at most half full.
    fn saturated(&self) -> bool {
        let max = self.shared.limiter.max_queue();
        if max == 0 {
            return false;
        }
        let queued = self.shared.limiter.queued();
        let was = self.shared.saturated.load(Ordering::Relaxed);
        let now = if was { queued > max / 2 } else { queued >= max };
        if now != was {
            self.shared.saturated.store(now, Ordering::Relaxed);
            tracing::info!(
                queued,
                max_queue = max,
                saturated = now,
                "Queue saturation changed"
            );
        }
        now
    }

    /// Records the app's health as decided by the checker; logs changes once.
    pub(crate) fn set_app_healthy(&self, healthy: bool) {
        let was = self.shared.app_healthy.swap(healthy, Ordering::Relaxed);
        self.shared.metrics.app_healthy.set(i64::from(healthy));
        if was != healthy {
            if healthy {
                tracing::info!("App is healthy");
            } else {
                tracing::warn!("App is unhealthy");
            }
        }
        // Keep the readiness gauge current even when nobody probes.
        let _ = self.readyz();
    }

    /// Records a passed check.
    pub(crate) fn record_pass(&self) {
        self.shared.last_pass.record();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn livez_needs_every_proxy_thread_alive() {
        let config = crate::Config::try_from_iter(["tidegate", "--heartbeat-timeout", "5s"])
            .expect("config");
        let metrics = crate::app::Metrics::new().expect("metrics");
        let limiter = Limiter::new(
            &crate::admission::LimitConfig::default(),
            metrics.admission.clone(),
            metrics.requests.clone(),
        );
        let health = HealthState::new(
            LiveConfig::new(config),
            Lifecycle::new(),
            limiter,
            metrics.admin.clone(),
        );
        health.heartbeat().record();
        assert!(health.livez().is_ok());

        let second = health.add_thread_heartbeat();
        let err = health.livez().unwrap_err();
        assert!(err.contains("proxy thread 1 has not started"), "{err}");
        second.record();
        assert!(health.livez().is_ok());

        // The main runtime keeps beating; the other thread is stuck.
        tokio::time::advance(Duration::from_secs(6)).await;
        health.heartbeat().record();
        let err = health.livez().unwrap_err();
        assert!(err.contains("proxy thread 1 heartbeat is"), "{err}");
    }
}
