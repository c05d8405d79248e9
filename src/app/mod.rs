//! Start-up and the shutdown sequence: binds both listeners, builds the proxy stack, starts
//! the admin lane on its own thread, serves, and walks the drain phases.

mod lanes;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod reload;
mod shutdown;
pub mod signals;
pub(crate) mod supervise;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

pub use self::metrics::Metrics;
use crate::admin::AppChecker;
use crate::admin::health::HealthState;
use crate::admin::{self, AdminHandle, AdminState};
use crate::admission::{LimitConfig, Limiter};
use crate::app::reload::Reloader;
use crate::config::{Config, LiveConfig};
use crate::drain::{DrainOutcome, Lifecycle, Phase};
use crate::metrics::MetricsError;
use crate::outbound::Proxy;
use crate::stack::ProxyStack;
use crate::stack::close::CloseOnShutdownLayer;
use crate::stack::coalesce::CoalesceLayer;
use crate::stack::limit::LimitLayer;
use crate::stack::record::RecordLayer;
use crate::stack::rescue::RescueLayer;
use crate::stack::route::RouteLayer;
use crate::stack::screen::ScreenLayer;

/// How long answers on the admin lane (a waiting `/prestop`) get to flush at exit.
const ADMIN_FLUSH: Duration = Duration::from_secs(2);
/// How often the config file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(1);

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (--{flag})")]
    Bind {
        /// The flag that named the address.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A runtime or thread could not be created.
    #[error("cannot start the {0}")]
    Runtime(&'static str, #[source] io::Error),
    /// The metrics registry could not be built.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Bound listeners and shared state, before anything runs.
#[derive(Debug)]
pub struct Server {
    live: LiveConfig,
    reloader: Arc<Reloader>,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
    limiter: Limiter,
    health: HealthState,
    proxy_listener: std::net::TcpListener,
    admin_listener: std::net::TcpListener,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
}

/// A started server: the admin lane runs; [`Running::run`] serves the proxy lane.
#[derive(Debug)]
pub struct Running {
    live: LiveConfig,
    reloader: Arc<Reloader>,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
    limiter: Limiter,
    health: HealthState,
    proxy_listener: std::net::TcpListener,
    stack: ProxyStack,
    background: TaskTracker,
    admin: AdminHandle,
}

// === impl Server ===

impl Server {
    /// Binds both listeners (port 0 picks a free port) and builds the shared state.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let (proxy_listener, proxy_addr) = bind("listen", config.args.listen)?;
        let (admin_listener, admin_addr) = bind("admin-listen", config.args.admin_listen)?;
        let metrics = Arc::new(Metrics::new()?);
        let lifecycle = Lifecycle::new();
        let limiter = Limiter::new(
            &LimitConfig::new(&config),
            metrics.admission.clone(),
            metrics.requests.clone(),
        );
        let live = LiveConfig::new(config);
        let health = HealthState::new(
            live.clone(),
            lifecycle.clone(),
            limiter.clone(),
            metrics.admin.clone(),
        );
        let reloader = Arc::new(Reloader::new(
            live.clone(),
            limiter.clone(),
            metrics.clone(),
        ));
        Ok(Server {
            live,
            reloader,
            metrics,
            lifecycle,
            limiter,
            health,
            proxy_listener,
            admin_listener,
            proxy_addr,
            admin_addr,
        })
    }

    /// The proxy listener's address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The shutdown lifecycle, to start a drain from outside (signals, tests).
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.clone()
    }

    /// The health state.
    pub fn health(&self) -> HealthState {
        self.health.clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Applies config-file changes (SIGHUP).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// The configuration in force.
    pub fn live(&self) -> LiveConfig {
        self.live.clone()
    }

    /// Starts the admin lane (its own thread and runtime) and the app health checks, and
    /// builds the proxy stack. Call [`Running::run`] on the proxy runtime next.
    pub fn start(self) -> Result<Running, StartError> {
        let config = self.live.load();
        if config.args.admin_token.is_none() && config.args.admin_allow.is_empty() {
            tracing::warn!(
                "/prestop and /drain accept any client that reaches the admin port; \
                 set --admin-token or --admin-allow to restrict them"
            );
        }
        let checker = AppChecker::new(
            config.args.upstream.clone(),
            self.live.clone(),
            self.health.clone(),
            self.metrics.admin.clone(),
        );
        let admin_state = AdminState {
            health: self.health.clone(),
            live: self.live.clone(),
            lifecycle: self.lifecycle.clone(),
            limiter: self.limiter.clone(),
            metrics: self.metrics.admin.clone(),
            coalesce: self.metrics.coalesce.clone(),
            drain: self.metrics.drain.clone(),
            registry: self.metrics.registry().clone(),
        };
        let admin = admin::spawn(self.admin_listener, admin_state, checker)
            .map_err(|e| StartError::Runtime("admin thread", e))?;
        let background = TaskTracker::new();
        let proxy = Proxy::new(
            self.live.clone(),
            self.health.progress().clone(),
            self.metrics.upstream.clone(),
            self.metrics.requests.clone(),
            background.clone(),
        );
        let stack = ProxyStack {
            record: RecordLayer::new(self.metrics.requests.clone(), self.live.clone()),
            close: CloseOnShutdownLayer::new(self.lifecycle.clone()),
            rescue: RescueLayer::new(self.live.clone()),
            screen: ScreenLayer::new(self.live.clone(), self.metrics.requests.clone()),
            route: RouteLayer::new(self.limiter.clone()),
            coalesce: CoalesceLayer::new(
                self.live.clone(),
                self.limiter.clone(),
                self.metrics.coalesce.clone(),
            ),
            limit: LimitLayer::new(self.limiter.clone()),
            proxy,
        };
        Ok(Running {
            live: self.live,
            reloader: self.reloader,
            metrics: self.metrics,
            lifecycle: self.lifecycle,
            limiter: self.limiter,
            health: self.health,
            proxy_listener: self.proxy_listener,
            stack,
            background,
            admin,
        })
    }
}

/// Binds `addr` (for `--flag`); returns the listener and the address it got.
fn bind(
    flag: &'static str,
    addr: SocketAddr,
) -> Result<(std::net::TcpListener, SocketAddr), StartError> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(|l| l.local_addr().map(|local| (l, local)))
        .map_err(|source| StartError::Bind { flag, addr, source })
}

// === impl Running ===

impl Running {
    /// Serves the proxy lane until shutdown is requested through the lifecycle, then walks
    /// the phases: delay, drain, exit. Must run on the proxy runtime.
    pub async fn run(self) -> Result<DrainOutcome, StartError> {
        let Running {
            live,
            reloader,
            metrics,
            lifecycle,
            limiter,
            health,
            proxy_listener,
            stack,
            background,
            admin,
        } = self;
        let config = live.load();
        let watcher = config
            .args
            .config
            .is_some()
            .then(|| tokio::spawn(reloader.watch(CONFIG_POLL)));
        let heartbeat = tokio::spawn(lanes::beat(
            health.heartbeat().clone(),
            Some(metrics.process.runtime_tasks.clone()),
        ));
        let lanes = lanes::spawn(
            proxy_listener,
            stack,
            lanes::Shared {
                live: live.clone(),
                lifecycle: lifecycle.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
                background: background.clone(),
            },
        )?;
        lifecycle.reached(Phase::Delay).await;
        let outcome = shutdown::walk(shutdown::Walk {
            live,
            lifecycle,
            metrics,
            limiter,
            lanes,
            background,
        })
        .await;
        let _ = tokio::task::spawn_blocking(move || admin.shutdown(ADMIN_FLUSH)).await;
        heartbeat.abort();
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        Ok(outcome)
    }
}
