//! tidegate: a sidecar reverse proxy that keeps a service up through overload and deploys.
//!
//! Two lanes, two runtimes:
//!
//! - **Proxy lane** ([`serve`], [`stack`]): the proxy runtime accepts client connections and
//!   serves each with the tower stack *record metrics → `Connection: close` on shutdown →
//!   rescue errors → request limits ([`screen`]) → coalescing ([`coalesce`]) → admission
//!   ([`limit`]: fixed or adaptive limit, ordered queue) → [`proxy`]*, which forwards to the
//!   app over a pooled client and streams bodies both ways.
//! - **Reserved lane** ([`admin`]): its own OS thread and current-thread runtime answer
//!   `/livez`, `/readyz`, `/app/livez`, `/metrics`, `/state`, `/prestop` and `/drain` from cached
//!   [`health`] state, and run the app's active health checks, so a saturated proxy or app
//!   cannot make a probe wait.
//!
//! Shutdown ([`drain`]) walks *delay → drain → exit*: readiness fails at once, traffic is
//! still served for `--shutdown-delay`, then listeners close and in-flight work finishes
//! within `--drain-timeout`. [`server`] wires it all; [`supervise`] runs the app as a child
//! process when tidegate is the container's entrypoint.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs, unreachable_pub)]
// Input-dependent paths must not panic: errors are typed and answered (tests may unwrap).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod body;
pub mod check;
pub mod coalesce;
pub mod config;
pub mod drain;
pub mod error;
pub mod health;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod rescue;
pub mod screen;
pub mod serve;
pub mod server;
pub mod signals;
pub mod stack;
pub mod supervise;
pub mod upstream;

pub use crate::config::{Args, Config};
pub use crate::server::{Running, Server, StartError};

/// Exit code when a flag or the configuration is invalid, or a listener cannot be bound.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code when the drain timeout cut requests off.
pub const EXIT_DRAIN_TIMEOUT: i32 = 3;
/// Exit code for other failures at run time.
pub const EXIT_FAILURE: i32 = 1;
