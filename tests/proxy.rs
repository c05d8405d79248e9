//! Core proxying over real sockets: protocols, headers, streaming, upgrades, failures.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_is_forwarded_with_forwarding_headers() {
    let app = App::new().echo_headers().start().await;
    let tg = tidegate(app.addr, &[]).await;
    let req = Request::get(tg.url("/hello?x=1"))
        .header("host", "public.example")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-custom", "kept")
        .body(empty())
        .unwrap();
    let (status, headers, body) = send(&client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "GET /hello?x=1");
    assert_eq!(headers["echo-host"], "public.example");
    assert_eq!(headers["echo-x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["echo-x-forwarded-proto"], "http");
    assert_eq!(headers["echo-x-forwarded-host"], "public.example");
    assert_eq!(headers["echo-x-custom"], "kept");
    assert!(!headers.contains_key("echo-via"), "Via is off by default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_is_added_when_asked() {
    let app = App::new().echo_headers().start().await;
    let tg = tidegate(app.addr, &["--via"]).await;
    let (_, headers, _) = get(&tg.url("/")).await.unwrap();
    assert_eq!(headers["echo-via"], "1.1 tidegate");
    assert_eq!(headers["via"], "1.1 tidegate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_reaches_http1_app_on_the_same_port() {
    let app = App::new().echo_headers().start().await;
    let tg = tidegate(app.addr, &[]).await;
    let req = Request::get(tg.url("/h2")).body(empty()).unwrap();
    let rsp = h2_client().request(req).await.unwrap();
    assert_eq!(rsp.version(), http::Version::HTTP_2);
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()["echo-version"], "HTTP/1.1");
    // HTTP/2 carries :authority, the HTTP/1.1 app gets it as Host.
    assert_eq!(rsp.headers()["echo-host"], tg.addr.to_string().as_str());
    // HTTP/1.1 on the same port still works.
    let (status, _, _) = get(&tg.url("/h1")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http2_speaks_h2c_to_the_app() {
    let app = App::new().echo_headers().start().await;
    let tg = tidegate(app.addr, &["--upstream-http2"]).await;
    let (status, headers, _) = get(&tg.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["echo-version"], "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let app = upstream(|req: Request<Incoming>| async move {
        let seen: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
        Response::builder()
            .header("connection", "x-app-hop")
            .header("x-app-hop", "must not reach the client")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-app-kept", "yes")
            .body(full(seen.join(",")))
            .unwrap()
    })
    .await;
    let tg = tidegate(app.addr, &[]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-client-hop\r\n\
              X-Client-Hop: secret\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\n\
              Proxy-Authorization: Basic Zm9v\r\nTE: trailers\r\nX-Client-Kept: yes\r\n\r\n",
        )
        .await
        .unwrap();
    let text = read_response(&mut stream).await;
    let lower = text.to_ascii_lowercase();
    let body = lower
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    for hop in [
        "x-client-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "connection",
    ] {
        assert!(!body.split(',').any(|h| h == hop), "app saw {hop}: {body}");
    }
    assert!(body.split(',').any(|h| h == "x-client-kept"), "{body}");
    assert!(
        body.split(',').any(|h| h == "te"),
        "TE: trailers is kept: {body}"
    );
    let head = lower.split("\r\n\r\n").next().unwrap();
    assert!(!head.contains("x-app-hop"), "{head}");
    assert!(!head.contains("keep-alive: timeout"), "{head}");
    assert!(!head.contains("proxy-connection"), "{head}");
    assert!(head.contains("x-app-kept: yes"), "{head}");
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw stream.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let text = String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no complete response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("read timed out")
            .unwrap();
        assert!(
            n > 0,
            "connection closed early: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let app = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Response::new(full(req.uri().path().to_owned()))
    })
    .await;
    let tg = tidegate(app.addr, &[]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /fast HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut all = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(all.contains("/slow") && all.contains("/fast")) {
        assert!(Instant::now() < deadline, "{all}");
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "{all}");
        all.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(
        all.find("/slow").unwrap() < all.find("/fast").unwrap(),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Name: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);
}

const CHUNK: usize = 1 << 20;

/// Upload in lockstep: the client sends chunk k+1 only after the app has received chunk k.
/// A proxy that buffered the request body would deadlock here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_streams_without_buffering() {
    const CHUNKS: u64 = 64;
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    let app = upstream(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    seen.fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            Response::new(full(seen.load(Ordering::SeqCst).to_string()))
        }
    })
    .await;
    let tg = tidegate(app.addr, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
    let body = BodyExt::boxed(StreamBody::new(channel_stream(rx)));
    let req = Request::post(tg.url("/upload")).body(body).unwrap();
    let pending = tokio::spawn(async move { send(&client(), req).await });
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    for k in 1..=CHUNKS {
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        let want = k * CHUNK as u64;
        eventually(
            "app received the chunk before the next was sent",
            Duration::from_secs(10),
            || received.load(Ordering::SeqCst) >= want,
        )
        .await;
    }
    drop(tx);
    let (status, _, body) = pending.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, (CHUNKS * CHUNK as u64).to_string());
}

/// Download in lockstep: the app sends chunk k+1 only after the client has received chunk k.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_streams_without_buffering() {
    const CHUNKS: u64 = 64;
    let delivered = Arc::new(AtomicU64::new(0));
    let seen = delivered.clone();
    let app = upstream(move |_req| {
        let seen = seen.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![9u8; CHUNK]);
                for k in 1..=CHUNKS {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                    let want = k * CHUNK as u64;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while seen.load(Ordering::SeqCst) < want {
                        if Instant::now() > deadline {
                            return; // the test fails on the short body
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(channel_stream(rx))))
        }
    })
    .await;
    let tg = tidegate(app.addr, &[]).await;
    let req = Request::get(tg.url("/download")).body(empty()).unwrap();
    let rsp = client().request(req).await.unwrap();
    let mut body = rsp.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            delivered.fetch_add(data.len() as u64, Ordering::SeqCst);
        }
    }
    assert_eq!(delivered.load(Ordering::SeqCst), CHUNKS * CHUNK as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_pass_through() {
    let app = upstream(|_req| async {
        let frames = vec![
            Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"payload"))),
            Ok(Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("x-checksum", "abc123".parse().unwrap());
                t
            })),
        ];
        Response::builder()
            .header("trailer", "x-checksum")
            .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
            .unwrap()
    })
    .await;
    for h2 in [false, true] {
        let tg = tidegate(app.addr, &[]).await;
        let req = Request::get(tg.url("/t"))
            .header("te", "trailers")
            .body(empty())
            .unwrap();
        let c = if h2 { h2_client() } else { client() };
        let rsp = c.request(req).await.unwrap();
        let collected = rsp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers must pass");
        assert_eq!(trailers["x-checksum"], "abc123", "h2={h2}");
        assert_eq!(collected.to_bytes(), "payload");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_tunnels_end_to_end() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    let app = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                // tidegate's TCP health checks connect too: only real handshakes echo.
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let tg = tidegate(app_addr, &["--max-concurrency", "4"]).await;
    let stream = TcpStream::connect(tg.addr).await.unwrap();
    let (mut ws, rsp) = tokio_tungstenite::client_async(format!("ws://{}/ws", tg.addr), stream)
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..5 {
        ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
            "hello {i}"
        )))
        .await
        .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    // The tunnel holds its slot while open.
    assert_eq!(tg.metrics.admission.in_flight.get(), 1);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    eventually("tunnel slot freed", Duration::from_secs(5), || {
        tg.metrics.admission.in_flight.get() == 0
    })
    .await;
    app.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_upstream() {
    let dir = scratch_dir("unix");
    let path = dir.join("app.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let app = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(full(format!(
                        "unix {}",
                        req.uri().path()
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let tg = tidegate(format!("unix:{}", path.display()), &[]).await;
    let (status, _, body) = get(&tg.url("/sock")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "unix /sock");
    tg.wait_ready().await;
    app.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_upstream_port_gives_502_fast() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tg = tidegate(format!("127.0.0.1:{port}"), &[]).await;
    let start = Instant::now();
    let (status, headers, _) = get(&tg.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["tidegate-error"], "upstream-connect");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let errors = metric(tg.admin, "tidegate_upstream_errors_total{kind=\"connect\"}").await;
    assert_eq!(errors, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_upstream_gives_504() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s); // accept, read nothing, answer nothing
        }
    });
    let tg = tidegate(addr, &["--upstream-timeout", "300ms"]).await;
    let start = Instant::now();
    let (status, headers, _) = get(&tg.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["tidegate-error"], "upstream-timeout");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(
        tg.metrics.admission.in_flight.get(),
        0,
        "a timed-out exchange frees its slot"
    );
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_gives_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s); // close without answering
        }
    });
    let tg = tidegate(addr, &[]).await;
    let (status, headers, _) = get(&tg.url("/")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["tidegate-error"], "upstream-reset");
    app.abort();
}

/// gunicorn's sync workers answer with `Connection: close` and close every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_every_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while find(&buf, b"\r\n\r\n").is_none() {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .await
                    .unwrap();
                let _ = s.shutdown().await;
            });
        }
    });
    let tg = tidegate(addr, &[]).await;
    let c = client();
    for i in 0..50 {
        let req = Request::get(tg.url(&format!("/{i}")))
            .body(empty())
            .unwrap();
        let (status, _, body) = send(&c, req).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    app.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_closes_slow_clients() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--header-read-timeout", "300ms"]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    let start = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the proxy must close a slowloris connection")
        .unwrap_or(0);
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);

    // A client that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(tg.addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("silent connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// A client that shuts down its sending side once its request is written (`nc`, some load
/// balancers and health checkers) is still answered, as nginx and HAProxy answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_is_answered() {
    let app = App::new()
        .body("answered")
        .default_delay(Duration::from_millis(200))
        .start()
        .await;
    let tg = tidegate(app.addr, &[]).await;
    for request in [
        "GET /slow HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
        "POST /slow HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\nhello".to_owned(),
    ] {
        let mut stream = TcpStream::connect(tg.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap(); // half-close: nothing more to send
        let mut text = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut text))
            .await
            .expect("the connection ends once answered")
            .unwrap();
        let text = String::from_utf8_lossy(&text);
        assert!(text.starts_with("HTTP/1.1 200"), "{request:?} got {text:?}");
        assert!(text.ends_with("answered"), "{text}");
    }
}

/// A half-close that cuts the body short is answered with a 400 naming the body, and the app
/// never gets a whole request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_a_half_close_is_a_400() {
    let app = App::new().echo_body_size().start().await;
    let tg = tidegate(app.addr, &[]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut text))
        .await
        .expect("answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&text).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 400"), "{text}");
    assert!(text.contains("tidegate-error: bad-body"), "{text}");
}

/// With `--on-client-abort cancel`, a client that shuts down its sending side has left (as
/// with HAProxy's `option abortonclose`): its upstream request is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cancel_a_half_closed_client_has_left() {
    let app = App::new()
        .default_delay(Duration::from_secs(30))
        .start()
        .await;
    let tg = tidegate(app.addr, &["--on-client-abort", "cancel"]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    eventually("request at the app", Duration::from_secs(10), || {
        app.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    stream.shutdown().await.unwrap();
    eventually("slot freed", Duration::from_secs(10), || {
        tg.metrics.admission.in_flight.get() == 0
    })
    .await;
    let mut text = Vec::new();
    stream.read_to_end(&mut text).await.unwrap();
    assert!(text.is_empty(), "{}", String::from_utf8_lossy(&text));
}

/// Default `--on-client-abort finish`: the app's exchange runs to its end, holding its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_finish_keeps_the_slot_until_the_app_is_done() {
    let gate = Gate::start().await;
    let tg = tidegate(gate.addr(), &["--max-concurrency", "1", "--max-queue", "0"]).await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET /work HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    gate.wait_arrived(1).await;
    drop(stream); // the client leaves

    // The app is still busy: the slot stays taken and new work is refused.
    tokio::time::sleep(Duration::from_millis(200)).await; // give a wrong implementation time to free it
    assert_eq!(tg.metrics.admission.in_flight.get(), 1);
    let (status, headers, _) = get(&tg.url("/other")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["tidegate-shed"], "queue-full");

    gate.release(1);
    eventually("app finished", Duration::from_secs(5), || {
        gate.finished.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually(
        "slot freed after the app finished",
        Duration::from_secs(5),
        || tg.metrics.admission.in_flight.get() == 0,
    )
    .await;
}

/// An endless response (SSE, a long poll) whose client left is finished in the background for
/// at most `--abandoned-timeout`, then cut: its slot comes back and the cut is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_endless_response_is_cut_after_the_abandoned_timeout() {
    let app = upstream(|_req| async move {
        let ticks = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let tick = Frame::data(Bytes::from_static(b"data: tick\n\n"));
            Some((Ok::<_, hyper::Error>(tick), ()))
        });
        Response::new(BodyExt::boxed(StreamBody::new(ticks)))
    })
    .await;
    let tg = tidegate(
        app.addr,
        &["--abandoned-timeout", "500ms", "--max-concurrency", "1"],
    )
    .await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("tick") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream); // the client leaves; the app would stream forever
    let upstream = &tg.metrics.upstream;
    eventually("the exchange abandoned", Duration::from_secs(10), || {
        upstream.abandoned.get() == 1
    })
    .await;
    eventually(
        "the slot back after the cut",
        Duration::from_secs(20),
        || tg.metrics.admission.in_flight.get() == 0,
    )
    .await;
    assert_eq!(upstream.abandoned.get(), 0);
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_abandoned_exchanges_total{outcome=\"cut\"}"
        )
        .await,
        Some(1.0)
    );
}

/// Starts a tidegate with no shutdown delay in front of `gate`, sends it one request over
/// HTTP/2, resets the stream once the app has it (the client leaving before the response
/// head), and starts the shutdown once tidegate finishes the exchange alone.
async fn abandon_then_shut_down(gate: &Gate, drain_timeout: &str) -> Tidegate {
    let tg = tidegate(
        gate.addr(),
        &["--shutdown-delay", "0s", "--drain-timeout", drain_timeout],
    )
    .await;
    let url = tg.url("/work");
    let client = tokio::spawn(async move {
        let client = h2_client();
        let _ = client.get(url.parse().unwrap()).await;
    });
    gate.wait_arrived(1).await;
    client.abort(); // drops the request: the stream is reset
    eventually("the exchange abandoned", Duration::from_secs(10), || {
        tg.metrics.upstream.abandoned.get() == 1
    })
    .await;
    assert!(tg.lifecycle.start_shutdown());
    eventually("draining", Duration::from_secs(10), || {
        matches!(
            tg.lifecycle.phase(),
            tidegate::Phase::Drain | tidegate::Phase::Exited
        )
    })
    .await;
    tg
}

/// The drain waits for exchanges whose client left: the app's work is not cut by the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_an_abandoned_exchange() {
    let gate = Gate::start().await;
    let mut tg = abandon_then_shut_down(&gate, "20s").await;
    // A drain that does not see the exchange is over at once: no connection is left.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut tg.task).await;
    assert!(early.is_err(), "the drain ended with the app still working");
    gate.release(1);
    let outcome = tokio::time::timeout(Duration::from_secs(20), &mut tg.task)
        .await
        .expect("the drain ends once the app is done")
        .unwrap();
    assert_eq!(outcome, tidegate::DrainOutcome::Complete);
    assert_eq!(gate.finished.load(Ordering::SeqCst), 1);
    assert_eq!(tg.metrics.upstream.abandoned_total[0].get(), 1, "finished");
}

/// An abandoned exchange still running at the drain timeout is reported as cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_exchange_at_the_drain_timeout_is_reported_cut() {
    let gate = Gate::start().await;
    let mut tg = abandon_then_shut_down(&gate, "300ms").await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), &mut tg.task)
        .await
        .expect("the drain times out")
        .unwrap();
    assert_eq!(
        outcome,
        tidegate::DrainOutcome::TimedOut {
            in_flight: 1,
            connections: 0
        }
    );
    gate.release(1);
}

/// `--on-client-abort cancel`: the upstream request is closed as soon as the client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abort_cancel_closes_the_upstream_request() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let app = upstream(move |_req| {
        let guard = OnDrop(flag.clone());
        async move {
            // hyper drops this future when the proxy closes the connection.
            tokio::time::sleep(Duration::from_secs(30)).await;
            std::mem::forget(guard);
            Response::new(full("late"))
        }
    })
    .await;
    let tg = tidegate(
        app.addr,
        &["--on-client-abort", "cancel", "--max-concurrency", "1"],
    )
    .await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(b"GET /work HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    eventually("request at the app", Duration::from_secs(5), || {
        app.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(tg.metrics.admission.in_flight.get(), 1);
    drop(stream);
    eventually("upstream request closed", Duration::from_secs(5), || {
        cancelled.load(Ordering::SeqCst)
    })
    .await;
    eventually("slot freed", Duration::from_secs(5), || {
        tg.metrics.admission.in_flight.get() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_code() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    for _ in 0..3 {
        get(&tg.url("/")).await.unwrap();
    }
    assert_eq!(
        metric(tg.admin, "tidegate_requests_total{code=\"200\"}").await,
        Some(3.0)
    );
    assert_eq!(
        metric(tg.admin, "tidegate_request_duration_seconds_count").await,
        Some(3.0)
    );
    assert_eq!(metric(tg.admin, "tidegate_in_flight").await, Some(0.0));
}
