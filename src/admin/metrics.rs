//! The reserved lane's families: probes, readiness and the app's health checks.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::metrics::{LATENCY_BUCKETS, LabelValues, MetricsError, reg};
/// The reserved lane: probes, readiness and the app's health checks.
#[derive(Debug)]
pub struct AdminMetrics {
    /// `tidegate_app_health_checks_total{result}`: active checks of the app.
    pub app_health_checks: IntCounterVec,
    /// `tidegate_app_health_check_duration_seconds`.
    pub app_health_check_duration: Histogram,
    /// `tidegate_app_healthy`: 1 when the app's health checks pass.
    pub app_healthy: IntGauge,
    /// `tidegate_ready`: 1 when `/readyz` answers 200.
    pub ready: IntGauge,
    /// `tidegate_probe_requests_total{path,code}`: answers on the admin lane.
    pub probes: IntCounterVec,
    /// `tidegate_probe_duration_seconds{path}`: admin lane answer time.
    pub probe_duration: HistogramVec,
}

/// `tidegate_app_health_checks_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckResult {
    /// The check passed.
    Pass,
    /// The check failed.
    Fail,
    /// The app was too busy to answer in time (not counted against it).
    Busy,
}

/// `tidegate_probe_requests_total{path}` and `tidegate_probe_duration_seconds{path}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminPath {
    /// `/livez`.
    Livez,
    /// `/readyz`.
    Readyz,
    /// `/app/livez`.
    AppLivez,
    /// `/metrics`.
    Metrics,
    /// `/state`.
    State,
    /// `/prestop`.
    Prestop,
    /// `/drain`.
    Drain,
    /// Any other path or method.
    Other,
}

// === impl AdminMetrics ===

impl AdminMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<AdminMetrics, MetricsError> {
        let r = registry;
        let m = AdminMetrics {
            app_health_checks: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_app_health_checks_total",
                        "Active health checks of the app, by result",
                    ),
                    &["result"],
                )?,
            )?,
            app_health_check_duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tidegate_app_health_check_duration_seconds",
                        "Time an active health check of the app took",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            app_healthy: reg(
                r,
                IntGauge::new(
                    "tidegate_app_healthy",
                    "1 when the app passes its health checks",
                )?,
            )?,
            ready: reg(
                r,
                IntGauge::new("tidegate_ready", "1 when /readyz answers 200")?,
            )?,
            probes: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_probe_requests_total",
                        "Requests answered on the admin lane",
                    ),
                    &["path", "code"],
                )?,
            )?,
            probe_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tidegate_probe_duration_seconds",
                        "Time the admin lane took to answer",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["path"],
                )?,
            )?,
        };
        for path in AdminPath::ALL {
            m.probe_duration.with_label_values(&[path.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl LabelValues for CheckResult {
    const ALL: &'static [CheckResult] = &[CheckResult::Pass, CheckResult::Fail, CheckResult::Busy];

    fn as_label(self) -> &'static str {
        match self {
            CheckResult::Pass => "pass",
            CheckResult::Fail => "fail",
            CheckResult::Busy => "busy",
        }
    }
}

impl LabelValues for AdminPath {
    const ALL: &'static [AdminPath] = &[
        AdminPath::Livez,
        AdminPath::Readyz,
        AdminPath::AppLivez,
        AdminPath::Metrics,
        AdminPath::State,
        AdminPath::Prestop,
        AdminPath::Drain,
        AdminPath::Other,
    ];

    fn as_label(self) -> &'static str {
        match self {
            AdminPath::Livez => "/livez",
            AdminPath::Readyz => "/readyz",
            AdminPath::AppLivez => "/app/livez",
            AdminPath::Metrics => "/metrics",
            AdminPath::State => "/state",
            AdminPath::Prestop => "/prestop",
            AdminPath::Drain => "/drain",
            AdminPath::Other => "other",
        }
    }
}
