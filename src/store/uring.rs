//! The io_uring engine: one ring owned by one thread; async callers hand it batches of
//! operations over a channel and get completions back on oneshot channels.
//!
//! Buffers: every operation carries a [`Keep`] that owns the memory its pointer refers to.
//! The ring thread holds it in the in-flight table until the kernel has completed the
//! operation, and drops it *before* reporting completion, so a caller that gets its result can
//! reclaim a shared buffer with `Arc::try_unwrap`. A caller that goes away early (a dropped
//! future) cannot free memory the kernel is still writing to.
use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use tokio::sync::oneshot;

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

struct Request {
    entry: io_uring::squeue::Entry,
    keep: Keep,
    done: oneshot::Sender<io::Result<u32>>,
}

const WAKE_TOKEN: u64 = u64::MAX;

pub struct Uring {
    tx: Option<mpsc::Sender<Vec<Request>>>,
    wake: Arc<OwnedFd>,
    sleeping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Uring {
    pub fn new(entries: u32) -> io::Result<Uring> {
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let ring = IoUring::new(entries)?;
        let (tx, rx) = mpsc::channel();
        let sleeping = Arc::new(AtomicBool::new(false));
        let (w, s) = (wake.clone(), sleeping.clone());
        let thread = std::thread::Builder::new()
            .name("cairn-uring".into())
            .spawn(move || ring_thread(ring, rx, w, s))?;
        Ok(Uring {
            tx: Some(tx),
            wake,
            sleeping,
            thread: Some(thread),
        })
    }

    fn poke(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Submit a batch; each result arrives on its receiver. Short transfers are reported as
    /// such (use [`run`] to complete them).
    fn submit(&self, ops: &[Op]) -> Vec<oneshot::Receiver<io::Result<u32>>> {
        let mut reqs = Vec::with_capacity(ops.len());
        let mut rxs = Vec::with_capacity(ops.len());
        for op in ops {
            let (done, rx) = oneshot::channel();
            let (entry, keep) = build(op);
            reqs.push(Request { entry, keep, done });
            rxs.push(rx);
        }
        if let Some(tx) = &self.tx {
            // A send error means the ring thread is gone; receivers then report it.
            let _ = tx.send(reqs);
        }
        self.poke();
        rxs
    }

    /// Run a batch to completion, resubmitting the rest of short reads and writes.
    pub async fn run(&self, ops: Vec<Op>) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = (0..ops.len()).map(|_| None).collect();
        let mut pending: Vec<(usize, Op)> = ops.into_iter().enumerate().collect();
        while !pending.is_empty() {
            let batch: Vec<Op> = pending.iter().map(|(_, op)| op.clone()).collect();
            let rxs = self.submit(&batch);
            let mut next = Vec::new();
            for ((i, op), rx) in pending.into_iter().zip(rxs) {
                let res = rx
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("io_uring thread stopped")));
                match (res, &op) {
                    (
                        Ok(n),
                        Op::Read {
                            fd,
                            off,
                            buf,
                            buf_off,
                            len,
                        },
                    ) if n < *len => {
                        if n == 0 {
                            results[i] = Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "short read",
                            )));
                        } else {
                            let n64 = n as u64;
                            next.push((
                                i,
                                Op::Read {
                                    fd: *fd,
                                    off: off + n64,
                                    buf: buf.clone(),
                                    buf_off: buf_off + n as usize,
                                    len: len - n,
                                },
                            ));
                        }
                    }
                    (Ok(n), Op::Write { fd, off, data }) if (n as usize) < data.parts().1 => {
                        if n == 0 {
                            results[i] =
                                Some(Err(io::Error::new(io::ErrorKind::WriteZero, "short write")));
                        } else {
                            next.push((
                                i,
                                Op::Write {
                                    fd: *fd,
                                    off: off + n as u64,
                                    data: data.advance(n as usize),
                                },
                            ));
                        }
                    }
                    (Ok(_), _) => results[i] = Some(Ok(())),
                    (Err(e), _) => results[i] = Some(Err(e)),
                }
            }
            pending = next;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("lost result"))))
            .collect()
    }

    /// Run a batch and fail with the first error.
    pub async fn run_all(&self, ops: Vec<Op>) -> io::Result<()> {
        for r in self.run(ops).await {
            r?;
        }
        Ok(())
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.tx.take();
        self.sleeping.store(true, Ordering::SeqCst);
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn build(op: &Op) -> (io_uring::squeue::Entry, Keep) {
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
            let e = opcode::Read::new(types::Fd(*fd), ptr, *len)
                .offset(*off)
                .build();
            (e, Keep::Shared(buf.clone()))
        }
        Op::Write { fd, off, data } => {
            let (ptr, len, keep) = data.parts();
            let e = opcode::Write::new(types::Fd(*fd), ptr, len as u32)
                .offset(*off)
                .build();
            (e, keep)
        }
        Op::Fsync { fd, datasync } => {
            let mut f = opcode::Fsync::new(types::Fd(*fd));
            if *datasync {
                f = f.flags(types::FsyncFlags::DATASYNC);
            }
            (f.build(), Keep::None)
        }
        Op::Fallocate { fd, mode, off, len } => {
            let e = opcode::Fallocate::new(types::Fd(*fd), *len)
                .offset(*off)
                .mode(*mode)
                .build();
            (e, Keep::None)
        }
    }
}

struct Inflight {
    keep: Keep,
    done: oneshot::Sender<io::Result<u32>>,
}

fn ring_thread(
    mut ring: IoUring,
    rx: mpsc::Receiver<Vec<Request>>,
    wake: Arc<OwnedFd>,
    sleeping: Arc<AtomicBool>,
) {
    let mut slots: Vec<Option<Inflight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight = 0usize;
    let mut backlog: std::collections::VecDeque<Request> = std::collections::VecDeque::new();
    let mut closing = false;
    let mut wake_buf = Box::new(0u64);
    let mut wake_armed = false;

    loop {
        if !wake_armed && !closing {
            let e = opcode::Read::new(
                types::Fd(wake.as_raw_fd()),
                (&mut *wake_buf as *mut u64).cast(),
                8,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // SAFETY: wake_buf lives for the whole thread, longer than the operation.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                wake_armed = true;
            }
        }
        loop {
            match rx.try_recv() {
                Ok(batch) => backlog.extend(batch),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closing = true;
                    break;
                }
            }
        }
        while let Some(req) = backlog.pop_front() {
            let idx = free.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let entry = req.entry.clone().user_data(idx as u64);
            // SAFETY: the memory behind `entry` is owned by `req.keep`, stored in `slots`
            // until the completion for `idx` arrives.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                free.push(idx);
                backlog.push_front(req);
                break;
            }
            slots[idx] = Some(Inflight {
                keep: req.keep,
                done: req.done,
            });
            inflight += 1;
        }
        if closing && inflight == 0 && backlog.is_empty() {
            break;
        }
        sleeping.store(true, Ordering::SeqCst);
        // Re-check after announcing sleep: a sender that saw `sleeping == false` queued
        // before this point, and try_recv sees it.
        match rx.try_recv() {
            Ok(batch) => {
                sleeping.store(false, Ordering::SeqCst);
                backlog.extend(batch);
                continue;
            }
            Err(mpsc::TryRecvError::Disconnected) => closing = true,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        let want = if closing && inflight == 0 { 0 } else { 1 };
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring submit failed");
                // Fail the whole backlog rather than spin.
                for req in backlog.drain(..) {
                    let _ = req.done.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
        sleeping.store(false, Ordering::SeqCst);
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            if ud == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            let idx = ud as usize;
            if let Some(Inflight { keep, done }) = slots.get_mut(idx).and_then(Option::take) {
                drop(keep);
                inflight -= 1;
                free.push(idx);
                let r = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as u32)
                };
                let _ = done.send(r);
            }
        }
    }
    // The ring goes first: a still-armed wake read may write into `wake_buf` until then.
    drop(ring);
    drop(wake_buf);
}
