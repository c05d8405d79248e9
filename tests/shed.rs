//! Load shedding over real sockets: concurrency cap, bounded FIFO queue, route bulkheads.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends a GET on its own connection in the background.
fn spawn_get(
    url: String,
) -> tokio::task::JoinHandle<Result<(StatusCode, http::HeaderMap, String), String>> {
    tokio::spawn(async move { get(&url).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_n_reach_the_app_q_wait_and_the_rest_are_refused_at_once() {
    const N: usize = 3;
    const Q: usize = 2;
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "3",
            "--max-queue",
            "2",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
    let mut admitted = Vec::new();
    for i in 0..N {
        admitted.push(spawn_get(tg.url(&format!("/a{i}"))));
    }
    gate.wait_arrived(N).await;
    let mut queued = Vec::new();
    for i in 0..Q {
        queued.push(spawn_get(tg.url(&format!("/q{i}"))));
    }
    eventually("Q requests queued", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == Q as i64
    })
    .await;
    assert_eq!(metric(tg.admin, "tidegate_queued").await, Some(Q as f64));
    assert_eq!(metric(tg.admin, "tidegate_in_flight").await, Some(N as f64));

    for i in 0..10 {
        let start = Instant::now();
        let (status, headers, body) = get(&tg.url(&format!("/x{i}"))).await.unwrap();
        let took = start.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["tidegate-shed"], "queue-full");
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(
            (1..=2).contains(&retry),
            "default Retry-After is 1-2 s: {retry}"
        );
        assert!(!body.is_empty());
        // Framed by length, not chunked: the client knows the refusal is whole.
        assert_eq!(headers["content-length"], body.len().to_string().as_str());
        assert!(!headers.contains_key("transfer-encoding"));
        assert!(
            took < Duration::from_millis(500),
            "refusal took {took:?}, queue timeout is 30s"
        );
    }
    // Nothing extra reached the app.
    assert_eq!(gate.arrived(), N);
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_shed_total{reason=\"queue-full\",route=\"default\"}"
        )
        .await,
        Some(10.0)
    );

    gate.release(N + Q);
    for task in admitted.into_iter().chain(queued) {
        let (status, _, body) = task.await.unwrap().unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "released"));
    }
    assert_eq!(gate.arrived(), N + Q);
    eventually("gauges back to zero", Duration::from_secs(5), || {
        tg.metrics.admission.in_flight.get() == 0 && tg.metrics.admission.queued.get() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_times_out_with_queue_timeout() {
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "1",
            "--max-queue",
            "1",
            "--queue-timeout",
            "300ms",
            "--retry-after",
            "5s",
            "--retry-after-jitter",
            "0s",
        ],
    )
    .await;
    let held = spawn_get(tg.url("/held"));
    gate.wait_arrived(1).await;
    let start = Instant::now();
    let (status, headers, _) = get(&tg.url("/waits")).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "queue-timeout");
    assert_eq!(headers["retry-after"], "5");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(gate.arrived(), 1);
    gate.release(1);
    assert_eq!(held.await.unwrap().unwrap().0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_slow_route_does_not_starve_fast_requests() {
    let gate = Gate::start().await;
    // 4 slots; /slow may hold 2. The queue is deep, so slow requests wait rather than fail.
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "4",
            "--max-queue",
            "10",
            "--queue-timeout",
            "30s",
            "--route",
            "/slow=2",
        ],
    )
    .await;
    let mut slow = Vec::new();
    for i in 0..4 {
        slow.push(spawn_get(tg.url(&format!("/slow/{i}"))));
    }
    gate.wait_arrived(2).await;
    eventually(
        "2 slow requests queued for their route",
        Duration::from_secs(5),
        || tg.metrics.admission.queued.get() == 2,
    )
    .await;
    assert_eq!(gate.arrived(), 2, "the route limit holds");
    assert_eq!(
        metric(tg.admin, "tidegate_route_in_flight{route=\"/slow\"}").await,
        Some(2.0)
    );
    assert_eq!(
        metric(tg.admin, "tidegate_route_queued{route=\"/slow\"}").await,
        Some(2.0)
    );
    // A full route queues at most its own limit, so it cannot fill the shared queue.
    let (status, headers, _) = get(&tg.url("/slow/5")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "route-full");
    // Queued slow requests hold no global slot and do not block other routes: fast requests
    // (the gate's /free path answers at once) go through at once.
    for i in 0..5 {
        let start = Instant::now();
        let (status, _, body) = get(&tg.url(&format!("/free/{i}"))).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "free"));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    // `/slowly` is another route (segment-wise matching) and can use the remaining slots.
    let other = spawn_get(tg.url("/slowly"));
    gate.wait_arrived(3).await;
    gate.release(5);
    for task in slow {
        assert_eq!(task.await.unwrap().unwrap().0, StatusCode::OK);
    }
    assert_eq!(other.await.unwrap().unwrap().0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_full_when_the_queue_is_full_too() {
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "4",
            "--max-queue",
            "0",
            "--route",
            "/slow=1",
        ],
    )
    .await;
    let held = spawn_get(tg.url("/slow"));
    gate.wait_arrived(1).await;
    let (status, headers, _) = get(&tg.url("/slow/again")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "route-full");
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_shed_total{reason=\"route-full\",route=\"/slow\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(get(&tg.url("/free")).await.unwrap().0, StatusCode::OK);
    gate.release(1);
    assert_eq!(held.await.unwrap().unwrap().0, StatusCode::OK);
}

/// How a queued client goes away.
enum Leave {
    /// It closes its connection.
    Close,
    /// It shuts down its sending side only: TCP cannot tell that from leaving while the
    /// request waits, and a request whose client has left must not keep its place and later
    /// reach the app (client retries would fill the queue with them).
    HalfClose,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_queued_client_frees_its_place_and_takes_no_slot() {
    queued_client_leaves(Leave::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_waiting_in_the_queue_has_left() {
    queued_client_leaves(Leave::HalfClose).await;
}

/// A client whose request waits in the queue goes away as `leave` says: its place is freed at
/// once and its request never reaches the app.
async fn queued_client_leaves(leave: Leave) {
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "1",
            "--max-queue",
            "1",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
    let held = spawn_get(tg.url("/held"));
    gate.wait_arrived(1).await;
    let mut queued = TcpStream::connect(tg.addr).await.unwrap();
    queued
        .write_all(b"GET /queued HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    eventually("queued", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 1
    })
    .await;
    match leave {
        Leave::Close => drop(queued),
        Leave::HalfClose => queued.shutdown().await.unwrap(),
    }
    eventually("queue place freed", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 0
    })
    .await;
    // The place is usable again: this one queues instead of being refused.
    let next = spawn_get(tg.url("/next"));
    eventually("next queued", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 1
    })
    .await;
    gate.release(2);
    assert_eq!(held.await.unwrap().unwrap().0, StatusCode::OK);
    assert_eq!(next.await.unwrap().unwrap().0, StatusCode::OK);
    // The cancelled request never reached the app.
    assert_eq!(gate.arrived(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_health_traffic_bypass_the_limits() {
    let gate = Gate::start().await;
    let tg = tidegate(gate.addr(), &["--max-concurrency", "1", "--max-queue", "0"]).await;
    let held = spawn_get(tg.url("/held"));
    gate.wait_arrived(1).await;
    assert_eq!(
        get(&tg.url("/x")).await.unwrap().0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for path in ["/livez", "/readyz", "/app/livez", "/metrics"] {
        let (status, _, body) = get(&tg.admin_url(path)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    gate.release(1);
    held.await.unwrap().unwrap();
}

/// Thousands of random requests, random client cancellations: no permit leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_load_with_cancellations_leaks_no_permits() {
    let app = upstream(|_req| async {
        let delay = fastrand::u64(0..20);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        http::Response::new(full("ok"))
    })
    .await;
    let tg = tidegate(
        app.addr,
        &[
            "--max-concurrency",
            "8",
            "--max-queue",
            "16",
            "--queue-timeout",
            "50ms",
            "--route",
            "/r1=3",
            "--route",
            "/r2=5",
        ],
    )
    .await;
    let c = client();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let c = c.clone();
        let base = tg.url("");
        tasks.push(tokio::spawn(async move {
            let mut outcomes = [0usize; 3]; // ok, shed, cancelled
            for i in 0..80 {
                let path = ["/r1/x", "/r2", "/other", "/r1"][(worker + i) % 4];
                let req = Request::get(format!("{base}{path}")).body(empty()).unwrap();
                let cancel_after = Duration::from_millis(fastrand::u64(1..40));
                match tokio::time::timeout(cancel_after, send(&c, req)).await {
                    Ok(Ok((StatusCode::OK, _, _))) => outcomes[0] += 1,
                    Ok(Ok((StatusCode::SERVICE_UNAVAILABLE, _, _))) => outcomes[1] += 1,
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => outcomes[2] += 1,
                }
            }
            outcomes
        }));
    }
    let mut totals = [0usize; 3];
    for t in tasks {
        let o = t.await.unwrap();
        for k in 0..3 {
            totals[k] += o[k];
        }
    }
    assert_eq!(totals.iter().sum::<usize>(), 32 * 80);
    assert!(
        totals[0] > 0 && totals[2] > 0,
        "the mix must include successes and cancellations: {totals:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // A cancelled request may still sit unread in its connection's socket; once every client
    // connection is closed, no request can arrive late and the gauges must settle at 0.
    drop(c);
    eventually(
        "client connections closed, in-flight and queued gauges back to exactly 0",
        Duration::from_secs(10),
        || {
            tg.metrics.connections.connections_open.get() == 0
                && tg.metrics.admission.in_flight.get() == 0
                && tg.metrics.admission.queued.get() == 0
        },
    )
    .await;
    for series in [
        "tidegate_in_flight",
        "tidegate_queued",
        "tidegate_route_in_flight{route=\"/r1\"}",
        "tidegate_route_in_flight{route=\"/r2\"}",
        "tidegate_route_queued{route=\"/r1\"}",
        "tidegate_route_in_flight{route=\"default\"}",
    ] {
        assert_eq!(metric(tg.admin, series).await, Some(0.0), "{series}");
    }
    // All slots are usable again: 8 concurrent requests are admitted without shedding.
    let mut all = Vec::new();
    for _ in 0..8 {
        all.push(spawn_get(tg.url("/other")));
    }
    for t in all {
        assert_eq!(t.await.unwrap().unwrap().0, StatusCode::OK);
    }
    assert!(app.hits.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_exported_as_gauges() {
    let app = ok_upstream().await;
    let tg = tidegate(
        app.addr,
        &[
            "--max-concurrency",
            "7",
            "--max-queue",
            "3",
            "--route",
            "/slow=2",
        ],
    )
    .await;
    assert_eq!(
        metric(tg.admin, "tidegate_concurrency_limit").await,
        Some(7.0)
    );
    assert_eq!(metric(tg.admin, "tidegate_queue_limit").await, Some(3.0));
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_route_concurrency_limit{route=\"/slow\"}"
        )
        .await,
        Some(2.0)
    );
}
