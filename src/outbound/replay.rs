//! Requests sent again after a failure that says the app never processed them.
//!
//! The keep-alive race: an app closes an idle HTTP/1.1 connection (its keep-alive timeout)
//! just as tidegate writes a request onto it. The request is lost in the app's closed socket
//! and the connection ends with no answer, which would reach the client as a 502 although the
//! app is healthy.
//!
//! RFC 9110 (section 9.2.2) lets a proxy send a request with an idempotent method again when
//! the connection fails before the response. tidegate does it once, on a new connection, for
//! requests it can send again exactly (an idempotent method and no body) that went out on a
//! connection idle for [`AT_RISK_AFTER`] or longer. A request with a body is not replayed (the
//! body has been streamed out and is gone), nor is one sent on a connection that was new,
//! whose failure says something about the app rather than about a stale connection.
//!
//! An HTTP/2 app says so itself: a stream it refuses (`REFUSED_STREAM`) or one above the last
//! stream id of its `GOAWAY` was never processed ([`unprocessed_by_http2_app`]).

use std::future::Future;
use std::io;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::SendRequest;

use crate::outbound::request_body::RequestBody;

/// How long a connection must have been idle for a request sent on it to be at risk: only
/// then is a copy kept to send again. An app's keep-alive timeout closes connections idle
/// for at least that long (servers' defaults are seconds), while a connection reused
/// within milliseconds, as under load, is not being closed for idleness: there the copy
/// (1,300 to 1,900 instructions per request, measured) would be paid for nothing.
pub(super) const AT_RISK_AFTER: Duration = Duration::from_millis(50);

/// What one attempt on a connection gives: the response head, or the error with the request
/// if it was not sent.
pub(super) type Attempt = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>;

/// Hands `request` to `sender`, a reused connection, and keeps a copy of it to send again
/// (boxed) if the connection has been idle for [`AT_RISK_AFTER`] or longer and the request
/// may be sent again (see [`copy`]).
///
/// The request is taken by value, not borrowed by the caller: an `async fn` keeps a borrowed
/// local in its future across every await, which would double the request's room in it.
pub(super) fn hand_over(
    sender: &mut SendRequest<RequestBody>,
    request: Request<RequestBody>,
    idle_for: Duration,
) -> (
    impl Future<Output = Attempt> + use<>,
    Option<Box<Request<RequestBody>>>,
) {
    let replay = copy_if_at_risk(&request, idle_for);
    (sender.try_send_request(request), replay)
}

/// A copy of `request`, boxed, if it goes out on a connection idle for `idle_for`, at least
/// [`AT_RISK_AFTER`], and it may be sent again (see [`copy`]).
fn copy_if_at_risk(
    request: &Request<RequestBody>,
    idle_for: Duration,
) -> Option<Box<Request<RequestBody>>> {
    if idle_for < AT_RISK_AFTER {
        return None;
    }
    copy(request).map(Box::new)
}

/// A copy of `request` to send again, if it may be: its method is idempotent (`GET`, `HEAD`,
/// `OPTIONS`, `TRACE`, `PUT`, `DELETE`) and it has no body. Extensions are not copied (the
/// client side reads none).
fn copy(request: &Request<RequestBody>) -> Option<Request<RequestBody>> {
    if !request.method().is_idempotent() || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// Whether `error` says the connection ended before any answer came: closed (end of stream
/// before a complete response), reset or broken. An answer the app got wrong (a parse error)
/// or a timeout is not the race, and is not retried.
pub(super) fn closed_before_answer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    let source = std::error::Error::source(error).and_then(|s| s.downcast_ref::<io::Error>());
    source.is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    })
}

/// Whether `error`, from a request sent to an HTTP/2 app, says the app did not process it:
/// its stream was refused (`REFUSED_STREAM`), or it was above the last stream id of the app's
/// `GOAWAY`. Either may be sent again, whatever its method (RFC 9113 §8.7).
pub(super) fn unprocessed_by_http2_app(error: &hyper::Error) -> bool {
    let Some(h2) = crate::error::find_cause::<h2::Error>(error) else {
        return false;
    };
    h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, header};

    fn request(method: Method) -> Request<RequestBody> {
        let mut request = Request::new(RequestBody::empty());
        *request.method_mut() = method;
        *request.uri_mut() = "/a?b=c".parse().unwrap();
        request
            .headers_mut()
            .insert(header::HOST, "app".parse().unwrap());
        request
    }

    #[test]
    fn bodiless_idempotent_requests_are_copied_whole() {
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            let original = request(method.clone());
            let copy = copy(&original).expect("copied");
            assert_eq!(copy.method(), method);
            assert_eq!(copy.uri(), "/a?b=c");
            assert_eq!(copy.version(), original.version());
            assert_eq!(copy.headers(), original.headers());
            assert!(copy.body().is_end_stream());
        }
    }

    #[test]
    fn non_idempotent_requests_are_not_copied() {
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(copy(&request(method)).is_none());
        }
    }
}
