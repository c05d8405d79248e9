//! The `--config` TOML file: every flag under its name with underscores, plus `[[route]]`
//! tables. Unknown keys are errors; every error names the file, the line and the key.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use http::Method;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::route::{PathMatch, Priority, RouteSpec};
use super::{
    Algorithm, Args, ClientAbort, LogFormat, MaxConcurrency, RuntimeMode, Upstream, parse_cidr,
    parse_header_name, parse_max_concurrency, parse_upstream,
};

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("{path}: cannot read the config file")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid for tidegate.
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// The key at fault (`route[1].glob` for a route's).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The file's contents. Field names are the flags' names with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "upstream")]
    upstream: Option<Upstream>,
    admin_listen: Option<SocketAddr>,
    admin_token: Option<String>,
    #[serde(default, deserialize_with = "cidrs")]
    admin_allow: Option<Vec<IpNet>>,
    threads: Option<u16>,
    runtime: Option<RuntimeMode>,
    upstream_http2: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    upstream_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    upstream_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    park_idle_after: Option<Duration>,
    max_connections: Option<u32>,
    max_header_bytes: Option<ByteSize>,
    max_headers: Option<u32>,
    max_uri_bytes: Option<ByteSize>,
    max_request_body: Option<ByteSize>,
    h2_max_concurrent_streams: Option<u32>,
    on_client_abort: Option<ClientAbort>,
    via: Option<bool>,
    log_format: Option<LogFormat>,
    log: Option<String>,
    access_log: Option<bool>,
    #[serde(default, deserialize_with = "max_concurrency")]
    max_concurrency: Option<MaxConcurrency>,
    min_concurrency: Option<u32>,
    max_concurrency_ceiling: Option<u32>,
    adaptive_algorithm: Option<Algorithm>,
    reserved_slots: Option<u32>,
    #[serde(default, deserialize_with = "header_name")]
    priority_header: Option<http::HeaderName>,
    #[serde(default, deserialize_with = "header_name")]
    retry_header: Option<http::HeaderName>,
    #[serde(default, with = "humantime_serde")]
    retry_memory: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    queue_codel_target: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    queue_codel_interval: Option<Duration>,
    queue_lifo: Option<bool>,
    coalesce_max_body: Option<ByteSize>,
    coalesce_cache_size: Option<ByteSize>,
    retry_after_from_queue: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    retry_after_max: Option<Duration>,
    max_queue: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    queue_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_after_jitter: Option<Duration>,
    app_health_path: Option<String>,
    #[serde(default, with = "humantime_serde")]
    app_health_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    app_health_timeout: Option<Duration>,
    app_health_failure_threshold: Option<u32>,
    app_health_success_threshold: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    progress_window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_timeout: Option<Duration>,
    unready_when_saturated: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    shutdown_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    child_stop_timeout: Option<Duration>,
    #[serde(default)]
    route: Vec<toml::Spanned<FileRoute>>,
    #[serde(skip)]
    routes: Vec<RouteSpec>,
}

/// One `[[route]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    /// Label in metrics.
    name: Option<String>,
    /// Segment-wise path prefix.
    prefix: Option<String>,
    /// Exact path.
    path: Option<String>,
    /// Glob: `*` within a segment, `**` across.
    glob: Option<String>,
    /// Methods the route applies to.
    methods: Option<Vec<String>>,
    /// Slots the route may hold.
    max_concurrency: Option<u32>,
    /// Upstream response timeout.
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    /// `Retry-After` base for this route's refusals.
    #[serde(default, with = "humantime_serde")]
    retry_after: Option<Duration>,
    /// Largest request body on this route.
    max_request_body: Option<ByteSize>,
    /// Priority class of the route's requests.
    priority: Option<Priority>,
    /// Share one exchange among identical GETs.
    coalesce: Option<bool>,
    /// Keep shareable responses this long at most.
    #[serde(default, with = "humantime_serde")]
    coalesce_cache: Option<Duration>,
}

/// Reads and parses `path`; returns the settings and a hash of the contents.
pub(super) fn load(path: &Path) -> Result<(FileConfig, u64), FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut file: FileConfig = toml::from_str(&text).map_err(|e| invalid(path, &text, &e))?;
    file.routes = file
        .route
        .iter()
        .enumerate()
        .map(|(i, spanned)| {
            spanned
                .get_ref()
                .to_spec()
                .map_err(|(key, message)| FileError::Invalid {
                    path: path.to_owned(),
                    line: line_of(&text, spanned.span().start),
                    field: format!("route[{i}].{key}"),
                    message,
                })
        })
        .collect::<Result<_, _>>()?;
    Ok((file, content_hash(&text)))
}

/// Hash of a config file's text: the loader records it, the watcher compares against it.
pub(crate) fn content_hash(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

fn invalid(path: &Path, text: &str, error: &toml::de::Error) -> FileError {
    let offset = error.span().map_or(0, |s| s.start);
    let line = line_of(text, offset);
    let message = error.message().trim().to_owned();
    // serde names the key for unknown fields; otherwise it is the key on the failing line.
    let field = text
        .lines()
        .nth(line.saturating_sub(1))
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim().to_owned())
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| "(file)".to_owned());
    FileError::Invalid {
        path: path.to_owned(),
        line,
        field,
        message,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn upstream<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Upstream>, D::Error> {
    let value = String::deserialize(de)?;
    parse_upstream(&value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn max_concurrency<'de, D: Deserializer<'de>>(de: D) -> Result<Option<MaxConcurrency>, D::Error> {
    /// A number of slots or `"auto"`.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(i64),
        Text(String),
    }
    let text = match Value::deserialize(de)? {
        Value::Number(n) => n.to_string(),
        Value::Text(t) => t,
    };
    parse_max_concurrency(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn header_name<'de, D: Deserializer<'de>>(de: D) -> Result<Option<http::HeaderName>, D::Error> {
    let value = String::deserialize(de)?;
    parse_header_name(&value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn cidrs<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    Vec::<String>::deserialize(de)?
        .iter()
        .map(|value| parse_cidr(value))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

// === impl FileConfig ===

impl FileConfig {
    /// Fills `args` with the file's values, except those given by flag or environment.
    pub(super) fn apply(self, args: &mut Args, explicit: &BTreeSet<String>) {
        macro_rules! set {
            ($($field:ident),* $(,)?) => {$(
                if let Some(value) = self.$field {
                    if !explicit.contains(stringify!($field)) {
                        args.$field = value;
                    }
                }
            )*};
        }
        macro_rules! set_some {
            ($($field:ident),* $(,)?) => {$(
                if let Some(value) = self.$field {
                    if !explicit.contains(stringify!($field)) {
                        args.$field = Some(value);
                    }
                }
            )*};
        }
        set!(
            listen,
            upstream,
            admin_listen,
            runtime,
            upstream_http2,
            connect_timeout,
            upstream_idle_timeout,
            header_read_timeout,
            idle_timeout,
            park_idle_after,
            max_connections,
            max_header_bytes,
            max_headers,
            max_uri_bytes,
            h2_max_concurrent_streams,
            admin_allow,
            on_client_abort,
            via,
            log_format,
            log,
            access_log,
            queue_timeout,
            retry_after,
            retry_after_jitter,
            min_concurrency,
            max_concurrency_ceiling,
            adaptive_algorithm,
            reserved_slots,
            queue_codel_interval,
            queue_lifo,
            coalesce_max_body,
            coalesce_cache_size,
            retry_after_from_queue,
            retry_after_max,
            app_health_interval,
            app_health_timeout,
            app_health_failure_threshold,
            app_health_success_threshold,
            progress_window,
            heartbeat_timeout,
            unready_when_saturated,
            shutdown_delay,
            drain_timeout,
            child_stop_timeout,
        );
        set_some!(
            threads,
            upstream_timeout,
            max_concurrency,
            max_queue,
            app_health_path,
            admin_token,
            max_request_body,
            priority_header,
            retry_header,
            retry_memory,
            queue_codel_target,
        );
        // Routes from flags replace the file's routes as a whole.
        if !explicit.contains("routes") && !self.route.is_empty() {
            args.routes = self.routes;
        }
    }
}

// === impl FileRoute ===

impl FileRoute {
    /// The route, or the key at fault and why.
    fn to_spec(&self) -> Result<RouteSpec, (&'static str, String)> {
        let path = match (&self.prefix, &self.path, &self.glob) {
            (Some(p), None, None) => PathMatch::prefix(p).map_err(|e| ("prefix", e))?,
            (None, Some(p), None) => PathMatch::exact(p).map_err(|e| ("path", e))?,
            (None, None, Some(g)) => PathMatch::glob(g).map_err(|e| ("glob", e))?,
            _ => return Err(("prefix", "give exactly one of prefix, path or glob".into())),
        };
        let methods = match &self.methods {
            None => None,
            Some(list) if list.is_empty() => {
                return Err((
                    "methods",
                    "an empty list matches nothing; omit it for all".into(),
                ));
            }
            Some(list) => Some(
                list.iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                            .map_err(|_| ("methods", format!("{m:?} is not an HTTP method")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if self.max_concurrency == Some(0) {
            return Err(("max_concurrency", "must be at least 1".into()));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(("timeout", "must be greater than zero".into()));
        }
        if self.coalesce_cache.is_some_and(|t| t.is_zero()) {
            return Err(("coalesce_cache", "must be greater than zero".into()));
        }
        if self.coalesce == Some(false) && self.coalesce_cache.is_some() {
            return Err((
                "coalesce_cache",
                "caching needs coalescing; drop coalesce = false".into(),
            ));
        }
        let name = self.name.clone().unwrap_or_else(|| match &methods {
            Some(m) => format!(
                "{} {}",
                m.iter().map(Method::as_str).collect::<Vec<_>>().join(","),
                path.pattern()
            ),
            None => path.pattern().to_owned(),
        });
        Ok(RouteSpec {
            name,
            path,
            methods,
            limit: self.max_concurrency,
            timeout: self.timeout,
            retry_after: self.retry_after,
            max_request_body: self.max_request_body.map(|b| b.as_u64()),
            priority: self.priority,
            coalesce: self.coalesce.unwrap_or(false),
            coalesce_cache: self.coalesce_cache,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, String> {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-file-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tidegate.toml");
        std::fs::write(&path, text).unwrap();
        let result = load(&path).map(|(f, _)| f).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn full_example_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/tidegate.toml"
        ))
        .unwrap();
        let file = parse(&text).unwrap();
        assert!(file.max_concurrency.is_some());
        assert!(!file.routes.is_empty());
        assert!(file.routes.iter().any(|r| r.coalesce_cache.is_some()));
    }

    #[test]
    fn max_concurrency_is_a_number_or_auto() {
        let auto = parse("max_concurrency = \"auto\"\n").unwrap();
        assert_eq!(auto.max_concurrency, Some(MaxConcurrency::Auto));
        let fixed = parse("max_concurrency = 50\n").unwrap();
        assert_eq!(fixed.max_concurrency, Some(MaxConcurrency::Fixed(50)));
        let routes =
            parse("[[route]]\nprefix = \"/a\"\npriority = \"critical\"\ncoalesce_cache = \"5s\"\n")
                .unwrap()
                .routes;
        assert_eq!(routes[0].priority, Some(Priority::Critical));
        assert!(routes[0].coalesces());
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            (
                "max_concurrency = 4\nshutdown_delay = \"ten\"\n",
                ":2: shutdown_delay:",
            ),
            ("bogus_key = 1\n", ":1: bogus_key:"),
            ("max_concurrency = \"many\"\n", ":1: max_concurrency:"),
            ("upstream = \"ftp://x\"\n", ":1: upstream:"),
            ("listen = \"nowhere\"\n", ":1: listen:"),
            ("on_client_abort = \"maybe\"\n", ":1: on_client_abort:"),
            (
                "\n[[route]]\nprefix = \"slow\"\nmax_concurrency = 1\n",
                ":2: route[0].prefix:",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nglob = \"/b/*\"\n",
                ":1: route[0].prefix: give exactly one",
            ),
            ("[[route]]\nglob = \"/a/[\"\n", "route[0].glob:"),
            (
                "[[route]]\nprefix = \"/a\"\nmethods = [\"G ET\"]\n",
                "route[0].methods:",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nmax_concurrency = 0\n",
                "route[0].max_concurrency:",
            ),
            ("[[route]]\nprefix = \"/a\"\ncolour = \"red\"\n", "colour"),
            (
                "adaptive_algorithm = \"vegas\"\n",
                ":1: adaptive_algorithm:",
            ),
            ("priority_header = \"a b\"\n", ":1: priority_header:"),
            (
                "[[route]]\nprefix = \"/a\"\npriority = \"urgent\"\n",
                "priority",
            ),
            (
                "[[route]]\nprefix = \"/a\"\ncoalesce = false\ncoalesce_cache = \"5s\"\n",
                "route[0].coalesce_cache: caching needs coalescing",
            ),
            (
                "[[route]]\nprefix = \"/a\"\ncoalesce_cache = \"0s\"\n",
                "route[0].coalesce_cache: must be greater than zero",
            ),
            // Found by tests/fuzz.rs: a line with no key still names something.
            ("=\n", ":1: (file):"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains("tidegate.toml"), "{err}");
            assert!(err.contains(want), "{text:?}: want {want:?} in {err}");
        }
    }
}
