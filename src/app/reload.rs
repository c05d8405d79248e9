//! Hot reload of the `--config` file, on SIGHUP and when the file's contents change.
//!
//! The new file is read, merged under the same flags and environment, and validated; then the
//! limiter is resized in place and the new configuration is swapped in whole. An invalid file
//! is rejected with a logged error and the old configuration stays. Settings that cannot
//! change live (listeners, upstream, threads, logging) keep their values, with a warning.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admission::{LimitConfig, Limiter};
use crate::app::Metrics;
use crate::app::metrics::ReloadResult;
use crate::config::{LiveConfig, content_hash};
use crate::error::ErrorChain;
use crate::metrics::LabelValues;

/// The watcher's trigger name.
const WATCHER: &str = "file change";

/// Applies new configurations.
#[derive(Debug)]
pub struct Reloader {
    live: LiveConfig,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    /// Serialises reloads (SIGHUP and the watcher may fire together), and holds the hash of
    /// the file contents last tried, applied or rejected, whichever the trigger: the watcher
    /// reloads only contents that differ from it.
    tried: Mutex<Option<u64>>,
}

// === impl Reloader ===

impl Reloader {
    /// A reloader for `live`; publishes generation 1 and the file hash.
    pub fn new(live: LiveConfig, limiter: Limiter, metrics: Arc<Metrics>) -> Reloader {
        metrics.process.config_generation.set(1);
        metrics
            .process
            .config_hash
            .set(hash_gauge(live.load().file_hash()));
        let tried = Mutex::new(live.load().file_hash());
        Reloader {
            live,
            limiter,
            metrics,
            tried,
        }
    }

    /// Reloads the file now, unless its contents are the ones last tried (applied or
    /// rejected) by any trigger: one change, one reload. Returns whether a new configuration
    /// was applied.
    pub fn reload(&self, trigger: &'static str) -> bool {
        let mut tried = self
            .tried
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.live.load();
        let Some(path) = current.args.config.clone() else {
            tracing::warn!(trigger, "Reload asked for, but there is no --config file");
            return false;
        };
        let read = file_hash(&path);
        if read.is_none() && trigger == WATCHER {
            // Mid-swap or briefly missing: the watcher looks again next time.
            return false;
        }
        if read.is_some() && read == *tried {
            if trigger != WATCHER {
                tracing::info!(trigger, "Reload asked for; the config file is unchanged");
            }
            return false;
        }
        *tried = read;
        match current.reload() {
            Ok((next, kept)) => {
                for setting in kept {
                    tracing::warn!(
                        %setting,
                        "Setting changed in the config file cannot change live; restart to apply it"
                    );
                }
                self.limiter.reconfigure(&LimitConfig::new(&next));
                let hash = next.file_hash();
                // What was applied, should the file have changed since it was hashed above.
                *tried = hash;
                self.live.store(next);
                self.metrics
                    .process
                    .reloads
                    .with_label_values(&[ReloadResult::Ok.as_label()])
                    .inc();
                self.metrics.process.config_generation.inc();
                self.metrics.process.config_hash.set(hash_gauge(hash));
                tracing::info!(
                    trigger,
                    file = %path.display(),
                    generation = self.metrics.process.config_generation.get(),
                    "Configuration reloaded"
                );
                true
            }
            Err(error) => {
                self.metrics
                    .process
                    .reloads
                    .with_label_values(&[ReloadResult::Error.as_label()])
                    .inc();
                tracing::error!(
                    trigger,
                    error = %ErrorChain(&error),
                    "Configuration rejected; keeping the current one"
                );
                false
            }
        }
    }

    /// Checks the file every `every` and reloads when its contents differ from the contents
    /// last tried (by any trigger: a SIGHUP-ed change is not reloaded again). Kubernetes
    /// ConfigMap updates swap a symlink; reading through the path follows it, so they count.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reload(WATCHER)).await;
        }
    }
}

/// The hash of the file's contents, read as the watcher reads it: lossy, so that a file that is
/// not UTF-8 still counts as a change (and is rejected). `None` when it cannot be read.
fn file_hash(path: &std::path::Path) -> Option<u64> {
    let contents = std::fs::read(path).ok()?;
    Some(content_hash(&String::from_utf8_lossy(&contents)))
}

fn hash_gauge(hash: Option<u64>) -> f64 {
    // A gauge is an f64: keep 52 bits so the value is exact.
    hash.map_or(0.0, |h| (h & ((1 << 52) - 1)) as f64)
}
