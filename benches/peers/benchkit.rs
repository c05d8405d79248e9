//! Helpers for the peer benchmark (`benches/peers/run.py`), one binary with three roles:
//!
//! - `benchkit upstream ADDR`: the app every target proxies to. `/` answers `ok`, `/hold`
//!   never answers (it fills a proxy's slots for the shed measurement), `/big?mb=N` streams
//!   N MiB. HTTP/1.1 and h2c, one thread.
//! - `benchkit load URL CONNECTIONS SECONDS RATE`: an open-loop load at RATE requests per
//!   second in all over CONNECTIONS keep-alive connections; latency is measured from each
//!   request's scheduled time, so a stall is not hidden by the requests it delays. Prints one
//!   JSON line.
//! - `benchkit idle URL CONNECTIONS`: opens CONNECTIONS keep-alive connections, sends one
//!   request on each, prints `ready`, and holds them until stdin closes.
//! - `benchkit floor LISTEN UPSTREAM`: the least a proxy built on hyper does, as a reference
//!   target: one thread, HTTP/1.1 only, one app connection per client connection, requests
//!   forwarded as they are (no pool, no limits, no header rewriting, no metrics). What
//!   tidegate costs above it is tidegate's; what it costs itself is hyper's and tokio's.
//!
//! Loopback only; every loop is bounded by its count or its duration.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(0) {
        "upstream" => runtime.block_on(upstream(arg(1).parse().expect("ADDR"))),
        "load" => runtime.block_on(load(
            arg(1).parse().expect("URL"),
            arg(2).parse().expect("CONNECTIONS"),
            Duration::from_secs_f64(arg(3).parse().expect("SECONDS")),
            arg(4).parse().expect("RATE"),
        )),
        "idle" => runtime.block_on(idle(
            arg(1).parse().expect("URL"),
            arg(2).parse().expect("CONNECTIONS"),
        )),
        "floor" => runtime.block_on(floor(
            arg(1).parse().expect("LISTEN"),
            arg(2).parse().expect("UPSTREAM"),
        )),
        _ => {
            eprintln!(
                "usage: benchkit upstream ADDR | load URL CONNS SECONDS RATE | idle URL CONNS \
                 | floor LISTEN UPSTREAM"
            );
            std::process::exit(2);
        }
    }
}

// ===== upstream =====

/// Listens on `addr` and serves each accepted connection (`TCP_NODELAY` set) in a task of its
/// own with `serve`.
async fn accept_each<F, Fut>(addr: SocketAddr, serve: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    println!("listening {}", listener.local_addr().expect("addr"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream));
    }
}

async fn upstream(addr: SocketAddr) {
    accept_each(addr, |stream| async move {
        let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
            Ok::<_, Infallible>(answer(req).await)
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await;
}

async fn answer(req: Request<Incoming>) -> Response<BoxBody> {
    match req.uri().path() {
        "/hold" => match std::future::pending::<Infallible>().await {},
        "/big" => {
            let mb: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("mb="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            let chunk = Bytes::from(vec![b'b'; 64 * 1024]);
            let chunks = (0..mb * 16).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone())));
            let mut rsp =
                Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed());
            rsp.headers_mut()
                .insert("content-length", (mb * 1024 * 1024).into());
            rsp
        }
        _ => Response::new(Full::new(Bytes::from_static(b"ok")).boxed()),
    }
}

// ===== the hyper floor =====

async fn floor(listen: SocketAddr, upstream: SocketAddr) {
    accept_each(listen, move |stream| async move {
        let Ok(app) = tokio::net::TcpStream::connect(upstream).await else {
            return;
        };
        let _ = app.set_nodelay(true);
        let Ok((sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(app)).await
        else {
            return;
        };
        tokio::spawn(conn);
        let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let sender = sender.clone();
            async move {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(req).await
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await;
}

// ===== open-loop load =====

async fn connect(uri: &Uri) -> Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let authority = uri.authority()?.as_str().to_owned();
    let stream = tokio::net::TcpStream::connect(authority).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// Waits until `due`, to within microseconds. tokio's timers have millisecond resolution and
/// fire up to a millisecond late, which would add that much to every measured latency: sleep
/// to a millisecond before, then yield until `due` (other connections and the IO driver run
/// in between).
async fn wait_until(due: Instant) {
    if let Some(early) = due.checked_sub(Duration::from_millis(1)) {
        tokio::time::sleep_until(early.into()).await;
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

async fn load(uri: Uri, connections: usize, duration: Duration, rate: f64) {
    let per_connection = Duration::from_secs_f64(connections as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            let mut errors = 0u64;
            let Some(mut sender) = connect(&uri).await else {
                return (latencies, statuses, 1);
            };
            // Spread the connections' schedules evenly over one interval.
            let offset = per_connection.mul_f64(c as f64 / connections as f64);
            let mut due = start + offset;
            while due < start + duration {
                wait_until(due).await;
                let req = Request::get(uri.clone())
                    .header("host", uri.authority().map_or("x", |a| a.as_str()))
                    .body(Empty::new())
                    .expect("request");
                let ok = match sender.ready().await {
                    Ok(()) => match sender.send_request(req).await {
                        Ok(rsp) => {
                            *statuses.entry(rsp.status().as_u16()).or_default() += 1;
                            rsp.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if ok {
                    latencies.push(due.elapsed());
                } else {
                    errors += 1;
                    match connect(&uri).await {
                        Some(fresh) => sender = fresh,
                        None => break,
                    }
                }
                due += per_connection;
            }
            (latencies, statuses, errors)
        }));
    }
    let mut all = Vec::new();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, s, e) = task.await.expect("load task");
        all.extend(latencies);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
        errors += e;
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0, |d| d.as_micros())
    };
    let statuses: Vec<String> = statuses
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    println!(
        "{{\"requests\":{},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"status\":{{{}}}}}",
        all.len(),
        all.len() as f64 / duration.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        errors,
        statuses.join(",")
    );
}

// ===== idle connections =====

async fn idle(uri: Uri, connections: usize) {
    let mut held = Vec::with_capacity(connections);
    let mut failed = 0;
    for _ in 0..connections {
        let Some(mut sender) = connect(&uri).await else {
            failed += 1;
            continue;
        };
        let req = Request::get(uri.clone())
            .header("host", "bench")
            .body(Empty::new())
            .expect("request");
        let read = match sender.send_request(req).await {
            Ok(rsp) => rsp.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if read {
            held.push(sender);
        } else {
            failed += 1;
        }
    }
    println!("ready {} held {failed} failed", held.len());
    // Hold them until the script closes stdin.
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    drop(held);
}
