//! Start-up and the shutdown sequence: binds both listeners, builds the proxy stack, starts
//! the admin lane on its own thread, serves, and walks the drain phases.

pub mod logging;
pub mod reload;
pub mod signals;
pub mod supervise;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::admin::AppChecker;
use crate::admin::health::HealthState;
use crate::admin::{self, AdminHandle};
use crate::admission::{LimitConfig, Limiter};
use crate::app::reload::Reloader;
use crate::config::{Config, LiveConfig, RuntimeMode};
use crate::drain::{DrainOutcome, Lifecycle, Phase};
use crate::inbound;
use crate::metrics::{Metrics, MetricsError};
use crate::outbound::Proxy;
use crate::stack::ProxyStack;
use crate::stack::close::CloseOnShutdownLayer;
use crate::stack::coalesce::CoalesceLayer;
use crate::stack::limit::LimitLayer;
use crate::stack::record::RecordLayer;
use crate::stack::rescue::RescueLayer;
use crate::stack::route::RouteLayer;
use crate::stack::screen::ScreenLayer;

/// How often the proxy runtime stamps its heartbeat for `/livez`.
const HEARTBEAT_PERIOD: Duration = Duration::from_millis(100);
/// How long answers on the admin lane (a waiting `/prestop`) get to flush at exit.
const ADMIN_FLUSH: Duration = Duration::from_secs(2);
/// How long refused queued requests get to be written when the drain timeout hits.
const REFUSAL_FLUSH: Duration = Duration::from_millis(250);
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
    tunnels: TaskTracker,
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
        let limiter = Limiter::new(&LimitConfig::new(&config), &metrics);
        let live = LiveConfig::new(config);
        let health = HealthState::new(
            live.clone(),
            lifecycle.clone(),
            limiter.clone(),
            metrics.clone(),
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
        let checker = AppChecker::new(config.args.upstream.clone(), self.health.clone());
        let admin = admin::spawn(self.admin_listener, self.health.clone(), checker)
            .map_err(|e| StartError::Runtime("admin thread", e))?;
        let tunnels = TaskTracker::new();
        let proxy = Proxy::new(
            self.live.clone(),
            self.health.progress().clone(),
            self.metrics.clone(),
            tunnels.clone(),
        );
        let stack = ProxyStack {
            record: RecordLayer::new(self.metrics.clone(), self.live.clone()),
            close: CloseOnShutdownLayer::new(self.lifecycle.clone()),
            rescue: RescueLayer::new(self.live.clone()),
            screen: ScreenLayer::new(self.live.clone(), self.metrics.clone()),
            route: RouteLayer::new(self.limiter.clone()),
            coalesce: CoalesceLayer::new(self.live.clone(), self.metrics.clone()),
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
            tunnels,
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

/// One extra proxy thread of `--runtime per-thread`: what its accept loop needs.
struct Lane {
    heartbeat: crate::admin::health::Stamp,
    stack: ProxyStack,
    live: LiveConfig,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    connections: TaskTracker,
    tunnels: TaskTracker,
}

impl Lane {
    /// Starts the thread with its own current-thread runtime, accepting on `listener` until
    /// the drain, then driving its connections until they are done. The returned receiver
    /// resolves when its listener is closed.
    fn spawn(
        self,
        index: usize,
        listener: std::net::TcpListener,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("tidegate-proxy-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let heartbeat = tokio::spawn(beat(self.heartbeat, None));
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            inbound::serve(
                                listener,
                                self.stack,
                                self.live,
                                self.lifecycle,
                                self.metrics,
                                self.connections.clone(),
                            )
                            .await
                        }
                        Err(error) => tracing::error!(%error, "Proxy worker cannot listen"),
                    }
                    let _ = closed_tx.send(());
                    // This runtime drives its connections and tunnels: keep it running until
                    // the drain is over (or the process exits at the drain timeout).
                    self.connections.wait().await;
                    self.tunnels.wait().await;
                    heartbeat.abort();
                });
            })?;
        Ok(closed_rx)
    }
}

/// Stamps `heartbeat` every [`HEARTBEAT_PERIOD`] for as long as its runtime is responsive, and
/// samples the runtime's live task count into `tasks`, if given.
async fn beat(heartbeat: crate::admin::health::Stamp, tasks: Option<prometheus::IntGauge>) {
    let runtime = tokio::runtime::Handle::current().metrics();
    let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        heartbeat.record();
        if let Some(tasks) = &tasks {
            tasks.set(runtime.num_alive_tasks() as i64);
        }
    }
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
            tunnels,
            admin,
        } = self;
        let config = live.load();
        let bind_error = |source| StartError::Bind {
            flag: "listen",
            addr: config.args.listen,
            source,
        };
        // Per-thread mode: the other threads get their own runtime, accept loop and upstream
        // pool, on clones of the same listening socket.
        let extra_workers = match config.args.runtime {
            RuntimeMode::PerThread => config.worker_threads().saturating_sub(1),
            RuntimeMode::Shared => 0,
        };
        let mut worker_listeners = Vec::with_capacity(extra_workers);
        for _ in 0..extra_workers {
            worker_listeners.push(proxy_listener.try_clone().map_err(bind_error)?);
        }
        let listener = tokio::net::TcpListener::from_std(proxy_listener).map_err(|source| {
            StartError::Bind {
                flag: "listen",
                addr: config.args.listen,
                source,
            }
        })?;
        let watcher = config
            .args
            .config
            .clone()
            .map(|path| tokio::spawn(reloader.watch(path, CONFIG_POLL)));
        let heartbeat = tokio::spawn(beat(
            health.heartbeat().clone(),
            Some(metrics.runtime_tasks.clone()),
        ));
        let connections = TaskTracker::new();
        let mut workers = Vec::with_capacity(extra_workers);
        for (i, worker_listener) in worker_listeners.into_iter().enumerate() {
            let mut worker_stack = stack.clone();
            worker_stack.proxy = Proxy::new(
                live.clone(),
                health.progress().clone(),
                metrics.clone(),
                tunnels.clone(),
            );
            let lane = Lane {
                heartbeat: health.add_thread_heartbeat(),
                stack: worker_stack,
                live: live.clone(),
                lifecycle: lifecycle.clone(),
                metrics: metrics.clone(),
                connections: connections.clone(),
                tunnels: tunnels.clone(),
            };
            workers.push(
                lane.spawn(i + 1, worker_listener)
                    .map_err(|e| StartError::Runtime("proxy worker thread", e))?,
            );
        }
        let accept = tokio::spawn(inbound::serve(
            listener,
            stack,
            live.clone(),
            lifecycle.clone(),
            metrics.clone(),
            connections.clone(),
        ));

        lifecycle.reached(Phase::Delay).await;
        // The timings in force when shutdown starts apply; later reloads do not change them.
        let config = live.load();
        let args = &config.args;
        metrics.shutdown_phase.set(Phase::Delay as i64);
        tracing::info!(
            delay_ms = args.shutdown_delay.as_millis() as u64,
            "Shutdown: delay (readiness failing, still serving)"
        );
        tokio::select! {
            _ = tokio::time::sleep(args.shutdown_delay) => {}
            _ = lifecycle.delay_skipped() => tracing::info!("Shutdown: delay skipped"),
        }

        lifecycle.advance(Phase::Drain);
        metrics.shutdown_phase.set(Phase::Drain as i64);
        tracing::info!(
            in_flight = metrics.in_flight.get(),
            connections = metrics.connections_open.get(),
            timeout_ms = args.drain_timeout.as_millis() as u64,
            "Shutdown: drain (listener closing, finishing in-flight requests)"
        );
        let _ = accept.await;
        for worker in workers {
            // Resolves when that worker's listener clone is closed (or the thread is gone).
            let _ = worker.await;
        }
        connections.close();
        tunnels.close();
        let all_done = async {
            connections.wait().await;
            tunnels.wait().await;
        };
        let outcome = match tokio::time::timeout(args.drain_timeout, all_done).await {
            Ok(()) => DrainOutcome::Complete,
            Err(_elapsed) => {
                let cut = DrainOutcome::TimedOut {
                    in_flight: metrics.in_flight.get().max(0) as u64,
                    connections: metrics.connections_open.get().max(0) as u64,
                };
                // Queued requests get a 503 `draining` rather than a reset.
                limiter.close();
                let _ = tokio::time::timeout(REFUSAL_FLUSH, connections.wait()).await;
                cut
            }
        };
        match outcome {
            DrainOutcome::Complete => tracing::info!("Shutdown: drained"),
            DrainOutcome::TimedOut {
                in_flight,
                connections,
            } => {
                metrics.drain_cut.set(in_flight as i64);
                tracing::warn!(
                    in_flight,
                    connections,
                    "Shutdown: drain timed out; {in_flight} requests cut off"
                );
            }
        }
        metrics.shutdown_phase.set(Phase::Exited as i64);
        lifecycle.finish(outcome);
        let _ = tokio::task::spawn_blocking(move || admin.shutdown(ADMIN_FLUSH)).await;
        heartbeat.abort();
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        Ok(outcome)
    }
}
