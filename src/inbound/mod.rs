//! The proxy lane's accept loop and per-connection tasks, drain-aware.
//!
//! Each accepted connection gets its own task: the protocol is detected from its first bytes
//! (HTTP/1.x or h2c), then hyper serves it with the connection's own proxy stack. When shutdown
//! starts, HTTP/2 connections get GOAWAY at once; HTTP/1.x connections are told to close when
//! the drain starts (until then their responses carry `Connection: close`).
//!
//! Connection-level limits are read from the live configuration for each new connection:
//! `--max-connections` (beyond it a connection is answered with a 503 and closed),
//! `--idle-timeout`, `--header-read-timeout`, `--max-header-bytes`, `--max-headers` and
//! `--h2-max-concurrent-streams`.

mod activity;
mod conn_io;
mod detect;
mod fds;
mod hyper_service;
pub(crate) mod metrics;
mod refuse;
mod sideline;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use self::activity::{Activity, Expiry, Track};
use self::conn_io::ConnIo;
pub(crate) use self::detect::Protocol;
use self::detect::Rewind;
pub use self::fds::raise_limit as raise_fd_limit;
use self::hyper_service::HyperService;
use self::metrics::{ConnectionMetrics, TimeoutReason};
use self::sideline::Sideline;
use crate::config::{ClientAbort, Config, LiveConfig};
use crate::drain::{Lifecycle, Phase};
use crate::metrics::LabelValues;
use crate::outbound::half_close::HalfClose;
use crate::stack::ProxyStack;

/// hyper's default for `max_headers`; setting any value moves the header array to the heap.
const HYPER_DEFAULT_MAX_HEADERS: u32 = 100;
/// HTTP/2 streams a client may reset before the server has accepted them, per connection,
/// before the connection is closed with `ENHANCE_YOUR_CALM` (the CVE-2023-44487 "rapid
/// reset" guard).
pub(crate) const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// HTTP/2 streams the server may reset because of the client's protocol errors, per
/// connection, before it closes the connection.
pub(crate) const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What limits the proxy lane's connections, shared by every lane (with `--runtime
/// per-thread`, by every thread): the open connections counted against `--max-connections`
/// and the descriptor budget, and the refusals in progress. Create one per process.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnectionBudget {
    open: Arc<AtomicUsize>,
    refusals: refuse::Refusals,
}

/// What one accept loop serves with; each `--runtime per-thread` thread has its own stack
/// (its own upstream pool) and shares the rest.
#[derive(Clone, Debug)]
pub(crate) struct Lane {
    /// The service each connection is served by.
    pub(crate) stack: ProxyStack,
    /// The configuration in force.
    pub(crate) live: LiveConfig,
    /// The shutdown phases: the loop stops accepting at the drain.
    pub(crate) lifecycle: Lifecycle,
    /// Connection metrics.
    pub(crate) metrics: Arc<ConnectionMetrics>,
    /// The process-wide connection limits.
    pub(crate) budget: ConnectionBudget,
    /// Every client connection of every lane, for the drain to wait on.
    pub(crate) connections: TaskTracker,
}

/// Everything a connection task needs, shared.
#[derive(Clone, Debug)]
struct Context {
    stack: ProxyStack,
    live: LiveConfig,
    lifecycle: Lifecycle,
    metrics: Arc<ConnectionMetrics>,
    open: Arc<AtomicUsize>,
}

/// A hyper connection that can be asked to finish gracefully.
trait Drainable: Future<Output = Result<(), hyper::Error>> {
    fn drain(self: Pin<&mut Self>);
}

/// Counts an open connection for as long as it lives.
struct OpenConnection {
    metrics: Arc<ConnectionMetrics>,
    open: Arc<AtomicUsize>,
}

/// Per-connection settings, read from the live configuration when the connection starts.
#[derive(Copy, Clone, Debug)]
struct ConnSettings {
    idle_timeout: Duration,
    park_idle_after: Duration,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_headers: u32,
    h2_max_concurrent_streams: u32,
    /// Whether an HTTP/1.1 client that half-closes after its request is answered
    /// (`--on-client-abort finish`).
    answer_half_close: bool,
}

/// Accepts connections until the drain starts, spawning each on `connections`.
///
/// Returns when the listener is closed (dropped): from then on, connects are refused.
pub(crate) async fn serve(listener: TcpListener, lane: Lane) {
    let Lane {
        stack,
        live,
        lifecycle,
        metrics,
        budget,
        connections,
    } = lane;
    let cx = Context {
        stack,
        live,
        lifecycle: lifecycle.clone(),
        metrics,
        open: budget.open,
    };
    let refusals = budget.refusals;
    let mut limit = ConnectionLimit {
        nofile: fds::soft_limit(),
        warned: false,
    };
    let drain = lifecycle.reached(Phase::Drain);
    tokio::pin!(drain);
    let mut logged_accept_error = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut drain => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _addr)) => {
                if logged_accept_error {
                    tracing::info!("Accepting connections again");
                    logged_accept_error = false;
                }
                let config = cx.live.peek();
                let max = limit.current(&config);
                cx.metrics.connections_limit.set(max as i64);
                match OpenConnection::reserve(&cx, max) {
                    Some(open) => {
                        let settings = ConnSettings::from_config(&config);
                        connections.spawn(serve_connection(stream, cx.clone(), open, settings));
                    }
                    None => {
                        cx.metrics.connections_rejected.inc();
                        refusals.refuse(stream, config.args.retry_after);
                    }
                }
            }
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning, log once.
                if !logged_accept_error {
                    tracing::error!(%error, "Accept failed; backing off until it succeeds");
                    logged_accept_error = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    drop(listener);
    tracing::info!("Proxy listener closed");
}

/// Pause after an accept error that is not about one connection (EMFILE, ENFILE, ENOMEM).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

async fn serve_connection(
    stream: TcpStream,
    cx: Context,
    _open: OpenConnection,
    settings: ConnSettings,
) {
    let accepted = Instant::now();
    let Ok(client_addr) = stream.peer_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    cx.metrics.connections_total.inc();

    let detected = tokio::time::timeout(settings.header_read_timeout, detect::detect(stream));
    let drain = cx.lifecycle.reached(Phase::Drain);
    let detected = tokio::select! {
        biased;
        detected = detected => detected,
        // Nothing sent yet, so nothing in flight: close at the drain's start rather than
        // hold the drain until the header read timeout.
        () = drain => {
            tracing::debug!(client.addr = %client_addr, "Closed at the drain: no request bytes yet");
            return;
        }
    };
    let (protocol, io) = match detected {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::debug!(%error, client.addr = %client_addr, "Connection failed before a request");
            return;
        }
        Err(_elapsed) => {
            cx.metrics
                .connections_timed_out
                .with_label_values(&[TimeoutReason::Header.as_label()])
                .inc();
            tracing::debug!(client.addr = %client_addr, "No request bytes before the header read timeout");
            return;
        }
    };
    let half_close =
        (protocol == Protocol::Http1 && settings.answer_half_close).then(HalfClose::default);
    let activity = Activity::new(accepted, half_close.clone());
    let service = HyperService::new(Track::new(
        cx.stack.service(client_addr, half_close),
        activity.clone(),
    ));
    let io = TokioIo::new(ConnIo::new(io, activity.clone()));
    let watch = Watch {
        activity: &activity,
        idle_timeout: settings.idle_timeout,
        header_timeout: None,
        park_after: None,
        metrics: &cx.metrics,
    };
    let result = match protocol {
        Protocol::Http1 => {
            let watch = Watch {
                header_timeout: Some(settings.header_read_timeout),
                park_after: Some(settings.park_idle_after),
                ..watch
            };
            // Boxed (here and below), so that the task of a parked connection holds only
            // what it needs while it waits.
            Box::pin(serve_http1(io, service, &settings, &cx, watch)).await
        }
        Protocol::Http2 => Box::pin(serve_http2(io, service, &settings, &cx, watch)).await,
    };
    if let Err(error) = result {
        tracing::debug!(%error, client.addr = %client_addr, ?protocol, "Connection ended with an error");
    }
}

/// The client IO under hyper.
type ClientIo = TokioIo<ConnIo<Rewind<TcpStream>>>;

/// Serves an HTTP/1.x connection, parking it whenever it has been idle for
/// `--park-idle-after`: hyper's connection (and its read and write buffers, about 24 KiB) is
/// dropped, the socket waits for its next byte with nothing allocated but the task, and a new
/// hyper connection takes over when it comes.
async fn serve_http1<S>(
    mut io: ClientIo,
    mut service: S,
    settings: &ConnSettings,
    cx: &Context,
    watch: Watch<'_>,
) -> Result<(), hyper::Error>
where
    S: hyper::service::HttpService<hyper::body::Incoming> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Head and idle timeouts are ours (see `activity`): hyper's timer would cut
        // idle keep-alive connections after the head timeout.
        .header_read_timeout(None)
        .keep_alive(true)
        .max_header_size(settings.max_header_bytes);
    if settings.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.max_headers(settings.max_headers as usize);
    }
    loop {
        // Boxed, so that a parked connection's task does not keep hyper's state's room.
        let mut conn = Box::new(builder.serve_connection(io, service).with_upgrades());
        match Box::pin(drive(
            Pin::new(&mut *conn),
            Phase::Drain,
            &cx.lifecycle,
            watch,
        ))
        .await
        {
            Ok(Ended::Parked) => {}
            Ok(Ended::Closed) => return Ok(()),
            Err(error) => return Err(error),
        }
        // Taken out of its box, which is freed here rather than at the end of the loop.
        let parts = {
            let conn = conn;
            (*conn).into_parts()
        };
        // `None` if the connection was upgraded after all: the tunnel owns the socket.
        let Some(parts) = parts else {
            return Ok(());
        };
        let read_buf;
        (io, service, read_buf) = (parts.io, parts.service, parts.read_buf);
        if !read_buf.is_empty() {
            // hyper had read part of the next head: hand it to the next connection.
            io.inner_mut().get_mut().replay(read_buf);
            continue;
        }
        // Empty, but it may still hold hyper's read buffer.
        drop(read_buf);
        if !Box::pin(park(&io, &cx.lifecycle, watch)).await {
            let _ = tokio::io::AsyncWriteExt::shutdown(io.inner_mut()).await;
            return Ok(());
        }
    }
}

/// Serves an HTTP/2 (h2c) connection.
async fn serve_http2<S>(
    io: ClientIo,
    service: S,
    settings: &ConnSettings,
    cx: &Context,
    watch: Watch<'_>,
) -> Result<(), hyper::Error>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.h2_max_concurrent_streams)
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .serve_connection(io, service);
    tokio::pin!(conn);
    // GOAWAY as soon as shutdown starts, so h2 clients open new streams elsewhere.
    drive(conn, Phase::Delay, &cx.lifecycle, watch)
        .await
        .map(drop)
}

/// Waits, holding no buffer, until a parked connection's client sends its next byte (`true`),
/// or the connection must close (`false`): idle for `--idle-timeout`, or the drain started.
async fn park(io: &ClientIo, lifecycle: &Lifecycle, watch: Watch<'_>) -> bool {
    let _parked = Parked::count(watch.metrics);
    let idle_deadline = watch
        .activity
        .deadline(watch.idle_timeout, None, None)
        .map(|(at, _)| at);
    let idle = async {
        match idle_deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let mut first = [0u8; 1];
    tokio::select! {
        biased;
        _ = lifecycle.reached(Phase::Drain) => false,
        // Peeked, not read: the bytes stay in the socket for hyper. 0 is the client's EOF.
        peeked = io.inner().get_ref().get_ref().peek(&mut first) => match peeked {
            Ok(n) if n > 0 => {
                // A head has started arriving: its timeout applies from now, and the new
                // connection must not be parked again before reading it.
                watch.activity.on_read();
                true
            }
            _ => false,
        },
        _ = idle => {
            watch.metrics.connections_timed_out.with_label_values(&[TimeoutReason::Idle.as_label()]).inc();
            false
        }
    }
}

/// Counts a parked connection for as long as it is parked.
struct Parked<'a>(&'a ConnectionMetrics);

impl Parked<'_> {
    fn count(metrics: &ConnectionMetrics) -> Parked<'_> {
        metrics.connections_parked.inc();
        Parked(metrics)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.connections_parked.dec();
    }
}

/// `--max-connections`, capped by what the descriptor limit allows.
struct ConnectionLimit {
    nofile: Option<u64>,
    warned: bool,
}

impl ConnectionLimit {
    /// The limit in force under `config`; warns once if the descriptor limit lowers it.
    fn current(&mut self, config: &Config) -> usize {
        let configured = config.args.max_connections as usize;
        let max = self.nofile.map_or(configured, |n| {
            configured.min(fds::connection_ceiling(n, config.args.concurrency_bound()))
        });
        if max < configured && !self.warned {
            tracing::warn!(
                max_connections = configured,
                allowed = max,
                "The file descriptor limit allows fewer connections than --max-connections; \
                 raise the container's nofile limit"
            );
            self.warned = true;
        }
        max
    }
}

impl ConnSettings {
    fn from_config(config: &Config) -> ConnSettings {
        let a = &config.args;
        ConnSettings {
            idle_timeout: a.idle_timeout,
            park_idle_after: a.park_idle_after,
            header_read_timeout: a.header_read_timeout,
            max_header_bytes: a.max_header_bytes.as_u64() as usize,
            max_headers: a.max_headers,
            h2_max_concurrent_streams: a.h2_max_concurrent_streams,
            answer_half_close: a.on_client_abort == ClientAbort::Finish,
        }
    }
}

/// A connection's timeouts, as the driver applies them.
#[derive(Copy, Clone)]
struct Watch<'a> {
    activity: &'a Activity,
    idle_timeout: Duration,
    header_timeout: Option<Duration>,
    /// `--park-idle-after`, where the connection can be parked (HTTP/1).
    park_after: Option<Duration>,
    metrics: &'a ConnectionMetrics,
}

/// How [`drive`] finished with a connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Ended {
    /// hyper's connection is done and so is the socket.
    Closed,
    /// hyper's connection ended for parking: the socket is open, idle, between requests.
    Parked,
}

/// What woke [`drive`]'s loop.
enum Event {
    /// hyper's connection finished.
    Ended(Result<(), hyper::Error>),
    /// The drain started.
    Drain,
    /// The connection's deadline may have moved.
    Changed,
    /// The deadline passed.
    Expired(Expiry),
}

/// Runs `conn`, asking it to finish gracefully once the lifecycle reaches `drain_at` or the
/// connection has been idle too long; a request head that is too slow closes it at once. An
/// idle connection past `park_after` is ended without closing its socket ([`Ended::Parked`]).
async fn drive<C: Drainable>(
    mut conn: Pin<&mut C>,
    drain_at: Phase,
    lifecycle: &Lifecycle,
    watch: Watch<'_>,
) -> Result<Ended, hyper::Error> {
    let reached = lifecycle.reached(drain_at);
    tokio::pin!(reached);
    // The drain, deadline changes and the deadline's timer are polled only when one of them
    // was woken (or, for the last two, just created), not on each of hyper's wake-ups (see
    // `sideline`).
    let side = Sideline::new();
    let mut parking = false;
    loop {
        let park_after = if parking { None } else { watch.park_after };
        let deadline =
            watch
                .activity
                .deadline(watch.idle_timeout, watch.header_timeout, park_after);
        let expiry = async {
            match deadline {
                Some((at, expiry)) => {
                    tokio::time::sleep_until(at).await;
                    expiry
                }
                None => std::future::pending().await,
            }
        };
        let changed = watch.activity.changed();
        tokio::pin!(expiry, changed);
        let mut fresh = true;
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result));
            }
            let due = side.due(cx);
            let first = std::mem::take(&mut fresh);
            if !due && !first {
                return Poll::Pending;
            }
            let mut side_cx = side.context();
            if due && reached.as_mut().poll(&mut side_cx).is_ready() {
                return Poll::Ready(Event::Drain);
            }
            if changed.as_mut().poll(&mut side_cx).is_ready() {
                return Poll::Ready(Event::Changed);
            }
            expiry.as_mut().poll(&mut side_cx).map(Event::Expired)
        })
        .await;
        match event {
            Event::Ended(result) => {
                watch.activity.set_parking(false);
                return result.map(|()| {
                    if parking {
                        Ended::Parked
                    } else {
                        Ended::Closed
                    }
                });
            }
            Event::Drain => break,
            Event::Changed => continue,
            Event::Expired(expiry) => {
                // The state may have changed since the deadline was computed.
                if watch
                    .activity
                    .deadline(watch.idle_timeout, watch.header_timeout, park_after)
                    .is_none_or(|(at, _)| at > Instant::now())
                {
                    continue;
                }
                let reason = match expiry {
                    Expiry::Idle => TimeoutReason::Idle,
                    Expiry::Header => TimeoutReason::Header,
                    Expiry::Park => {
                        // hyper closes an idle connection at once; the IO's shutdown is
                        // skipped while parking, so the socket stays open.
                        watch.metrics.connection_parks.inc();
                        watch.activity.set_parking(true);
                        parking = true;
                        conn.as_mut().drain();
                        continue;
                    }
                };
                watch
                    .metrics
                    .connections_timed_out
                    .with_label_values(&[reason.as_label()])
                    .inc();
                if expiry == Expiry::Header {
                    // hyper has no request to answer yet: close the socket.
                    return Ok(Ended::Closed);
                }
                break;
            }
        }
    }
    // Closing for good: the IO's shutdown must close the socket.
    watch.activity.set_parking(false);
    conn.as_mut().drain();
    conn.await.map(|()| Ended::Closed)
}

impl<I, S, B> Drainable for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Drainable for http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

// === impl OpenConnection ===

impl OpenConnection {
    /// Takes one of `max` connection places, or `None` if all are taken.
    fn reserve(cx: &Context, max: usize) -> Option<OpenConnection> {
        cx.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        cx.metrics.connections_open.inc();
        Some(OpenConnection {
            metrics: cx.metrics.clone(),
            open: cx.open.clone(),
        })
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections_open.dec();
    }
}
