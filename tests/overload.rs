//! Beyond a fixed cap, over real sockets: the adaptive limit following an app whose capacity
//! changes, queue order under overload (LIFO, controlled delay), priority classes and reserved
//! slots, retries queued behind first attempts, `Retry-After` from the queue, and `/state`.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;
use tokio::sync::Semaphore;

/// An app of `workers` workers, each taking `service` per request; requests beyond the
/// workers wait inside the app, as in a WSGI server's backlog.
struct WorkerApp {
    upstream: Upstream,
    workers: Arc<Semaphore>,
}

impl WorkerApp {
    async fn start(workers: usize, service: Duration) -> WorkerApp {
        let pool = Arc::new(Semaphore::new(workers));
        let p = pool.clone();
        let upstream = upstream(move |_req: Request<Incoming>| {
            let p = p.clone();
            async move {
                let _worker = p.acquire().await.unwrap();
                tokio::time::sleep(service).await;
                Response::new(full("done"))
            }
        })
        .await;
        WorkerApp {
            upstream,
            workers: pool,
        }
    }

    /// Takes `n` workers away (as they finish their current request).
    async fn remove_workers(&self, n: u32) {
        self.workers.acquire_many(n).await.unwrap().forget();
    }

    fn add_workers(&self, n: usize) {
        self.workers.add_permits(n);
    }
}

/// `clients` closed-loop clients sending GETs until `stop` is set; returns the statuses seen.
fn load(url: String, clients: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (url, stop) = (url.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match get(&url).await {
                            Ok((status, _, _)) => statuses.push(status.as_u16()),
                            Err(_) => statuses.push(0),
                        }
                    }
                    statuses
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
}

async fn state(tg: &Tidegate) -> serde_json::Value {
    let (status, headers, body) = get(&tg.admin_url("/state")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the adaptive limit, outside a baseline probe, satisfies `check`.
async fn limit_becomes(tg: &Tidegate, what: &str, check: impl Fn(u64) -> bool + Copy) -> u64 {
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    eventually_async(what, Duration::from_secs(40), || {
        let url = tg.admin_url("/state");
        let last = last.clone();
        async move {
            let Ok((_, _, body)) = get(&url).await else {
                return false;
            };
            let state: serde_json::Value = serde_json::from_str(&body).unwrap();
            let slots = &state["limiter"]["slots"];
            let limit = slots["limit"].as_u64().unwrap();
            last.store(limit, Ordering::Relaxed);
            !slots["adaptive"]["probing"].as_bool().unwrap() && check(limit)
        }
    })
    .await;
    last.load(Ordering::Relaxed)
}

async fn latency_step(algorithm: &str) {
    let app = WorkerApp::start(16, Duration::from_millis(20)).await;
    let tg = tidegate(
        app.upstream.addr,
        &[
            "--max-concurrency",
            "auto",
            "--adaptive-algorithm",
            algorithm,
            "--min-concurrency",
            "2",
            "--max-concurrency-ceiling",
            "100",
            "--max-queue",
            "64",
            "--queue-timeout",
            "5s",
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(tg.url("/work"), 64, stop.clone());

    let up = limit_becomes(&tg, "limit grows to use 16 workers", |l| l >= 16).await;
    let s = state(&tg).await;
    assert_eq!(s["limiter"]["mode"], "auto");
    assert_eq!(s["limiter"]["slots"]["adaptive"]["algorithm"], algorithm);
    assert!(up <= 100, "ceiling respected: {up}");

    app.remove_workers(12).await;
    let down = limit_becomes(&tg, "limit falls when the app slows", |l| l <= 12).await;
    assert!(down >= 2, "floor respected: {down}");
    let gauge = tg.metrics.admission.concurrency_limit.get();
    assert!(
        (2..=100).contains(&gauge),
        "the gauge follows the limit: {gauge}"
    );

    app.add_workers(12);
    limit_becomes(&tg, "limit recovers when the app speeds up", |l| l >= 16).await;

    stop.store(true, Ordering::Relaxed);
    let statuses = traffic.await.unwrap();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "only answers or fast refusals: {:?}",
        statuses
            .iter()
            .filter(|&&s| s != 200 && s != 503)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(ok > 100, "traffic was served: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradient_limit_follows_a_capacity_step() {
    latency_step("gradient").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aimd_limit_follows_a_capacity_step() {
    latency_step("aimd").await;
}

/// The `limit` and `previous` fields of every "limit moved" log line of the binary.
fn logged_moves(bin: &Binary) -> Vec<(u64, u64)> {
    bin.log()
        .lines()
        .filter(|l| l.contains("Adaptive concurrency limit moved"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["limit"].as_u64().unwrap(),
                v["previous"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_moves_of_the_adaptive_limit_are_logged() {
    let app = WorkerApp::start(16, Duration::from_millis(20)).await;
    let upstream = format!("http://{}", app.upstream.addr);
    let bin = Binary::start(
        &upstream,
        &[
            "--max-concurrency",
            "auto",
            "--min-concurrency",
            "2",
            "--max-queue",
            "64",
            "--access-log",
            "false",
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(format!("http://{}/work", bin.addr), 64, stop.clone());
    eventually(
        "a logged rise to 20 or more",
        Duration::from_secs(40),
        || {
            logged_moves(&bin)
                .iter()
                .any(|&(limit, previous)| limit >= 20 && limit > previous)
        },
    )
    .await;
    let rises = logged_moves(&bin).len();
    app.remove_workers(12).await;
    eventually("a logged fall", Duration::from_secs(40), || {
        logged_moves(&bin)[rises..]
            .iter()
            .any(|&(limit, previous)| limit < previous && limit <= 12)
    })
    .await;
    for (limit, previous) in logged_moves(&bin) {
        let moved = limit.abs_diff(previous);
        assert!(
            moved >= 2 && moved * 4 >= previous,
            "only large moves are logged: {previous} -> {limit}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
}

/// An upstream that records the order paths arrive in and holds each until released.
struct OrderedGate {
    upstream: Upstream,
    order: Arc<Mutex<Vec<String>>>,
    release: Arc<Semaphore>,
}

impl OrderedGate {
    async fn start() -> OrderedGate {
        let order = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Semaphore::new(0));
        let (o, r) = (order.clone(), release.clone());
        let upstream = upstream(move |req: Request<Incoming>| {
            let (o, r) = (o.clone(), r.clone());
            async move {
                o.lock().unwrap().push(req.uri().path().to_owned());
                r.acquire().await.unwrap().forget();
                Response::new(full("done"))
            }
        })
        .await;
        OrderedGate {
            upstream,
            order,
            release,
        }
    }

    fn arrived(&self) -> Vec<String> {
        self.order.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) {
        eventually("arrivals at the app", Duration::from_secs(10), || {
            self.arrived().len() >= n
        })
        .await;
    }
}

fn spawn_request(
    url: String,
    headers: &[(&'static str, &'static str)],
) -> tokio::task::JoinHandle<(StatusCode, http::HeaderMap)> {
    let mut builder = Request::get(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder.body(empty()).unwrap();
    tokio::spawn(async move {
        let (status, headers, _) = send(&client(), req).await.unwrap();
        (status, headers)
    })
}

/// An [`OrderedGate`] app behind a tidegate with one slot (`--max-concurrency 1`), a queue of
/// `queue` and a long `--queue-timeout`, plus `extra` flags; the slot is already held by a
/// `/held` request, returned last.
async fn one_slot_held(
    queue: &str,
    extra: &[&str],
) -> (
    OrderedGate,
    Tidegate,
    tokio::task::JoinHandle<(StatusCode, http::HeaderMap)>,
) {
    let gate = OrderedGate::start().await;
    let mut args = vec![
        "--max-concurrency",
        "1",
        "--max-queue",
        queue,
        "--queue-timeout",
        "30s",
    ];
    args.extend_from_slice(extra);
    let tg = tidegate(gate.upstream.addr, &args).await;
    let held = spawn_request(tg.url("/held"), &[]);
    gate.wait_for(1).await;
    (gate, tg, held)
}

async fn wait_queued(tg: &Tidegate, n: i64) {
    eventually(&format!("{n} queued"), Duration::from_secs(10), || {
        tg.metrics.admission.queued.get() == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifo_under_overload_serves_the_newest_waiter_first() {
    let (gate, tg, first) =
        one_slot_held("8", &["--queue-lifo", "--queue-codel-interval", "50ms"]).await;
    let mut waiters = Vec::new();
    for (i, path) in ["/old", "/middle", "/new"].iter().enumerate() {
        waiters.push(spawn_request(tg.url(path), &[]));
        wait_queued(&tg, i as i64 + 1).await;
    }
    eventually_async("queue overloaded", Duration::from_secs(5), || async {
        state(&tg).await["limiter"]["slots"]["lifo_active"] == true
    })
    .await;
    for n in 2..=4 {
        gate.release.add_permits(1);
        gate.wait_for(n).await;
    }
    gate.release.add_permits(1);
    assert_eq!(gate.arrived(), ["/held", "/new", "/middle", "/old"]);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    for w in waiters {
        assert_eq!(w.await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlled_delay_sheds_stale_waiters_fast_once_overloaded() {
    let (gate, tg, held) = one_slot_held(
        "8",
        &[
            "--queue-codel-target",
            "50ms",
            "--queue-codel-interval",
            "100ms",
        ],
    )
    .await;
    let stale = spawn_request(tg.url("/stale"), &[]);
    wait_queued(&tg, 1).await;
    eventually_async("queue overloaded", Duration::from_secs(5), || async {
        state(&tg).await["limiter"]["slots"]["overloaded"] == true
    })
    .await;
    // A newcomer to an overloaded queue waits at most the target, not --queue-timeout.
    let start = Instant::now();
    let (status, headers) = spawn_request(tg.url("/late"), &[]).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "queue-delay");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The request that waited past the target is shed when its turn comes, not served.
    gate.release.add_permits(1);
    let (status, headers) = stale.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "queue-delay");
    assert_eq!(held.await.unwrap().0, StatusCode::OK);
    assert_eq!(gate.arrived(), ["/held"]);
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_shed_total{reason=\"queue-delay\",route=\"default\"}"
        )
        .await,
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_requests_use_reserved_slots_jump_the_queue_and_are_shed_last() {
    let gate = OrderedGate::start().await;
    let file = scratch_file(
        "priority.toml",
        "[[route]]\nprefix = \"/batch\"\npriority = \"low\"\n\n\
         [[route]]\nprefix = \"/checkout\"\npriority = \"critical\"\n",
    );
    let tg = tidegate(
        gate.upstream.addr,
        &[
            "--config",
            file.to_str().unwrap(),
            "--max-concurrency",
            "2",
            "--reserved-slots",
            "1",
            "--priority-header",
            "x-priority",
            "--max-queue",
            "2",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
    let normal = spawn_request(tg.url("/normal"), &[]);
    gate.wait_for(1).await;
    // The second slot is reserved: a normal request queues although a slot is free.
    let queued_normal = spawn_request(tg.url("/queued-normal"), &[]);
    wait_queued(&tg, 1).await;
    let batch = spawn_request(tg.url("/batch/job"), &[]);
    wait_queued(&tg, 2).await;
    // A critical request (by header) takes the reserved slot at once.
    let critical = spawn_request(tg.url("/urgent"), &[("x-priority", "critical")]);
    gate.wait_for(2).await;
    assert_eq!(gate.arrived()[1], "/urgent");
    // The queue is full: a critical request (by route) pushes out the low-priority waiter.
    let checkout = spawn_request(tg.url("/checkout"), &[]);
    let (status, headers) = batch.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "evicted");
    wait_queued(&tg, 2).await;
    // A header can demote a route's class: a low request finds the queue full, evicts nobody.
    let (status, headers) = spawn_request(tg.url("/checkout"), &[("x-priority", "low")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "queue-full");
    // Slots free up: the critical waiter first (it may use the reserved slot), then the
    // normal one, only once the one slot it may use is free.
    gate.release.add_permits(1);
    gate.wait_for(3).await;
    assert_eq!(gate.arrived()[2], "/checkout");
    gate.release.add_permits(1);
    eventually("a slot freed", Duration::from_secs(10), || {
        tg.metrics.admission.in_flight.get() == 1
    })
    .await;
    assert_eq!(
        tg.metrics.admission.queued.get(),
        1,
        "the free slot is the reserved one"
    );
    assert_eq!(gate.arrived().len(), 3);
    gate.release.add_permits(1);
    gate.wait_for(4).await;
    assert_eq!(gate.arrived()[3], "/queued-normal");
    gate.release.add_permits(1);
    for r in [normal, queued_normal, critical, checkout] {
        assert_eq!(r.await.unwrap().0, StatusCode::OK);
    }
    let s = state(&tg).await;
    assert_eq!(s["limiter"]["slots"]["reserved"], 1);
    assert_eq!(s["limiter"]["priority_header"], "x-priority");
    let routes = s["limiter"]["routes"].as_array().unwrap();
    assert_eq!(routes[0]["priority"], "low");
    assert_eq!(routes[1]["priority"], "critical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_queue_behind_first_attempts() {
    let retry_flags = ["--retry-header", "x-retry-attempt"];
    let memory = ["--retry-memory", "30s"];
    let (gate, tg, held) = one_slot_held("1", &[&retry_flags[..], &memory[..]].concat()).await;
    let retry = spawn_request(tg.url("/retry"), &[("x-retry-attempt", "2")]);
    wait_queued(&tg, 1).await;
    // The queue holds one: this first attempt is refused, and its client (127.0.0.1) is
    // remembered as just refused.
    let (status, headers) = spawn_request(tg.url("/refused"), &[]).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "queue-full");
    let seen_before = tg.metrics.admission.retries_seen.get();
    // Now its next request counts as a retry too.
    let again = spawn_request(tg.url("/again"), &[]);
    eventually(
        "the client's next request is a retry",
        Duration::from_secs(5),
        || tg.metrics.admission.retries_seen.get() > seen_before,
    )
    .await;
    let _ = again.await;
    gate.release.add_permits(2);
    assert_eq!(held.await.unwrap().0, StatusCode::OK);
    assert_eq!(retry.await.unwrap().0, StatusCode::OK);

    let (gate, tg, held) = one_slot_held("4", &retry_flags).await;
    let retry = spawn_request(tg.url("/retry"), &[("x-retry-attempt", "1")]);
    wait_queued(&tg, 1).await;
    let first = spawn_request(tg.url("/first"), &[("x-retry-attempt", "0")]);
    wait_queued(&tg, 2).await;
    gate.release.add_permits(1);
    gate.wait_for(2).await;
    assert_eq!(
        gate.arrived()[1],
        "/first",
        "the first attempt overtakes the retry"
    );
    gate.release.add_permits(2);
    for r in [held, retry, first] {
        assert_eq!(r.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(tg.metrics.admission.retries_seen.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_follows_the_queue_and_the_service_rate() {
    // One worker, 50 ms per request: about 20 completions per second.
    let app = WorkerApp::start(1, Duration::from_millis(50)).await;
    let tg = tidegate(
        app.upstream.addr,
        &[
            "--max-concurrency",
            "1",
            "--max-queue",
            "60",
            "--queue-timeout",
            "30s",
            "--retry-after-from-queue",
            "--retry-after",
            "1s",
            "--retry-after-max",
            "40s",
            "--retry-after-jitter",
            "0s",
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(tg.url("/work"), 61, stop.clone());
    // Wait until tidegate has measured a rate and the queue is full.
    eventually_async(
        "a full queue and a service rate",
        Duration::from_secs(20),
        || {
            let tg = &tg;
            async move {
                let s = state(tg).await;
                let r = s["limiter"]["slots"]["service_rate"].as_f64().unwrap();
                r > 5.0 && s["limiter"]["queued"].as_u64().unwrap() >= 55
            }
        },
    )
    .await;
    // The rate the app really serves at, counted at the app over the refusals' time (at least
    // a second), not the rate tidegate reports: the estimate is checked against the world.
    let hits = || app.upstream.hits.load(Ordering::SeqCst);
    let (started, hits_before) = (Instant::now(), hits());
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (status, headers, _) = get(&tg.url("/extra")).await.unwrap();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            seen.push(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
    }
    // Not synchronisation: the length of the counting window.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
    let rate = (hits() - hits_before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let expected = 61.0 / rate;
    assert!(!seen.is_empty(), "requests beyond the queue are refused");
    for retry in &seen {
        // Little's law against the app's own rate on a loaded machine: within a factor of 2.
        assert!(
            (*retry as f64) >= (expected / 2.0).max(1.0) && (*retry as f64) <= expected * 2.0 + 1.0,
            "Retry-After {retry} s, expected about {expected:.1} s (queue 61, the app serving \
             {rate:.1}/s)"
        );
        assert!(*retry > 1, "not the constant base: {retry}");
    }
    assert!(
        metric(tg.admin, "tidegate_retry_after_estimate_seconds")
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_shows_every_knob() {
    let app = ok_upstream().await;
    let tg = tidegate(
        app.addr,
        &[
            "--max-concurrency",
            "auto",
            "--min-concurrency",
            "3",
            "--max-concurrency-ceiling",
            "40",
            "--queue-codel-target",
            "20ms",
            "--queue-lifo",
            "--retry-header",
            "x-retry",
            "--retry-after-from-queue",
            "--route",
            "/slow=2",
        ],
    )
    .await;
    assert_eq!(get(&tg.url("/")).await.unwrap().0, StatusCode::OK);
    let s = state(&tg).await;
    let l = &s["limiter"];
    assert_eq!(l["mode"], "auto");
    assert_eq!(l["slots"]["limit"], 3, "starts at the minimum");
    assert_eq!(l["slots"]["adaptive"]["min"], 3);
    assert_eq!(l["slots"]["adaptive"]["max"], 40);
    assert_eq!(l["slots"]["adaptive"]["algorithm"], "gradient");
    assert_eq!(l["max_queue"], 40, "the queue defaults to the ceiling");
    assert_eq!(l["codel_target"], 0.02);
    assert_eq!(l["lifo"], true);
    assert_eq!(l["retry_header"], "x-retry");
    assert!(l["retry_after_estimate"].as_f64().unwrap() >= 1.0);
    assert_eq!(l["routes"][0]["name"], "/slow");
    assert_eq!(l["routes"][0]["limit"], 2);
    assert_eq!(l["routes"][1]["name"], "default");
    assert_eq!(s["ready"], true);
    assert_eq!(s["phase"], "serving");
    assert_eq!(
        metric(tg.admin, "tidegate_concurrency_limit").await,
        Some(3.0)
    );
    assert_eq!(
        metric(tg.admin, "tidegate_queue_overloaded").await,
        Some(0.0)
    );
}
