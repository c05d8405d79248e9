//! The proxy lane's tower stack, outermost first:
//! record metrics → `Connection: close` on shutdown → rescue errors → request limits →
//! coalescing → admission → proxy.

use std::net::SocketAddr;

use tower::ServiceBuilder;

use crate::coalesce::{Coalesce, CoalesceLayer};
use crate::drain::{CloseOnShutdown, CloseOnShutdownLayer};
use crate::limit::{Limit, LimitLayer};
use crate::metrics::{Record, RecordLayer};
use crate::proxy::Proxy;
use crate::rescue::{Rescue, RescueLayer};
use crate::screen::{Screen, ScreenLayer};

/// The service one client connection is served by.
pub type ConnService = Record<CloseOnShutdown<Rescue<Screen<Coalesce<Limit<Proxy>>>>>>;

/// The layers, built once at start-up and cloned per connection.
#[derive(Clone, Debug)]
pub struct ProxyStack {
    /// Metrics and access log.
    pub record: RecordLayer,
    /// `Connection: close` once shutdown starts.
    pub close: CloseOnShutdownLayer,
    /// Errors to responses.
    pub rescue: RescueLayer,
    /// Request limits checked before admission.
    pub screen: ScreenLayer,
    /// Route lookup and request coalescing.
    pub coalesce: CoalesceLayer,
    /// Admission control.
    pub limit: LimitLayer,
    /// The innermost proxy.
    pub proxy: Proxy,
}

// === impl ProxyStack ===

impl ProxyStack {
    /// The stack for one client connection from `client_addr`.
    pub fn service(&self, client_addr: SocketAddr) -> ConnService {
        ServiceBuilder::new()
            .layer(self.record.clone())
            .layer(self.close.clone())
            .layer(self.rescue.clone())
            .layer(self.screen.clone())
            .layer(self.coalesce.clone())
            .layer(self.limit.for_client(client_addr))
            .service(self.proxy.for_client(client_addr))
    }
}
