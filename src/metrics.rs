//! What every metric family is built with: the registry helper, the latency buckets, one
//! list of values per label ([`LabelValues`]), and the request-level family every stage counts
//! into ([`RequestMetrics`]).
//!
//! Each family is declared and registered by the module that owns it (`AdmissionMetrics` in
//! `admission`, `ConnectionMetrics` in `inbound`, ...); `app::Metrics` holds them all with the
//! one registry `/metrics` encodes. No global state: each server has its own registry.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Error building the registry (a duplicate or malformed metric: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics")]
pub struct MetricsError(#[from] prometheus::Error);

/// Buckets of every latency histogram, in seconds.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 180.0,
];

/// The values of a label, as one list: the series are created from it at start (so that
/// `rate()` and alerts work before the first event), and the docs are checked against it.
pub(crate) trait LabelValues: Copy + 'static {
    /// Every value.
    const ALL: &'static [Self];
    /// The value as exported.
    fn as_label(self) -> &'static str;
    /// Every value as exported.
    #[cfg(test)]
    fn labels() -> Vec<&'static str> {
        Self::ALL.iter().map(|v| v.as_label()).collect()
    }
}

/// Every request the proxy lane answers.
#[derive(Debug)]
pub struct RequestMetrics {
    /// `tidegate_requests_total{code}`: responses sent to clients, by status code.
    pub requests: IntCounterVec,
    /// `tidegate_request_duration_seconds`: time from request head to response head.
    pub request_duration: Histogram,
    /// `tidegate_requests_rejected_total{reason}`: requests refused for breaking a limit or the
    /// protocol, before they reached the app (or before their body did).
    pub rejected: IntCounterVec,
    /// Series of `requests` resolved once per status code, so counting a response touches no
    /// label map.
    requests_by_code: Box<[std::sync::OnceLock<IntCounter>]>,
}

// === impl RequestMetrics ===

impl RequestMetrics {
    /// Counts one request refused for breaking a limit or the protocol.
    pub fn count_rejection(&self, rejected: &crate::error::Rejected) {
        self.rejected.with_label_values(&[rejected.as_str()]).inc();
    }

    /// Counts one response with `status` in `tidegate_requests_total`.
    pub fn count_response(&self, status: http::StatusCode) {
        let code = status.as_u16() as usize;
        match self.requests_by_code.get(code) {
            Some(slot) => slot
                .get_or_init(|| self.requests.with_label_values(&[status.as_str()]))
                .inc(),
            None => self.requests.with_label_values(&[status.as_str()]).inc(),
        }
    }

    /// Creates the family and registers it in `registry`.
    pub fn register(registry: &Registry) -> Result<RequestMetrics, MetricsError> {
        let r = registry;
        let m = RequestMetrics {
            requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_requests_total",
                        "Responses sent to clients, by status code",
                    ),
                    &["code"],
                )?,
            )?,
            request_duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tidegate_request_duration_seconds",
                        "Time from a request's head to its response head, refusals included",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            rejected: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidegate_requests_rejected_total",
                        "Requests refused for breaking a limit or the protocol, by reason",
                    ),
                    &["reason"],
                )?,
            )?,
            requests_by_code: (0..1000).map(|_| std::sync::OnceLock::new()).collect(),
        };
        for reason in crate::error::Rejected::LABELS {
            m.rejected.with_label_values(&[reason]);
        }
        Ok(m)
    }
}

/// Registers `metric` in `registry` and returns it.
pub(crate) fn reg<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Renders every metric of `registry` in the Prometheus text exposition format.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut buf = Vec::with_capacity(16 * 1024);
    // Encoding into a Vec only fails on malformed metric families, which registration rules out.
    if let Err(error) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(%error, "Cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}
