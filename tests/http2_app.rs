//! An HTTP/2 app that refuses streams or goes away (`--upstream-http2`): what it did not
//! process is sent again, so a healthy app's refusals never reach clients as 502s.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use h2::Reason;
use http::{Method, Request, StatusCode};
use support::*;
use tokio::net::TcpListener;

/// What the h2c app does with the streams it is sent.
#[derive(Clone, Copy)]
enum Conduct {
    /// Refuses (`REFUSED_STREAM`) the first request to each path under `/once/`, and every
    /// request to paths under `/always/`; answers the rest.
    Refuse,
    /// Answers every request, and starts a graceful shutdown (`GOAWAY`) of each connection
    /// after this many streams.
    GoAwayAfter(usize),
}

/// An h2c app (the `h2` crate's server, which refuses streams and goes away on request)
/// answering each request with the size of its body.
struct H2App {
    addr: std::net::SocketAddr,
    /// Streams received, refused ones included.
    streams: Arc<AtomicUsize>,
    /// Streams refused.
    refused: Arc<AtomicUsize>,
}

impl H2App {
    async fn start(conduct: Conduct) -> H2App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (s, r) = (streams.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (s, r, seen) = (s.clone(), r.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    let mut on_this = 0;
                    while let Some(accepted) = conn.accept().await {
                        let Ok((request, mut respond)) = accepted else {
                            break;
                        };
                        s.fetch_add(1, Ordering::SeqCst);
                        on_this += 1;
                        let path = request.uri().path().to_owned();
                        let refuse = match conduct {
                            Conduct::Refuse => {
                                path.starts_with("/always/")
                                    || (path.starts_with("/once/")
                                        && seen.lock().unwrap().insert(path.clone()))
                            }
                            Conduct::GoAwayAfter(_) => false,
                        };
                        if refuse {
                            r.fetch_add(1, Ordering::SeqCst);
                            respond.send_reset(Reason::REFUSED_STREAM);
                            continue;
                        }
                        if let Conduct::GoAwayAfter(n) = conduct
                            && on_this == n
                        {
                            conn.graceful_shutdown();
                        }
                        tokio::spawn(answer_with_body_size(request, respond));
                    }
                });
            }
        });
        H2App {
            addr,
            streams,
            refused,
        }
    }
}

/// Reads the request body and answers `200` with its size.
async fn answer_with_body_size(
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let mut body = request.into_body();
    let mut size = 0;
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        size += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    let _ = send.send_data(Bytes::from(size.to_string()), true);
}

/// Sends `method` to `path` with a body of `size` bytes; the status and the body.
async fn call(tg: &Tidegate, method: Method, path: &str, size: usize) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(tg.url(path))
        .body(full(vec![b'x'; size]))
        .unwrap();
    let (status, _, body) = send(&client(), request).await.unwrap();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_sent_again_whatever_the_method() {
    let app = H2App::start(Conduct::Refuse).await;
    let tg = tidegate(app.addr, &["--upstream-http2"]).await;
    let cases = [
        (Method::GET, "/once/get", 0),
        (Method::POST, "/once/post", 1024),
        (Method::PATCH, "/once/patch", 64 * 1024),
    ];
    for (method, path, size) in cases {
        let (status, body) = call(&tg, method.clone(), path, size).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {body}");
        assert_eq!(body, size.to_string(), "the app got the whole body again");
    }
    assert_eq!(app.refused.load(Ordering::SeqCst), 3);
    assert_eq!(app.streams.load(Ordering::SeqCst), 6);
    assert_eq!(tg.metrics.upstream.upstream_replays.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_sent_again_once_and_only_with_a_body_within_the_bound() {
    let app = H2App::start(Conduct::Refuse).await;
    let tg = tidegate(app.addr, &["--upstream-http2"]).await;
    // Refused twice: sent again once, then the refusal is the answer.
    let (status, _) = call(&tg, Method::GET, "/always/get", 0).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.streams.load(Ordering::SeqCst), 2);
    // A body above --upstream-h2-retry-body (64 KiB) is not kept: its refusal is a 502.
    let (status, _) = call(&tg, Method::POST, "/once/big", 64 * 1024 + 1).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.streams.load(Ordering::SeqCst), 3);
    // The bound is a flag.
    let tg = tidegate(
        app.addr,
        &["--upstream-http2", "--upstream-h2-retry-body", "128KiB"],
    )
    .await;
    let (status, body) = call(&tg, Method::POST, "/once/bigger", 64 * 1024 + 1).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, (64 * 1024 + 1).to_string());
}

/// An app that shuts each connection down gracefully every 50 requests (like a server's
/// `max_requests`), under a burst from 16 clients: the
/// streams its `GOAWAY` left unprocessed are sent again on a new connection; no 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_going_away_under_a_burst_costs_no_request() {
    let app = H2App::start(Conduct::GoAwayAfter(50)).await;
    let tg = tidegate(app.addr, &["--upstream-http2"]).await;
    let tg = Arc::new(tg);
    let mut tasks = Vec::new();
    for client in 0..16 {
        let tg = tg.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..25 {
                let (method, size) = if (client + i) % 2 == 0 {
                    (Method::GET, 0)
                } else {
                    (Method::POST, 2048)
                };
                let (status, body) = call(&tg, method, &format!("/burst/{client}/{i}"), size).await;
                assert!(
                    status != StatusCode::OK || body == size.to_string(),
                    "{body}"
                );
                statuses.push(status);
            }
            statuses
        }));
    }
    let mut bad = Vec::new();
    for task in tasks {
        bad.extend(
            task.await
                .unwrap()
                .into_iter()
                .filter(|s| *s != StatusCode::OK),
        );
    }
    assert!(
        bad.is_empty(),
        "{} of 400 not answered 200: {bad:?}",
        bad.len()
    );
    assert!(
        app.streams.load(Ordering::SeqCst) >= 400,
        "every request reached the app"
    );
}
