//! The HTTP rules coalescing and the cache follow: which requests are identical, which may
//! be coalesced or cached, which responses may be shared, and for how long (RFC 9111).

use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, COOKIE, HOST, PRAGMA, SET_COOKIE,
    TRANSFER_ENCODING, UPGRADE, VARY,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body::Body;

/// What identical requests have in common.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) method: Method,
    pub(super) authority: Bytes,
    pub(super) path_and_query: Bytes,
    pub(super) authorization: Option<Bytes>,
    pub(super) cookie: Option<Bytes>,
}

/// The request's key, if it may be coalesced at all.
pub(super) fn key<B: Body>(request: &Request<B>) -> Option<Key> {
    let headers = request.headers();
    let method = request.method();
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let has_body = !request.body().is_end_stream()
        && (headers.contains_key(TRANSFER_ENCODING)
            || headers
                .get(CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0"));
    let no_cache = directive(headers, CACHE_CONTROL, &["no-store", "no-cache"])
        || directive(headers, PRAGMA, &["no-cache"]);
    if has_body || no_cache || headers.contains_key(UPGRADE) {
        return None;
    }
    let (authority, path_and_query) = uri_of(request);
    let joined = |name| {
        let mut values = headers.get_all(name).iter().peekable();
        values.peek()?;
        Some(Bytes::from(
            values
                .map(|v| v.as_bytes())
                .collect::<Vec<_>>()
                .join(&b'\n'),
        ))
    };
    Some(Key {
        method: method.clone(),
        authority,
        path_and_query,
        authorization: joined(AUTHORIZATION),
        cookie: joined(COOKIE),
    })
}

/// The request's authority and path with query, as the cache keys them.
pub(super) fn uri_of<B>(request: &Request<B>) -> (Bytes, Bytes) {
    let authority = match request.uri().authority() {
        Some(a) => Bytes::copy_from_slice(a.as_str().as_bytes()),
        None => request
            .headers()
            .get(HOST)
            .map_or_else(Bytes::new, |h| Bytes::copy_from_slice(h.as_bytes())),
    };
    let path_and_query = request.uri().path_and_query().map_or_else(
        || Bytes::from_static(b"/"),
        |p| Bytes::copy_from_slice(p.as_str().as_bytes()),
    );
    (authority, path_and_query)
}

/// Whether a response may be given to other clients.
pub(super) fn shareable(headers: &HeaderMap) -> bool {
    let vary_any = headers.get_all(VARY).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii() == b"*")
    });
    !vary_any
        && !headers.contains_key(SET_COOKIE)
        && !directive(headers, CACHE_CONTROL, &["no-store", "private"])
}

/// Whether a follower's request matches the leader's on every header the response varies by.
pub(super) fn vary_matches(response: &HeaderMap, leader: &HeaderMap, follower: &HeaderMap) -> bool {
    response
        .get_all(VARY)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|name| !name.is_empty())
        .all(|name| {
            let Ok(name) = http::HeaderName::from_bytes(name) else {
                return false;
            };
            leader
                .get_all(&name)
                .iter()
                .eq(follower.get_all(&name).iter())
        })
}

/// Whether a comma-separated header has one of `names` as a directive (`max-age=0, no-store`).
fn directive(headers: &HeaderMap, header: http::HeaderName, names: &[&str]) -> bool {
    headers.get_all(header).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|d| {
            let name = d
                .split(|&b| b == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            names
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
        })
    })
}

/// Statuses a response may be cached with (those RFC 9110 §15.1 calls heuristically cacheable;
/// tidegate still needs an explicit lifetime).
const CACHEABLE: [u16; 10] = [200, 203, 204, 300, 301, 404, 405, 410, 414, 501];

/// How long a response may be served from the cache: its `s-maxage` (else `max-age`) less
/// its `Age`, at most `limit`. `None` when it may not be cached at all: no explicit lifetime,
/// `no-cache`, or a status that is not cacheable. (`no-store`, `private`, `Set-Cookie` and
/// `Vary: *` are already excluded by [`shareable`].)
pub(super) fn freshness(
    status: StatusCode,
    headers: &HeaderMap,
    limit: Duration,
) -> Option<Duration> {
    if !CACHEABLE.contains(&status.as_u16()) || directive(headers, CACHE_CONTROL, &["no-cache"]) {
        return None;
    }
    let lifetime = seconds(headers, "s-maxage").or_else(|| seconds(headers, "max-age"))?;
    let age = age(headers);
    let fresh = Duration::from_secs(lifetime.saturating_sub(age));
    (!fresh.is_zero()).then(|| fresh.min(limit))
}

/// The response's own `Age`, in seconds (0 without one).
pub(super) fn age(headers: &HeaderMap) -> u64 {
    headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the client asks for a response not served from a cache (`no-cache`, `max-age=0`,
/// `Pragma: no-cache`).
pub(super) fn bypasses_cache(headers: &HeaderMap) -> bool {
    directive(headers, CACHE_CONTROL, &["no-cache", "no-store"])
        || directive(headers, PRAGMA, &["no-cache"])
        || seconds(headers, "max-age") == Some(0)
}

/// A `Cache-Control` directive's value in whole seconds (`max-age=60`).
fn seconds(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get_all(CACHE_CONTROL).iter().find_map(|value| {
        value.to_str().ok()?.split(',').find_map(|d| {
            let (key, value) = d.split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().trim_matches('"').parse().ok())?
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    fn request(method: Method, pairs: &[(&'static str, &'static str)]) -> Request<String> {
        let mut r = Request::builder()
            .method(method)
            .uri("/hot?q=1")
            .body(String::new())
            .unwrap();
        *r.headers_mut() = headers(pairs);
        r
    }

    #[test]
    fn only_plain_idempotent_reads_have_a_key() {
        assert!(key(&request(Method::GET, &[("host", "a")])).is_some());
        assert!(key(&request(Method::HEAD, &[])).is_some());
        assert!(key(&request(Method::POST, &[])).is_none());
        assert!(
            key(&request(
                Method::GET,
                &[("cache-control", "max-age=0, no-store")]
            ))
            .is_none()
        );
        assert!(key(&request(Method::GET, &[("cache-control", "No-Cache")])).is_none());
        assert!(key(&request(Method::GET, &[("pragma", "no-cache")])).is_none());
        assert!(key(&request(Method::GET, &[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn users_and_hosts_do_not_share() {
        let a = key(&request(Method::GET, &[("host", "a"), ("cookie", "s=1")]));
        let b = key(&request(Method::GET, &[("host", "a"), ("cookie", "s=2")]));
        let c = key(&request(Method::GET, &[("host", "b"), ("cookie", "s=1")]));
        let d = key(&request(Method::GET, &[("host", "a"), ("cookie", "s=1")]));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, d);
        let auth = key(&request(
            Method::GET,
            &[("host", "a"), ("authorization", "Bearer x")],
        ));
        assert_ne!(key(&request(Method::GET, &[("host", "a")])), auth);
    }

    #[test]
    fn private_or_cookie_setting_responses_are_not_shared() {
        assert!(shareable(&headers(&[(
            "cache-control",
            "public, max-age=5"
        )])));
        assert!(!shareable(&headers(&[("cache-control", "private")])));
        assert!(!shareable(&headers(&[("cache-control", "no-store")])));
        assert!(!shareable(&headers(&[("set-cookie", "a=b")])));
        assert!(!shareable(&headers(&[("vary", "accept, *")])));
    }

    #[test]
    fn freshness_needs_an_explicit_lifetime_and_a_cacheable_status() {
        let limit = Duration::from_secs(30);
        let ok = StatusCode::OK;
        let fresh = |pairs| freshness(ok, &headers(pairs), limit);
        assert_eq!(
            fresh(&[("cache-control", "public, max-age=10")]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=10, s-maxage=20")]),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=600")]),
            Some(limit),
            "capped by the route"
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=10"), ("age", "4")]),
            Some(Duration::from_secs(6))
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=10"), ("age", "12")]),
            None
        );
        assert_eq!(fresh(&[("cache-control", "max-age=10, no-cache")]), None);
        assert_eq!(fresh(&[("expires", "Thu, 01 Dec 2094 16:00:00 GMT")]), None);
        assert_eq!(fresh(&[]), None);
        let headers = headers(&[("cache-control", "max-age=10")]);
        assert_eq!(
            freshness(StatusCode::INTERNAL_SERVER_ERROR, &headers, limit),
            None
        );
        assert_eq!(
            freshness(StatusCode::PARTIAL_CONTENT, &headers, limit),
            None
        );
    }

    #[test]
    fn clients_can_bypass_the_cache() {
        assert!(bypasses_cache(&headers(&[("cache-control", "max-age=0")])));
        assert!(bypasses_cache(&headers(&[("cache-control", "no-cache")])));
        assert!(bypasses_cache(&headers(&[("pragma", "no-cache")])));
        assert!(!bypasses_cache(&headers(&[("cache-control", "max-age=5")])));
        assert!(!bypasses_cache(&HeaderMap::new()));
    }

    #[test]
    fn vary_compares_the_named_request_headers() {
        let response = headers(&[("vary", "Accept-Encoding, accept-language")]);
        let leader = headers(&[("accept-encoding", "gzip"), ("accept-language", "en")]);
        let same = headers(&[("accept-encoding", "gzip"), ("accept-language", "en")]);
        let other = headers(&[("accept-encoding", "br"), ("accept-language", "en")]);
        let missing = headers(&[("accept-language", "en")]);
        assert!(vary_matches(&response, &leader, &same));
        assert!(!vary_matches(&response, &leader, &other));
        assert!(!vary_matches(&response, &leader, &missing));
        assert!(vary_matches(&HeaderMap::new(), &leader, &other));
    }
}
