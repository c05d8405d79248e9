//! Hot reload of the `--config` file, on SIGHUP and when the file's contents change.
//!
//! The new file is read, merged under the same flags and environment, and validated; then the
//! limiter is resized in place and the new configuration is swapped in whole. An invalid file
//! is rejected with a logged error and the old configuration stays. Settings that cannot
//! change live (listeners, upstream, threads, logging) keep their values, with a warning.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admission::{LimitConfig, Limiter};
use crate::app::Metrics;
use crate::app::metrics::ReloadResult;
use crate::config::{LiveConfig, content_hash};
use crate::error::ErrorChain;
use crate::metrics::LabelValues;

/// Applies new configurations.
#[derive(Debug)]
pub struct Reloader {
    live: LiveConfig,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    /// Serialises reloads (SIGHUP and the watcher may fire together).
    lock: Mutex<()>,
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
        Reloader {
            live,
            limiter,
            metrics,
            lock: Mutex::new(()),
        }
    }

    /// Reloads the file now. Returns whether a new configuration was applied.
    pub fn reload(&self, trigger: &'static str) -> bool {
        let _serial = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.live.load();
        let Some(path) = current.args.config.clone() else {
            tracing::warn!(trigger, "Reload asked for, but there is no --config file");
            return false;
        };
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

    /// Checks the file every `every` and reloads when its contents change. Kubernetes
    /// ConfigMap updates swap a symlink; reading through the path follows it, so they count.
    pub async fn watch(self: Arc<Self>, path: PathBuf, every: Duration) {
        let mut seen = self.live.load().file_hash();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let read = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || std::fs::read(path)).await
            };
            let Ok(Ok(contents)) = read else {
                // Mid-swap or briefly missing: look again next time.
                continue;
            };
            // Lossy, so that a file that is not UTF-8 still counts as a change (and is rejected).
            let hash = content_hash(&String::from_utf8_lossy(&contents));
            if Some(hash) == seen {
                continue;
            }
            seen = Some(hash);
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.reload("file change")).await;
        }
    }
}

fn hash_gauge(hash: Option<u64>) -> f64 {
    // A gauge is an f64: keep 52 bits so the value is exact.
    hash.map_or(0.0, |h| (h & ((1 << 52) - 1)) as f64)
}
