//! A small, time-bounded response cache for routes with `coalesce_cache`.
//!
//! Only responses a coalescing leader could share are stored, and only those with an explicit
//! lifetime (`s-maxage`/`max-age`, less their `Age`), kept at most the route's
//! `coalesce_cache`. One variant per key: a response for other `Vary` values replaces it.
//! Bounded by `--coalesce-cache-size` bytes (bodies and headers) and [`MAX_ENTRIES`] entries;
//! the oldest entries go first. Served copies carry `Age`. A successful `POST`, `PUT`,
//! `PATCH` or `DELETE` to a cached URI removes it (RFC 9111 §4.4).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::AGE;
use http::{HeaderMap, HeaderValue, Response};
use tokio::time::Instant;

use super::SharedResponse;
use super::rules::{Key, vary_matches};
use crate::outbound::response_body::ResponseBody;

/// Most entries kept, whatever their size.
pub(super) const MAX_ENTRIES: usize = 4096;

/// Bytes counted for an entry besides its body and headers.
const ENTRY_OVERHEAD: usize = 256;

#[derive(Debug, Default)]
pub(super) struct Cache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Insertion order, for eviction; may hold ids of entries since replaced.
    order: VecDeque<(Key, u64)>,
    bytes: usize,
    next_id: u64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    response: Arc<SharedResponse>,
    /// The request it answered, for `Vary`.
    request_headers: HeaderMap,
    stored: Instant,
    fresh_until: Instant,
    /// The response's own `Age` when stored.
    age: u64,
    size: usize,
}

/// Entries and bytes held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) entries: usize,
    pub(super) bytes: usize,
}

// === impl Cache ===

impl Cache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh stored response for `key` whose `Vary` headers match `headers`.
    pub(super) fn get(&self, key: &Key, headers: &HeaderMap) -> Option<Response<ResponseBody>> {
        let mut inner = self.lock();
        let now = Instant::now();
        let entry = inner.entries.get(key)?;
        if now >= entry.fresh_until {
            inner.remove(key);
            return None;
        }
        if !vary_matches(&entry.response.headers, &entry.request_headers, headers) {
            return None;
        }
        let age = entry.age + now.saturating_duration_since(entry.stored).as_secs();
        let mut response = entry.response.to_response();
        response.headers_mut().insert(AGE, HeaderValue::from(age));
        Some(response)
    }

    /// Stores `response` to `request_headers` for `fresh`, within `max_bytes`.
    pub(super) fn put(
        &self,
        key: Key,
        response: Arc<SharedResponse>,
        request_headers: HeaderMap,
        fresh: Duration,
        max_bytes: usize,
    ) -> Usage {
        let size = ENTRY_OVERHEAD
            + response.body.len()
            + header_bytes(&response.headers)
            + header_bytes(&request_headers);
        let mut inner = self.lock();
        inner.remove(&key);
        if size > max_bytes {
            return inner.usage();
        }
        let now = Instant::now();
        let mut expired = 0;
        inner.entries.retain(|_, e| {
            let fresh = e.fresh_until > now;
            if !fresh {
                expired += e.size;
            }
            fresh
        });
        inner.bytes -= expired;
        while inner.bytes + size > max_bytes || inner.entries.len() >= MAX_ENTRIES {
            let Some((old, id)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&old).is_some_and(|e| e.id == id) {
                inner.remove(&old);
            }
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.order.push_back((key.clone(), id));
        inner.bytes += size;
        inner.entries.insert(
            key,
            Entry {
                id,
                age: super::rules::age(&response.headers),
                response,
                request_headers,
                stored: now,
                fresh_until: now + fresh,
                size,
            },
        );
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            inner.compact_order();
        }
        inner.usage()
    }

    /// Removes every stored response for `path_and_query` on `authority`, whatever its method
    /// or user.
    pub(super) fn invalidate(&self, authority: &Bytes, path_and_query: &Bytes) -> Usage {
        let mut inner = self.lock();
        let stale: Vec<Key> = inner
            .entries
            .keys()
            .filter(|k| k.authority == *authority && k.path_and_query == *path_and_query)
            .cloned()
            .collect();
        for key in stale {
            inner.remove(&key);
        }
        inner.usage()
    }

    /// Entries and bytes held now.
    #[cfg(test)]
    fn usage(&self) -> Usage {
        self.lock().usage()
    }
}

// === impl Inner ===

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes = self.bytes.saturating_sub(entry.size);
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            entries: self.entries.len(),
            bytes: self.bytes,
        }
    }

    fn compact_order(&mut self) {
        let mut live: Vec<(Key, u64)> = self
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), e.id))
            .collect();
        live.sort_by_key(|(_, id)| *id);
        self.order = live.into();
    }
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode, Version};

    use super::*;

    fn key(path: &'static str) -> Key {
        Key {
            method: Method::GET,
            authority: Bytes::from_static(b"app"),
            path_and_query: Bytes::from_static(path.as_bytes()),
            authorization: None,
            cookie: None,
        }
    }

    fn response(body: usize, headers: &[(&'static str, &'static str)]) -> Arc<SharedResponse> {
        Arc::new(SharedResponse {
            status: StatusCode::OK,
            version: Version::HTTP_11,
            headers: headers
                .iter()
                .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
                .collect(),
            body: Bytes::from(vec![b'x'; body]),
        })
    }

    const MIB: usize = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn serves_until_fresh_then_forgets() {
        let cache = Cache::default();
        let ten = Duration::from_secs(10);
        cache.put(
            key("/a"),
            response(10, &[("age", "3")]),
            HeaderMap::new(),
            ten,
            MIB,
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        let hit = cache.get(&key("/a"), &HeaderMap::new()).unwrap();
        assert_eq!(
            hit.headers()["age"],
            "7",
            "the response's own age plus time stored"
        );
        assert!(cache.get(&key("/b"), &HeaderMap::new()).is_none());
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(cache.get(&key("/a"), &HeaderMap::new()).is_none());
        assert_eq!(cache.usage().entries, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_within_its_byte_budget_oldest_first() {
        let cache = Cache::default();
        let ten = Duration::from_secs(10);
        for path in ["/1", "/2", "/3"] {
            cache.put(
                key(path),
                response(400 * 1024, &[]),
                HeaderMap::new(),
                ten,
                MIB,
            );
        }
        let usage = cache.usage();
        assert_eq!(usage.entries, 2);
        assert!(usage.bytes <= MIB);
        assert!(
            cache.get(&key("/1"), &HeaderMap::new()).is_none(),
            "the oldest went"
        );
        assert!(cache.get(&key("/3"), &HeaderMap::new()).is_some());
        // Larger than the whole budget: not stored, nothing evicted for it.
        cache.put(
            key("/big"),
            response(2 * MIB, &[]),
            HeaderMap::new(),
            ten,
            MIB,
        );
        assert_eq!(cache.usage().entries, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn replacing_an_entry_repeatedly_keeps_the_order_list_small() {
        let cache = Cache::default();
        for _ in 0..1000 {
            cache.put(
                key("/a"),
                response(1, &[]),
                HeaderMap::new(),
                Duration::from_secs(9),
                MIB,
            );
        }
        assert!(cache.lock().order.len() <= 64 + 2);
        assert_eq!(cache.usage().entries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_removes_every_variant_of_the_uri() {
        let cache = Cache::default();
        let mut head = key("/a");
        head.method = Method::HEAD;
        let ten = Duration::from_secs(10);
        cache.put(key("/a"), response(1, &[]), HeaderMap::new(), ten, MIB);
        cache.put(head.clone(), response(0, &[]), HeaderMap::new(), ten, MIB);
        cache.put(key("/b"), response(1, &[]), HeaderMap::new(), ten, MIB);
        let usage = cache.invalidate(&Bytes::from_static(b"app"), &Bytes::from_static(b"/a"));
        assert_eq!(usage.entries, 1);
        assert!(cache.get(&head, &HeaderMap::new()).is_none());
        assert!(cache.get(&key("/b"), &HeaderMap::new()).is_some());
    }
}
