//! Request coalescing over real sockets: identical GETs on a coalescing route share one
//! exchange with the app; what must not be shared never is.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// A body far larger than loopback socket buffers.
const HUGE: usize = 32 * 1024 * 1024;

/// An app that holds every request until released and answers with the request's hit
/// number, plus response headers chosen by path.
struct HeldApp {
    upstream: Upstream,
    release: Arc<Semaphore>,
}

impl HeldApp {
    async fn start() -> HeldApp {
        let release = Arc::new(Semaphore::new(0));
        let count = Arc::new(AtomicUsize::new(0));
        let (r, c) = (release.clone(), count.clone());
        let upstream = upstream(move |req: Request<Incoming>| {
            let (r, c) = (r.clone(), c.clone());
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                r.acquire().await.unwrap().forget();
                let mut rsp = Response::builder().header("x-hit", n.to_string());
                let path = req.uri().path();
                if path.ends_with("/private") {
                    rsp = rsp.header("cache-control", "private");
                }
                if path.ends_with("/cookie") {
                    rsp = rsp.header("set-cookie", "session=abc");
                }
                if path.ends_with("/vary") {
                    rsp = rsp.header("vary", "Accept-Language");
                }
                if path.ends_with("/big") {
                    return rsp.body(full(vec![b'x'; 64 * 1024])).unwrap();
                }
                if path.ends_with("/huge") {
                    return rsp.body(full(vec![b'y'; HUGE])).unwrap();
                }
                rsp.body(full(format!("hot data {n} for {}", req.uri())))
                    .unwrap()
            }
        })
        .await;
        HeldApp { upstream, release }
    }

    fn hits(&self) -> usize {
        self.upstream.hits.load(Ordering::SeqCst)
    }
}

async fn coalescing_tidegate(app: &HeldApp, extra: &[&str]) -> Tidegate {
    let file = scratch_file(
        "routes.toml",
        "[[route]]\nprefix = \"/hot\"\ncoalesce = true\n\n[[route]]\nprefix = \"/plain\"\n",
    );
    let mut args = vec!["--config", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    tidegate(app.upstream.addr, &args).await
}

/// Sends one raw HTTP/1.1 request on its own connection and reads the whole response.
async fn raw_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = if method == "POST" {
        "content-length: 0\r\n"
    } else {
        ""
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: app.local\r\n{headers}{body}connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut text = Vec::new();
    stream.read_to_end(&mut text).await.unwrap();
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn body_of(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Raises this test process's open-file limit: 1,000 clients and the in-process tidegate's
/// 1,000 accepted connections live in the same process.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_identical_gets_make_one_upstream_request() {
    raise_fd_limit();
    const N: usize = 1000;
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &["--max-concurrency", "4"]).await;
    let addr = tg.addr;
    let requests: Vec<_> = (0..N)
        .map(|_| tokio::spawn(async move { raw_request(addr, "GET", "/hot/item?id=7", "").await }))
        .collect();
    eventually(
        "one leader at the app, the rest waiting",
        Duration::from_secs(60),
        || tg.metrics.coalesce.coalesce_waiting.get() == (N - 1) as i64,
    )
    .await;
    assert_eq!(app.hits(), 1, "only the leader reached the app");
    assert_eq!(
        tg.metrics.admission.queued.get(),
        0,
        "followers take no queue place"
    );
    assert_eq!(
        tg.metrics.admission.in_flight.get(),
        1,
        "followers take no slot"
    );
    app.release.add_permits(1);
    for r in requests {
        let (status, text) = r.await.unwrap();
        assert_eq!(status, 200, "{text}");
        assert_eq!(body_of(&text), "hot data 1 for /hot/item?id=7");
        assert!(text.to_ascii_lowercase().contains("x-hit: 1\r\n"), "{text}");
    }
    assert_eq!(app.hits(), 1);
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_coalesced_requests_total{outcome=\"shared\"}"
        )
        .await,
        Some((N - 1) as f64)
    );
    // The flight is over: the next identical GET goes to the app again.
    app.release.add_permits(1);
    let (status, text) = raw_request(addr, "GET", "/hot/item?id=7", "").await;
    assert_eq!(status, 200);
    assert_eq!(body_of(&text), "hot data 2 for /hot/item?id=7");
}

/// The value of `name` in a raw response's head.
fn header_of<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let head = text.split_once("\r\n\r\n").map_or(text, |(h, _)| h);
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_beyond_coalesce_max_waiting_are_refused_at_once() {
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &["--coalesce-max-waiting", "3"]).await;
    let addr = tg.addr;
    let requests: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { raw_request(addr, "GET", "/hot/item", "").await }))
        .collect();
    let refused = "tidegate_shed_total{reason=\"coalesce-full\",route=\"/hot\"}";
    eventually(
        "a leader at the app, 3 followers waiting, 2 refused",
        Duration::from_secs(20),
        || tg.metrics.coalesce.coalesce_waiting.get() == 3 && app.hits() == 1,
    )
    .await;
    // The excess is answered while the leader is still held.
    eventually("two requests answered", Duration::from_secs(20), || {
        requests.iter().filter(|r| r.is_finished()).count() == 2
    })
    .await;
    app.release.add_permits(1);
    let mut statuses = Vec::new();
    for r in requests {
        let (status, text) = r.await.unwrap();
        if status == 503 {
            assert_eq!(
                header_of(&text, "tidegate-shed"),
                Some("coalesce-full"),
                "{text}"
            );
            assert!(header_of(&text, "retry-after").is_some(), "{text}");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 503, 503]);
    assert_eq!(app.hits(), 1, "refused followers never reached the app");
    assert_eq!(metric(tg.admin, refused).await, Some(2.0));
    assert_eq!(tg.metrics.coalesce.coalesce_waiting.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_waits_at_most_coalesce_max_wait() {
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &["--coalesce-max-wait", "300ms"]).await;
    let addr = tg.addr;
    let leader = tokio::spawn(async move { raw_request(addr, "GET", "/hot/item", "").await });
    eventually("the leader at the app", Duration::from_secs(20), || {
        app.hits() == 1
    })
    .await;
    let started = std::time::Instant::now();
    let (status, text) = raw_request(addr, "GET", "/hot/item", "").await;
    let waited = started.elapsed();
    assert_eq!(status, 503, "{text}");
    assert_eq!(
        header_of(&text, "tidegate-shed"),
        Some("coalesce-wait"),
        "{text}"
    );
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert_eq!(app.hits(), 1, "the follower never went to the app");
    assert_eq!(tg.metrics.coalesce.coalesce_waiting.get(), 0);
    app.release.add_permits(1);
    let (status, _) = leader.await.unwrap();
    assert_eq!(status, 200, "the leader is still answered");
}

/// Sends `n` identical requests at once, waits until `arrived` of them reached the app and the
/// rest (if coalesced) wait, releases them all and returns the responses.
async fn burst(
    tg: &Tidegate,
    app: &HeldApp,
    n: usize,
    method: &'static str,
    path: &'static str,
    headers: impl Fn(usize) -> String,
) -> Vec<(u16, String)> {
    let addr = tg.addr;
    let before = app.hits();
    let waiting_before = tg.metrics.coalesce.coalesce_waiting.get();
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let h = headers(i);
            tokio::spawn(async move { raw_request(addr, method, path, &h).await })
        })
        .collect();
    eventually(
        "every request reached the app or waits for one that did",
        Duration::from_secs(20),
        || {
            let at_app = app.hits() - before;
            let waiting = (tg.metrics.coalesce.coalesce_waiting.get() - waiting_before) as usize;
            at_app >= 1 && at_app + waiting == n
        },
    )
    .await;
    app.release.add_permits(n);
    let mut out = Vec::new();
    for r in requests {
        out.push(r.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_or_uncacheable_requests_are_never_coalesced() {
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &[]).await;
    let n = 8;
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        fn(usize) -> String,
    );
    let cases: [Case; 5] = [
        ("POST", "POST", "/hot/item", |_| String::new()),
        ("no-store", "GET", "/hot/item", |_| {
            "cache-control: no-store\r\n".into()
        }),
        ("no-cache", "GET", "/hot/item", |_| {
            "pragma: no-cache\r\n".into()
        }),
        ("different cookies", "GET", "/hot/item", |i| {
            format!("cookie: user={i}\r\n")
        }),
        ("route without coalesce", "GET", "/plain/item", |_| {
            String::new()
        }),
    ];
    for (what, method, path, headers) in cases {
        let before = app.hits();
        let responses = burst(&tg, &app, n, method, path, headers).await;
        assert_eq!(
            app.hits() - before,
            n,
            "{what}: each request reached the app"
        );
        assert!(responses.iter().all(|(s, _)| *s == 200), "{what}");
        let mut bodies: Vec<_> = responses
            .iter()
            .map(|(_, t)| body_of(t).to_owned())
            .collect();
        bodies.sort();
        bodies.dedup();
        assert_eq!(
            bodies.len(),
            n,
            "{what}: every response is the request's own"
        );
    }
    assert_eq!(tg.metrics.coalesce.coalesce_waiting.get(), 0);
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_coalesced_requests_total{outcome=\"shared\"}"
        )
        .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_that_must_not_be_shared_send_followers_alone() {
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &["--coalesce-max-body", "16KiB"]).await;
    let n = 6;
    for path in ["/hot/private", "/hot/cookie", "/hot/big"] {
        let before = app.hits();
        let addr = tg.addr;
        let requests: Vec<_> = (0..n)
            .map(|_| tokio::spawn(async move { raw_request(addr, "GET", path, "").await }))
            .collect();
        eventually(
            "followers wait for the leader",
            Duration::from_secs(20),
            || tg.metrics.coalesce.coalesce_waiting.get() == (n - 1) as i64,
        )
        .await;
        assert_eq!(app.hits() - before, 1);
        // The leader's response cannot be shared: the followers go to the app themselves.
        app.release.add_permits(n);
        for r in requests {
            assert_eq!(r.await.unwrap().0, 200, "{path}");
        }
        assert_eq!(app.hits() - before, n, "{path}: followers were sent alone");
    }
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_coalesced_requests_total{outcome=\"alone\"}"
        )
        .await,
        Some((3 * (n - 1)) as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_decides_who_may_share() {
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &[]).await;
    let addr = tg.addr;
    let before = app.hits();
    let langs = ["en", "en", "fr", "en"];
    let requests: Vec<_> = langs
        .iter()
        .map(|lang| {
            let h = format!("accept-language: {lang}\r\n");
            tokio::spawn(async move { raw_request(addr, "GET", "/hot/vary", &h).await })
        })
        .collect();
    eventually(
        "followers wait for the leader",
        Duration::from_secs(20),
        || tg.metrics.coalesce.coalesce_waiting.get() == 3,
    )
    .await;
    app.release.add_permits(8);
    let responses: Vec<_> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(responses.iter().all(|(s, _)| *s == 200));
    // Whoever led, the requests with its language shared its response; the others went alone.
    let shared = responses
        .iter()
        .filter(|(_, t)| body_of(t).starts_with("hot data 1 "))
        .count();
    assert!(
        shared == 3 || shared == 1,
        "the leader's language: {shared}"
    );
    assert_eq!(app.hits() - before, 1 + (langs.len() - shared));
    assert_eq!(
        tg.metrics
            .coalesce
            .coalesced
            .with_label_values(&["shared"])
            .get() as usize,
        shared - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_do_not_wait_for_a_slow_leader_client() {
    let app = HeldApp::start().await;
    let tg = coalescing_tidegate(&app, &["--coalesce-max-body", "64MiB"]).await;
    // The leader's client sends its request and then reads nothing.
    let mut leader = TcpStream::connect(tg.addr).await.unwrap();
    leader
        .write_all(b"GET /hot/huge HTTP/1.1\r\nhost: app.local\r\n\r\n")
        .await
        .unwrap();
    eventually(
        "the leader reached the app",
        Duration::from_secs(10),
        || app.hits() == 1,
    )
    .await;
    let addr = tg.addr;
    let followers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { raw_request(addr, "GET", "/hot/huge", "").await }))
        .collect();
    eventually("followers wait", Duration::from_secs(10), || {
        tg.metrics.coalesce.coalesce_waiting.get() == 2
    })
    .await;
    app.release.add_permits(1);
    for f in followers {
        let (status, text) = tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("followers are answered while the leader's client reads nothing")
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body_of(&text).len(), HUGE);
    }
    assert_eq!(app.hits(), 1);
    // The leader still gets its whole response when it reads.
    let mut received = Vec::new();
    let mut buf = vec![0; 1 << 20];
    while !received.ends_with(&[b'y'; 16]) || received.len() < HUGE {
        let n = leader.read(&mut buf).await.unwrap();
        assert!(n > 0, "leader connection closed early");
        received.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body_of(&String::from_utf8_lossy(&received)).len(), HUGE);
}

// ===== the coalescing cache =====

/// An app that answers at once with its hit number, with caching headers chosen by path.
async fn caching_app() -> Upstream {
    let count = Arc::new(AtomicUsize::new(0));
    upstream(move |req: Request<Incoming>| {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let path = req.uri().path();
            let mut rsp = Response::builder();
            if path.ends_with("/fresh") || path.starts_with("/brief") {
                rsp = rsp.header("cache-control", "public, max-age=60");
            }
            if path.ends_with("/private") {
                rsp = rsp.header("cache-control", "private, max-age=60");
            }
            if path.ends_with("/vary") {
                rsp = rsp
                    .header("cache-control", "max-age=60")
                    .header("vary", "accept-language");
            }
            rsp.body(full(format!("v{n}"))).unwrap()
        }
    })
    .await
}

async fn caching_tidegate(app: &Upstream) -> Tidegate {
    let file = scratch_file(
        "routes.toml",
        "[[route]]\nprefix = \"/cache\"\ncoalesce_cache = \"30s\"\n\n\
         [[route]]\nprefix = \"/brief\"\ncoalesce_cache = \"2s\"\n",
    );
    tidegate(app.addr, &["--config", file.to_str().unwrap()]).await
}

async fn fetch(
    tg: &Tidegate,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (String, http::HeaderMap) {
    let mut req = Request::builder().method(method).uri(tg.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (status, headers, body) = send(&client(), req.body(empty()).unwrap()).await.unwrap();
    assert_eq!(status, 200, "{method} {path}");
    (body, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_responses_are_served_from_the_cache_with_their_age() {
    let app = caching_app().await;
    let tg = caching_tidegate(&app).await;
    let hits = || app.hits.load(Ordering::SeqCst);
    let (first, headers) = fetch(&tg, "GET", "/cache/fresh", &[]).await;
    assert_eq!(first, "v1");
    assert!(headers.get("age").is_none(), "from the app: {headers:?}");
    let (second, headers) = fetch(&tg, "GET", "/cache/fresh", &[]).await;
    assert_eq!(
        (second.as_str(), hits()),
        ("v1", 1),
        "served from the cache"
    );
    assert!(headers["age"].to_str().unwrap().parse::<u64>().unwrap() <= 1);
    assert_eq!(headers["cache-control"], "public, max-age=60");
    // A client asking for a fresh copy goes to the app; its response replaces the stored one.
    let (fresh, _) = fetch(
        &tg,
        "GET",
        "/cache/fresh",
        &[("cache-control", "max-age=0")],
    )
    .await;
    assert_eq!((fresh.as_str(), hits()), ("v2", 2));
    let (again, _) = fetch(&tg, "GET", "/cache/fresh", &[]).await;
    assert_eq!((again.as_str(), hits()), ("v2", 2));
    assert_eq!(
        metric(
            tg.admin,
            "tidegate_coalesced_requests_total{outcome=\"cached\"}"
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        metric(tg.admin, "tidegate_coalesce_cache_entries").await,
        Some(1.0)
    );
    // A successful unsafe request to the URI drops what is stored for it.
    fetch(&tg, "POST", "/cache/fresh", &[]).await;
    assert_eq!(hits(), 3);
    let (after, _) = fetch(&tg, "GET", "/cache/fresh", &[]).await;
    assert_eq!((after.as_str(), hits()), ("v4", 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_shareable_responses_with_a_lifetime_are_stored() {
    let app = caching_app().await;
    let tg = caching_tidegate(&app).await;
    for path in ["/cache/none", "/cache/private"] {
        let before = app.hits.load(Ordering::SeqCst);
        let (a, _) = fetch(&tg, "GET", path, &[]).await;
        let (b, _) = fetch(&tg, "GET", path, &[]).await;
        assert_ne!(a, b, "{path}: both from the app");
        assert_eq!(app.hits.load(Ordering::SeqCst) - before, 2, "{path}");
    }
    // Vary: one stored variant per URI; other languages go to the app.
    let (en, _) = fetch(&tg, "GET", "/cache/vary", &[("accept-language", "en")]).await;
    let (en_again, _) = fetch(&tg, "GET", "/cache/vary", &[("accept-language", "en")]).await;
    assert_eq!(en, en_again);
    let (fr, _) = fetch(&tg, "GET", "/cache/vary", &[("accept-language", "fr")]).await;
    assert_ne!(en, fr);
    let (fr_again, _) = fetch(&tg, "GET", "/cache/vary", &[("accept-language", "fr")]).await;
    assert_eq!(fr, fr_again);
    assert_eq!(
        metric(tg.admin, "tidegate_coalesce_cache_entries").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_bounds_how_long_a_response_is_kept() {
    let app = caching_app().await;
    let tg = caching_tidegate(&app).await;
    let (first, _) = fetch(&tg, "GET", "/brief/item", &[]).await;
    let start = std::time::Instant::now();
    let (second, _) = fetch(&tg, "GET", "/brief/item", &[]).await;
    assert_eq!(first, second);
    // max-age=60, but the route keeps it 2 s.
    eventually_async(
        "the stored response expires",
        Duration::from_secs(10),
        || async { fetch(&tg, "GET", "/brief/item", &[]).await.0 != first },
    )
    .await;
    let kept = start.elapsed();
    assert!(
        kept >= Duration::from_millis(1500) && kept < Duration::from_secs(8),
        "{kept:?}"
    );
}
