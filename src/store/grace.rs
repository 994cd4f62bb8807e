//! Grace periods for reads that take no lock.
//!
//! A read plans under the metadata mutex and then reads slots with nothing held, so a slot it
//! planned may be freed meanwhile (delete, trim, copy-up, shrink). Freed slots are only reused
//! after [`Readers::synchronize`], which waits for every read that could have planned before
//! the free. A lock written by every read would be a cache line both cores pull back and
//! forth on every operation (see docs/store-format.md, "I/O path"); here a read writes only
//! its thread's own counter.
//!
//! Readers count themselves in one of two parities, chosen by the epoch. `synchronize` flips
//! the epoch, so new reads count in the other parity, and waits for the old one to drain.
//! A reader re-reads the epoch after counting itself and starts over if it moved: a reader
//! that stays in the old parity therefore counted itself before the flip, and the drain
//! sees it.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

const SHARDS: usize = 16;

/// One shard per thread (round robin), on its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Shard([AtomicU64; 2]);

pub struct Readers {
    epoch: AtomicU64,
    shards: [Shard; SHARDS],
    /// A `synchronize` is waiting: a leaving reader must notify.
    waiting: AtomicBool,
    drained: Notify,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// A read in flight. Dropping it may end a grace period.
pub struct ReadGuard<'a> {
    readers: &'a Readers,
    shard: usize,
    parity: usize,
}

impl Readers {
    pub fn new() -> Readers {
        Readers {
            epoch: AtomicU64::new(0),
            shards: Default::default(),
            waiting: AtomicBool::new(false),
            drained: Notify::new(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Count a read in; hold the guard from before planning until the data is verified.
    pub fn enter(&self) -> ReadGuard<'_> {
        // The guard keeps its shard, so a task that moves threads still leaves where it
        // entered and every shard's count stays exact.
        let shard = super::thread_index() % SHARDS;
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let parity = (e & 1) as usize;
            self.shards[shard].0[parity].fetch_add(1, Ordering::SeqCst);
            let guard = ReadGuard {
                readers: self,
                shard,
                parity,
            };
            if self.epoch.load(Ordering::SeqCst) == e {
                return guard;
            }
            // The epoch flipped under us: leave (waking a waiter if need be) and retry.
            drop(guard);
        }
    }

    fn count(&self, parity: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[parity].load(Ordering::SeqCst))
            .sum()
    }

    /// Wait until every read that entered before this call has left. Reads that enter
    /// meanwhile are not waited for.
    pub async fn synchronize(&self) {
        let _one = self.one_at_a_time.lock().await;
        let old = (self.epoch.fetch_add(1, Ordering::SeqCst) & 1) as usize;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            // Paired with the SeqCst load in `drop`: either we see its decrement or it sees
            // `waiting` and notifies the future enabled above.
            self.waiting.store(true, Ordering::SeqCst);
            if self.count(old) == 0 {
                break;
            }
            drained.await;
        }
        self.waiting.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Readers {
    /// A `synchronize` is waiting for reads to leave.
    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.readers.shards[self.shard].0[self.parity].fetch_sub(1, Ordering::SeqCst);
        if self.readers.waiting.load(Ordering::SeqCst) {
            self.readers.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Waker};

    #[tokio::test]
    async fn synchronize_waits_for_earlier_reads_only() {
        let r = Readers::new();
        let early = r.enter();
        let mut sync = Box::pin(r.synchronize());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(sync.as_mut().poll(&mut cx).is_pending());
        // Entered after the flip: not waited for.
        let late = r.enter();
        assert!(sync.as_mut().poll(&mut cx).is_pending());
        drop(early);
        assert!(sync.as_mut().poll(&mut cx).is_ready());
        // The late read is in the new parity: the next grace period waits for it.
        let mut sync = Box::pin(r.synchronize());
        assert!(sync.as_mut().poll(&mut cx).is_pending());
        drop(late);
        sync.await;
        // Nothing in flight: immediate.
        r.synchronize().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_on_other_threads_end_the_grace_period() {
        let r = std::sync::Arc::new(Readers::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let r2 = r.clone();
        let reader = std::thread::spawn(move || {
            let g = r2.enter();
            entered_tx.send(()).unwrap();
            rx.blocking_recv().unwrap();
            drop(g);
        });
        entered_rx.await.unwrap();
        let sync = tokio::spawn({
            let r = r.clone();
            async move { r.synchronize().await }
        });
        tx.send(()).unwrap();
        sync.await.unwrap();
        reader.join().unwrap();
    }
}
