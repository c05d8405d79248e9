//! Idle HTTP/1.1 connections to the app, reused last-in first-out.
//!
//! A connection is put back only once its exchange is over (the response body was read to its
//! end), so every connection on the stack is between messages. The most recently used is taken
//! first: after a burst, the extra connections stay at the bottom and age out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::config::LiveConfig;

/// The longest the reaper sleeps between looks for connections idle longer than
/// `--upstream-idle-timeout` while no traffic does it; it looks twice per timeout if that is
/// shorter.
const REAP_EVERY: Duration = Duration::from_secs(10);

/// The idle connections of one upstream (one per runtime in per-thread mode).
#[derive(Debug)]
pub(super) struct Pool {
    /// Oldest at the front; taken from the back.
    idle: Mutex<VecDeque<Idle>>,
    /// For `--upstream-idle-timeout`, read when a connection is put back.
    live: LiveConfig,
    reaper_started: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// An HTTP/1.1 connection lent to one exchange. [`Lease::release`] puts it back once the
/// response has been read to its end; dropping it instead closes the connection (hyper closes
/// a connection whose sender is gone once it is idle, or at once if a message is half done).
#[derive(Debug)]
pub struct Lease {
    sender: SendRequest<RequestBody>,
    pool: Arc<Pool>,
}

// === impl Pool ===

impl Pool {
    /// An empty pool; `live` gives the idle timeout.
    pub(super) fn new(live: LiveConfig) -> Pool {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            live,
            reaper_started: AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection that is ready for a request, if any, and since
    /// when it has been idle. Closed connections met on the way are dropped; those whose
    /// connection task has not yet caught up with the end of their last exchange are moved to
    /// the bottom, for later.
    pub(super) fn checkout(&self) -> Option<(SendRequest<RequestBody>, Instant)> {
        let mut idle = self.lock();
        for _ in 0..idle.len() {
            let entry = idle.pop_back()?;
            if entry.sender.is_ready() {
                return Some((entry.sender, entry.since));
            }
            if !entry.sender.is_closed() {
                idle.push_front(entry);
            }
        }
        None
    }

    /// Puts `sender` back on the stack, and closes connections idle for too long.
    fn put(self: &Arc<Self>, sender: SendRequest<RequestBody>) {
        let timeout = self.timeout();
        if sender.is_closed() || timeout.is_zero() {
            return;
        }
        let now = Instant::now();
        {
            let mut idle = self.lock();
            idle.push_back(Idle { sender, since: now });
            expire(&mut idle, now, timeout);
        }
        // Read first: once started, the flag is never written again on this per-request path.
        if !self.reaper_started.load(Ordering::Relaxed)
            && !self.reaper_started.swap(true, Ordering::Relaxed)
        {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// `--upstream-idle-timeout`, as it is now (reloads apply).
    fn timeout(&self) -> Duration {
        self.live.peek().args.upstream_idle_timeout
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Idle>> {
        // The stack is always consistent between statements: a panic elsewhere cannot have
        // left it half-updated, so a poisoned lock is still safe to use.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Drops connections idle for `timeout` or longer by `now`, oldest first.
fn expire(idle: &mut VecDeque<Idle>, now: Instant, timeout: Duration) {
    while idle
        .front()
        .is_some_and(|entry| now.saturating_duration_since(entry.since) >= timeout)
    {
        idle.pop_front();
    }
}

/// Closes idle connections that have timed out while no request came to do it, for as long
/// as the pool lives.
async fn reap(pool: Weak<Pool>) {
    loop {
        let every = match pool.upgrade() {
            Some(pool) => (pool.timeout() / 2).clamp(Duration::from_millis(50), REAP_EVERY),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let timeout = pool.timeout();
        expire(&mut pool.lock(), Instant::now(), timeout);
    }
}

// === impl Lease ===

impl Lease {
    /// Lends `sender`, which belongs to `pool`.
    pub(super) fn new(sender: SendRequest<RequestBody>, pool: Arc<Pool>) -> Lease {
        Lease { sender, pool }
    }

    /// The exchange is over: the connection goes back to the pool. Its task may not have
    /// caught up yet with the end of the message (the body's last bytes and hyper's switch to
    /// the next message happen in different tasks); then a small task puts it back once it
    /// is ready, or drops it if it closes instead (the app said `Connection: close`).
    pub fn release(self) {
        let Lease { mut sender, pool } = self;
        if sender.is_ready() {
            pool.put(sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(sender);
                }
            });
        }
    }
}
