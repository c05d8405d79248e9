//! An optional deadline around a future, whose timer is allocated only when it is set.
//!
//! `match limit { Some(d) => timeout(d, fut).await, None => fut.await }` would make the
//! calling future hold room for the inner future twice (once per arm); here it appears once,
//! and a request without `--upstream-timeout` pays for no timer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

pin_project! {
    /// Future of [`within`].
    pub(super) struct Within<F> {
        #[pin]
        inner: F,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

/// The deadline passed before the future finished.
#[derive(Debug)]
pub(super) struct Elapsed;

/// `inner`, cut off with [`Elapsed`] once `limit` (if any) has passed.
pub(super) fn within<F: Future>(limit: Option<Duration>, inner: F) -> Within<F> {
    Within {
        inner,
        timer: limit.map(|limit| Box::pin(tokio::time::sleep(limit))),
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match this.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Elapsed)),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cuts_off_only_when_a_limit_is_set() {
        let slow = || tokio::time::sleep(Duration::from_secs(60));
        assert!(within(Some(Duration::from_secs(1)), slow()).await.is_err());
        assert!(within(None, slow()).await.is_ok());
        assert_eq!(
            within(Some(Duration::from_secs(1)), async { 7 })
                .await
                .unwrap(),
            7
        );
    }
}
