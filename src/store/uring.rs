//! The io_uring engine: one ring per CPU shared by every caller, batched submission across
//! tasks, and one reaper thread for completions that arrive after their submitter left the
//! kernel (see [`Uring`]).
//!
//! Buffers: every operation carries a [`Keep`] that owns the memory its pointer refers to.
//! Its completion slot holds it until the kernel has completed the operation, and drops it
//! *before* reporting completion, so a caller that gets its result can reclaim a shared
//! buffer with `Arc::try_unwrap`. A caller that goes away early (a dropped future) cannot free
//! memory the kernel is still writing to.
use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::buf::AlignedBuf;

/// A buffer that several in-flight reads fill in disjoint ranges.
pub struct SharedBuf(UnsafeCell<AlignedBuf>);

// SAFETY: the kernel writes disjoint ranges per operation, and the owner reads it only after
// every operation has completed (enforced by `into_inner` needing the last reference).
unsafe impl Sync for SharedBuf {}
// SAFETY: AlignedBuf is Send.
unsafe impl Send for SharedBuf {}

impl SharedBuf {
    pub fn new(buf: AlignedBuf) -> Arc<SharedBuf> {
        Arc::new(SharedBuf(UnsafeCell::new(buf)))
    }
    fn ptr(&self) -> *mut u8 {
        // SAFETY: only the raw pointer is taken; no reference to the contents is formed.
        unsafe { (*self.0.get()).as_mut_ptr() }
    }
    fn len(&self) -> usize {
        // SAFETY: the length is never written after construction.
        unsafe { (*self.0.get()).len() }
    }
    /// The buffer back, once no operation refers to it.
    pub fn into_inner(this: Arc<SharedBuf>) -> Option<AlignedBuf> {
        Arc::try_unwrap(this).ok().map(|s| s.0.into_inner())
    }
}

/// What keeps an operation's memory alive (held, never read).
#[derive(Clone)]
#[allow(dead_code)]
pub enum Keep {
    None,
    Bytes(Bytes),
    Shared(Arc<SharedBuf>),
    Aligned(Arc<AlignedBuf>),
}

#[derive(Clone)]
pub enum Op {
    /// Read `len` bytes at `off` into `buf[buf_off..]`.
    Read {
        fd: RawFd,
        off: u64,
        buf: Arc<SharedBuf>,
        buf_off: usize,
        len: u32,
    },
    /// Write `data` at `off`.
    Write {
        fd: RawFd,
        off: u64,
        data: WriteSrc,
    },
    Fsync {
        fd: RawFd,
        datasync: bool,
    },
    /// Start writeback of the file's dirty pages (`sync_file_range(SYNC_FILE_RANGE_WRITE)`
    /// over all of it), waiting for none of it.
    StartWriteback {
        fd: RawFd,
    },
    Fallocate {
        fd: RawFd,
        mode: i32,
        off: u64,
        len: u64,
    },
}

#[derive(Clone)]
pub enum WriteSrc {
    Bytes(Bytes),
    Aligned {
        buf: Arc<AlignedBuf>,
        start: usize,
        len: usize,
    },
}

impl WriteSrc {
    fn parts(&self) -> (*const u8, usize, Keep) {
        match self {
            WriteSrc::Bytes(b) => (b.as_ptr(), b.len(), Keep::Bytes(b.clone())),
            WriteSrc::Aligned { buf, start, len } => {
                // Bounds were checked when the op was built.
                (
                    buf[*start..*start + *len].as_ptr(),
                    *len,
                    Keep::Aligned(buf.clone()),
                )
            }
        }
    }
    fn len(&self) -> usize {
        match self {
            WriteSrc::Bytes(b) => b.len(),
            WriteSrc::Aligned { len, .. } => *len,
        }
    }
    fn advance(&self, n: usize) -> WriteSrc {
        match self {
            WriteSrc::Bytes(b) => WriteSrc::Bytes(b.slice(n..)),
            WriteSrc::Aligned { buf, start, len } => WriteSrc::Aligned {
                buf: buf.clone(),
                start: start + n,
                len: len - n,
            },
        }
    }
}

/// Submission queue entries per ring; a batch larger than this goes in several pieces.
const SQ_ENTRIES: u32 = 128;

/// One ring of the set. Callers on any thread push under `sq`; the first of a burst becomes
/// its leader and, after letting the other runnable tasks push theirs, submits them all in one
/// `io_uring_enter`, so the kernel performs whatever it can complete at once (page-cache hits)
/// on that caller's core. Completions are reaped under `table`.
struct Ring {
    uring: IoUring,
    /// Held while pushing entries and while submitting them.
    sq: Mutex<SqState>,
    table: Mutex<Table>,
    /// One permit per completion slot: bounds the ops in flight to the CQ's size, so the CQ
    /// can never overflow. Returned when the completion is reaped.
    permits: Semaphore,
    /// A submit failed in a way that leaves entries in the SQ: nothing more goes in.
    broken: AtomicBool,
}

/// Entries pushed but not yet submitted.
struct SqState {
    /// Their slots, in push order.
    pending: Vec<u32>,
    /// Some caller has taken on submitting `pending`.
    leader: bool,
}

/// Completion slots, indexed by `user_data`.
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    inflight: usize,
}

#[derive(Default)]
struct Slot {
    /// What the operation's memory belongs to: held until its completion is reaped.
    keep: Option<Keep>,
    batch: Option<Arc<Batch>>,
    index: usize,
    /// Its submitter returned without the completion; the reaper thread must be awake.
    handed_off: bool,
}

/// A vector that keeps up to `N` items inline (most batches are one or two operations).
#[derive(Clone)]
enum Small<T: Copy + Default, const N: usize> {
    Inline([T; N], usize),
    Heap(Vec<T>),
}

impl<T: Copy + Default, const N: usize> Small<T, N> {
    fn new() -> Self {
        Small::Inline([T::default(); N], 0)
    }
    fn filled(v: T, n: usize) -> Self {
        if n <= N {
            let mut a = [T::default(); N];
            a[..n].fill(v);
            Small::Inline(a, n)
        } else {
            Small::Heap(vec![v; n])
        }
    }
}

impl<T: Copy + Default, const N: usize> std::ops::Deref for Small<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Small::Inline(a, n) => &a[..*n],
            Small::Heap(h) => h,
        }
    }
}

impl<T: Copy + Default, const N: usize> std::ops::DerefMut for Small<T, N> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Small::Inline(a, n) => &mut a[..*n],
            Small::Heap(h) => h,
        }
    }
}

/// Per operation: its result (`res` of the CQE), once known.
type Results = Small<Option<i32>, 4>;

/// Results of one `submit_wait` call.
struct Batch {
    state: Mutex<BatchState>,
}

struct BatchState {
    results: Results,
    remaining: usize,
    waker: Option<Waker>,
}

impl Batch {
    fn new(n: usize) -> Arc<Batch> {
        Arc::new(Batch {
            state: Mutex::new(BatchState {
                results: Small::filled(None, n),
                remaining: n,
                waker: None,
            }),
        })
    }

    fn complete(&self, index: usize, res: i32) -> Option<Waker> {
        let mut s = self.state.lock();
        if s.results[index].replace(res).is_none() {
            s.remaining -= 1;
        }
        if s.remaining == 0 {
            s.waker.take()
        } else {
            None
        }
    }

    fn fail_unsubmitted(&self, indices: impl Iterator<Item = usize>, errno: i32) {
        let mut s = self.state.lock();
        for i in indices {
            if s.results[i].replace(-errno).is_none() {
                s.remaining -= 1;
            }
        }
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Results> {
        let mut s = self.state.lock();
        if s.remaining > 0 {
            if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        Poll::Ready(std::mem::replace(&mut s.results, Small::new()))
    }
}

/// What to do after an operation's completion.
enum Outcome {
    Done(io::Result<()>),
    /// A short transfer: the rest, to submit again.
    Again(Op),
}

fn outcome(res: Option<i32>, op: &Op) -> Outcome {
    let n = match res {
        None => return Outcome::Done(Err(io::Error::other("lost completion"))),
        Some(r) if r < 0 => return Outcome::Done(Err(io::Error::from_raw_os_error(-r))),
        Some(r) => r as u32,
    };
    match op {
        Op::Read {
            fd,
            off,
            buf,
            buf_off,
            len,
        } if n < *len => {
            if n == 0 {
                return Outcome::Done(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short read",
                )));
            }
            Outcome::Again(Op::Read {
                fd: *fd,
                off: off + n as u64,
                buf: buf.clone(),
                buf_off: buf_off + n as usize,
                len: len - n,
            })
        }
        Op::Write { fd, off, data } if (n as usize) < data.len() => {
            if n == 0 {
                return Outcome::Done(Err(io::Error::new(io::ErrorKind::WriteZero, "short write")));
            }
            Outcome::Again(Op::Write {
                fd: *fd,
                off: off + n as u64,
                data: data.advance(n as usize),
            })
        }
        _ => Outcome::Done(Ok(())),
    }
}

impl Ring {
    fn new(sq_entries: u32, cq_entries: u32, efd: RawFd) -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_submit_all()
            .build(sq_entries)?;
        // Every completion bumps the eventfd; the reaper thread reads it only while some
        // submitter has handed off an operation, so inline completions cost no wakeup.
        uring.submitter().register_eventfd(efd)?;
        let cq = uring.params().cq_entries() as usize;
        Ok(Ring {
            uring,
            sq: Mutex::new(SqState {
                pending: Vec::with_capacity(sq_entries as usize),
                leader: false,
            }),
            table: Mutex::new(Table {
                slots: (0..cq).map(|_| Slot::default()).collect(),
                free: (0..cq as u32).rev().collect(),
                inflight: 0,
            }),
            permits: Semaphore::new(cq),
            broken: AtomicBool::new(false),
        })
    }

    /// Consume every posted completion. Each operation's `Keep` is dropped before its result
    /// is published, so a caller that sees its result may reclaim the buffer. Handed-off
    /// operations that completed are taken off `handed_off` (under the table lock, like the
    /// hand-off itself, so the count never goes below zero).
    fn reap(&self, t: &mut Table, handed_off: &AtomicUsize, wakers: &mut Vec<Waker>) {
        let mut handed = 0;
        let mut n = 0;
        // SAFETY: the table lock is held, so this is the only completion queue view.
        let cq = unsafe { self.uring.completion_shared() };
        for cqe in cq {
            let ud = cqe.user_data() as usize;
            let Some(slot) = t.slots.get_mut(ud) else {
                tracing::error!(user_data = ud, "io_uring completion for an unknown slot");
                continue;
            };
            drop(slot.keep.take());
            let Some(batch) = slot.batch.take() else {
                tracing::error!(user_data = ud, "io_uring completion for a free slot");
                continue;
            };
            if std::mem::take(&mut slot.handed_off) {
                handed += 1;
            }
            t.free.push(ud as u32);
            t.inflight -= 1;
            n += 1;
            if let Some(w) = batch.complete(slot.index, cqe.result()) {
                wakers.push(w);
            }
        }
        if handed > 0 {
            handed_off.fetch_sub(handed, Ordering::SeqCst);
        }
        if n > 0 {
            self.permits.add_permits(n);
        }
    }
}

struct Shared {
    rings: Box<[Ring]>,
    fixed: FixedFiles,
    /// Registered with every ring: counts posted completions (non-blocking).
    efd: OwnedFd,
    /// Operations in flight whose submitter did not see them complete.
    handed_off: AtomicUsize,
    /// The reaper may be idle: a submitter that hands off must look at `idle`.
    idle_hint: AtomicBool,
    /// The reaper sleeps with the rings' eventfd notifications off (so completions reaped
    /// inline wake nobody), and must be woken by hand for a hand-off.
    idle: Mutex<bool>,
    closing: AtomicBool,
}

impl Shared {
    /// `n` rings of `entries` completions each, sharing one eventfd; no reaper yet.
    fn new(entries: u32, n: usize) -> io::Result<Arc<Shared>> {
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let cq = entries.max(SQ_ENTRIES * 2).next_power_of_two();
        let rings = (0..n)
            .map(|_| Ring::new(SQ_ENTRIES, cq, efd.as_raw_fd()))
            .collect::<io::Result<Vec<_>>>()?
            .into_boxed_slice();
        Ok(Arc::new(Shared {
            fixed: FixedFiles::new(&rings),
            rings,
            efd,
            handed_off: AtomicUsize::new(0),
            idle_hint: AtomicBool::new(false),
            idle: Mutex::new(false),
            closing: AtomicBool::new(false),
        }))
    }

    fn set_eventfd(&self, on: bool) {
        for r in self.rings.iter() {
            let _t = r.table.lock();
            // SAFETY: the table lock is held, so this is the only completion queue view; only
            // the flags word is touched.
            let cq = unsafe { r.uring.completion_shared() };
            if on {
                cq.enable_eventfd();
            } else {
                cq.disable_eventfd();
            }
        }
    }

    /// Make the eventfd readable, so the reaper looks at the rings.
    fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// After `handed_off` went up: wake the reaper if it is idle.
    fn handed_off_some(&self) {
        if self.idle_hint.load(Ordering::SeqCst) {
            let mut idle = self.idle.lock();
            if std::mem::take(&mut *idle) {
                self.idle_hint.store(false, Ordering::SeqCst);
                self.set_eventfd(true);
                self.kick();
            }
        }
    }

    /// Empty the eventfd's count (it is non-blocking).
    fn drain_eventfd(&self) -> io::Result<()> {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from our eventfd.
        let r = unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reap every ring and wake their callers; then decide whether to stop, or to wait for
    /// the eventfd (with notifications off when nothing is handed off).
    fn reap_round(&self, wakers: &mut Vec<Waker>) -> Reaped {
        // Running means awake, whatever the last round left: a nap can also end on a count
        // the eventfd took before notifications went off. Without this, a round that then
        // finds work handed off after its first look dropped the hint but stayed "idle" with
        // notifications off, so the submitter (seeing no hint) did not kick, its completion
        // signalled nothing, and the reaper slept for good (a store test hung in CI). On
        // again before the rings are reaped: what completes after the reap is signalled.
        {
            let mut idle = self.idle.lock();
            if std::mem::take(&mut *idle) {
                self.idle_hint.store(false, Ordering::SeqCst);
                self.set_eventfd(true);
            }
        }
        let mut inflight = 0;
        for r in self.rings.iter() {
            let mut t = r.table.lock();
            r.reap(&mut t, &self.handed_off, wakers);
            inflight += t.inflight;
        }
        wakers.drain(..).for_each(Waker::wake);
        let closing = self.closing.load(Ordering::SeqCst);
        if closing && inflight == 0 {
            return Reaped::Done;
        }
        if !closing && self.handed_off.load(Ordering::SeqCst) == 0 {
            // Announce the nap, then look again (Dekker with `handed_off_some`): a submitter
            // that hands off after our look sees the hint and wakes us by hand.
            let mut idle = self.idle.lock();
            self.idle_hint.store(true, Ordering::SeqCst);
            if self.handed_off.load(Ordering::SeqCst) == 0 && !self.closing.load(Ordering::SeqCst) {
                *idle = true;
                self.set_eventfd(false);
            } else {
                self.idle_hint.store(false, Ordering::SeqCst);
            }
        }
        Reaped::Wait
    }
}

enum Reaped {
    Wait,
    Done,
}

/// The io_uring engine: a few rings (one per CPU) shared by every caller, plus one reaper
/// for completions that do not arrive while their submitter is in the kernel.
///
/// A caller pushes its entries into the ring of the CPU it runs on and enters the kernel
/// itself. Buffered reads that hit the page cache complete during that call, on the
/// caller's core, and the caller reaps them at once: no thread handoff and no wakeup. What
/// the kernel finishes later (cache misses, O_DIRECT, fsync, fallocate, buffered writes the
/// filesystem cannot do without blocking) is reaped by the reaper, which waits on the rings'
/// eventfd only while such operations exist. The reaper is a task on the tokio runtime the
/// engine was made on, so a completion wakes a worker waiting in epoll directly instead of
/// waking a thread that wakes a worker; without a runtime (or once it has shut down) it is
/// the `cairn-uring` thread.
pub struct Uring {
    shared: Arc<Shared>,
}

impl Uring {
    /// `entries`: in-flight operations per ring at most (the completion queue size).
    pub fn new(entries: u32) -> io::Result<Uring> {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 16));
        Self::with_rings(entries, n)
    }

    fn with_rings(entries: u32, n: usize) -> io::Result<Uring> {
        let shared = Shared::new(entries, n)?;
        match tokio::runtime::Handle::try_current().ok().and_then(|rt| {
            let _enter = rt.enter();
            // Registration panics on a runtime built without its I/O driver: then use the
            // thread.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: the descriptor is the eventfd `Shared` owns, and `EfdOf` holds that
                // `Shared` for as long as the AsyncFd lives.
                unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        EfdOf(shared.clone()),
                        tokio::io::Interest::READABLE,
                    )
                }
            }))
            .ok()
            .and_then(Result::ok)
            .map(|afd| (rt, afd))
        }) {
            Some((rt, afd)) => {
                let guard = ReaperTask {
                    shared: Some(shared.clone()),
                };
                rt.spawn(reaper_task(guard, afd));
            }
            None => spawn_reaper_thread(shared.clone())?,
        }
        Ok(Uring { shared })
    }

    /// Register `fd` with every ring for the life of this engine (see [`FixedFiles`]);
    /// operations on it then use the registered file. Past the table's room this does
    /// nothing and operations keep using the descriptor.
    pub fn register_file(&self, fd: RawFd) -> io::Result<()> {
        let f = &self.shared.fixed;
        let Some(slot) = usize::try_from(fd).ok().and_then(|i| f.by_fd.get(i)) else {
            return Ok(());
        };
        let mut next = f.next.lock();
        if !f.on || *next >= FIXED_FILES || slot.load(Ordering::Acquire) != 0 {
            return Ok(());
        }
        for r in self.shared.rings.iter() {
            r.uring.submitter().register_files_update(*next, &[fd])?;
        }
        slot.store(*next + 1, Ordering::Release);
        *next += 1;
        Ok(())
    }

    fn ring(&self) -> &Ring {
        // SAFETY: plain syscall (vDSO).
        let cpu = unsafe { libc::sched_getcpu() };
        let rings = &self.shared.rings;
        &rings[cpu.max(0) as usize % rings.len()]
    }

    /// Submit a batch and wait for all of it. Short transfers are reported as such (use
    /// [`Uring::run`] to complete them).
    ///
    /// Submission is batched across tasks: the first caller to push into an idle ring leads,
    /// yields once so the other runnable tasks of its thread push their operations too, and
    /// then submits everything pending in one `io_uring_enter`. Under load that is one system
    /// call (and, for work the kernel hands to io-wq, one worker wakeup) for many operations;
    /// alone, it costs one extra trip through the scheduler.
    async fn submit_wait(&self, ops: &[Op]) -> Results {
        let batch = Batch::new(ops.len());
        let mut pos = 0;
        while pos < ops.len() {
            let ring = self.ring();
            let n = (ops.len() - pos).min(SQ_ENTRIES as usize);
            match ring.permits.try_acquire_many(n as u32) {
                Ok(p) => p.forget(),
                Err(_) => match ring.permits.acquire_many(n as u32).await {
                    Ok(p) => p.forget(),
                    Err(_) => unreachable!("the semaphore is never closed"),
                },
            }
            if self.push(ring, &batch, &ops[pos..pos + n], pos) {
                let lead = Lead {
                    uring: self,
                    ring,
                    done: false,
                };
                tokio::task::yield_now().await;
                lead.finish();
            }
            pos += n;
        }
        std::future::poll_fn(|cx| batch.poll(cx)).await
    }

    /// Push `ops` (results at `first..` in `batch`) into the ring's SQ. The caller holds a
    /// permit per op. Returns whether the caller is now the leader and must call
    /// [`Uring::flush`] (its [`Lead`] guard does so even if the caller's future is dropped,
    /// so pushed entries are never stranded).
    fn push(&self, ring: &Ring, batch: &Arc<Batch>, ops: &[Op], first: usize) -> bool {
        let n = ops.len();
        let mut sq = ring.sq.lock();
        if sq.pending.len() + n > SQ_ENTRIES as usize {
            self.flush_locked(ring, &mut sq);
        }
        if ring.broken.load(Ordering::Acquire) {
            drop(sq);
            ring.permits.add_permits(n);
            batch.fail_unsubmitted(first..first + n, libc::EIO);
            return false;
        }
        {
            let mut t = ring.table.lock();
            // SAFETY: the sq lock is held, so this is the only submission queue view, and it
            // has room for `n` more (flushed above otherwise).
            let mut q = unsafe { ring.uring.submission_shared() };
            for (k, op) in ops.iter().enumerate() {
                let (entry, keep) = build(op, &self.shared.fixed);
                let ud = t.free.pop().expect("a permit guarantees a free slot");
                let slot = &mut t.slots[ud as usize];
                slot.keep = Some(keep);
                slot.batch = Some(batch.clone());
                slot.index = first + k;
                slot.handed_off = false;
                t.inflight += 1;
                sq.pending.push(ud);
                // SAFETY: the memory `entry` points at is owned by the slot's `Keep`, held
                // until the completion for `ud` is reaped.
                unsafe { q.push(&entry.user_data(ud as u64)) }.expect("the SQ has room");
            }
        }
        !std::mem::replace(&mut sq.leader, true)
    }

    /// Submit whatever is pending in `ring`, then reap.
    fn flush(&self, ring: &Ring) {
        let mut sq = ring.sq.lock();
        self.flush_locked(ring, &mut sq);
    }

    /// Submit everything pending (with the sq lock held), reap what completed, and hand the
    /// rest to the reaper thread.
    fn flush_locked(&self, ring: &Ring, sq: &mut SqState) {
        sq.leader = false;
        if sq.pending.is_empty() {
            return;
        }
        let mut left = sq.pending.len() as u32;
        let mut err = None;
        while left > 0 {
            // SAFETY: submits entries we pushed; no wait, no argument.
            match unsafe {
                ring.uring
                    .submitter()
                    .enter::<libc::sigset_t>(left, 0, 0, None)
            } {
                Ok(k) if k > 0 => left -= (k as u32).min(left),
                Ok(_) => std::thread::yield_now(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    // Kernel resources are short; let completions drain and retry.
                    let mut w = Vec::new();
                    ring.reap(&mut ring.table.lock(), &self.shared.handed_off, &mut w);
                    w.into_iter().for_each(Waker::wake);
                    std::thread::yield_now();
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let s = &self.shared;
        // Sized once: growing it by doubling cost a few reallocations per submission.
        let mut wakers = Vec::with_capacity(sq.pending.len());
        let mut failed = Vec::new();
        let mut t = ring.table.lock();
        ring.reap(&mut t, &s.handed_off, &mut wakers);
        let mut handed = 0;
        // The sq lock is still held, so no slot of `pending` has been reused yet: one that
        // still has a batch is the same operation, in flight.
        for ud in sq.pending.drain(..) {
            let slot = &mut t.slots[ud as usize];
            if let Some(b) = &slot.batch {
                if err.is_some() {
                    // Entries may stay in the SQ with their slots: they keep their buffers
                    // (and permits) forever, and the ring takes nothing more.
                    failed.push((b.clone(), slot.index));
                } else {
                    slot.handed_off = true;
                    handed += 1;
                }
            }
        }
        if handed > 0 {
            s.handed_off.fetch_add(handed, Ordering::SeqCst);
        }
        drop(t);
        if let Some(e) = err {
            ring.broken.store(true, Ordering::Release);
            tracing::error!(error = %e, "io_uring submit failed; the ring is out of service");
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            for (b, i) in failed {
                b.fail_unsubmitted(std::iter::once(i), errno);
                if let Some(w) = b.state.lock().waker.take() {
                    wakers.push(w);
                }
            }
        }
        if handed > 0 {
            s.handed_off_some();
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Run a batch to completion, resubmitting the rest of short reads and writes.
    pub async fn run(&self, ops: Vec<Op>) -> Vec<io::Result<()>> {
        let mut out: Vec<io::Result<()>> = Vec::with_capacity(ops.len());
        let res = self.submit_wait(&ops).await;
        let mut again: Vec<(usize, Op)> = Vec::new();
        for (i, (op, r)) in ops.iter().zip(res.iter()).enumerate() {
            match outcome(*r, op) {
                Outcome::Done(r) => out.push(r),
                Outcome::Again(rest) => {
                    out.push(Ok(()));
                    again.push((i, rest));
                }
            }
        }
        while !again.is_empty() {
            let ops: Vec<Op> = again.iter().map(|(_, op)| op.clone()).collect();
            let res = self.submit_wait(&ops).await;
            let mut next = Vec::new();
            for ((i, op), r) in again.into_iter().zip(res.iter()) {
                match outcome(*r, &op) {
                    Outcome::Done(r) => out[i] = r,
                    Outcome::Again(rest) => next.push((i, rest)),
                }
            }
            again = next;
        }
        out
    }

    /// Run a batch and fail with the first error.
    pub async fn run_all(&self, ops: &[Op]) -> io::Result<()> {
        let res = self.submit_wait(ops).await;
        let mut again = Vec::new();
        let mut first_err = None;
        for (op, r) in ops.iter().zip(res.iter()) {
            match outcome(*r, op) {
                Outcome::Done(Ok(())) => {}
                Outcome::Done(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Outcome::Again(rest) => again.push(rest),
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if !again.is_empty() {
            for r in self.run(again).await {
                r?;
            }
        }
        Ok(())
    }
}

/// The duty to submit a ring's pending entries, discharged on `finish` or on drop.
struct Lead<'a> {
    uring: &'a Uring,
    ring: &'a Ring,
    done: bool,
}

impl Lead<'_> {
    fn finish(mut self) {
        self.done = true;
        self.uring.flush(self.ring);
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.uring.flush(self.ring);
        }
    }
}

impl Drop for Uring {
    /// Waits until every operation still in flight (of dropped futures) has completed, so
    /// nothing the engine guards outlives it unseen; the reaper then stops.
    fn drop(&mut self) {
        let s = &self.shared;
        s.closing.store(true, Ordering::SeqCst);
        *s.idle.lock() = false;
        s.idle_hint.store(false, Ordering::SeqCst);
        s.set_eventfd(true);
        s.kick();
        if s.rings.iter().any(|r| r.broken.load(Ordering::Acquire)) {
            // Stuck entries may still be submitted one day: leave the reaper (and the memory
            // it guards) alone rather than wait forever.
            return;
        }
        let mut wakers = Vec::new();
        for r in s.rings.iter() {
            loop {
                let inflight = {
                    let mut t = r.table.lock();
                    r.reap(&mut t, &s.handed_off, &mut wakers);
                    t.inflight
                };
                wakers.drain(..).for_each(Waker::wake);
                if inflight == 0 {
                    break;
                }
                // Waits for a completion, for 1 ms at most: the reaper may reap the last one
                // between our look and the wait, and an unbounded wait would never end.
                let ts = io_uring::types::Timespec::new().nsec(1_000_000);
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                let _ = r.uring.submitter().submit_with_args(1, &args);
            }
            // Let go of the registered files now. A closed ring drops them later, in a
            // kernel work item of its own, and until then their filesystem cannot be
            // unmounted (EBUSY) although the store is closed.
            let _ = r.uring.submitter().unregister_files();
        }
        // Whatever the reaper is doing, it now finds nothing in flight and stops.
        s.kick();
    }
}

/// The reaper task's hold on the engine: if the runtime drops the task before it finished
/// (shutdown), the `cairn-uring` thread takes over.
struct ReaperTask {
    shared: Option<Arc<Shared>>,
}

impl Drop for ReaperTask {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take()
            && let Err(e) = spawn_reaper_thread(s)
        {
            tracing::error!(error = %e, "cannot start the io_uring reaper thread");
        }
    }
}

/// The eventfd of a `Shared`, kept open by holding it.
struct EfdOf(Arc<Shared>);

impl AsRawFd for EfdOf {
    fn as_raw_fd(&self) -> RawFd {
        self.0.efd.as_raw_fd()
    }
}

async fn reaper_task(mut guard: ReaperTask, afd: tokio::io::unix::AsyncFd<EfdOf>) {
    let Some(s) = guard.shared.clone() else {
        return;
    };
    let mut wakers = Vec::new();
    loop {
        match s.reap_round(&mut wakers) {
            Reaped::Done => break,
            Reaped::Wait => {}
        }
        match afd.readable().await {
            Ok(mut ready) => {
                // Readiness is cleared only by a read that finds the count empty, so a
                // completion posted after the drain is never missed.
                loop {
                    match ready.try_io(|_| s.drain_eventfd()) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            // Not expected for an eventfd we own; reap anyway and retry.
                            tracing::error!(error = %e, "io_uring eventfd read failed");
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
            Err(e) => {
                // The runtime's driver is going away: the thread takes over (guard drop).
                tracing::debug!(error = %e, "io_uring reaper task: eventfd readiness failed");
                return;
            }
        }
    }
    guard.shared = None;
}

fn spawn_reaper_thread(s: Arc<Shared>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("cairn-uring".into())
        .spawn(move || reaper_thread(s))
        .map(drop)
}

/// The reaper as a thread: collects completions nobody was in the kernel for, and stops once
/// closing with nothing in flight.
fn reaper_thread(s: Arc<Shared>) {
    let mut wakers = Vec::new();
    loop {
        match s.reap_round(&mut wakers) {
            Reaped::Done => break,
            Reaped::Wait => {}
        }
        let mut p = libc::pollfd {
            fd: s.efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(error = %e, "io_uring eventfd poll failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        let _ = s.drain_eventfd();
    }
}

/// Registered ("fixed") files per ring.
const FIXED_FILES: u32 = 1024;
/// Descriptors below this can be registered: the lookup is an array indexed by descriptor.
const FIXED_FD_LIMIT: usize = 1 << 14;

/// Files registered with every ring, so that an operation on them costs the kernel no file
/// reference: taking and dropping one is an atomic on the `struct file` shared by every
/// core reading that file. Registration is for the life of the engine: a registered
/// descriptor must stay open until the engine is dropped (else its number could come back
/// for another file).
struct FixedFiles {
    /// By descriptor: 0 when not registered, else the registered index + 1.
    by_fd: Box<[AtomicU32]>,
    next: Mutex<u32>,
    /// The rings took a sparse file table.
    on: bool,
}

impl FixedFiles {
    fn new(rings: &[Ring]) -> FixedFiles {
        let on = rings.iter().all(|r| {
            r.uring
                .submitter()
                .register_files_sparse(FIXED_FILES)
                .is_ok()
        });
        FixedFiles {
            by_fd: (0..FIXED_FD_LIMIT).map(|_| AtomicU32::new(0)).collect(),
            next: Mutex::new(0),
            on,
        }
    }

    fn index(&self, fd: RawFd) -> Option<u32> {
        let i = self
            .by_fd
            .get(usize::try_from(fd).ok()?)?
            .load(Ordering::Acquire);
        i.checked_sub(1)
    }
}

/// Builds `$make` with `$f` bound to the operation's file: its registered index when it has
/// one, else its descriptor (the two are different types to the opcode builders).
macro_rules! on_file {
    ($fixed:expr, $fd:expr, |$f:ident| $make:expr) => {
        match $fixed.index($fd) {
            Some(i) => {
                let $f = types::Fixed(i);
                $make
            }
            None => {
                let $f = types::Fd($fd);
                $make
            }
        }
    };
}

fn build(op: &Op, fixed: &FixedFiles) -> (io_uring::squeue::Entry, Keep) {
    match op {
        Op::Read {
            fd,
            off,
            buf,
            buf_off,
            len,
        } => {
            assert!(
                buf_off + *len as usize <= buf.len(),
                "read op past its buffer"
            );
            // SAFETY: in bounds (asserted); the Keep holds the buffer alive.
            let ptr = unsafe { buf.ptr().add(*buf_off) };
            let e = on_file!(fixed, *fd, |f| opcode::Read::new(f, ptr, *len)
                .offset(*off)
                .build());
            (e, Keep::Shared(buf.clone()))
        }
        Op::Write { fd, off, data } => {
            let (ptr, len, keep) = data.parts();
            let e = on_file!(fixed, *fd, |f| opcode::Write::new(f, ptr, len as u32)
                .offset(*off)
                .build());
            (e, keep)
        }
        Op::Fsync { fd, datasync } => {
            let flags = if *datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            let e = on_file!(fixed, *fd, |f| opcode::Fsync::new(f).flags(flags).build());
            (e, Keep::None)
        }
        Op::StartWriteback { fd } => {
            let e = on_file!(fixed, *fd, |f| opcode::SyncFileRange::new(f, 0)
                .flags(libc::SYNC_FILE_RANGE_WRITE)
                .build());
            (e, Keep::None)
        }
        Op::Fallocate { fd, mode, off, len } => {
            let e = on_file!(fixed, *fd, |f| opcode::Fallocate::new(f, *len)
                .offset(*off)
                .mode(*mode)
                .build());
            (e, Keep::None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;

    const BLK: usize = 4096;

    fn notifications_on(s: &Shared) -> bool {
        s.rings.iter().all(|r| {
            let _t = r.table.lock();
            // SAFETY: the table lock is held; only the flags word is read.
            !unsafe { r.uring.completion_shared() }.eventfd_disabled()
        })
    }

    /// Once awake, the reaper listens again, whatever woke it: a nap can end on a count the
    /// eventfd took before notifications went off, and a round that then finds work handed
    /// off must not stay idle with notifications off (the submitter, which saw no hint, does
    /// not kick, and its completion would signal nothing: a store test hung in CI so).
    #[test]
    fn a_reaper_woken_from_a_nap_listens_again() {
        let s = Shared::new(64, 2).unwrap();
        let mut wakers = Vec::new();
        assert!(matches!(s.reap_round(&mut wakers), Reaped::Wait));
        assert!(*s.idle.lock() && !notifications_on(&s), "napping");
        s.handed_off.fetch_add(1, Ordering::SeqCst);
        assert!(matches!(s.reap_round(&mut wakers), Reaped::Wait));
        assert!(!*s.idle.lock(), "awake with work handed off");
        assert!(notifications_on(&s), "and listening for its completion");
        // With nothing handed off it naps again.
        s.handed_off.fetch_sub(1, Ordering::SeqCst);
        assert!(matches!(s.reap_round(&mut wakers), Reaped::Wait));
        assert!(*s.idle.lock() && !notifications_on(&s));
    }

    fn pattern(i: usize) -> Vec<u8> {
        (0..BLK).map(|k| (i * 31 + k * 7) as u8).collect()
    }

    /// Many tasks, batches larger than a ring's SQ and than its completion slots (so pieces
    /// and back-pressure), reads and writes mixed, half the futures dropped mid-flight. Every
    /// finished read is checked; afterwards nothing holds the buffers but the test, which
    /// shows each Keep was released exactly once the kernel was done, and dropping the
    /// engine does not hang on the abandoned operations.
    #[test]
    fn dropped_futures_and_back_pressure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let blocks = 2048;
        {
            let mut f = std::fs::File::create(&path).unwrap();
            for i in 0..blocks {
                f.write_all(&pattern(i)).unwrap();
            }
        }
        for direct in [false, true] {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            let file = match o.open(&path) {
                Ok(f) => f,
                Err(_) if direct => continue, // no O_DIRECT here
                Err(e) => panic!("{e}"),
            };
            let fd = file.as_raw_fd();
            let uring = Arc::new(Uring::new(16).unwrap());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let mut held: Vec<Arc<SharedBuf>> = Vec::new();
            let mut tasks = Vec::new();
            for t in 0..64usize {
                // 300 blocks per batch: more than SQ_ENTRIES and than a ring's CQ slots.
                let n = 300;
                let buf = SharedBuf::new(AlignedBuf::zeroed(n * BLK));
                held.push(buf.clone());
                let first = (t * 97) % (blocks - n);
                let mut ops: Vec<Op> = (0..n)
                    .map(|k| Op::Read {
                        fd,
                        off: ((first + k) * BLK) as u64,
                        buf: buf.clone(),
                        buf_off: k * BLK,
                        len: BLK as u32,
                    })
                    .collect();
                if t % 4 == 0 {
                    // Rewrite a block with the same bytes (a concurrent reader sees no change).
                    let src = Arc::new({
                        let mut a = AlignedBuf::zeroed(BLK);
                        a.copy_from_slice(&pattern(first));
                        a
                    });
                    ops.push(Op::Write {
                        fd,
                        off: (first * BLK) as u64,
                        data: WriteSrc::Aligned {
                            buf: src,
                            start: 0,
                            len: BLK,
                        },
                    });
                    ops.push(Op::Fsync { fd, datasync: true });
                }
                let u = uring.clone();
                let h = rt.spawn(async move {
                    u.run_all(&ops).await.unwrap();
                    drop(buf);
                    first
                });
                tasks.push((t, h));
            }
            // Drop every other future while its operations are (likely) in flight.
            for (t, h) in &tasks {
                if t % 2 == 1 {
                    h.abort();
                }
            }
            let mut checked = 0;
            rt.block_on(async {
                for (t, h) in tasks {
                    match h.await {
                        Ok(first) => {
                            let b = &held[t];
                            // SAFETY (test): the task finished, so no op refers to `b` now.
                            let data = unsafe { std::slice::from_raw_parts(b.ptr(), b.len()) };
                            for (k, blk) in data.chunks(BLK).enumerate() {
                                assert_eq!(blk, &pattern(first + k)[..], "task {t} block {k}");
                            }
                            checked += 1;
                        }
                        Err(e) => assert!(e.is_cancelled()),
                    }
                }
            });
            assert!(
                checked >= 32,
                "the tasks that were not aborted all finished"
            );
            drop(rt);
            // Once the engine is gone every operation has completed and released its Keep.
            drop(Arc::try_unwrap(uring).ok().expect("no other engine handle"));
            for (t, b) in held.iter().enumerate() {
                assert_eq!(Arc::strong_count(b), 1, "task {t}: a buffer is still held");
            }
        }
    }

    /// A leader dropped between pushing and submitting still submits, for itself and for
    /// the follower that pushed behind it; nothing is stranded in the SQ.
    #[test]
    fn dropped_leader_still_submits_its_followers() {
        use std::future::Future;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(2 * BLK as u64).unwrap();
        let fd = f.as_raw_fd();
        let uring = Uring::with_rings(64, 1).unwrap();
        let write = |i: usize| Op::Write {
            fd,
            off: (i * BLK) as u64,
            data: WriteSrc::Bytes(Bytes::from(pattern(i))),
        };
        let mut cx = Context::from_waker(Waker::noop());
        let w0 = [write(0)];
        let mut lead = Box::pin(uring.run_all(&w0));
        assert!(
            lead.as_mut().poll(&mut cx).is_pending(),
            "the leader yields"
        );
        let w1 = [write(1)];
        let mut follow = Box::pin(uring.run_all(&w1));
        assert!(follow.as_mut().poll(&mut cx).is_pending());
        assert_eq!(uring.shared.rings[0].sq.lock().pending.len(), 2);
        drop(lead);
        assert!(uring.shared.rings[0].sq.lock().pending.is_empty());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(follow)
            .unwrap();
        drop(uring);
        let mut got = vec![0u8; 2 * BLK];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got[..BLK], &pattern(0)[..], "the dropped leader's write");
        assert_eq!(&got[BLK..], &pattern(1)[..], "the follower's write");
    }

    /// The reaper is a task of the runtime the engine was made on; when that runtime shuts
    /// down, the thread takes over, and operations that need the reaper (fsync always goes
    /// to io-wq) still complete when driven from another runtime.
    #[test]
    fn reaper_survives_its_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let fd = f.as_raw_fd();
        let rt1 = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let uring = rt1.block_on(async { Uring::new(16) }).unwrap();
        let sync = || Op::Fsync { fd, datasync: true };
        rt1.block_on(uring.run_all(&[sync()])).unwrap();
        drop(rt1);
        let rt2 = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let data = Bytes::from(pattern(3));
        rt2.block_on(async {
            let ops = vec![
                Op::Write {
                    fd,
                    off: 0,
                    data: WriteSrc::Bytes(data.clone()),
                },
                sync(),
            ];
            // A hang here means nobody reaps: fail instead of waiting forever.
            tokio::time::timeout(std::time::Duration::from_secs(60), uring.run_all(&ops))
                .await
                .expect("completions are reaped after the first runtime is gone")
                .unwrap();
        });
        drop(uring);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), &data[..]);
    }
}
