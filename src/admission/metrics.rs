//! The admission families: slots, the queue, refusals and the limit in force.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::metrics::{LATENCY_BUCKETS, LabelValues, MetricsError, reg};
/// Admission: slots, the queue, refusals and the limit in force.
#[derive(Debug)]
pub struct AdmissionMetrics {
    /// `tidegate_in_flight`: requests holding a slot (exchange with the app not over).
    pub in_flight: IntGauge,
    /// `tidegate_queued`: requests waiting for a slot.
    pub queued: IntGauge,
    /// `tidegate_route_in_flight{route}`.
    pub route_in_flight: IntGaugeVec,
    /// `tidegate_route_queued{route}`.
    pub route_queued: IntGaugeVec,
    /// `tidegate_shed_total{reason,route}`: refusals.
    pub shed: IntCounterVec,
    /// `tidegate_queue_wait_seconds`: time admitted requests spent queued.
    pub queue_wait: Histogram,
    /// `tidegate_concurrency_limit`: the global limit (0 = unlimited).
    pub concurrency_limit: IntGauge,
    /// `tidegate_route_concurrency_limit{route}`.
    pub route_concurrency_limit: IntGaugeVec,
    /// `tidegate_queue_limit`: the queue bound.
    pub queue_limit: IntGauge,
    /// `tidegate_queue_overloaded`: 1 while the queue has not been empty for
    /// `--queue-codel-interval` (controlled delay and LIFO apply).
    pub queue_overloaded: IntGauge,
    /// `tidegate_service_rate`: exchanges with the app completed per second, recently.
    pub service_rate: prometheus::Gauge,
    /// `tidegate_adaptive_latency_seconds{window}`: the adaptive limit's inputs, `recent`
    /// (last window's average) and `baseline` (no-load latency).
    pub adaptive_latency: prometheus::GaugeVec,
    /// `tidegate_retry_after_estimate_seconds`: the `Retry-After` estimated from the queue.
    pub retry_after_estimate: prometheus::Gauge,
    /// `tidegate_admission_setting{setting}`: the admission knobs in force (`min_concurrency`,
    /// `max_concurrency_ceiling`, `reserved_slots`, `queue_codel_target_seconds` (0: off),
    /// `queue_codel_interval_seconds`, `queue_lifo`, `queue_timeout_seconds`).
    pub admission_setting: prometheus::GaugeVec,
    /// `tidegate_retries_seen_total`: requests classified as retries.
    pub retries_seen: IntCounter,
}

/// `tidegate_adaptive_latency_seconds{window}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LatencyWindow {
    /// The last window's average latency.
    Recent,
    /// The no-load latency.
    Baseline,
}

/// `tidegate_admission_setting{setting}`: an admission knob in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmissionSetting {
    /// `--min-concurrency`.
    MinConcurrency,
    /// `--max-concurrency-ceiling`.
    MaxConcurrencyCeiling,
    /// `--reserved-slots`.
    ReservedSlots,
    /// `--queue-codel-target` (0: off).
    QueueCodelTargetSeconds,
    /// `--queue-codel-interval`.
    QueueCodelIntervalSeconds,
    /// `--queue-lifo` (0 or 1).
    QueueLifo,
    /// `--queue-timeout`.
    QueueTimeoutSeconds,
}

// === impl AdmissionMetrics ===

impl AdmissionMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<AdmissionMetrics, MetricsError> {
        let r = registry;
        let m = AdmissionMetrics {
            in_flight: reg(
                r,
                IntGauge::new(
                    "tidegate_in_flight",
                    "Requests holding a slot: their exchange with the app is not over",
                )?,
            )?,
            queued: reg(
                r,
                IntGauge::new("tidegate_queued", "Requests waiting for a slot")?,
            )?,
            route_in_flight: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "tidegate_route_in_flight",
                        "Requests holding a slot, by route",
                    ),
                    &["route"],
                )?,
            )?,
            route_queued: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "tidegate_route_queued",
                        "Requests waiting for a slot, by route",
                    ),
                    &["route"],
                )?,
            )?,
            shed: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_shed_total",
                        "Requests refused with 503, by reason and route",
                    ),
                    &["reason", "route"],
                )?,
            )?,
            queue_wait: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tidegate_queue_wait_seconds",
                        "Time admitted requests waited in the queue",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            concurrency_limit: reg(
                r,
                IntGauge::new(
                    "tidegate_concurrency_limit",
                    "Global limit on requests in flight to the app (0: unlimited)",
                )?,
            )?,
            route_concurrency_limit: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("tidegate_route_concurrency_limit", "Slots a route may hold"),
                    &["route"],
                )?,
            )?,
            queue_limit: reg(
                r,
                IntGauge::new(
                    "tidegate_queue_limit",
                    "Requests that may wait for a slot, all routes together",
                )?,
            )?,
            queue_overloaded: reg(
                r,
                IntGauge::new(
                    "tidegate_queue_overloaded",
                    "1 while the queue has stayed non-empty for the controlled-delay interval",
                )?,
            )?,
            service_rate: reg(
                r,
                prometheus::Gauge::new(
                    "tidegate_service_rate",
                    "Exchanges with the app completed per second, recently",
                )?,
            )?,
            adaptive_latency: reg(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "tidegate_adaptive_latency_seconds",
                        "Inputs of the adaptive limit: recent and baseline (no-load) latency",
                    ),
                    &["window"],
                )?,
            )?,
            retry_after_estimate: reg(
                r,
                prometheus::Gauge::new(
                    "tidegate_retry_after_estimate_seconds",
                    "Retry-After estimated from the queue length and the service rate",
                )?,
            )?,
            admission_setting: reg(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "tidegate_admission_setting",
                        "Admission settings in force, by name (durations in seconds, flags 0/1)",
                    ),
                    &["setting"],
                )?,
            )?,
            retries_seen: reg(
                r,
                IntCounter::new(
                    "tidegate_retries_seen_total",
                    "Requests classified as retries (queued behind first attempts)",
                )?,
            )?,
        };
        for window in LatencyWindow::ALL {
            m.adaptive_latency.with_label_values(&[window.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl LabelValues for LatencyWindow {
    const ALL: &'static [LatencyWindow] = &[LatencyWindow::Recent, LatencyWindow::Baseline];

    fn as_label(self) -> &'static str {
        match self {
            LatencyWindow::Recent => "recent",
            LatencyWindow::Baseline => "baseline",
        }
    }
}

impl LabelValues for AdmissionSetting {
    const ALL: &'static [AdmissionSetting] = &[
        AdmissionSetting::MinConcurrency,
        AdmissionSetting::MaxConcurrencyCeiling,
        AdmissionSetting::ReservedSlots,
        AdmissionSetting::QueueCodelTargetSeconds,
        AdmissionSetting::QueueCodelIntervalSeconds,
        AdmissionSetting::QueueLifo,
        AdmissionSetting::QueueTimeoutSeconds,
    ];

    fn as_label(self) -> &'static str {
        match self {
            AdmissionSetting::MinConcurrency => "min_concurrency",
            AdmissionSetting::MaxConcurrencyCeiling => "max_concurrency_ceiling",
            AdmissionSetting::ReservedSlots => "reserved_slots",
            AdmissionSetting::QueueCodelTargetSeconds => "queue_codel_target_seconds",
            AdmissionSetting::QueueCodelIntervalSeconds => "queue_codel_interval_seconds",
            AdmissionSetting::QueueLifo => "queue_lifo",
            AdmissionSetting::QueueTimeoutSeconds => "queue_timeout_seconds",
        }
    }
}
