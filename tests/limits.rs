//! Request and connection limits over real sockets: 431, 414, 413 (global and per route),
//! `--max-connections`, the idle and head timeouts, HTTP/2 stream limits and rapid-reset
//! protection, and the admin allow-list.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn rejected(tg: &Tidegate, reason: &str) -> Option<f64> {
    metric(
        tg.admin,
        &format!("tidegate_requests_rejected_total{{reason=\"{reason}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_long_targets_414() {
    let app = ok_upstream().await;
    let tg = tidegate(
        app.addr,
        &[
            "--max-header-bytes",
            "4KiB",
            "--max-headers",
            "10",
            "--max-uri-bytes",
            "1KiB",
        ],
    )
    .await;

    // HTTP/1.1: hyper enforces the head size and the field count.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(5000)
    );
    let (text, closed) = raw_exchange(tg.addr, big.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(statuses(&text), [431], "{text}");
    assert!(closed);
    let many: String = (0..12).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    let (text, _) = raw_exchange(tg.addr, many.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(statuses(&text), [431], "{text}");

    // The target: 414 from tidegate, with the limit named.
    let long = format!("/{}", "p".repeat(1100));
    let (status, headers, _) = get(&tg.url(&long)).await.unwrap();
    assert_eq!(status, StatusCode::URI_TOO_LONG);
    assert_eq!(headers["tidegate-error"], "uri-too-long");
    assert_eq!(headers["connection"], "close");

    // HTTP/2: the field count is checked by tidegate, the list size by the h2 codec.
    let h2 = h2_client();
    let mut req = Request::get(tg.url("/")).body(empty()).unwrap();
    for i in 0..12 {
        req.headers_mut().insert(
            format!("x-{i}").parse::<http::HeaderName>().unwrap(),
            "v".parse().unwrap(),
        );
    }
    let (status, headers, _) = send(&h2, req).await.unwrap();
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(headers["tidegate-error"], "too-many-headers");
    let req = Request::get(tg.url("/"))
        .header("x-big", "b".repeat(5000))
        .body(empty())
        .unwrap();
    match send(&h2, req).await {
        Ok((status, _, _)) => assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        // The h2 codec may refuse the stream instead of answering it.
        Err(error) => assert!(
            error.contains("REFUSED") || error.contains("PROTOCOL"),
            "{error}"
        ),
    }

    // Within the limits everything passes, and nothing refused reached the app.
    let (status, _, _) = get(&tg.url("/fine")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);
    assert_eq!(rejected(&tg, "uri-too-long").await, Some(1.0));
    assert_eq!(rejected(&tg, "too-many-headers").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_get_413_globally_and_per_route() {
    let app = App::new().echo_body_size().start().await;
    let file = scratch_file(
        "tidegate.toml",
        "max_request_body = \"1KiB\"\n\n[[route]]\nprefix = \"/upload\"\nmax_request_body = \"64KiB\"\n",
    );
    let tg = tidegate(app.addr, &["--config", file.to_str().unwrap()]).await;
    let client = client();
    let post = |path: &str, body: Body| Request::post(tg.url(path)).body(body).unwrap();

    // Declared too large: refused before admission, the app never hears of it.
    let (status, headers, _) = send(&client, post("/small", full(vec![b'x'; 2000])))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers["tidegate-error"], "body-too-large");
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);

    // Streamed (chunked) past the limit: cut as it streams, still a 413.
    let chunks = (0..8).map(|_| Ok::<_, hyper::Error>(Frame::data(Bytes::from(vec![b'y'; 256]))));
    let streamed = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
    let (status, _, _) = send(&client, post("/small", streamed)).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // The route's own limit applies to it, both ways.
    let (status, _, body) = send(&client, post("/upload/a", full(vec![b'z'; 50_000])))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "50000"));
    let (status, _, _) = send(&client, post("/upload/a", full(vec![b'z'; 70_000])))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Exactly at the limit is fine.
    let (status, _, body) = send(&client, post("/small", full(vec![b'x'; 1024])))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1024"));

    // HTTP/2 as well.
    let (status, _, _) = send(&h2_client(), post("/small", full(vec![b'x'; 2000])))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(rejected(&tg, "body-too-large").await, Some(4.0));
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_a_503_and_are_closed() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--max-connections", "2"]).await;
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(tg.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        held.push(stream);
    }
    let start = Instant::now();
    let (text, closed) = raw_exchange(tg.addr, request, Duration::from_secs(10)).await;
    assert_eq!(statuses(&text), [503], "{text}");
    assert!(text.contains("tidegate-shed: connection-limit"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: "),
        "{text}"
    );
    assert!(closed);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refusal must be fast"
    );
    assert_eq!(
        metric(tg.admin, "tidegate_connections_rejected_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(tg.admin, "tidegate_connections_limit").await,
        Some(2.0)
    );

    // A place frees when a connection closes.
    drop(held.pop());
    eventually_async("a place is free again", Duration::from_secs(10), || async {
        let (text, _) = raw_exchange(
            tg.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        statuses(&text) == [200]
    })
    .await;
}

/// Sends `GET /free` on `stream` and reads its (small) response.
async fn round_trip(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /free HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("response")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_the_idle_timeout_only() {
    let gate = Gate::start().await;
    let tg = tidegate(
        gate.addr(),
        &["--idle-timeout", "400ms", "--header-read-timeout", "100ms"],
    )
    .await;

    // Idle longer than the head timeout is fine: the head timeout starts with a head's first
    // byte, not when the connection goes idle.
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    assert!(round_trip(&mut stream).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(250)).await; // longer than the head timeout
    assert!(round_trip(&mut stream).await.starts_with("HTTP/1.1 200"));
    let idle = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(idle >= Duration::from_millis(350), "closed after {idle:?}");

    // A request in flight for longer than the idle timeout keeps its connection.
    let client = client();
    let held = tokio::spawn({
        let url = tg.url("/held");
        let client = client.clone();
        async move { send(&client, Request::get(url).body(empty()).unwrap()).await }
    });
    gate.wait_arrived(1).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // twice the idle timeout
    gate.release(1);
    let (status, _, body) = held.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "released"));
    assert!(
        metric(
            tg.admin,
            "tidegate_connections_timed_out_total{reason=\"idle\"}"
        )
        .await
        .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_second_head_is_cut_by_the_head_timeout() {
    let app = ok_upstream().await;
    let tg = tidegate(
        app.addr,
        &["--idle-timeout", "30s", "--header-read-timeout", "300ms"],
    )
    .await;
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    assert!(round_trip(&mut stream).await.starts_with("HTTP/1.1 200"));
    stream.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
    let cut = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(cut >= Duration::from_millis(250), "cut after {cut:?}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_connections_timed_out_total{reason=\"header\"}"
        )
        .await,
        Some(1.0)
    );
}

// ===== HTTP/2 frames, by hand =====

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const NO_ERROR: u32 = 0x0;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HEADERS for `GET /path` on `stream`, END_STREAM | END_HEADERS. HPACK: indexed :method GET,
/// :scheme http, then literal (not indexed) :path and :authority.
fn get_headers(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    frame(HEADERS, 0x5, stream, &block)
}

/// Reads frames until `want` returns a value; panics on EOF or after 10 s.
async fn read_frames<T>(
    stream: &mut TcpStream,
    mut want: impl FnMut(u8, u32, &[u8]) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline, stream.read_exact(&mut head))
            .await
            .expect("no matching frame within 10 s")
            .expect("connection closed before the frame");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if let Some(found) = want(head[3], id, &payload) {
            return found;
        }
    }
}

async fn h2_connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    stream
}

fn error_code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_limit_is_advertised_and_enforced() {
    let gate = Gate::start().await;
    let tg = tidegate(gate.addr(), &["--h2-max-concurrent-streams", "2"]).await;
    let mut stream = h2_connect(tg.addr).await;
    let advertised = read_frames(&mut stream, |kind, _, payload| {
        (kind == SETTINGS && !payload.is_empty()).then(|| {
            payload
                .chunks(6)
                .find(|s| u16::from_be_bytes([s[0], s[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
                .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
        })
    })
    .await;
    assert_eq!(advertised, Some(2));

    // A client that ignores the setting gets its third stream refused.
    for id in [1, 3] {
        stream.write_all(&get_headers(id, "/held")).await.unwrap();
    }
    gate.wait_arrived(2).await;
    stream.write_all(&get_headers(5, "/held")).await.unwrap();
    let code = read_frames(&mut stream, |kind, id, payload| {
        (kind == RST_STREAM && id == 5).then(|| error_code(payload, 0))
    })
    .await;
    assert_eq!(code, REFUSED_STREAM);
    assert_eq!(gate.arrived(), 2);
    gate.release(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_gets_goaway_enhance_your_calm() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    let mut stream = h2_connect(tg.addr).await;
    // Open and cancel streams in one burst, as the CVE-2023-44487 attack does.
    let mut burst = Vec::new();
    for i in 0..500u32 {
        let id = 2 * i + 1;
        burst.extend(get_headers(id, "/"));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The server may close mid-write; the GOAWAY is what matters.
    let _ = stream.write_all(&burst).await;
    let code = read_frames(&mut stream, |kind, _, payload| {
        (kind == GOAWAY).then(|| error_code(payload, 4))
    })
    .await;
    assert_eq!(code, ENHANCE_YOUR_CALM);
    assert!(
        app.hits.load(Ordering::SeqCst) < 500,
        "the burst must not all reach the app"
    );
    // Everyone else is still served.
    let (status, _, _) = send(
        &h2_client(),
        Request::get(tg.url("/")).body(empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connections_get_goaway_after_the_idle_timeout() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--idle-timeout", "300ms"]).await;
    let start = Instant::now();
    let mut stream = h2_connect(tg.addr).await;
    let code = read_frames(&mut stream, |kind, _, payload| {
        (kind == GOAWAY).then(|| error_code(payload, 4))
    })
    .await;
    assert_eq!(code, NO_ERROR);
    assert!(start.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_allow_list_guards_prestop_and_drain_only() {
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--admin-allow", "10.0.0.0/8,192.168.0.0/16"]).await;
    let client = client();
    let drain = || Request::post(tg.admin_url("/drain")).body(empty()).unwrap();
    let (status, _, body) = send(&client, drain()).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _, _) = get(&tg.admin_url("/prestop")).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    for open in ["/livez", "/metrics"] {
        let (status, _, _) = get(&tg.admin_url(open)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{open}");
    }
    assert_eq!(tg.lifecycle.phase(), tidegate::Phase::Serving);

    // Loopback in the list: the same call is allowed and starts the shutdown.
    let app2 = ok_upstream().await;
    let tg2 = tidegate(app2.addr, &["--admin-allow", "127.0.0.1"]).await;
    let drain2 = Request::post(tg2.admin_url("/drain"))
        .body(empty())
        .unwrap();
    let (status, _, _) = send(&client, drain2).await.unwrap();
    assert!(status.is_success(), "{status}");
    assert_ne!(tg2.lifecycle.phase(), tidegate::Phase::Serving);
}

#[test]
fn limit_flags_are_validated_by_name() {
    for (args, want) in [
        (&["--max-header-bytes", "100"][..], "--max-header-bytes"),
        (&["--max-header-bytes", "10MiB"][..], "--max-header-bytes"),
        (&["--max-uri-bytes", "128KiB"][..], "--max-uri-bytes"),
        (&["--max-request-body", "lots"][..], "--max-request-body"),
        (&["--max-connections", "0"][..], "--max-connections"),
        (&["--max-headers", "0"][..], "--max-headers"),
        (&["--idle-timeout", "0s"][..], "--idle-timeout"),
        (&["--admin-allow", "10.0.0.0/33"][..], "--admin-allow"),
        (
            &["--h2-max-concurrent-streams", "0"][..],
            "--h2-max-concurrent-streams",
        ),
    ] {
        let err = tidegate::Config::try_from_iter(
            std::iter::once("tidegate").chain(args.iter().copied()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let ok = tidegate::Config::try_from_iter([
        "tidegate",
        "--max-request-body",
        "10MiB",
        "--admin-allow",
        "10.0.0.0/8,::1",
    ])
    .unwrap();
    assert_eq!(ok.args.max_request_body.unwrap().as_u64(), 10 * 1024 * 1024);
    assert_eq!(ok.args.admin_allow.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_gets_its_413_not_a_reset() {
    // The client writes its whole body before reading, as most do without Expect:
    // 100-continue. tidegate answers 413 after the head; closing at once would reset the
    // connection under the response (unread bytes), so it lingers, discarding the rest.
    let app = ok_upstream().await;
    let tg = tidegate(app.addr, &["--max-request-body", "64KiB"]).await;
    let body = vec![b'x'; 4 << 20];
    let mut stream = TcpStream::connect(tg.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
        .write_all(&body)
        .await
        .expect("the upload must not be reset mid-way");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("closed within the linger time")
        .expect("no reset");
    let text = String::from_utf8_lossy(&response);
    assert_eq!(statuses(&text), [413], "{text}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);
}

/// `--max-connections` is the process's limit, whatever the threads: with a runtime per
/// thread, each accepting on the shared listener, the threads share one count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_is_process_wide_with_a_runtime_per_thread() {
    let app = ok_upstream().await;
    for threads in ["2", "3"] {
        let bin = Binary::start(
            &format!("http://{}", app.addr),
            &[
                "--runtime",
                "per-thread",
                "--threads",
                threads,
                "--max-connections",
                "2",
            ],
        );
        wait_admin_ready(bin.admin).await;
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut held = Vec::new();
        let mut statuses_seen = Vec::new();
        // One at a time, each kept open after its answer: whichever thread accepts it, the
        // third and later must be refused.
        for _ in 0..12 {
            let mut stream = TcpStream::connect(bin.addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            statuses_seen.extend(statuses(&String::from_utf8_lossy(&buf[..n])));
            held.push(stream);
        }
        let served = statuses_seen.iter().filter(|s| **s == 200).count();
        assert_eq!(served, 2, "--threads {threads}: {statuses_seen:?}");
        assert_eq!(statuses_seen.len(), 12, "{statuses_seen:?}");
    }
}
