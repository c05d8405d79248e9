//! The `--config` TOML file: every flag under its name with underscores, plus `[[route]]`
//! tables. Unknown keys are errors; every error names the file, the line and the key.
//!
//! No setting is declared here: the keys and their parsers are the flags' own ([`super::Args`]),
//! so a new flag is a file key at once, validated the same way.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use http::Method;
use serde::Deserialize;

use super::route::{PathMatch, Priority, RouteSpec};

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

/// The file's contents: each setting as the command-line words that give it, in the order
/// of the file, and the `[[route]]` tables.
#[derive(Debug, Default)]
pub(super) struct FileConfig {
    /// Per setting (by its clap id): the words, e.g. `--max-concurrency=50`; a switch set to
    /// `false` has none.
    pub(super) settings: Vec<(String, Vec<std::ffi::OsString>)>,
    /// The `[[route]]` tables, in order.
    pub(super) routes: Vec<RouteSpec>,
}

/// Only the `[[route]]` tables, with where each starts; other keys are read as settings.
#[derive(Debug, Default, Deserialize)]
struct FileRoutes {
    #[serde(default)]
    route: Vec<toml::Spanned<FileRoute>>,
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
///
/// Every key but `route` is a setting, named as its flag with underscores, and its value is
/// checked by the flag's own parser: a file value and a flag value are validated alike.
pub(super) fn load(path: &Path, command: &clap::Command) -> Result<(FileConfig, u64), FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: BTreeMap<String, toml::Spanned<toml::Value>> =
        toml::from_str(&text).map_err(|e| invalid(path, &text, &e))?;
    let mut settings = Vec::new();
    for (key, value) in &table {
        if key == "route" {
            continue;
        }
        let at = |message: String| FileError::Invalid {
            path: path.to_owned(),
            line: line_of(&text, value.span().start),
            field: key.clone(),
            message,
        };
        let arg = setting(command, key).ok_or_else(|| at(unknown_key(command, key)))?;
        let words = words(arg, value.get_ref()).map_err(at)?;
        settings.push((arg.get_id().as_str().to_owned(), words));
    }
    // Settings in the order of the file, so that an error names the first wrong line.
    settings.sort_by_key(|(id, _)| {
        let key = id.as_str();
        table.get(key).map_or(0, |v| v.span().start)
    });
    let file: FileRoutes = toml::from_str(&text).map_err(|e| invalid(path, &text, &e))?;
    let routes = file
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
    Ok((FileConfig { settings, routes }, content_hash(&text)))
}

/// The flag a file key names: its clap id, which is the key (`max_concurrency`). `config`, the
/// routes (`[[route]]` tables here) and the supervised command are not file keys.
fn setting<'a>(command: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    command.get_arguments().find(|arg| {
        let id = arg.get_id().as_str();
        id == key && arg.get_long().is_some() && !NOT_IN_FILE.contains(&id)
    })
}

/// Flags that have no file key.
const NOT_IN_FILE: &[&str] = &["config", "routes", "help", "version"];

/// "unknown field", with the nearest key when one is close.
fn unknown_key(command: &clap::Command, key: &str) -> String {
    let nearest = command
        .get_arguments()
        .map(|arg| arg.get_id().as_str())
        .filter(|id| setting(command, id).is_some())
        .chain(["route"])
        .map(|id| (strsim::jaro(key, id), id))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match nearest {
        Some((score, id)) if score > 0.8 => format!("unknown field; did you mean `{id}`?"),
        _ => "unknown field (keys are the flags' names with underscores; see --help)".to_owned(),
    }
}

/// The command-line words that give `arg` the file's `value`, checked by the flag's parser.
fn words(arg: &clap::Arg, value: &toml::Value) -> Result<Vec<std::ffi::OsString>, String> {
    let long = arg.get_long().unwrap_or_default();
    let repeated = matches!(arg.get_action(), clap::ArgAction::Append);
    let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
    let items = match value {
        toml::Value::Array(items) if repeated => items.iter().collect(),
        toml::Value::Array(_) => return Err("expected one value, not a list".to_owned()),
        value if repeated => vec![value],
        value => vec![value],
    };
    let mut words = Vec::new();
    for item in items {
        let text = match item {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => return Err("expected a string, a number or a boolean".to_owned()),
        };
        if switch {
            match item {
                toml::Value::Boolean(true) => words.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                _ => return Err("expected true or false".to_owned()),
            }
            continue;
        }
        let word = format!("--{long}={text}");
        // The flag's own parser and checks, alone: a command of this one flag, without its
        // environment variable.
        clap::Command::new("tidegate")
            .no_binary_name(true)
            .arg(arg.clone().env(None))
            .try_get_matches_from([&word])
            .map_err(|e| super::first_line(&e))?;
        words.push(word.into());
    }
    Ok(words)
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
        for (key, value) in [
            ("timeout", self.timeout),
            ("retry_after", self.retry_after),
            ("coalesce_cache", self.coalesce_cache),
        ] {
            if let Some(value) = value {
                super::check_duration(value).map_err(|e| (key, e))?;
            }
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
        let path = super::super::tests::file(text);
        let result = load(&path, &super::super::command(true))
            .map(|(f, _)| f)
            .map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
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
        assert!(file.settings.iter().any(|(id, _)| id == "max_concurrency"));
        assert!(!file.routes.is_empty());
        assert!(file.routes.iter().any(|r| r.coalesce_cache.is_some()));
    }

    #[test]
    fn max_concurrency_is_a_number_or_auto() {
        let words = |text: &str| parse(text).unwrap().settings;
        assert_eq!(
            words("max_concurrency = \"auto\"\n"),
            [(
                "max_concurrency".into(),
                vec!["--max-concurrency=auto".into()]
            )]
        );
        assert_eq!(
            words("max_concurrency = 50\nvia = false\nupstream_http2 = true\n"),
            [
                (
                    "max_concurrency".into(),
                    vec!["--max-concurrency=50".into()]
                ),
                ("via".into(), vec![]),
                ("upstream_http2".into(), vec!["--upstream-http2".into()]),
            ]
        );
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
