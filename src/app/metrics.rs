//! Every metric family of one server, each registered by the module that owns it, in one
//! registry: what `/metrics` encodes.

use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::admin::metrics::AdminMetrics;
use crate::admission::metrics::AdmissionMetrics;
use crate::app::logging::DroppedLines;
use crate::drain::DrainMetrics;
use crate::inbound::metrics::ConnectionMetrics;
use crate::metrics::{LabelValues, MetricsError, RequestMetrics, reg};
use crate::outbound::metrics::UpstreamMetrics;
use crate::stack::coalesce::metrics::CoalesceMetrics;

/// Every metric tidegate exports, by owner. Names are stable: dashboards and alerts depend on
/// them.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every request: counts by status, latency, rejections.
    pub requests: Arc<RequestMetrics>,
    /// Admission.
    pub admission: Arc<AdmissionMetrics>,
    /// Coalescing.
    pub coalesce: Arc<CoalesceMetrics>,
    /// The client side.
    pub upstream: Arc<UpstreamMetrics>,
    /// Client connections.
    pub connections: Arc<ConnectionMetrics>,
    /// The reserved lane.
    pub admin: Arc<AdminMetrics>,
    /// The shutdown walk.
    pub drain: Arc<DrainMetrics>,
    /// The process.
    pub process: Arc<ProcessMetrics>,
}

/// The process: its runtime and its configuration.
#[derive(Debug)]
pub struct ProcessMetrics {
    /// `tidegate_runtime_tasks`: tasks alive on the proxy runtime (sampled with the heartbeat).
    pub runtime_tasks: IntGauge,
    /// `tidegate_config_reloads_total{result}`: reloads, `ok` or `error`.
    pub reloads: IntCounterVec,
    /// `tidegate_config_generation`: configurations applied since start (1 = the first).
    pub config_generation: IntGauge,
    /// `tidegate_config_hash`: low 52 bits of the config file's hash (0 without a file).
    pub config_hash: prometheus::Gauge,
}

/// `tidegate_config_reloads_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadResult {
    /// Applied.
    Ok,
    /// Rejected; the configuration in force is kept.
    Error,
}

// === impl Metrics ===

impl Metrics {
    /// Creates every family in a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let r = &registry;
        Ok(Metrics {
            requests: Arc::new(RequestMetrics::register(r)?),
            admission: Arc::new(AdmissionMetrics::register(r)?),
            coalesce: Arc::new(CoalesceMetrics::register(r)?),
            upstream: Arc::new(UpstreamMetrics::register(r)?),
            connections: Arc::new(ConnectionMetrics::register(r)?),
            admin: Arc::new(AdminMetrics::register(r)?),
            drain: Arc::new(DrainMetrics::register(r)?),
            process: Arc::new(ProcessMetrics::register(r)?),
            registry: {
                registry.register(Box::new(DroppedLines::new()?))?;
                registry
            },
        })
    }

    /// The registry, for embedding tidegate's metrics elsewhere.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}

// === impl ProcessMetrics ===

impl ProcessMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<ProcessMetrics, MetricsError> {
        let r = registry;
        let m = ProcessMetrics {
            runtime_tasks: reg(
                r,
                IntGauge::new(
                    "tidegate_runtime_tasks",
                    "Tasks alive on the proxy runtime (connections, exchanges, timers)",
                )?,
            )?,
            reloads: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_config_reloads_total",
                        "Configuration reloads, by result",
                    ),
                    &["result"],
                )?,
            )?,
            config_generation: reg(
                r,
                IntGauge::new(
                    "tidegate_config_generation",
                    "Configurations applied since start (1 = the first)",
                )?,
            )?,
            config_hash: reg(
                r,
                prometheus::Gauge::new(
                    "tidegate_config_hash",
                    "Low 52 bits of the config file's hash (0 without a file)",
                )?,
            )?,
        };
        for result in ReloadResult::ALL {
            m.reloads.with_label_values(&[result.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl LabelValues for ReloadResult {
    const ALL: &'static [ReloadResult] = &[ReloadResult::Ok, ReloadResult::Error];

    fn as_label(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Error => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::{AdminPath, CheckResult};
    use crate::admission::metrics::{AdmissionSetting, LatencyWindow};
    use crate::error::{Rejected, ShedReason};
    use crate::inbound::metrics::TimeoutReason;
    use crate::outbound::metrics::UpstreamError;
    use crate::stack::coalesce::metrics::CoalesceOutcome;

    /// Every value a label can take is on its family's row of the README's metrics table:
    /// the series and the docs come from one list per label.
    #[test]
    fn every_label_value_is_documented() {
        let docs = include_str!("../../README.md");
        let families: [(&str, Vec<&str>); 11] = [
            (
                "tidegate_upstream_errors_total{kind}",
                UpstreamError::labels(),
            ),
            (
                "tidegate_connections_timed_out_total{reason}",
                TimeoutReason::labels(),
            ),
            (
                "tidegate_app_health_checks_total{result}",
                CheckResult::labels(),
            ),
            ("tidegate_probe_duration_seconds{path}", AdminPath::labels()),
            (
                "tidegate_config_reloads_total{result}",
                ReloadResult::labels(),
            ),
            (
                "tidegate_coalesced_requests_total{outcome}",
                CoalesceOutcome::labels(),
            ),
            (
                "tidegate_adaptive_latency_seconds{window}",
                LatencyWindow::labels(),
            ),
            (
                "tidegate_admission_setting{setting}",
                AdmissionSetting::labels(),
            ),
            (
                "tidegate_requests_rejected_total{reason}",
                Rejected::LABELS.to_vec(),
            ),
            (
                "tidegate_shed_total{reason,route}",
                ShedReason::ALL.iter().map(|r| r.as_str()).collect(),
            ),
            ("tidegate_requests_total{code}", vec![]),
        ];
        for (family, values) in families {
            let row = docs
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&format!("`{family}`")))
                .unwrap_or_else(|| panic!("{family} has no row in the README's metrics table"));
            for value in values {
                assert!(
                    row.contains(&format!("`{value}`")),
                    "{family}: `{value}` missing"
                );
            }
        }
    }

    /// The series of every labelled family exist from the start, before the first event.
    #[test]
    fn label_series_exist_before_the_first_event() {
        let metrics = Metrics::new().unwrap();
        let text = metrics.encode();
        for kind in UpstreamError::labels() {
            let series = format!("tidegate_upstream_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
        for result in ReloadResult::labels() {
            let series = format!("tidegate_config_reloads_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
    }
}
