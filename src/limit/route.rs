//! Route bulkheads: `--route PREFIX=K` parsing and longest-prefix, segment-wise matching.

/// One `--route PREFIX=K` flag: requests under `prefix` may hold at most `limit` slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLimit {
    /// Normalised path prefix: starts with `/`, no trailing `/` (except the root itself).
    pub prefix: String,
    /// Slots the route may hold at once.
    pub limit: u32,
}

/// Routes ordered for longest-prefix matching.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// `(prefix, index into the original list)`, longest prefix first.
    by_length: Vec<(String, usize)>,
}

// === impl RouteLimit ===

impl RouteLimit {
    /// Parses `PREFIX=K`, e.g. `/slow=4`.
    pub fn parse(value: &str) -> Result<RouteLimit, String> {
        let (prefix, limit) = value
            .rsplit_once('=')
            .ok_or_else(|| format!("{value:?}: expected PREFIX=K, e.g. /slow=4"))?;
        if !prefix.starts_with('/') {
            return Err(format!("{value:?}: the prefix must start with '/'"));
        }
        if prefix.contains(['?', '#', '*']) {
            return Err(format!(
                "{value:?}: the prefix is a plain path, without query or glob"
            ));
        }
        let limit: u32 = limit
            .trim()
            .parse()
            .map_err(|_| format!("{value:?}: K must be a whole number of slots"))?;
        if limit == 0 {
            return Err(format!("{value:?}: K must be at least 1"));
        }
        let trimmed = prefix.trim_end_matches('/');
        let prefix = if trimmed.is_empty() { "/" } else { trimmed };
        Ok(RouteLimit {
            prefix: prefix.to_owned(),
            limit,
        })
    }
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds a table from routes; indices returned by [`RouteTable::find`] refer to `routes`.
    pub fn new(routes: &[RouteLimit]) -> RouteTable {
        let mut by_length: Vec<(String, usize)> = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.prefix.clone(), i))
            .collect();
        by_length.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        RouteTable { by_length }
    }

    /// The index of the longest route whose prefix matches `path` segment-wise.
    ///
    /// `/slow` matches `/slow` and `/slow/x` but not `/slowly`; the query is not part of `path`.
    pub fn find(&self, path: &str) -> Option<usize> {
        self.by_length
            .iter()
            .find(|(prefix, _)| matches_prefix(prefix, path))
            .map(|(_, i)| *i)
    }

    /// Whether no routes are configured.
    pub fn is_empty(&self) -> bool {
        self.by_length.is_empty()
    }
}

fn matches_prefix(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(specs: &[&str]) -> RouteTable {
        let routes: Vec<_> = specs
            .iter()
            .map(|s| RouteLimit::parse(s).unwrap())
            .collect();
        RouteTable::new(&routes)
    }

    #[test]
    fn segment_wise_matching() {
        let t = table(&["/slow=1"]);
        assert_eq!(t.find("/slow"), Some(0));
        assert_eq!(t.find("/slow/x"), Some(0));
        assert_eq!(t.find("/slowly"), None);
        assert_eq!(t.find("/"), None);
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&["/api=4", "/api/export=1", "/=10"]);
        assert_eq!(t.find("/api/export/today"), Some(1));
        assert_eq!(t.find("/api/users"), Some(0));
        assert_eq!(t.find("/other"), Some(2));
    }

    #[test]
    fn trailing_slash_is_normalised() {
        assert_eq!(RouteLimit::parse("/slow/=2").unwrap().prefix, "/slow");
        assert_eq!(RouteLimit::parse("/=2").unwrap().prefix, "/");
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!(
            RouteLimit::parse("slow=1")
                .unwrap_err()
                .contains("start with '/'")
        );
        assert!(RouteLimit::parse("/slow").unwrap_err().contains("PREFIX=K"));
        assert!(
            RouteLimit::parse("/slow=0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(
            RouteLimit::parse("/slow=x")
                .unwrap_err()
                .contains("whole number")
        );
    }
}
