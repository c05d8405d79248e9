//! Tracing set-up: human-readable lines by default, JSON lines for clusters, written to stderr
//! by a thread of their own.
//!
//! Logging never blocks traffic. Lines go through a bounded queue to a writer thread; when
//! stderr does not keep up (a pipe nobody reads, a wedged log shipper, a stuck container
//! runtime), new lines are dropped, not waited for, and counted in
//! `tidegate_log_lines_dropped_total`. The queue's lines are written out at exit, for at most
//! about a second.

use std::io::IsTerminal;
use std::sync::OnceLock;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, Opts};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines the queue to the writer thread holds at most (about 2 MiB of typical lines).
const QUEUED_LINES: usize = 8192;

/// The dropped-line count of the process's log writer. Process-wide, as the tracing
/// subscriber it belongs to is; set once by [`init`].
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

const DROPPED_NAME: &str = "tidegate_log_lines_dropped_total";
const DROPPED_HELP: &str = "Log lines dropped because stderr did not keep up";

/// The filter string was not valid env-filter syntax.
#[derive(Debug, thiserror::Error)]
#[error("--log {filter:?}: invalid filter")]
pub struct LogFilterError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// The log writer thread: dropping it writes out the lines still queued (for at most about a
/// second) and stops the thread. Keep it until exit.
#[derive(Debug)]
#[must_use = "dropping it stops the log writer"]
pub struct LogWriter {
    _guard: WorkerGuard,
}

/// `tidegate_log_lines_dropped_total`, read from the log writer when scraped.
#[derive(Debug)]
pub(crate) struct DroppedLines {
    desc: Desc,
}

/// Installs the global subscriber, writing to stderr through the writer thread.
pub fn init(format: LogFormat, filter: &str) -> Result<LogWriter, LogFilterError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| LogFilterError {
        filter: filter.to_owned(),
        source,
    })?;
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("tidegate-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    // A second init (tests) keeps the first subscriber, and its counter.
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        let _ = DROPPED.set(dropped);
    }
    Ok(LogWriter { _guard: guard })
}

// === impl DroppedLines ===

impl DroppedLines {
    /// The collector; 0 until [`init`] has installed the writer.
    pub(crate) fn new() -> Result<DroppedLines, prometheus::Error> {
        let desc = Desc::new(
            DROPPED_NAME.to_owned(),
            DROPPED_HELP.to_owned(),
            Vec::new(),
            Default::default(),
        )?;
        Ok(DroppedLines { desc })
    }
}

impl Collector for DroppedLines {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let dropped = DROPPED.get().map_or(0, ErrorCounter::dropped_lines);
        match IntCounter::with_opts(Opts::new(DROPPED_NAME, DROPPED_HELP)) {
            Ok(counter) => {
                counter.inc_by(dropped as u64);
                counter.collect()
            }
            Err(_) => Vec::new(),
        }
    }
}
