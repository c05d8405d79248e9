//! Process signals, through signal-hook-tokio: SIGTERM and SIGINT start the shutdown, a
//! second one skips the rest of the delay, a third one or SIGQUIT exits at once; SIGHUP
//! reloads the config file.

use std::sync::Arc;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook_tokio::Signals;

use crate::app::reload::Reloader;
use crate::drain::Lifecycle;

/// What the handler asks the process to do.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing more: the lifecycle has been told.
    Continue,
    /// Exit now with this code (128 + the signal's number).
    ExitNow(i32),
}

/// Registers the handlers. Must be called inside a Tokio runtime.
pub fn listen() -> std::io::Result<Signals> {
    Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP])
}

/// Feeds signals into `lifecycle` (and SIGHUP into `reloader`) until one asks for an
/// immediate exit, then returns its code.
pub async fn drive(mut signals: Signals, lifecycle: Lifecycle, reloader: Arc<Reloader>) -> i32 {
    let mut count = 0u32;
    while let Some(signal) = signals.next().await {
        if signal == SIGHUP {
            let reloader = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
            continue;
        }
        count += 1;
        if let Action::ExitNow(code) = on_signal(signal, count, &lifecycle) {
            return code;
        }
    }
    0
}

/// Decides what the `count`th signal means.
pub fn on_signal(signal: i32, count: u32, lifecycle: &Lifecycle) -> Action {
    let name = signal_hook::low_level::signal_name(signal).unwrap_or("signal");
    if signal == SIGQUIT || count >= 3 {
        tracing::warn!(signal = name, "Exiting at once");
        return Action::ExitNow(128 + signal);
    }
    // Signals are counted, not phases: a shutdown that /prestop started a moment earlier (a
    // classic sidecar gets SIGTERM while the app's preStop calls /prestop) keeps its delay.
    let phase = lifecycle.phase();
    if count == 1 {
        lifecycle.start_shutdown();
        tracing::info!(signal = name, phase = phase.as_str(), "Shutdown requested");
    } else {
        lifecycle.skip_delay();
        tracing::info!(
            signal = name,
            phase = phase.as_str(),
            "Second signal: skipping the rest of the delay"
        );
    }
    Action::Continue
}
