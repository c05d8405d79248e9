//! Connections to the app over TCP or a Unix socket, for the pooled proxy client
//! ([`Connector`]) and the health checker ([`connect`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{LiveConfig, Upstream};
use crate::error::{BoxError, UpstreamConnect, UpstreamConnectTimeout};

/// A connection to the app.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
}

/// A `tower::Service<Uri>` connector for hyper-util's pooled client. The URI is ignored: every
/// connection goes to the one configured app.
#[derive(Clone, Debug)]
pub struct Connector {
    upstream: Arc<Upstream>,
    live: LiveConfig,
}

/// Opens a connection to the app within `timeout`.
///
/// Fails with [`UpstreamConnectTimeout`] or [`UpstreamConnect`] (both in the error's chain).
pub async fn connect(upstream: &Upstream, timeout: Duration) -> Result<Stream, BoxError> {
    let attempt = async {
        match upstream {
            Upstream::Tcp { authority } => {
                let stream = TcpStream::connect(authority.as_str()).await?;
                // Proxied requests are small writes that must not wait for Nagle.
                stream.set_nodelay(true)?;
                Ok::<_, io::Error>(Stream::Tcp(stream))
            }
            Upstream::Unix { path } => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(Box::new(UpstreamConnect(Box::new(error)))),
        Err(_elapsed) => Err(Box::new(UpstreamConnectTimeout)),
    }
}

// === impl Connector ===

impl Connector {
    /// A connector to `upstream`; the connect timeout is read from the live config.
    pub fn new(upstream: Upstream, live: LiveConfig) -> Connector {
        Connector {
            upstream: Arc::new(upstream),
            live,
        }
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let upstream = self.upstream.clone();
        let timeout = self.live.peek().args.connect_timeout;
        Box::pin(async move { connect(&upstream, timeout).await.map(TokioIo::new) })
    }
}

// === impl Stream ===

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
