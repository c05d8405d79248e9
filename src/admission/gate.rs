//! A semaphore whose size can change while permits are held.
//!
//! Growing adds permits (after paying off any debt). Shrinking forgets the free permits it
//! can and records the rest as debt, paid off as held permits come back: a request that holds
//! a slot keeps it, and the new limit holds once enough of them have finished.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Stands for "no limit": the largest size a Tokio semaphore takes.
pub(super) const UNLIMITED: usize = Semaphore::MAX_PERMITS;

#[derive(Debug)]
pub(super) struct Gate {
    semaphore: Arc<Semaphore>,
    size: AtomicUsize,
    debt: AtomicUsize,
}

// === impl Gate ===

impl Gate {
    pub(super) fn new(size: usize) -> Gate {
        Gate {
            semaphore: Arc::new(Semaphore::new(size)),
            size: AtomicUsize::new(size),
            debt: AtomicUsize::new(0),
        }
    }

    pub(super) fn semaphore(&self) -> &Arc<Semaphore> {
        &self.semaphore
    }

    /// Changes the number of permits to `size`.
    pub(super) fn resize(&self, size: usize) {
        let old = self.size.swap(size, Ordering::AcqRel);
        if size > old {
            let mut grow = size - old;
            let paid = self.pay_debt(grow);
            grow -= paid;
            if grow > 0 {
                self.semaphore.add_permits(grow);
            }
        } else if size < old {
            let shrink = old - size;
            let forgotten = self.semaphore.forget_permits(shrink);
            self.debt.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
    }

    /// Returns a permit: forgotten while there is debt, released otherwise.
    pub(super) fn release(&self, permit: OwnedSemaphorePermit) {
        if self.pay_debt(1) == 1 {
            permit.forget();
        } else {
            drop(permit);
        }
    }

    /// Refuses every waiter and every future acquire.
    pub(super) fn close(&self) {
        self.semaphore.close();
    }

    fn pay_debt(&self, up_to: usize) -> usize {
        let mut paid = 0;
        let _ = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                paid = debt.min(up_to);
                Some(debt - paid)
            });
        paid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_below_held_permits_takes_effect_as_they_return() {
        let gate = Gate::new(3);
        let held: Vec<_> = (0..3)
            .map(|_| gate.semaphore().clone().try_acquire_owned().unwrap())
            .collect();
        gate.resize(1);
        for permit in held {
            gate.release(permit);
        }
        assert_eq!(gate.semaphore().available_permits(), 1);
    }

    #[test]
    fn growing_pays_debt_first() {
        let gate = Gate::new(2);
        let a = gate.semaphore().clone().try_acquire_owned().unwrap();
        let b = gate.semaphore().clone().try_acquire_owned().unwrap();
        gate.resize(0); // debt 2
        gate.resize(3); // pays the debt, adds 1
        assert_eq!(gate.semaphore().available_permits(), 1);
        gate.release(a);
        gate.release(b);
        assert_eq!(gate.semaphore().available_permits(), 3);
    }
}
