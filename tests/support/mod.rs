//! Test harness: real upstream servers, in-process tidegate servers, the real binary, and
//! clients, all on 127.0.0.1 with ephemeral ports.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tidegate::Metrics;
use tidegate::{Config, Server};
use tidegate::{DrainOutcome, Lifecycle};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

/// The body type test upstreams answer with.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body from static text.
pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The items `rx` receives, as a stream (for `StreamBody` bodies fed by a test).
pub fn channel_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Polls `check` until it returns true or `within` passes; panics with `what` on timeout.
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Async version of [`eventually`].
pub async fn eventually_async<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ===== scratch files =====

/// A fresh directory under the system's temp dir, unique to this test process and call.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tidegate-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `file_name` in a fresh scratch directory and returns its path.
pub fn scratch_file(file_name: &str, text: &str) -> std::path::PathBuf {
    let path = scratch_dir("file").join(file_name);
    std::fs::write(&path, text).unwrap();
    path
}

// ===== upstream apps =====

/// A running test upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests received.
    pub hits: Arc<AtomicUsize>,
    /// Connections that carried at least one request (tidegate's TCP health checks, which
    /// open and close a connection, are not counted).
    pub connections: Arc<AtomicUsize>,
    /// Of those, the ones that have ended (closed by either side).
    pub connections_ended: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts an HTTP/1.1 (and h2c, auto-detected) upstream answering with `handler`.
pub async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let connections_ended = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let (used, ends) = (connections.clone(), connections_ended.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let counter = counter.clone();
            let (used, ends) = (used.clone(), ends.clone());
            tokio::spawn(async move {
                let carried = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let first = carried.clone();
                let service = hyper::service::service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    if !first.swap(true, Ordering::SeqCst) {
                        used.fetch_add(1, Ordering::SeqCst);
                    }
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
                if carried.load(Ordering::SeqCst) {
                    ends.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    Upstream {
        addr,
        hits,
        connections,
        connections_ended,
        task,
    }
}

/// An upstream that answers 200 "ok".
pub async fn ok_upstream() -> Upstream {
    App::new().start().await
}

/// The configurable fake app: what it answers and how it behaves, set with its builder
/// methods, then [`App::start`]. Tests that need a behaviour of their own write a handler for
/// [`upstream`]; misbehaving apps (raw sockets) live beside their tests.
#[derive(Clone, Default)]
pub struct App {
    body: Option<&'static str>,
    delays: Vec<(&'static str, Duration)>,
    default_delay: Duration,
    workers: Option<usize>,
    echo: Echo,
    hang_while: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// What [`App`] sends back of the request.
#[derive(Clone, Copy, Default, PartialEq)]
enum Echo {
    #[default]
    Nothing,
    /// Each request header as `echo-<name>`, the version as `echo-version`, and
    /// `METHOD URI` as the body.
    Headers,
    /// The size of the request body, read whole, as the body.
    BodySize,
}

impl App {
    /// An app answering 200 "ok" at once.
    pub fn new() -> App {
        App::default()
    }

    /// Answers with `text`.
    pub fn body(mut self, text: &'static str) -> App {
        self.body = Some(text);
        self
    }

    /// Requests under `prefix` take `time` (the first matching prefix wins).
    pub fn delay(mut self, prefix: &'static str, time: Duration) -> App {
        self.delays.push((prefix, time));
        self
    }

    /// Requests under no [`App::delay`] prefix take `time`.
    pub fn default_delay(mut self, time: Duration) -> App {
        self.default_delay = time;
        self
    }

    /// `n` sync workers, as in a WSGI server: each request holds one for its whole duration,
    /// and requests beyond that wait for one.
    pub fn workers(mut self, n: usize) -> App {
        self.workers = Some(n);
        self
    }

    /// Echoes the request's headers (see [`Echo::Headers`]).
    pub fn echo_headers(mut self) -> App {
        self.echo = Echo::Headers;
        self
    }

    /// Answers with the size of the request body, read whole.
    pub fn echo_body_size(mut self) -> App {
        self.echo = Echo::BodySize;
        self
    }

    /// Every request hangs while `flag` is set.
    pub fn hang_while(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> App {
        self.hang_while = Some(flag);
        self
    }

    /// Starts it on an ephemeral port.
    pub async fn start(self) -> Upstream {
        let app = Arc::new(self);
        let workers = app.workers.map(|n| Arc::new(Semaphore::new(n)));
        upstream(move |req: Request<Incoming>| {
            let app = app.clone();
            let workers = workers.clone();
            async move { app.answer(req, workers).await }
        })
        .await
    }

    async fn answer(
        &self,
        req: Request<Incoming>,
        workers: Option<Arc<Semaphore>>,
    ) -> Response<Body> {
        let _worker = match &workers {
            Some(pool) => Some(pool.acquire().await.unwrap()),
            None => None,
        };
        if let Some(flag) = &self.hang_while {
            while flag.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let path = req.uri().path();
        let delay = self
            .delays
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix))
            .map_or(self.default_delay, |(_, time)| *time);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match self.echo {
            Echo::Nothing => Response::new(full(self.body.unwrap_or("ok"))),
            Echo::Headers => {
                let mut rsp = Response::new(full(format!("{} {}", req.method(), req.uri())));
                for (name, value) in req.headers() {
                    let echoed =
                        http::HeaderName::from_bytes(format!("echo-{name}").as_bytes()).unwrap();
                    rsp.headers_mut().append(echoed, value.clone());
                }
                rsp.headers_mut().insert(
                    "echo-version",
                    format!("{:?}", req.version()).parse().unwrap(),
                );
                rsp
            }
            Echo::BodySize => match req.into_body().collect().await {
                Ok(body) => Response::new(full(body.to_bytes().len().to_string())),
                Err(_) => Response::new(full("body error")),
            },
        }
    }
}

/// An upstream that holds every request until the test releases it.
pub struct Gate {
    pub upstream: Upstream,
    pub arrived: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    arrival: Arc<Notify>,
}

impl Gate {
    pub async fn start() -> Gate {
        let arrived = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Semaphore::new(0));
        let arrival = Arc::new(Notify::new());
        let (a, f, r, n) = (
            arrived.clone(),
            finished.clone(),
            release.clone(),
            arrival.clone(),
        );
        let upstream = upstream(move |req: Request<Incoming>| {
            let (a, f, r, n) = (a.clone(), f.clone(), r.clone(), n.clone());
            async move {
                if req.uri().path().starts_with("/free") {
                    // Says which protocol reached the app.
                    let mut response = Response::new(full("free"));
                    let version = format!("{:?}", req.version());
                    response
                        .headers_mut()
                        .insert("x-app-saw", version.parse().unwrap());
                    return response;
                }
                a.fetch_add(1, Ordering::SeqCst);
                n.notify_waiters();
                let permit = r.acquire().await.unwrap();
                permit.forget();
                f.fetch_add(1, Ordering::SeqCst);
                Response::new(full("released"))
            }
        })
        .await;
        Gate {
            upstream,
            arrived,
            finished,
            release,
            arrival,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.upstream.addr
    }

    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Waits until `n` requests have arrived in total.
    pub async fn wait_arrived(&self, n: usize) {
        eventually(
            &format!("{n} requests at the gate"),
            Duration::from_secs(10),
            || self.arrived() >= n,
        )
        .await;
    }

    /// Lets `n` held requests answer.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }
}

// ===== tidegate in process =====

/// A tidegate server running on the test's runtime (admin lane on its own thread).
pub struct Tidegate {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    pub task: tokio::task::JoinHandle<DrainOutcome>,
}

/// Starts tidegate with `--listen`/`--admin-listen` on ephemeral ports, `--upstream` pointing
/// at `upstream` (an address or a full URL), and `extra` flags.
pub async fn tidegate(upstream: impl std::fmt::Display, extra: &[&str]) -> Tidegate {
    TidegateBuilder::new(upstream).flags(extra).start().await
}

/// An in-process tidegate in front of an app, with the test defaults: ephemeral ports, no
/// access log, app checks every 100 ms. Settings are flags, as a user would give them.
pub struct TidegateBuilder {
    upstream: String,
    flags: Vec<String>,
}

impl TidegateBuilder {
    /// In front of `upstream`: an address or a full URL (`unix:/path` too).
    pub fn new(upstream: impl std::fmt::Display) -> TidegateBuilder {
        let upstream = upstream.to_string();
        let upstream =
            if upstream.contains(':') && !upstream.contains("//") && !upstream.starts_with("unix:")
            {
                format!("http://{upstream}")
            } else {
                upstream
            };
        TidegateBuilder {
            upstream,
            flags: Vec::new(),
        }
    }

    /// `--name value`.
    pub fn flag(mut self, name: &str, value: impl std::fmt::Display) -> TidegateBuilder {
        self.flags.push(name.to_owned());
        self.flags.push(value.to_string());
        self
    }

    /// More flags as given on a command line.
    pub fn flags(mut self, flags: &[&str]) -> TidegateBuilder {
        self.flags.extend(flags.iter().map(|f| (*f).to_owned()));
        self
    }

    /// `--max-concurrency N` (or `auto`).
    pub fn max_concurrency(self, n: impl std::fmt::Display) -> TidegateBuilder {
        self.flag("--max-concurrency", n)
    }

    /// `--max-queue N`.
    pub fn max_queue(self, n: usize) -> TidegateBuilder {
        self.flag("--max-queue", n)
    }

    /// `--queue-timeout D`.
    pub fn queue_timeout(self, duration: &str) -> TidegateBuilder {
        self.flag("--queue-timeout", duration)
    }

    /// `--route PREFIX=K`.
    pub fn route(self, spec: &str) -> TidegateBuilder {
        self.flag("--route", spec)
    }

    /// `--config FILE`.
    pub fn config_file(self, path: &std::path::Path) -> TidegateBuilder {
        self.flag("--config", path.display())
    }

    /// Binds, starts the admin lane and serves on the test's runtime.
    pub async fn start(self) -> Tidegate {
        let mut args = vec![
            "tidegate",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &self.upstream,
            "--access-log",
            "false",
            "--app-health-interval",
            "100ms",
        ];
        args.extend(self.flags.iter().map(String::as_str));
        let config = Config::try_from_iter(args).expect("test flags must be valid");
        let server = Server::bind(config).expect("bind");
        let addr = server.proxy_addr();
        let admin = server.admin_addr();
        let lifecycle = server.lifecycle();
        let metrics = server.metrics();
        let running = server.start().expect("start");
        let task = tokio::spawn(async move { running.run().await.expect("run") });
        Tidegate {
            addr,
            admin,
            lifecycle,
            metrics,
            task,
        }
    }
}

impl Tidegate {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let url = self.admin_url("/readyz");
        eventually_async("tidegate ready", Duration::from_secs(10), || {
            let url = url.clone();
            async move { matches!(get(&url).await, Ok((StatusCode::OK, _, _))) }
        })
        .await;
    }
}

// ===== clients =====

/// A pooled HTTP/1.1 client.
pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A pooled h2c (prior knowledge) client.
pub fn h2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET `url` on a fresh connection; returns status, headers and body text.
pub async fn get(url: &str) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let req = Request::get(url).body(empty()).unwrap();
    send(&client(), req).await
}

/// Sends `req` with `client`; returns status, headers and body text.
pub async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    req: Request<Body>,
) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let rsp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// Reads one metric sample (exact series text, e.g. `tidegate_queued`) from `/metrics`.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, _, text) = get(&format!("http://{admin}/metrics")).await.ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ===== the binary =====

/// The real `tidegate` binary running as a child process.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stderr: Arc<std::sync::Mutex<String>>,
}

impl Binary {
    /// Starts the binary with JSON logs and ephemeral ports; waits for its start-up line.
    pub fn start(upstream: &str, extra: &[&str]) -> Binary {
        Self::start_with(upstream, extra, &[], |_| {})
    }

    /// Like [`Binary::start`], with a trailing `-- CMD...` and a command hook.
    pub fn start_with(
        upstream: &str,
        extra: &[&str],
        child_command: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> Binary {
        let mut args: Vec<&str> = vec![
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--app-health-interval",
            "100ms",
        ];
        args.extend_from_slice(extra);
        if !child_command.is_empty() {
            args.push("--");
            args.extend_from_slice(child_command);
        }
        Self::start_raw(&args, customize)
    }

    /// Starts the binary with exactly `args` (plus JSON logs); waits for its start-up line.
    pub fn start_raw(args: &[&str], customize: impl FnOnce(&mut Command)) -> Binary {
        use std::io::BufRead;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidegate"));
        cmd.args(["--log-format", "json"]).args(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        customize(&mut cmd);
        let mut child = cmd.spawn().expect("spawn tidegate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Tidegate started")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("tidegate did not log its start-up line");
        let field = |name: &str| -> SocketAddr {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            v[name].as_str().unwrap().parse().unwrap()
        };
        Binary {
            addr: field("listen.addr"),
            admin: field("admin.addr"),
            child,
            stderr: log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the binary (only this process, started by the test).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the exit code, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                return status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            assert!(
                Instant::now() < deadline,
                "tidegate did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Binary::wait_exit`] off the async runtime, for async tests: the exit code and the
    /// whole log.
    pub async fn exit_and_log(mut self, within: Duration) -> (i32, String) {
        tokio::task::spawn_blocking(move || {
            let code = self.wait_exit(within);
            (code, self.log())
        })
        .await
        .unwrap()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid()).expect("the binary is running")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ===== a kubelet-like prober on its own OS thread =====

/// One blocking probe over a fresh connection, like kubelet's: `GET path`, `timeout` for all.
/// Returns the status code, or an error text.
pub fn probe_blocking(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if start.elapsed() > timeout {
            return Err("timeout".into());
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad answer: {text:?}"))
}

/// Results of a prober run.
#[derive(Debug, Default, Clone)]
pub struct ProbeStats {
    pub attempts: usize,
    pub failures: usize,
    pub max_latency: Duration,
    /// Times the failure threshold was crossed (a kubelet would restart the container).
    pub restarts: usize,
}

/// Probes `path` every `period` with `timeout` on a dedicated thread until `stop` is set.
pub fn spawn_prober(
    addr: SocketAddr,
    path: &'static str,
    period: Duration,
    timeout: Duration,
    failure_threshold: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<ProbeStats> {
    std::thread::spawn(move || {
        let mut stats = ProbeStats::default();
        let mut consecutive = 0;
        while !stop.load(Ordering::SeqCst) {
            let start = Instant::now();
            let result = probe_blocking(addr, path, timeout);
            let took = start.elapsed();
            stats.attempts += 1;
            stats.max_latency = stats.max_latency.max(took);
            if result == Ok(200) {
                consecutive = 0;
            } else {
                stats.failures += 1;
                consecutive += 1;
                if consecutive == failure_threshold {
                    stats.restarts += 1;
                    consecutive = 0;
                }
            }
            std::thread::sleep(period.saturating_sub(took));
        }
        stats
    })
}

// ===== small shared helpers =====

/// A port that was free a moment ago (for configs that need a fixed port up front). Ports
/// stay reserved for the life of the test process, so two calls never return the same port
/// (the kernel could otherwise hand out a port again before its first user binds it).
pub fn free_port() -> u16 {
    static RESERVED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut reserved = RESERVED.lock().unwrap();
        if !reserved.contains(&port) {
            reserved.push(port);
            return port;
        }
    }
}

/// Waits until the admin lane at `admin` answers `/readyz` with 200.
pub async fn wait_admin_ready(admin: SocketAddr) {
    eventually_async("ready", Duration::from_secs(20), || async move {
        matches!(
            get(&format!("http://{admin}/readyz")).await,
            Ok((StatusCode::OK, _, _))
        )
    })
    .await;
}

/// Waits (at most `within`) until `/readyz` on `admin` fails with a 503; `what` names the
/// wait if it times out.
pub async fn wait_admin_unready(admin: SocketAddr, what: &str, within: Duration) {
    eventually_async(what, within, || async move {
        get(&format!("http://{admin}/readyz")).await.map(|r| r.0)
            == Ok(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
}

/// Resident memory of process `pid` in KiB.
pub fn rss_kib_of(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs a kubelet-like prober against `admin` + `path` every 50 ms for `duration`, off the
/// async runtime, and returns what it saw.
pub async fn probe_for(admin: SocketAddr, path: &'static str, duration: Duration) -> ProbeStats {
    tokio::task::spawn_blocking(move || {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prober = spawn_prober(
            admin,
            path,
            Duration::from_millis(50),
            Duration::from_secs(1),
            3,
            stop.clone(),
        );
        std::thread::sleep(duration);
        stop.store(true, Ordering::SeqCst);
        prober.join().unwrap()
    })
    .await
    .unwrap()
}

// ===== raw sockets =====

/// Writes `payload` on a fresh connection to `addr` and reads until the server closes it (or
/// `within` passes). Returns what was read and whether the server closed the connection.
pub async fn raw_exchange(addr: SocketAddr, payload: &[u8], within: Duration) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(payload).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + within;
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_elapsed) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Waits for the peer to close `stream` (EOF, no bytes first); returns how long it took.
pub async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .expect("the connection should have been closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes: {:?}", &buf[..n]);
    start.elapsed()
}

/// The status codes of the HTTP/1.x responses in `text`, in order.
pub fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.")
        .filter(|&(i, _)| matches!(text.get(i + 7..i + 9), Some("0 " | "1 ")))
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}
