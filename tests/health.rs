//! The reserved lane: probes answered from cached state, even when everything else is stuck.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_fast_while_proxy_and_app_are_saturated() {
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "2",
            "--max-queue",
            "2",
            "--queue-timeout",
            "60s",
        ],
    )
    .await;
    tg.wait_ready().await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let url = tg.url("/held");
        held.push(tokio::spawn(async move { get(&url).await }));
    }
    gate.wait_arrived(2).await;
    eventually("queue full", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 2
    })
    .await;

    // A flood of extra connections and requests, all refused, keeps the proxy runtime busy.
    let stop = Arc::new(AtomicBool::new(false));
    let shed = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..64 {
        let (url, stop, shed) = (tg.url("/flood"), stop.clone(), shed.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok((StatusCode::SERVICE_UNAVAILABLE, _, _)) = get(&url).await {
                    shed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    eventually("flood under way", Duration::from_secs(5), || {
        shed.load(Ordering::SeqCst) > 200
    })
    .await;

    // Probe on a separate OS thread so the measurement is not the test runtime's own delay.
    let admin = tg.admin;
    let latencies = tokio::task::spawn_blocking(move || {
        let mut worst = Vec::new();
        for path in ["/livez", "/readyz", "/app/livez"] {
            let mut max = Duration::ZERO;
            for _ in 0..40 {
                let start = Instant::now();
                let status = probe_blocking(admin, path, Duration::from_secs(1));
                max = max.max(start.elapsed());
                assert_eq!(status, Ok(200), "{path}");
                std::thread::sleep(Duration::from_millis(5));
            }
            worst.push((path, max));
        }
        worst
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    for t in flood {
        t.await.unwrap();
    }
    // Queued behind the flood, a probe would wait for the held requests (never answered
    // here) and time out. The bound is half kubelet's default probe timeout (1 s), so
    // scheduling on a loaded machine does not decide it; typical times are far lower.
    eprintln!("slowest probe of 40 per path under the flood: {latencies:?}");
    for (path, max) in &latencies {
        assert!(
            *max < Duration::from_millis(500),
            "{path} took up to {max:?}"
        );
    }
    assert_eq!(gate.arrived(), 2, "the flood never reached the app");
    gate.release(4);
    for t in held {
        assert_eq!(t.await.unwrap().unwrap().0, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_app_fails_app_livez_after_the_window_and_recovers() {
    let hung = Arc::new(AtomicBool::new(false));
    let app = App::new().hang_while(hung.clone()).start().await;
    let tg = tidegate(
        app.addr,
        &[
            "--app-health-path",
            "/health",
            "--app-health-timeout",
            "200ms",
            "--progress-window",
            "1s",
        ],
    )
    .await;
    tg.wait_ready().await;
    assert_eq!(
        get(&tg.admin_url("/app/livez")).await.unwrap().0,
        StatusCode::OK
    );

    hung.store(true, Ordering::SeqCst);
    let hung_at = Instant::now();
    let url = tg.admin_url("/app/livez");
    eventually_async("/app/livez turns 503", Duration::from_secs(10), || {
        let url = url.clone();
        async move { get(&url).await.unwrap().0 == StatusCode::SERVICE_UNAVAILABLE }
    })
    .await;
    let took = hung_at.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "503 only after the 1s window, got {took:?}"
    );
    let (_, _, reason) = get(&url).await.unwrap();
    assert!(reason.contains("no progress"), "{reason}");
    // Readiness failed too (checks time out with no progress), and /livez is unaffected.
    assert_eq!(
        get(&tg.admin_url("/readyz")).await.unwrap().0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&tg.admin_url("/livez")).await.unwrap().0,
        StatusCode::OK
    );

    hung.store(false, Ordering::SeqCst);
    eventually_async("/app/livez back to 200", Duration::from_secs(10), || {
        let url = url.clone();
        async move { get(&url).await.unwrap().0 == StatusCode::OK }
    })
    .await;
    tg.wait_ready().await;
    assert!(
        metric(
            tg.admin,
            "tidegate_app_health_checks_total{result=\"fail\"}"
        )
        .await
        .unwrap()
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_but_progressing_app_stays_alive_and_ready() {
    // The health route never answers in time (every worker busy), but proxied work completes.
    let app = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/health" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Response::new(full("ok"))
    })
    .await;
    let tg = tidegate(
        app.addr,
        &[
            "--app-health-path",
            "/health",
            "--app-health-timeout",
            "200ms",
            "--progress-window",
            "1s",
            "--app-health-failure-threshold",
            "2",
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (url, stop) = (tg.url("/work"), stop.clone());
        tokio::spawn(async move {
            let mut done = 0;
            while !stop.load(Ordering::SeqCst) {
                if get(&url).await.unwrap().0 == StatusCode::OK {
                    done += 1;
                }
            }
            done
        })
    };
    // Ready without a passed check? No: readiness needs one pass. Here the health route never
    // answers, so the pod must not turn ready...
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        get(&tg.admin_url("/readyz")).await.unwrap().0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // ...but it is alive for as long as it keeps completing requests, well past the window.
    let admin = tg.admin;
    let stats = probe_for(admin, "/app/livez", Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    assert!(worker.await.unwrap() > 20);
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert!(stats.attempts >= 20, "{stats:?}");
    assert!(
        metric(
            tg.admin,
            "tidegate_app_health_checks_total{result=\"busy\"}"
        )
        .await
        .unwrap()
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_checks_do_not_fail_readiness_once_ready() {
    let slow_health = Arc::new(AtomicBool::new(false));
    let flag = slow_health.clone();
    let app = upstream(move |req: Request<Incoming>| {
        let flag = flag.clone();
        async move {
            if req.uri().path() == "/health" && flag.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Response::new(full("ok"))
        }
    })
    .await;
    let tg = tidegate(
        app.addr,
        &[
            "--app-health-path",
            "/health",
            "--app-health-timeout",
            "150ms",
        ],
    )
    .await;
    tg.wait_ready().await;
    slow_health.store(true, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (url, stop) = (tg.url("/work"), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                get(&url).await.unwrap();
            }
        })
    };
    let admin = tg.admin;
    let stats = probe_for(admin, "/readyz", Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    worker.await.unwrap();
    assert_eq!(stats.failures, 0, "{stats:?}");
    // Without progress the same slow checks do fail readiness.
    let url = tg.admin_url("/readyz");
    eventually_async(
        "unready once progress stops",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move { get(&url).await.unwrap().0 == StatusCode::SERVICE_UNAVAILABLE }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_app_passes_its_first_check() {
    let dir = scratch_dir("health");
    let path = dir.join("app.sock");
    let tg = tidegate(format!("unix:{}", path.display()), &[]).await;
    for _ in 0..5 {
        let (status, _, body) = get(&tg.admin_url("/readyz")).await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not passed a health check yet"), "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&tg.admin_url("/livez")).await.unwrap().0,
        StatusCode::OK
    );
    let _listener = tokio::net::UnixListener::bind(&path).unwrap();
    let appeared = Instant::now();
    tg.wait_ready().await;
    assert!(
        appeared.elapsed() < Duration::from_secs(2),
        "ready within the check interval"
    );
    assert_eq!(metric(tg.admin, "tidegate_app_healthy").await, Some(1.0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_unready_when_saturated_with_hysteresis() {
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &[
            "--max-concurrency",
            "1",
            "--max-queue",
            "4",
            "--queue-timeout",
            "60s",
            "--unready-when-saturated",
        ],
    )
    .await;
    tg.wait_ready().await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let url = tg.url("/q");
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    eventually("queue full", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 4
    })
    .await;
    let (status, _, body) = get(&tg.admin_url("/readyz")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("queue is full"), "{body}");
    // One request leaves the queue: 3 of 4 queued is above half, still unready (hysteresis).
    gate.release(1);
    eventually("3 queued", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 3
    })
    .await;
    assert_eq!(
        get(&tg.admin_url("/readyz")).await.unwrap().0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    gate.release(1);
    eventually("2 queued", Duration::from_secs(5), || {
        tg.metrics.admission.queued.get() == 2
    })
    .await;
    assert_eq!(
        get(&tg.admin_url("/readyz")).await.unwrap().0,
        StatusCode::OK
    );
    gate.release(10);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Slow clients that retry: each loops until `until`, retrying after 503s.
fn burst(
    url: String,
    clients: usize,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<(StatusCode, Duration)>>> {
    (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while Instant::now() < until {
                    let start = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(5), get(&url)).await {
                        Ok(Ok((status, _, _))) => seen.push((status, start.elapsed())),
                        _ => seen.push((StatusCode::REQUEST_TIMEOUT, start.elapsed())),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect()
}

/// The incident: slow requests saturate every worker; probes aimed at the app fail and a
/// kubelet would restart a healthy pod. Behind tidegate: zero probe failures, the fast route
/// is still served and the excess is refused quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_incident_reproduced_and_prevented() {
    const WORKERS: usize = 4;
    let slow = Duration::from_millis(1500);
    let period = Duration::from_millis(250);
    let probe_timeout = Duration::from_secs(1);

    // A WSGI-like app: WORKERS sync workers, `/slow` takes `slow`, the rest a few ms.
    let wsgi = App::new()
        .workers(WORKERS)
        .delay("/slow", slow)
        .default_delay(Duration::from_millis(5))
        .body("done");
    // Without tidegate: the burst hits the app directly and its health route starves.
    let bare = wsgi.clone().start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let prober = spawn_prober(bare.addr, "/health", period, probe_timeout, 3, stop.clone());
    let until = Instant::now() + Duration::from_secs(4);
    let clients = burst(format!("http://{}/slow", bare.addr), 24, until);
    for c in clients {
        c.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let bare_stats = tokio::task::spawn_blocking(move || prober.join().unwrap())
        .await
        .unwrap();
    assert!(
        bare_stats.restarts >= 1,
        "the baseline must reproduce the incident: {bare_stats:?}"
    );

    // With tidegate: at most WORKERS in flight, slow route capped below that.
    let app = wsgi.start().await;
    let tg = tidegate(
        app.addr,
        &[
            "--max-concurrency",
            "4",
            "--route",
            "/slow=3",
            "--max-queue",
            "8",
            "--queue-timeout",
            "200ms",
            "--app-health-path",
            "/health",
            "--progress-window",
            "10s",
        ],
    )
    .await;
    tg.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let probers: Vec<_> = ["/livez", "/readyz", "/app/livez"]
        .into_iter()
        .map(|path| spawn_prober(tg.admin, path, period, probe_timeout, 3, stop.clone()))
        .collect();
    let until = Instant::now() + Duration::from_secs(4);
    let slow_clients = burst(tg.url("/slow"), 24, until);
    let fast_clients = burst(tg.url("/fast"), 4, until);
    let mut slow_results = Vec::new();
    for c in slow_clients {
        slow_results.extend(c.await.unwrap());
    }
    let mut fast_results = Vec::new();
    for c in fast_clients {
        fast_results.extend(c.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let stats = tokio::task::spawn_blocking(move || {
        probers
            .into_iter()
            .map(|p| p.join().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for s in &stats {
        assert_eq!(s.failures, 0, "{stats:?}");
        assert!(s.attempts >= 10, "{stats:?}");
    }
    let fast_ok = fast_results
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .count();
    assert!(
        fast_ok * 100 >= fast_results.len() * 95,
        "fast route served: {fast_ok}/{}",
        fast_results.len()
    );
    let mut shed: Vec<Duration> = slow_results
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .map(|(_, d)| *d)
        .collect();
    assert!(!shed.is_empty(), "the excess must be shed");
    assert!(
        slow_results
            .iter()
            .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE)
    );
    shed.sort();
    let p99 = shed[(shed.len() * 99 / 100).min(shed.len() - 1)];
    assert!(
        p99 < Duration::from_millis(600),
        "shed p99 {p99:?} (queue timeout 200ms)"
    );
    assert!(
        slow_results.iter().any(|(s, _)| *s == StatusCode::OK),
        "slow goodput is not zero"
    );
}

/// `/livez` reflects the proxy runtime: when its workers are blocked, the heartbeat goes
/// stale and `/livez` fails, answered all the same by the admin lane; then it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_fails_when_the_proxy_runtime_is_stuck() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--heartbeat-timeout", "300ms"]).await;
    tg.wait_ready().await;
    let admin = tg.admin;
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut saw_503 = None;
        while Instant::now() < deadline {
            let start = Instant::now();
            let status = probe_blocking(admin, "/livez", Duration::from_secs(1));
            let took = start.elapsed();
            if status == Ok(503) {
                saw_503 = Some(took);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        saw_503
    });
    // Block both worker threads of the runtime tidegate runs on (this test's runtime).
    let blockers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async { std::thread::sleep(Duration::from_millis(1500)) }))
        .collect();
    for b in blockers {
        b.await.unwrap();
    }
    let answered_in = tokio::task::spawn_blocking(move || watcher.join().unwrap())
        .await
        .unwrap()
        .expect("/livez must fail while the proxy runtime is stuck");
    // Answered while the proxy runtime is still blocked (for 1.5 s), within half kubelet's
    // default probe timeout.
    assert!(
        answered_in < Duration::from_millis(500),
        "the admin lane still answers fast: {answered_in:?}"
    );
    let url = tg.admin_url("/livez");
    eventually_async("/livez recovers", Duration::from_secs(5), || {
        let url = url.clone();
        async move { get(&url).await.map(|r| r.0) == Ok(StatusCode::OK) }
    })
    .await;
}

/// Anyone who reaches the admin port can open connections and send nothing (or a head, slowly):
/// when the lane is full, the oldest idle one makes room, so kubelet's probes still get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_lock_probes_out() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    tg.wait_ready().await;
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(tg.admin).await.unwrap();
        if i % 2 == 0 {
            // Half of them start a request head and never finish it.
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /livez HTTP/1.1\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    for path in ["/livez", "/readyz", "/app/livez"] {
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(2), get(&tg.admin_url(path)))
            .await
            .expect("the probe was answered");
        assert_eq!(answer.unwrap().0, StatusCode::OK, "{path}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // The oldest of the flood were closed to make room.
    let closed = closed_within(&mut idle[0], Duration::from_secs(2)).await;
    assert!(closed < Duration::from_secs(2));
}
