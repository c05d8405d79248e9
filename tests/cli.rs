//! The binary's command line: clear one-line errors with exit code 2, environment variables.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, stderr) = run(args, &[]);
    assert_eq!(code, 2, "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.contains(needle),
        "{args:?} should name {needle}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_flag() {
    assert_one_line_error(&["--bogus"], "--bogus");
}

#[test]
fn bad_upstream_url() {
    assert_one_line_error(&["--upstream", "ftp://app:21"], "--upstream");
    assert_one_line_error(&["--upstream", "http://app:8000/path"], "--upstream");
}

#[test]
fn bad_duration_and_numbers() {
    assert_one_line_error(&["--shutdown-delay", "ten"], "--shutdown-delay");
    assert_one_line_error(&["--max-concurrency", "0"], "--max-concurrency");
    assert_one_line_error(&["--route", "slow=3"], "--route");
    assert_one_line_error(
        &["--max-concurrency", "2", "--route", "/slow=3"],
        "--route /slow=3",
    );
    assert_one_line_error(&["--app-health-path", "health"], "--app-health-path");
}

#[test]
fn port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_one_line_error(
        &["--listen", &addr, "--admin-listen", "127.0.0.1:0"],
        "--listen",
    );
    assert_one_line_error(
        &["--listen", "127.0.0.1:0", "--admin-listen", &addr],
        "--admin-listen",
    );
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--admin-listen",
        "--threads",
        "--upstream-http2",
        "--max-concurrency",
        "--max-queue",
        "--queue-timeout",
        "--route",
        "--shutdown-delay",
        "--drain-timeout",
        "--on-client-abort",
        "--log-format",
        "--access-log",
        "--app-health-path",
        "--progress-window",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(
        help.contains("TIDEGATE_MAX_CONCURRENCY"),
        "env vars are shown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_configure_and_flags_win() {
    let app = ok_upstream().await;
    let bin = Binary::start_with(
        &format!("http://{}", app.addr),
        &["--max-queue", "3"],
        &[],
        |cmd| {
            cmd.env("TIDEGATE_MAX_CONCURRENCY", "5")
                .env("TIDEGATE_MAX_QUEUE", "9");
        },
    );
    assert_eq!(
        metric(bin.admin, "tidegate_concurrency_limit").await,
        Some(5.0)
    );
    assert_eq!(
        metric(bin.admin, "tidegate_queue_limit").await,
        Some(3.0),
        "the flag beats the env var"
    );
    let (status, _, body) = get(&format!("http://{}/", bin.addr)).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
    // Access log lines are JSON with the request's fields.
    eventually("access log line", Duration::from_secs(5), || {
        bin.log().contains("\"status\":200")
    })
    .await;
}
