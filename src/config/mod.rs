//! Command-line flags, their `TIDEGATE_*` environment variables, the optional TOML file, and
//! the validated [`Config`].
//!
//! Precedence: flags > environment > `--config` file > defaults. Every flag can be set through
//! the environment variable named after it (`--max-concurrency` is `TIDEGATE_MAX_CONCURRENCY`)
//! and through the file key with underscores (`max_concurrency = 50`). Values are validated
//! once, before any socket is bound, and again on every reload.

mod args;
mod file;
pub mod route;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytesize::ByteSize;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use self::args::RESTART_ONLY;
pub(crate) use self::args::check_duration;
pub use self::args::{
    Algorithm, Args, ClientAbort, LogFormat, MAX_HEADER_BYTES_CEILING, MaxConcurrency, RuntimeMode,
    Upstream,
};

pub use self::file::FileError;
pub(crate) use self::file::content_hash;
pub use self::route::{PathMatch, Priority, RouteSpec, RouteTable};

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
    restart_ids(&command(true)).map(str::to_owned).collect()
}

/// The ids in `command`'s restart-only group (`command` must be built).
fn restart_ids(command: &clap::Command) -> impl Iterator<Item = &str> {
    command
        .get_groups()
        .filter(|g| g.get_id() == RESTART_ONLY)
        .flat_map(|g| g.get_args())
        .map(|id| id.as_str())
}

/// On reload: puts back the file words in force for each restart-only setting whose words
/// changed (and that no flag or variable overrides); returns their ids.
fn keep_restart_only(
    command: &clap::Command,
    words: &mut Vec<(String, Vec<OsString>)>,
    previous: &Config,
    explicit: &BTreeSet<String>,
) -> Vec<String> {
    let find = |list: &[(String, Vec<OsString>)], id: &str| {
        list.iter().find(|(i, _)| i == id).map(|(_, w)| w.clone())
    };
    let mut kept = Vec::new();
    for id in restart_ids(command) {
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
pub(super) fn first_line(error: &clap::Error) -> String {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

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
    pub(super) fn file(text: &str) -> PathBuf {
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

    #[test]
    fn every_duration_is_bounded_and_names_its_flag() {
        // Absurd values used to be accepted, and later overflowed time arithmetic.
        let command = Args::command();
        let mut checked = 0;
        for arg in command.get_arguments() {
            if arg
                .get_value_names()
                .is_none_or(|n| n.first().map(|n| n.as_str()) != Some("DURATION"))
            {
                continue;
            }
            let flag = format!("--{}", arg.get_long().unwrap());
            let err = parse(&[&flag, "500000000000y"]).unwrap_err();
            assert!(
                err.contains(&flag) && err.contains("at most 24h"),
                "{flag}: {err}"
            );
            let key = arg.get_id().as_str();
            let path = file(&format!("{key} = \"25h\"\n"));
            let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
            assert!(
                err.contains(&format!(":1: {key}:")) && err.contains("at most 24h"),
                "{err}"
            );
            // 24h itself parses (a cross-setting rule may still refuse it).
            let at_most = parse(&[&flag, "24h"]);
            assert!(
                at_most
                    .as_ref()
                    .map_or_else(|e| !e.contains("at most 24h"), |_| true),
                "{flag}: {at_most:?}"
            );
            checked += 1;
        }
        assert!(checked >= 15, "{checked} duration flags");
        let path = file("[[route]]\nprefix = \"/a\"\ntimeout = \"1000d\"\n");
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(
            err.contains("route[0].timeout: must be at most 24h"),
            "{err}"
        );
    }
}
