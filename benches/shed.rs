//! Refusal path versus pass-through, measured in one run (not a test).
//!
//! `cargo bench --bench shed` prints, for small GETs over keep-alive connections:
//! - direct: client → app
//! - proxied: client → tidegate → app
//! - refused: client → tidegate with the app saturated (every slot held, queue full) → 503
//!
//! Each target is run `ROUNDS` times, interleaved (A B C A B C ...), so machine drift cancels
//! out; the median round is reported. The app, tidegate and the load generator each get a
//! one-thread runtime of their own. Figures are for this machine only; the ratios are the
//! point.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

#[path = "common/mod.rs"]
mod common;

const CONNECTIONS: usize = 32;
const REQUESTS_PER_ROUND: usize = 40_000;
const ROUNDS: usize = 5;

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An app answering "ok" at once, except `/hold`, which waits until the bench ends.
async fn app(hold: Arc<Semaphore>) -> SocketAddr {
    common::serve(move |req: Request<Incoming>| {
        let hold = hold.clone();
        async move {
            if req.uri().path() == "/hold" {
                let _ = hold.acquire().await;
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await
}

struct Round {
    rps: f64,
    p50: Duration,
    p99: Duration,
    status: StatusCode,
}

/// `REQUESTS_PER_ROUND` GETs over `CONNECTIONS` keep-alive connections.
async fn round(url: &str) -> Round {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONNECTIONS)
        .build_http();
    let uri: http::Uri = url.parse().expect("uri");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, uri) = (client.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(REQUESTS_PER_ROUND / CONNECTIONS);
            let mut status = StatusCode::OK;
            for _ in 0..REQUESTS_PER_ROUND / CONNECTIONS {
                let t = Instant::now();
                let rsp = client
                    .request(Request::get(uri.clone()).body(Empty::new()).expect("req"))
                    .await
                    .expect("response");
                status = rsp.status();
                let _ = rsp.into_body().collect().await;
                lat.push(t.elapsed());
            }
            (lat, status)
        }));
    }
    let mut all = Vec::with_capacity(REQUESTS_PER_ROUND);
    let mut status = StatusCode::OK;
    for t in tasks {
        let (lat, s) = t.await.expect("task");
        all.extend(lat);
        status = s;
    }
    let elapsed = start.elapsed();
    all.sort();
    Round {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
        status,
    }
}

fn main() {
    let app_rt = runtime("bench-app");
    let proxy_rt = runtime("bench-tidegate");
    let load_rt = runtime("bench-load");
    let hold = Arc::new(Semaphore::new(0));
    let app_addr = app_rt.block_on(app(hold.clone()));

    let start = |extra: &[&str]| -> SocketAddr {
        let upstream = format!("http://{app_addr}");
        let mut args = vec![
            "tidegate",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--access-log",
            "false",
        ];
        args.extend_from_slice(extra);
        let config = tidegate::Config::try_from_iter(args).expect("flags");
        let server = tidegate::Server::bind(config).expect("bind");
        let addr = server.proxy_addr();
        let _enter = proxy_rt.enter();
        let running = server.start().expect("start");
        proxy_rt.spawn(running.run());
        addr
    };
    let pass = start(&["--max-concurrency", "1000"]);
    let saturated = start(&["--max-concurrency", "1", "--max-queue", "0"]);
    // Saturate: one request holds the only slot until the bench ends.
    let held = load_rt.spawn({
        let url = format!("http://{saturated}/hold");
        async move {
            let client: Client<_, Empty<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let _ = client.get(url.parse().expect("uri")).await;
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    let targets = [
        ("direct (client → app)", format!("http://{app_addr}/")),
        (
            "proxied (client → tidegate → app)",
            format!("http://{pass}/"),
        ),
        (
            "refused (app saturated → 503)",
            format!("http://{saturated}/"),
        ),
    ];
    let mut results: Vec<Vec<Round>> = targets.iter().map(|_| Vec::new()).collect();
    // Warm-up, then interleaved rounds.
    for (_, url) in &targets {
        load_rt.block_on(round(url));
    }
    for _ in 0..ROUNDS {
        for (i, (_, url)) in targets.iter().enumerate() {
            results[i].push(load_rt.block_on(round(url)));
        }
    }
    println!(
        "{} requests x {} rounds, {} keep-alive connections, 1 thread each for app, tidegate, load",
        REQUESTS_PER_ROUND, ROUNDS, CONNECTIONS
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>8}",
        "target (median round)", "req/s", "p50 µs", "p99 µs", "status"
    );
    let mut medians = Vec::new();
    for (i, (name, _)) in targets.iter().enumerate() {
        let rounds = &mut results[i];
        rounds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let m = &rounds[rounds.len() / 2];
        println!(
            "{:<36} {:>10.0} {:>10} {:>10} {:>8}",
            name,
            m.rps,
            m.p50.as_micros(),
            m.p99.as_micros(),
            m.status.as_u16()
        );
        medians.push((m.rps, m.p99));
    }
    let (direct, proxied, refused) = (medians[0], medians[1], medians[2]);
    println!("proxied / direct throughput: {:.2}", proxied.0 / direct.0);
    println!("refused / proxied throughput: {:.2}", refused.0 / proxied.0);
    println!(
        "refused / proxied p99: {:.2}",
        refused.1.as_secs_f64() / proxied.1.as_secs_f64()
    );
    hold.add_permits(1);
    held.abort();
}
