//! Active health checks of the app, on their own connection and outside the concurrency cap.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::health::HealthState;
use super::metrics::{AdminMetrics, CheckResult};
use crate::config::{LiveConfig, Upstream};
use crate::error::BoxError;
use crate::metrics::LabelValues;
use crate::outbound::connect;

/// Settings of one round of checks, read from the live config before each check.
#[derive(Clone, Debug)]
struct CheckConfig {
    /// HTTP path to GET; `None` checks that a TCP (or Unix) connection opens.
    path: Option<String>,
    interval: Duration,
    timeout: Duration,
    failure_threshold: u32,
    success_threshold: u32,
}

/// Runs the checks forever and feeds [`HealthState`].
#[derive(Debug)]
pub(crate) struct AppChecker {
    upstream: Upstream,
    live: LiveConfig,
    state: HealthState,
    metrics: Arc<AdminMetrics>,
}

/// One check's result.
#[derive(Debug, Copy, Clone, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    /// Timed out while the app was completing proxied responses: saturated, not broken.
    Busy,
}

#[derive(Debug, thiserror::Error)]
#[error("app health check answered {0}")]
struct BadStatus(StatusCode);

// === impl AppChecker ===

impl AppChecker {
    /// A checker of `upstream` that reports into `state` and `metrics`, and reads its
    /// settings from `live`, so they can change on reload.
    pub(crate) fn new(
        upstream: Upstream,
        live: LiveConfig,
        state: HealthState,
        metrics: Arc<AdminMetrics>,
    ) -> AppChecker {
        AppChecker {
            upstream,
            live,
            state,
            metrics,
        }
    }

    fn settings(&self) -> CheckConfig {
        let config = self.live.load();
        let a = &config.args;
        CheckConfig {
            path: a.app_health_path.clone(),
            interval: a.app_health_interval,
            timeout: a.app_health_timeout,
            failure_threshold: a.app_health_failure_threshold,
            success_threshold: a.app_health_success_threshold,
        }
    }

    /// Checks forever, one check per interval (the first at once).
    pub(crate) async fn run(self) {
        let mut passes = 0u32;
        let mut failures = 0u32;
        let mut healthy = false;
        let metrics = self.metrics.clone();
        loop {
            let settings = self.settings();
            let start = Instant::now();
            let result = tokio::time::timeout(settings.timeout, self.check_once(&settings)).await;
            metrics
                .app_health_check_duration
                .observe(start.elapsed().as_secs_f64());
            let outcome = match result {
                Ok(Ok(())) => Outcome::Pass,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "App health check failed");
                    Outcome::Fail
                }
                Err(_elapsed) => {
                    // A saturated app answers its health route late; if it finished proxied
                    // work meanwhile it is busy, not broken, and must not be taken out of
                    // service for being busy.
                    let window = start.elapsed() + settings.interval;
                    if self.state.progress().within(window) {
                        Outcome::Busy
                    } else {
                        tracing::debug!("App health check timed out");
                        Outcome::Fail
                    }
                }
            };
            let result = match outcome {
                Outcome::Pass => CheckResult::Pass,
                Outcome::Fail => CheckResult::Fail,
                Outcome::Busy => CheckResult::Busy,
            };
            metrics
                .app_health_checks
                .with_label_values(&[result.as_label()])
                .inc();
            match outcome {
                Outcome::Pass => {
                    self.state.record_pass();
                    failures = 0;
                    passes = passes.saturating_add(1);
                    if !healthy && passes >= settings.success_threshold {
                        healthy = true;
                    }
                }
                Outcome::Fail => {
                    passes = 0;
                    failures = failures.saturating_add(1);
                    if healthy && failures >= settings.failure_threshold {
                        healthy = false;
                    }
                }
                Outcome::Busy => {}
            }
            self.state.set_app_healthy(healthy);
            tokio::time::sleep_until(start + settings.interval).await;
        }
    }

    async fn check_once(&self, settings: &CheckConfig) -> Result<(), BoxError> {
        // The caller's timeout bounds the whole check, connect included.
        let stream = connect::connect(&self.upstream, settings.timeout).await?;
        let Some(path) = &settings.path else {
            return Ok(());
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let host = match &self.upstream {
            Upstream::Tcp { authority } => authority.as_str().to_owned(),
            Upstream::Unix { .. } => "localhost".to_owned(),
        };
        let request = Request::get(path.as_str())
            .header(header::HOST, host)
            .header(header::USER_AGENT, "tidegate-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let result = sender.send_request(request).await;
        conn.abort();
        let status = result?.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(Box::new(BadStatus(status)))
        }
    }
}
