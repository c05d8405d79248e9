//! The proxy lane's accept loop and per-connection tasks, drain-aware.
//!
//! Each accepted connection gets its own task: the protocol is detected from its first bytes
//! (HTTP/1.x or h2c), then hyper serves it with a clone of the proxy stack. When shutdown
//! starts, HTTP/2 connections get GOAWAY at once; HTTP/1.x connections are told to close when
//! the drain starts (until then their responses carry `Connection: close`).

mod detect;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

pub use self::detect::Protocol;
use crate::drain::{Lifecycle, Phase};
use crate::metrics::Metrics;
use crate::stack::ProxyStack;

/// Settings of the proxy lane's server side.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Time a client has for its first bytes and for each request head.
    pub header_read_timeout: Duration,
}

/// Everything a connection task needs, shared.
#[derive(Clone, Debug)]
struct Context {
    stack: ProxyStack,
    config: ServeConfig,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
}

/// A hyper connection that can be asked to finish gracefully.
trait Drainable: Future<Output = Result<(), hyper::Error>> {
    fn drain(self: Pin<&mut Self>);
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<Metrics>);

/// Accepts connections until the drain starts, spawning each on `connections`.
///
/// Returns when the listener is closed (dropped): from then on, connects are refused.
pub async fn serve(
    listener: TcpListener,
    stack: ProxyStack,
    config: ServeConfig,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    connections: TaskTracker,
) {
    let cx = Context {
        stack,
        config,
        lifecycle: lifecycle.clone(),
        metrics,
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
                logged_accept_error = false;
                connections.spawn(connection(stream, cx.clone()));
            }
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning, log once.
                if !logged_accept_error {
                    tracing::error!(%error, "Accept failed; backing off");
                    logged_accept_error = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    tracing::info!("Proxy listener closed");
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

async fn connection(stream: TcpStream, cx: Context) {
    let Ok(client_addr) = stream.peer_addr() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    cx.metrics.connections_total.inc();
    cx.metrics.connections_open.inc();
    let _open = OpenConnection(cx.metrics.clone());

    let detected = tokio::time::timeout(cx.config.header_read_timeout, detect::detect(stream));
    let (protocol, io) = match detected.await {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::debug!(%error, client.addr = %client_addr, "Connection failed before a request");
            return;
        }
        Err(_elapsed) => {
            tracing::debug!(client.addr = %client_addr, "No request bytes before the header read timeout");
            return;
        }
    };
    let service = TowerToHyperService::new(cx.stack.service(client_addr));
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(cx.config.header_read_timeout)
                .keep_alive(true)
                .serve_connection(io, service)
                .with_upgrades();
            drive(conn, Phase::Drain, &cx.lifecycle).await
        }
        Protocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            // GOAWAY as soon as shutdown starts, so h2 clients open new streams elsewhere.
            drive(conn, Phase::Delay, &cx.lifecycle).await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, client.addr = %client_addr, ?protocol, "Connection ended with an error");
    }
}

/// Runs `conn`, asking it to finish gracefully once the lifecycle reaches `drain_at`.
async fn drive<C: Drainable>(
    conn: C,
    drain_at: Phase,
    lifecycle: &Lifecycle,
) -> Result<(), hyper::Error> {
    tokio::pin!(conn);
    let reached = lifecycle.reached(drain_at);
    tokio::select! {
        result = conn.as_mut() => return result,
        _ = reached => {}
    }
    conn.as_mut().drain();
    conn.await
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

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}
