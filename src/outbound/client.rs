//! The client side of the proxy: connections to the app, and sending one request over one.
//!
//! HTTP/1.1 connections are pooled ([`super::pool`]): a request takes the most recently used idle
//! connection or opens a new one, and its response body gives the connection back when it has
//! been read to the end. With `--upstream-http2`, all requests share one connection, reopened
//! when it closes. Each connection is driven by a task of its own.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{Gauge, IntCounter};

use super::goaway::ReadFirst;
pub(crate) use super::pool::Lease;
use super::pool::{IdleSince, Pool};
use super::{connect, replay};
use crate::config::{LiveConfig, Upstream};
use crate::error::BoxError;
use crate::outbound::request_body::RequestBody;

/// Most times one request is handed to HTTP/2 connections to the app.
const HTTP2_ATTEMPTS: u32 = 3;

/// Sends requests to the app. Cheap to clone; clones share the pool.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    inner: Arc<Inner>,
}

/// Why a request got no response head from the app.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be opened: the cause is
    /// [`UpstreamConnect`](crate::error::UpstreamConnect) or
    /// [`UpstreamConnectTimeout`](crate::error::UpstreamConnectTimeout).
    #[error("no connection to the app")]
    Connect(#[source] BoxError),
    /// A new connection failed its HTTP handshake.
    #[error("HTTP handshake with the app failed")]
    Handshake(#[source] hyper::Error),
    /// The request was handed to a connection, which failed before the response head came
    /// (the app closed or reset it, or the client's body failed).
    #[error("exchange with the app failed")]
    Exchange(#[source] hyper::Error),
}

#[derive(Debug)]
struct Inner {
    upstream: Upstream,
    live: LiveConfig,
    protocol: Protocol,
    /// `tidegate_upstream_replays_total`.
    replays: IntCounter,
}

#[derive(Debug)]
enum Protocol {
    Http1(Arc<Pool>),
    /// The shared connection; the lock is held while it is (re)opened, so a burst opens one.
    Http2(Arc<tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>>),
}

// === impl Client ===

impl Client {
    /// A client for the app in `live`'s config (fixed at start, as is the protocol:
    /// `http2` for `--upstream-http2`); the connect timeout is read per connection. `replays`
    /// counts the requests sent again; `keepalive` shows the app's keep-alive timeout as the
    /// pool knows it.
    pub(crate) fn new(live: LiveConfig, replays: IntCounter, keepalive: Gauge) -> Client {
        let config = live.load();
        let protocol = if config.args.upstream_http2 {
            Protocol::Http2(Arc::new(tokio::sync::Mutex::new(None)))
        } else {
            Protocol::Http1(Arc::new(Pool::new(live.clone(), keepalive)))
        };
        Client {
            inner: Arc::new(Inner {
                upstream: config.args.upstream.clone(),
                live,
                protocol,
                replays,
            }),
        }
    }

    /// Whether requests go out as HTTP/2 (they then need an absolute URI; HTTP/1.1 requests
    /// are sent in origin form, as given).
    pub(crate) fn is_http2(&self) -> bool {
        matches!(self.inner.protocol, Protocol::Http2(_))
    }

    /// Sends `request` and waits for the response head. The [`Lease`], if any, must be
    /// released when the response body has been read to its end.
    ///
    /// A request that a reused connection turns down unsent (the app closed it while idle) is
    /// sent again on another connection; one that was handed to a fresh connection is not.
    /// A bodiless request with an idempotent method that a reused HTTP/1.1 connection took and
    /// then closed or reset before answering (the app's keep-alive timeout closed it as the
    /// request arrived) is sent once more on a new connection (module `replay`).
    ///
    /// The future owns what it needs (it can outlive `self`), and holds `request` once: not
    /// an `async fn`, which would keep a copy of `request` beside the protocol's own.
    pub(crate) fn send(
        &self,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<Lease>), SendError>> + Send + 'static
    {
        match &self.inner.protocol {
            Protocol::Http1(pool) => Either::Left(self.clone().send_http1(pool.clone(), request)),
            // Boxed: its connect, handshake and lock states would otherwise make the future
            // of every HTTP/1.1 request larger.
            Protocol::Http2(shared) => {
                Either::Right(Box::pin(self.clone().send_http2(shared.clone(), request)))
            }
        }
    }

    async fn send_http1(
        self,
        pool: Arc<Pool>,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        // Idle connections first; what breaks out of the loop goes on a new connection.
        let on_new = loop {
            let Some((mut sender, stamp, idle_for)) = pool.checkout() else {
                break request;
            };
            let (sending, replay) = replay::hand_over(&mut sender, request, idle_for);
            match sending.await {
                Ok(response) => {
                    let lease = Lease::new(sender, stamp, pool, response.headers());
                    return Ok((response, Some(lease)));
                }
                Err(mut error) => match (error.take_message(), replay) {
                    (Some(unsent), _) => request = unsent,
                    (None, Some(copy)) if replay::closed_before_answer(error.error()) => {
                        tracing::debug!(
                            error = %error.error(),
                            "A reused connection to the app closed before answering; \
                             sending the request again on a new one"
                        );
                        self.inner.replays.inc();
                        // On a new connection: the other idle ones may be as stale.
                        break *copy;
                    }
                    _ => return Err(SendError::Exchange(error.into_error())),
                },
            }
        };
        // Boxed: the connect and handshake states would otherwise make every request's
        // future larger, and most requests find an idle connection.
        Box::pin(self.send_on_new(pool, on_new)).await
    }

    /// Sends `request` on a new connection, which goes to `pool` when its exchange is over.
    async fn send_on_new(
        self,
        pool: Arc<Pool>,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        let stamp = IdleSince::default();
        let mut sender = self.open_http1(&pool, stamp.clone()).await?;
        match sender.try_send_request(request).await {
            Ok(response) => {
                let lease = Lease::new(sender, stamp, pool, response.headers());
                Ok((response, Some(lease)))
            }
            Err(error) => Err(SendError::Exchange(error.into_error())),
        }
    }

    /// Sends `request` over the shared HTTP/2 connection. A request the app did not process
    /// (its stream refused with `REFUSED_STREAM`, or above the last stream id of the app's
    /// `GOAWAY`: RFC 9113 §8.7) is sent once more, on a new connection if this one is going
    /// away, whatever its method; to make that possible its body is read ahead while it fits
    /// in `--upstream-h2-retry-body`. One that never left (the connection was closing) is
    /// handed to the next connection, within [`HTTP2_ATTEMPTS`].
    async fn send_http2(
        self,
        shared: Arc<tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>>,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        let max_body = self.inner.live.peek().args.upstream_h2_retry_body.as_u64() as usize;
        let (parts, body) = request.into_parts();
        let buffered = body.buffer(max_body).await;
        let mut again = buffered.copy.map(|body| (parts.clone(), body));
        let mut request = Request::from_parts(parts, buffered.body);
        // Sending again is bounded: once for a request the app did not process, and up to
        // [`HTTP2_ATTEMPTS`] in all with those that never left (the connection was closing).
        let mut attempts = 1;
        loop {
            let (mut sender, reused) = self.http2_sender(&shared).await?;
            let mut error = match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, None)),
                Err(error) => error,
            };
            request = match error.take_message() {
                // The connection is going away (GOAWAY) before the request went out: the next
                // one takes it.
                Some(unsent) if reused && attempts < HTTP2_ATTEMPTS => unsent,
                Some(_) => return Err(SendError::Exchange(error.into_error())),
                None => match again.take() {
                    Some((parts, body))
                        if attempts < HTTP2_ATTEMPTS
                            && replay::unprocessed_by_http2_app(error.error()) =>
                    {
                        tracing::debug!(
                            error = %error.error(),
                            "The app did not process an HTTP/2 request; sending it again"
                        );
                        self.inner.replays.inc();
                        Request::from_parts(parts, RequestBody::from_bytes(body))
                    }
                    _ => return Err(SendError::Exchange(error.into_error())),
                },
            };
            attempts += 1;
            let mut slot = shared.lock().await;
            if slot
                .as_ref()
                .is_some_and(|s| s.is_closed() || !s.is_ready())
            {
                *slot = None;
            }
        }
    }

    /// The shared HTTP/2 connection, opened if there is none or it closed; and whether it was
    /// reused.
    async fn http2_sender(
        &self,
        shared: &tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
    ) -> Result<(http2::SendRequest<RequestBody>, bool), SendError> {
        let mut slot = shared.lock().await;
        if let Some(sender) = slot.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok((sender.clone(), true));
        }
        let sender = self.open_http2().await?;
        *slot = Some(sender.clone());
        Ok((sender, false))
    }

    /// Opens a connection for `pool`; its task tells the pool when the app closes it while it
    /// is idle there (`stamp`).
    async fn open_http1(
        &self,
        pool: &Arc<Pool>,
        stamp: IdleSince,
    ) -> Result<http1::SendRequest<RequestBody>, SendError> {
        let io = self.open_stream().await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Handshake)?;
        let pool = Arc::downgrade(pool);
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "Connection to the app ended with an error");
            }
            if let Some(pool) = pool.upgrade() {
                pool.app_closed(&stamp);
            }
        });
        Ok(sender)
    }

    async fn open_http2(&self) -> Result<http2::SendRequest<RequestBody>, SendError> {
        let io = TokioIo::new(ReadFirst::new(self.open_stream().await?.into_inner()));
        let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // One stream until the app's SETTINGS say how many it takes. hyper would assume
            // 100, and an app that takes fewer refuses the excess of a burst that comes before
            // its SETTINGS (REFUSED_STREAM, a 502 each); the rest wait for the SETTINGS, which
            // follow the app's preface at once.
            .initial_max_send_streams(1)
            .handshake(io)
            .await
            .map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP/2 connection to the app ended with an error");
            }
        });
        sender.ready().await.map_err(SendError::Handshake)?;
        Ok(sender)
    }

    async fn open_stream(&self) -> Result<TokioIo<connect::Stream>, SendError> {
        let timeout = self.inner.live.peek().args.connect_timeout;
        connect::connect(&self.inner.upstream, timeout)
            .await
            .map(TokioIo::new)
            .map_err(SendError::Connect)
    }
}
