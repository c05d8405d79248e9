//! The client connection's IO, as hyper sees it. It does two things besides passing bytes:
//!
//! - it tells the connection's [`Activity`] when bytes arrive, for the idle and head timeouts;
//! - it keeps a half-closing client's end of stream from hyper while its admitted request is
//!   answered (`outbound::half_close`), and hands it over once the answer is done;
//! - it closes with a linger. When tidegate closes a connection while the client is still
//!   sending (a 413 for a body too large, a 400, a `Connection: close` during shutdown),
//!   closing the socket with unread bytes makes the kernel send a reset, and the client may
//!   lose the response it has not read yet. So shutting down sends FIN first, then reads and
//!   discards what the client still sends until it closes its side, for [`LINGER`] at most.
//!   While the connection is being parked ([`Activity::parking`]), shutting down does nothing:
//!   hyper's connection ends but the socket stays open for the next one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use super::activity::Activity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Longest time a closing connection keeps reading (and discarding) the client's bytes.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

pin_project! {
    /// An IO that reports reads to its [`Activity`] and whose shutdown waits for the peer to
    /// finish sending, up to [`LINGER`].
    #[derive(Debug)]
    pub(super) struct ConnIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        state: State,
        // Set once the client's end of stream was kept from hyper: a half-close, answered.
        half_closed: bool,
        // Boxed so that the IO stays `Unpin`; allocated only when the connection closes.
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

#[derive(Debug, Copy, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// FIN sent; discarding input until EOF or the deadline.
    Draining,
    Closed,
}

// === impl ConnIo ===

impl<T> ConnIo<T> {
    /// Wraps `inner`, reporting its reads to `activity`.
    pub(super) fn new(inner: T, activity: Arc<Activity>) -> ConnIo<T> {
        ConnIo {
            inner,
            activity,
            state: State::Open,
            half_closed: false,
            deadline: None,
        }
    }

    /// The wrapped IO.
    pub(super) fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped IO.
    pub(super) fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.half_closed {
            // hyper sees the end of stream once the answer is done (its request's guard then
            // wakes the connection's task).
            return if this.activity.busy() {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            };
        }
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        ready!(this.inner.poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.on_read();
        } else if room && this.activity.on_end_of_stream() {
            // The client shut down its sending side after its request was admitted: keep the
            // end of stream from hyper, which would take it for the client leaving.
            *this.half_closed = true;
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if *this.state == State::Open && this.activity.parking() {
            return Poll::Ready(Ok(()));
        }
        loop {
            match *this.state {
                State::Open => {
                    ready!(this.inner.as_mut().poll_shutdown(cx))?;
                    *this.state = State::Draining;
                    *this.deadline = Some(Box::pin(tokio::time::sleep(LINGER)));
                }
                State::Draining => {
                    if let Some(deadline) = this.deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        *this.state = State::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match ready!(this.inner.as_mut().poll_read(cx, &mut buf)) {
                        // Bytes the client sent after the response: discarded.
                        Ok(()) if !buf.filled().is_empty() => continue,
                        // EOF or an error: the client is done.
                        _ => *this.state = State::Closed,
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn shutdown_drains_until_the_peer_closes() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = ConnIo::new(server, Activity::new(tokio::time::Instant::now(), None));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            // More than the pipe holds: without draining, this would block forever.
            client_write.write_all(&[7u8; 4096]).await.unwrap();
            client_write.shutdown().await.unwrap();
        });
        server.write_all(b"413").await.unwrap();
        server.shutdown().await.unwrap();
        writer.await.unwrap();
        let mut got = Vec::new();
        client_read.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"413");
    }

    #[tokio::test]
    async fn shutdown_while_parking_leaves_the_stream_open() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Activity::new(tokio::time::Instant::now(), None);
        let mut server = ConnIo::new(server, activity.clone());
        activity.set_parking(true);
        server.shutdown().await.unwrap();
        activity.set_parking(false);
        // Still open both ways: the client's bytes arrive, and ours reach it.
        client.write_all(b"next").await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"next");
        server.write_all(b"ok").await.unwrap();
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"ok");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_up_after_the_linger_time() {
        let (_client, server) = tokio::io::duplex(64);
        let mut server = ConnIo::new(server, Activity::new(tokio::time::Instant::now(), None));
        let start = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert_eq!(start.elapsed(), LINGER);
    }
}
