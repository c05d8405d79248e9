//! The admin lane's connection table. At most [`MAX_CONNECTIONS`] are open; when a new one
//! comes and the table is full, the oldest connection with no request in flight is closed to
//! make room. A flood of idle or slow connections from anyone who reaches the port can thus
//! never lock kubelet's probes out; connections answering a request are never closed for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Admin connections open at once at most.
pub(super) const MAX_CONNECTIONS: usize = 256;

/// The open connections, oldest first.
#[derive(Debug, Default)]
pub(super) struct Table {
    open: Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    in_flight: Arc<AtomicUsize>,
    evict: Arc<Notify>,
}

/// One connection's place in the table; dropping it frees the place.
#[derive(Debug)]
pub(super) struct Place {
    id: u64,
    table: Arc<Table>,
    /// Requests being answered on the connection.
    pub(super) in_flight: Arc<AtomicUsize>,
    /// Notified when the connection must close to make room.
    pub(super) evict: Arc<Notify>,
}

/// Counts a request in flight for as long as it lives.
pub(super) struct InFlight(Arc<AtomicUsize>);

// === impl Table ===

impl Table {
    /// A place for a new connection: a free one, or the place of the oldest connection with
    /// no request in flight, which is told to close. `None` when every open connection is
    /// answering a request.
    pub(super) fn admit(self: &Arc<Self>) -> Option<Place> {
        let mut open = self.lock();
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .position(|e| e.in_flight.load(Ordering::Acquire) == 0)?;
            if let Some(evicted) = open.remove(idle) {
                evicted.evict.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let place = Place {
            id,
            table: self.clone(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            evict: Arc::new(Notify::new()),
        };
        open.push_back(Entry {
            id,
            in_flight: place.in_flight.clone(),
            evict: place.evict.clone(),
        });
        Some(place)
    }

    /// Connections holding a place.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl Place ===

impl Place {
    /// Marks a request in flight until the returned guard drops.
    #[cfg(test)]
    fn request(&self) -> InFlight {
        InFlight::enter(&self.in_flight)
    }
}

// === impl InFlight ===

impl InFlight {
    /// Counts one more request in `counter` (a [`Place`]'s `in_flight`).
    pub(super) fn enter(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter.clone())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.table.lock().retain(|e| e.id != self.id);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_makes_room_by_closing_the_oldest_idle_connection() {
        let table = Arc::new(Table::default());
        let mut places: Vec<Place> = (0..MAX_CONNECTIONS)
            .map(|_| table.admit().unwrap())
            .collect();
        // The oldest is busy: the second oldest makes room.
        let busy = places[0].request();
        let newcomer = table.admit().unwrap();
        assert_eq!(table.len(), MAX_CONNECTIONS);
        let evicted = places.remove(1);
        assert!(
            futures_util::FutureExt::now_or_never(evicted.evict.notified()).is_some(),
            "the second oldest was told to close"
        );
        // Its place was taken already: its end frees nothing more.
        drop(evicted);
        assert_eq!(table.len(), MAX_CONNECTIONS);
        // Every connection busy: no room.
        drop(newcomer);
        assert_eq!(table.len(), MAX_CONNECTIONS - 1);
        let all_busy: Vec<InFlight> = places.iter().map(Place::request).collect();
        let filler = table.admit().unwrap();
        let _busy_filler = filler.request();
        assert!(table.admit().is_none());
        drop(all_busy);
        drop(busy);
        assert!(table.admit().is_some());
    }
}
