//! One-command demo: a small app with 4 "workers" (a slow and a fast route), tidegate in
//! front of it, and optionally an overload burst with a live table of what tidegate does.
//!
//! ```text
//! cargo run --example demo              # app + tidegate; try the curl commands it prints
//! cargo run --example demo -- --burst   # plus 20 s of overload and a once-a-second table
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tidegate::{Config, Server};
use tokio::sync::Semaphore;

const WORKERS: usize = 4;
const SLOW: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let burst = std::env::args().any(|a| a == "--burst");
    let listen = std::env::var("DEMO_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let admin = std::env::var("DEMO_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:9901".into());
    let _log_writer = tidegate::init_logging(tidegate::config::LogFormat::Text, "warn")?;

    let app = start_app().await?;
    let upstream = format!("http://{app}");
    let config = Config::try_from_iter([
        "tidegate",
        "--listen",
        &listen,
        "--admin-listen",
        &admin,
        "--upstream",
        &upstream,
        "--max-concurrency",
        "4",
        "--route",
        "/slow=3",
        "--max-queue",
        "8",
        "--queue-timeout",
        "500ms",
        "--app-health-path",
        "/health",
        "--shutdown-delay",
        "2s",
        "--access-log",
        "false",
    ])
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = Server::bind(config)
        .context("bind the demo ports (set DEMO_LISTEN / DEMO_ADMIN_LISTEN)")?;
    let (proxy, admin) = (server.proxy_addr(), server.admin_addr());
    let lifecycle = server.lifecycle();
    let running = server.start()?;
    let serving = tokio::spawn(running.run());

    println!("app with {WORKERS} workers on {app}; tidegate on {proxy}, admin on {admin}\n");
    println!("  curl -i http://{proxy}/fast");
    println!(
        "  curl -i http://{proxy}/slow          # holds a worker for {}s",
        SLOW.as_secs()
    );
    println!("  curl -i http://{admin}/readyz");
    println!("  curl -s http://{admin}/metrics | grep ^tidegate_\n");

    if burst {
        run_burst(proxy, admin).await;
        lifecycle.start_shutdown();
        lifecycle.skip_delay();
    } else {
        println!("Ctrl-C to stop (tidegate drains first).");
        tokio::signal::ctrl_c().await?;
        lifecycle.start_shutdown();
    }
    let outcome = serving.await??;
    println!("tidegate stopped: {outcome:?}");
    Ok(())
}

/// A WSGI-like app: every request holds one of `WORKERS` workers for its whole duration.
async fn start_app() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let workers = Arc::new(Semaphore::new(WORKERS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let workers = workers.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let workers = workers.clone();
                    async move {
                        let _worker = workers.acquire().await.expect("never closed");
                        let body = match req.uri().path() {
                            p if p.starts_with("/slow") => {
                                tokio::time::sleep(SLOW).await;
                                "slow done\n"
                            }
                            "/health" => "healthy\n",
                            _ => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                "fast done\n"
                            }
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            body.as_bytes(),
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    shed: AtomicU64,
    other: AtomicU64,
}

/// 20 s of overload: 30 clients on /slow and 3 on /fast, retrying; prints a table each second.
async fn run_burst(proxy: SocketAddr, admin: SocketAddr) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let until = Instant::now() + Duration::from_secs(20);
    let slow = Arc::new(Counts::default());
    let fast = Arc::new(Counts::default());
    for (path, clients, counts) in [("/slow", 30, slow.clone()), ("/fast", 3, fast.clone())] {
        for _ in 0..clients {
            let (client, counts) = (client.clone(), counts.clone());
            let url: http::Uri = format!("http://{proxy}{path}").parse().expect("valid uri");
            tokio::spawn(async move {
                while Instant::now() < until {
                    let req = Request::get(url.clone())
                        .body(Empty::new())
                        .expect("valid request");
                    let status = match client.request(req).await {
                        Ok(rsp) => {
                            let status = rsp.status();
                            let _ = rsp.into_body().collect().await;
                            status.as_u16()
                        }
                        Err(_) => 0,
                    };
                    let counter = match status {
                        200 => &counts.ok,
                        503 => &counts.shed,
                        _ => &counts.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    }
    println!(
        "{:>4} {:>9} {:>7} {:>9} {:>9} {:>9} {:>12}",
        "t", "in_flight", "queued", "slow ok", "slow 503", "fast ok", "probe (ms)"
    );
    let start = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let probe_start = Instant::now();
        let metrics = scrape(admin).await;
        let probe_ms = probe_start.elapsed().as_secs_f64() * 1000.0;
        let value = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .unwrap_or("?")
                .to_owned()
        };
        println!(
            "{:>4} {:>9} {:>7} {:>9} {:>9} {:>9} {:>12.1}",
            start.elapsed().as_secs(),
            value("tidegate_in_flight"),
            value("tidegate_queued"),
            slow.ok.load(Ordering::Relaxed),
            slow.shed.load(Ordering::Relaxed),
            fast.ok.load(Ordering::Relaxed),
            probe_ms,
        );
    }
}

async fn scrape(admin: SocketAddr) -> String {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(uri) = format!("http://{admin}/metrics").parse::<http::Uri>() else {
        return String::new();
    };
    let Ok(req) = Request::get(uri).body(Empty::new()) else {
        return String::new();
    };
    match client.request(req).await {
        Ok(rsp) => match rsp.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}
