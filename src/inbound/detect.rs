//! Tells HTTP/1.x from HTTP/2 prior knowledge (h2c) by the first bytes, then replays them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client speaks.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// An IO that first yields bytes already read from `inner`: the bytes read to detect the
/// protocol, or those a parked connection's hyper had read but not parsed.
#[derive(Debug)]
pub(super) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

/// Reads just enough of `io` to tell the protocol. Returns `None` if the client closed first.
pub(super) async fn detect<T: AsyncRead + Unpin>(
    mut io: T,
) -> io::Result<Option<(Protocol, Rewind<T>)>> {
    let mut buf = [0u8; 24];
    let mut len = 0;
    let protocol = loop {
        let n = io.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        if buf[..len] != PREFACE[..len] {
            break Protocol::Http1;
        }
        if len == PREFACE.len() {
            break Protocol::Http2;
        }
    };
    Ok(Some((
        protocol,
        Rewind {
            prefix: Bytes::copy_from_slice(&buf[..len]),
            inner: io,
        },
    )))
}

impl<T> Rewind<T> {
    /// Makes `bytes` the next to be read, before anything else from `inner`.
    pub(super) fn replay(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty(), "replaying over unread bytes");
        self.prefix = bytes;
    }

    /// The wrapped IO.
    pub(super) fn get_ref(&self) -> &T {
        &self.inner
    }
}

// === impl Rewind ===

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(input: &[u8]) -> (Protocol, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(input).await.unwrap();
        drop(client);
        let (proto, mut io) = detect(server).await.unwrap().unwrap();
        let mut replay = Vec::new();
        io.read_to_end(&mut replay).await.unwrap();
        (proto, replay)
    }

    #[tokio::test]
    async fn short_http1_request_is_replayed_whole() {
        let (p, bytes) = run(b"GET / HTTP/1.0\r\n\r\n").await;
        assert_eq!(p, Protocol::Http1);
        assert_eq!(bytes, b"GET / HTTP/1.0\r\n\r\n");
    }

    #[tokio::test]
    async fn h2_preface_is_detected() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00");
        let (p, bytes) = run(&input).await;
        assert_eq!(p, Protocol::Http2);
        assert_eq!(bytes, input);
    }

    #[tokio::test]
    async fn closed_before_any_byte() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        assert!(detect(server).await.unwrap().is_none());
    }
}
