//! The coalescing families.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::metrics::{LabelValues, MetricsError, reg};
/// Request coalescing and its cache.
#[derive(Debug)]
pub struct CoalesceMetrics {
    /// `tidegate_coalesced_requests_total{outcome}`: requests that waited for an identical
    /// request's response: `shared` (answered with it) or `alone` (sent on their own after
    /// all: the response could not be shared), and `cached`: answered from the cache.
    pub coalesced: IntCounterVec,
    /// `tidegate_coalesce_waiting`: requests waiting for an identical request's response.
    pub coalesce_waiting: IntGauge,
    /// `tidegate_coalesce_cache_entries`: responses held by the coalescing cache.
    pub coalesce_cache_entries: IntGauge,
    /// `tidegate_coalesce_cache_bytes`: bytes held by the coalescing cache.
    pub coalesce_cache_bytes: IntGauge,
}

/// `tidegate_coalesced_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CoalesceOutcome {
    /// Answered with an identical request's response.
    Shared,
    /// Sent on its own after all: the response could not be shared.
    Alone,
    /// Answered from the cache.
    Cached,
}

// === impl CoalesceMetrics ===

impl CoalesceMetrics {
    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<CoalesceMetrics, MetricsError> {
        let r = registry;
        let m = CoalesceMetrics {
            coalesced: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_coalesced_requests_total",
                        "Requests that waited for an identical request's response, by outcome",
                    ),
                    &["outcome"],
                )?,
            )?,
            coalesce_waiting: reg(
                r,
                IntGauge::new(
                    "tidegate_coalesce_waiting",
                    "Requests waiting for an identical request's response",
                )?,
            )?,
            coalesce_cache_entries: reg(
                r,
                IntGauge::new(
                    "tidegate_coalesce_cache_entries",
                    "Responses held by the coalescing cache",
                )?,
            )?,
            coalesce_cache_bytes: reg(
                r,
                IntGauge::new(
                    "tidegate_coalesce_cache_bytes",
                    "Bytes (bodies and headers) held by the coalescing cache",
                )?,
            )?,
        };
        for outcome in CoalesceOutcome::ALL {
            m.coalesced.with_label_values(&[outcome.as_label()]);
        }
        Ok(m)
    }
}

// === impl labels ===

impl LabelValues for CoalesceOutcome {
    const ALL: &'static [CoalesceOutcome] = &[
        CoalesceOutcome::Shared,
        CoalesceOutcome::Alone,
        CoalesceOutcome::Cached,
    ];

    fn as_label(self) -> &'static str {
        match self {
            CoalesceOutcome::Shared => "shared",
            CoalesceOutcome::Alone => "alone",
            CoalesceOutcome::Cached => "cached",
        }
    }
}
