//! Soak: mixed traffic through the real (release) binary for a long time, with shedding,
//! config reloads, client aborts, uploads, streaming, HTTP/2 and connection churn, while the
//! process's RSS, open file descriptors and runtime tasks are sampled. Not a test: it prints
//! figures, and a verdict on whether they stayed flat.
//!
//! `cargo bench --bench soak` runs 10 minutes; `cargo bench --bench soak -- 60s` a minute.
//! Everything runs on 127.0.0.1; every load loop ends when the duration is over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

#[path = "common/mod.rs"]
mod common;

use common::Tidegate;

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The app: fast, slow, streamed and upload routes.
async fn app() -> SocketAddr {
    common::serve(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/slow" => {
                let ms = 100 + fastrand::u64(0..200);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Response::new(full("slow"))
            }
            "/stream" => {
                let chunks = futures_util::stream::unfold(0, |n| async move {
                    if n == 16 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let frame = Frame::data(Bytes::from(vec![b's'; 4096]));
                    Some((Ok::<_, hyper::Error>(frame), n + 1))
                });
                Response::new(StreamBody::new(chunks).boxed())
            }
            "/upload" => {
                let n = match req.into_body().collect().await {
                    Ok(body) => body.to_bytes().len(),
                    Err(_) => 0,
                };
                Response::new(full(n.to_string()))
            }
            _ => Response::new(full("ok")),
        }
    })
    .await
}

/// The config file, alternating between two sets of limits on each reload.
fn config_text(generation: u64) -> String {
    let (global, slow) = if generation.is_multiple_of(2) {
        (24, 6)
    } else {
        (12, 3)
    };
    format!(
        "max_concurrency = {global}\nmax_queue = {global}\nqueue_timeout = \"100ms\"\n\
         idle_timeout = \"5s\"\nmax_request_body = \"1MiB\"\naccess_log = false\n\n\
         [[route]]\nprefix = \"/slow\"\nmax_concurrency = {slow}\n"
    )
}

fn start_tidegate(app: SocketAddr, config: &Path) -> Tidegate {
    let config = config.to_str().expect("utf-8 path");
    common::start_tidegate(app, &["--config", config, "--log", "warn"])
}

/// One sample of the process's resources.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    tasks: f64,
    connections: f64,
    in_flight: f64,
}

async fn metric(client: &Client<HttpConnector, Body>, admin: SocketAddr, name: &str) -> f64 {
    let req = Request::get(format!("http://{admin}/metrics"))
        .body(full(""))
        .expect("request");
    let Ok(rsp) = client.request(req).await else {
        return f64::NAN;
    };
    let Ok(body) = rsp.into_body().collect().await else {
        return f64::NAN;
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn sample(client: &Client<HttpConnector, Body>, tg: &Tidegate, start: Instant) -> Sample {
    let pid = tg.child.id();
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    Sample {
        at: start.elapsed(),
        rss_kib,
        fds,
        tasks: metric(client, tg.admin, "tidegate_runtime_tasks").await,
        connections: metric(client, tg.admin, "tidegate_connections_open").await,
        in_flight: metric(client, tg.admin, "tidegate_in_flight").await,
    }
}

fn print_sample(label: &str, s: &Sample) {
    println!(
        "{label:>10} {:>7.0}s {:>9} KiB {:>6} fds {:>6} tasks {:>6} conns {:>5} in flight",
        s.at.as_secs_f64(),
        s.rss_kib,
        s.fds,
        s.tasks,
        s.connections,
        s.in_flight
    );
}

type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

async fn count(tally: &Tally, key: String) {
    *tally.lock().await.entry(key).or_insert(0) += 1;
}

fn outcome<E>(result: Result<Response<Incoming>, E>) -> String {
    match result {
        Ok(rsp) => rsp.status().as_u16().to_string(),
        Err(_) => "transport error".to_owned(),
    }
}

/// Runs `work` in a loop until `stop`, pausing `pause` between iterations.
fn worker<F, Fut>(
    stop: Arc<AtomicBool>,
    pause: Duration,
    mut work: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            work().await;
            tokio::time::sleep(pause).await;
        }
    })
}

fn main() {
    let duration = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| humantime::parse_duration(&a).expect("duration, e.g. 10m"))
        .unwrap_or(Duration::from_secs(600));
    let every = (duration / 20).clamp(Duration::from_secs(5), Duration::from_secs(30));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(soak(duration, every));
}

async fn soak(duration: Duration, every: Duration) {
    let dir = std::env::temp_dir().join(format!("tidegate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let config = dir.join("tidegate.toml");
    std::fs::write(&config, config_text(0)).expect("config");
    let app = app().await;
    let mut tg = start_tidegate(app, &config);
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let h2: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let ready = Instant::now();
    loop {
        let req = Request::get(format!("http://{}/readyz", tg.admin))
            .body(full(""))
            .expect("request");
        if matches!(client.request(req).await, Ok(r) if r.status() == 200) {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "tidegate not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "soak: {:?} of mixed traffic through tidegate (pid {}), sampled every {:?}",
        duration,
        tg.child.id(),
        every
    );
    let start = Instant::now();
    let before = sample(&client, &tg, start).await;
    print_sample("idle", &before);
    let stop = Arc::new(AtomicBool::new(false));
    let tally: Tally = Arc::default();
    let mut workers = Vec::new();
    let base = format!("http://{}", tg.addr);

    for (route, n, pause) in [("/fast", 12, 2), ("/slow", 10, 5), ("/stream", 2, 20)] {
        for _ in 0..n {
            let (client, tally, url) = (client.clone(), tally.clone(), format!("{base}{route}"));
            workers.push(worker(
                stop.clone(),
                Duration::from_millis(pause),
                move || {
                    let (client, tally, url) = (client.clone(), tally.clone(), url.clone());
                    async move {
                        let req = Request::get(&url).body(full("")).expect("request");
                        let key = match client.request(req).await {
                            Ok(rsp) => {
                                let status = rsp.status().as_u16();
                                let _ = rsp.into_body().collect().await;
                                format!("{route} {status}")
                            }
                            Err(_) => format!("{route} transport error"),
                        };
                        count(&tally, key).await;
                    }
                },
            ));
        }
    }
    // HTTP/2 clients.
    for _ in 0..2 {
        let (h2, tally, url) = (h2.clone(), tally.clone(), format!("{base}/fast"));
        workers.push(worker(stop.clone(), Duration::from_millis(2), move || {
            let (h2, tally, url) = (h2.clone(), tally.clone(), url.clone());
            async move {
                let req = Request::get(&url).body(full("")).expect("request");
                let key = format!("h2 {}", outcome(h2.request(req).await));
                count(&tally, key).await;
            }
        }));
    }
    // Uploads, some over the body limit.
    for _ in 0..2 {
        let (client, tally, url) = (client.clone(), tally.clone(), format!("{base}/upload"));
        workers.push(worker(stop.clone(), Duration::from_millis(10), move || {
            let (client, tally, url) = (client.clone(), tally.clone(), url.clone());
            async move {
                let size = if fastrand::u8(0..10) == 0 {
                    2 << 20
                } else {
                    256 << 10
                };
                let req = Request::post(&url)
                    .body(full(vec![b'u'; size]))
                    .expect("request");
                let key = format!("/upload {}", outcome(client.request(req).await));
                count(&tally, key).await;
            }
        }));
    }
    // Clients that give up mid-request, and connection churn (one request per connection).
    for _ in 0..4 {
        let (tally, addr) = (tally.clone(), tg.addr);
        workers.push(worker(stop.clone(), Duration::from_millis(5), move || {
            let tally = tally.clone();
            async move {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                    let _ = stream
                        .write_all(b"GET /slow HTTP/1.1\r\nHost: soak\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                count(&tally, "abort".to_owned()).await;
            }
        }));
    }
    for _ in 0..2 {
        let (tally, url) = (tally.clone(), format!("{base}/fast"));
        workers.push(worker(stop.clone(), Duration::from_millis(5), move || {
            let (tally, url) = (tally.clone(), url.clone());
            async move {
                let fresh: Client<HttpConnector, Body> =
                    Client::builder(TokioExecutor::new()).build_http();
                let req = Request::get(&url)
                    .header("connection", "close")
                    .body(full(""))
                    .expect("request");
                let key = format!("churn {}", outcome(fresh.request(req).await));
                count(&tally, key).await;
            }
        }));
    }

    // Reloads every 10 s: the file changes and SIGHUP is sent.
    let reloads = Arc::new(AtomicU64::new(0));
    let reloader = {
        let (stop, reloads, config, pid) =
            (stop.clone(), reloads.clone(), config.clone(), tg.child.id());
        tokio::spawn(async move {
            let mut generation = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(10)).await;
                generation += 1;
                let _ = std::fs::write(&config, config_text(generation));
                let _ = Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status();
                reloads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let mut samples = Vec::new();
    while start.elapsed() < duration {
        tokio::time::sleep(every.min(duration.saturating_sub(start.elapsed()))).await;
        let s = sample(&client, &tg, start).await;
        print_sample("load", &s);
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    reloader.abort();
    drop((client.clone(), h2));
    // Let the abandoned exchanges finish and idle connections time out (idle_timeout 5 s).
    let settle = Instant::now();
    let mut settled = sample(&client, &tg, start).await;
    while (settled.connections > 1.0 || settled.in_flight > 0.0)
        && settle.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        settled = sample(&client, &tg, start).await;
    }
    print_sample("settled", &settled);
    // Pooled upstream connections close once idle for 30 s, checked every 30 s: after 65 s
    // tidegate should be back where it began.
    tokio::time::sleep(Duration::from_secs(65)).await;
    let quiet = sample(&client, &tg, start).await;
    print_sample("quiet", &quiet);

    println!("\nrequests by outcome:");
    for (key, n) in tally.lock().await.iter() {
        println!("  {key:<24} {n}");
    }
    println!(
        "  reloads sent             {}",
        reloads.load(Ordering::Relaxed)
    );
    let reloads_ok = metric(
        &client,
        tg.admin,
        "tidegate_config_reloads_total{result=\"ok\"}",
    )
    .await;
    println!("  reloads applied          {reloads_ok}");

    // Flat: compare the first sample after warm-up with the last one under load, and the
    // settled state with the first sample.
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let growth = |a: f64, b: f64| if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 };
        println!(
            "\nresource  before-load  first-sample  last-under-load  growth   settled   quiet"
        );
        println!(
            "RSS KiB   {:>11}  {:>12}  {:>15}  {:>+5.1}%  {:>8}  {:>6}",
            before.rss_kib,
            first.rss_kib,
            last.rss_kib,
            growth(first.rss_kib as f64, last.rss_kib as f64),
            settled.rss_kib,
            quiet.rss_kib
        );
        println!(
            "fds       {:>11}  {:>12}  {:>15}  {:>+5.1}%  {:>8}  {:>6}",
            before.fds,
            first.fds,
            last.fds,
            growth(first.fds as f64, last.fds as f64),
            settled.fds,
            quiet.fds
        );
        println!(
            "tasks     {:>11}  {:>12}  {:>15}  {:>+5.1}%  {:>8}  {:>6}",
            before.tasks,
            first.tasks,
            last.tasks,
            growth(first.tasks, last.tasks),
            settled.tasks,
            quiet.tasks
        );
        let flat = last.rss_kib as f64 <= first.rss_kib as f64 * 1.2 + 2048.0;
        let back = quiet.fds <= before.fds && quiet.tasks <= before.tasks;
        println!(
            "\nverdict: RSS {} under load; after it, fds and tasks {} the pre-load figures \
             ({} connections, {} requests in flight)",
            if flat { "flat" } else { "GREW" },
            if back { "back to" } else { "ABOVE" },
            quiet.connections,
            quiet.in_flight
        );
    }
    let _ = tg.child.kill();
    let _ = tg.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
