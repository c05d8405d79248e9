//! Polling a connection's rarely-ready futures only when they were woken.
//!
//! A connection task waits on hyper's connection and on a few side events: the drain, a
//! change of its idle or head deadline, and the deadline's timer. The task wakes several times
//! per request, almost always for hyper; a `select!` would poll every side future each time,
//! and each of those polls takes a lock inside tokio's `Notify`. [`Sideline`] gives the side
//! futures a waker of their own that records that one of them was woken, so they are polled
//! only after that (and once when created, which the caller tracks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The shared waker of a group of side futures. See the module docs.
#[derive(Debug)]
pub(super) struct Sideline {
    signal: Arc<Signal>,
    waker: Waker,
}

#[derive(Debug)]
struct Signal {
    /// Set when a side future was woken (or rearmed) and not yet polled since.
    woken: AtomicBool,
    /// The task to wake when a side future is.
    task: AtomicWaker,
}

impl Sideline {
    /// A group whose futures are polled on the first [`Sideline::due`].
    pub(super) fn new() -> Sideline {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(signal.clone());
        Sideline { signal, waker }
    }

    /// Whether the side futures must be polled now: one of them was woken (true on the first
    /// call). The flag is reset, and the task polling with `cx` will be woken when a side
    /// future is.
    pub(super) fn due(&self, cx: &Context<'_>) -> bool {
        // Registered before the flag is read: a wake-up in between still wakes the task.
        self.signal.task.register(cx.waker());
        self.signal.woken.swap(false, Ordering::AcqRel)
    }

    /// The context to poll the side futures with.
    pub(super) fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::{Pin, pin};

    use super::*;

    /// One look by the owning task: polls `fut` if due; whether it is ready.
    fn look<F: Future>(side: &Sideline, fut: Pin<&mut F>, polls: &mut u32) -> bool {
        if !side.due(&Context::from_waker(Waker::noop())) {
            return false;
        }
        *polls += 1;
        fut.poll(&mut side.context()).is_ready()
    }

    #[test]
    fn side_futures_are_polled_only_after_their_waker_fired() {
        let notify = tokio::sync::Notify::new();
        let side = Sideline::new();
        let mut notified = pin!(notify.notified());
        let mut polls = 0;
        // The first look polls it, which registers its waker with the Notify.
        assert!(!look(&side, notified.as_mut(), &mut polls));
        // Nothing woke it: the next looks skip it.
        assert!(!look(&side, notified.as_mut(), &mut polls));
        assert!(!look(&side, notified.as_mut(), &mut polls));
        assert_eq!(polls, 1);
        notify.notify_one();
        assert!(look(&side, notified.as_mut(), &mut polls));
        assert_eq!(polls, 2);
    }
}
