//! Keeps an HTTP/2 app's `GOAWAY` from being lost to a failed write.
//!
//! An app that shuts a connection down gracefully sends `GOAWAY` with the last stream it
//! processes, finishes those streams and closes the socket. A stream tidegate opened in the
//! meantime reaches a closed socket; the next write fails (`EPIPE`, `ECONNRESET`) while the
//! `GOAWAY` still waits, unread, in the receive buffer. The `h2` crate flushes before it reads,
//! so it would fail every pending stream with the write's error, and the ones the app never
//! processed could not be told apart and sent again. [`ReadFirst`] takes a write that fails
//! because the peer is gone as done: the connection is dead anyway, and the reads that follow
//! deliver the `GOAWAY` (streams above its last id then fail as unprocessed) and then the end
//! of the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An HTTP/2 connection's socket whose writes, once the peer is gone, are dropped instead of
/// failed, so that what the peer sent before it left is still read.
#[derive(Debug)]
pub(super) struct ReadFirst<T> {
    inner: T,
    /// Set once a write found the peer gone.
    gone: bool,
}

impl<T> ReadFirst<T> {
    pub(super) fn new(inner: T) -> ReadFirst<T> {
        ReadFirst { inner, gone: false }
    }
}

/// Whether `error` says the peer closed or reset the connection.
fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadFirst<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadFirst<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.gone {
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Err(error)) if peer_gone(&error) => {
                self.gone = true;
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.gone {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(Err(error)) if peer_gone(&error) => {
                self.gone = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.gone {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
