//! The reserved lane: an admin listener on its own OS thread and its own current-thread
//! runtime, so probes are answered even when the proxy runtime is saturated.
//!
//! | endpoint         | answer |
//! |------------------|--------|
//! | `GET /livez`     | 200 while the proxy runtime's heartbeat is fresh (also during shutdown) |
//! | `GET /readyz`    | 200 when serving and the app passed its checks; 503 + reason otherwise |
//! | `GET /app/livez` | 200 while the app makes progress (passed a check or completed a response) |
//! | `GET /metrics`   | Prometheus text format |
//! | `GET /prestop`   | starts shutdown if needed; answers 200 once the drain is over |
//! | `POST /drain`    | starts shutdown, answers 202 at once |
//!
//! The app's active health checks run on this runtime too, off the proxy's.

mod app_check;
mod connections;
pub(crate) mod health;
pub(crate) mod metrics;

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

pub(crate) use self::app_check::AppChecker;
use self::health::HealthState;
use self::metrics::{AdminMetrics, AdminPath};
use crate::admission::Limiter;
use crate::config::LiveConfig;
use crate::drain::{DrainMetrics, DrainOutcome, Lifecycle};
use crate::metrics::LabelValues;
use crate::stack::coalesce::metrics::CoalesceMetrics;

/// The running admin lane.
#[derive(Debug)]
pub(crate) struct AdminHandle {
    stop: Arc<Notify>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the admin lane's endpoints read and act on: the health state probes answer from, and
/// what `/state`, `/metrics`, `/prestop` and `/drain` need beside it.
#[derive(Clone, Debug)]
pub(crate) struct AdminState {
    /// Liveness, readiness and the app's progress.
    pub health: HealthState,
    /// The configuration in force (the admin token and allow-list are read per request).
    pub live: LiveConfig,
    /// The shutdown phases: `/prestop` and `/drain` start them.
    pub lifecycle: Lifecycle,
    /// Admission, for `/state` and the gauges refreshed before `/metrics`.
    pub limiter: Limiter,
    /// This lane's families.
    pub metrics: Arc<AdminMetrics>,
    /// Coalescing, shown in `/state`.
    pub coalesce: Arc<CoalesceMetrics>,
    /// The shutdown phase gauge, refreshed before `/metrics`.
    pub drain: Arc<DrainMetrics>,
    /// Every family, encoded by `/metrics`.
    pub registry: prometheus::Registry,
}

type AdminResponse = Response<Full<Bytes>>;

/// Starts the admin lane on its own thread and runtime, with the app checker beside it.
pub(crate) fn spawn(
    listener: std::net::TcpListener,
    admin: AdminState,
    checker: AppChecker,
) -> io::Result<AdminHandle> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(Notify::new());
    let (done_tx, done) = std::sync::mpsc::channel();
    let stop_rx = stop.clone();
    let thread = std::thread::Builder::new()
        .name("tidegate-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        tokio::spawn(checker.run());
                        serve(listener, admin, stop_rx).await;
                    }
                    Err(error) => tracing::error!(%error, "Admin listener failed"),
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok(AdminHandle {
        stop,
        done,
        thread: Some(thread),
    })
}

/// Largest request head the admin lane reads (its requests are short).
const ADMIN_MAX_HEADER_BYTES: usize = 8 * 1024;
/// How long a connection closed to make room gets to finish the answer it may be writing.
const EVICTED_FLUSH: Duration = Duration::from_secs(1);

async fn serve(listener: tokio::net::TcpListener, admin: AdminState, stop: Arc<Notify>) {
    // Shared by every connection and request: one reference count per clone.
    let admin = Arc::new(admin);
    let connections = TaskTracker::new();
    let table = Arc::new(connections::Table::default());
    let (closing_tx, closing) = watch::channel(false);
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                tracing::debug!(%error, "Admin accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Probes keep their lane: when the table is full, the oldest idle connection makes
        // room; only when every connection is answering a request is a new one closed.
        let Some(place) = table.admit() else {
            tracing::debug!(client.addr = %peer, "Admin connection limit reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let admin = admin.clone();
        let peer = peer.ip().to_canonical();
        let mut closing = closing.clone();
        connections.spawn(async move {
            let in_flight = place.in_flight.clone();
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                let done = connections::InFlight::enter(&in_flight);
                async move {
                    let response = handle(req, &admin, peer).await;
                    drop(done);
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_header_size(ADMIN_MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let evicted = tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.wait_for(|c| *c) => false,
                () = place.evict.notified() => true,
            };
            conn.as_mut().graceful_shutdown();
            if evicted {
                tracing::debug!(client.addr = %peer, "Closed an idle admin connection to make room");
                let _ = tokio::time::timeout(EVICTED_FLUSH, conn).await;
            } else {
                let _ = conn.await;
            }
        });
    }
    // Answers in progress (a /prestop waiting for the drain) are finished and flushed.
    drop(listener);
    let _ = closing_tx.send(true);
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

async fn handle(req: Request<Incoming>, admin: &AdminState, peer: IpAddr) -> AdminResponse {
    let start = Instant::now();
    let path = req.uri().path();
    let (label, response) = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/livez") => {
            (AdminPath::Livez, verdict(admin.health.livez()))
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (AdminPath::Readyz, verdict(admin.health.readyz()))
        }
        (&Method::GET | &Method::HEAD, "/app/livez") => {
            (AdminPath::AppLivez, verdict(admin.health.app_livez()))
        }
        (&Method::GET, "/metrics") => (AdminPath::Metrics, metrics(admin)),
        (&Method::GET, "/state") => (AdminPath::State, state(admin)),
        (&Method::GET, "/prestop") => match unauthorized(&req, admin, peer) {
            None => (AdminPath::Prestop, prestop(admin).await),
            Some(denied) => (AdminPath::Prestop, denied),
        },
        (&Method::POST | &Method::PUT, "/drain") => match unauthorized(&req, admin, peer) {
            None => (AdminPath::Drain, drain(admin)),
            Some(denied) => (AdminPath::Drain, denied),
        },
        (
            _,
            "/livez" | "/readyz" | "/app/livez" | "/metrics" | "/state" | "/prestop" | "/drain",
        ) => (
            AdminPath::Other,
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            ),
        ),
        _ => (
            AdminPath::Other,
            text(StatusCode::NOT_FOUND, "not found\n".into()),
        ),
    };
    admin
        .metrics
        .probes
        .with_label_values(&[label.as_label(), response.status().as_str()])
        .inc();
    admin
        .metrics
        .probe_duration
        .with_label_values(&[label.as_label()])
        .observe(start.elapsed().as_secs_f64());
    response
}

/// The endpoints that stop the pod: with `--admin-allow`, only clients in one of the CIDRs may
/// call them (403 otherwise); with `--admin-token`, they need `Authorization: Bearer TOKEN`
/// (kubelet sends it from the preStop hook's `httpHeaders`; 401 otherwise). Returns the
/// refusal, if any.
fn unauthorized(
    req: &Request<Incoming>,
    admin: &AdminState,
    peer: IpAddr,
) -> Option<AdminResponse> {
    let config = admin.live.load();
    let allow = &config.args.admin_allow;
    if !allow.is_empty() && !allow.iter().any(|net| net.contains(&peer)) {
        tracing::warn!(client.addr = %peer, "Refused a shutdown request from outside --admin-allow");
        return Some(text(
            StatusCode::FORBIDDEN,
            "client not in --admin-allow\n".into(),
        ));
    }
    let token = config.args.admin_token.as_ref()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return None;
    }
    tracing::warn!("Refused an unauthenticated shutdown request on the admin lane");
    let mut rsp = text(StatusCode::UNAUTHORIZED, "admin token required\n".into());
    rsp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(rsp)
}

/// Compares without an early exit, so the time taken does not reveal the matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn verdict(result: Result<(), String>) -> AdminResponse {
    match result {
        Ok(()) => text(StatusCode::OK, "ok\n".into()),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

fn metrics(admin: &AdminState) -> AdminResponse {
    // Refresh the gauges that are computed rather than counted.
    let _ = admin.health.readyz();
    admin
        .drain
        .shutdown_phase
        .set(admin.lifecycle.phase() as i64);
    admin.limiter.publish_gauges();
    let body = crate::metrics::encode(&admin.registry);
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    rsp
}

/// `GET /state`: what admission control is doing and every knob that shapes it, as JSON.
fn state(admin: &AdminState) -> AdminResponse {
    let view = serde_json::json!({
        "ready": admin.health.readyz().is_ok(),
        "phase": format!("{:?}", admin.lifecycle.phase()).to_lowercase(),
        "limiter": admin.limiter.state(),
        "coalesce_waiting": admin.coalesce.coalesce_waiting.get(),
        "coalesce_cache": {
            "entries": admin.coalesce.coalesce_cache_entries.get(),
            "bytes": admin.coalesce.coalesce_cache_bytes.get(),
            "max_bytes": admin.live.peek().args.coalesce_cache_size.as_u64(),
        },
    });
    let mut rsp = Response::new(Full::new(Bytes::from(format!("{view:#}\n"))));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

async fn prestop(admin: &AdminState) -> AdminResponse {
    let lifecycle = &admin.lifecycle;
    if lifecycle.start_shutdown() {
        tracing::info!("Shutdown requested by GET /prestop");
    }
    match lifecycle.outcome().await {
        DrainOutcome::Complete => text(StatusCode::OK, "drained\n".into()),
        DrainOutcome::TimedOut { in_flight, .. } => text(
            StatusCode::OK,
            format!("drain timed out with {in_flight} requests in flight\n"),
        ),
    }
}

fn drain(admin: &AdminState) -> AdminResponse {
    if admin.lifecycle.start_shutdown() {
        tracing::info!("Shutdown requested by POST /drain");
    }
    text(
        StatusCode::ACCEPTED,
        format!("shutting down ({})\n", admin.lifecycle.phase().as_str()),
    )
}

fn text(status: StatusCode, body: String) -> AdminResponse {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rsp
}

// === impl AdminHandle ===

impl AdminHandle {
    /// Stops the admin lane: answers in progress are sent, then the thread ends. Waits at
    /// most `wait`.
    pub(crate) fn shutdown(mut self, wait: Duration) {
        self.stop.notify_one();
        if self.done.recv_timeout(wait).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}
