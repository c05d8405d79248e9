//! Tracing set-up: human-readable lines by default, JSON lines for clusters.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter string was not valid env-filter syntax.
#[derive(Debug, thiserror::Error)]
#[error("--log {filter:?}: invalid filter")]
pub struct LogFilterError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat, filter: &str) -> Result<(), LogFilterError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| LogFilterError {
        filter: filter.to_owned(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
