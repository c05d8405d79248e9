//! Exchanges whose client left, finished in the background (`--on-client-abort finish`).
//!
//! The app's work is not cut off when its client goes away: the rest of the exchange (the
//! response head, then the body, read and discarded) runs in a task of its own and keeps its
//! slot until the app is done. Each such task is bounded by `--abandoned-timeout`, tracked by
//! the drain (which waits for it like for a tunnel), and counted
//! (`tidegate_abandoned_exchanges`, `tidegate_abandoned_exchanges_total{outcome}`).

use std::future::Future;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use super::metrics::{AbandonedOutcome, UpstreamMetrics};
use crate::config::LiveConfig;

tokio::task_local! {
    /// Set while an abandoned exchange is being finished, so that what it drops when cut is
    /// not handed to a task of its own again.
    static FINISHING: ();
}

/// Hands abandoned exchanges to bounded, drain-tracked tasks.
#[derive(Clone, Debug)]
pub(crate) struct Abandoned(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    live: LiveConfig,
    background: TaskTracker,
    metrics: Arc<UpstreamMetrics>,
}

/// Counts one abandoned exchange in progress until dropped.
struct Counted(Arc<Shared>);

// === impl Abandoned ===

impl Abandoned {
    /// Finishes exchanges on tasks of `background`, which the drain waits for.
    pub(crate) fn new(
        live: LiveConfig,
        background: TaskTracker,
        metrics: Arc<UpstreamMetrics>,
    ) -> Abandoned {
        Abandoned(Arc::new(Shared {
            live,
            background,
            metrics,
        }))
    }

    /// Runs `rest` on a task of its own for at most `--abandoned-timeout`, then drops it
    /// (which closes its connection to the app and frees its slot). Does nothing inside a
    /// task that is already finishing an exchange: what such a task drops is cut.
    pub(crate) fn finish<F>(&self, rest: F)
    where
        F: Future + Send + 'static,
    {
        if FINISHING.try_with(|_| ()).is_ok() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("No runtime to finish an abandoned exchange");
            return;
        };
        let timeout = self.0.live.peek().args.abandoned_timeout;
        self.0.metrics.abandoned.inc();
        let counted = Counted(self.0.clone());
        let task = FINISHING.scope((), async move {
            let outcome = match tokio::time::timeout(timeout, rest).await {
                Ok(_) => AbandonedOutcome::Finished,
                Err(_elapsed) => AbandonedOutcome::Cut,
            };
            counted.0.metrics.abandoned_total[outcome as usize].inc();
            drop(counted);
        });
        self.0.background.spawn_on(task, &runtime);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.metrics.abandoned.dec();
    }
}
