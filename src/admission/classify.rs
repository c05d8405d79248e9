//! Sorting requests into priority classes and spotting retries.
//!
//! The class comes from the request header the operator names (`--priority-header`, values
//! `critical`, `normal`, `low`), else from the route's `priority`, else `normal`. A request is
//! a retry when it carries the retry header the operator names (`--retry-header`, any value
//! but `0`), or when its client was refused within `--retry-memory` (off by default: behind a
//! balancer or mesh every request has the same peer address).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use super::slots::Priority;

/// Most clients remembered as just refused; older entries are dropped first when full.
const MEMORY_ENTRIES: usize = 4096;

/// How requests are classified.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassifyConfig {
    /// Request header carrying the priority class.
    pub priority_header: Option<HeaderName>,
    /// Request header marking a retry.
    pub retry_header: Option<HeaderName>,
    /// How long a refused client's next requests count as retries; `None` is off.
    pub retry_memory: Option<Duration>,
}

/// A request's place in the queue order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestClass {
    /// Its priority class.
    pub priority: Priority,
    /// Whether it looks like a retry (queued behind first attempts).
    pub retry: bool,
    /// The client, remembered if the request is refused and `--retry-memory` is on.
    pub client: Option<IpAddr>,
}

/// Classifies requests with the settings it is given, and remembers the clients recently
/// refused (`--retry-memory`).
#[derive(Debug, Default)]
pub(super) struct Classifier {
    refused: Mutex<HashMap<IpAddr, Instant>>,
}

// === impl Classifier ===

impl Classifier {
    pub(super) fn classify(
        &self,
        config: &ClassifyConfig,
        headers: &HeaderMap,
        route: Option<Priority>,
        client: Option<IpAddr>,
    ) -> RequestClass {
        let header = config
            .priority_header
            .as_ref()
            .and_then(|name| headers.get(name))
            .and_then(|v| parse_priority(v.as_bytes()));
        let marked = config
            .retry_header
            .as_ref()
            .and_then(|name| headers.get(name))
            .is_some_and(|v| v.as_bytes().trim_ascii() != b"0");
        let remembered = config.retry_memory.is_some_and(|memory| {
            client.is_some_and(|ip| self.lock().get(&ip).is_some_and(|at| at.elapsed() < memory))
        });
        RequestClass {
            priority: header.or(route).unwrap_or_default(),
            retry: marked || remembered,
            client: config.retry_memory.and(client),
        }
    }

    /// Remembers that `client` was just refused (when `--retry-memory` is on).
    pub(super) fn note_refused(&self, retry_memory: Option<Duration>, client: Option<IpAddr>) {
        let Some(ip) = client else { return };
        let Some(memory) = retry_memory else {
            return;
        };
        let mut refused = self.lock();
        let now = Instant::now();
        if refused.len() >= MEMORY_ENTRIES && !refused.contains_key(&ip) {
            refused.retain(|_, at| now.saturating_duration_since(*at) < memory);
            if refused.len() >= MEMORY_ENTRIES {
                refused.clear();
            }
        }
        refused.insert(ip, now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `critical`, `normal` or `low`, any case; anything else is ignored.
fn parse_priority(value: &[u8]) -> Option<Priority> {
    let value = value.trim_ascii();
    [
        (&b"critical"[..], Priority::Critical),
        (b"normal", Priority::Normal),
        (b"low", Priority::Low),
    ]
    .into_iter()
    .find(|(name, _)| value.eq_ignore_ascii_case(name))
    .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    /// A classifier with its settings, called as the limiter calls it.
    struct Fixture {
        classifier: Classifier,
        config: ClassifyConfig,
    }

    impl Fixture {
        fn classify(
            &self,
            headers: &HeaderMap,
            route: Option<Priority>,
            client: Option<IpAddr>,
        ) -> RequestClass {
            self.classifier
                .classify(&self.config, headers, route, client)
        }

        fn note_refused(&self, client: Option<IpAddr>) {
            self.classifier
                .note_refused(self.config.retry_memory, client)
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
            self.classifier.lock()
        }
    }

    fn classifier(memory: Option<Duration>) -> Fixture {
        Fixture {
            classifier: Classifier::default(),
            config: ClassifyConfig {
                priority_header: Some(HeaderName::from_static("x-priority")),
                retry_header: Some(HeaderName::from_static("x-retry-attempt")),
                retry_memory: memory,
            },
        }
    }

    #[tokio::test]
    async fn header_wins_over_route_and_unknown_values_are_ignored() {
        let c = classifier(None);
        let class =
            |h: &[(&'static str, &'static str)], route| c.classify(&headers(h), route, None);
        assert_eq!(class(&[], None).priority, Priority::Normal);
        assert_eq!(class(&[], Some(Priority::Low)).priority, Priority::Low);
        let critical = [("x-priority", " Critical ")];
        assert_eq!(
            class(&critical, Some(Priority::Low)).priority,
            Priority::Critical
        );
        let bogus = [("x-priority", "urgent")];
        assert_eq!(class(&bogus, Some(Priority::Low)).priority, Priority::Low);
    }

    #[tokio::test]
    async fn retries_by_header_or_by_a_recent_refusal() {
        let c = classifier(Some(Duration::from_secs(10)));
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(
            !c.classify(&headers(&[("x-retry-attempt", "0")]), None, None)
                .retry
        );
        assert!(
            c.classify(&headers(&[("x-retry-attempt", "2")]), None, None)
                .retry
        );
        assert!(!c.classify(&HeaderMap::new(), None, Some(ip)).retry);
        c.note_refused(Some(ip));
        assert!(c.classify(&HeaderMap::new(), None, Some(ip)).retry);
        assert!(!c.classify(&HeaderMap::new(), None, Some(other)).retry);
    }

    #[tokio::test(start_paused = true)]
    async fn the_memory_forgets_and_stays_bounded() {
        let c = classifier(Some(Duration::from_secs(10)));
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        c.note_refused(Some(ip));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!c.classify(&HeaderMap::new(), None, Some(ip)).retry);
        for i in 0..(MEMORY_ENTRIES as u32 + 10) {
            c.note_refused(Some(IpAddr::from(i.to_be_bytes())));
        }
        assert!(c.lock().len() <= MEMORY_ENTRIES);
    }
}
