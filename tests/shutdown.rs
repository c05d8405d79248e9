//! Graceful shutdown of the real binary, driven by real signals and the admin endpoints.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use nix::sys::signal::Signal;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `/slow` answers after `slow`, anything else at once.
async fn app(slow: Duration) -> Upstream {
    upstream(move |req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(slow).await;
        }
        Response::new(full(format!("done {}", req.uri().path())))
    })
    .await
}

/// Sends one request on `stream` and returns the response head (lower case) and body.
async fn request_on(stream: &mut TcpStream, path: &str) -> (String, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if text.len() >= end + 4 + len {
                return (head, text[end + 4..end + 4 + len].to_owned());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_serves_through_the_delay_then_drains_and_exits_0() {
    sigterm_walkthrough(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_thread_runtimes_drain_the_same_way() {
    // Every thread's listener clone must close after the delay, and connections accepted on
    // any thread must drain before the exit.
    sigterm_walkthrough(&["--threads", "3", "--runtime", "per-thread"]).await;
}

async fn sigterm_walkthrough(extra: &[&str]) {
    // The delay is long enough for the requests made during it on a loaded machine, and the
    // slow request outlasts it.
    let upstream = app(Duration::from_millis(4000)).await;
    let mut flags = vec!["--shutdown-delay", "2s", "--drain-timeout", "10s"];
    flags.extend_from_slice(extra);
    let mut bin = Binary::start(&format!("http://{}", upstream.addr), &flags);
    wait_admin_ready(bin.admin).await;
    let mut existing = TcpStream::connect(bin.addr).await.unwrap();
    let (head, _) = request_on(&mut existing, "/before").await;
    assert!(!head.contains("connection: close"), "{head}");
    let long = {
        let url = format!("http://{}/slow", bin.addr);
        tokio::spawn(async move { get(&url).await })
    };
    eventually("long request in flight", Duration::from_secs(5), || {
        upstream.hits.load(Ordering::SeqCst) >= 2
    })
    .await;

    // Watch /readyz from a dedicated thread so the flip is timed precisely.
    let admin = bin.admin;
    let signalled = Instant::now();
    bin.signal(Signal::SIGTERM);
    let flip = tokio::task::spawn_blocking(move || {
        loop {
            if probe_blocking(admin, "/readyz", Duration::from_secs(1)) == Ok(503) {
                return signalled.elapsed();
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(5),
                "readyz never flipped"
            );
        }
    })
    .await
    .unwrap();
    // Readiness must fail early in the delay, so balancers learn of it while it lasts.
    assert!(
        flip < Duration::from_secs(1),
        "/readyz flipped after {flip:?} of a 2 s delay"
    );
    assert_eq!(
        get(&format!("http://{}/livez", bin.admin)).await.unwrap().0,
        StatusCode::OK
    );

    // During the delay: existing and new connections are served, with Connection: close.
    let (head, body) = request_on(&mut existing, "/during-existing").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "done /during-existing");
    let mut fresh = TcpStream::connect(bin.addr).await.unwrap();
    let (head, _) = request_on(&mut fresh, "/during-new").await;
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: close"),
        "{head}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "still within the delay"
    );

    // After the delay: the listener is closed while the long request still drains.
    let addr = bin.addr;
    eventually_async(
        "new connections refused",
        Duration::from_secs(5),
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(
        bin.child.try_wait().unwrap().is_none(),
        "still draining the long request"
    );
    assert_eq!(
        get(&format!("http://{}/livez", bin.admin)).await.unwrap().0,
        StatusCode::OK
    );

    let (status, _, body) = long.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "done /slow"));
    let code = bin.exit_and_log(Duration::from_secs(10)).await;
    assert_eq!(code.0, 0, "{}", code.1);
    for phase in ["Shutdown: delay", "Shutdown: drain", "Shutdown: drained"] {
        assert!(code.1.contains(phase), "{phase} logged: {}", code.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_with_a_hung_request_exits_with_the_distinct_code() {
    let gate = Gate::start().await;
    let bin = Binary::start(
        &format!("http://{}", gate.addr()),
        &["--shutdown-delay", "0s", "--drain-timeout", "500ms"],
    );
    wait_admin_ready(bin.admin).await;
    let hung = {
        let url = format!("http://{}/hang", bin.addr);
        tokio::spawn(async move { get(&url).await })
    };
    gate.wait_arrived(1).await;
    bin.signal(Signal::SIGTERM);
    let (code, log) = bin.exit_and_log(Duration::from_secs(10)).await;
    assert_eq!(code, tidegate::EXIT_DRAIN_TIMEOUT, "{log}");
    assert!(log.contains("1 requests cut off"), "{log}");
    assert!(hung.await.unwrap().is_err(), "the hung request was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_skips_the_delay_and_sigquit_exits_at_once() {
    let upstream = ok_upstream().await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "60s"],
    );
    wait_admin_ready(bin.admin).await;
    bin.signal(Signal::SIGTERM);
    wait_admin_unready(bin.admin, "not ready", Duration::from_secs(5)).await;
    let start = Instant::now();
    bin.signal(Signal::SIGINT);
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "60s"],
    );
    wait_admin_ready(bin.admin).await;
    bin.signal(Signal::SIGQUIT);
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(code, 128 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestop_answers_only_after_the_drain() {
    let upstream = app(Duration::from_millis(1500)).await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "300ms", "--drain-timeout", "10s"],
    );
    wait_admin_ready(bin.admin).await;
    let long_done = Arc::new(AtomicBool::new(false));
    let long = {
        let (url, done) = (format!("http://{}/slow", bin.addr), long_done.clone());
        tokio::spawn(async move {
            let r = get(&url).await;
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    eventually("long request in flight", Duration::from_secs(5), || {
        upstream.hits.load(Ordering::SeqCst) >= 1
    })
    .await;
    let start = Instant::now();
    let (status, _, body) = get(&format!("http://{}/prestop", bin.admin)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "drained\n");
    assert!(
        long_done.load(Ordering::SeqCst),
        "prestop answered before the drain finished"
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(long.await.unwrap().unwrap().0, StatusCode::OK);
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_starts_shutdown_without_waiting() {
    let upstream = ok_upstream().await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "2s"],
    );
    wait_admin_ready(bin.admin).await;
    let req = Request::post(format!("http://{}/drain", bin.admin))
        .body(empty())
        .unwrap();
    let start = Instant::now();
    let (status, _, _) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    // Answered at once, not after the 2 s delay (`/prestop` is the one that waits).
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        get(&format!("http://{}/readyz", bin.admin))
            .await
            .unwrap()
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Idempotent.
    let req = Request::post(format!("http://{}/drain", bin.admin))
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), req).await.unwrap().0, StatusCode::ACCEPTED);
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_get_goaway_when_shutdown_starts() {
    let upstream = ok_upstream().await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "3s"],
    );
    wait_admin_ready(bin.admin).await;
    let stream = TcpStream::connect(bin.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://{}/", bin.addr))
        .body(empty())
        .unwrap();
    assert_eq!(
        sender.send_request(req).await.unwrap().status(),
        StatusCode::OK
    );
    let signalled = Instant::now();
    bin.signal(Signal::SIGTERM);
    // The server's GOAWAY ends the idle connection well within the 3 s delay.
    let result = tokio::time::timeout(Duration::from_secs(2), conn).await;
    assert!(result.is_ok(), "no GOAWAY within the delay");
    assert!(signalled.elapsed() < Duration::from_secs(2));
    // New connections are still served during the delay.
    assert_eq!(
        get(&format!("http://{}/", bin.addr)).await.unwrap().0,
        StatusCode::OK
    );
    bin.signal(Signal::SIGTERM);
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0);
}

/// A classic sidecar gets SIGTERM at the same moment the app's preStop calls /prestop; in
/// whichever order they arrive, the delay is kept (only a second *signal* skips it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestop_then_sigterm_keeps_the_delay() {
    let upstream = ok_upstream().await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "1500ms"],
    );
    wait_admin_ready(bin.admin).await;
    let start = Instant::now();
    let prestop = {
        let url = format!("http://{}/prestop", bin.admin);
        tokio::spawn(async move { get(&url).await })
    };
    wait_admin_unready(
        bin.admin,
        "shutdown started by /prestop",
        Duration::from_secs(5),
    )
    .await;
    bin.signal(Signal::SIGTERM);
    let (status, _, _) = prestop.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "the SIGTERM after /prestop skipped the delay: {:?}",
        start.elapsed()
    );
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0);
}

/// With `--admin-token`, /prestop and /drain need the bearer token (kubelet sends it from the
/// preStop hook's httpHeaders); probes and /metrics stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_protects_prestop_and_drain() {
    let upstream = ok_upstream().await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "200ms", "--admin-token", "s3cret-token"],
    );
    wait_admin_ready(bin.admin).await;
    let admin = bin.admin;
    let (status, headers, _) = get(&format!("http://{admin}/prestop")).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    for token in ["wrong", "s3cret-toke", "s3cret-token-"] {
        let req = Request::post(format!("http://{admin}/drain"))
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .unwrap();
        assert_eq!(
            send(&client(), req).await.unwrap().0,
            StatusCode::UNAUTHORIZED,
            "{token}"
        );
    }
    // Nothing was started: still ready; probes and metrics need no token.
    assert_eq!(
        get(&format!("http://{admin}/readyz")).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{admin}/metrics")).await.unwrap().0,
        StatusCode::OK
    );
    assert!(
        !bin.log().contains("s3cret-token"),
        "the token is never logged"
    );

    let req = Request::get(format!("http://{admin}/prestop"))
        .header("authorization", "Bearer s3cret-token")
        .body(empty())
        .unwrap();
    let (status, _, body) = send(&client(), req).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "drained\n"));
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0);
}

/// A connection that has sent nothing when the drain starts holds no request: it is closed at
/// once, and the drain completes (exit 0) long before `--header-read-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_sent_nothing_close_when_the_drain_starts() {
    let upstream = ok_upstream().await;
    let mut bin = Binary::start(
        &format!("http://{}", upstream.addr),
        &[
            "--shutdown-delay",
            "0s",
            "--drain-timeout",
            "2s",
            "--header-read-timeout",
            "60s",
        ],
    );
    wait_admin_ready(bin.admin).await;
    let mut silent = TcpStream::connect(bin.addr).await.unwrap();
    // It is being served (accepted and waiting for bytes) before the drain starts.
    eventually_async(
        "the silent connection is open",
        Duration::from_secs(5),
        || {
            let admin = bin.admin;
            async move { metric(admin, "tidegate_connections_open").await == Some(1.0) }
        },
    )
    .await;
    let signalled = Instant::now();
    bin.signal(Signal::SIGTERM);
    let closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(closed < Duration::from_secs(1), "closed after {closed:?}");
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, 0, "the drain completed");
    assert!(signalled.elapsed() < Duration::from_secs(2));
}
