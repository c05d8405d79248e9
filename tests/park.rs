//! Parked connections (`--park-idle-after`): an idle HTTP/1.1 keep-alive connection gives up
//! hyper's buffers but keeps its socket, and is served again from its next byte, with nothing
//! lost: split heads, pipelined requests and bytes read while the previous request was in
//! flight. The idle timeout and the drain still close it.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"GET /free HTTP/1.1\r\nHost: a\r\n\r\n";

fn parked(tg: &Tidegate) -> i64 {
    tg.metrics.connections.connections_parked.get()
}

fn parks(tg: &Tidegate) -> u64 {
    tg.metrics.connections.connection_parks.get()
}

/// Waits until the parked-connections gauge reads `n`.
async fn wait_parked(tg: &Tidegate, n: i64) {
    eventually(
        &format!("{n} parked connections"),
        Duration::from_secs(10),
        || parked(tg) == n,
    )
    .await;
}

/// Reads from `stream` until `count` complete responses (small, with `Content-Length`) have
/// arrived; returns their status codes.
async fn read_responses(stream: &mut TcpStream, count: usize) -> Vec<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let done = statuses(&text);
        if done.len() >= count && responses_complete(&text, count) {
            return done;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{count} responses expected, got: {text:?}"))
            .unwrap();
        assert!(n > 0, "closed after: {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Whether `text` holds `count` whole responses: each head's `content-length` bytes follow it.
fn responses_complete(text: &str, count: usize) -> bool {
    let mut rest = text;
    for _ in 0..count {
        let Some(end) = rest.find("\r\n\r\n") else {
            return false;
        };
        let head = rest[..end].to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let body_start = end + 4;
        if rest.len() < body_start + length {
            return false;
        }
        rest = &rest[body_start + length..];
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_served_again_on_the_same_socket() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--park-idle-after", "50ms"]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    for round in 1..=3 {
        stream.write_all(REQUEST).await.unwrap();
        assert_eq!(read_responses(&mut stream, 1).await, [200], "round {round}");
        wait_parked(&tg, 1).await;
        assert_eq!(parks(&tg), round);
    }
    // A head split in two, with a pause in between: the first half wakes the connection, the
    // second completes the head.
    stream.write_all(&REQUEST[..10]).await.unwrap();
    wait_parked(&tg, 0).await;
    stream.write_all(&REQUEST[10..]).await.unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    wait_parked(&tg, 1).await;
    // Three pipelined requests in one write wake it once and get three answers.
    stream.write_all(&REQUEST.repeat(3)).await.unwrap();
    assert_eq!(read_responses(&mut stream, 3).await, [200, 200, 200]);
    assert_eq!(app.hits.load(Ordering::SeqCst), 7);
    assert_eq!(
        metric(tg.admin, "tidegate_connections_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(tg.admin, "tidegate_connections_open").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_head_hyper_has_buffered_survives_parking() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--park-idle-after", "50ms"]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    // One request and the start of the next in one write: hyper reads both, answers the first
    // and keeps the partial head in its buffer, waiting for the rest.
    let mut bytes = REQUEST.to_vec();
    bytes.extend_from_slice(&REQUEST[..10]);
    stream.write_all(&bytes).await.unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    // The connection is idle as far as requests go. Parking it ends hyper's connection, and
    // the buffered bytes go to the next one, which completes the head with the rest.
    eventually("a park", Duration::from_secs(10), || parks(&tg) >= 1).await;
    stream.write_all(&REQUEST[10..]).await.unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    assert_eq!(app.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_request_had_a_body_is_not_parked() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--park-idle-after", "50ms"]).await;
    let mut with_body = TcpStream::connect(tg.addr).await.unwrap();
    with_body
        .write_all(b"POST /free HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(read_responses(&mut with_body, 1).await, [200]);
    // A second connection, idle from later on, gets parked: by then the first would have been
    // parked too if it could be.
    let mut without = TcpStream::connect(tg.addr).await.unwrap();
    without.write_all(REQUEST).await.unwrap();
    assert_eq!(read_responses(&mut without, 1).await, [200]);
    wait_parked(&tg, 1).await;
    assert_eq!(parks(&tg), 1);
    // Both keep serving.
    with_body.write_all(REQUEST).await.unwrap();
    assert_eq!(read_responses(&mut with_body, 1).await, [200]);
    without.write_all(REQUEST).await.unwrap();
    assert_eq!(read_responses(&mut without, 1).await, [200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_still_close_when_idle_too_long_and_at_the_drain() {
    let app = ok_upstream().await;
    let tg = tidegate(
        app.addr,
        &[
            "--park-idle-after",
            "0s",
            "--idle-timeout",
            "600ms",
            "--shutdown-delay",
            "0s",
        ],
    )
    .await;
    let mut idle = TcpStream::connect(tg.addr).await.unwrap();
    idle.write_all(REQUEST).await.unwrap();
    assert_eq!(read_responses(&mut idle, 1).await, [200]);
    let after = closed_within(&mut idle, Duration::from_secs(10)).await;
    assert!(
        after >= Duration::from_millis(500),
        "closed after {after:?}"
    );
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_connections_timed_out_total{reason=\"idle\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(parks(&tg), 1);

    let mut draining = TcpStream::connect(tg.addr).await.unwrap();
    draining.write_all(REQUEST).await.unwrap();
    assert_eq!(read_responses(&mut draining, 1).await, [200]);
    wait_parked(&tg, 1).await;
    tg.lifecycle.start_shutdown();
    let after = closed_within(&mut draining, Duration::from_secs(5)).await;
    assert!(after < Duration::from_millis(500), "closed after {after:?}");
    assert_eq!(parked(&tg), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_exchange_closes_is_closed_not_parked() {
    const BIG: usize = 4 << 20;
    let app = upstream(|_req| async { http::Response::new(full(vec![b'x'; BIG])) }).await;
    let tg = tidegate(
        app.addr,
        &["--park-idle-after", "0s", "--shutdown-delay", "30s"],
    )
    .await;
    // Closed by the client's request, by HTTP/1.0, and by tidegate's own `Connection: close`
    // on responses during the shutdown delay.
    for (head, shutting_down) in [
        (
            "GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            false,
        ),
        ("GET /big HTTP/1.0\r\n\r\n", false),
        ("GET /big HTTP/1.1\r\nHost: a\r\n\r\n", true),
    ] {
        if shutting_down {
            tg.lifecycle.start_shutdown();
        }
        let mut stream = TcpStream::connect(tg.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        // A slow reader: hyper is still writing the body long after it has taken all of it
        // from the app, so the connection looks idle for a while before hyper closes it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut received = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no EOF after {received} bytes ({head:?})"))
                .unwrap();
            if n == 0 {
                break;
            }
            received += n;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(received > BIG, "{received} bytes ({head:?})");
    }
    assert_eq!(parks(&tg), 0);
}
