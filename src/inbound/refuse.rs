//! Connections over `--max-connections`: answered with a 503 an HTTP/1 client can read, then
//! closed. HTTP/2 clients see the connection close. The work per refusal is bounded in time and
//! the number of refusals in progress is capped, so a connection flood cannot pile them up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Refusals in progress at most; beyond it a connection is closed without an answer.
const MAX_REFUSING: usize = 256;
/// Body of the refusal.
const BODY: &str = "too many connections, retry later\n";
/// Time one refusal may take in all.
const REFUSAL_BUDGET: Duration = Duration::from_secs(1);

/// The refusals in progress.
#[derive(Clone, Debug, Default)]
pub(super) struct Refusals {
    in_progress: Arc<AtomicUsize>,
}

/// Frees a refusal's place when dropped.
struct Refusing(Arc<AtomicUsize>);

// === impl Refusals ===

impl Refusals {
    /// Answers `stream` with a 503 in the background, or closes it at once if too many
    /// refusals are in progress.
    pub(super) fn refuse(&self, stream: TcpStream, retry_after: Duration) {
        let reserved = self
            .in_progress
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_REFUSING).then_some(n + 1)
            });
        if reserved.is_err() {
            return;
        }
        let place = Refusing(self.in_progress.clone());
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\n\
             content-type: text/plain; charset=utf-8\r\n\
             content-length: {}\r\n\
             retry-after: {}\r\n\
             tidegate-shed: connection-limit\r\n\
             connection: close\r\n\r\n{BODY}",
            BODY.len(),
            retry_after.as_secs().max(1)
        );
        tokio::spawn(async move {
            let _place = place;
            let _ = tokio::time::timeout(REFUSAL_BUDGET, answer(stream, response)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, response: String) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    // Read the request first (if one comes within the budget), so that closing with unread
    // bytes does not reset the connection under the response.
    let _ = stream.read(&mut buf).await?;
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

impl Drop for Refusing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
