//! When the app last completed a response: the clock behind `/app/livez`, stamped by the
//! response bodies this module streams and read by the admin lane.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A monotonic "last time something happened" cell, shared across threads and runtimes.
#[derive(Clone, Debug)]
pub struct Stamp {
    base: Instant,
    /// Milliseconds since `base` plus one; 0 means never.
    millis: Arc<AtomicU64>,
}

/// The progress clock: stamped whenever the app completes a proxied response.
pub(crate) type Progress = Stamp;

// === impl Stamp ===

impl Stamp {
    /// A stamp that has never been recorded.
    pub fn new() -> Stamp {
        Stamp {
            base: Instant::now(),
            millis: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records "now".
    pub fn record(&self) {
        let ms = self.base.elapsed().as_millis() as u64 + 1;
        self.millis.store(ms, Ordering::Relaxed);
    }

    /// Time since the last record, or `None` if never recorded.
    pub fn age(&self) -> Option<Duration> {
        match self.millis.load(Ordering::Relaxed) {
            0 => None,
            ms => {
                let at = Duration::from_millis(ms - 1);
                Some(self.base.elapsed().saturating_sub(at))
            }
        }
    }

    /// Time since the stamp was created.
    pub fn since_created(&self) -> Duration {
        self.base.elapsed()
    }

    /// Whether it was recorded within `window`.
    pub fn within(&self, window: Duration) -> bool {
        self.age().is_some_and(|age| age <= window)
    }
}

impl Default for Stamp {
    fn default() -> Self {
        Stamp::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stamp_ages() {
        let stamp = Stamp::new();
        assert_eq!(stamp.age(), None);
        stamp.record();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(stamp.within(Duration::from_secs(3)));
        assert!(!stamp.within(Duration::from_secs(1)));
    }
}
