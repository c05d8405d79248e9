//! The settings, each declared once: a field of [`Args`] with its `#[arg]` gives the flag, the
//! `TIDEGATE_*` variable, the file key (the field's name), the parser and its range, and whether
//! it can change live (`group = RESTART_ONLY` when it cannot). Cross-setting rules are in
//! [`Args::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::route::RouteSpec;

/// Parsed command line of the `tidegate` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tidegate",
    group = clap::ArgGroup::new(RESTART_ONLY).multiple(true),
    version,
    about = "Sidecar reverse proxy that sheds load, answers probes on a reserved lane and drains on SIGTERM",
    after_help = "Every flag can also be set with the environment variable TIDEGATE_<FLAG> \
                  (e.g. TIDEGATE_MAX_CONCURRENCY). Durations use humantime syntax: 500ms, 15s, 2m.\n\
                  Supervisor mode: tidegate [FLAGS] -- CMD [ARGS...] runs the app as a child process.\n\
                  Manifest checks: tidegate check [FILE|DIR|-]... (see tidegate check --help)."
)]
pub struct Args {
    /// TOML file with any of these settings (keys are flag names with underscores) and routes
    #[arg(long, env = "TIDEGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address the proxy listens on for app traffic
    #[arg(
        long, group = RESTART_ONLY,
        env = "TIDEGATE_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// The app: http://host:port or unix:/path/to.sock
    #[arg(long, group = RESTART_ONLY, env = "TIDEGATE_UPSTREAM", default_value = "http://127.0.0.1:8000", value_name = "URL", value_parser = parse_upstream)]
    pub upstream: Upstream,

    /// Address of the admin listener (/livez, /readyz, /app/livez, /metrics, /state, /prestop, /drain)
    #[arg(
        long, group = RESTART_ONLY,
        env = "TIDEGATE_ADMIN_LISTEN",
        default_value = "0.0.0.0:9901",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,

    /// Require `Authorization: Bearer TOKEN` on /prestop and /drain (probes and /metrics stay open)
    #[arg(
        long,
        env = "TIDEGATE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Clients allowed to call /prestop and /drain, as CIDRs (repeatable) [default: any]
    #[arg(long, env = "TIDEGATE_ADMIN_ALLOW", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    pub admin_allow: Vec<IpNet>,

    /// Worker threads of the proxy runtime [default: CPUs allowed by the cgroup quota]
    #[arg(long, group = RESTART_ONLY, env = "TIDEGATE_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// How the proxy threads share work: one work-stealing runtime, or a runtime per thread
    /// each accepting on the shared listener with its own upstream pool
    #[arg(long, group = RESTART_ONLY, env = "TIDEGATE_RUNTIME", value_enum, default_value_t = RuntimeMode::Shared)]
    pub runtime: RuntimeMode,

    /// Speak HTTP/2 with prior knowledge (h2c) to the app
    #[arg(long, group = RESTART_ONLY, env = "TIDEGATE_UPSTREAM_HTTP2")]
    pub upstream_http2: bool,

    /// With --upstream-http2: largest request body kept to send the request again when the app
    /// refuses its stream or goes away before processing it; larger ones then get a 502
    #[arg(long, env = "TIDEGATE_UPSTREAM_H2_RETRY_BODY", default_value = "64KiB", value_name = "SIZE", value_parser = parse_size)]
    pub upstream_h2_retry_body: ByteSize,

    /// Time allowed to open a connection to the app (504 when exceeded)
    #[arg(long, env = "TIDEGATE_CONNECT_TIMEOUT", default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Close a pooled connection to the app after it has been idle this long; keep it below
    /// the app's own keep-alive timeout. `0s` opens a connection per request
    #[arg(long, env = "TIDEGATE_UPSTREAM_IDLE_TIMEOUT", default_value = "1500ms", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Time allowed for the app's response head per request (504 when exceeded) [default: none]
    #[arg(long, env = "TIDEGATE_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub upstream_timeout: Option<Duration>,

    /// Time a client has to send a complete request head (slowloris guard)
    #[arg(long, env = "TIDEGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Close a client connection that has had no request in flight for this long
    #[arg(long, env = "TIDEGATE_IDLE_TIMEOUT", default_value = "90s", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Free an idle HTTP/1.1 connection's buffers (about 24 KiB) after it has had no request
    /// in flight for this long; the connection stays open and wakes on its next byte. `0s`
    /// parks at once; a value at or above --idle-timeout never parks
    #[arg(long, env = "TIDEGATE_PARK_IDLE_AFTER", default_value = "100ms", value_name = "DURATION", value_parser = parse_duration)]
    pub park_idle_after: Duration,

    /// Open client connections at most; beyond it a new connection gets a 503 and is closed
    #[arg(long, env = "TIDEGATE_MAX_CONNECTIONS", default_value_t = 20_000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Largest request head, request line and header fields together (431 beyond)
    #[arg(long, env = "TIDEGATE_MAX_HEADER_BYTES", default_value = "64KiB", value_name = "SIZE", value_parser = parse_size)]
    pub max_header_bytes: ByteSize,

    /// Most header fields in a request (431 beyond)
    #[arg(long, env = "TIDEGATE_MAX_HEADERS", default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_HEADERS_CEILING))]
    pub max_headers: u32,

    /// Longest request target, path and query (414 beyond)
    #[arg(long, env = "TIDEGATE_MAX_URI_BYTES", default_value = "8KiB", value_name = "SIZE", value_parser = parse_size)]
    pub max_uri_bytes: ByteSize,

    /// Largest request body; a route may set its own (413 beyond) [default: unlimited]
    #[arg(long, env = "TIDEGATE_MAX_REQUEST_BODY", value_name = "SIZE", value_parser = parse_size)]
    pub max_request_body: Option<ByteSize>,

    /// Streams one HTTP/2 client connection may have open at once
    #[arg(long, env = "TIDEGATE_H2_MAX_CONCURRENT_STREAMS", default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub h2_max_concurrent_streams: u32,

    /// What happens to the app's exchange when the client disconnects mid-request
    #[arg(long, env = "TIDEGATE_ON_CLIENT_ABORT", value_enum, default_value_t = ClientAbort::Finish)]
    pub on_client_abort: ClientAbort,

    /// With --on-client-abort finish: longest an exchange whose client left is finished in
    /// the background before it is cut
    #[arg(long, env = "TIDEGATE_ABANDONED_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub abandoned_timeout: Duration,

    /// Add a `Via: 1.1 tidegate` header both ways
    #[arg(long, env = "TIDEGATE_VIA")]
    pub via: bool,

    /// Log format
    #[arg(long, group = RESTART_ONLY, env = "TIDEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing env-filter syntax, e.g. `info` or `tidegate=debug`)
    #[arg(
        long, group = RESTART_ONLY,
        env = "TIDEGATE_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,

    /// Log one line per proxied request
    #[arg(long, env = "TIDEGATE_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub access_log: bool,

    /// Requests in flight to the app at most, or `auto` to follow the app's latency [default: unlimited]
    #[arg(long, env = "TIDEGATE_MAX_CONCURRENCY", value_name = "N|auto", value_parser = parse_max_concurrency)]
    pub max_concurrency: Option<MaxConcurrency>,

    /// With --max-concurrency auto: the lowest limit (also the starting point)
    #[arg(long, env = "TIDEGATE_MIN_CONCURRENCY", default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub min_concurrency: u32,

    /// With --max-concurrency auto: the highest limit
    #[arg(long, env = "TIDEGATE_MAX_CONCURRENCY_CEILING", default_value_t = 512, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency_ceiling: u32,

    /// With --max-concurrency auto: how the limit follows latency
    #[arg(
        long,
        env = "TIDEGATE_ADAPTIVE_ALGORITHM",
        value_enum,
        default_value = "gradient",
        value_name = "ALGORITHM"
    )]
    pub adaptive_algorithm: Algorithm,

    /// Slots only `critical` requests may take (at most half the limit is ever reserved)
    #[arg(
        long,
        env = "TIDEGATE_RESERVED_SLOTS",
        default_value_t = 0,
        value_name = "N"
    )]
    pub reserved_slots: u32,

    /// Request header naming the priority class: critical, normal or low [default: route's, else normal]
    #[arg(long, env = "TIDEGATE_PRIORITY_HEADER", value_name = "NAME", value_parser = parse_header_name)]
    pub priority_header: Option<http::HeaderName>,

    /// Request header marking a retry (any value but 0): retries queue behind first attempts
    #[arg(long, env = "TIDEGATE_RETRY_HEADER", value_name = "NAME", value_parser = parse_header_name)]
    pub retry_header: Option<http::HeaderName>,

    /// Treat a client's requests as retries for this long after it was refused [default: off]
    #[arg(long, env = "TIDEGATE_RETRY_MEMORY", value_name = "DURATION", value_parser = parse_duration)]
    pub retry_memory: Option<Duration>,

    /// Once the queue is overloaded, refuse requests that waited longer than this (controlled delay) [default: off]
    #[arg(long, env = "TIDEGATE_QUEUE_CODEL_TARGET", value_name = "DURATION", value_parser = parse_duration)]
    pub queue_codel_target: Option<Duration>,

    /// The queue counts as overloaded once it has not been empty for this long
    #[arg(long, env = "TIDEGATE_QUEUE_CODEL_INTERVAL", default_value = "100ms", value_name = "DURATION", value_parser = parse_duration)]
    pub queue_codel_interval: Duration,

    /// Serve the newest queued request first while the queue is overloaded (adaptive LIFO)
    #[arg(long, env = "TIDEGATE_QUEUE_LIFO", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub queue_lifo: bool,

    /// Largest response shared between coalesced requests; larger ones are sent to each alone
    #[arg(long, env = "TIDEGATE_COALESCE_MAX_BODY", default_value = "1MiB", value_name = "SIZE", value_parser = parse_size)]
    pub coalesce_max_body: ByteSize,

    /// Requests that may wait for an identical request's response at once, all routes
    /// together; the excess is refused with a 503 coalesce-full
    #[arg(long, env = "TIDEGATE_COALESCE_MAX_WAITING", default_value_t = 1024, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub coalesce_max_waiting: u32,

    /// Longest a request waits for an identical request's response before a 503 coalesce-wait
    #[arg(long, env = "TIDEGATE_COALESCE_MAX_WAIT", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub coalesce_max_wait: Duration,

    /// Bytes the coalescing cache may hold (routes with coalesce_cache), bodies and headers
    #[arg(long, env = "TIDEGATE_COALESCE_CACHE_SIZE", default_value = "16MiB", value_name = "SIZE", value_parser = parse_size)]
    pub coalesce_cache_size: ByteSize,

    /// Requests that may wait for a slot, all routes together [default: --max-concurrency]
    #[arg(long, env = "TIDEGATE_MAX_QUEUE", value_name = "N")]
    pub max_queue: Option<u32>,

    /// Longest a request waits in the queue before a 503 queue-timeout
    #[arg(long, env = "TIDEGATE_QUEUE_TIMEOUT", default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub queue_timeout: Duration,

    /// Route bulkhead PREFIX=K: requests under PREFIX hold at most K slots (repeatable)
    #[arg(long = "route", env = "TIDEGATE_ROUTE", value_name = "PREFIX=K", value_delimiter = ',', value_parser = parse_route)]
    pub routes: Vec<RouteSpec>,

    /// Base Retry-After sent with 503 refusals
    #[arg(long, env = "TIDEGATE_RETRY_AFTER", default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub retry_after: Duration,

    /// Estimate Retry-After from the queue (queue length over service rate), within --retry-after..=--retry-after-max
    #[arg(long, env = "TIDEGATE_RETRY_AFTER_FROM_QUEUE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub retry_after_from_queue: bool,

    /// Largest estimated Retry-After
    #[arg(long, env = "TIDEGATE_RETRY_AFTER_MAX", default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub retry_after_max: Duration,

    /// Random extra Retry-After, so refused clients do not return in lockstep
    #[arg(long, env = "TIDEGATE_RETRY_AFTER_JITTER", default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub retry_after_jitter: Duration,

    /// Path of the app's health endpoint [default: a TCP connect check]
    #[arg(long, env = "TIDEGATE_APP_HEALTH_PATH", value_name = "PATH")]
    pub app_health_path: Option<String>,

    /// Time between app health checks
    #[arg(long, env = "TIDEGATE_APP_HEALTH_INTERVAL", default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub app_health_interval: Duration,

    /// Time one app health check may take
    #[arg(long, env = "TIDEGATE_APP_HEALTH_TIMEOUT", default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub app_health_timeout: Duration,

    /// Consecutive failed checks that make the app unhealthy
    #[arg(long, env = "TIDEGATE_APP_HEALTH_FAILURE_THRESHOLD", default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub app_health_failure_threshold: u32,

    /// Consecutive passed checks that make the app healthy again
    #[arg(long, env = "TIDEGATE_APP_HEALTH_SUCCESS_THRESHOLD", default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub app_health_success_threshold: u32,

    /// /app/livez fails when the app neither passed a check nor completed a response for this long
    #[arg(long, env = "TIDEGATE_PROGRESS_WINDOW", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub progress_window: Duration,

    /// /livez fails when the proxy runtime's heartbeat is older than this
    #[arg(long, env = "TIDEGATE_HEARTBEAT_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Fail /readyz while the queue is full (off: every replica may go unready at once)
    #[arg(long, env = "TIDEGATE_UNREADY_WHEN_SATURATED")]
    pub unready_when_saturated: bool,

    /// On SIGTERM, keep serving this long with /readyz failing before closing listeners
    #[arg(long, env = "TIDEGATE_SHUTDOWN_DELAY", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Longest wait for in-flight requests once listeners are closed
    #[arg(long, env = "TIDEGATE_DRAIN_TIMEOUT", default_value = "15s", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Supervisor mode: time between SIGTERM and SIGKILL for the child
    #[arg(long, env = "TIDEGATE_CHILD_STOP_TIMEOUT", default_value = "4s", value_name = "DURATION", value_parser = parse_duration)]
    pub child_stop_timeout: Duration,

    /// Supervisor mode: the app command to run as a child, after `--`
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `--max-concurrency`: a fixed number of slots, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxConcurrency {
    /// At most this many requests in flight.
    Fixed(u32),
    /// A limit that follows the app's latency, within `--min-concurrency` and
    /// `--max-concurrency-ceiling`.
    Auto,
}

/// Where the app listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// `http://host:port`: TCP, resolved on each new connection.
    Tcp {
        /// `host:port` as given.
        authority: http::uri::Authority,
    },
    /// `unix:/path`: a Unix domain socket.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
}

/// How the proxy lane's threads are organised.
#[derive(Debug, Copy, Clone, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeMode {
    /// One tokio runtime; with several threads, they steal work from each other.
    Shared,
    /// One single-threaded runtime per thread, each accepting connections on the shared
    /// listener and keeping its own pool of upstream connections (no work stealing).
    PerThread,
}

/// What to do with the app's exchange when the client goes away mid-request.
#[derive(Debug, Copy, Clone, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAbort {
    /// Let the app finish and discard its response; the slot stays held until it does.
    Finish,
    /// Close the upstream request at once.
    Cancel,
}

/// How the limit moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Scale by the ratio of no-load to recent latency (Gradient2-like).
    Gradient,
    /// Additive increase, multiplicative decrease on latency above the tolerance.
    Aimd,
}

/// Log output format.
#[derive(Debug, Copy, Clone, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Largest `--max-headers`: beyond it a request head would not fit `--max-header-bytes` anyway.
const MAX_HEADERS_CEILING: i64 = 10_000;

/// Largest `--max-header-bytes` hyper's HTTP/1 read buffer can hold with room to spare.
pub const MAX_HEADER_BYTES_CEILING: ByteSize = ByteSize::kib(256);

/// The clap group of the settings that cannot change without a restart: a setting is
/// restart-only by naming it in its `#[arg]`, and a reload keeps its value in force.
pub(super) const RESTART_ONLY: &str = "restart_only";

// === impl Args ===

impl Args {
    /// The fixed global limit, if there is one.
    pub fn fixed_concurrency(&self) -> Option<u32> {
        match self.max_concurrency {
            Some(MaxConcurrency::Fixed(n)) => Some(n),
            _ => None,
        }
    }

    /// The most requests that can ever be in flight: the fixed limit, or the adaptive
    /// limit's ceiling; `None` when unlimited.
    pub fn concurrency_bound(&self) -> Option<u32> {
        match self.max_concurrency? {
            MaxConcurrency::Fixed(n) => Some(n),
            MaxConcurrency::Auto => Some(self.max_concurrency_ceiling),
        }
    }

    /// Validates cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_queue.is_some() && self.max_concurrency.is_none() && self.routes.is_empty() {
            return Err(ConfigError::QueueWithoutLimit);
        }
        if self.min_concurrency > self.max_concurrency_ceiling {
            return Err(ConfigError::ConcurrencyBounds {
                min: self.min_concurrency,
                max: self.max_concurrency_ceiling,
            });
        }
        if self.reserved_slots > 0 {
            let why = match self.max_concurrency {
                None => Some("needs --max-concurrency"),
                Some(MaxConcurrency::Fixed(n)) if self.reserved_slots * 2 > n => {
                    Some("must be at most half of --max-concurrency")
                }
                Some(MaxConcurrency::Auto) if self.reserved_slots * 2 > self.min_concurrency => {
                    Some("must be at most half of --min-concurrency")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(ConfigError::ReservedSlots {
                    reserved: self.reserved_slots,
                    why,
                });
            }
        }
        if self.retry_after_max < self.retry_after {
            return Err(ConfigError::RetryAfterBounds);
        }
        let mut seen = std::collections::HashSet::new();
        for route in &self.routes {
            if !seen.insert(route.key()) {
                return Err(ConfigError::DuplicateRoute(route.name.clone()));
            }
            if let (Some(global), Some(limit)) = (self.concurrency_bound(), route.limit)
                && limit > global
            {
                return Err(ConfigError::RouteAboveGlobal {
                    prefix: route.name.clone(),
                    limit,
                    global,
                });
            }
        }
        if let Some(path) = &self.app_health_path
            && !path.starts_with('/')
        {
            return Err(ConfigError::HealthPath(path.clone()));
        }
        for (name, value) in [
            ("connect-timeout", self.connect_timeout),
            ("header-read-timeout", self.header_read_timeout),
            ("app-health-interval", self.app_health_interval),
            ("app-health-timeout", self.app_health_timeout),
            ("progress-window", self.progress_window),
            ("heartbeat-timeout", self.heartbeat_timeout),
            ("idle-timeout", self.idle_timeout),
            ("queue-codel-interval", self.queue_codel_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if self.upstream_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("upstream-timeout"));
        }
        if self.queue_codel_target.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("queue-codel-target"));
        }
        if self.retry_memory.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroDuration("retry-memory"));
        }
        for (name, value, min, max) in [
            (
                "max-header-bytes",
                self.max_header_bytes,
                ByteSize::kib(1),
                MAX_HEADER_BYTES_CEILING,
            ),
            (
                "max-uri-bytes",
                self.max_uri_bytes,
                ByteSize::b(16),
                self.max_header_bytes,
            ),
        ] {
            if value < min || value > max {
                return Err(ConfigError::SizeRange {
                    name,
                    value,
                    min,
                    max,
                });
            }
        }
        if let Some(token) = &self.admin_token
            && (token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::AdminToken);
        }
        Ok(())
    }
}

/// Longest duration any setting takes: beyond it a value is a mistake, and time arithmetic
/// with it could overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Every duration setting's parser (flags, variables and the file alike): humantime syntax,
/// at most [`MAX_DURATION`].
pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|e| format!("{e} (expected e.g. 500ms, 15s, 2m)"))?;
    check_duration(duration)
}

/// `duration`, if it is at most [`MAX_DURATION`].
pub(crate) fn check_duration(duration: Duration) -> Result<Duration, String> {
    if duration > MAX_DURATION {
        return Err("must be at most 24h".to_owned());
    }
    Ok(duration)
}

pub(crate) fn parse_upstream(value: &str) -> Result<Upstream, String> {
    if let Some(path) = value.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err("unix: needs a socket path, e.g. unix:/run/app.sock".into());
        }
        return Ok(Upstream::Unix { path: path.into() });
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("{e} (expected http://host:port or unix:/path)"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https upstreams are not supported; the app is local".into()),
        _ => return Err("expected http://host:port or unix:/path".into()),
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err("the upstream URL must not have a path".into());
    }
    let authority = uri.authority().cloned().ok_or("missing host")?;
    let authority = if authority.port_u16().is_some() {
        authority
    } else {
        format!("{}:80", authority.host())
            .parse()
            .map_err(|e| format!("{e}"))?
    };
    Ok(Upstream::Tcp { authority })
}

pub(crate) fn parse_size(value: &str) -> Result<ByteSize, String> {
    value
        .trim()
        .parse::<ByteSize>()
        .map_err(|e| format!("{e} (expected bytes or e.g. 64KiB, 10MiB)"))
}

pub(crate) fn parse_cidr(value: &str) -> Result<IpNet, String> {
    let value = value.trim();
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{value:?} is not an IP address or CIDR (e.g. 10.0.0.0/8)"))
}

pub(crate) fn parse_max_concurrency(value: &str) -> Result<MaxConcurrency, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("auto") {
        return Ok(MaxConcurrency::Auto);
    }
    match value.parse::<u32>() {
        Ok(0) => Err("must be at least 1 (or auto)".into()),
        Ok(n) => Ok(MaxConcurrency::Fixed(n)),
        Err(_) => Err(format!(
            "{value:?}: expected a whole number of slots or auto"
        )),
    }
}

pub(crate) fn parse_header_name(value: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(value.trim().as_bytes())
        .map_err(|_| format!("{value:?} is not a valid header name"))
}

fn parse_route(value: &str) -> Result<RouteSpec, String> {
    RouteSpec::parse_flag(value)
}
