//! The client side's families: failures talking to the app.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::metrics::{LabelValues, MetricsError, reg};
/// The client side: failures talking to the app.
#[derive(Debug)]
pub struct UpstreamMetrics {
    /// `tidegate_upstream_errors_total{kind}`.
    pub upstream_errors: IntCounterVec,
    /// `tidegate_upstream_replays_total`: bodiless idempotent requests sent again on a new
    /// connection after a reused one closed before answering (the keep-alive race), and
    /// requests an HTTP/2 app refused or left unprocessed by its `GOAWAY`.
    pub upstream_replays: IntCounter,
    /// `tidegate_upstream_keepalive_seconds`: the app's keep-alive timeout as tidegate knows
    /// it, announced (`Keep-Alive: timeout=N`) or learned from the idle connections it closed;
    /// 0 while unknown. Pooled connections close after three quarters of it.
    pub upstream_keepalive: Gauge,
    /// `tidegate_abandoned_exchanges`: exchanges whose client left, being finished in the
    /// background (`--on-client-abort finish`).
    pub abandoned: IntGauge,
    /// `tidegate_abandoned_exchanges_total{outcome}`, indexed by [`AbandonedOutcome`]:
    /// abandoned exchanges that the app finished, or that `--abandoned-timeout` cut.
    pub abandoned_total: [IntCounter; 2],
}

/// `tidegate_abandoned_exchanges_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbandonedOutcome {
    /// The app finished the exchange (or it failed on its own).
    Finished = 0,
    /// `--abandoned-timeout` passed first: the exchange was cut.
    Cut = 1,
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
            upstream_keepalive: reg(
                r,
                Gauge::new(
                    "tidegate_upstream_keepalive_seconds",
                    "The app's keep-alive timeout, announced or learned from its idle closes; \
                     0 while unknown",
                )?,
            )?,
            abandoned: reg(
                r,
                IntGauge::new(
                    "tidegate_abandoned_exchanges",
                    "Exchanges whose client left, being finished in the background",
                )?,
            )?,
            abandoned_total: {
                let family = reg(
                    r,
                    IntCounterVec::new(
                        Opts::new(
                            "tidegate_abandoned_exchanges_total",
                            "Exchanges whose client left, by how their background finish ended",
                        ),
                        &["outcome"],
                    )?,
                )?;
                AbandonedOutcome::ALL.map(|o| family.with_label_values(&[o.as_label()]))
            },
        };
        for kind in UpstreamError::ALL {
            m.upstream_errors.with_label_values(&[kind.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl AbandonedOutcome {
    const ALL: [AbandonedOutcome; 2] = [AbandonedOutcome::Finished, AbandonedOutcome::Cut];

    fn as_label(self) -> &'static str {
        match self {
            AbandonedOutcome::Finished => "finished",
            AbandonedOutcome::Cut => "cut",
        }
    }
}

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
