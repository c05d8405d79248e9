//! Fixed caps against `--max-concurrency auto`, on an app whose capacity drops midway
//! (measured, not a test).
//!
//! `cargo bench --bench adaptive [-- PHASE_SECONDS]` runs, for each target in turn, a fresh
//! app and a fresh tidegate (the release binary) under the same open-loop load:
//!
//! - the app: `16` workers for the first phase, then `4`; each request takes 10 ms of a
//!   worker (sleeping, like a sync WSGI worker waiting on its database); requests beyond the
//!   workers wait inside the app, like a server's backlog. Capacity: 1,600 then 400 req/s.
//! - the load: 1,000 GETs per second, scheduled in advance (open loop: a slow answer does not
//!   slow the sender), each with a 250 ms client deadline after which the client gives up.
//! - targets: `--max-concurrency 128` (too high), `16` (right for phase 1), `4` (right for
//!   phase 2, too low for phase 1), `auto` (never told the capacity), and `auto` with
//!   controlled delay and LIFO under overload (`--queue-codel-target 20ms --queue-lifo`).
//!   Every target has the same queue: `--max-queue 64 --queue-timeout 200ms`.
//!
//! Per phase it prints goodput (200s within the deadline, per second), the p99 latency of
//! those, refusals (503) and give-ups per second, and `auto`'s goodput as a ratio of the best
//! fixed cap's. Figures are for this machine; the ratios are the point.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
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

const SERVICE: Duration = Duration::from_millis(10);
const WORKERS: [u32; 2] = [16, 4];
const RATE: u64 = 1000;
const DEADLINE: Duration = Duration::from_millis(250);
/// Label, `--max-concurrency`, extra flags.
const TARGETS: [(&str, &str, &[&str]); 5] = [
    ("128", "128", &[]),
    ("16", "16", &[]),
    ("4", "4", &[]),
    ("auto", "auto", &[]),
    (
        "auto + codel + lifo",
        "auto",
        &["--queue-codel-target", "20ms", "--queue-lifo"],
    ),
];

/// The app: sleeping workers from `pool`; the pool can shrink while requests run.
async fn app(pool: Arc<Semaphore>) -> SocketAddr {
    common::serve(move |_req: Request<Incoming>| {
        let pool = pool.clone();
        async move {
            let _worker = pool.acquire().await;
            tokio::time::sleep(SERVICE).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await
}

/// The tidegate binary in front of `app` with `--max-concurrency target`.
fn start_tidegate(app: SocketAddr, target: &str, extra: &[&str]) -> common::Tidegate {
    let mut args = vec!["--max-concurrency", target];
    args.extend(["--max-queue", "64", "--queue-timeout", "200ms"]);
    args.extend(["--threads", "1", "--access-log", "false", "--log", "error"]);
    args.extend_from_slice(extra);
    common::start_tidegate(app, &args)
}

#[derive(Default, Clone)]
struct Tally {
    served: Vec<Duration>,
    shed: u64,
    gave_up: u64,
    other: u64,
}

#[derive(Clone)]
struct PhaseResult {
    goodput: f64,
    p99: Duration,
    shed: f64,
    gave_up: f64,
    limits: Vec<i64>,
}

async fn limit_of(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    admin: SocketAddr,
) -> i64 {
    let Ok(rsp) = client
        .get(format!("http://{admin}/metrics").parse().expect("uri"))
        .await
    else {
        return -1;
    };
    let Ok(body) = rsp.into_body().collect().await else {
        return -1;
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("tidegate_concurrency_limit "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// Runs both phases against one target.
async fn run_target(target: &str, extra: &[&str], phase: Duration) -> Vec<PhaseResult> {
    let pool = Arc::new(Semaphore::new(WORKERS[0] as usize));
    let app_addr = app(pool.clone()).await;
    let common::Tidegate {
        mut child,
        addr: proxy,
        admin,
    } = start_tidegate(app_addr, target, extra);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http();
    // Wait for the listener.
    let started = Instant::now();
    while client
        .get(format!("http://{admin}/livez").parse().expect("uri"))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "tidegate did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url: http::Uri = format!("http://{proxy}/work").parse().expect("uri");
    let mut results = Vec::new();
    for (i, _workers) in WORKERS.iter().enumerate() {
        if i == 1 {
            // Take 12 workers away as they finish their current request.
            let pool = pool.clone();
            tokio::spawn(async move {
                if let Ok(p) = pool.acquire_many(WORKERS[0] - WORKERS[1]).await {
                    p.forget();
                }
            });
        }
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut limits = Vec::new();
        let start = tokio::time::Instant::now();
        let total = RATE * phase.as_secs();
        let mut tasks = Vec::with_capacity(total as usize);
        let mut next_sample = start;
        for n in 0..total {
            let at = start + Duration::from_micros(n * 1_000_000 / RATE);
            tokio::time::sleep_until(at).await;
            if at >= next_sample {
                next_sample += Duration::from_secs(1);
                let client = client.clone();
                limits.push(tokio::spawn(async move { limit_of(&client, admin).await }));
            }
            let (client, url, tally) = (client.clone(), url.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let req = Request::get(url).body(Empty::new()).expect("request");
                let outcome = tokio::time::timeout(DEADLINE, async {
                    let rsp = client.request(req).await.ok()?;
                    let status = rsp.status();
                    rsp.into_body().collect().await.ok()?;
                    Some(status)
                })
                .await;
                let mut t = tally.lock().expect("tally");
                match outcome {
                    Ok(Some(StatusCode::OK)) => t.served.push(sent.elapsed()),
                    Ok(Some(StatusCode::SERVICE_UNAVAILABLE)) => t.shed += 1,
                    Ok(_) => t.other += 1,
                    Err(_) => t.gave_up += 1,
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let mut limit_values = Vec::new();
        for l in limits {
            limit_values.push(l.await.unwrap_or(-1));
        }
        let mut t = tally.lock().expect("tally").clone();
        t.served.sort();
        let secs = phase.as_secs_f64();
        let p99 = t
            .served
            .get((t.served.len() * 99 / 100).min(t.served.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        if t.other > 0 {
            eprintln!("  {target}: {} answers other than 200/503", t.other);
        }
        results.push(PhaseResult {
            goodput: t.served.len() as f64 / secs,
            p99,
            shed: t.shed as f64 / secs,
            gave_up: t.gave_up as f64 / secs,
            limits: limit_values,
        });
    }
    let _ = child.kill();
    let _ = child.wait();
    results
}

fn main() {
    let phase = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<u64>().ok())
        .map_or(Duration::from_secs(15), Duration::from_secs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "app: {} then {} workers x {} ms; load: {RATE} req/s open loop, {} ms deadline; {} s per phase",
        WORKERS[0],
        WORKERS[1],
        SERVICE.as_millis(),
        DEADLINE.as_millis(),
        phase.as_secs()
    );
    let mut all = Vec::new();
    for (label, target, extra) in TARGETS {
        let results = runtime.block_on(run_target(target, extra, phase));
        all.push((label, results));
    }
    println!();
    println!(
        "| --max-concurrency | phase | goodput req/s | p99 served | shed req/s | gave up req/s | limit (per second) |"
    );
    println!("|---|---|--:|--:|--:|--:|---|");
    for (target, results) in &all {
        for (i, r) in results.iter().enumerate() {
            let limits: Vec<String> = r.limits.iter().map(i64::to_string).collect();
            println!(
                "| {target} | {} workers | {:.0} | {:.1} ms | {:.0} | {:.0} | {} |",
                WORKERS[i],
                r.goodput,
                r.p99.as_secs_f64() * 1e3,
                r.shed,
                r.gave_up,
                limits.join(" ")
            );
        }
    }
    println!();
    for i in 0..WORKERS.len() {
        let (best_target, best) = all
            .iter()
            .filter(|(t, _)| !t.starts_with("auto"))
            .map(|(t, r)| (*t, r[i].goodput))
            .fold(("", 0.0), |acc, x| if x.1 > acc.1 { x } else { acc });
        for (label, results) in all.iter().filter(|(t, _)| t.starts_with("auto")) {
            let auto = results[i].goodput;
            let ratio = auto / best.max(1e-9);
            println!(
                "phase {} ({} workers): {label} {auto:.0} req/s vs best fixed ({best_target}) {best:.0} req/s = {ratio:.2}x [{}]",
                i + 1,
                WORKERS[i],
                if ratio >= 0.9 {
                    "within 10%"
                } else {
                    "NOT within 10%"
                }
            );
        }
    }
}
