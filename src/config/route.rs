//! Routes: what a request matches (path prefix, exact path or glob, optional methods) and the
//! per-route settings (slot limit, upstream timeout, `Retry-After`, priority, coalescing).
//!
//! Matching order: exact paths first, then globs in the order given, then the longest prefix.
//! Prefixes match segment-wise: `/slow` matches `/slow` and `/slow/x`, not `/slowly`.

use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

/// How early a request is served and how late it is shed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize, Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    /// May use the reserved slots, is served first and shed last.
    Critical,
    /// The default.
    #[default]
    Normal,
    /// Served after everything else, the first to be pushed out of a full queue.
    Low,
}

/// How a route matches the request path (the query is never part of it).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Segment-wise prefix.
    Prefix(String),
    /// The whole path.
    Exact(String),
    /// A glob: `*` matches within one segment, `**` across segments.
    Glob(String, globset::GlobMatcher),
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Label in metrics; defaults to the pattern (and methods).
    pub name: String,
    /// Path match.
    pub path: PathMatch,
    /// Methods the route applies to; `None` is all.
    pub methods: Option<Vec<Method>>,
    /// Slots the route may hold at once; `None` is no route limit.
    pub limit: Option<u32>,
    /// Upstream response timeout for this route (overrides `--upstream-timeout`).
    pub timeout: Option<Duration>,
    /// `Retry-After` base for refusals on this route (overrides `--retry-after`).
    pub retry_after: Option<Duration>,
    /// Largest request body in bytes on this route (overrides `--max-request-body`).
    pub max_request_body: Option<u64>,
    /// Priority class of the route's requests (a `--priority-header` on the request wins).
    pub priority: Option<super::Priority>,
    /// Identical idempotent GETs share one exchange with the app (see `coalesce`).
    pub coalesce: bool,
    /// Keep shareable responses with an explicit lifetime for at most this long (implies
    /// `coalesce`).
    pub coalesce_cache: Option<Duration>,
}

/// Routes ordered for matching.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Indices into the route list, in matching order.
    order: Vec<usize>,
}

// === impl PathMatch ===

impl PathMatch {
    /// A normalised prefix: starts with `/`, no trailing `/` (except the root).
    pub fn prefix(prefix: &str) -> Result<PathMatch, String> {
        check_path(prefix)?;
        let trimmed = prefix.trim_end_matches('/');
        Ok(PathMatch::Prefix(
            if trimmed.is_empty() { "/" } else { trimmed }.to_owned(),
        ))
    }

    /// An exact path.
    pub fn exact(path: &str) -> Result<PathMatch, String> {
        check_path(path)?;
        Ok(PathMatch::Exact(path.to_owned()))
    }

    /// A glob such as `/api/*/export` or `/static/**`.
    pub fn glob(pattern: &str) -> Result<PathMatch, String> {
        if !pattern.starts_with('/') {
            return Err(format!("{pattern:?}: must start with '/'"));
        }
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("{pattern:?}: {e}"))?;
        Ok(PathMatch::Glob(pattern.to_owned(), glob.compile_matcher()))
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        match self {
            PathMatch::Prefix(p) | PathMatch::Exact(p) | PathMatch::Glob(p, _) => p,
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) if prefix == "/" => true,
            PathMatch::Prefix(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/'),
                None => false,
            },
            PathMatch::Exact(exact) => exact == path,
            PathMatch::Glob(_, matcher) => matcher.is_match(path),
        }
    }

    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(_) => (0, 0),
            PathMatch::Glob(..) => (1, 0),
            // Longest first.
            PathMatch::Prefix(p) => (2, usize::MAX - p.len()),
        }
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?}: must start with '/'"));
    }
    if path.contains(['?', '#', '*']) {
        return Err(format!(
            "{path:?}: a plain path, without query or glob characters"
        ));
    }
    Ok(())
}

// === impl RouteSpec ===

impl RouteSpec {
    /// A route named `name` matching `path`, for all methods, with no settings of its own.
    pub fn new(name: impl Into<String>, path: PathMatch) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            path,
            methods: None,
            limit: None,
            timeout: None,
            retry_after: None,
            max_request_body: None,
            priority: None,
            coalesce: false,
            coalesce_cache: None,
        }
    }

    /// Parses the `--route PREFIX=K` flag, e.g. `/slow=4`.
    pub fn parse_flag(value: &str) -> Result<RouteSpec, String> {
        let (prefix, limit) = value
            .rsplit_once('=')
            .ok_or_else(|| format!("{value:?}: expected PREFIX=K, e.g. /slow=4"))?;
        let path = PathMatch::prefix(prefix).map_err(|e| format!("{value:?}: prefix {e}"))?;
        let limit: u32 = limit
            .trim()
            .parse()
            .map_err(|_| format!("{value:?}: K must be a whole number of slots"))?;
        if limit == 0 {
            return Err(format!("{value:?}: K must be at least 1"));
        }
        Ok(RouteSpec {
            limit: Some(limit),
            ..RouteSpec::new(path.pattern().to_owned(), path)
        })
    }

    /// Identity across reloads: the same pattern and methods are the same route.
    pub fn key(&self) -> String {
        let kind = match self.path {
            PathMatch::Prefix(_) => "prefix",
            PathMatch::Exact(_) => "exact",
            PathMatch::Glob(..) => "glob",
        };
        let methods = self
            .methods
            .as_ref()
            .map(|m| m.iter().map(Method::as_str).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        format!("{kind}:{}:{methods}", self.path.pattern())
    }

    /// Whether identical GETs on the route share one exchange (`coalesce`, or a cache).
    pub fn coalesces(&self) -> bool {
        self.coalesce || self.coalesce_cache.is_some()
    }

    /// Whether a request matches this route.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.contains(method)) && self.path.matches(path)
    }
}

// === impl RouteTable ===

impl RouteTable {
    /// Orders `routes` for matching; indices from [`RouteTable::find`] refer to `routes`.
    pub fn new(routes: &[RouteSpec]) -> RouteTable {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        // Stable: globs keep the order they were given in.
        order.sort_by_key(|&i| routes[i].path.rank());
        RouteTable { order }
    }

    /// The first route in matching order that matches.
    pub fn find(&self, routes: &[RouteSpec], method: &Method, path: &str) -> Option<usize> {
        self.order
            .iter()
            .copied()
            .find(|&i| routes[i].matches(method, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(specs: &[&str]) -> Vec<RouteSpec> {
        specs
            .iter()
            .map(|s| RouteSpec::parse_flag(s).unwrap())
            .collect()
    }

    fn find(routes: &[RouteSpec], method: Method, path: &str) -> Option<usize> {
        RouteTable::new(routes).find(routes, &method, path)
    }

    #[test]
    fn segment_wise_prefix_matching() {
        let r = flags(&["/slow=1"]);
        assert_eq!(find(&r, Method::GET, "/slow"), Some(0));
        assert_eq!(find(&r, Method::GET, "/slow/x"), Some(0));
        assert_eq!(find(&r, Method::GET, "/slowly"), None);
        assert_eq!(find(&r, Method::GET, "/"), None);
    }

    #[test]
    fn longest_prefix_wins() {
        let r = flags(&["/api=4", "/api/export=1", "/=10"]);
        assert_eq!(find(&r, Method::GET, "/api/export/today"), Some(1));
        assert_eq!(find(&r, Method::GET, "/api/users"), Some(0));
        assert_eq!(find(&r, Method::GET, "/other"), Some(2));
    }

    #[test]
    fn exact_then_glob_then_prefix_and_methods() {
        let mut r = flags(&["/api=4"]);
        r.push(RouteSpec {
            methods: Some(vec![Method::POST]),
            limit: Some(1),
            ..RouteSpec::new("export", PathMatch::glob("/api/*/export").unwrap())
        });
        r.push(RouteSpec::new(
            "health",
            PathMatch::exact("/api/health").unwrap(),
        ));
        assert_eq!(find(&r, Method::GET, "/api/health"), Some(2));
        assert_eq!(find(&r, Method::POST, "/api/users/export"), Some(1));
        assert_eq!(
            find(&r, Method::GET, "/api/users/export"),
            Some(0),
            "method must match"
        );
        assert_eq!(
            find(&r, Method::POST, "/api/a/b/export"),
            Some(0),
            "* stays in a segment"
        );
    }

    #[test]
    fn trailing_slash_is_normalised() {
        assert_eq!(
            RouteSpec::parse_flag("/slow/=2").unwrap().path.pattern(),
            "/slow"
        );
        assert_eq!(RouteSpec::parse_flag("/=2").unwrap().path.pattern(), "/");
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!(
            RouteSpec::parse_flag("slow=1")
                .unwrap_err()
                .contains("start with '/'")
        );
        assert!(
            RouteSpec::parse_flag("/slow")
                .unwrap_err()
                .contains("PREFIX=K")
        );
        assert!(
            RouteSpec::parse_flag("/slow=0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(
            RouteSpec::parse_flag("/slow=x")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(PathMatch::glob("/a/[").is_err());
    }
}
