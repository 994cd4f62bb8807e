//! Fencing: ending an export waits until its connections can no longer reach the store.
//!
//! Detach must mean the old client is cut off by the time the API answers: another server
//! may be given the volume next, and a write of the old one landing after that is the
//! split brain a fence exists to prevent.
//!
//! - A connection [joins](Fence::join) its export's fence *before* it looks the export up,
//!   and [activates](Ticket::activate) its ticket when it starts serving requests. An end
//!   that committed before the lookup fails the lookup; one that comes after the join fails
//!   the activation or reaches the active ticket.
//! - [`Fence::end`] marks the export's entry ended and takes it out of the map, so that a
//!   connection made afterwards (the volume attached again) starts afresh. It waits only for
//!   active tickets: a connection still in its handshake cannot touch the store, and will
//!   fail to activate.
//! - An active ticket is held while the connection admits requests and by every task serving
//!   them, so [`Ending::wait`] returns once no request of an ended connection can reach the
//!   store. Replies may still be on their way to the client.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, watch};

#[derive(Default)]
pub struct Fence {
    exports: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One export's fence, from the first join until it ends (or nobody holds it).
struct Slot {
    /// Turns `true` when the export ends; changed under the fence's lock.
    ended: watch::Sender<bool>,
    /// Active tickets; changed under the fence's lock.
    active: AtomicUsize,
    /// Tickets of any kind (the entry leaves the map with the last); under the lock.
    joined: AtomicUsize,
    /// Notified when `active` drops to zero.
    idle: Notify,
}

/// Export names are volume UUIDs, which clients may spell in any case or form: one key.
fn key(name: &str) -> String {
    uuid::Uuid::parse_str(name).map_or_else(|_| name.to_owned(), |u| u.hyphenated().to_string())
}

impl Fence {
    pub fn new() -> Arc<Fence> {
        Arc::new(Fence::default())
    }

    fn exports(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        // Every change under this lock is one statement or a few plain stores: a panic
        // leaves nothing half-done that matters more than the panic itself.
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Join the fence of export `name`, before looking the export up.
    pub fn join(self: &Arc<Fence>, name: &str) -> Ticket {
        let mut exports = self.exports();
        let slot = exports
            .entry(key(name))
            .or_insert_with(|| {
                Arc::new(Slot {
                    ended: watch::Sender::new(false),
                    active: AtomicUsize::new(0),
                    joined: AtomicUsize::new(0),
                    idle: Notify::new(),
                })
            })
            .clone();
        slot.joined.fetch_add(1, Ordering::SeqCst);
        drop(exports);
        Ticket {
            fence: self.clone(),
            key: key(name),
            ended: slot.ended.subscribe(),
            slot,
            active: false,
        }
    }

    /// End export `name`, now: its connections stop taking requests (so that a caller
    /// dropped before it waits loses nothing), and later joins start afresh.
    /// [`Ending::wait`] returns once no request of theirs can reach the store.
    pub fn end(&self, name: &str) -> Ending {
        let mut exports = self.exports();
        let slot = exports.remove(&key(name));
        if let Some(s) = &slot {
            // Under the lock: `activate` checks this and counts itself in one step.
            s.ended.send_replace(true);
        }
        drop(exports);
        Ending {
            name: name.to_owned(),
            slot,
        }
    }
}

/// An export being ended; see [`Fence::end`].
pub struct Ending {
    name: String,
    /// The export's entry, if any connection had joined it.
    slot: Option<Arc<Slot>>,
}

impl Ending {
    pub async fn wait(&self) {
        let Some(slot) = &self.slot else {
            return;
        };
        loop {
            let notified = slot.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release between the two is not missed.
            notified.as_mut().enable();
            if slot.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections that may still reach the store.
    pub fn active(&self) -> usize {
        self.slot
            .as_ref()
            .map_or(0, |s| s.active.load(Ordering::SeqCst))
    }
}

/// A connection's place in its export's fence. Dropping it (or never activating it) tells
/// [`Fence::end`] that the connection does not reach the store.
pub struct Ticket {
    fence: Arc<Fence>,
    key: String,
    slot: Arc<Slot>,
    ended: watch::Receiver<bool>,
    active: bool,
}

impl Ticket {
    /// The connection starts serving requests: false if the export ended since the join.
    pub fn activate(&mut self) -> bool {
        let _g = self.fence.exports();
        if *self.slot.ended.borrow() {
            return false;
        }
        if !self.active {
            self.slot.active.fetch_add(1, Ordering::SeqCst);
            self.active = true;
        }
        true
    }

    /// Whether the export has ended.
    pub fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// A receiver that turns `true` when the export ends.
    pub fn watch_end(&self) -> watch::Receiver<bool> {
        self.ended.clone()
    }

    /// Resolves when the export ends.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.ended.clone();
        async move {
            if rx.wait_for(|e| *e).await.is_err() {
                // The slot is gone, so no ticket holds it: cannot happen; never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut exports = self.fence.exports();
        if self.active && self.slot.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.slot.idle.notify_waiters();
        }
        // The map's entry goes with its last ticket (counted under the lock; an ended entry
        // has left the map already, and a newer one under the same key is not ours).
        if self.slot.joined.fetch_sub(1, Ordering::SeqCst) == 1
            && exports
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            exports.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn end_waits_for_active_tickets_and_spares_later_ones() {
        let f = Fence::new();
        const A: &str = "6f0c6a2e-29a4-4f44-9a0c-3d1c2c1b0a01";
        // Nobody joined: nothing to wait for.
        f.end(A).wait().await;
        let mut t1 = f.join(A);
        // Another spelling of the same UUID is the same export.
        let mut t2 = f.join(&A.to_uppercase());
        let mut pending = f.join(A);
        let mut other = f.join("b");
        assert!(t1.activate() && t2.activate() && other.activate());
        let ending = f.end(A);
        assert!(t1.is_ended() && t2.is_ended() && !other.is_ended());
        // Joined before the end, not serving yet: it never will, and is not waited for.
        assert!(!pending.activate());
        let waiter = tokio::spawn(async move {
            ending.wait().await;
            ending.active()
        });
        t1.ended().await;
        drop(t1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "returned with an active ticket left");
        drop(t2);
        assert_eq!(waiter.await.unwrap(), 0);
        // Joined after the end (the volume attached again): a fresh start.
        let mut t3 = f.join(A);
        assert!(!t3.is_ended() && t3.activate());
        drop(pending);
        assert!(!t3.is_ended() && !other.is_ended());
        // Entries go with their last ticket.
        drop((t3, other));
        assert!(f.exports().is_empty());
    }

    /// Two tickets of one export dropped at once on two threads: the entry still goes.
    /// Found by review: the last-ticket check counted `Arc` references, and a ticket's own
    /// reference is released after its lock, so each saw the other's and neither removed it
    /// (clients choose the names they join, so the map grew without bound).
    #[test]
    fn concurrent_ticket_drops_leave_no_entry_behind() {
        let f = Fence::new();
        for i in 0..5_000 {
            let name = format!("no-such-export-{i}");
            let (t1, t2) = (f.join(&name), f.join(&name));
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let b = barrier.clone();
            let h = std::thread::spawn(move || {
                b.wait();
                drop(t1);
            });
            barrier.wait();
            drop(t2);
            h.join().unwrap();
            assert!(
                f.exports().is_empty(),
                "an entry with no ticket stayed, round {i}"
            );
        }
    }
}
