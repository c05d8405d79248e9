//! Property-based fuzzing (proptest, stable Rust) of the parts that take hostile or sloppy
//! input: the route matcher, the config file parser, header rewriting, the manifest checker,
//! and whole HTTP/1.1 requests mutated byte by byte and sent to a running tidegate.
//!
//! Cases per property: `TIDEGATE_FUZZ_CASES` (default 256; CI runs the default). A longer run:
//! `TIDEGATE_FUZZ_CASES=20000 cargo test --release --test fuzz`. A failing case is shrunk and
//! printed by proptest; add it to the unit tests of the module at fault when fixing it.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use tidegate::config::route::{PathMatch, RouteSpec, RouteTable};
use tidegate::config::{ConfigError, FileError};
use tidegate::headers;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("TIDEGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ===== route matcher =====

const SEGMENTS: &[&str] = &[
    "a", "b", "ab", "x", "", ".", "..", "%2F", "*", "é", "a.b", "A",
];

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(prop::sample::select(SEGMENTS), 0..5)
            .prop_map(|segs| format!("/{}", segs.join("/"))),
        1 => any::<String>(),
    ]
}

fn route() -> impl Strategy<Value = Option<RouteSpec>> {
    let pattern = prop::collection::vec(prop::sample::select(SEGMENTS), 0..3)
        .prop_map(|segs| format!("/{}", segs.join("/")));
    let glob = prop::sample::select(&["/a/*", "/**", "/b/**/x", "/[ab]/*", "/*.b", "/a/**"][..]);
    let methods = prop::option::of(prop::sample::subsequence(vec!["GET", "POST", "PUT"], 1..3));
    (0..3u8, pattern, glob, methods).prop_map(|(kind, pattern, glob, methods)| {
        let path = match kind {
            0 => PathMatch::prefix(&pattern).ok()?,
            1 => PathMatch::exact(&pattern).ok()?,
            _ => PathMatch::glob(glob).ok()?,
        };
        Some(RouteSpec {
            methods: methods.map(|m| m.iter().map(|m| m.parse().unwrap()).collect()),
            ..RouteSpec::new(format!("{kind}:{}", path.pattern()), path)
        })
    })
}

fn prefix_covers(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn route_table_picks_exact_then_first_glob_then_longest_prefix(
        routes in prop::collection::vec(route(), 0..8),
        path in path(),
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::DELETE]),
    ) {
        let routes: Vec<RouteSpec> = routes.into_iter().flatten().collect();
        let table = RouteTable::new(&routes);
        let found = table.find(&routes, &method, &path);
        let applies = |r: &RouteSpec| r.matches(&method, &path);
        let exact = routes.iter().position(|r| matches!(&r.path, PathMatch::Exact(p) if *p == path) && applies(r));
        let glob = routes.iter().position(|r| matches!(r.path, PathMatch::Glob(..)) && applies(r));
        let longest_prefix = routes
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(&r.path, PathMatch::Prefix(p) if prefix_covers(p, &path)) && applies(r))
            .map(|(i, r)| (r.path.pattern().len(), i))
            .max_by_key(|&(len, i)| (len, std::cmp::Reverse(i)));
        match found {
            None => prop_assert!(routes.iter().all(|r| !applies(r)), "a route matches but none was found"),
            Some(i) => {
                prop_assert!(applies(&routes[i]));
                if let Some(e) = exact {
                    prop_assert!(matches!(routes[i].path, PathMatch::Exact(_)), "exact {e} must win over {i}");
                } else if let Some(g) = glob {
                    prop_assert_eq!(i, g, "the first matching glob wins");
                } else {
                    let (len, _) = longest_prefix.expect("a prefix matched");
                    prop_assert_eq!(routes[i].path.pattern().len(), len, "the longest prefix wins");
                }
            }
        }
    }

    #[test]
    fn route_patterns_never_panic(pattern in any::<String>(), flag in any::<String>()) {
        let _ = PathMatch::prefix(&pattern);
        let _ = PathMatch::exact(&pattern);
        let _ = PathMatch::glob(&pattern);
        let _ = RouteSpec::parse_flag(&flag);
    }
}

// ===== config file =====

fn scratch_file(text: &str) -> std::path::PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("tidegate-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.toml", COUNTER.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).unwrap();
    path
}

fn load(text: &str) -> Result<tidegate::Config, ConfigError> {
    let path = scratch_file(text);
    let result = tidegate::Config::try_from_iter(["tidegate", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    result
}

/// Lines that look like a tidegate config, some valid and some not.
fn config_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "max_concurrency",
        "min_concurrency",
        "max_concurrency_ceiling",
        "adaptive_algorithm",
        "reserved_slots",
        "priority_header",
        "retry_header",
        "retry_memory",
        "queue_codel_target",
        "queue_lifo",
        "retry_after_from_queue",
        "max_queue",
        "queue_timeout",
        "retry_after",
        "idle_timeout",
        "max_header_bytes",
        "max_headers",
        "max_request_body",
        "admin_allow",
        "via",
        "upstream",
        "listen",
        "log_format",
        "on_client_abort",
        "bogus",
    ]);
    let value = prop::sample::select(vec![
        "4",
        "0",
        "-1",
        "99999999999",
        "\"2s\"",
        "\"soon\"",
        "\"64KiB\"",
        "\"1 GiB\"",
        "true",
        "\"json\"",
        "\"auto\"",
        "\"aimd\"",
        "\"x-priority\"",
        "\"bad header\"",
        "[\"10.0.0.0/8\"]",
        "[\"nope\"]",
        "\"http://127.0.0.1:9\"",
        "\"ftp://x\"",
        "\"127.0.0.1:0\"",
        "\"finish\"",
        "{}",
        "[",
        "\"\"",
    ]);
    prop_oneof![
        8 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => Just("[[route]]\nprefix = \"/a\"\nmax_concurrency = 2".to_owned()),
        1 => Just("[[route]]\nglob = \"/a/[\"".to_owned()),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn config_files_parse_or_name_file_line_and_key(lines in prop::collection::vec(config_line(), 0..8)) {
        let text = lines.join("\n");
        match load(&text) {
            Ok(_) => {}
            Err(ConfigError::File(FileError::Invalid { line, field, message, .. })) => {
                prop_assert!(line >= 1 && line <= text.lines().count().max(1), "line {line} of {text:?}");
                prop_assert!(!field.is_empty() && !message.is_empty());
            }
            // Cross-field rules name the flags (e.g. --max-queue needs --max-concurrency).
            Err(other) => prop_assert!(other.to_string().contains("--"), "{other}"),
        }
    }

    #[test]
    fn valid_settings_round_trip(
        max_concurrency in 1u32..10_000,
        queue_ms in 1u64..60_000,
        header_kib in 1u64..=256,
        max_headers in 1u32..=10_000,
        body in prop::option::of(0u64..1 << 40),
        via in any::<bool>(),
    ) {
        let mut text = format!(
            "max_concurrency = {max_concurrency}\nqueue_timeout = \"{queue_ms}ms\"\n\
             max_header_bytes = \"{header_kib}KiB\"\nmax_uri_bytes = \"1KiB\"\n\
             max_headers = {max_headers}\nvia = {via}\n"
        );
        if let Some(body) = body {
            text.push_str(&format!("max_request_body = {body}\n"));
        }
        let config = load(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let a = &config.args;
        prop_assert_eq!(a.fixed_concurrency(), Some(max_concurrency));
        prop_assert_eq!(a.queue_timeout, Duration::from_millis(queue_ms));
        prop_assert_eq!(a.max_header_bytes.as_u64(), header_kib * 1024);
        prop_assert_eq!(a.max_headers, max_headers);
        prop_assert_eq!(a.max_request_body.map(|b| b.as_u64()), body);
        prop_assert_eq!(a.via, via);
    }
}

// ===== header rewriting =====

const NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "x-a",
    "x-b",
    "host",
    "x-forwarded-for",
    "content-type",
    "trailer",
];

fn header_map() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        4 => prop::sample::select(NAMES).prop_map(str::to_owned),
        1 => "[a-z][a-z0-9-]{0,8}",
    ];
    let value = prop_oneof![
        3 => prop::collection::vec(prop::sample::select(NAMES), 1..4).prop_map(|v| v.join(", ")),
        1 => Just("trailers".to_owned()),
        1 => Just("close".to_owned()),
        1 => "[ -~]{0,12}",
    ];
    prop::collection::vec((name, value), 0..12)
}

fn build(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn hop_by_hop_fields_never_pass_and_others_always_do(pairs in header_map()) {
        let original = build(&pairs);
        let mut stripped = original.clone();
        headers::strip_hop_by_hop(&mut stripped, false);
        let listed: Vec<String> = original
            .get_all("connection")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        let trailers = original.get_all("te").iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
        });
        for name in stripped.keys() {
            let n = name.as_str();
            if n == "te" {
                prop_assert!(trailers, "TE kept without trailers");
                prop_assert_eq!(stripped.get_all("te").iter().count(), 1);
                prop_assert_eq!(&stripped["te"], "trailers");
                continue;
            }
            prop_assert!(
                !["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "proxy-authorization"].contains(&n),
                "hop-by-hop {n} passed"
            );
            prop_assert!(!listed.iter().any(|l| l == n), "{n} is listed in Connection");
        }
        for name in original.keys() {
            let n = name.as_str();
            let hop = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"].contains(&n);
            if !hop && !listed.iter().any(|l| l == n) {
                let before: Vec<_> = original.get_all(name).iter().collect();
                let after: Vec<_> = stripped.get_all(name).iter().collect();
                prop_assert_eq!(before, after, "end-to-end {} changed", n);
            }
        }
    }

    #[test]
    fn forwarded_fields_are_appended_not_replaced(
        pairs in header_map(),
        client in any::<IpAddr>(),
        authority in prop::option::of("[a-z]{1,8}(:[0-9]{1,5})?"),
    ) {
        let mut map = build(&pairs);
        let prior = map.get("x-forwarded-for").and_then(|v| v.to_str().ok()).map(str::to_owned);
        headers::set_forwarded(&mut map, Some(&headers::client_ip(client)), authority.as_deref());
        let xff = map["x-forwarded-for"].to_str().unwrap().to_owned();
        prop_assert!(xff.ends_with(&client.to_string()), "{xff}");
        if let Some(prior) = prior.filter(|p| !p.trim().is_empty()) {
            prop_assert!(xff.starts_with(&prior), "{xff} lost {prior}");
        }
        prop_assert_eq!(&map["x-forwarded-proto"], "http");
        if map.contains_key("host") {
            prop_assert_eq!(map.get("x-forwarded-host"), map.get("host"));
        }
    }
}

// ===== manifest checker =====

fn manifest_seeds() -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    [
        "k8s/base/deployment.yaml",
        "tests/manifests/bad/pitfalls.yaml",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(format!("{root}/{p}")).unwrap())
    .collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize),
    Duplicate(usize),
    Replace(usize, &'static str),
    Indent(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let scalar = prop::sample::select(vec![
        "0",
        "-1",
        "null",
        "[]",
        "{}",
        "\"x\"",
        "999999999999999999999",
        "true",
        "1.5",
        "'--max-concurrency=0'",
        "[\"--\", \"x\"]",
        "{path: /prestop, port: 0}",
        "&a",
        "*a",
        "|",
        "~",
    ]);
    let edit = prop_oneof![
        (any::<usize>()).prop_map(Edit::Delete),
        (any::<usize>()).prop_map(Edit::Duplicate),
        (any::<usize>(), scalar).prop_map(|(i, s)| Edit::Replace(i, s)),
        (any::<usize>()).prop_map(Edit::Indent),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for edit in edits {
        if lines.is_empty() {
            break;
        }
        let at = |i: usize| i % lines.len();
        match *edit {
            Edit::Delete(i) => {
                lines.remove(at(i));
            }
            Edit::Duplicate(i) => {
                let line = lines[at(i)].clone();
                lines.insert(at(i), line);
            }
            Edit::Replace(i, scalar) => {
                let i = at(i);
                if let Some((key, _)) = lines[i].split_once(": ") {
                    lines[i] = format!("{key}: {scalar}");
                }
            }
            Edit::Indent(i) => {
                let i = at(i);
                lines[i] = format!("  {}", lines[i]);
            }
        }
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn manifest_checker_never_panics_on_mutated_manifests(seed in 0usize..2, edits in edits()) {
        let seeds = manifest_seeds();
        let text = apply(&seeds[seed], &edits);
        if let Ok(report) = tidegate::check::check_str("fuzz.yaml", &text) {
            for finding in &report.findings {
                prop_assert!(!finding.rule.is_empty() && !finding.message.is_empty());
            }
        }
    }

    #[test]
    fn manifest_checker_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = tidegate::check::check_str("fuzz.yaml", &text);
    }
}

// ===== whole requests, mutated, against a running tidegate =====

/// A tidegate in front of an upstream that answers 200, on its own runtime for all cases.
struct Live {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    app: support::Upstream,
    _tidegate: support::Tidegate,
    /// Held for each exchange, so that the app's hits before and after are that exchange's.
    turn: std::sync::Mutex<()>,
}

/// Panics on threads other than the test's own (tidegate's connection tasks).
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio"))
            {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (app, tg) = runtime.block_on(async {
            let app = support::ok_upstream().await;
            let tg = support::tidegate(
                app.addr,
                &[
                    "--header-read-timeout",
                    "500ms",
                    "--max-request-body",
                    "64KiB",
                ],
            )
            .await;
            (app, tg)
        });
        Live {
            addr: tg.addr,
            runtime,
            app,
            _tidegate: tg,
            turn: std::sync::Mutex::new(()),
        }
    })
}

const REQUESTS: &[&[u8]] = &[
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
];

const BYTES: &[u8] = b"\r\n\0: \t\x7f\xff0-,;=\"/%?#@[]";

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let byte = prop_oneof![3 => prop::sample::select(BYTES), 1 => any::<u8>()];
    let m = prop_oneof![
        3 => (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Set(i, b)),
        3 => (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ];
    prop::collection::vec(m, 1..5)
}

fn mutate(base: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = base.to_vec();
    for m in mutations {
        if out.is_empty() {
            break;
        }
        let at = |i: usize, len: usize| i % len;
        match *m {
            Mutation::Set(i, b) => {
                let i = at(i, out.len());
                out[i] = b;
            }
            Mutation::Insert(i, b) => {
                let i = at(i, out.len() + 1);
                out.insert(i, b);
            }
            Mutation::Remove(i) => {
                let i = at(i, out.len());
                out.remove(i);
            }
            Mutation::Truncate(i) => {
                let i = at(i, out.len());
                out.truncate(i);
            }
        }
    }
    out
}

/// What one exchange with the live server gave: the response text, and how many requests
/// reached the app meanwhile.
struct Exchanged {
    text: String,
    forwarded: usize,
}

impl Live {
    /// Sends `payload` and reads until the server answered it or closed.
    fn exchange(&self, payload: &[u8]) -> Result<Exchanged, String> {
        self.exchange_with(payload, false)
    }

    /// [`Live::exchange`], half-closing after the payload if `half_close` (as `nc` does).
    fn exchange_with(&self, payload: &[u8], half_close: bool) -> Result<Exchanged, String> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.app.hits.load(Ordering::SeqCst);
        let text = self
            .runtime
            .block_on(exchange(self.addr, payload, half_close))?;
        let forwarded = self.app.hits.load(Ordering::SeqCst) - before;
        Ok(Exchanged { text, forwarded })
    }
}

/// Sends `payload`, half-closes if `half_close`, and reads until the server has answered it in
/// full or closed. The mutated requests are not half-closed: a truncated one would then be
/// read as the client leaving rather than reach the proxy path.
async fn exchange(addr: SocketAddr, payload: &[u8], half_close: bool) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.write_all(payload).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        // A reset after the response (unread request bytes) ends the reading like a close.
        while !answered(&out) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Err(_) => Err(format!(
            "no answer or close within 10 s after {:?}",
            String::from_utf8_lossy(&out)
        )),
        Ok(()) => Ok(String::from_utf8_lossy(&out).into_owned()),
    }
}

/// Whether `bytes` hold a complete final response: a head (past any `1xx`) and a body of its
/// `content-length` (tidegate and the test app frame every body so; anything else is read
/// until the server closes).
fn answered(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let mut rest: &str = &text;
    loop {
        let Some((head, body)) = rest.split_once("\r\n\r\n") else {
            return false;
        };
        if head.starts_with("HTTP/1.1 1") || head.starts_with("HTTP/1.0 1") {
            rest = body;
            continue;
        }
        let length = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        return length.is_some_and(|n| body.len() >= n);
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn mutated_requests_get_a_response_or_a_close_never_a_5xx(
        base in 0usize..REQUESTS.len(),
        mutations in mutations(),
    ) {
        let live = live();
        let payload = mutate(REQUESTS[base], &mutations);
        let Exchanged { text, forwarded } =
            live.exchange(&payload).map_err(TestCaseError::fail)?;
        let statuses = support::statuses(&text);
        let request = String::from_utf8_lossy(&payload);
        for &status in &statuses {
            prop_assert!(status < 500, "{status} for {request:?}:\n{text}");
        }
        // On the proxy path: what reached the app was answered, and only the app says 2xx.
        if forwarded > 0 {
            prop_assert!(!statuses.is_empty(), "forwarded, never answered: {request:?}");
        }
        if statuses.iter().any(|s| (200..300).contains(s)) {
            prop_assert!(forwarded > 0, "a 2xx the app never gave for {request:?}:\n{text}");
        }
        prop_assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0, "a connection task panicked");
        // Every so often, a valid request must still be served.
        static CASE: AtomicUsize = AtomicUsize::new(0);
        if CASE.fetch_add(1, Ordering::Relaxed).is_multiple_of(32) {
            prop_assert_eq!(still_serving(live), [200]);
        }
    }
}

/// The statuses a well-formed request gets.
fn still_serving(live: &Live) -> Vec<u16> {
    let exchanged = live
        .exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    support::statuses(&exchanged.text)
}

#[test]
fn the_fuzzed_server_serves_valid_requests() {
    assert_eq!(still_serving(live()), [200]);
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
}

/// The seeds themselves, sent the way the mutated ones are, reach the app and are answered by
/// it: the fuzzing starts from requests that take the proxy path.
#[test]
fn every_seed_request_reaches_the_app() {
    let live = live();
    for request in REQUESTS {
        let exchanged = live.exchange(request).unwrap();
        let text = String::from_utf8_lossy(request);
        assert_eq!(exchanged.forwarded, 1, "{text:?} never reached the app");
        assert_eq!(support::statuses(&exchanged.text), [200], "{text:?}");
    }
}

/// The seeds again, each followed by a half-close (`nc`, some balancers and health checkers):
/// answered all the same, bodies (chunked or not) included.
#[test]
fn every_seed_request_half_closed_is_answered() {
    let live = live();
    for request in REQUESTS {
        let exchanged = live.exchange_with(request, true).unwrap();
        let text = String::from_utf8_lossy(request);
        assert_eq!(exchanged.forwarded, 1, "{text:?} never reached the app");
        assert_eq!(support::statuses(&exchanged.text), [200], "{text:?}");
    }
}
