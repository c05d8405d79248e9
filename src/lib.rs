//! tidegate: a sidecar reverse proxy that keeps a service up through overload and deploys.
//!
//! The modules are the stages a request passes through, in order:
//!
//! - [`inbound`]: the proxy lane's server side. The listener accepts client connections and
//!   serves each with hyper over the stack, with the connection-level timeouts and HTTP/1
//!   parking.
//! - [`stack`]: the tower layers, outermost first: *record → close-on-shutdown → rescue →
//!   screen → route → coalesce → limit*. `route` classifies a request once; the layers after
//!   it read that one typed value.
//! - [`admission`]: the limiter the `limit` layer asks: fixed or adaptive limit, per-route
//!   bulkheads and one ordered, bounded queue.
//! - [`outbound`]: the proxy service and its client: bodies both ways, headers, upgrades and
//!   the pool of connections to the app.
//!
//! Beside the request path:
//!
//! - [`admin`]: the reserved lane, on its own OS thread and current-thread runtime, answers
//!   `/livez`, `/readyz`, `/app/livez`, `/metrics`, `/state`, `/prestop` and `/drain` from
//!   cached health state and runs the app's health checks, so a saturated proxy or app cannot
//!   make a probe wait.
//! - [`drain`]: the shutdown phases every lane watches (*serving → delay → drain → exit*).
//! - [`app`]: the process: binds the listeners, spawns the lanes, walks the shutdown sequence,
//!   handles signals and reloads, and runs the app as a child in supervisor mode.
//! - [`config`]: every setting (flag, environment variable, file key), validated once.
//! - [`metrics`], [`error`] and [`check`] (`tidegate check`, the manifest linter).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs, unreachable_pub)]
// Input-dependent paths must not panic: errors are typed and answered (tests may unwrap).
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod admission;
mod app;
pub mod check;
pub mod config;
mod drain;
mod error;
mod inbound;
mod metrics;
mod outbound;
mod stack;

// The public facade: what the binary, the integration tests, the benchmarks and the examples
// use. Everything else is crate-private.
pub use crate::app::logging::init as init_logging;
pub use crate::app::signals;
pub use crate::app::supervise::Child;
pub use crate::app::{Metrics, Running, Server, StartError};
pub use crate::config::{Args, Config, ConfigError, FileError, LogFormat, RuntimeMode};
pub use crate::drain::{DrainOutcome, Lifecycle, Phase};
pub use crate::error::ErrorChain;
pub use crate::inbound::raise_fd_limit;
/// Header rewriting, for the fuzz tests.
#[doc(hidden)]
pub use crate::outbound::headers;

/// Exit code when a flag or the configuration is invalid, or a listener cannot be bound.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code when the drain timeout cut requests off.
pub const EXIT_DRAIN_TIMEOUT: i32 = 3;
/// Exit code for other failures at run time.
pub const EXIT_FAILURE: i32 = 1;
