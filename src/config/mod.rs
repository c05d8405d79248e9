//! Command-line flags, their `TIDEGATE_*` environment variables, the optional TOML file, and
//! the validated [`Config`].
//!
//! Precedence: flags > environment > `--config` file > defaults. Every flag can be set through
//! the environment variable named after it (`--max-concurrency` is `TIDEGATE_MAX_CONCURRENCY`)
//! and through the file key with underscores (`max_concurrency = 50`). Values are validated
//! once, before any socket is bound, and again on every reload.

mod file;
pub mod route;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytesize::ByteSize;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::file::FileError;
pub(crate) use self::file::content_hash;
pub use self::route::{PathMatch, Priority, RouteSpec, RouteTable};

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

    /// Time allowed to open a connection to the app (504 when exceeded)
    #[arg(long, env = "TIDEGATE_CONNECT_TIMEOUT", default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Close a pooled connection to the app after it has been idle this long; keep it below
    /// the app's own keep-alive timeout. `0s` opens a connection per request
    #[arg(long, env = "TIDEGATE_UPSTREAM_IDLE_TIMEOUT", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
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

/// A flag combination that parses but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A route limit is larger than the global limit.
    #[error("--route {prefix}={limit}: route limit exceeds --max-concurrency {global}")]
    RouteAboveGlobal {
        /// The route's prefix.
        prefix: String,
        /// The route's limit.
        limit: u32,
        /// The global limit.
        global: u32,
    },
    /// The adaptive limit's bounds are the wrong way round.
    #[error("--min-concurrency {min}: must not exceed --max-concurrency-ceiling {max}")]
    ConcurrencyBounds {
        /// `--min-concurrency`.
        min: u32,
        /// `--max-concurrency-ceiling`.
        max: u32,
    },
    /// Reserved slots need a limit to reserve them from, and must leave room for the rest.
    #[error("--reserved-slots {reserved}: {why}")]
    ReservedSlots {
        /// The value given.
        reserved: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// `--retry-after-max` is below `--retry-after`.
    #[error("--retry-after-max: must not be below --retry-after")]
    RetryAfterBounds,
    /// The same prefix was given twice.
    #[error("--route {0}: prefix given more than once")]
    DuplicateRoute(String),
    /// `--max-queue` without `--max-concurrency` or routes has nothing to queue for.
    #[error("--max-queue needs --max-concurrency or --route")]
    QueueWithoutLimit,
    /// The health path must be an absolute path.
    #[error("--app-health-path {0:?}: must start with '/'")]
    HealthPath(String),
    /// A duration that must be positive is zero.
    #[error("--{0}: must be greater than zero")]
    ZeroDuration(&'static str),
    /// The admin token is empty or not a valid header value.
    #[error("--admin-token: must be non-empty printable ASCII without spaces")]
    AdminToken,
    /// A size limit is outside the range tidegate can enforce.
    #[error("--{name}: {value} is outside {min}..={max}")]
    SizeRange {
        /// The flag.
        name: &'static str,
        /// The value given.
        value: ByteSize,
        /// Smallest allowed.
        min: ByteSize,
        /// Largest allowed.
        max: ByteSize,
    },
    /// The command line itself is invalid.
    #[error("{0}")]
    Flags(String),
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    File(#[from] FileError),
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Effective settings: flags, environment, file and defaults merged.
    pub args: Args,
    /// The command line it was parsed from (program name first): the base of a reload.
    argv: Vec<OsString>,
    /// Whether `TIDEGATE_*` variables were read (not by `tidegate check`).
    env: bool,
    /// The config file's settings as command-line words, as applied.
    file_words: Vec<(String, Vec<OsString>)>,
    /// Hash of the config file's contents, if there is one.
    file_hash: Option<u64>,
}

/// The configuration in force, swapped whole on reload; readers take a snapshot per use.
#[derive(Clone, Debug)]
pub struct LiveConfig(Arc<ArcSwap<Config>>);

/// Largest `--max-headers`: beyond it a request head would not fit `--max-header-bytes` anyway.
const MAX_HEADERS_CEILING: i64 = 10_000;

/// Largest `--max-header-bytes` hyper's HTTP/1 read buffer can hold with room to spare.
pub const MAX_HEADER_BYTES_CEILING: ByteSize = ByteSize::kib(256);

/// The clap group of the settings that cannot change without a restart: a setting is
/// restart-only by naming it in its `#[arg]`, and a reload keeps its value in force.
const RESTART_ONLY: &str = "restart_only";

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

// === impl Config ===

impl Config {
    /// Parses flags (the first item is the program name) and environment variables, reads
    /// the `--config` file if any, and validates the result.
    pub fn try_from_iter<I, T>(iter: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Config::build(iter.into_iter().map(Into::into).collect(), true, None).map(|(c, _)| c)
    }

    /// Like [`Config::try_from_iter`] for the process's own arguments; `--help` and
    /// `--version` print and exit here.
    pub fn from_env_args() -> Result<Config, ConfigError> {
        let argv: Vec<OsString> = std::env::args_os().collect();
        if let Err(e) = command(true).try_get_matches_from(&argv)
            && !e.use_stderr()
        {
            e.exit();
        }
        Config::build(argv, true, None).map(|(c, _)| c)
    }

    /// Parses flags alone, without the environment of this process (`tidegate check` reads a
    /// manifest's). The `--config` file, if named, is read.
    pub(crate) fn without_env(argv: Vec<String>) -> Result<Config, ConfigError> {
        Config::build(argv.into_iter().map(Into::into).collect(), false, None).map(|(c, _)| c)
    }

    /// Flags and environment over the file over defaults. With `previous` (a reload), the
    /// restart-only settings keep the file's earlier values; their ids are returned.
    fn build(
        argv: Vec<OsString>,
        env: bool,
        previous: Option<&Config>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let command = command(env);
        let matches = command
            .clone()
            .try_get_matches_from(&argv)
            .map_err(|e| ConfigError::Flags(first_line(&e)))?;
        let explicit: BTreeSet<String> = command
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(str::to_owned)
            .collect();
        let mut args =
            Args::from_arg_matches(&matches).map_err(|e| ConfigError::Flags(first_line(&e)))?;
        let mut file_words = Vec::new();
        let mut file_hash = None;
        let mut kept = Vec::new();
        if let Some(path) = args.config.clone() {
            let (file, hash) = file::load(&path, &command)?;
            file_words = file.settings;
            if let Some(previous) = previous {
                kept = keep_restart_only(&command, &mut file_words, previous, &explicit);
            }
            let mut full = argv[..1].to_vec();
            for (id, words) in &file_words {
                if !explicit.contains(id) {
                    full.extend(words.iter().cloned());
                }
            }
            full.extend(argv.iter().skip(1).cloned());
            let matches = command
                .try_get_matches_from(&full)
                .map_err(|e| ConfigError::Flags(first_line(&e)))?;
            args =
                Args::from_arg_matches(&matches).map_err(|e| ConfigError::Flags(first_line(&e)))?;
            // Routes from flags replace the file's routes as a whole.
            if !explicit.contains("routes") && !file.routes.is_empty() {
                args.routes = file.routes;
            }
            file_hash = Some(hash);
        }
        args.validate()?;
        let config = Config {
            args,
            argv,
            env,
            file_words,
            file_hash,
        };
        Ok((config, kept))
    }

    /// Reads the config file again and merges it under the same flags and environment.
    /// Settings that cannot change live keep their current values (returned by name).
    pub fn reload(&self) -> Result<(Config, Vec<String>), ConfigError> {
        Config::build(self.argv.clone(), self.env, Some(self))
    }

    /// Hash of the config file's contents, if one was read.
    pub fn file_hash(&self) -> Option<u64> {
        self.file_hash
    }

    /// Effective queue bound: `--max-queue`, else the global limit (the ceiling for `auto`),
    /// else the sum of the route limits.
    pub fn max_queue(&self) -> usize {
        match (self.args.max_queue, self.args.concurrency_bound()) {
            (Some(q), _) => q as usize,
            (None, Some(n)) => n as usize,
            (None, None) => self
                .args
                .routes
                .iter()
                .filter_map(|r| r.limit)
                .map(|n| n as usize)
                .sum(),
        }
    }

    /// Worker threads for the proxy runtime: `--threads`, else what the cgroup CPU quota allows.
    pub fn worker_threads(&self) -> usize {
        match self.args.threads {
            Some(n) => n as usize,
            // std honours cgroup v1/v2 CPU quotas and the affinity mask on Linux.
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Whether tidegate runs the app as its child process.
    pub fn is_supervisor(&self) -> bool {
        !self.args.command.is_empty()
    }
}

/// The command-line parser; without `env`, `TIDEGATE_*` variables are not read.
pub(crate) fn command(env: bool) -> clap::Command {
    let mut command = Args::command();
    if !env {
        command = command.mut_args(|a| a.env(None));
    }
    // Built, so that the groups list their arguments.
    command.build();
    command
}

/// The ids of the settings that cannot change without a restart.
pub fn restart_only() -> Vec<String> {
    let command = command(true);
    command
        .get_groups()
        .filter(|g| g.get_id() == RESTART_ONLY)
        .flat_map(|g| g.get_args())
        .map(|id| id.as_str().to_owned())
        .collect()
}

/// On reload: puts back the file words in force for each restart-only setting whose words
/// changed (and that no flag or variable overrides); returns their ids.
fn keep_restart_only(
    command: &clap::Command,
    words: &mut Vec<(String, Vec<OsString>)>,
    previous: &Config,
    explicit: &BTreeSet<String>,
) -> Vec<String> {
    let restart: Vec<&str> = command
        .get_groups()
        .filter(|g| g.get_id() == RESTART_ONLY)
        .flat_map(|g| g.get_args())
        .map(|id| id.as_str())
        .collect();
    let find = |list: &[(String, Vec<OsString>)], id: &str| {
        list.iter().find(|(i, _)| i == id).map(|(_, w)| w.clone())
    };
    let mut kept = Vec::new();
    for id in restart {
        let old = find(&previous.file_words, id);
        if explicit.contains(id) || find(words, id) == old {
            continue;
        }
        words.retain(|(i, _)| i != id);
        if let Some(old) = old {
            words.push((id.to_owned(), old));
        }
        kept.push(id.to_owned());
    }
    kept
}

/// clap's first error line, without its `error: ` prefix and usage block.
fn first_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or("invalid arguments");
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

// === impl LiveConfig ===

impl LiveConfig {
    /// Shares `config` as the one in force.
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig(Arc::new(ArcSwap::from_pointee(config)))
    }

    /// A snapshot of the configuration in force.
    pub fn load(&self) -> Arc<Config> {
        self.0.load_full()
    }

    /// A short-lived view of the configuration in force, for the per-request path: it does
    /// not touch the shared reference count. Do not hold it across an `.await`.
    pub fn peek(&self) -> arc_swap::Guard<Arc<Config>> {
        self.0.load()
    }

    /// Puts `config` in force.
    pub fn store(&self, config: Config) {
        self.0.store(Arc::new(config));
    }
}

pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("{e} (expected e.g. 500ms, 15s, 2m)"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_from_iter(std::iter::once("tidegate").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.args.listen.port(), 8080);
        assert_eq!(cfg.args.on_client_abort, ClientAbort::Finish);
        assert!(cfg.args.shutdown_delay + cfg.args.drain_timeout < Duration::from_secs(30));
    }

    #[test]
    fn adaptive_and_queue_flags_are_validated_by_name() {
        let cfg = parse(&["--max-concurrency", "auto"]).unwrap();
        assert_eq!(cfg.args.max_concurrency, Some(MaxConcurrency::Auto));
        assert_eq!(cfg.max_queue(), 512, "the queue defaults to the ceiling");
        let limits = crate::admission::LimitConfig::new(&cfg);
        assert_eq!(limits.max_concurrency, None);
        assert_eq!(limits.adaptive.unwrap().min, 4);
        let cfg = parse(&["--max-concurrency", "50"]).unwrap();
        assert_eq!(cfg.args.fixed_concurrency(), Some(50));
        assert!(crate::admission::LimitConfig::new(&cfg).adaptive.is_none());
        for (args, names) in [
            (&["--max-concurrency", "0"][..], "--max-concurrency"),
            (&["--max-concurrency", "lots"], "--max-concurrency"),
            (
                &["--min-concurrency", "10", "--max-concurrency-ceiling", "5"],
                "--min-concurrency",
            ),
            (&["--reserved-slots", "1"], "--reserved-slots"),
            (
                &["--max-concurrency", "4", "--reserved-slots", "3"],
                "--reserved-slots",
            ),
            (
                &["--max-concurrency", "auto", "--reserved-slots", "3"],
                "--reserved-slots",
            ),
            (&["--priority-header", "bad header"], "--priority-header"),
            (&["--queue-codel-target", "0s"], "--queue-codel-target"),
            (
                &["--retry-after", "5s", "--retry-after-max", "2s"],
                "--retry-after-max",
            ),
            (&["--adaptive-algorithm", "vegas"], "--adaptive-algorithm"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }

    #[test]
    fn upstream_forms() {
        let cfg = parse(&["--upstream", "unix:/run/app.sock"]).unwrap();
        assert_eq!(
            cfg.args.upstream,
            Upstream::Unix {
                path: "/run/app.sock".into()
            }
        );
        let cfg = parse(&["--upstream", "http://localhost"]).unwrap();
        assert!(
            matches!(cfg.args.upstream, Upstream::Tcp { ref authority } if authority.as_str() == "localhost:80")
        );
        let err = parse(&["--upstream", "ftp://x"]).unwrap_err();
        assert!(err.contains("--upstream"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_flag() {
        let err = parse(&["--queue-timeout", "soon"]).unwrap_err();
        assert!(err.contains("--queue-timeout"), "{err}");
    }

    #[test]
    fn route_above_global_is_rejected() {
        let err = parse(&["--max-concurrency", "2", "--route", "/slow=3"]).unwrap_err();
        assert!(err.contains("--route /slow=3"), "{err}");
    }

    #[test]
    fn queue_defaults_to_the_limit() {
        let cfg = parse(&["--max-concurrency", "7"]).unwrap();
        assert_eq!(cfg.max_queue(), 7);
        let cfg = parse(&["--max-concurrency", "7", "--max-queue", "0"]).unwrap();
        assert_eq!(cfg.max_queue(), 0);
    }

    /// A config file in a fresh directory; returns its path.
    fn file(text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-config-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tidegate.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn every_flag_is_a_file_key_checked_by_the_flags_parser() {
        // Flags over the file over defaults.
        let path = file("max_concurrency = 8\nqueue_timeout = \"250ms\"\nvia = true\n");
        let config = path.to_str().unwrap();
        let cfg = parse(&["--config", config, "--max-concurrency", "3"]).unwrap();
        assert_eq!(cfg.args.fixed_concurrency(), Some(3));
        assert_eq!(cfg.args.queue_timeout, Duration::from_millis(250));
        assert!(cfg.args.via);
        // The flag's own range applies to the file's value, named by file, line and key.
        let err = parse(&["--config", file("\nthreads = 0\n").to_str().unwrap()]).unwrap_err();
        assert!(err.contains(":2: threads:"), "{err}");
        assert!(err.contains("not in 1..=1024"), "{err}");
        // An unknown key gets the nearest one.
        let err = parse(&["--config", file("max_concurency = 4\n").to_str().unwrap()]).unwrap_err();
        assert!(
            err.contains(":1: max_concurency: unknown field; did you mean `max_concurrency`?"),
            "{err}"
        );
        // Every flag but --config, the routes and the command is a file key: given its own
        // default, each parses.
        let command = Args::command();
        let mut checked = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let Some(default) = arg.get_default_values().first() else {
                continue;
            };
            let default = default.to_str().unwrap();
            let text = format!("{id} = \"{default}\"\n");
            let cfg = parse(&["--config", file(&text).to_str().unwrap()]);
            assert!(cfg.is_ok(), "{text}: {cfg:?}");
            checked += 1;
        }
        assert!(checked > 30, "{checked} defaults checked");
    }

    #[test]
    fn a_reload_keeps_restart_only_settings_and_applies_the_rest() {
        let path = file("listen = \"127.0.0.1:1\"\nmax_concurrency = 4\n");
        let cfg = parse(&["--config", path.to_str().unwrap()]).unwrap();
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:2\"\nmax_concurrency = 8\nlog = \"debug\"\n",
        )
        .unwrap();
        let (next, kept) = cfg.reload().unwrap();
        assert_eq!(kept, ["listen", "log"]);
        assert_eq!(next.args.listen, cfg.args.listen);
        assert_eq!(next.args.log, "info");
        assert_eq!(next.args.fixed_concurrency(), Some(8));
        // Reloaded again: still a restart to apply them, and the old values still in force.
        let (again, kept) = next.reload().unwrap();
        assert_eq!(kept, ["listen", "log"]);
        assert_eq!(again.args.listen, cfg.args.listen);
        assert_eq!(
            restart_only(),
            [
                "listen",
                "upstream",
                "admin_listen",
                "threads",
                "runtime",
                "upstream_http2",
                "log_format",
                "log"
            ]
        );
    }
}
