//! Error types shared by the data path, and helpers to classify a boxed error by its cause.

use std::error::Error as StdError;

/// The error type every service on the data path returns.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a request was refused before it reached the app.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The queue was full when the request arrived.
    QueueFull,
    /// The request waited in the queue longer than `--queue-timeout`.
    QueueTimeout,
    /// The request's route held all of its slots and the queue was full.
    RouteFull,
    /// tidegate is draining and takes no new work.
    Draining,
}

/// A request was refused to protect the app (always answered with a 503).
#[derive(Debug, thiserror::Error)]
#[error("request shed: {}", reason.as_str())]
pub struct Overloaded {
    /// Why the request was refused.
    pub reason: ShedReason,
    /// The route's own `Retry-After` base, if it sets one.
    pub retry_after: Option<std::time::Duration>,
}

/// The app could not be reached: connection refused, unreachable, or the socket is missing.
#[derive(Debug, thiserror::Error)]
#[error("upstream connect failed")]
pub struct UpstreamConnect(#[source] pub BoxError);

/// The app did not accept a connection within `--connect-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream connect timed out")]
pub struct UpstreamConnectTimeout;

/// The app did not answer within `--upstream-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream timed out")]
pub struct UpstreamTimeout;

/// The app closed or reset the connection before it sent a complete response head.
#[derive(Debug, thiserror::Error)]
#[error("upstream closed the connection")]
pub struct UpstreamReset(#[source] pub BoxError);

// === impl ShedReason ===

impl ShedReason {
    /// The label used in the `tidegate-shed` header and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue-full",
            ShedReason::QueueTimeout => "queue-timeout",
            ShedReason::RouteFull => "route-full",
            ShedReason::Draining => "draining",
        }
    }

    /// Every reason, for pre-registering metric series.
    pub const ALL: [ShedReason; 4] = [
        ShedReason::QueueFull,
        ShedReason::QueueTimeout,
        ShedReason::RouteFull,
        ShedReason::Draining,
    ];
}

/// Finds the first error of type `E` in `error`'s source chain, `error` included.
pub fn find_cause<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// Whether an error of type `E` appears in `error`'s source chain.
pub fn is_caused_by<E: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    find_cause::<E>(error).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] BoxError);

    #[test]
    fn finds_nested_cause() {
        let err = Outer(Box::new(UpstreamTimeout));
        assert!(is_caused_by::<UpstreamTimeout>(&err));
        assert!(!is_caused_by::<UpstreamConnectTimeout>(&err));
    }
}
