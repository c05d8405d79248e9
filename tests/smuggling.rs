//! Request smuggling and malformed framing: a corpus of known payloads, each sent on its own
//! connection through a real tidegate to a recording upstream. Every ambiguous or invalid
//! message is answered with a 400 (or closed) and nothing smuggled ever reaches the app.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;

/// What the app saw: `METHOD path body-bytes` per request whose body it could read whole,
/// or `METHOD path <body error>` when the body failed.
type Seen = Arc<Mutex<Vec<String>>>;

async fn recording_upstream() -> (Upstream, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let app = upstream(move |req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let line = format!("{} {}", req.method(), req.uri().path());
            let entry = match req.into_body().collect().await {
                Ok(body) => format!("{line} {:?}", body.to_bytes()),
                Err(_) => format!("{line} <body error>"),
            };
            log.lock().unwrap().push(entry);
            Response::new(full("app"))
        }
    })
    .await;
    (app, seen)
}

/// A payload, what the client must get, and why it matters.
struct Case {
    name: &'static str,
    payload: &'static [u8],
    status: u16,
}

/// Payloads hyper or tidegate must refuse with a 400 before anything reaches the app.
const REFUSED_BEFORE_THE_APP: &[Case] = &[
    Case {
        name: "TE not ending in chunked (TE.CL desync)",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "two TE lines, the last not chunked",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "unknown coding xchunked",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "space before the colon",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "obs-fold continuation line",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "vertical tab in a TE value",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        status: 400,
    },
    Case {
        name: "two different Content-Lengths",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "Content-Length list with different values",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 30\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "signed Content-Length",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        status: 400,
    },
    Case {
        name: "negative Content-Length",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nhello",
        status: 400,
    },
    Case {
        name: "hex Content-Length",
        payload: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
        status: 400,
    },
    Case {
        name: "Transfer-Encoding on HTTP/1.0",
        payload: b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "NUL in a header value",
        payload: b"GET / HTTP/1.1\r\nHost: a\r\nX-Evil: a\x00b\r\n\r\n",
        status: 400,
    },
    Case {
        name: "bare CR in a header value",
        payload: b"GET / HTTP/1.1\r\nHost: a\r\nX-Evil: a\rContent-Length: 5\r\n\r\nhello",
        status: 400,
    },
    Case {
        name: "space in a header name",
        payload: b"GET / HTTP/1.1\r\nHost: a\r\nContent Length: 5\r\n\r\nhello",
        status: 400,
    },
    Case {
        name: "HTTP/1.1 without Host",
        payload: b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
        status: 400,
    },
    Case {
        name: "two Host headers",
        payload: b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        status: 400,
    },
    Case {
        name: "Host with userinfo",
        payload: b"GET / HTTP/1.1\r\nHost: evil@a\r\n\r\n",
        status: 400,
    },
    Case {
        name: "invalid request line",
        payload: b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        status: 400,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_is_refused_before_the_app() {
    let (app, seen) = recording_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    let mut failures = Vec::new();
    for case in REFUSED_BEFORE_THE_APP {
        let (text, closed) = raw_exchange(tg.addr, case.payload, Duration::from_secs(10)).await;
        let got = statuses(&text);
        if got != [case.status] || !closed {
            failures.push(format!(
                "{}: want one {} and a close, got {got:?} (closed: {closed}): {text:?}",
                case.name, case.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        *seen.lock().unwrap(),
        Vec::<String>::new(),
        "nothing may reach the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_forwarded_as_chunked_only_and_closed() {
    // RFC 9112 §6.1: Transfer-Encoding overrides Content-Length, and the connection must be
    // closed after the response. hyper removes the Content-Length; the app sees one request
    // with the chunked body, and the bytes after it (the smuggled request) are never read.
    let (app, seen) = recording_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    for payload in [
        &b"POST /cl-te HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        &b"POST /te-cl HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"[..],
    ] {
        let (text, closed) = raw_exchange(tg.addr, payload, Duration::from_secs(10)).await;
        assert_eq!(statuses(&text), [200], "{text}");
        assert!(closed, "the connection must close after such a request");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        ["POST /cl-te b\"hello\"", "POST /te-cl b\"hello\""],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_get_400_and_never_a_complete_request() {
    let (app, seen) = recording_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    for (name, payload) in [
        (
            "invalid chunk size",
            &b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        ),
        (
            "chunk size overflow",
            &b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n"[..],
        ),
        (
            "chunk without its CRLF",
            &b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        ),
    ] {
        let (text, closed) = raw_exchange(tg.addr, payload, Duration::from_secs(10)).await;
        assert_eq!(statuses(&text), [400], "{name}: {text}");
        assert!(text.contains("tidegate-error: bad-body"), "{name}: {text}");
        assert!(closed, "{name}: the connection must close");
    }
    // The app may have seen the heads (they are streamed), but never a complete body and
    // never the request after them. A well-formed request afterwards is the marker.
    let (text, _) = raw_exchange(
        tg.addr,
        b"GET /control HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(statuses(&text), [200], "{text}");
    eventually(
        "the app saw the control request",
        Duration::from_secs(10),
        || {
            seen.lock()
                .unwrap()
                .iter()
                .any(|e| e.starts_with("GET /control"))
        },
    )
    .await;
    for entry in seen.lock().unwrap().iter() {
        assert!(
            entry.starts_with("GET /control") || entry.ends_with("<body error>"),
            "a malformed body reached the app whole: {entry}"
        );
        assert!(!entry.contains("smuggled"), "{entry}");
    }
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_requests_rejected_total{reason=\"bad-body\"}"
        )
        .await,
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_forwarded_one_by_one() {
    // The control case: two well-formed requests in one write are two requests to the app.
    let (app, seen) = recording_upstream().await;
    let tg = tidegate(app.addr, &[]).await;
    let payload = b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (text, closed) = raw_exchange(tg.addr, payload, Duration::from_secs(10)).await;
    assert_eq!(statuses(&text), [200, 200], "{text}");
    assert!(closed);
    assert_eq!(
        *seen.lock().unwrap(),
        ["POST /one b\"hello\"", "GET /two b\"\""]
    );
}
