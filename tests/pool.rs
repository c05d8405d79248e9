//! The pool of connections to the app: one connection serves request after request; an idle
//! one closes after `--upstream-idle-timeout`; one whose exchange did not end cleanly is
//! closed, not reused; one the app closes after its response is never picked again; and
//! HTTP/2 shares one connection even when a burst arrives before it is open.
//!
//! Most tests run on tokio's single-threaded test runtime, where tidegate, the app and the
//! client take turns: which connection a request gets is then decided by tidegate's logic
//! alone, not by which thread ran first.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// An app whose `/stream` sends `start`, then a `tick` every 20 ms until `release` is
/// notified (then `end`), or for at most 10 s; anything else gets `ok`.
async fn streaming_app(release: Arc<Notify>) -> Upstream {
    upstream(move |req: Request<Incoming>| {
        let release = release.clone();
        async move {
            if req.uri().path() != "/stream" {
                return Response::new(full("ok"));
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            tokio::spawn(async move {
                let chunk =
                    |text: &'static str| Ok(Frame::data(Bytes::from_static(text.as_bytes())));
                if tx.send(chunk("start")).await.is_err() {
                    return;
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    tokio::select! {
                        _ = release.notified() => {
                            let _ = tx.send(chunk("end")).await;
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {
                            if tokio::time::Instant::now() > deadline
                                || tx.send(chunk("tick")).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
            Response::new(StreamBody::new(channel_stream(rx)).boxed())
        }
    })
    .await
}

/// Sends `GET /stream` on a raw connection, waits for the first chunk, then closes it.
async fn abandon_stream(tg: &Tidegate) {
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("start") {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the first chunk within 10 s")
            .unwrap();
        assert!(n > 0, "closed before the first chunk: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
}

async fn get_ok(url: &str) {
    let (status, _, body) = get(url).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
}

#[tokio::test]
async fn sequential_requests_share_one_app_connection() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    let client = client();
    for _ in 0..20 {
        let req = Request::get(tg.url("/")).body(empty()).unwrap();
        let (status, _, _) = send(&client, req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(app.hits.load(Ordering::SeqCst), 20);
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        1,
        "one app connection"
    );
}

#[tokio::test]
async fn an_idle_app_connection_closes_after_the_upstream_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(300);
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--upstream-idle-timeout", "300ms"]).await;
    get_ok(&tg.url("/")).await;
    let idle_since = Instant::now();
    eventually(
        "the idle app connection closed",
        Duration::from_secs(10),
        || app.connections_ended.load(Ordering::SeqCst) == 1,
    )
    .await;
    assert!(
        idle_since.elapsed() >= IDLE,
        "closed after {:?}, before the idle timeout",
        idle_since.elapsed()
    );
    get_ok(&tg.url("/")).await;
    assert_eq!(app.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_zero_idle_timeout_opens_a_connection_per_request() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--upstream-idle-timeout", "0s"]).await;
    for _ in 0..5 {
        get_ok(&tg.url("/")).await;
    }
    assert_eq!(app.connections.load(Ordering::SeqCst), 5);
    eventually(
        "every app connection closed",
        Duration::from_secs(10),
        || app.connections_ended.load(Ordering::SeqCst) == 5,
    )
    .await;
}

/// An app that closes its socket right after each response, without `Connection: close`:
/// tidegate sees the close and opens a new connection for the next request, so no client gets
/// a 502 for a connection that was dead when it was picked.
#[tokio::test]
async fn a_connection_the_app_closed_after_its_response_is_not_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let app = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // Counted once a request came: tidegate's TCP health checks send none.
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Dropped: closed with no warning in the response.
            });
        }
    });
    let tg = tidegate(addr, &[]).await;
    let client = client();
    for i in 0..30 {
        let req = Request::get(tg.url("/")).body(empty()).unwrap();
        let (status, _, body) = send(&client, req).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 30);
    app.abort();
}

#[tokio::test]
async fn an_abandoned_response_closes_its_app_connection_with_cancel() {
    let app = streaming_app(Arc::new(Notify::new())).await;
    let tg = tidegate(app.addr, &["--on-client-abort", "cancel"]).await;
    abandon_stream(&tg).await;
    eventually("the app connection closed", Duration::from_secs(10), || {
        app.connections_ended.load(Ordering::SeqCst) == 1
    })
    .await;
    get_ok(&tg.url("/")).await;
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        2,
        "a new connection"
    );
}

#[tokio::test]
async fn a_response_finished_in_the_background_gives_its_connection_back() {
    let release = Arc::new(Notify::new());
    let app = streaming_app(release.clone()).await;
    let tg = tidegate(app.addr, &["--on-client-abort", "finish"]).await;
    abandon_stream(&tg).await;
    // The client's connection is gone, so the rest of the body is being read in the
    // background; let the app finish it.
    eventually(
        "the client connection closed",
        Duration::from_secs(10),
        || tg.metrics.connections_open.get() == 0,
    )
    .await;
    assert_eq!(
        tg.metrics.in_flight.get(),
        1,
        "the exchange still holds its slot"
    );
    release.notify_one();
    eventually("the exchange finished", Duration::from_secs(10), || {
        tg.metrics.in_flight.get() == 0
    })
    .await;
    get_ok(&tg.url("/")).await;
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        1,
        "the same connection"
    );
    assert_eq!(app.connections_ended.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_the_app_shares_one_connection_from_the_first_burst() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--upstream-http2"]).await;
    let client = client();
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            let req = Request::get(tg.url("/")).body(empty()).unwrap();
            tokio::spawn(async move { send(&client, req).await })
        })
        .collect();
    for request in burst {
        let (status, _, _) = request.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(app.hits.load(Ordering::SeqCst), 16);
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        1,
        "one HTTP/2 connection"
    );
}
