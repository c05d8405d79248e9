//! The proxy lane's tower stack, one file per layer, outermost first:
//!
//! 1. [`record`]: metrics and the access log;
//! 2. [`close`]: `Connection: close` once shutdown starts;
//! 3. [`rescue`]: every error becomes a response (503, 502, 504, 4xx);
//! 4. [`screen`]: request limits that need no route (URI length, headers, upgrades);
//! 5. [`route`]: the request's route and class, decided once ([`route::Routed`]);
//! 6. [`coalesce`]: identical GETs on coalescing routes share one exchange;
//! 7. [`limit`]: admission (a slot, a queue place, or a refusal);
//!
//! then the proxy ([`crate::outbound`]), which forwards to the app.

pub(crate) mod close;
pub(crate) mod coalesce;
pub(crate) mod limit;
pub(crate) mod record;
pub(crate) mod rescue;
pub(crate) mod route;
pub(crate) mod screen;

use std::net::SocketAddr;

use tower::ServiceBuilder;

use crate::outbound::Proxy;
use crate::outbound::half_close::HalfClose;
use crate::stack::close::{CloseOnShutdown, CloseOnShutdownLayer};
use crate::stack::coalesce::{Coalesce, CoalesceLayer};
use crate::stack::limit::{Limit, LimitLayer};
use crate::stack::record::{Record, RecordLayer};
use crate::stack::rescue::{Rescue, RescueLayer};
use crate::stack::route::{Route, RouteLayer};
use crate::stack::screen::{Screen, ScreenLayer};

/// The service one client connection is served by.
pub(crate) type ConnService =
    Record<CloseOnShutdown<Rescue<Screen<Route<Coalesce<Limit<Proxy>>>>>>>;

/// The layers, built once at start-up and cloned per connection.
#[derive(Clone, Debug)]
pub(crate) struct ProxyStack {
    /// Metrics and access log.
    pub record: RecordLayer,
    /// `Connection: close` once shutdown starts.
    pub close: CloseOnShutdownLayer,
    /// Errors to responses.
    pub rescue: RescueLayer,
    /// Request limits checked before admission.
    pub screen: ScreenLayer,
    /// The request's route and class, decided once.
    pub route: RouteLayer,
    /// Request coalescing.
    pub coalesce: CoalesceLayer,
    /// Admission control.
    pub limit: LimitLayer,
    /// The innermost proxy.
    pub proxy: Proxy,
}

// === impl ProxyStack ===

impl ProxyStack {
    /// The stack for one client connection from `client_addr`; `half_close` is set for an
    /// HTTP/1.1 connection whose client is answered after a half-close.
    pub(crate) fn service(
        &self,
        client_addr: SocketAddr,
        half_close: Option<HalfClose>,
    ) -> ConnService {
        ServiceBuilder::new()
            .layer(self.record.clone())
            .layer(self.close.clone())
            .layer(self.rescue.clone())
            .layer(self.screen.clone())
            .layer(self.route.for_client(client_addr))
            .layer(self.coalesce.clone())
            .layer(self.limit.clone())
            .service(self.proxy.for_client(client_addr, half_close))
    }
}
