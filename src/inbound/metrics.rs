//! The proxy lane's connection families.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::metrics::{LabelValues, MetricsError, reg};
/// Client connections of the proxy lane.
#[derive(Debug)]
pub struct ConnectionMetrics {
    /// `tidegate_connections_open`: downstream connections open now.
    pub connections_open: IntGauge,
    /// `tidegate_connections_parked`: open HTTP/1.1 connections that are idle with their
    /// buffers freed (`--park-idle-after`); counted in `connections_open` too.
    pub connections_parked: IntGauge,
    /// `tidegate_connection_parks_total`: times an idle connection was parked. Close to the
    /// request rate means `--park-idle-after` is shorter than clients' pauses between requests.
    pub connection_parks: IntCounter,
    /// `tidegate_connections_total`: downstream connections accepted.
    pub connections_total: IntCounter,
    /// `tidegate_connections_rejected_total`: connections closed at once because
    /// `--max-connections` were open.
    pub connections_rejected: IntCounter,
    /// `tidegate_connections_limit`: `--max-connections`.
    pub connections_limit: IntGauge,
    /// `tidegate_connections_timed_out_total{reason}`: connections tidegate closed, `idle`
    /// (no request for `--idle-timeout`) or `header` (a request head slower than
    /// `--header-read-timeout`).
    pub connections_timed_out: IntCounterVec,
}

/// `tidegate_connections_timed_out_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutReason {
    /// No request for `--idle-timeout`.
    Idle,
    /// A request head slower than `--header-read-timeout`.
    Header,
}

// === impl ConnectionMetrics ===

impl ConnectionMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<ConnectionMetrics, MetricsError> {
        let r = registry;
        let m = ConnectionMetrics {
            connections_open: reg(
                r,
                IntGauge::new(
                    "tidegate_connections_open",
                    "Client connections open on the proxy listener",
                )?,
            )?,
            connections_parked: reg(
                r,
                IntGauge::new(
                    "tidegate_connections_parked",
                    "Idle HTTP/1.1 client connections whose buffers are freed until their next byte",
                )?,
            )?,
            connection_parks: reg(
                r,
                IntCounter::new(
                    "tidegate_connection_parks_total",
                    "Times an idle HTTP/1.1 client connection was parked (its buffers freed)",
                )?,
            )?,
            connections_total: reg(
                r,
                IntCounter::new(
                    "tidegate_connections_total",
                    "Client connections accepted on the proxy listener",
                )?,
            )?,
            connections_rejected: reg(
                r,
                IntCounter::new(
                    "tidegate_connections_rejected_total",
                    "Client connections closed at once because --max-connections were open",
                )?,
            )?,
            connections_limit: reg(
                r,
                IntGauge::new(
                    "tidegate_connections_limit",
                    "Client connections allowed open at once (--max-connections)",
                )?,
            )?,
            connections_timed_out: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_connections_timed_out_total",
                        "Client connections closed by tidegate: idle, or a request head too slow",
                    ),
                    &["reason"],
                )?,
            )?,
        };
        for reason in TimeoutReason::ALL {
            m.connections_timed_out
                .with_label_values(&[reason.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl LabelValues for TimeoutReason {
    const ALL: &'static [TimeoutReason] = &[TimeoutReason::Idle, TimeoutReason::Header];

    fn as_label(self) -> &'static str {
        match self {
            TimeoutReason::Idle => "idle",
            TimeoutReason::Header => "header",
        }
    }
}
