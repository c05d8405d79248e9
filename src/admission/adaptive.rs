//! `--max-concurrency auto`: a concurrency limit that follows the app's measured latency.
//!
//! Every finished exchange is a sample: the app's time to answer (admission to response
//! head; the whole hold time if it ended without one), and how many requests were in flight. Samples are gathered in windows (at least [`WINDOW`] and [`WINDOW_SAMPLES`]
//! samples, or [`WINDOW_MAX`] with any). At the end of a window its average latency is
//! compared with the *baseline*, the app's no-load latency.
//!
//! The baseline is the lowest window average since the last *probe*. Every [`PROBE_EVERY`]
//! (±10 % jitter) the limit drops to `--min-concurrency` until the requests above it have
//! finished and one window has been measured at that concurrency; that window's average
//! becomes the baseline and the limit returns to where it was (as Envoy's adaptive
//! concurrency filter re-measures its minimum RTT). Without it, a limit that keeps the app a
//! little busy would never see the no-load latency again, and a baseline learned under load
//! would let the limit creep up; with it, an app that became slower for good is re-learned
//! within one period. A probe that cannot settle within [`PROBE_MAX`] is abandoned.
//!
//! - `gradient` (default, after Netflix's Gradient2 and Envoy's adaptive concurrency filter):
//!   `gradient = clamp(TOLERANCE × baseline / recent, 0.5, 1)`, then
//!   `limit = limit × gradient + √limit`, smoothed. Latency within [`TOLERANCE`]× the baseline
//!   lets the limit grow by its square root per window; beyond it the limit shrinks in
//!   proportion, at most halving per window.
//! - `aimd`: additive increase, multiplicative decrease. A window whose average exceeds
//!   [`TOLERANCE`]× the baseline multiplies the limit by [`AIMD_BACKOFF`]; otherwise it grows
//!   by one.
//!
//! Both keep the limit within `--min-concurrency..=--max-concurrency-ceiling`, and neither
//! grows while the app is not using the limit it has (fewer than half the slots busy in the
//! window): otherwise a quiet period would raise the limit without evidence that the app can
//! take it.
//!
//! Oscillation: with a saturating load in front of an app of `W` workers whose service time is
//! constant, the gradient settles where the recent latency is about [`TOLERANCE`]× the
//! baseline, i.e. a limit of about `TOLERANCE × W + √limit`, and moves within ±25 % of it
//! (tested); AIMD saws between `0.9 ×` and the same point.

use std::time::Duration;

pub(crate) use crate::config::Algorithm;
use tokio::time::Instant;

/// Shortest window.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);
/// Samples a window needs before it ends at [`WINDOW`].
pub(crate) const WINDOW_SAMPLES: u32 = 8;
/// Longest window: it ends with whatever samples it has.
pub(crate) const WINDOW_MAX: Duration = Duration::from_secs(1);
/// Time between baseline probes.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(30);
/// Longest a probe may keep the limit at its minimum.
pub(crate) const PROBE_MAX: Duration = Duration::from_secs(2);
/// Latency up to this many times the baseline counts as "not queueing".
pub(crate) const TOLERANCE: f64 = 2.0;
/// AIMD's multiplicative decrease.
pub(crate) const AIMD_BACKOFF: f64 = 0.9;
/// Weight of a new gradient estimate against the current limit.
const SMOOTHING: f64 = 0.5;

/// Bounds and algorithm of an adaptive limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Lowest limit.
    pub min: u32,
    /// Highest limit.
    pub max: u32,
}

/// The controller's state, fed one sample per finished exchange.
#[derive(Debug)]
pub(crate) struct Controller {
    config: AdaptiveConfig,
    limit: f64,
    window: Window,
    /// The lowest window average since the last probe.
    baseline: Option<Duration>,
    /// The last window's average latency.
    recent: Option<Duration>,
    probe: Probe,
}

/// Baseline probing: when the next one starts, or the one running.
#[derive(Debug)]
enum Probe {
    /// The next probe starts at this time.
    Next(Instant),
    /// Probing since `started`; the limit returns to `restore` after.
    Running { started: Instant, restore: f64 },
}

/// What a window ended with, for metrics and `/state`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Update {
    /// The new limit.
    pub limit: u32,
    /// The limit before.
    pub previous: u32,
    /// The window's average latency.
    pub recent: Duration,
    /// The no-load latency it was compared with.
    pub baseline: Duration,
    /// Whether a baseline probe starts (the limit drops to the minimum) or ends.
    pub probe: bool,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    samples: u32,
    total: Duration,
    max_in_flight: usize,
}

// === impl Controller ===

impl Controller {
    /// A controller starting at the lowest limit (a slow start: it grows as the app proves it
    /// can take more).
    pub(crate) fn new(config: AdaptiveConfig, now: Instant) -> Controller {
        Controller {
            limit: config.min as f64,
            config,
            window: Window::new(now),
            baseline: None,
            recent: None,
            probe: Probe::Next(now + next_probe_in()),
        }
    }

    /// The limit now.
    pub(crate) fn limit(&self) -> u32 {
        self.limit.round() as u32
    }

    /// The bounds and algorithm.
    pub(crate) fn config(&self) -> AdaptiveConfig {
        self.config
    }

    /// The last window's average latency.
    pub(crate) fn recent(&self) -> Option<Duration> {
        self.recent
    }

    /// The no-load latency.
    pub(crate) fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// Whether a baseline probe is running (the limit is held at its minimum).
    pub(crate) fn probing(&self) -> bool {
        matches!(self.probe, Probe::Running { .. })
    }

    /// Applies new bounds or a new algorithm, keeping what was learned.
    pub(crate) fn reconfigure(&mut self, config: AdaptiveConfig) {
        self.config = config;
        self.limit = self.limit.clamp(config.min as f64, config.max as f64);
    }

    /// Records one finished exchange that held its slot for `latency` while `in_flight`
    /// requests (itself included) were admitted. Returns the update when a window ends.
    pub(crate) fn sample(
        &mut self,
        now: Instant,
        latency: Duration,
        in_flight: usize,
    ) -> Option<Update> {
        match self.probe {
            Probe::Next(at) if now >= at => return Some(self.start_probe(now)),
            Probe::Running { started, restore } => {
                if now.saturating_duration_since(started) > PROBE_MAX {
                    return Some(self.end_probe(now, restore, None));
                }
                // Requests admitted before the probe still run above the minimum: their
                // latency includes the queueing the probe wants to see without.
                if in_flight > self.config.min as usize {
                    self.window = Window::new(now);
                    return None;
                }
            }
            Probe::Next(_) => {}
        }
        let w = &mut self.window;
        w.samples += 1;
        w.total += latency;
        w.max_in_flight = w.max_in_flight.max(in_flight);
        let age = now.saturating_duration_since(w.started);
        if !(age >= WINDOW && w.samples >= WINDOW_SAMPLES || age >= WINDOW_MAX) {
            return None;
        }
        let recent = w.total / w.samples;
        let busy = w.max_in_flight;
        self.window = Window::new(now);
        self.recent = Some(recent);
        if let Probe::Running { restore, .. } = self.probe {
            return Some(self.end_probe(now, restore, Some(recent)));
        }
        let baseline = self.baseline.map_or(recent, |b| b.min(recent));
        self.baseline = Some(baseline);
        let previous = self.limit();
        let limit = self.limit;
        let queueing = recent.as_secs_f64() > TOLERANCE * baseline.as_secs_f64();
        // Growing needs evidence: at least half the slots were busy in the window.
        let app_limited = (busy as f64) < limit / 2.0;
        let next = match self.config.algorithm {
            Algorithm::Gradient => {
                let ratio = TOLERANCE * baseline.as_secs_f64() / recent.as_secs_f64().max(1e-9);
                let gradient = ratio.clamp(0.5, 1.0);
                let target = limit * gradient + limit.sqrt();
                let smoothed = limit * (1.0 - SMOOTHING) + target * SMOOTHING;
                if app_limited && smoothed > limit {
                    limit
                } else {
                    smoothed
                }
            }
            Algorithm::Aimd if queueing => limit * AIMD_BACKOFF,
            Algorithm::Aimd if app_limited => limit,
            Algorithm::Aimd => limit + 1.0,
        };
        self.limit = next.clamp(self.config.min as f64, self.config.max as f64);
        Some(Update {
            limit: self.limit(),
            previous,
            recent,
            baseline,
            probe: false,
        })
    }

    fn start_probe(&mut self, now: Instant) -> Update {
        let previous = self.limit();
        self.probe = Probe::Running {
            started: now,
            restore: self.limit,
        };
        self.limit = self.config.min as f64;
        self.window = Window::new(now);
        self.update(previous, true)
    }

    /// Ends a probe; `measured` is the no-load latency it found, if it settled.
    fn end_probe(&mut self, now: Instant, restore: f64, measured: Option<Duration>) -> Update {
        let previous = self.limit();
        if measured.is_some() {
            self.baseline = measured;
        }
        self.limit = restore.clamp(self.config.min as f64, self.config.max as f64);
        self.probe = Probe::Next(now + next_probe_in());
        self.window = Window::new(now);
        self.update(previous, true)
    }

    fn update(&self, previous: u32, probe: bool) -> Update {
        Update {
            limit: self.limit(),
            previous,
            recent: self.recent.unwrap_or_default(),
            baseline: self.baseline.unwrap_or_default(),
            probe,
        }
    }
}

/// [`PROBE_EVERY`] ± 10 %, so that replicas do not probe in step.
fn next_probe_in() -> Duration {
    PROBE_EVERY.mul_f64(0.9 + 0.2 * fastrand::f64())
}

// === impl Window ===

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            started: now,
            samples: 0,
            total: Duration::ZERO,
            max_in_flight: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An app of `workers` workers with a constant `service` time, under a load that keeps
    /// every slot tidegate allows busy: latency is the service time plus the app's own queue.
    struct App {
        workers: u32,
        service: Duration,
    }

    impl App {
        fn latency(&self, in_flight: u32) -> Duration {
            let rounds = in_flight.div_ceil(self.workers).max(1);
            self.service * rounds
        }
    }

    /// Runs `seconds` of windows against `app` and returns the limit after each window.
    fn run(c: &mut Controller, now: &mut Instant, app: &App, seconds: u64) -> Vec<u32> {
        let mut limits = Vec::new();
        let end = *now + Duration::from_secs(seconds);
        while *now < end {
            let in_flight = c.limit();
            let latency = app.latency(in_flight);
            // Samples arrive at the rate the app completes them.
            let step = latency / in_flight.max(1);
            *now += step;
            match c.sample(*now, latency, in_flight as usize) {
                Some(update) if !update.probe && !c.probing() => limits.push(update.limit),
                _ => {}
            }
        }
        limits
    }

    fn controller(algorithm: Algorithm, min: u32, max: u32) -> (Controller, Instant) {
        let now = Instant::now();
        let config = AdaptiveConfig {
            algorithm,
            min,
            max,
        };
        (Controller::new(config, now), now)
    }

    fn settled(limits: &[u32]) -> &[u32] {
        &limits[limits.len() / 2..]
    }

    fn assert_band(limits: &[u32], low: u32, high: u32, what: &str) {
        let tail = settled(limits);
        let (min, max) = (tail.iter().min().unwrap(), tail.iter().max().unwrap());
        assert!(
            *min >= low && *max <= high,
            "{what}: settled between {min} and {max}, expected within {low}..={high}: {tail:?}"
        );
    }

    const FAST: App = App {
        workers: 16,
        service: Duration::from_millis(10),
    };
    const SLOW: App = App {
        workers: 4,
        service: Duration::from_millis(10),
    };

    #[tokio::test(start_paused = true)]
    async fn gradient_follows_a_capacity_step_down_and_back_up() {
        let (mut c, mut now) = controller(Algorithm::Gradient, 2, 500);
        let up = run(&mut c, &mut now, &FAST, 20);
        // Settles near TOLERANCE × 16 workers, within the documented band.
        assert_band(&up, 24, 48, "16 workers");
        let down = run(&mut c, &mut now, &SLOW, 20);
        assert_band(&down, 6, 12, "4 workers");
        assert!(
            down.iter().take(10).any(|&l| l <= 12),
            "the limit comes down within a second of the app slowing: {down:?}"
        );
        let back = run(&mut c, &mut now, &FAST, 20);
        assert_band(&back, 24, 48, "16 workers again");
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_follows_a_capacity_step_down_and_back_up() {
        let (mut c, mut now) = controller(Algorithm::Aimd, 2, 500);
        let up = run(&mut c, &mut now, &FAST, 30);
        assert_band(&up, 24, 48, "16 workers");
        let down = run(&mut c, &mut now, &SLOW, 30);
        assert_band(&down, 6, 12, "4 workers");
        let back = run(&mut c, &mut now, &FAST, 30);
        assert_band(&back, 24, 48, "16 workers again");
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_are_respected() {
        for algorithm in [Algorithm::Gradient, Algorithm::Aimd] {
            let (mut c, mut now) = controller(algorithm, 10, 20);
            let up = run(&mut c, &mut now, &FAST, 10);
            assert!(up.iter().all(|&l| (10..=20).contains(&l)), "{up:?}");
            assert_eq!(*up.last().unwrap(), 20, "{algorithm:?} reaches the ceiling");
            let down = run(&mut c, &mut now, &SLOW, 10);
            assert!(down.iter().all(|&l| (10..=20).contains(&l)), "{down:?}");
            assert_eq!(*down.last().unwrap(), 10, "{algorithm:?} reaches the floor");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_app_does_not_raise_the_limit() {
        let (mut c, mut now) = controller(Algorithm::Gradient, 8, 500);
        for _ in 0..1000 {
            now += Duration::from_millis(20);
            c.sample(now, Duration::from_millis(10), 1);
        }
        assert_eq!(c.limit(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanently_slower_app_is_relearned() {
        let (mut c, mut now) = controller(Algorithm::Gradient, 2, 500);
        run(&mut c, &mut now, &FAST, 10);
        let slower = App {
            workers: 16,
            service: Duration::from_millis(40),
        };
        let limits = run(&mut c, &mut now, &slower, 60);
        assert!(c.baseline().unwrap() >= Duration::from_millis(40));
        assert_band(&limits, 24, 48, "16 slower workers");
    }
}
