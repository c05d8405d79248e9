//! Idle HTTP/1.1 connections to the app, reused last-in first-out.
//!
//! A connection is put back only once its exchange is over (the response body was read to its
//! end), so every connection on the stack is between messages. The most recently used is taken
//! first: after a burst, the extra connections stay at the bottom and age out.
//!
//! Connections idle longer than `--upstream-idle-timeout` are closed, and never taken. The
//! default (1.5 s) is below the keep-alive timeouts of common app servers (gunicorn 2 s,
//! uvicorn, Node.js and Apache 5 s), so tidegate stops using a connection before the app
//! closes it: a request written just as the app closes its end would be lost (the keep-alive
//! race). Two things shorten it further, to three quarters of the app's own timeout: an app
//! that announces it (`Keep-Alive: timeout=N` on its responses, as Node.js and Apache do), and
//! an app seen closing a connection that sat idle in the pool (its timeout is then learned
//! from how long that connection had been idle).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use hyper::client::conn::http1::SendRequest;
use prometheus::Gauge;
use tokio::time::Instant;

use crate::config::LiveConfig;
use crate::outbound::request_body::RequestBody;

/// The longest the reaper sleeps between looks for connections idle longer than
/// `--upstream-idle-timeout` while no traffic does it; it looks twice per timeout if that is
/// shorter.
const REAP_EVERY: Duration = Duration::from_secs(10);

/// `Keep-Alive`, in which an app may announce its keep-alive timeout.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Idle closes by the app shorter than this are not taken for its keep-alive timeout (an app
/// closing right after a response without saying so is not timing idleness out).
const LEARN_FLOOR: Duration = Duration::from_millis(10);

/// The idle connections of one upstream (one per runtime in per-thread mode).
#[derive(Debug)]
pub(super) struct Pool {
    /// Oldest at the front; taken from the back.
    idle: Mutex<VecDeque<Idle>>,
    /// For `--upstream-idle-timeout`, read when a connection is taken or put back.
    live: LiveConfig,
    /// The keep-alive timeout the app last announced, in milliseconds; `u64::MAX` if none.
    announced_ms: AtomicU64,
    /// The shortest idle time after which the app was seen closing a connection, in
    /// milliseconds; `u64::MAX` if never.
    learned_ms: AtomicU64,
    /// Origin of the [`IdleSince`] stamps.
    epoch: Instant,
    /// `tidegate_upstream_keepalive_seconds`.
    keepalive: Gauge,
    reaper_started: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
    stamp: IdleSince,
}

/// When a connection was put in the pool, in microseconds after the pool's epoch plus one;
/// 0 while it is lent out or once the pool let it go. Shared with the connection's task, which
/// reads it when the app closes the connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdleSince(Arc<AtomicU64>);

/// An HTTP/1.1 connection lent to one exchange. [`Lease::release`] puts it back once the
/// response has been read to its end; dropping it instead closes the connection (hyper closes
/// a connection whose sender is gone once it is idle, or at once if a message is half done).
#[derive(Debug)]
pub(crate) struct Lease {
    sender: SendRequest<RequestBody>,
    stamp: IdleSince,
    pool: Arc<Pool>,
}

// === impl Pool ===

impl Pool {
    /// An empty pool; `live` gives the idle timeout, `keepalive` shows the app's.
    pub(super) fn new(live: LiveConfig, keepalive: Gauge) -> Pool {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            live,
            announced_ms: AtomicU64::new(u64::MAX),
            learned_ms: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            keepalive,
            reaper_started: AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection that is ready for a request, if any, and how
    /// long it has been idle. Connections idle for the timeout or longer are closed first, so
    /// none is taken that the reaper has not yet come to. Closed connections met on the way
    /// are dropped; those whose connection task has not yet caught up with the end of their
    /// last exchange are moved to the bottom, for later.
    pub(super) fn checkout(&self) -> Option<(SendRequest<RequestBody>, IdleSince, Duration)> {
        let timeout = self.timeout();
        let now = Instant::now();
        let mut idle = self.lock();
        expire(&mut idle, now, timeout);
        for _ in 0..idle.len() {
            let entry = idle.pop_back()?;
            if entry.sender.is_ready() {
                entry.stamp.clear();
                let idle_for = now.saturating_duration_since(entry.since);
                return Some((entry.sender, entry.stamp, idle_for));
            }
            if !entry.sender.is_closed() {
                idle.push_front(entry);
            }
        }
        None
    }

    /// The app closed a connection that had been idle in the pool since `stamp`: its
    /// keep-alive timeout is at most that long.
    pub(super) fn app_closed(&self, stamp: &IdleSince) {
        let Some(since) = stamp.get(self.epoch) else {
            return;
        };
        let idle_for = Instant::now().saturating_duration_since(since);
        if idle_for < LEARN_FLOOR {
            return;
        }
        let ms = idle_for.as_millis() as u64;
        if self.learned_ms.fetch_min(ms, Ordering::Relaxed) > ms {
            self.show_keepalive();
            tracing::debug!(
                idle_ms = ms,
                "The app closed an idle connection; idle connections to it close earlier"
            );
        }
    }

    /// Puts `sender` back on the stack, and closes connections idle for too long.
    fn put(self: &Arc<Self>, sender: SendRequest<RequestBody>, stamp: IdleSince) {
        let timeout = self.timeout();
        if sender.is_closed() || timeout.is_zero() {
            return;
        }
        let now = Instant::now();
        stamp.set(self.epoch, now);
        {
            let mut idle = self.lock();
            idle.push_back(Idle {
                sender,
                since: now,
                stamp,
            });
            expire(&mut idle, now, timeout);
        }
        // Read first: once started, the flag is never written again on this per-request path.
        if !self.reaper_started.load(Ordering::Relaxed)
            && !self.reaper_started.swap(true, Ordering::Relaxed)
        {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Records the keep-alive timeout the app announces in a response's `Keep-Alive` field
    /// (`timeout=N`, in seconds), if it has one.
    fn heed_keep_alive(&self, headers: &HeaderMap) {
        // One pass over the names without hashing: most responses have no such field.
        let mut fields = headers.iter();
        let Some((_, field)) = fields.find(|(name, _)| *name == KEEP_ALIVE) else {
            return;
        };
        let Some(seconds) = announced_timeout(field) else {
            return;
        };
        let ms = seconds.saturating_mul(1000);
        if self.announced_ms.swap(ms, Ordering::Relaxed) != ms {
            self.show_keepalive();
            tracing::debug!(
                seconds,
                "The app announces a keep-alive timeout; idle connections to it close earlier"
            );
        }
    }

    /// How long a connection may stay idle: `--upstream-idle-timeout` as it is now (reloads
    /// apply), or three quarters of the app's keep-alive timeout, announced or learned, if
    /// shorter.
    pub(super) fn timeout(&self) -> Duration {
        let configured = self.live.peek().args.upstream_idle_timeout;
        let app = self
            .announced_ms
            .load(Ordering::Relaxed)
            .min(self.learned_ms.load(Ordering::Relaxed));
        match app {
            u64::MAX => configured,
            ms => configured.min(Duration::from_millis(ms / 4 * 3)),
        }
    }

    /// Exports the app's keep-alive timeout as known now.
    fn show_keepalive(&self) {
        let ms = self
            .announced_ms
            .load(Ordering::Relaxed)
            .min(self.learned_ms.load(Ordering::Relaxed));
        self.keepalive.set(if ms == u64::MAX {
            0.0
        } else {
            ms as f64 / 1000.0
        });
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Idle>> {
        // The stack is always consistent between statements: a panic elsewhere cannot have
        // left it half-updated, so a poisoned lock is still safe to use.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The `timeout=N` parameter of a `Keep-Alive` field, in seconds (RFC 2068's syntax:
/// comma-separated `name=value` pairs).
fn announced_timeout(field: &HeaderValue) -> Option<u64> {
    field.to_str().ok()?.split(',').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        value.trim().trim_matches('"').parse().ok()
    })
}

/// Drops connections idle for `timeout` or longer by `now`, oldest first.
fn expire(idle: &mut VecDeque<Idle>, now: Instant, timeout: Duration) {
    while idle
        .front()
        .is_some_and(|entry| now.saturating_duration_since(entry.since) >= timeout)
    {
        if let Some(entry) = idle.pop_front() {
            // Closed by tidegate, not by the app: nothing to learn from its end.
            entry.stamp.clear();
        }
    }
}

// === impl IdleSince ===

impl IdleSince {
    fn set(&self, epoch: Instant, now: Instant) {
        let micros = now.saturating_duration_since(epoch).as_micros() as u64;
        self.0.store(micros + 1, Ordering::Relaxed);
    }

    fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    fn get(&self, epoch: Instant) -> Option<Instant> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            stamp => Some(epoch + Duration::from_micros(stamp - 1)),
        }
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
    /// Lends `sender`, which belongs to `pool`, for the exchange whose response came with
    /// `headers`; the pool heeds the keep-alive timeout the app may announce in them.
    pub(super) fn new(
        sender: SendRequest<RequestBody>,
        stamp: IdleSince,
        pool: Arc<Pool>,
        headers: &HeaderMap,
    ) -> Lease {
        pool.heed_keep_alive(headers);
        Lease {
            sender,
            stamp,
            pool,
        }
    }

    /// The exchange is over: the connection goes back to the pool. Its task may not have
    /// caught up yet with the end of the message (the body's last bytes and hyper's switch to
    /// the next message happen in different tasks); then a small task puts it back once it
    /// is ready, or drops it if it closes instead (the app said `Connection: close`).
    pub(crate) fn release(self) {
        let Lease {
            mut sender,
            stamp,
            pool,
        } = self;
        if sender.is_ready() {
            pool.put(sender, stamp);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(sender, stamp);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announced_timeout_is_read_from_the_keep_alive_field() {
        let read = |text: &'static str| announced_timeout(&HeaderValue::from_static(text));
        assert_eq!(read("timeout=5"), Some(5));
        assert_eq!(read("timeout=5, max=1000"), Some(5));
        assert_eq!(read("max=100, Timeout = 2"), Some(2));
        assert_eq!(read("timeout=\"7\""), Some(7));
        assert_eq!(read("max=100"), None);
        assert_eq!(read("timeout=soon"), None);
        assert_eq!(read("timeout=-1"), None);
    }
}
