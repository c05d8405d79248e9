//! What an admitted request holds: its [`Admission`] (the slot, its route's permit, the
//! latency sample for the adaptive limit), released when the exchange with the app is over.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::Shared;
use super::routes::RouteState;

/// A request that holds an [`Admission`]; the inner service must keep the admission alive
/// until its exchange with the app is over.
#[derive(Debug)]
pub(crate) struct Admitted<R> {
    /// The request.
    pub request: R,
    /// The slot(s) it holds.
    pub admission: Admission,
}

/// Proof that a request was admitted; dropping it frees the slot(s) and updates the gauges.
#[derive(Debug)]
pub struct Admission {
    pub(super) shared: Arc<Shared>,
    pub(super) route: Option<Arc<RouteState>>,
    /// When the global slot was taken.
    pub(super) since: Instant,
    /// What the release reports to the adaptive limit.
    pub(super) sample: Sample,
    pub(super) route_permit: Option<OwnedSemaphorePermit>,
    pub(super) max_request_body: Option<u64>,
}

/// The latency sample an admission gives the adaptive limit when it is released.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Sample {
    /// The time the slot was held (the exchange ended before a response head).
    Held,
    /// The time to the app's response head.
    Fixed(Duration),
    /// None: the exchange says nothing about the app's latency.
    Skip,
}

// === impl Admission ===

impl Admission {
    /// The largest request body allowed, in bytes; `None` is unlimited.
    pub fn max_request_body(&self) -> Option<u64> {
        self.max_request_body
    }

    /// The upstream timeout of the request's route, if it sets one.
    pub fn route_timeout(&self) -> Option<Duration> {
        self.route.as_ref().and_then(|r| r.spec.timeout)
    }

    /// Fixes the adaptive limit's latency sample at the time so far, although the slot stays
    /// held: called when the app's response head arrives, so that a client reading the body
    /// slowly (or a WebSocket tunnel's lifetime) does not count as the app's latency.
    pub fn sample_now(&mut self) {
        if self.sample == Sample::Held {
            self.sample = Sample::Fixed(self.since.elapsed());
        }
    }

    /// Gives the adaptive limit no sample for this exchange (it failed before the app could
    /// answer, e.g. the connection was refused: its speed says nothing about the app's).
    pub fn skip_sample(&mut self) {
        self.sample = Sample::Skip;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared.metrics.in_flight.dec();
        let now = Instant::now();
        let latency = match self.sample {
            Sample::Held => Some(now.saturating_duration_since(self.since)),
            Sample::Fixed(latency) => Some(latency),
            Sample::Skip => None,
        };
        if let Some(update) = shared.global.release(now, latency) {
            shared.on_update(update);
        }
        match &self.route {
            Some(route) => {
                route.slots.counters.in_flight.dec();
                if let Some(permit) = self.route_permit.take() {
                    route.slots.gate.release(permit);
                }
            }
            None => shared.default_route.in_flight.dec(),
        }
    }
}
