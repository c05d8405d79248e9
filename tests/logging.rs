//! Logging never blocks traffic: with stderr going to a pipe nobody reads, requests are still
//! served, the lines that do not fit are dropped and counted, and the process still exits.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;

const CLIENTS: usize = 32;
const REQUESTS_EACH: usize = 320;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_stalls_nothing() {
    let app = ok_upstream().await;
    let (port, admin_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let admin_listen = format!("127.0.0.1:{admin_port}");
    // The access log is on by default: a line per request, to a pipe that fills at 64 KiB.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["--listen", &listen, "--admin-listen", &admin_listen])
        .args(["--upstream", &format!("http://{}", app.addr)])
        .args(["--shutdown-delay", "0s", "--drain-timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Held open, never read.
    let _unread = child.stderr.take().unwrap();
    let admin: std::net::SocketAddr = admin_listen.parse().unwrap();
    wait_admin_ready(admin).await;

    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = format!("http://{listen}/");
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..REQUESTS_EACH {
                    match tokio::time::timeout(Duration::from_secs(5), get(&url)).await {
                        Ok(Ok((StatusCode::OK, _, _))) => ok += 1,
                        other => panic!("a request was not served: {other:?}"),
                    }
                }
                ok
            })
        })
        .collect();
    let mut served = 0;
    for client in clients {
        served += client.await.unwrap();
    }
    assert_eq!(served, CLIENTS * REQUESTS_EACH);
    let dropped = metric(admin, "tidegate_log_lines_dropped_total")
        .await
        .unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "{served} requests in {:?}: the pipe should have filled and lines been dropped",
        start.elapsed()
    );

    // The exit still happens: the queued lines get about a second to be written, not forever.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tidegate did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}
