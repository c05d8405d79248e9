//! Pieces the benchmarks share (each bench includes this file with `#[path]`): a loopback app
//! server, a free loopback address, and the tidegate binary started in front of an app.

// Each bench uses only some of these.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Serves `handler` on a fresh loopback port (HTTP/1.1 and h2c, one task per connection) and
/// returns the address.
pub async fn serve<F, Fut, B>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A loopback address with a port free right now.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// The tidegate binary, started by a bench.
pub struct Tidegate {
    /// The process.
    pub child: Child,
    /// Its proxy listener.
    pub addr: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
}

/// Starts the release binary on free loopback ports in front of `app`, with `args` added;
/// its stderr goes to the bench's.
pub fn start_tidegate(app: SocketAddr, args: &[&str]) -> Tidegate {
    let addr = free_addr();
    let admin = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{app}")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tidegate");
    Tidegate { child, addr, admin }
}
