//! Error types shared by the data path, and helpers to classify a boxed error by its cause.

use std::error::Error as StdError;

/// The error type every service on the data path returns.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

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
    /// The queue was overloaded and the request waited longer than `--queue-codel-target`.
    QueueDelay,
    /// A request of a higher priority class took the request's place in a full queue.
    Evicted,
    /// `--coalesce-max-waiting` requests already waited for identical requests' responses.
    CoalesceFull,
    /// The request waited for an identical request's response longer than
    /// `--coalesce-max-wait`.
    CoalesceWait,
}

/// A request was refused to protect the app (always answered with a 503).
#[derive(Debug, thiserror::Error)]
#[error("request shed: {}", reason.as_str())]
pub struct Overloaded {
    /// Why the request was refused.
    pub reason: ShedReason,
    /// The `Retry-After` base for this refusal, if not `--retry-after`: the route's own, or
    /// the estimate from the queue (`--retry-after-from-queue`).
    pub retry_after: Option<std::time::Duration>,
}

/// The app could not be reached: connection refused, unreachable, or the socket is missing.
#[derive(Debug, thiserror::Error)]
#[error("upstream connect failed")]
pub(crate) struct UpstreamConnect(#[source] pub BoxError);

/// The app did not accept a connection within `--connect-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream connect timed out")]
pub(crate) struct UpstreamConnectTimeout;

/// The app did not answer within `--upstream-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream timed out")]
pub(crate) struct UpstreamTimeout;

/// The app closed or reset the connection before it sent a complete response head.
#[derive(Debug, thiserror::Error)]
#[error("upstream closed the connection")]
pub(crate) struct UpstreamReset(#[source] pub BoxError);

/// A request tidegate refuses to forward because it breaks a limit or the protocol; answered
/// with a 4xx naming the limit, and never sent (or never sent further) to the app.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// The request target is longer than `--max-uri-bytes` (414).
    #[error("request target longer than {limit} bytes")]
    UriTooLong {
        /// The limit in bytes.
        limit: u64,
    },
    /// The request has more header fields than `--max-headers` (431).
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The limit.
        limit: u32,
    },
    /// The body is larger than the route's or the global `max-request-body` (413).
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// An HTTP/1.1 request without exactly one valid `Host` (400, RFC 9112 §3.2).
    #[error("bad Host header: {0}")]
    BadHost(&'static str),
    /// The request body could not be read: malformed chunked framing, or the client stopped
    /// sending before the declared length (400).
    #[error("malformed or incomplete request body")]
    Body(#[source] hyper::Error),
    /// The client ended its stream (a half-close) before the body was whole (400).
    #[error("request body cut short by the client's end of stream")]
    BodyCut,
}

// === impl Rejected ===

impl Rejected {
    /// The status the client gets.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Rejected::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Rejected::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejected::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejected::BadHost(_) | Rejected::Body(_) | Rejected::BodyCut => StatusCode::BAD_REQUEST,
        }
    }

    /// The label used in the `tidegate-error` header and in metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejected::UriTooLong { .. } => "uri-too-long",
            Rejected::TooManyHeaders { .. } => "too-many-headers",
            Rejected::BodyTooLarge { .. } => "body-too-large",
            Rejected::BadHost(_) => "bad-host",
            Rejected::Body(_) | Rejected::BodyCut => "bad-body",
        }
    }

    /// Every label, for pre-registering metric series.
    pub const LABELS: [&'static str; 5] = [
        "uri-too-long",
        "too-many-headers",
        "body-too-large",
        "bad-host",
        "bad-body",
    ];
}

// === impl ShedReason ===

impl ShedReason {
    /// The label used in the `tidegate-shed` header and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue-full",
            ShedReason::QueueTimeout => "queue-timeout",
            ShedReason::RouteFull => "route-full",
            ShedReason::Draining => "draining",
            ShedReason::QueueDelay => "queue-delay",
            ShedReason::Evicted => "evicted",
            ShedReason::CoalesceFull => "coalesce-full",
            ShedReason::CoalesceWait => "coalesce-wait",
        }
    }

    /// Every reason, for pre-registering metric series.
    pub const ALL: [ShedReason; 8] = [
        ShedReason::QueueFull,
        ShedReason::QueueTimeout,
        ShedReason::RouteFull,
        ShedReason::Draining,
        ShedReason::QueueDelay,
        ShedReason::Evicted,
        ShedReason::CoalesceFull,
        ShedReason::CoalesceWait,
    ];
}

/// Finds the first error of type `E` in `error`'s source chain, `error` included.
pub(crate) fn find_cause<'a, E: StdError + 'static>(
    error: &'a (dyn StdError + 'static),
) -> Option<&'a E> {
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
pub(crate) fn is_caused_by<E: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    find_cause::<E>(error).is_some()
}

/// Displays an error with its sources, `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
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
