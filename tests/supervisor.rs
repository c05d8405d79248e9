//! Supervisor mode: tidegate runs the app as its child, as the container's PID 1 would.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::Signal;
use support::*;

fn scratch(name: &str) -> PathBuf {
    scratch_dir(&format!("sup-{name}"))
}

fn fixture() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/child_app.py").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_gets_sigterm_only_after_the_drain_and_its_exit_code_passes_through() {
    let port = free_port();
    let dir = scratch("order");
    let marker = dir.join("marker");
    let port_s = port.to_string();
    let marker_s = marker.display().to_string();
    let fixture = fixture();
    let bin = Binary::start_with(
        &format!("http://127.0.0.1:{port}"),
        &[
            "--shutdown-delay",
            "800ms",
            "--drain-timeout",
            "10s",
            "--app-health-path",
            "/health",
        ],
        &["python3", &fixture, &port_s, &marker_s, "7"],
        |_| {},
    );
    wait_admin_ready(bin.admin).await;
    let (status, _, body) = get(&format!("http://{}/hello", bin.addr)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("child "), "{body}");

    // A request in flight when shutdown starts must be answered by the still-running child.
    let long = {
        let url = format!("http://{}/slow", bin.addr);
        tokio::spawn(async move { get(&url).await })
    };
    let admin = bin.admin;
    eventually_async(
        "the slow request at the child",
        Duration::from_secs(10),
        || async move { metric(admin, "tidegate_in_flight").await == Some(1.0) },
    )
    .await;
    bin.signal(Signal::SIGTERM);
    wait_admin_unready(bin.admin, "not ready", Duration::from_secs(2)).await;
    // Still in the delay: the child has not been signalled and still serves.
    assert!(!marker.exists(), "the child got SIGTERM before the drain");
    assert_eq!(
        get(&format!("http://{}/during", bin.addr)).await.unwrap().0,
        StatusCode::OK
    );

    let (status, _, body) = long.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (code, log) = bin.exit_and_log(Duration::from_secs(20)).await;
    assert_eq!(code, 7, "the child's exit code passes through: {log}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "TERM\n");
    let drained = log.find("Shutdown: drained").expect("drained logged");
    let term = log
        .find("Sending SIGTERM to the app")
        .expect("SIGTERM logged");
    assert!(drained < term, "SIGTERM only after the drain:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_grandchild_is_reaped() {
    let dir = scratch("orphan");
    let pidfile = dir.join("orphan.pid");
    // The subshell starts `sleep` in the background and exits: `sleep` is orphaned and comes
    // to tidegate (the subreaper); when it exits it must be reaped, not left a zombie.
    let script = format!(
        "(sleep 1 & echo $! > {}) ; exec sleep 30",
        pidfile.display()
    );
    let upstream = ok_upstream().await;
    let mut bin = Binary::start_with(
        &format!("http://{}", upstream.addr),
        &["--shutdown-delay", "0s"],
        &["sh", "-c", &script],
        |_| {},
    );
    eventually("orphan pid written", Duration::from_secs(5), || {
        std::fs::read_to_string(&pidfile)
            .map(|s| s.trim().parse::<i32>().is_ok())
            .unwrap_or(false)
    })
    .await;
    let orphan: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = format!("/proc/{orphan}/stat");
    let tidegate_pid = bin.pid();
    eventually(
        "the orphan is re-parented to tidegate, the subreaper",
        Duration::from_secs(5),
        || {
            let text = std::fs::read_to_string(&stat).expect("orphan still running");
            let ppid = text
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1));
            ppid == Some(tidegate_pid.to_string().as_str())
        },
    )
    .await;
    eventually(
        "orphan exited and was reaped (no zombie left)",
        Duration::from_secs(10),
        || {
            match std::fs::read_to_string(&stat) {
                Err(_) => true,
                Ok(text) => {
                    // Field 3 is the state; it must not stay Z.
                    let state = text
                        .rsplit(')')
                        .next()
                        .and_then(|rest| rest.split_whitespace().next());
                    assert_ne!(state, None);
                    false
                }
            }
        },
    )
    .await;
    bin.signal(Signal::SIGTERM);
    let code = tokio::task::spawn_blocking(move || bin.wait_exit(Duration::from_secs(20)))
        .await
        .unwrap();
    // `sleep 30` dies of SIGTERM: 128 + 15.
    assert_eq!(code, 143);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child that dies on its own takes the pod out of service: readiness fails at once (the
/// delay is skipped: nothing is left to serve), the request in flight to the app is still
/// answered by the drain, and tidegate exits with the child's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_dying_on_its_own_fails_readiness_and_exits_with_its_code() {
    let gate = Gate::start().await;
    let dir = scratch("dies");
    let go = dir.join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 5",
        go.display()
    );
    let bin = Binary::start_with(
        &format!("http://{}", gate.addr()),
        &["--shutdown-delay", "30s", "--drain-timeout", "20s"],
        &["sh", "-c", &script],
        |_| {},
    );
    wait_admin_ready(bin.admin).await;
    let held = {
        let url = format!("http://{}/held", bin.addr);
        tokio::spawn(async move { get(&url).await })
    };
    gate.wait_arrived(1).await;
    let start = Instant::now();
    std::fs::write(&go, "").unwrap(); // the child exits
    wait_admin_unready(bin.admin, "readiness failing", Duration::from_secs(10)).await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the 30 s delay is skipped for a dead app"
    );
    gate.release(1);
    let (status, _, body) = held.await.unwrap().unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the request in flight is answered: {body}"
    );
    let (code, log) = bin.exit_and_log(Duration::from_secs(20)).await;
    assert_eq!(code, 5, "{log}");
    assert!(log.contains("App exited on its own"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_command_exits_127() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--",
            "/nonexistent/app",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/app"), "{stderr}");
}

/// tidegate with `flags` supervising the fixture in its `ignore` mode (a child that notes each
/// SIGTERM in its marker file and keeps running); returns the binary, its scratch directory,
/// the marker file and the child's port.
async fn start_stuck_child(name: &str, flags: &[&str]) -> (Binary, PathBuf, PathBuf, u16) {
    let port = free_port();
    let dir = scratch(name);
    let marker = dir.join("marker");
    let (port_s, marker_s, fixture) = (port.to_string(), marker.display().to_string(), fixture());
    let bin = Binary::start_with(
        &format!("http://127.0.0.1:{port}"),
        flags,
        &["python3", &fixture, &port_s, &marker_s, "ignore"],
        |_| {},
    );
    wait_admin_ready(bin.admin).await;
    (bin, dir, marker, port)
}

/// An app that ignores SIGTERM is killed after `--child-stop-timeout`, and tidegate exits
/// with its status (128 + 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let (bin, dir, marker, _) = start_stuck_child(
        "stuck",
        &["--shutdown-delay", "0s", "--child-stop-timeout", "1s"],
    )
    .await;
    bin.signal(Signal::SIGTERM);
    let started = Instant::now();
    let (code, log) = bin.exit_and_log(Duration::from_secs(20)).await;
    assert_eq!(code, 128 + 9, "killed: {log}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "TERM\n", "{log}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the stop timeout"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A third signal exits at once (128 + the signal), delay or not, and takes the child down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_signal_exits_at_once_and_the_child_goes_with_it() {
    let (bin, dir, _, port) = start_stuck_child("third", &["--shutdown-delay", "60s"]).await;
    let child_url = format!("http://127.0.0.1:{port}/direct");
    assert_eq!(get(&child_url).await.unwrap().0, StatusCode::OK);
    let started = Instant::now();
    // Each signal handled before the next (the count is of signals received); the third
    // comes while tidegate waits for the child, which ignores SIGTERM.
    for logged in ["Shutdown requested", "Sending SIGTERM to the app"] {
        bin.signal(Signal::SIGTERM);
        eventually(logged, Duration::from_secs(10), || {
            bin.log().contains(logged)
        })
        .await;
    }
    bin.signal(Signal::SIGTERM);
    let (code, log) = bin.exit_and_log(Duration::from_secs(10)).await;
    assert_eq!(code, 128 + 15, "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not the 60 s delay"
    );
    // The child was killed with it: it no longer answers.
    eventually_async("the child is gone", Duration::from_secs(5), || {
        let url = child_url.clone();
        async move { get(&url).await.is_err() }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
