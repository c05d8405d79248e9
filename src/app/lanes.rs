//! The proxy lane's threads: the accept loop on the proxy runtime and, with `--runtime
//! per-thread`, one more thread per core with its own runtime, accept loop and upstream pool,
//! each on a clone of the listening socket.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use super::StartError;
use crate::admin::health::{HealthState, Stamp};
use crate::app::Metrics;
use crate::config::{LiveConfig, RuntimeMode};
use crate::drain::Lifecycle;
use crate::inbound::{self, ConnectionBudget};
use crate::outbound::Proxy;
use crate::stack::ProxyStack;

/// How often a proxy runtime stamps its heartbeat for `/livez`.
const HEARTBEAT_PERIOD: Duration = Duration::from_millis(100);

/// What every lane shares.
pub(super) struct Shared {
    pub(super) live: LiveConfig,
    pub(super) lifecycle: Lifecycle,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: HealthState,
    pub(super) background: TaskTracker,
}

/// The running lanes.
pub(super) struct Lanes {
    /// The accept loop on the proxy runtime; resolves when its listener is closed.
    accept: JoinHandle<()>,
    /// Per-thread lanes; each resolves when its listener clone is closed.
    workers: Vec<oneshot::Receiver<()>>,
    /// Every client connection of every lane.
    pub(super) connections: TaskTracker,
}

/// Spawns the accept loop on this runtime and, in per-thread mode, a thread per extra core.
pub(super) fn spawn(
    listener: std::net::TcpListener,
    stack: ProxyStack,
    shared: Shared,
) -> Result<Lanes, StartError> {
    let config = shared.live.load();
    let bind_error = |source| StartError::Bind {
        flag: "listen",
        addr: config.args.listen,
        source,
    };
    let extra_workers = match config.args.runtime {
        RuntimeMode::PerThread => config.worker_threads().saturating_sub(1),
        RuntimeMode::Shared => 0,
    };
    let mut worker_listeners = Vec::with_capacity(extra_workers);
    for _ in 0..extra_workers {
        worker_listeners.push(listener.try_clone().map_err(bind_error)?);
    }
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_error)?;
    let connections = TaskTracker::new();
    let lane = inbound::Lane {
        stack,
        live: shared.live.clone(),
        lifecycle: shared.lifecycle.clone(),
        metrics: shared.metrics.connections.clone(),
        // One budget for every lane: the limits are the process's, whatever the threads.
        budget: ConnectionBudget::default(),
        connections: connections.clone(),
    };
    let mut workers = Vec::with_capacity(extra_workers);
    for (i, worker_listener) in worker_listeners.into_iter().enumerate() {
        let mut worker_lane = lane.clone();
        // Its own upstream pool.
        worker_lane.stack.proxy = Proxy::new(
            shared.live.clone(),
            shared.health.progress().clone(),
            shared.metrics.upstream.clone(),
            shared.metrics.requests.clone(),
            shared.background.clone(),
        );
        let worker = Worker {
            heartbeat: shared.health.add_thread_heartbeat(),
            lane: worker_lane,
            background: shared.background.clone(),
        };
        workers.push(
            worker
                .spawn(i + 1, worker_listener)
                .map_err(|e| StartError::Runtime("proxy worker thread", e))?,
        );
    }
    let accept = tokio::spawn(inbound::serve(listener, lane));
    Ok(Lanes {
        accept,
        workers,
        connections,
    })
}

// === impl Lanes ===

impl Lanes {
    /// Resolves once every lane's listener is closed (the drain closes them).
    pub(super) async fn listeners_closed(&mut self) {
        let _ = (&mut self.accept).await;
        for worker in &mut self.workers {
            // Resolves when that worker's listener clone is closed (or the thread is gone).
            let _ = worker.await;
        }
    }
}

/// One extra proxy thread of `--runtime per-thread`: its accept loop's lane, its heartbeat,
/// and the background tasks (tunnels, abandoned exchanges) its runtime drives.
struct Worker {
    heartbeat: Stamp,
    lane: inbound::Lane,
    background: TaskTracker,
}

impl Worker {
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
                    let connections = self.lane.connections.clone();
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => inbound::serve(listener, self.lane).await,
                        Err(error) => tracing::error!(%error, "Proxy worker cannot listen"),
                    }
                    let _ = closed_tx.send(());
                    // This runtime drives its connections and background tasks: keep it running until
                    // the drain is over (or the process exits at the drain timeout).
                    connections.wait().await;
                    self.background.wait().await;
                    heartbeat.abort();
                });
            })?;
        Ok(closed_rx)
    }
}

/// Stamps `heartbeat` every [`HEARTBEAT_PERIOD`] for as long as its runtime is responsive, and
/// samples the runtime's live task count into `tasks`, if given.
pub(super) async fn beat(heartbeat: Stamp, tasks: Option<prometheus::IntGauge>) {
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
