//! Prometheus metrics: one [`Metrics`] owns its registry (no global state). The stack's
//! `record` layer counts every proxied request by status and time to response head.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric tidegate exports. Names are stable: dashboards and alerts depend on them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `tidegate_requests_total{code}`: responses sent to clients, by status code.
    pub requests: IntCounterVec,
    /// Series of `requests` resolved once per status code, so counting a response touches no
    /// label map.
    requests_by_code: Box<[std::sync::OnceLock<IntCounter>]>,
    /// `tidegate_request_duration_seconds`: time from request head to response head.
    pub request_duration: Histogram,
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
    /// `tidegate_upstream_errors_total{kind}`.
    pub upstream_errors: IntCounterVec,
    /// `tidegate_upstream_replays_total`: bodiless idempotent requests sent again on a new
    /// connection after a reused one closed before answering (the keep-alive race).
    pub upstream_replays: IntCounter,
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
    /// `tidegate_requests_rejected_total{reason}`: requests refused for breaking a limit or the
    /// protocol, before they reached the app (or before their body did).
    pub rejected: IntCounterVec,
    /// `tidegate_runtime_tasks`: tasks alive on the proxy runtime (sampled with the heartbeat).
    pub runtime_tasks: IntGauge,
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
    /// `tidegate_shutdown_phase`: 0 serving, 1 delay, 2 drain, 3 exiting.
    pub shutdown_phase: IntGauge,
    /// `tidegate_drain_cut_requests`: requests still in flight when the drain timeout hit.
    pub drain_cut: IntGauge,
    /// `tidegate_config_reloads_total{result}`: reloads, `ok` or `error`.
    pub reloads: IntCounterVec,
    /// `tidegate_config_generation`: configurations applied since start (1 = the first).
    pub config_generation: IntGauge,
    /// `tidegate_config_hash`: low 52 bits of the config file's hash (0 without a file).
    pub config_hash: prometheus::Gauge,
}

/// Error building the registry (a duplicate or malformed metric: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics")]
pub struct MetricsError(#[from] prometheus::Error);

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 180.0,
];

// === impl Metrics ===

impl Metrics {
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

    /// Creates every metric in a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let r = &registry;
        let m = Metrics {
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
            runtime_tasks: reg(
                r,
                IntGauge::new(
                    "tidegate_runtime_tasks",
                    "Tasks alive on the proxy runtime (connections, exchanges, timers)",
                )?,
            )?,
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
            shutdown_phase: reg(
                r,
                IntGauge::new(
                    "tidegate_shutdown_phase",
                    "Shutdown phase: 0 serving, 1 delay, 2 drain, 3 exiting",
                )?,
            )?,
            drain_cut: reg(
                r,
                IntGauge::new(
                    "tidegate_drain_cut_requests",
                    "Requests still in flight when the drain timeout cut them off",
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
            requests_by_code: (0..1000).map(|_| std::sync::OnceLock::new()).collect(),
            registry,
        };
        // Series that exist from the start, so that rate() and alerts work before the first
        // event.
        for kind in ["connect", "connect-timeout", "timeout", "reset"] {
            m.upstream_errors.with_label_values(&[kind]);
        }
        for reason in ["idle", "header"] {
            m.connections_timed_out.with_label_values(&[reason]);
        }
        for reason in crate::error::Rejected::LABELS {
            m.rejected.with_label_values(&[reason]);
        }
        for result in ["pass", "fail", "busy"] {
            m.app_health_checks.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            m.reloads.with_label_values(&[result]);
        }
        for outcome in ["shared", "alone", "cached"] {
            m.coalesced.with_label_values(&[outcome]);
        }
        for window in ["recent", "baseline"] {
            m.adaptive_latency.with_label_values(&[window]);
        }
        for path in [
            "/livez",
            "/readyz",
            "/app/livez",
            "/metrics",
            "/state",
            "/prestop",
            "/drain",
        ] {
            m.probe_duration.with_label_values(&[path]);
        }
        Ok(m)
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on malformed metric families, which `new` rules out.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(%error, "Cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, for embedding tidegate's metrics elsewhere.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

fn reg<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}
