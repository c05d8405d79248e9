//! What the limiter is doing now: the `/state` JSON view and the gauges derived from it,
//! refreshed when `/metrics` is scraped.

use super::metrics::{AdmissionSetting, LatencyWindow};
use crate::metrics::LabelValues;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::slots::{Priority, SlotsView};
use super::{DEFAULT_ROUTE, Limiter};

/// The limiter's state and settings, as served by the admin `/state` endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct LimiterState {
    /// `fixed`, `auto` or `unlimited`.
    pub mode: &'static str,
    /// The global slots and queue order.
    pub slots: SlotsView,
    /// Requests waiting, routes' waits included.
    pub queued: usize,
    /// `--max-queue`.
    pub max_queue: usize,
    /// `--queue-timeout`, in seconds.
    pub queue_timeout: f64,
    /// `--queue-codel-target`, in seconds.
    pub codel_target: Option<f64>,
    /// `--queue-codel-interval`, in seconds.
    pub codel_interval: f64,
    /// `--queue-lifo`.
    pub lifo: bool,
    /// `--priority-header`.
    pub priority_header: Option<String>,
    /// `--retry-header`.
    pub retry_header: Option<String>,
    /// `--retry-memory`, in seconds.
    pub retry_memory: Option<f64>,
    /// The `Retry-After` a refusal would carry now, in seconds (`--retry-after-from-queue`).
    pub retry_after_estimate: Option<f64>,
    /// Whether tidegate is draining.
    pub draining: bool,
    /// Routes, in the order configured.
    pub routes: Vec<RouteView>,
}

/// One route's settings and load.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    /// Metrics label.
    pub name: String,
    /// Slots the route may hold (`null`: no route limit).
    pub limit: Option<u32>,
    /// Slots held.
    pub in_flight: i64,
    /// Requests of the route waiting.
    pub queued: i64,
    /// The route's priority class, if it sets one.
    pub priority: Option<Priority>,
    /// Whether identical GETs are coalesced.
    pub coalesce: bool,
    /// `coalesce_cache`, in seconds.
    pub coalesce_cache: Option<f64>,
}

// === impl Limiter ===

impl Limiter {
    /// A snapshot of the limiter's state and settings.
    pub fn state(&self) -> LimiterState {
        let shared = &self.shared;
        let slots = shared.global.view();
        let discipline = slots.discipline;
        let retry_after_estimate = shared.retry_after_at(|| slots.service_rate);
        let settings = shared.settings.load();
        let classify = &settings.classify;
        let mode = match (&slots.adaptive, slots.limit) {
            (Some(_), _) => "auto",
            (None, Some(_)) => "fixed",
            (None, None) => "unlimited",
        };
        let mut routes: Vec<RouteView> = shared
            .routes
            .load()
            .states
            .iter()
            .map(|r| RouteView {
                name: r.spec.name.clone(),
                limit: r.spec.limit,
                in_flight: r.slots.counters.in_flight.get(),
                queued: r.slots.counters.queued.get(),
                priority: r.spec.priority,
                coalesce: r.spec.coalesces(),
                coalesce_cache: r.spec.coalesce_cache.map(|d| d.as_secs_f64()),
            })
            .collect();
        routes.push(RouteView {
            name: DEFAULT_ROUTE.to_owned(),
            limit: None,
            in_flight: shared.default_route.in_flight.get(),
            queued: shared.default_route.queued.get(),
            priority: None,
            coalesce: false,
            coalesce_cache: None,
        });
        LimiterState {
            mode,
            slots,
            queued: self.queued(),
            max_queue: self.max_queue(),
            queue_timeout: settings.queue_timeout.as_secs_f64(),
            codel_target: discipline.codel_target.map(|d| d.as_secs_f64()),
            codel_interval: discipline.codel_interval.as_secs_f64(),
            lifo: discipline.lifo,
            priority_header: classify.priority_header.as_ref().map(|h| h.to_string()),
            retry_header: classify.retry_header.as_ref().map(|h| h.to_string()),
            retry_memory: classify.retry_memory.map(|d| d.as_secs_f64()),
            retry_after_estimate: retry_after_estimate.map(|d| d.as_secs_f64()),
            draining: shared.draining.load(Ordering::Relaxed),
            routes,
        }
    }

    /// Sets the gauges that are read from the limiter's state rather than counted: called
    /// before `/metrics` is encoded.
    pub fn publish_gauges(&self) {
        let shared = &self.shared;
        let metrics = &shared.metrics;
        let view = shared.global.view();
        metrics
            .concurrency_limit
            .set(view.limit.map_or(0, |l| l as i64));
        metrics.queue_overloaded.set(i64::from(view.overloaded));
        metrics.service_rate.set(view.service_rate);
        if let Some(adaptive) = &view.adaptive {
            for (label, value) in [
                (LatencyWindow::Recent, adaptive.recent_latency),
                (LatencyWindow::Baseline, adaptive.baseline_latency),
            ] {
                if let Some(seconds) = value {
                    metrics
                        .adaptive_latency
                        .with_label_values(&[label.as_label()])
                        .set(seconds);
                }
            }
        }
        if let Some(estimate) = shared.retry_after_at(|| view.service_rate) {
            metrics.retry_after_estimate.set(estimate.as_secs_f64());
        }
        let discipline = view.discipline;
        let (min, max) = view.adaptive.as_ref().map_or((0, 0), |a| (a.min, a.max));
        for (setting, value) in [
            (AdmissionSetting::MinConcurrency, f64::from(min)),
            (AdmissionSetting::MaxConcurrencyCeiling, f64::from(max)),
            (AdmissionSetting::ReservedSlots, view.reserved as f64),
            (
                AdmissionSetting::QueueCodelTargetSeconds,
                discipline.codel_target.map_or(0.0, |d| d.as_secs_f64()),
            ),
            (
                AdmissionSetting::QueueCodelIntervalSeconds,
                discipline.codel_interval.as_secs_f64(),
            ),
            (
                AdmissionSetting::QueueLifo,
                f64::from(u8::from(discipline.lifo)),
            ),
            (
                AdmissionSetting::QueueTimeoutSeconds,
                shared.settings.load().queue_timeout.as_secs_f64(),
            ),
        ] {
            metrics
                .admission_setting
                .with_label_values(&[setting.as_label()])
                .set(value);
        }
    }
}
