//! The routes in force: each one's spec, its slots kept across reloads, its pre-resolved
//! series, and the [`RouteRef`] a request carries once the route stage has looked it up.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use super::gate::Gate;
use super::metrics::AdmissionMetrics;
use super::{DEFAULT_ROUTE, RouteSpec, RouteTable};
use crate::error::ShedReason;

/// The route a request belongs to and the body limit that applies to it, looked up once per
/// request.
#[derive(Debug, Clone)]
pub struct RouteRef {
    pub(super) route: Option<Arc<RouteState>>,
    pub(super) max_request_body: Option<u64>,
}

/// The route set in force; replaced whole on reload.
#[derive(Debug)]
pub(super) struct Routes {
    pub(super) specs: Vec<RouteSpec>,
    pub(super) table: RouteTable,
    pub(super) states: Vec<Arc<RouteState>>,
}

/// A route as configured now.
#[derive(Debug)]
pub(super) struct RouteState {
    pub(super) spec: RouteSpec,
    pub(super) slots: Arc<RouteSlots>,
}

/// What a route keeps across reloads: its semaphore, its waiters and its series.
#[derive(Debug)]
pub(super) struct RouteSlots {
    pub(super) gate: Gate,
    /// Requests waiting for this route's permit, bounded by `max_waiting`.
    pub(super) waiting: AtomicUsize,
    pub(super) max_waiting: AtomicUsize,
    pub(super) counters: RouteCounters,
}

/// Pre-resolved per-route series, so that refusing touches no label map.
#[derive(Debug)]
pub(super) struct RouteCounters {
    pub(super) in_flight: IntGauge,
    pub(super) queued: IntGauge,
    pub(super) shed: [IntCounter; ShedReason::ALL.len()],
}

// === impl RouteCounters ===

impl RouteCounters {
    pub(super) fn new(metrics: &AdmissionMetrics, route: &str) -> RouteCounters {
        RouteCounters {
            in_flight: metrics.route_in_flight.with_label_values(&[route]),
            queued: metrics.route_queued.with_label_values(&[route]),
            shed: ShedReason::ALL.map(|r| metrics.shed.with_label_values(&[r.as_str(), route])),
        }
    }
}

// === impl RouteRef ===

impl RouteRef {
    /// The largest request body allowed, in bytes; `None` is unlimited.
    pub fn max_request_body(&self) -> Option<u64> {
        self.max_request_body
    }

    /// Whether the route shares identical GETs (`coalesce = true`, or a `coalesce_cache`).
    pub fn coalesces(&self) -> bool {
        self.route.as_ref().is_some_and(|r| r.spec.coalesces())
    }

    /// How long the route keeps shareable responses (`coalesce_cache`), if it does.
    pub fn coalesce_cache(&self) -> Option<Duration> {
        self.route.as_ref().and_then(|r| r.spec.coalesce_cache)
    }

    /// The route's metrics label.
    pub fn name(&self) -> &str {
        self.route.as_ref().map_or(DEFAULT_ROUTE, |r| &r.spec.name)
    }
}
