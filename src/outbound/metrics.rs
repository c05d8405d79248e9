//! The client side's families: failures talking to the app.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::metrics::{LabelValues, MetricsError, reg};
/// The client side: failures talking to the app.
#[derive(Debug)]
pub struct UpstreamMetrics {
    /// `tidegate_upstream_errors_total{kind}`.
    pub upstream_errors: IntCounterVec,
    /// `tidegate_upstream_replays_total`: bodiless idempotent requests sent again on a new
    /// connection after a reused one closed before answering (the keep-alive race).
    pub upstream_replays: IntCounter,
}

/// `tidegate_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// No connection could be opened.
    Connect,
    /// Opening a connection took longer than `--connect-timeout`.
    ConnectTimeout,
    /// No response head within the upstream timeout.
    Timeout,
    /// The connection failed before a response head.
    Reset,
}

// === impl UpstreamMetrics ===

impl UpstreamMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<UpstreamMetrics, MetricsError> {
        let r = registry;
        let m = UpstreamMetrics {
            upstream_errors: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_upstream_errors_total",
                        "Failed exchanges with the app, by kind",
                    ),
                    &["kind"],
                )?,
            )?,
            upstream_replays: reg(
                r,
                IntCounter::new(
                    "tidegate_upstream_replays_total",
                    "Requests sent again on a new connection after a reused one closed before \
                     answering",
                )?,
            )?,
        };
        for kind in UpstreamError::ALL {
            m.upstream_errors.with_label_values(&[kind.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl LabelValues for UpstreamError {
    const ALL: &'static [UpstreamError] = &[
        UpstreamError::Connect,
        UpstreamError::ConnectTimeout,
        UpstreamError::Timeout,
        UpstreamError::Reset,
    ];

    fn as_label(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::ConnectTimeout => "connect-timeout",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Reset => "reset",
        }
    }
}
