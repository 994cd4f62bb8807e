//! Fencing: ending an export waits until its connections can no longer reach the store.
//!
//! Detach must mean the old client is cut off by the time the API answers: another server
//! may be given the volume next, and a write of the old one landing after that is the
//! split brain a fence exists to prevent. A connection joins the fence of its export
//! before it checks (for the last time) that the export is offered; [`Fence::end`] tells
//! every connection that joined to stop taking requests, and returns once each has stopped
//! and the requests it had already taken in have finished with the store. Replies may
//! still be on their way to the client.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, watch};

#[derive(Default)]
pub struct Fence {
    exports: Mutex<HashMap<String, Export>>,
}

struct Export {
    /// Turns `true` when the export ends.
    ended: watch::Sender<bool>,
    /// Tickets alive.
    live: usize,
    /// Notified when `live` reaches zero (and the entry goes).
    idle: Arc<Notify>,
}

impl Fence {
    pub fn new() -> Arc<Fence> {
        Arc::new(Fence::default())
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, HashMap<String, Export>> {
        // Nothing in the map is left half-changed by a panic: every change is one statement.
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Join the fence of export `name`. Check that the export is offered *after* this: an
    /// [`end`](Self::end) that began earlier then shows in that check, and one that begins
    /// later in the ticket.
    pub fn join(self: &Arc<Fence>, name: &str) -> Ticket {
        let mut exports = self.exports();
        let e = exports.entry(name.to_owned()).or_insert_with(|| Export {
            ended: watch::Sender::new(false),
            live: 0,
            idle: Arc::new(Notify::new()),
        });
        e.live += 1;
        Ticket {
            fence: self.clone(),
            name: name.to_owned(),
            ended: e.ended.subscribe(),
        }
    }

    /// End export `name`: every connection that joined stops taking requests, from now on
    /// (so that a caller dropped before it waits loses nothing). [`Ending::wait`] returns
    /// once all of them have let go of their tickets.
    pub fn end(self: &Arc<Fence>, name: &str) -> Ending {
        let idle = self.exports().get(name).map(|e| {
            e.ended.send_replace(true);
            e.idle.clone()
        });
        Ending {
            fence: self.clone(),
            name: name.to_owned(),
            idle,
        }
    }

    /// Connections holding a ticket for `name` (for tests and metrics).
    pub fn live(&self, name: &str) -> usize {
        self.exports().get(name).map_or(0, |e| e.live)
    }
}

/// An export being ended; see [`Fence::end`].
pub struct Ending {
    fence: Arc<Fence>,
    name: String,
    /// The entry's, when connections had joined.
    idle: Option<Arc<Notify>>,
}

impl Ending {
    pub async fn wait(self) {
        let Some(idle) = self.idle else {
            return;
        };
        loop {
            let notified = idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release between the two is not missed.
            notified.as_mut().enable();
            let waiting = {
                let exports = self.fence.exports();
                exports.get(&self.name).is_some_and(|e| e.ended_with(&idle))
            };
            if !waiting {
                return;
            }
            notified.await;
        }
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Export {
    /// Still the entry `end` is waiting for (not one a later connection made afresh).
    fn ended_with(&self, idle: &Arc<Notify>) -> bool {
        Arc::ptr_eq(&self.idle, idle)
    }
}

/// A connection's place in its export's fence; dropping it tells [`Fence::end`] that the
/// connection no longer reaches the store.
pub struct Ticket {
    fence: Arc<Fence>,
    name: String,
    ended: watch::Receiver<bool>,
}

impl Ticket {
    /// Whether the export has ended.
    pub fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Resolves when the export ends.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.ended.clone();
        async move {
            if rx.wait_for(|e| *e).await.is_err() {
                // The entry went while we held a ticket: cannot happen; never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut exports = self.fence.exports();
        if let Some(e) = exports.get_mut(&self.name) {
            e.live -= 1;
            if e.live == 0 {
                let idle = e.idle.clone();
                exports.remove(&self.name);
                drop(exports);
                idle.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn end_waits_for_every_ticket_and_spares_later_ones() {
        let f = Fence::new();
        // Nobody joined: nothing to wait for.
        f.end("a").wait().await;
        let t1 = f.join("a");
        let t2 = f.join("a");
        let other = f.join("b");
        assert!(!t1.is_ended());
        let ending = tokio::spawn({
            let f = f.clone();
            let ending = f.end("a");
            async move { ending.wait().await }
        });
        t1.ended().await;
        assert!(t2.is_ended() && !other.is_ended());
        drop(t1);
        tokio::task::yield_now().await;
        assert!(!ending.is_finished(), "returned with a ticket still held");
        assert_eq!(f.live("a"), 1);
        drop(t2);
        ending.await.unwrap();
        assert_eq!(f.live("a"), 0);
        // A connection after the end starts afresh.
        let t3 = f.join("a");
        assert!(!t3.is_ended());
        assert!(!other.is_ended());
    }
}
