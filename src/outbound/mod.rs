//! The innermost service: rewrites an admitted request for the app, sends it over the
//! [`client`](self::client), and streams the answer back. Upgrades (WebSocket)
//! become tunnels.

mod abandoned;
pub(crate) mod client;
pub(crate) mod connect;
mod deadline;
mod goaway;
pub(crate) mod half_close;
pub mod headers;
pub(crate) mod metrics;
mod pool;
pub(crate) mod progress;
mod replay;
pub(crate) mod request_body;
pub(crate) mod response_body;
mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio_util::task::TaskTracker;
use tower::Service;

use self::abandoned::Abandoned;
use self::deadline::{Elapsed, Within};
use self::half_close::HalfClose;

use self::metrics::{UpstreamError, UpstreamMetrics};
use crate::admission::Admitted;
use crate::config::{ClientAbort, LiveConfig, Upstream};
use crate::error::{
    BoxError, Rejected, UpstreamConnect, UpstreamConnectTimeout, UpstreamReset, UpstreamTimeout,
    find_cause, is_caused_by,
};
use crate::metrics::{LabelValues, RequestMetrics};
use crate::outbound::client::{Client, Lease, SendError};
use crate::outbound::progress::Progress;
use crate::outbound::request_body::RequestBody;
use crate::outbound::response_body::{ExchangeGuard, ResponseBody, UpstreamBody};

/// Forwards admitted requests to the app. Cloned per connection with the client's address.
#[derive(Clone, Debug)]
pub(crate) struct Proxy {
    shared: Arc<Shared>,
    /// The client's address as an `X-Forwarded-For` entry, rendered once per connection.
    client_ip: Option<HeaderValue>,
    /// For an HTTP/1.1 client answered after a half-close: told when a request is admitted,
    /// and handed to a body still arriving.
    half_close: Option<HalfClose>,
}

/// The exchange with the app for one request, boxed so that it can move to a task of its own.
type BoxedExchange = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    /// The exchange with the app: the send (under `--upstream-timeout`, if set), then the app's
    /// response turned into the client's. Written out rather than an `async fn`, which would
    /// keep room for the request beside the send's own copy of it.
    struct Exchange<F> {
        #[pin]
        send: Within<F>,
        shared: Arc<Shared>,
        upgrade: Option<OnUpgrade>,
        // Taken when the response is ready.
        guard: Option<ExchangeGuard>,
        via: bool,
    }
}

/// What the send gives: the app's response head and the connection's lease, or why not.
type Sent = Result<(Response<Incoming>, Option<Lease>), SendError>;

/// Future returned by [`Proxy`]: the exchange, polled in the connection's task. With
/// `--on-client-abort finish`, dropping it before it is done (the client went away) moves the
/// rest of the exchange to a task of its own, so the app's work is not cut off and the slot
/// stays held until it ends; with `cancel`, dropping it ends the exchange.
pub(crate) struct ResponseFuture {
    exchange: Option<BoxedExchange>,
    /// Set with `--on-client-abort finish`.
    finisher: Option<Abandoned>,
}

/// Per-request settings read from the live config when the request is admitted.
#[derive(Debug, Copy, Clone)]
struct Settings {
    timeout: Option<Duration>,
    via: bool,
    max_request_body: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    /// Set for HTTP/2 to the app, which needs an absolute URI; HTTP/1.1 requests go out in
    /// origin form.
    authority: Option<Authority>,
    live: LiveConfig,
    progress: Progress,
    metrics: Arc<UpstreamMetrics>,
    requests: Arc<RequestMetrics>,
    background: TaskTracker,
    abandoned: Abandoned,
}

// === impl Proxy ===

impl Proxy {
    /// Builds the client for the app in `live` (the upstream and its protocol are fixed at
    /// start; timeouts and the rest are read per request). `background` tracks upgraded
    /// connections and exchanges whose client left, so the drain can wait for them.
    pub(crate) fn new(
        live: LiveConfig,
        progress: Progress,
        metrics: Arc<UpstreamMetrics>,
        requests: Arc<RequestMetrics>,
        background: TaskTracker,
    ) -> Proxy {
        let client = Client::new(
            live.clone(),
            metrics.upstream_replays.clone(),
            metrics.upstream_keepalive.clone(),
        );
        let abandoned = Abandoned::new(live.clone(), background.clone(), metrics.clone());
        let authority = client.is_http2().then(|| match &live.load().args.upstream {
            Upstream::Tcp { authority } => authority.clone(),
            Upstream::Unix { .. } => Authority::from_static("localhost"),
        });
        Proxy {
            shared: Arc::new(Shared {
                client,
                authority,
                live,
                progress,
                metrics,
                requests,
                background,
                abandoned,
            }),
            client_ip: None,
            half_close: None,
        }
    }

    /// A copy for one client connection; `half_close` is set for an HTTP/1.1 connection
    /// whose client is answered after a half-close.
    pub(crate) fn for_client(&self, addr: SocketAddr, half_close: Option<HalfClose>) -> Proxy {
        Proxy {
            shared: self.shared.clone(),
            client_ip: Some(headers::client_ip(addr.ip())),
            half_close,
        }
    }
}

impl Service<Admitted<Request<Incoming>>> for Proxy {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, admitted: Admitted<Request<Incoming>>) -> ResponseFuture {
        let Admitted {
            mut request,
            admission,
        } = admitted;
        let config = self.shared.live.peek();
        let settings = Settings {
            timeout: admission.route_timeout().or(config.args.upstream_timeout),
            via: config.args.via,
            max_request_body: admission.max_request_body(),
        };
        let finisher = (config.args.on_client_abort == ClientAbort::Finish)
            .then(|| self.shared.abandoned.clone());
        let guard = ExchangeGuard::new(admission, self.shared.progress.clone(), finisher.clone());
        // The request is rewritten here rather than in the exchange: an `async fn` keeps room
        // for its arguments for as long as it lives, and the client's request is not needed
        // once the app's is built.
        let upgrade =
            headers::wants_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
        // Admitted: from now on a half-close is answered. The body, if it is still arriving,
        // learns from the same state that the client's stream ended.
        let half_close = self.half_close.as_ref().and_then(|state| {
            state.admitted();
            (!http_body::Body::is_end_stream(request.body())).then(|| state.clone())
        });
        let upstream_request = self.shared.upstream_request(
            request,
            self.client_ip.as_ref(),
            upgrade.is_some(),
            settings,
            half_close,
        );
        let exchange: BoxedExchange = match upstream_request {
            Ok(upstream_request) => Box::pin(Exchange {
                send: deadline::within(settings.timeout, self.shared.client.send(upstream_request)),
                shared: self.shared.clone(),
                upgrade,
                guard: Some(guard),
                via: settings.via,
            }),
            Err(error) => Box::pin(std::future::ready(Err(error))),
        };
        ResponseFuture {
            exchange: Some(exchange),
            finisher,
        }
    }
}

// === impl ResponseFuture ===

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(exchange) = self.exchange.as_mut() else {
            // Polled after completion: a contract violation by the caller; never resolve.
            return Poll::Pending;
        };
        let result = std::task::ready!(exchange.as_mut().poll(cx));
        self.exchange = None;
        Poll::Ready(result)
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        let Some(finisher) = self.finisher.take() else {
            return;
        };
        finisher.finish(async move {
            // The client is gone: the response is read to its end and discarded.
            if let Ok(response) = exchange.await {
                let mut body = response.into_body();
                while let Some(Ok(_)) = body.frame().await {}
            }
        });
    }
}

// === impl Exchange ===

impl<F: Future<Output = Sent>> Future for Exchange<F> {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let sent = std::task::ready!(this.send.poll(cx));
        let Some(guard) = this.guard.take() else {
            // Polled after completion: a contract violation by the caller; never resolve.
            return Poll::Pending;
        };
        Poll::Ready(
            this.shared
                .answer(sent, this.upgrade.take(), guard, *this.via),
        )
    }
}

// === impl Shared ===

impl Shared {
    /// The client's response, from what the send gave (or `Elapsed` at the deadline).
    /// `upgrade` is the client's side of a requested protocol upgrade; `via` adds `Via`.
    fn answer(
        &self,
        sent: Result<Sent, Elapsed>,
        upgrade: Option<OnUpgrade>,
        mut guard: ExchangeGuard,
        via: bool,
    ) -> Result<Response<ResponseBody>, BoxError> {
        let Ok(result) = sent else {
            self.count_error(UpstreamError::Timeout);
            return Err(Box::new(UpstreamTimeout));
        };
        let (mut response, lease) = match result {
            Ok(sent) => sent,
            Err(error) => {
                let error = self.classify(error);
                if is_caused_by::<UpstreamConnect>(&*error) {
                    // Refused at once: no word on how fast the app answers.
                    guard.admission_mut().skip_sample();
                }
                return Err(error);
            }
        };
        self.progress.record();
        // The adaptive limit's sample is the app's time to answer, not the client's time to
        // read the body (or a tunnel's lifetime).
        guard.admission_mut().sample_now();

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = upgrade
        {
            let app_side = hyper::upgrade::on(&mut response);
            // The connection becomes the tunnel and never goes back to the pool; its sender
            // is held until the tunnel ends, so hyper hands the socket over undisturbed.
            self.background.spawn(async move {
                upgrade::tunnel(client_side, app_side, guard).await;
                drop(lease);
            });
            let (mut parts, _empty) = response.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, ResponseBody::empty()));
        }

        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        if via {
            headers::add_via(&mut parts.headers);
        }
        Ok(Response::from_parts(
            parts,
            ResponseBody::Upstream(UpstreamBody::new(body, guard, lease)),
        ))
    }

    fn upstream_request(
        &self,
        request: Request<Incoming>,
        client_ip: Option<&HeaderValue>,
        upgrade: bool,
        settings: Settings,
        half_close: Option<HalfClose>,
    ) -> Result<Request<RequestBody>, BoxError> {
        let (mut parts, body) = request.into_parts();
        let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = match &self.authority {
            Some(authority) => Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority.clone())
                .path_and_query(path)
                .build()?,
            None => Uri::from(path),
        };
        parts.version = if self.authority.is_some() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        headers::set_forwarded(&mut parts.headers, client_ip, authority.as_deref());
        if settings.via {
            headers::add_via(&mut parts.headers);
        }
        let body = RequestBody::new(body, settings.max_request_body, half_close);
        Ok(Request::from_parts(parts, body))
    }

    fn classify(&self, error: SendError) -> BoxError {
        let error: BoxError = Box::new(error);
        if let Some(rejected) = find_cause::<Rejected>(&*error) {
            // The client's body failed (too large or malformed), not the app.
            self.requests.count_rejection(rejected);
            error
        } else if is_caused_by::<UpstreamConnectTimeout>(&*error) {
            self.count_error(UpstreamError::ConnectTimeout);
            error
        } else if is_caused_by::<UpstreamConnect>(&*error) {
            self.count_error(UpstreamError::Connect);
            error
        } else {
            self.count_error(UpstreamError::Reset);
            Box::new(UpstreamReset(error))
        }
    }

    fn count_error(&self, kind: UpstreamError) {
        self.metrics
            .upstream_errors
            .with_label_values(&[kind.as_label()])
            .inc();
    }
}
