//! The running store: I/O paths, commit (flush), checkpoints.
//!
//! Locking, outermost first: an object's `io_lock` (shared for writes, discards and zeroing,
//! exclusive for clone/delete/resize), then chunk stripe locks (exclusive for writes and
//! discards), then the journal mutex, then the metadata mutex. The metadata mutex is never
//! held across an await; the commit mutex serialises commits and sits outside the journal.
//!
//! Reads take no lock but the metadata mutex while they plan. What they planned stays valid
//! because freed slots are reused only after a grace period ([`grace`](super::grace)) that
//! outlasts every read in flight. A read that overlaps a write to the same blocks may see a
//! torn block: its checksum fails, and the read is retried once holding its stripes (shared),
//! which no write can tear. Only a mismatch on that retry is a checksum error.
use super::meta::{HashMap, HashSet};
use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::RwLock;

use super::buf::AlignedBuf;
use super::format::{BLOCK, Record, Superblock};
use super::grace::Readers;
use super::map::Map;
use super::meta::{LANES, Meta, region_of};
use super::recovery::{self, JournalInfo};
use super::segment::{SegTable, Segment};
use super::tail::{self, Growth, Tail};
use super::uring::{Op, SharedBuf, Uring, WriteSrc};
use super::{Extent, ObjectId, ObjectInfo, Result, StoreError, StoreOptions, StoreStats};

const STRIPES: usize = 4096;
/// Commit on our own once this much metadata is waiting, to bound memory and lost work.
const AUTO_COMMIT_BYTES: usize = 8 << 20;
/// Buffered stores write whole-block runs at least this large with O_DIRECT (see "I/O path"
/// in docs/store-format.md).
const DIRECT_WRITE_MIN: usize = 256 * 1024;
/// Shortest time between the commits that clear idle write intents (see `commit`).
const INTENT_EPOCH: std::time::Duration = std::time::Duration::from_secs(1);
/// Large discards and zeroings are done in pieces of this many chunks.
const RANGE_PIECE_CHUNKS: u64 = 256;
/// Largest buffered write: consecutive slots merge into writes up to this size (see
/// `write_planned`).
const BUFFERED_WRITE_MAX: usize = 256 * 1024;
/// Buffered data written since writeback was last started: start it again. A flush then
/// waits for what the last few MiB left dirty, not for everything since the last flush, and
/// the disk works while clients write (see "I/O path" in docs/store-format.md).
const WRITEBACK_KICK_BYTES: u64 = 1 << 20;
/// Consecutive bytes of an object allocated in one lane (see [`LANES`]). A 1 MiB stripe
/// keeps a sequential 1 MiB read one operation; 256 KiB stripes measured 4% slower on
/// 1 MiB reads and no faster on 1 MiB writes at queue depth 8.
const LANE_STRIPE: u64 = 1 << 20;

#[derive(Default)]
struct Counters {
    checksum_errors: AtomicU64,
    healed_blocks: AtomicU64,
    read_retries: AtomicU64,
    io: [IoShard; IO_SHARDS],
    flushes: AtomicU64,
    commits: AtomicU64,
}

/// The per-I/O counters, sharded by thread: one cache line that both cores bump on every
/// 4 KiB read costs more than the rest of the read's bookkeeping.
#[derive(Default)]
#[repr(align(128))]
struct IoShard {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

const IO_SHARDS: usize = 8;

impl Counters {
    fn io(&self) -> &IoShard {
        &self.io[super::thread_index() % IO_SHARDS]
    }

    fn io_sum(&self, f: impl Fn(&IoShard) -> &AtomicU64) -> u64 {
        self.io.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
    }

    fn count_read(&self, bytes: u64) {
        let s = self.io();
        s.reads.fetch_add(1, Ordering::Relaxed);
        s.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn count_write(&self, bytes: u64) {
        let s = self.io();
        s.writes.fetch_add(1, Ordering::Relaxed);
        s.written_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

struct Inner {
    dir: PathBuf,
    seg_dir: PathBuf,
    sb: Superblock,
    direct: bool,
    checkpoint_bytes: u64,
    /// The size a new journal starts with.
    journal_capacity: usize,
    uring: Uring,
    segments: SegTable,
    seg_grow: tokio::sync::Mutex<()>,
    /// Fault injection: hole punches of discards fail (EBADF).
    #[cfg(test)]
    fail_punches: AtomicBool,
    /// A segment sync failed: what it could not write back may be lost, and Linux reports
    /// that once (the pages are clean now, and a second fsync returns success). No commit
    /// goes through from then on; reopening recovers what is on disk.
    sync_failed: AtomicBool,
    meta: Mutex<Meta>,
    stripes: Vec<RwLock<()>>,
    readers: Readers,
    /// Held by whatever makes the journal durable or replaces it (intent appends, commits,
    /// checkpoints). Records are appended under the metadata mutex alone.
    journal: tokio::sync::Mutex<()>,
    /// One journal growth at a time.
    journal_grow: tokio::sync::Mutex<()>,
    commit: tokio::sync::Mutex<()>,
    flush_requested: AtomicU64,
    flush_done: AtomicU64,
    auto_commit: AtomicBool,
    growing: AtomicBool,
    /// Bytes written since writeback was last started, on a line of its own.
    unkicked: Padded<AtomicU64>,
    kicking: AtomicBool,
    /// Background tasks in flight (writeback kicks, journal growth, auto commits). Each
    /// holds the store, and so its lock: close waits for them, or a reopen right after a
    /// close could find the store still locked.
    background: AtomicU64,
    background_done: tokio::sync::Notify,
    closed: AtomicBool,
    counters: Counters,
    zero_crc: u32,
    _lock: File,
}

/// A handle to an open store; clones share it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

enum Mode {
    New,
    InPlace,
    CopyUp { from: u32 },
}

struct WritePlan {
    chunk: u32,
    slot: u32,
    mode: Mode,
    old_present: u64,
    /// Byte range within the chunk, and where it starts in the caller's data.
    start: usize,
    end: usize,
    data_off: usize,
    region: Option<u32>,
}

fn mask_range(b0: u64, b1: u64) -> u64 {
    if b1 <= b0 {
        return 0;
    }
    let n = b1 - b0;
    let m = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    m << b0
}

/// Maximal runs of set bits as (first, count).
fn runs(mut m: u64) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    while m != 0 {
        let s = m.trailing_zeros();
        let n = (m >> s).trailing_ones();
        out.push((s, n));
        m &= !mask_range(s as u64, (s + n) as u64);
    }
    out
}

impl Store {
    /// Open the store in `dir`, creating it if the directory holds none. Recovers from a
    /// crash: committed metadata is replayed, blocks written in place since the last commit
    /// are re-checksummed, and space nothing references is returned to the filesystem.
    pub async fn open(dir: &Path, opts: StoreOptions) -> Result<Store> {
        let dir = dir.to_path_buf();
        let inner = tokio::task::spawn_blocking(move || open_sync(&dir, &opts))
            .await
            .map_err(join_error)??;
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.inner.sb
    }

    pub fn chunk_size(&self) -> u32 {
        self.inner.sb.chunk_size
    }

    /// The largest single write the store issues to a segment file: writes of consecutive
    /// slots merge up to this. In buffered mode it bounds the page-cache folios the store's
    /// writes create.
    pub fn max_write(&self) -> usize {
        if self.inner.direct {
            1 << 30
        } else {
            BUFFERED_WRITE_MAX.max(self.inner.sb.chunk_size as usize)
        }
    }

    /// After a failed sync nothing more is committed or acknowledged until the store is
    /// reopened (see `sync_failed`): an acknowledged write must survive a process crash, and
    /// the next open judges this store as after a power loss.
    fn check_synced(&self) -> Result<()> {
        if self.inner.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::Io(std::io::Error::other(
                "a sync failed earlier, so writes since the last commit may not be on disk; \
                 nothing more is written or committed until the store is reopened",
            )));
        }
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    // ---- object operations (metadata only, durable when they return) ----

    pub async fn create_object(&self, id: ObjectId, size: u64) -> Result<()> {
        self.create_object_unflushed(id, size).await?;
        self.flush().await
    }

    /// [`Store::create_object`] without its commit: the record is logged (a process crash
    /// keeps it) and is made durable by the next [`Store::flush`]. For objects made by the
    /// thousand, such as a shared filesystem's files, whose durability point is fsync.
    pub async fn create_object_unflushed(&self, id: ObjectId, size: u64) -> Result<()> {
        self.check_open()?;
        self.check_size(size)?;
        self.inner
            .meta
            .lock()
            .log(Record::CreateObject { id, size })?;
        self.after_change(false).await
    }

    /// [`Store::delete_object`] without waiting for its commit: the space is freed by the
    /// commits that follow (the next flush, or the background one).
    pub async fn delete_object_unflushed(&self, id: ObjectId) -> Result<()> {
        self.check_open()?;
        let lock = self.obj_lock(id)?;
        let _g = lock.write().await;
        self.inner.meta.lock().log(Record::DeleteObject { id })?;
        self.after_change(false).await
    }

    /// Copy-on-write clone: metadata only, whatever the size of `src`.
    pub async fn clone_object(&self, src: ObjectId, dst: ObjectId) -> Result<()> {
        self.check_open()?;
        let lock = self.obj_lock(src)?;
        let _g = lock.write().await;
        self.inner
            .meta
            .lock()
            .log(Record::CloneObject { src, dst })?;
        self.flush().await
    }

    /// [`Store::clone_object`], then grown to `size` (at least `src`'s size), in one durable
    /// commit: a volume made from an image's raw content, at the cost of one flush.
    pub async fn clone_object_grown(&self, src: ObjectId, dst: ObjectId, size: u64) -> Result<()> {
        self.check_open()?;
        self.check_size(size)?;
        let lock = self.obj_lock(src)?;
        let _g = lock.write().await;
        let src_size = self.object_info(src)?.size;
        if size < src_size {
            return Err(StoreError::Invalid(format!(
                "a clone of {src_size} bytes cannot be {size} bytes"
            )));
        }
        {
            let mut m = self.inner.meta.lock();
            m.log(Record::CloneObject { src, dst })?;
            if size != src_size {
                m.log(Record::Resize { id: dst, size })?;
            }
        }
        self.flush().await
    }

    /// For each run `(src_chunk, dst_chunk, count)`, maps chunks `[src_chunk, src_chunk +
    /// count)` of `src` at `dst_chunk` on in `dst`, sharing their slots copy-on-write:
    /// metadata only, in one durable commit. `dst` must have nothing mapped there (its range
    /// is filled, not overwritten); holes stay holes. A partial last chunk of `dst` takes only
    /// a source chunk with no data in its blocks that reach past `dst`'s end: nothing past an
    /// object's end is kept (growing it again reads zeros there). An image laid out from a
    /// volume's chunks (a qcow2's data clusters) costs no data write.
    pub async fn share_chunks(
        &self,
        src: ObjectId,
        dst: ObjectId,
        runs: &[(u64, u64, u64)],
    ) -> Result<()> {
        /// Entries logged per hold of the metadata mutex, which I/O planning also takes.
        const BATCH: usize = 4096;
        self.check_open()?;
        if src == dst {
            return Err(StoreError::Invalid(
                "an object cannot share chunks with itself".into(),
            ));
        }
        let (ls, ld) = (self.obj_lock(src)?, self.obj_lock(dst)?);
        // Both exclusive (no write in flight on either), taken in id order: two shares
        // between the same pair, either way round, wait for each other rather than deadlock.
        let (_gs, _gd) = if src < dst {
            let gs = ls.write().await;
            (gs, ld.write().await)
        } else {
            let gd = ld.write().await;
            (ls.write().await, gd)
        };
        let mut entries = Vec::new();
        {
            let m = self.inner.meta.lock();
            let chunks = |id: ObjectId| -> Result<u64> {
                let o = m.objects.get(&id).ok_or(StoreError::NotFound(id))?;
                Ok(m.chunks_for(o.size))
            };
            let (src_chunks, dst_chunks) = (chunks(src)?, chunks(dst)?);
            let (chunk, dst_size) = (m.chunk_size as u64, m.objects[&dst].size);
            // Runs that overlap in `dst` would map a chunk twice (the later silently winning).
            let mut targets: Vec<(u64, u64)> = runs.iter().map(|&(_, dc, n)| (dc, n)).collect();
            targets.sort_unstable();
            if targets
                .windows(2)
                .any(|w| w[0].0.saturating_add(w[0].1) > w[1].0)
            {
                return Err(StoreError::Invalid(
                    "runs overlap in the destination".into(),
                ));
            }
            for &(sc, dc, n) in runs {
                if sc.saturating_add(n) > src_chunks || dc.saturating_add(n) > dst_chunks {
                    return Err(StoreError::Invalid(format!(
                        "sharing {n} chunks from {sc} to {dc} runs past an end"
                    )));
                }
                let mut mapped = false;
                m.objects[&dst].map.try_for_each_in(dc, dc + n, |_, _| {
                    mapped = true;
                    ControlFlow::Break(())
                });
                if mapped {
                    return Err(StoreError::Invalid(
                        "chunks are shared only into unmapped space".into(),
                    ));
                }
                let mut past_end = false;
                m.objects[&src].map.for_each_in(sc, sc + n, |c, e| {
                    let d = u64::from(c) - sc + dc;
                    // Blocks of this chunk wholly within dst (fewer than a chunk's only at
                    // its end): the others must hold nothing.
                    let whole = (dst_size.saturating_sub(d * chunk) / BLOCK as u64).min(64);
                    past_end |= whole < 64 && e.present >> whole != 0;
                    entries.push((d as u32, e));
                });
                if past_end {
                    return Err(StoreError::Invalid(format!(
                        "sharing {n} chunks from {sc} to {dc} brings data past the end of {dst}"
                    )));
                }
            }
        }
        for batch in entries.chunks(BATCH) {
            let mut m = self.inner.meta.lock();
            for &(chunk, e) in batch {
                m.log(Record::SetEntry {
                    id: dst,
                    chunk,
                    slot: e.slot,
                    present: e.present,
                })?;
            }
        }
        self.flush().await
    }

    pub async fn delete_object(&self, id: ObjectId) -> Result<()> {
        self.check_open()?;
        let lock = self.obj_lock(id)?;
        let _g = lock.write().await;
        // Reads in flight keep their slots: freed slots are reused only after the commit and
        // a grace period that outlasts them. Reads that start after this find no object.
        self.inner.meta.lock().log(Record::DeleteObject { id })?;
        self.flush().await?;
        // That commit's reclaim released the map after a grace period, freeing what only it
        // held; slots are punched after the commit that follows their freeing.
        self.flush().await
    }

    /// Grow or shrink. Shrinking forgets the data past the new end, so growing again reads zeros.
    pub async fn resize(&self, id: ObjectId, size: u64) -> Result<()> {
        self.check_open()?;
        self.check_size(size)?;
        let lock = self.obj_lock(id)?;
        let _g = lock.write().await;
        let old = self.object_info(id)?.size;
        if size < old {
            let bs = BLOCK as u64;
            let tail_end = size.div_ceil(bs) * bs;
            // The rest of the new last block, up to the old end if that is in the same block.
            let zero_end = tail_end.min(old);
            let tail_allocated = zero_end > size
                && self
                    .extents(id, size, zero_end - size)?
                    .iter()
                    .any(|e| e.allocated);
            if tail_allocated {
                let zeros = Bytes::from(vec![0u8; (zero_end - size) as usize]);
                let chunk = self.inner.sb.chunk_size as u64;
                let _s = self
                    .lock_stripes(id, size / chunk, zero_end.div_ceil(chunk), true)
                    .await;
                self.write_locked(id, size, zeros).await?;
            }
            // Every block past the new end goes, including a partial last block of the old size.
            self.discard_blocks(id, tail_end / bs, old.div_ceil(bs))
                .await?;
        }
        self.inner.meta.lock().log(Record::Resize { id, size })?;
        self.flush().await
    }

    pub fn object_info(&self, id: ObjectId) -> Result<ObjectInfo> {
        let m = self.inner.meta.lock();
        let o = m.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        Ok(ObjectInfo {
            size: o.size,
            allocated_bytes: o.allocated_blocks * BLOCK as u64,
        })
    }

    pub fn list_objects(&self) -> Vec<(ObjectId, ObjectInfo)> {
        let m = self.inner.meta.lock();
        let mut v: Vec<_> = m
            .objects
            .iter()
            .map(|(id, o)| {
                (
                    *id,
                    ObjectInfo {
                        size: o.size,
                        allocated_bytes: o.allocated_blocks * BLOCK as u64,
                    },
                )
            })
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// Allocated and unallocated runs covering `[offset, offset+len)`, at block granularity.
    pub fn extents(&self, id: ObjectId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.extents_upto(id, offset, len, usize::MAX)
    }

    /// The first `max` (at least one) of [`Store::extents`], walking no further than it
    /// takes to find them: a client asking for one extent of a fragmented 1 GiB range does
    /// not pay for all of them, under the metadata lock.
    pub fn extents_upto(
        &self,
        id: ObjectId,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>> {
        let max = max.max(1);
        let m = self.inner.meta.lock();
        let o = m.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        check_range(id, o.size, offset, len)?;
        let end = offset + len;
        let chunk = self.inner.sb.chunk_size as u64;
        let bs = BLOCK as u64;
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, a: u64, b: u64, allocated: bool| {
            let (a, b) = (a.max(offset), b.min(end));
            if a >= b {
                return;
            }
            match out.last_mut() {
                Some(l) if l.allocated == allocated && l.offset + l.length == a => {
                    l.length += b - a
                }
                _ => out.push(Extent {
                    offset: a,
                    length: b - a,
                    allocated,
                }),
            }
        };
        let mut pos = offset;
        o.map
            .try_for_each_in(offset / chunk, end.div_ceil(chunk), |c, e| {
                let base = c as u64 * chunk;
                for (s, n) in runs(e.present) {
                    let a = base + s as u64 * bs;
                    let b = a + n as u64 * bs;
                    if b <= pos || a >= end {
                        continue;
                    }
                    push(&mut out, pos, a, false);
                    push(&mut out, a, b, true);
                    pos = pos.max(b);
                }
                // The first `max` are final once another has begun.
                if out.len() > max {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
        if out.len() <= max {
            push(&mut out, pos, end, false);
        }
        out.truncate(max);
        Ok(out)
    }

    // ---- data operations ----

    pub async fn read(&self, id: ObjectId, offset: u64, len: usize) -> Result<Bytes> {
        self.check_open()?;
        let first = {
            let _r = self.inner.readers.enter();
            self.read_planned(id, offset, len, false).await
        };
        let out = match first {
            Err(StoreError::Checksum { .. }) => {
                // Maybe torn by a write to the same blocks: again, with writes held off.
                self.inner
                    .counters
                    .read_retries
                    .fetch_add(1, Ordering::Relaxed);
                let chunk = self.inner.sb.chunk_size as u64;
                let _s = self
                    .lock_stripes(
                        id,
                        offset / chunk,
                        (offset + len as u64).div_ceil(chunk),
                        false,
                    )
                    .await;
                let _r = self.inner.readers.enter();
                self.read_planned(id, offset, len, true).await?
            }
            other => other?,
        };
        self.inner.counters.count_read(len as u64);
        Ok(out)
    }

    pub async fn write(&self, id: ObjectId, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check_open()?;
        self.check_synced()?;
        let len = data.len() as u64;
        let lock = self.obj_lock(id)?;
        {
            let _g = lock.read().await;
            let chunk = self.inner.sb.chunk_size as u64;
            let _s = self
                .lock_stripes(
                    id,
                    offset / chunk,
                    offset.saturating_add(len).div_ceil(chunk),
                    true,
                )
                .await;
            self.write_locked(id, offset, data).await?;
        }
        self.inner.counters.count_write(len);
        self.pace_writeback(len);
        self.after_change(fua).await
    }

    /// Start writeback of the segments written since the last commit once enough has been
    /// written since it was last started; the kernel's own writeback waits for far more.
    fn pace_writeback(&self, len: u64) {
        let inner = &self.inner;
        // Large writes went to the disk directly (`DIRECT_WRITE_MIN`).
        if inner.direct
            || len >= DIRECT_WRITE_MIN as u64
            || inner.unkicked.0.fetch_add(len, Ordering::Relaxed) + len < WRITEBACK_KICK_BYTES
            || inner.kicking.swap(true, Ordering::AcqRel)
        {
            return;
        }
        inner.unkicked.0.store(0, Ordering::Relaxed);
        self.spawn_background(|this| async move {
            let ops: Vec<Op> = {
                let m = this.inner.meta.lock();
                m.dirty_segments
                    .iter()
                    .filter_map(|&s| this.inner.segments.get(s as usize))
                    .map(|seg| Op::StartWriteback { fd: seg.fd() })
                    .collect()
            };
            // Errors show at the next fsync, which fails the commit (and the store) for them.
            let _ = this.inner.uring.run(ops).await;
            this.inner.kicking.store(false, Ordering::Release);
        });
    }

    /// Deallocate the whole 4 KiB blocks in the range (they then read as zeros). Partial
    /// blocks at the edges are left as they are: a trim is advisory.
    pub async fn discard(&self, id: ObjectId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_open()?;
        self.check_synced()?;
        let lock = self.obj_lock(id)?;
        {
            let _g = lock.read().await;
            self.discard_locked(id, offset, len).await?;
        }
        self.after_change(fua).await
    }

    /// Make the range read as zeros. With `may_deallocate`, whole blocks are deallocated;
    /// without it they stay allocated (written with zeros).
    pub async fn write_zeroes(
        &self,
        id: ObjectId,
        offset: u64,
        len: u64,
        may_deallocate: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_open()?;
        self.check_synced()?;
        let lock = self.obj_lock(id)?;
        {
            let _g = lock.read().await;
            let size = self.object_info(id)?.size;
            check_range(id, size, offset, len)?;
            let bs = BLOCK as u64;
            let end = offset + len;
            let (a, b) = if may_deallocate {
                (offset.div_ceil(bs) * bs, end / bs * bs)
            } else {
                (end, end)
            };
            let chunk = self.inner.sb.chunk_size as u64;
            static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
            let zero = |off: u64, n: u64| {
                let this = self.clone();
                async move {
                    let mut pos = off;
                    while pos < off + n {
                        let mut take = (off + n - pos).min(ZEROS.len() as u64);
                        if may_deallocate {
                            // Only the partial blocks at the ends come here: one block at a
                            // time, so that a hole next to an allocated block stays a hole.
                            take = take.min(bs - pos % bs);
                        }
                        let _s = this
                            .lock_stripes(id, pos / chunk, (pos + take).div_ceil(chunk), true)
                            .await;
                        // Partial blocks at the ends of a deallocating zeroing: a hole already
                        // reads as zeros, and writing them would allocate a block for nothing.
                        let hole = may_deallocate
                            && this.extents(id, pos, take)?.iter().all(|e| !e.allocated);
                        if !hole {
                            this.write_locked(id, pos, Bytes::from_static(&ZEROS[..take as usize]))
                                .await?;
                        }
                        pos += take;
                    }
                    Ok::<(), StoreError>(())
                }
            };
            if a < b {
                zero(offset, a - offset).await?;
                self.discard_locked(id, a, b - a).await?;
                zero(b, end - b).await?;
            } else {
                zero(offset, len).await?;
            }
        }
        self.after_change(fua).await
    }

    /// Make every completed write durable, with the metadata that finds it.
    pub async fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.inner.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let ticket = self.inner.flush_requested.fetch_add(1, Ordering::SeqCst) + 1;
        // The commit is a task of its own: a caller that goes away (an HTTP client that
        // hangs up, a timeout) must not stop it between taking the batch out of memory and
        // journaling it, which would lose the batch and let later flushes report it durable.
        self.detached(move |this| async move {
            let _c = this.inner.commit.lock().await;
            if this.inner.flush_done.load(Ordering::SeqCst) >= ticket {
                return Ok(());
            }
            this.commit(false).await
        })
        .await
    }

    /// Run `f` in a task of its own and wait for it: dropping the caller's future does not
    /// stop it. For work that must not end halfway (journal appends and commits).
    async fn detached<T, F>(&self, f: impl FnOnce(Store) -> F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        tokio::spawn(f(self.clone())).await.map_err(join_error)?
    }

    /// Flush, write a checkpoint, and stop accepting I/O on every handle of this store.
    pub async fn close(self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let res = self.close_inner().await;
        if res.is_err() {
            // Open again, so that a retry retries rather than reporting success.
            self.inner.closed.store(false, Ordering::Release);
        }
        res
    }

    /// Runs `f` on a clone of the store as a task that [`Store::close`] waits for.
    fn spawn_background<F, Fut>(&self, f: F)
    where
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        struct Done(Store);
        impl Drop for Done {
            fn drop(&mut self) {
                let inner = &self.0.inner;
                if inner.background.fetch_sub(1, Ordering::AcqRel) == 1 {
                    inner.background_done.notify_waiters();
                }
            }
        }
        self.inner.background.fetch_add(1, Ordering::AcqRel);
        let done = Done(self.clone());
        let fut = f(self.clone());
        tokio::spawn(async move {
            fut.await;
            drop(done);
        });
    }

    /// Until no background task runs.
    async fn background_settled(&self) {
        loop {
            let settled = self.inner.background_done.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.inner.background.load(Ordering::Acquire) == 0 {
                return;
            }
            settled.await;
        }
    }

    async fn close_inner(&self) -> Result<()> {
        self.background_settled().await;
        // Quiesce: every change holds stripes, so holding them all waits them out; reads
        // hold a grace period instead.
        let _all = self.lock_all_stripes().await;
        self.inner.readers.synchronize().await;
        let _c = self.inner.commit.lock().await;
        {
            // Nothing is in flight and the commit below syncs every segment written before
            // its checkpoint, so no block can be torn: drop the write intents, or every open
            // after a clean stop would re-read all the regions written in the last epoch.
            let mut m = self.inner.meta.lock();
            if m.region_inflight.is_empty() {
                m.marked.clear();
                m.region_epoch.clear();
            }
        }
        self.detached(|this| async move { this.commit(true).await })
            .await?;
        // With everything committed and nothing in flight, re-derive sharing from the maps
        // and punch whatever nobody holds (a safety net: run time already punches them).
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let segments = inner.segments.snapshot();
            let mut m = inner.meta.lock();
            let total = m.slots.total;
            let cursor = m.slots.cursor;
            m.derive_slots(total);
            m.slots.cursor = cursor;
            reclaim_leaks(&inner.sb, &m, &segments)
        })
        .await
        .map_err(join_error)??;
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let (objects, logical, allocated, physical) = {
            let m = self.inner.meta.lock();
            let logical = m.objects.values().map(|o| o.size).sum();
            let alloc: u64 = m.objects.values().map(|o| o.allocated_blocks).sum();
            (
                m.objects.len() as u64,
                logical,
                alloc * BLOCK as u64,
                m.slots.physical_blocks * BLOCK as u64,
            )
        };
        StoreStats {
            objects,
            logical_bytes: logical,
            allocated_bytes: allocated,
            physical_bytes: physical,
            free_bytes: free_space(&self.inner.dir),
            segments: self.inner.segments.len() as u64,
            chunk_size: self.inner.sb.chunk_size as u64,
            checksum_errors: c.checksum_errors.load(Ordering::Relaxed),
            healed_blocks: c.healed_blocks.load(Ordering::Relaxed),
            read_retries: c.read_retries.load(Ordering::Relaxed),
            reads: c.io_sum(|s| &s.reads),
            writes: c.io_sum(|s| &s.writes),
            read_bytes: c.io_sum(|s| &s.read_bytes),
            written_bytes: c.io_sum(|s| &s.written_bytes),
            flushes: c.flushes.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
        }
    }

    // ---- internals ----

    fn check_size(&self, size: u64) -> Result<()> {
        let max = (u32::MAX as u64 + 1) * self.inner.sb.chunk_size as u64;
        if size > max {
            return Err(StoreError::Invalid(format!(
                "size {size} exceeds the maximum object size {max}"
            )));
        }
        Ok(())
    }

    fn obj_lock(&self, id: ObjectId) -> Result<Arc<RwLock<()>>> {
        let m = self.inner.meta.lock();
        Ok(m.objects
            .get(&id)
            .ok_or(StoreError::NotFound(id))?
            .io_lock
            .clone())
    }

    async fn lock_stripes(
        &self,
        id: ObjectId,
        c0: u64,
        c1: u64,
        exclusive: bool,
    ) -> StripeGuards<'_> {
        // A cheap mix of the object id (a random UUID) and the chunk index; no SipHash.
        let (hi, lo) = id.as_u64_pair();
        let base = hi ^ lo.rotate_left(29);
        let stripe = |c: u64| (base ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as usize % STRIPES;
        let mut g = StripeGuards {
            one: None,
            more: Vec::new(),
        };
        let c1 = c1.max(c0 + 1);
        if c1 == c0 + 1 {
            // One chunk, one stripe: the common case takes no allocation.
            g.one = Some(self.lock_stripe(stripe(c0), exclusive).await);
            return g;
        }
        let mut idx: Vec<usize> = (c0..c1).map(stripe).collect();
        idx.sort_unstable();
        idx.dedup();
        for i in idx {
            g.more.push(self.lock_stripe(i, exclusive).await);
        }
        g
    }

    async fn lock_all_stripes(&self) -> Vec<tokio::sync::RwLockWriteGuard<'_, ()>> {
        let mut all = Vec::with_capacity(STRIPES);
        for st in &self.inner.stripes {
            all.push(st.write().await);
        }
        all
    }

    async fn lock_stripe(&self, i: usize, exclusive: bool) -> StripeGuard<'_> {
        if exclusive {
            StripeGuard::Excl(self.inner.stripes[i].write().await)
        } else {
            StripeGuard::Shared(self.inner.stripes[i].read().await)
        }
    }

    /// An operation's records are in the journal's mapping before it is acknowledged: a
    /// process crash keeps them (the page cache outlives it). Then FUA, and commits that keep
    /// what waits for the next commit bounded.
    async fn after_change(&self, fua: bool) -> Result<()> {
        let (big, growth) = {
            let m = self.inner.meta.lock();
            (m.log.since_commit() > AUTO_COMMIT_BYTES, m.log.growth())
        };
        match growth {
            Some(Growth::Now) => self.grow_journal(0).await?,
            Some(Growth::Soon) if !self.inner.growing.swap(true, Ordering::AcqRel) => {
                self.spawn_background(|this| async move {
                    if let Err(e) = this.grow_journal(0).await {
                        tracing::warn!(error = %e, "could not grow the journal");
                    }
                    this.inner.growing.store(false, Ordering::Release);
                });
            }
            _ => {}
        }
        if fua {
            return self.flush().await;
        }
        if big && !self.inner.auto_commit.swap(true, Ordering::AcqRel) {
            self.spawn_background(|this| async move {
                if let Err(e) = this.flush().await {
                    tracing::warn!(error = %e, "background commit failed");
                }
                this.inner.auto_commit.store(false, Ordering::Release);
            });
        }
        Ok(())
    }

    fn seg_ref(&self, slot: u32) -> &Arc<Segment> {
        let sps = self.inner.sb.slots_per_segment();
        self.inner
            .segments
            .get((slot / sps) as usize)
            .expect("a mapped slot lies in an open segment")
    }

    /// Byte offset of block `blk` of `slot` inside its segment file, and its CRC index.
    fn locate(&self, slot: u32, blk: u32) -> (u64, usize) {
        let sb = &self.inner.sb;
        let s = (slot % sb.slots_per_segment()) as u64;
        let bpc = sb.blocks_per_chunk() as u64;
        (
            s * sb.chunk_size as u64 + blk as u64 * BLOCK as u64,
            (s * bpc + blk as u64) as usize,
        )
    }

    /// Make sure the segment files for `slots` exist (creating them off the async threads).
    async fn ensure_segments(&self, max_slot: u32) -> Result<()> {
        let need = max_slot / self.inner.sb.slots_per_segment() + 1;
        if self.inner.segments.len() as u32 >= need {
            return Ok(());
        }
        let _g = self.inner.seg_grow.lock().await;
        loop {
            let have = self.inner.segments.len() as u32;
            if have >= need {
                return Ok(());
            }
            let (dir, sb, direct) = (
                self.inner.seg_dir.clone(),
                self.inner.sb.clone(),
                self.inner.direct,
            );
            let seg = tokio::task::spawn_blocking(move || {
                let s = Segment::open(&dir, have, &sb, direct, true, true)?;
                recovery::sync_dir(&dir)?;
                Ok::<_, std::io::Error>(s)
            })
            .await
            .map_err(join_error)??;
            register_data_file(&self.inner.uring, &seg);
            self.inner.segments.push(Arc::new(seg))?;
        }
    }

    /// Plan and read, inside a read guard. A checksum mismatch is counted and logged only
    /// when `last_try` (the caller then holds the stripes); otherwise it may be a torn read.
    async fn read_planned(
        &self,
        id: ObjectId,
        offset: u64,
        len: usize,
        last_try: bool,
    ) -> Result<Bytes> {
        let chunk = self.inner.sb.chunk_size as u64;
        let bs = BLOCK as u64;
        let end = offset.saturating_add(len as u64);
        let a0 = offset / bs;
        let a1 = end.div_ceil(bs);
        let bpc = self.inner.sb.blocks_per_chunk() as u64;
        // Reads merged where both the file and the buffer ranges continue the previous one.
        // The CRC index of a block is its file offset / BLOCK, so each run is also its own
        // list of checks: no per-block bookkeeping. Planned under the metadata lock, the one
        // lock a read takes.
        let mut reads: SmallVec<[ReadRun<'_>; 2]> = SmallVec::new();
        {
            let m = self.inner.meta.lock();
            let o = m.objects.get(&id).ok_or(StoreError::NotFound(id))?;
            check_range(id, o.size, offset, len as u64)?;
            if len == 0 {
                return Ok(Bytes::new());
            }
            o.map
                .for_each_in(offset / chunk, end.div_ceil(chunk), |c, e| {
                    let cb0 = c as u64 * bpc;
                    let lo = a0.max(cb0) - cb0;
                    let hi = a1.min(cb0 + bpc) - cb0;
                    let want = e.present & mask_range(lo, hi);
                    for (s, n) in runs(want) {
                        let (foff, _) = self.locate(e.slot, s);
                        let boff = ((cb0 + s as u64 - a0) * bs) as usize;
                        let nbytes = n as usize * BLOCK;
                        let seg = self.seg_ref(e.slot);
                        match reads.last_mut() {
                            Some(r)
                                if std::ptr::eq(r.seg, &**seg)
                                    && r.foff + r.len as u64 == foff
                                    && r.boff + r.len == boff
                                    && r.len + nbytes <= 1 << 30 =>
                            {
                                r.len += nbytes
                            }
                            _ => reads.push(ReadRun {
                                seg,
                                foff,
                                boff,
                                len: nbytes,
                            }),
                        }
                    }
                });
        }
        let total = ((a1 - a0) * bs) as usize;
        // Holes are zeroed here; everything else is filled by the reads.
        let mut raw = AlignedBuf::for_overwrite(total);
        let mut cursor = 0;
        for r in &reads {
            raw.zero_range(cursor, r.boff);
            cursor = r.boff + r.len;
        }
        raw.zero_range(cursor, total);
        let buf = SharedBuf::new(raw);
        for r in &reads {
            r.seg.prefetch_crcs((r.foff / bs) as usize, r.len / BLOCK);
        }
        // The retry reads the disk in a buffered store (dirty pages are written back first):
        // a cached page that somehow kept data older than the disk's would fail again.
        let fd_of = |seg: &Segment| match (last_try, seg.dio_fd()) {
            (true, Some(dio)) => dio,
            _ => seg.fd(),
        };
        if !reads.is_empty() {
            let ops: SmallVec<[Op; 2]> = reads
                .iter()
                .map(|r| Op::Read {
                    fd: fd_of(r.seg),
                    off: r.foff,
                    buf: buf.clone(),
                    buf_off: r.boff,
                    len: r.len as u32,
                })
                .collect();
            self.inner.uring.run_all(&ops).await?;
        }
        let buf = SharedBuf::into_inner(buf)
            .ok_or_else(|| StoreError::Io(std::io::Error::other("read buffer still shared")))?;
        for r in &reads {
            let ci0 = (r.foff / bs) as usize;
            let data = &buf[r.boff..r.boff + r.len];
            for (k, block) in data.chunks_exact(BLOCK).enumerate() {
                if crc32fast::hash(block) != r.seg.crc(ci0 + k) {
                    let blk = a0 + (r.boff / BLOCK + k) as u64;
                    if !last_try {
                        return Err(StoreError::Checksum {
                            id,
                            offset: blk * bs,
                        });
                    }
                    self.inner
                        .counters
                        .checksum_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(object = %id, offset = blk * bs, "checksum mismatch");
                    return Err(StoreError::Checksum {
                        id,
                        offset: blk * bs,
                    });
                }
            }
        }
        let skip = (offset - a0 * bs) as usize;
        Ok(buf.into_bytes().slice(skip..skip + len))
    }

    /// Write with the object lock (shared) and the chunk stripes (exclusive) held.
    async fn write_locked(&self, id: ObjectId, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let chunk = self.inner.sb.chunk_size as u64;
        let end = offset.saturating_add(len);
        let mut intents = Vec::new();
        let plans = {
            let mut m = self.inner.meta.lock();
            let m = &mut *m;
            let size = m.objects.get(&id).ok_or(StoreError::NotFound(id))?.size;
            check_range(id, size, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let sps = m.slots_per_segment;
            let stripe_chunks = (LANE_STRIPE / chunk).max(1);
            let lane = |c: u64| (c / stripe_chunks) as usize % LANES;
            let epoch = m.epoch;
            let mut plans = Vec::new();
            for c in offset / chunk..end.div_ceil(chunk) {
                let cbase = c * chunk;
                let start = offset.max(cbase) - cbase;
                let stop = end.min(cbase + chunk) - cbase;
                let obj = m.objects.get_mut(&id).expect("checked above");
                obj.map.unshare_path(c as u32, &mut m.slots);
                let old = obj.map.get(c as u32);
                let (slot, mode, old_present) = match old {
                    None => (m.slots.allocate(sps, lane(c)), Mode::New, 0),
                    // Copied up instead: a slot with blocks waiting for their punch, and one
                    // that a read through a holder that left may still be reading.
                    Some(e)
                        if m.slots.refcnt[e.slot as usize] == 1
                            && !m.slots.punching.contains_key(&e.slot)
                            && !m.slots.departed.contains_key(&e.slot) =>
                    {
                        (e.slot, Mode::InPlace, e.present)
                    }
                    Some(e) => (
                        m.slots.allocate(sps, lane(c)),
                        Mode::CopyUp { from: e.slot },
                        e.present,
                    ),
                };
                let region = if matches!(mode, Mode::InPlace) {
                    let r = region_of(slot);
                    m.region_epoch.insert(r, epoch);
                    *m.region_inflight.entry(r).or_default() += 1;
                    if !m.marked.contains(&r) {
                        intents.push(r);
                    }
                    Some(r)
                } else {
                    None
                };
                plans.push(WritePlan {
                    chunk: c as u32,
                    slot,
                    mode,
                    old_present,
                    start: start as usize,
                    end: stop as usize,
                    data_off: (cbase + start - offset) as usize,
                    region,
                });
            }
            plans
        };
        let res = self.write_planned(id, &plans, &data, intents).await;
        let mut m = self.inner.meta.lock();
        let m = &mut *m;
        for p in &plans {
            if let Some(r) = p.region
                && let Some(n) = m.region_inflight.get_mut(&r)
            {
                *n -= 1;
                if *n == 0 {
                    m.region_inflight.remove(&r);
                }
            }
        }
        match res {
            Ok(()) => {
                let bs = BLOCK as u64;
                for p in &plans {
                    let touched = mask_range(p.start as u64 / bs, (p.end as u64).div_ceil(bs));
                    let present = p.old_present | touched;
                    if !matches!(p.mode, Mode::InPlace) || present != p.old_present {
                        m.log(Record::SetEntry {
                            id,
                            chunk: p.chunk,
                            slot: p.slot,
                            present,
                        })?;
                    }
                    m.dirty_segments.insert(p.slot / m.slots_per_segment);
                }
                Ok(())
            }
            Err(e) => {
                for p in &plans {
                    if !matches!(p.mode, Mode::InPlace) {
                        // Never mapped: free it once the next commit has passed.
                        m.slots.freed.push(p.slot);
                    }
                    m.dirty_segments.insert(p.slot / m.slots_per_segment);
                }
                Err(e)
            }
        }
    }

    async fn write_planned(
        &self,
        id: ObjectId,
        plans: &[WritePlan],
        data: &Bytes,
        intents: Vec<u32>,
    ) -> Result<()> {
        if let Some(max) = plans.iter().map(|p| p.slot).max() {
            self.ensure_segments(max).await?;
        }
        self.ensure_intents(intents).await?;
        let bs = BLOCK as u64;
        let chunk = self.inner.sb.chunk_size as usize;
        // Phase 1: read what partial blocks and copy-ups need.
        struct Stage {
            buf: Option<Arc<SharedBuf>>,
            read_mask: u64,
            src: u32,
        }
        let mut stages = Vec::with_capacity(plans.len());
        let mut reads = Vec::new();
        for p in plans {
            let touched = mask_range(p.start as u64 / bs, (p.end as u64).div_ceil(bs));
            let full = mask_range((p.start as u64).div_ceil(bs), p.end as u64 / bs);
            let partial = touched & !full;
            let (read_mask, src) = match p.mode {
                Mode::New => (0, p.slot),
                Mode::InPlace => (p.old_present & partial, p.slot),
                Mode::CopyUp { from } => (p.old_present & !full, from),
            };
            let aligned =
                !self.inner.direct || (data.as_ptr() as usize + p.data_off).is_multiple_of(BLOCK);
            let fast = read_mask == 0 && partial == 0 && aligned;
            let buf = if fast {
                None
            } else {
                Some(SharedBuf::new(AlignedBuf::zeroed(chunk)))
            };
            if let Some(b) = &buf {
                let seg = self.seg_ref(src);
                for (s, n) in runs(read_mask) {
                    let (foff, _) = self.locate(src, s);
                    reads.push(Op::Read {
                        fd: seg.fd(),
                        off: foff,
                        buf: b.clone(),
                        buf_off: s as usize * BLOCK,
                        len: n * BLOCK as u32,
                    });
                }
            }
            stages.push(Stage {
                buf,
                read_mask,
                src,
            });
        }
        if !reads.is_empty() {
            self.inner.uring.run_all(&reads).await?;
        }
        // The ops hold references to the copy buffers, which are reclaimed below.
        drop(reads);
        // Phase 2: assemble, checksum, write. Whole-block pieces of the caller's data that
        // land back to back in one segment file (a sequential writer gets consecutive slots)
        // become one write, up to `max_write`. Buffered, that is 256 KiB: the page cache
        // sizes its folios by the write that creates them, and a 4 KiB write into a folio
        // costs more the larger the folio. Store bench, 1 MiB writes filling the object, then
        // 4 KiB random writes into it; pieces of 64K / 128K / 256K / 1M gave 6.3k / 8.3k /
        // 10.2k / 9.5k sequential and 251k / 191k / 136k / 71k random IOPS. Writers of a
        // plain file get folios as large as their writes (1 MiB and up). CRCs are kept per
        // run, one segment reference each.
        let max_write = self.max_write();
        // Runs merge further where their aligned middle goes out with O_DIRECT (`flush_run`
        // cuts them up again).
        let run_max = if self.inner.direct {
            max_write
        } else {
            max_write.max(4 * DIRECT_WRITE_MIN)
        };
        let mut writes = Vec::new();
        // The write being extended from the caller's data: (fd, its O_DIRECT twin, file
        // offset, data start, len).
        let mut run: Option<(i32, Option<i32>, u64, usize, usize)> = None;
        let mut crc_runs: Vec<CrcRun> = Vec::new();
        let mut crcs: Vec<u32> = Vec::new();
        let chunk64 = chunk as u64;
        // A run goes out as buffered writes of at most `max_write`, except, in a buffered
        // store, its whole aligned `DIRECT_WRITE_MIN` pieces, which go through the O_DIRECT
        // descriptor. Aligned in the file, so that no page-cache folio (buffered writes make
        // them no larger than `max_write`, and readahead is off) lies partly inside: the
        // kernel drops the cached pages of a direct write's range, and a folio that a
        // concurrent buffered write next door kept dirty would keep the old data (found by
        // review).
        let flush_run = |writes: &mut Vec<Op>, d: Option<(i32, Option<i32>, u64, usize, usize)>| {
            let Some((fd, dio, off, start, len)) = d else {
                return;
            };
            let end = off + len as u64;
            let align = DIRECT_WRITE_MIN as u64;
            let (a, b) = match dio {
                Some(_) => (off.next_multiple_of(align).min(end), end / align * align),
                None => (end, end),
            };
            let buffered = |writes: &mut Vec<Op>, from: u64, to: u64| {
                let mut pos = from;
                while pos < to {
                    let n = (to - pos).min(max_write as u64);
                    let s = start + (pos - off) as usize;
                    writes.push(Op::Write {
                        fd,
                        off: pos,
                        data: WriteSrc::Bytes(data.slice(s..s + n as usize)),
                    });
                    pos += n;
                }
            };
            if let (Some(dio), true) = (dio, b > a) {
                buffered(writes, off, a);
                let s = start + (a - off) as usize;
                let n = (b - a) as usize;
                let bytes = data.slice(s..s + n);
                let src = if (bytes.as_ptr() as usize).is_multiple_of(BLOCK) {
                    WriteSrc::Bytes(bytes)
                } else {
                    let mut buf = AlignedBuf::for_overwrite(n);
                    buf.copy_from_slice(&bytes);
                    WriteSrc::Aligned {
                        buf: Arc::new(buf),
                        start: 0,
                        len: n,
                    }
                };
                writes.push(Op::Write {
                    fd: dio,
                    off: a,
                    data: src,
                });
                buffered(writes, b, end);
            } else {
                buffered(writes, off, end);
            }
        };
        let push_crcs = |crc_runs: &mut Vec<CrcRun>,
                         crcs: &mut Vec<u32>,
                         seg: &Arc<Segment>,
                         ci: usize,
                         bytes: &[u8]| {
            let first = crcs.len();
            crcs.extend(bytes.chunks(BLOCK).map(crc32fast::hash));
            match crc_runs.last_mut() {
                Some(r) if Arc::ptr_eq(&r.seg, seg) && r.ci + (first - r.first) == ci => {}
                _ => crc_runs.push(CrcRun {
                    seg: seg.clone(),
                    ci,
                    first,
                }),
            }
        };
        for (p, st) in plans.iter().zip(stages) {
            let seg = self.seg_ref(p.slot);
            let touched = mask_range(p.start as u64 / bs, (p.end as u64).div_ceil(bs));
            match st.buf {
                None => {
                    let b0 = p.start / BLOCK;
                    let (foff, ci) = self.locate(p.slot, b0 as u32);
                    let len = p.end - p.start;
                    push_crcs(
                        &mut crc_runs,
                        &mut crcs,
                        seg,
                        ci,
                        &data[p.data_off..p.data_off + len],
                    );
                    match &mut run {
                        Some((fd, _, off, start, l))
                            if *fd == seg.fd()
                                && *off + *l as u64 == foff
                                && *start + *l == p.data_off
                                && *l + len <= run_max =>
                        {
                            *l += len
                        }
                        _ => {
                            flush_run(&mut writes, run.take());
                            run = Some((seg.fd(), seg.dio_fd(), foff, p.data_off, len));
                        }
                    }
                }
                Some(shared) => {
                    flush_run(&mut writes, run.take());
                    let mut buf = SharedBuf::into_inner(shared).ok_or_else(|| {
                        StoreError::Io(std::io::Error::other("copy buffer still shared"))
                    })?;
                    let src_seg = self.seg_ref(st.src);
                    for blk in 0..(chunk64 / bs) as u32 {
                        if st.read_mask & (1 << blk) != 0 {
                            let (_, ci) = self.locate(st.src, blk);
                            let b = &buf[blk as usize * BLOCK..(blk as usize + 1) * BLOCK];
                            if crc32fast::hash(b) != src_seg.crc(ci) {
                                self.inner
                                    .counters
                                    .checksum_errors
                                    .fetch_add(1, Ordering::Relaxed);
                                let offset = p.chunk as u64 * chunk64 + blk as u64 * bs;
                                tracing::error!(object = %id, offset, "checksum mismatch");
                                return Err(StoreError::Checksum { id, offset });
                            }
                        }
                    }
                    buf[p.start..p.end]
                        .copy_from_slice(&data[p.data_off..p.data_off + (p.end - p.start)]);
                    let write_mask = touched | st.read_mask;
                    let buf = Arc::new(buf);
                    for (s, n) in runs(write_mask) {
                        let (foff, ci) = self.locate(p.slot, s);
                        let range = s as usize * BLOCK..(s + n) as usize * BLOCK;
                        push_crcs(&mut crc_runs, &mut crcs, seg, ci, &buf[range.clone()]);
                        writes.push(Op::Write {
                            fd: seg.fd(),
                            off: foff,
                            data: WriteSrc::Aligned {
                                buf: buf.clone(),
                                start: range.start,
                                len: range.len(),
                            },
                        });
                    }
                }
            }
        }
        flush_run(&mut writes, run.take());
        // CRCs go in before the data: a crash then leaves each block with the data its
        // previous CRC describes or the data its current one does, which is what recovery
        // accepts in an intent region (anything else there is damage). Readers that meet the
        // new CRC over the old data retry under the stripes, which this write holds. A failed
        // write leaves its blocks undefined (they read as checksum errors), as a failed write
        // may.
        for (k, r) in crc_runs.iter().enumerate() {
            let end = crc_runs.get(k + 1).map_or(crcs.len(), |n| n.first);
            for (j, &crc) in crcs[r.first..end].iter().enumerate() {
                r.seg.replace_crc(r.ci + j, crc);
            }
        }
        let results = self.inner.uring.run(writes).await;
        for r in results {
            r.map_err(map_io)?;
        }
        Ok(())
    }

    /// Make the intents for `regions` durable before any in-place write there.
    async fn ensure_intents(&self, regions: Vec<u32>) -> Result<()> {
        if regions.is_empty() {
            return Ok(());
        }
        // Like a commit, the append runs to its end even if the writer goes away.
        self.detached(|this| async move { this.append_intents(regions).await })
            .await
    }

    async fn append_intents(&self, regions: Vec<u32>) -> Result<()> {
        let _j = self.inner.journal.lock().await;
        self.check_synced()?;
        let mut need: Vec<u32> = {
            let m = self.inner.meta.lock();
            regions
                .into_iter()
                .filter(|r| !m.marked.contains(r))
                .collect()
        };
        need.sort_unstable();
        need.dedup();
        if need.is_empty() {
            return Ok(());
        }
        let recs: Vec<Record> = need
            .iter()
            .map(|&region| Record::Intent { region })
            .collect();
        // In the mapping, in order after everything logged before them.
        while !self.inner.meta.lock().log.put(&recs) {
            self.grow_journal(recs.len() * 32).await?;
        }
        self.sync_journal().await?;
        let mut m = self.inner.meta.lock();
        for r in need {
            m.marked.insert(r);
        }
        Ok(())
    }

    /// Make everything in the journal's mapping durable. Runs with the journal mutex held, in
    /// tasks nobody cancels (see `flush`). A failure stops all later commits, as a failed
    /// segment sync does: Linux marks the pages clean after reporting a writeback error once,
    /// so a later fsync would report success over records that never reached the disk.
    async fn sync_journal(&self) -> Result<()> {
        self.check_synced()?;
        let Some(fd) = self.inner.meta.lock().log.fd() else {
            return Ok(());
        };
        let res = self
            .inner
            .uring
            .run_all(&[Op::Fsync { fd, datasync: true }])
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "journal sync failed; commits stop until the store is reopened");
            self.sync_failed().await;
            return Err(e.into());
        }
        Ok(())
    }

    /// A sync failed: no commit goes through from now on, and the next open judges the
    /// store as after a power loss (see `recovery::forget_boot`).
    async fn sync_failed(&self) {
        if self.inner.sync_failed.swap(true, Ordering::AcqRel) {
            return;
        }
        let dir = self.inner.dir.clone();
        let res = tokio::task::spawn_blocking(move || recovery::forget_boot(&dir)).await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::error!(
                ?res,
                "could not mark the store for recovery as after a power loss"
            );
        }
    }

    /// Grow the journal file until what waits in memory is in the mapping and `room` more
    /// bytes fit; then the low-water mark is clear too.
    async fn grow_journal(&self, room: usize) -> Result<()> {
        let _g = self.inner.journal_grow.lock().await;
        loop {
            let plan = self.inner.meta.lock().log.plan_growth(room);
            let Some((file, generation, capacity)) = plan.map_err(map_io)? else {
                return Ok(());
            };
            tokio::task::spawn_blocking(move || tail::allocate(&file, capacity as u64))
                .await
                .map_err(join_error)?
                .map_err(map_io)?;
            self.inner
                .meta
                .lock()
                .log
                .grown(generation, capacity)
                .map_err(map_io)?;
        }
    }

    async fn discard_locked(&self, id: ObjectId, offset: u64, len: u64) -> Result<()> {
        let size = self.object_info(id)?.size;
        check_range(id, size, offset, len)?;
        let bs = BLOCK as u64;
        self.discard_blocks(id, offset.div_ceil(bs), (offset + len) / bs)
            .await
    }

    /// Discard whole blocks `[a, b)` (block indices; the caller has checked the range).
    async fn discard_blocks(&self, id: ObjectId, a: u64, b: u64) -> Result<()> {
        if a >= b {
            return Ok(());
        }
        let bpc = self.inner.sb.blocks_per_chunk() as u64;
        let mut c = a / bpc;
        let c_end = b.div_ceil(bpc);
        // Unmapped stretches are skipped: trimming a huge, mostly empty range costs what is
        // mapped in it, not its length.
        while let Some(first) = self.next_mapped(id, c, c_end)? {
            c = first;
            let piece_end = (c + RANGE_PIECE_CHUNKS).min(c_end);
            let _s = self.lock_stripes(id, c, piece_end, true).await;
            self.discard_chunks(id, a, b, c, piece_end).await?;
            c = piece_end;
        }
        Ok(())
    }

    /// The first mapped chunk of `id` in `[c0, c1)`.
    fn next_mapped(&self, id: ObjectId, c0: u64, c1: u64) -> Result<Option<u64>> {
        if c0 >= c1 {
            return Ok(None);
        }
        let m = self.inner.meta.lock();
        let obj = m.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        let mut first = None;
        obj.map.try_for_each_in(c0, c1, |c, _| {
            first = Some(u64::from(c));
            ControlFlow::Break(())
        });
        Ok(first)
    }

    /// Discard blocks `[a, b)` within chunks `[c0, c1)`.
    async fn discard_chunks(&self, id: ObjectId, a: u64, b: u64, c0: u64, c1: u64) -> Result<()> {
        let bpc = self.inner.sb.blocks_per_chunk() as u64;
        // (chunk, slot, new present, blocks to punch)
        let mut in_place = Vec::new();
        let mut intents = Vec::new();
        {
            let mut m = self.inner.meta.lock();
            let m = &mut *m;
            let epoch = m.epoch;
            let obj = m.objects.get(&id).ok_or(StoreError::NotFound(id))?;
            let mut targets = Vec::new();
            obj.map.for_each_in(c0, c1, |c, e| targets.push((c, e)));
            for (c, _) in targets {
                let cb = c as u64 * bpc;
                let mask = mask_range(a.max(cb) - cb, b.min(cb + bpc) - cb);
                let obj = m.objects.get_mut(&id).expect("checked above");
                obj.map.unshare_path(c, &mut m.slots);
                let Some(e) = obj.map.get(c) else { continue };
                let drop = e.present & mask;
                if drop == 0 {
                    continue;
                }
                let present = e.present & !drop;
                if present == 0 {
                    // The whole slot goes; it is punched after the commit that frees it.
                    m.log(Record::RemoveEntry { id, chunk: c })?;
                } else if m.slots.refcnt[e.slot as usize] > 1
                    || m.slots.departed.contains_key(&e.slot)
                {
                    // Shared, or a read through a holder that left may still be reading the
                    // slot: only this object's view changes now. A sole holder's blocks die
                    // with it and are punched after the commit and a grace period, as the
                    // blocks of shared slots are.
                    let sole = m.slots.refcnt[e.slot as usize] == 1;
                    m.log(Record::SetEntry {
                        id,
                        chunk: c,
                        slot: e.slot,
                        present,
                    })?;
                    if sole {
                        m.slots.bury(e.slot, drop);
                    }
                } else {
                    let r = region_of(e.slot);
                    m.region_epoch.insert(r, epoch);
                    *m.region_inflight.entry(r).or_default() += 1;
                    if !m.marked.contains(&r) {
                        intents.push(r);
                    }
                    in_place.push((c, e.slot, present, drop, r));
                }
            }
        }
        let res = self.punch_in_place(&in_place, intents).await;
        let mut m = self.inner.meta.lock();
        let m = &mut *m;
        for &(_, slot, _, _, r) in &in_place {
            if let Some(n) = m.region_inflight.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    m.region_inflight.remove(&r);
                }
            }
            m.dirty_segments.insert(slot / m.slots_per_segment);
        }
        res?;
        for &(c, slot, present, _, _) in &in_place {
            m.log(Record::SetEntry {
                id,
                chunk: c,
                slot,
                present,
            })?;
        }
        Ok(())
    }

    async fn punch_in_place(
        &self,
        items: &[(u32, u32, u64, u64, u32)],
        intents: Vec<u32>,
    ) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        self.ensure_intents(intents).await?;
        let mut ops = Vec::new();
        // (segment, file offset, CRC index, CRC before) of every block punched.
        let mut before = Vec::new();
        for &(_, slot, _, drop, _) in items {
            let seg = self.seg_ref(slot);
            for (s, n) in runs(drop) {
                for blk in s..s + n {
                    let (foff, ci) = self.locate(slot, blk);
                    before.push((seg.clone(), foff, ci, seg.crc(ci)));
                    seg.replace_crc(ci, self.inner.zero_crc);
                }
                let (foff, _) = self.locate(slot, s);
                ops.push(punch_op(seg.fd(), foff, n as u64 * BLOCK as u64));
            }
        }
        #[cfg(test)]
        if self.inner.fail_punches.load(Ordering::Relaxed) {
            for op in &mut ops {
                if let Op::Fallocate { fd, .. } = op {
                    *fd = -1;
                }
            }
        }
        let res = self.inner.uring.run_all(&ops).await;
        if res.is_err() {
            self.settle_failed_punch(&before).await;
        }
        res.map_err(map_io)
    }

    /// A punch failed, and the blocks stay in the map: each gets back the CRC of what it now
    /// holds, its old data or zeros, so that a failed discard does not turn intact data into
    /// checksum errors. Anything else keeps the old CRC and reads as the damage it is.
    async fn settle_failed_punch(&self, blocks: &[(Arc<Segment>, u64, usize, u32)]) {
        for (seg, foff, ci, old) in blocks {
            let buf = SharedBuf::new(AlignedBuf::for_overwrite(BLOCK));
            let read = Op::Read {
                fd: seg.fd(),
                off: *foff,
                buf: buf.clone(),
                buf_off: 0,
                len: BLOCK as u32,
            };
            let zeros = self.inner.uring.run_all(&[read]).await.is_ok()
                && SharedBuf::into_inner(buf)
                    .is_some_and(|b| crc32fast::hash(&b) == self.inner.zero_crc);
            if !zeros {
                seg.set_crc(*ci, *old);
            }
        }
    }

    /// Commit: make data durable, then the journal records that refer to it; then reclaim
    /// the slots and blocks they freed. Caller holds the commit mutex, so reclaims run one at
    /// a time and in commit order.
    ///
    /// The records are in the journal's mapping already (logged as they happened); a commit
    /// names where they end, syncs the segments they refer to, and then appends a `CommitTo`
    /// naming that end and syncs the journal. Records logged meanwhile lie between that end
    /// and the commit record and wait for the next commit.
    async fn commit(&self, force_checkpoint: bool) -> Result<()> {
        self.check_synced()?;
        let _j = self.inner.journal.lock().await;
        // Again: a sync that failed while this waited consumed the error, and a second sync
        // of the same file would report success over what it could not write.
        self.check_synced()?;
        let (seq, end, had, segs, mut reclaim, observed, snapshot, prev_seq) = {
            let mut m = self.inner.meta.lock();
            let m = &mut *m;
            let observed = self.inner.flush_requested.load(Ordering::SeqCst);
            if m.log.since_commit() == 0
                && m.dirty_segments.is_empty()
                && m.slots.freed.is_empty()
                && m.slots.dead.is_empty()
                && m.graveyard.is_empty()
                && !force_checkpoint
            {
                self.inner.flush_done.fetch_max(observed, Ordering::SeqCst);
                return Ok(());
            }
            // Intents idle for the whole epoch that just ended are cleared by this commit;
            // new writes there announce theirs again, after these clears. An epoch lasts
            // at least INTENT_EPOCH: a flush right after a flush (a guest's, or fio's
            // several syncs at once) would otherwise end an epoch with next to no writes in
            // it, clear nearly every intent, and make the next writes announce them all
            // again, one journal sync each.
            let now = std::time::Instant::now();
            let idle: Vec<u32> =
                if now.duration_since(m.epoch_started) >= INTENT_EPOCH || force_checkpoint {
                    let ended = m.epoch;
                    m.epoch += 1;
                    m.epoch_started = now;
                    m.marked
                        .iter()
                        .copied()
                        .filter(|r| {
                            m.region_epoch.get(r).is_none_or(|&e| e < ended)
                                && !m.region_inflight.contains_key(r)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
            for &region in &idle {
                m.region_epoch.remove(&region);
                m.log(Record::IntentClear { region })?;
            }
            let prev_seq = m.commit_seq;
            let seq = prev_seq + 1;
            m.commit_seq = seq;
            let end = m.log.pos();
            let had = m.log.since_commit();
            m.log.commit_began();
            let segs: Vec<u32> = m.dirty_segments.drain().collect();
            let reclaim = Reclaim {
                freed: std::mem::take(&mut m.slots.freed),
                dead: std::mem::take(&mut m.slots.dead),
                graves: std::mem::take(&mut m.graveyard),
                cut: m.slots.grace_gen,
            };
            m.slots.grace_gen += 1;
            let snapshot = (force_checkpoint || end > self.inner.checkpoint_bytes)
                .then(|| m.encode_checkpoint(m.log.generation() + 1, seq));
            (seq, end, had, segs, reclaim, observed, snapshot, prev_seq)
        };
        let res = self.commit_io(seq, end, segs.clone(), snapshot).await;
        if let Err((e, durable)) = res {
            let mut m = self.inner.meta.lock();
            if !durable {
                // Its records stay in the journal, for the next commit to cover; so do the
                // intent clears (the regions were idle, and new writes there announce theirs
                // again). What it synced may be dirty again; what it freed waits either way.
                m.dirty_segments.extend(segs);
                m.commit_seq = prev_seq;
                m.log.commit_failed(had);
            }
            // Freed slots and blocks wait for a commit known to be durable.
            m.slots.freed.append(&mut reclaim.freed);
            for (slot, blocks) in reclaim.dead.drain() {
                *m.slots.dead.entry(slot).or_default() |= blocks;
            }
            m.graveyard.append(&mut reclaim.graves);
            return Err(e);
        }
        drop(_j);
        self.inner.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.reclaim(reclaim).await;
        self.inner.flush_done.fetch_max(observed, Ordering::SeqCst);
        Ok(())
    }

    /// Make a commit durable: fsync the dirty segments, append the commit record and sync the
    /// journal, and write the checkpoint if one is due. An error says whether the commit is
    /// durable all the same (a checkpoint that failed after it), which decides what a failure
    /// gives back.
    async fn commit_io(
        &self,
        seq: u64,
        end: u64,
        segs: Vec<u32>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<(), (StoreError, bool)> {
        #[cfg(test)]
        if let Err(e) = recovery::fault::point(&self.inner.dir, "commit's segment sync") {
            return Err((e.into(), false));
        }
        if let Err(e) = self.sync_segments(segs).await {
            // Not retried: a second fsync would return success over the pages this one could
            // not write back (found by review: a flush then acknowledged data that was gone).
            tracing::error!(error = %e, "segment sync failed; commits stop until the store is reopened");
            self.sync_failed().await;
            return Err((e, false));
        }
        // The commit record goes after everything it covers, straight into the mapping: it
        // never waits in memory, where a later commit's record could overtake it.
        let rec = [Record::CommitTo { seq, end }];
        while !self.inner.meta.lock().log.put(&rec) {
            self.grow_journal(64).await.map_err(|e| (e, false))?;
        }
        self.sync_journal().await.map_err(|e| (e, false))?;
        self.write_checkpoint(snapshot, end)
            .await
            .map_err(|e| (e, true))
    }

    async fn sync_segments(&self, segs: Vec<u32>) -> Result<()> {
        let mut syncs = Vec::new();
        {
            let all = &self.inner.segments;
            for s in segs {
                if let Some(seg) = all.get(s as usize) {
                    syncs.push(Op::Fsync {
                        fd: seg.fd(),
                        datasync: true,
                    });
                    syncs.push(Op::Fsync {
                        fd: seg.crc_fd(),
                        datasync: true,
                    });
                    // Not the previous CRCs: only a process crash reads them (a restart takes
                    // every block that matches neither CRC as written), and the page cache
                    // outlives a process. Syncing them cost every commit a write-protect
                    // fault and TLB flush per page of them that the next writes touched.
                }
            }
        }
        self.inner.uring.run_all(&syncs).await?;
        Ok(())
    }

    /// Start a new journal from `snapshot`, the state at byte `end` of the live one (the end
    /// of what the commit that took it covered, now durable). The new journal is made whole
    /// (header, the intents in force, its space), then the records logged after `end` are
    /// carried into it and it is renamed into place and becomes the live one, all at once
    /// under the metadata mutex: from the rename on, replay takes the old journal's
    /// uncovered records for carried (a journal with a successor), so none may be missing.
    /// Then the checkpoint is replaced; older journals go only once that is durable.
    async fn write_checkpoint(&self, snapshot: Option<Vec<u8>>, end: u64) -> Result<()> {
        let Some(ckpt) = snapshot else {
            return Ok(());
        };
        #[cfg(test)]
        recovery::fault::pass(&self.inner.dir, "checkpoint begins").await;
        let (old, carried, marks) = {
            let m = self.inner.meta.lock();
            let mut v: Vec<u32> = m.marked.iter().copied().collect();
            v.sort_unstable();
            let mut marks = Vec::new();
            for region in v {
                Record::Intent { region }.encode(&mut marks);
            }
            (m.log.generation(), m.log.pos().saturating_sub(end), marks)
        };
        let capacity = self.inner.journal_capacity.max(2 * carried as usize);
        let generation = old + 1;
        let (dir, sb) = (self.inner.dir.clone(), self.inner.sb.clone());
        let new = tokio::task::spawn_blocking(move || {
            recovery::make_journal(&dir, generation, &sb, &marks, capacity)
        })
        .await
        .map_err(join_error)??;
        let mut tail = Tail::mapped(new.file, generation, new.len)?;
        let retired = loop {
            let short = {
                let mut m = self.inner.meta.lock();
                let carry = m.log.carry_from(end);
                if tail.fits(carry.len()) {
                    tail.carry_in(&carry);
                    // A rename under the mutex: once per checkpoint, and it must be one step
                    // with the carry (a crash between them would find the new journal without
                    // its records).
                    std::fs::rename(&new.tmp, &new.path)?;
                    break std::mem::replace(&mut m.log, tail);
                }
                carry.len()
            };
            // Records kept coming while the new journal was made: room for them first, since
            // a carried record that waited in memory would be in neither journal on disk.
            let plan = tail.plan_growth(2 * short)?;
            let Some((file, g, capacity)) = plan else {
                continue;
            };
            tokio::task::spawn_blocking(move || tail::allocate(&file, capacity as u64))
                .await
                .map_err(join_error)?
                .map_err(map_io)?;
            tail.grown(g, capacity)?;
        };
        drop(retired);
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // The journal's name is durable before a checkpoint that names it can be.
            recovery::sync_dir(&dir)?;
            #[cfg(test)]
            recovery::fault::point(&dir, "checkpoint replaced")?;
            recovery::replace_file(&dir, recovery::CHECKPOINT, &ckpt)?;
            // Renamed: a crash may find the new checkpoint from here on, and for it the old
            // journals are stale (deleted at open). The old journals go only once the rename
            // is durable: until then a crash may find the old checkpoint, which needs them.
            recovery::sync_dir_after_rename(&dir)?;
            for g in (1..=old).rev() {
                match std::fs::remove_file(recovery::journal_path(&dir, g)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await
        .map_err(join_error)??;
        Ok(())
    }

    /// After a durable commit and a grace period: release the maps of deleted objects, end
    /// the departures before the commit, punch the blocks and slots the commit freed, and
    /// let the allocator have the slots.
    async fn reclaim(&self, r: Reclaim) {
        let Reclaim {
            freed,
            dead,
            graves,
            cut,
        } = r;
        let departures = !self.inner.meta.lock().slots.departed.is_empty();
        if freed.is_empty() && dead.is_empty() && graves.is_empty() && !departures {
            return;
        }
        // Reads that planned before the commit may still be reading these slots.
        self.inner.readers.synchronize().await;
        {
            let mut m = self.inner.meta.lock();
            let m = &mut *m;
            // Departures the release causes are dated `cut`: no read through those maps is
            // left, so they end below with the others. What it frees goes at the next
            // commit, which carries whatever else still referred to it (a clone's copy-up).
            let now = std::mem::replace(&mut m.slots.grace_gen, cut);
            for g in graves {
                g.release(&mut m.slots);
            }
            m.slots.grace_gen = now;
            m.slots.departed.retain(|_, g| *g > cut);
        }
        let chunk = self.inner.sb.chunk_size as u64;
        let segs = self.inner.segments.snapshot();
        let sps = self.inner.sb.slots_per_segment();
        if !dead.is_empty() {
            self.punch_dead(&dead, &segs).await;
        }
        // A slot without a segment file (its creation failed) has nothing to punch.
        let (punched, ops): (Vec<u32>, Vec<Op>) = freed
            .iter()
            .filter_map(|&s| {
                segs.get((s / sps) as usize)
                    .map(|seg| (s, punch_op(seg.fd(), (s % sps) as u64 * chunk, chunk)))
            })
            .unzip();
        let results = self.inner.uring.run(ops).await;
        let mut m = self.inner.meta.lock();
        let failed: HashSet<u32> = punched
            .into_iter()
            .zip(results)
            .filter_map(|(s, r)| {
                let e = r.err()?;
                // Not reusing it is safe; the space comes back at the next open.
                tracing::warn!(slot = s, error = %e, "could not punch a freed slot");
                Some(s)
            })
            .collect();
        for s in freed {
            if !failed.contains(&s) && m.slots.refcnt[s as usize] == 0 {
                m.slots.mark_unused(s);
            }
        }
    }

    /// Punch blocks of shared slots that lost their last holder (their slots stay in use).
    /// Nobody writes them meanwhile: those slots are copied up rather than written in place
    /// until this is done (`Slots::punching`).
    async fn punch_dead(&self, dead: &HashMap<u32, u64>, segs: &[Arc<Segment>]) {
        let sps = self.inner.sb.slots_per_segment();
        let mut ops = Vec::new();
        {
            let m = self.inner.meta.lock();
            for (&slot, &blocks) in dead {
                // A slot freed since goes whole, with the freed ones.
                if m.slots.refcnt[slot as usize] == 0 {
                    continue;
                }
                let Some(seg) = segs.get((slot / sps) as usize) else {
                    continue;
                };
                for (s, n) in runs(blocks & !m.slots.live[slot as usize]) {
                    let (foff, _) = self.locate(slot, s);
                    ops.push(punch_op(seg.fd(), foff, n as u64 * BLOCK as u64));
                }
            }
        }
        for r in self.inner.uring.run(ops).await {
            if let Err(e) = r {
                // Unreferenced either way; the space comes back at the next open.
                tracing::warn!(error = %e, "could not punch blocks nobody holds");
            }
        }
        let mut m = self.inner.meta.lock();
        for (slot, blocks) in dead {
            if let Some(p) = m.slots.punching.get_mut(slot) {
                *p &= !blocks;
                if *p == 0 {
                    m.slots.punching.remove(slot);
                }
            }
        }
    }
}

/// Deallocate `len` bytes at `off` of `fd`, keeping its size.
fn punch_op(fd: std::os::fd::RawFd, off: u64, len: u64) -> Op {
    Op::Fallocate {
        fd,
        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    }
}

#[allow(dead_code)] // held, never read
enum StripeGuard<'a> {
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
    Excl(tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// A value on a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

/// CRCs `crcs[first..]` (up to the next run's `first`) for blocks `ci..` of `seg`.
struct CrcRun {
    seg: Arc<Segment>,
    ci: usize,
    first: usize,
}

/// Data files go into the rings' registered-file table; failing that, I/O uses their
/// descriptors as before.
fn register_data_file(uring: &Uring, seg: &Segment) {
    if let Err(e) = uring.register_file(seg.fd()) {
        tracing::debug!(error = %e, "segment file not registered with io_uring");
    }
}

/// What a commit hands to `Store::reclaim` once it is durable.
struct Reclaim {
    freed: Vec<u32>,
    dead: HashMap<u32, u64>,
    /// Maps of objects deleted before the commit.
    graves: Vec<Map>,
    /// The grace generation the commit closed: departures up to it end after the grace period.
    cut: u64,
}

/// One merged read: `len` bytes at `foff` of `seg` into the buffer at `boff`.
struct ReadRun<'a> {
    seg: &'a Segment,
    foff: u64,
    boff: usize,
    len: usize,
}

struct StripeGuards<'a> {
    one: Option<StripeGuard<'a>>,
    more: Vec<StripeGuard<'a>>,
}

fn check_range(id: ObjectId, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange {
            id,
            offset,
            len,
            size,
        }),
    }
}

/// A blocking task that panicked or was cancelled.
fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io(std::io::Error::other(e))
}

fn map_io(e: std::io::Error) -> StoreError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace,
        _ => StoreError::Io(e),
    }
}

fn free_space(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs is plain old data; all-zero is a valid value to be overwritten.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return 0;
    }
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Open (or create) synchronously; runs on a blocking thread.
fn open_sync(dir: &Path, opts: &StoreOptions) -> Result<Inner> {
    std::fs::create_dir_all(dir)?;
    let lock = recovery::lock(dir)?;
    if !dir.join(recovery::SUPERBLOCK).exists() {
        recovery::create(dir, opts.chunk_size)?;
        tracing::info!(dir = %dir.display(), chunk_size = opts.chunk_size, "created a new store");
    }
    let started = std::time::Instant::now();
    let loaded = recovery::load(dir)?;
    let sb = loaded.sb.clone();
    let mut meta = loaded.meta;
    let replay_time = started.elapsed();
    let seg_dir = dir.join(recovery::SEGMENTS);
    let mut segments = Vec::new();
    for i in 0..loaded.segments {
        // A format-1 segment gets its previous-CRC file here (the store is upgraded below).
        // The last segment, when no map references it, may be one whose creation a crash cut
        // short (its data file made, not yet sized, CRC files missing): completed, since
        // nothing in it is anyone's data. Refusing it kept the store from ever opening.
        let unreferenced_tail = i + 1 == loaded.segments && !references_segment(&sb, &meta, i);
        segments.push(Arc::new(Segment::open(
            &seg_dir,
            i,
            &sb,
            opts.direct_io,
            unreferenced_tail,
            true,
        )?));
    }
    for j in &loaded.journals {
        if j.pending > 0 && j.replayed {
            tracing::info!(journal = %j.path.display(), records = j.pending,
                "replayed the records logged since the last flush (the process stopped, the machine did not)");
        } else if j.pending > 0 {
            tracing::info!(journal = %j.path.display(), records = j.pending,
                "dropped the records logged since the last flush (the machine restarted, or they were carried into the next journal)");
        }
        if j.torn_bytes > 0 {
            tracing::info!(journal = %j.path.display(), bytes = j.torn_bytes, "a torn journal tail");
        }
    }
    let legacy = sb.version < super::format::FORMAT_VERSION;
    let unmatched = Unmatched::for_store(dir, &sb);
    if recovery::restarted_since_open(dir) {
        // Read the disk, not what a failed writeback left in the cache (see `drop_cached`).
        for s in &segments {
            recovery::drop_cached(s.file());
        }
    }
    let healed = heal_dirty_regions(&sb, &meta, &segments, unmatched)?;
    let leaked = reclaim_leaks(&sb, &meta, &segments)?;
    let check_time = started.elapsed() - replay_time;
    if healed.taken > 0 {
        tracing::warn!(
            blocks = healed.taken,
            "blocks written in place before the machine restarted matched neither checksum; \
             taken as written, with checksums of the data on disk (old or new data: the \
             writes to them were never flushed)"
        );
    }
    let synced = segments
        .iter()
        .try_for_each(|s| s.file().sync_all().and_then(|()| s.sync_crcs()));
    if let Err(e) = synced {
        // Judged as after a restart next time: see `recovery::forget_boot`.
        if let Err(f) = recovery::forget_boot(dir) {
            tracing::error!(error = %f, "could not mark the store for recovery as after a power loss");
        }
        return Err(e.into());
    }
    // What was replayed beyond the last commit is durable now (the segments are synced):
    // a commit record in the journal that holds it says so. Carrying it into the new journal
    // instead would have it applied twice by a later replay, over the checkpoint below.
    let mut commit_seq = loaded.commit_seq;
    if let Some(j) = loaded
        .journals
        .last()
        .filter(|j| j.replayed && j.pending > 0)
    {
        commit_seq += 1;
        recovery::commit_in_place(&j.path, j.valid_end, commit_seq)?;
    }
    let recovered = started.elapsed();
    let intent_regions = meta.marked.len();
    let sb = if legacy {
        // Every segment has its previous-CRC file now (synced above), and the journal made
        // below is one of this format: say so.
        let mut up = sb.clone();
        up.version = super::format::FORMAT_VERSION;
        recovery::write_atomic(dir, recovery::SUPERBLOCK, &up.encode())?;
        tracing::info!(from = sb.version, to = up.version, "store format upgraded");
        up
    } else {
        sb
    };
    // Start from a fresh checkpoint and journal; everything recovered is now durable there.
    meta.marked.clear();
    let generation = loaded
        .journals
        .last()
        .map_or(1, |j: &JournalInfo| j.generation)
        + 1;
    // As large as what a checkpoint's worth of records needs, up to a start size; it grows.
    let journal_capacity = (opts.checkpoint_bytes as usize)
        .clamp(4096, tail::START_CAPACITY)
        .next_multiple_of(4096);
    let journal = recovery::create_journal(dir, generation, &sb, &[], journal_capacity)?;
    #[cfg(test)]
    recovery::fault::point(dir, "open's checkpoint")?;
    recovery::write_atomic(
        dir,
        recovery::CHECKPOINT,
        &meta.encode_checkpoint(generation, commit_seq),
    )?;
    for j in loaded
        .journals
        .iter()
        .map(|j| &j.path)
        .chain(&loaded.stale_journals)
    {
        std::fs::remove_file(j)?;
    }
    for j in &loaded.foreign_journals {
        tracing::warn!(path = %j.display(), "not this store's journal (left alone)");
    }
    // From here on this session may write: a later open judges what it left by this boot.
    recovery::record_boot(dir)?;
    meta.commit_seq = commit_seq;
    // Reads run from here on: a deleted object's map outlives the reads in flight on it.
    meta.defer_release = true;
    tracing::info!(
        replayed_records = loaded
            .journals
            .iter()
            .filter(|j| j.replayed)
            .map(|j| j.pending)
            .sum::<u64>(),
        intent_regions,
        healed_blocks = healed.restored,
        taken_blocks = healed.taken,
        reclaimed_bytes = leaked,
        replay_ms = replay_time.as_millis() as u64,
        check_ms = check_time.as_millis() as u64,
        sync_ms = (recovered - replay_time - check_time).as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "store opened"
    );
    meta.log = Tail::mapped(journal.file, generation, journal.len)?;
    let uring = Uring::new(256)?;
    let counters = Counters::default();
    counters
        .healed_blocks
        .store(healed.total(), Ordering::Relaxed);
    let table = SegTable::new((u32::MAX as usize).div_ceil(sb.slots_per_segment() as usize) + 1);
    for seg in segments {
        register_data_file(&uring, &seg);
        table.push(seg)?;
    }
    Ok(Inner {
        dir: dir.to_path_buf(),
        seg_dir,
        sb,
        direct: opts.direct_io,
        checkpoint_bytes: opts.checkpoint_bytes,
        journal_capacity,
        uring,
        segments: table,
        seg_grow: Default::default(),
        #[cfg(test)]
        fail_punches: AtomicBool::new(false),
        sync_failed: AtomicBool::new(false),
        meta: Mutex::new(meta),
        stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        readers: Readers::new(),
        journal: Default::default(),
        journal_grow: Default::default(),
        commit: Default::default(),
        flush_requested: AtomicU64::new(0),
        flush_done: AtomicU64::new(0),
        auto_commit: AtomicBool::new(false),
        growing: AtomicBool::new(false),
        unkicked: Padded(AtomicU64::new(0)),
        kicking: AtomicBool::new(false),
        background: AtomicU64::new(0),
        background_done: tokio::sync::Notify::new(),
        closed: AtomicBool::new(false),
        counters,
        zero_crc: super::format::crc_of_zero_block(),
        _lock: lock,
    })
}

/// How open judges a block of an intent region that matches neither of its CRCs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unmatched {
    /// Damage: it stays a checksum error. After a process crash the page cache outlived
    /// the process, so each block holds the data its current or previous CRC describes.
    Damage,
    /// Taken as written, its CRC recomputed: the machine restarted (a power loss or kernel
    /// crash writes back data and CRC pages each on its own, so neither CRC need describe
    /// the data on disk, old or new), or the store is format 1 (no previous CRCs).
    Written,
}

impl Unmatched {
    /// The rule for the store in `dir`, as it is on disk now.
    pub(super) fn for_store(dir: &Path, sb: &Superblock) -> Unmatched {
        if sb.version < super::format::PREV_CRC_VERSION || recovery::restarted_since_open(dir) {
            Unmatched::Written
        } else {
            Unmatched::Damage
        }
    }
}

/// What re-checksumming the intent regions did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Healed {
    /// Blocks whose data matched their previous CRC (the write after it never landed).
    pub restored: u64,
    /// Blocks that matched neither CRC, taken as written by [`Unmatched::Written`].
    pub taken: u64,
}

impl Healed {
    pub fn total(self) -> u64 {
        self.restored + self.taken
    }
}

/// Whether any map references a slot of segment `seg`, or of a later one.
pub(super) fn references_segment(sb: &Superblock, meta: &Meta, seg: u32) -> bool {
    meta.slots_needed() as u64 > seg as u64 * sb.slots_per_segment() as u64
}

/// Re-checksum the present blocks of intent regions after a crash: a block whose data has
/// its previous CRC (the write after it never landed) gets that CRC back; one that matches
/// neither is judged by `unmatched`. Regions are read in runs of up to 1 MiB by a few threads
/// at once: this is most of what recovery costs after a crash under a write load (every
/// region written in place in the last second or so), and one thread reading 64 KiB at a
/// time left the disk half idle.
pub(super) fn heal_dirty_regions(
    sb: &Superblock,
    meta: &Meta,
    segments: &[Arc<Segment>],
    unmatched: Unmatched,
) -> Result<Healed> {
    const THREADS: usize = 4;
    const RUN_SLOTS: u32 = 16;
    let sps = sb.slots_per_segment();
    let bpc = sb.blocks_per_chunk();
    let chunk = sb.chunk_size as usize;
    let mut regions: Vec<u32> = meta.marked.iter().copied().collect();
    regions.sort_unstable();
    let next = AtomicU64::new(0);
    let used = |slot: u32| slot < meta.slots.total && meta.slots.refcnt[slot as usize] > 0;
    // One region: runs of consecutive slots in use (a region lies in one segment).
    let heal_region = |r: u32, buf: &mut AlignedBuf, healed: &mut Healed| -> Result<()> {
        let first = r * super::format::REGION_SLOTS;
        let end = first + super::format::REGION_SLOTS;
        let mut slot = first;
        while slot < end {
            if !used(slot) {
                slot += 1;
                continue;
            }
            let Some(seg) = segments.get((slot / sps) as usize) else {
                return Ok(());
            };
            let mut n = 1;
            while n < RUN_SLOTS && slot + n < end && used(slot + n) {
                n += 1;
            }
            let len = n as usize * chunk;
            let base = (slot % sps) as u64 * chunk as u64;
            pread_exact(seg.file(), &mut buf[..len], base)?;
            for k in 0..n {
                let s = slot + k;
                let live = meta.slots.live[s as usize];
                for blk in 0..bpc {
                    if live & (1 << blk) == 0 {
                        continue;
                    }
                    let ci = ((s % sps) * bpc + blk) as usize;
                    let at = k as usize * chunk + blk as usize * BLOCK;
                    let crc = crc32fast::hash(&buf[at..at + BLOCK]);
                    if crc == seg.crc(ci) {
                        continue;
                    }
                    if seg.crashed_write(ci, crc) {
                        healed.restored += 1;
                    } else if unmatched == Unmatched::Written {
                        healed.taken += 1;
                    } else {
                        continue;
                    }
                    seg.set_crc(ci, crc);
                }
            }
            slot += n;
        }
        Ok(())
    };
    let results: Vec<Result<Healed>> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..THREADS.min(regions.len()))
            .map(|_| {
                sc.spawn(|| {
                    let mut buf = AlignedBuf::zeroed(RUN_SLOTS as usize * chunk);
                    let mut healed = Healed::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(&r) = regions.get(i) else {
                            return Ok(healed);
                        };
                        heal_region(r, &mut buf, &mut healed)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(StoreError::Io(std::io::Error::other("heal panicked"))))
            })
            .collect()
    });
    let mut total = Healed::default();
    for r in results {
        let h = r?;
        total.restored += h.restored;
        total.taken += h.taken;
    }
    Ok(total)
}

pub(super) fn reclaim_leaks(
    sb: &Superblock,
    meta: &Meta,
    segments: &[Arc<Segment>],
) -> Result<u64> {
    let mut total = 0;
    for (i, seg) in segments.iter().enumerate() {
        for (off, len) in recovery::scan_leaks(seg.file(), i as u32, sb, meta)? {
            recovery::punch(seg.file(), off, len)?;
            total += len;
        }
    }
    Ok(total)
}

pub(super) fn pread_exact(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, off)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store holding one object whose first 4 KiB block (sevens) is written and flushed,
    /// with the slot that holds it.
    async fn one_block_store() -> (tempfile::TempDir, Store, ObjectId, u32) {
        let tmp = tempfile::tempdir().unwrap();
        let (s, id, slot) = one_block_store_in(tmp.path()).await;
        (tmp, s, id, slot)
    }

    /// [`one_block_store`] in `dir`.
    async fn one_block_store_in(dir: &Path) -> (Store, ObjectId, u32) {
        let s = Store::open(dir, StoreOptions::default()).await.unwrap();
        let id = ObjectId::new_v4();
        s.create_object(id, 1 << 20).await.unwrap();
        s.write(id, 0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
        let slot = s.inner.meta.lock().objects[&id].map.get(0).unwrap().slot;
        (s, id, slot)
    }

    /// What a process killed in the middle of an in-place write of block 0 of `slot` leaves:
    /// the new CRC is stored (before the data write), the data write never landed. Puts
    /// `old` back under a store that has been dropped.
    fn undo_data_write(dir: &Path, slot: u32, old: &[u8]) {
        use std::os::unix::fs::FileExt;
        let sb = recovery::read_superblock(dir).unwrap();
        let sps = sb.slots_per_segment();
        let foff = (slot % sps) as u64 * sb.chunk_size as u64;
        let seg = dir
            .join(recovery::SEGMENTS)
            .join(format!("{:08}.seg", slot / sps));
        let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        f.write_all_at(old, foff).unwrap();
    }

    /// A checkpoint whose rename happened but whose directory sync then failed: the new
    /// checkpoint is the one on disk, so the journal it names is the live one from then on.
    /// Appending to the old one (stale for the new checkpoint, deleted at open) lost the
    /// intent of a later in-place write, and a crash in that write left its block (flushed
    /// data, new CRC) a checksum error instead of healing it.
    #[tokio::test]
    async fn appends_after_a_checkpoint_whose_directory_sync_failed_are_not_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            checkpoint_bytes: 4096,
            ..StoreOptions::default()
        };
        let s = Store::open(tmp.path(), opts.clone()).await.unwrap();
        let id = ObjectId::new_v4();
        s.create_object(id, 16 << 20).await.unwrap();
        s.write(id, 0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
        let slot = slot_of(&s, id);
        // 128 new chunks: ~5 KiB of records, so this commit writes a checkpoint.
        s.write(id, 1 << 20, Bytes::from(vec![1u8; 8 << 20]), false)
            .await
            .unwrap();
        recovery::fault::arm(tmp.path(), "directory sync after a rename");
        assert!(s.flush().await.is_err(), "the injected failure is reported");
        // An in-place write: its region's intent goes to the journal first.
        s.write(id, 0, Bytes::from(vec![8u8; 4096]), false)
            .await
            .unwrap();
        assert!(s.inner.meta.lock().marked.contains(&region_of(slot)));
        drop(s); // killed before the data write landed:
        undo_data_write(tmp.path(), slot, &[7u8; 4096]);
        let s = Store::open(tmp.path(), opts).await.unwrap();
        assert_eq!(
            s.read(id, 0, 4096).await.unwrap(),
            vec![7u8; 4096],
            "the flushed block, healed"
        );
        assert_eq!(s.read(id, 1 << 20, 4096).await.unwrap(), vec![1u8; 4096]);
        s.close().await.unwrap();
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A process killed while it creates a journal (a checkpoint's, or the one every open
    /// starts with) left the file there, empty, under its final name: every later open
    /// refused the store ("has a bad header").
    #[tokio::test]
    async fn a_crash_while_a_journal_is_created_leaves_a_store_that_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            checkpoint_bytes: 4096,
            ..StoreOptions::default()
        };
        let s = Store::open(tmp.path(), opts.clone()).await.unwrap();
        let id = ObjectId::new_v4();
        s.create_object(id, 16 << 20).await.unwrap();
        s.write(id, 0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
        // 128 new chunks: this commit writes a checkpoint, and dies creating its journal
        // (after its batch is in the journal).
        s.write(id, 1 << 20, Bytes::from(vec![1u8; 8 << 20]), false)
            .await
            .unwrap();
        recovery::fault::arm(tmp.path(), "journal file created");
        assert!(s.flush().await.is_err());
        drop(s);
        let s = Store::open(tmp.path(), opts.clone()).await.unwrap();
        assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![7u8; 4096]);
        assert_eq!(s.read(id, 1 << 20, 4096).await.unwrap(), vec![1u8; 4096]);
        drop(s);
        // An open killed creating its fresh journal.
        recovery::fault::arm(tmp.path(), "journal file created");
        assert!(Store::open(tmp.path(), opts.clone()).await.is_err());
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let s = Store::open(tmp.path(), opts).await.unwrap();
        assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![7u8; 4096]);
        assert_eq!(s.read(id, 1 << 20, 4096).await.unwrap(), vec![1u8; 4096]);
        s.close().await.unwrap();
    }

    /// A process killed while it creates a segment's files (data, CRCs, previous CRCs) left
    /// a `.seg` without the files beside it, or one not yet full-sized: every later open
    /// refused the store, although no map referred to that segment yet.
    #[tokio::test]
    async fn a_crash_while_a_segment_is_created_leaves_a_store_that_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, id, _) = one_block_store_in(tmp.path()).await;
        s.resize(id, 2 << 20).await.unwrap();
        assert_eq!(s.stats().segments, 1);
        drop(s);
        // A write at 1 MiB allocates in the other lane, in segment 1, which it creates.
        for step in 0..3 {
            recovery::fault::arm_nth(tmp.path(), "segment file created", step);
            let s = Store::open(tmp.path(), StoreOptions::default())
                .await
                .unwrap_or_else(|e| panic!("killed at step {step}, reopened: {e}"));
            assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![7u8; 4096]);
            let e = s.write(id, 1 << 20, Bytes::from(vec![9u8; 4096]), false);
            let e = e.await.expect_err("the creation was cut short");
            assert!(e.to_string().contains("injected"), "step {step}: {e}");
            drop(s);
            let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
            assert!(report.is_clean(), "step {step}: {report:?}");
        }
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        s.write(id, 1 << 20, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(s.stats().segments, 2);
        s.close().await.unwrap();
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![7u8; 4096]);
        assert_eq!(s.read(id, 1 << 20, 4096).await.unwrap(), vec![9u8; 4096]);
        s.close().await.unwrap();
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean() && report.leaked_bytes == 0, "{report:?}");
    }

    /// A process killed while it creates a store (its first open) left the journal and the
    /// checkpoint without the superblock, which goes last; every later open refused the
    /// directory as a damaged store, and the daemon could not start again.
    #[tokio::test]
    async fn a_crash_while_a_store_is_created_leaves_a_directory_that_opens() {
        for (point, skip) in [
            ("journal file created", 0),
            ("directory sync after a rename", 0),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            recovery::fault::arm_nth(tmp.path(), point, skip);
            assert!(
                Store::open(tmp.path(), StoreOptions::default())
                    .await
                    .is_err()
            );
            let (s, id, _) = one_block_store_in(tmp.path()).await;
            assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![7u8; 4096]);
            s.close().await.unwrap();
        }
    }

    /// Power loss after one unflushed in-place rewrite of a flushed block. The CRC files are
    /// shared mappings, and the data a file of its own: until the next commit syncs them,
    /// the kernel writes back the dirty pages of each whenever it likes (and O_DIRECT data
    /// is on the device at once). So the disk may hold:
    /// - the new data, and neither CRC page: neither CRC on disk describes the block;
    /// - the old, flushed data, the new `.crc` page and the old `.pcrc` page: neither
    ///   describes it either.
    ///
    /// After a restart of the machine (another boot ID), recovery takes such a block of an
    /// intent region as written: it reads back old or new data, as a disk would. Without a
    /// restart the page cache outlived the process, the CRCs agree with the data as it left
    /// them, and the same image can only be damage: it stays a checksum error (found by
    /// review: both images read as checksum errors after any crash).
    #[tokio::test]
    async fn after_a_power_loss_a_block_rewritten_in_place_reads_old_or_new_data() {
        for (data_landed, restarted) in [(true, true), (false, true), (true, false), (false, false)]
        {
            let tmp = tempfile::tempdir().unwrap();
            let (s, id, slot) = one_block_store_in(tmp.path()).await;
            let seg = tmp.path().join(recovery::SEGMENTS);
            // What the commit synced: on disk until the kernel writes the pages back.
            let crc = std::fs::read(seg.join("00000000.crc")).unwrap();
            let pcrc = std::fs::read(seg.join("00000000.pcrc")).unwrap();
            // Rewritten in place: only its intent is durable (journal fdatasync).
            s.write(id, 0, Bytes::from(vec![8u8; 4096]), false)
                .await
                .unwrap();
            assert!(s.inner.meta.lock().marked.contains(&region_of(slot)));
            drop(s);
            // The image a power loss may leave.
            std::fs::write(seg.join("00000000.pcrc"), &pcrc).unwrap();
            if data_landed {
                std::fs::write(seg.join("00000000.crc"), &crc).unwrap();
            } else {
                undo_data_write(tmp.path(), slot, &[7u8; 4096]);
            }
            if restarted {
                std::fs::write(tmp.path().join(recovery::BOOT), "another boot\n").unwrap();
            }
            let pre = crate::store::fsck::fsck(tmp.path(), false).unwrap();
            assert_eq!(
                (pre.restart_blocks, pre.checksum_errors),
                if restarted { (1, 0) } else { (0, 1) },
                "{pre:?}"
            );
            let s = Store::open(tmp.path(), StoreOptions::default())
                .await
                .unwrap();
            let got = s.read(id, 0, 4096).await;
            let case = format!("data landed: {data_landed}, restarted: {restarted}: {got:?}");
            if restarted {
                let want: &[u8] = if data_landed {
                    &[8u8; 4096]
                } else {
                    &[7u8; 4096]
                };
                assert!(matches!(&got, Ok(b) if b[..] == *want), "{case}");
                assert_eq!(s.stats().healed_blocks, 1, "{case}");
            } else {
                assert!(matches!(got, Err(StoreError::Checksum { .. })), "{case}");
            }
            s.close().await.unwrap();
            let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
            assert_eq!(report.is_clean(), restarted, "{case}: {report:?}");
        }
    }

    /// Records logged while a commit takes a checkpoint (after the end it covers, before the
    /// new journal is live) are carried into the new journal: from its rename on, replay
    /// takes the old journal's uncovered records for carried. Killed before the checkpoint is
    /// replaced (the old checkpoint, the old journal and the new one on disk) or after it,
    /// every acknowledged write is there.
    #[tokio::test]
    async fn records_logged_during_a_checkpoint_are_carried_into_its_journal() {
        for killed_before_the_checkpoint in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let opts = StoreOptions {
                checkpoint_bytes: 4096,
                ..StoreOptions::default()
            };
            let s = Store::open(tmp.path(), opts.clone()).await.unwrap();
            let id = ObjectId::new_v4();
            s.create_object(id, 64 << 20).await.unwrap();
            // 128 new chunks: ~5 KiB of records, so the next commit takes a checkpoint.
            s.write(id, 0, Bytes::from(vec![1u8; 8 << 20]), false)
                .await
                .unwrap();
            let gate = recovery::fault::gate(tmp.path(), "checkpoint begins");
            if killed_before_the_checkpoint {
                recovery::fault::arm(tmp.path(), "checkpoint replaced");
            }
            let flush = tokio::spawn({
                let s = s.clone();
                async move { s.flush().await }
            });
            gate.reached.notified().await;
            // Logged after the end the commit covers.
            s.write(id, 16 << 20, Bytes::from(vec![2u8; 1 << 20]), false)
                .await
                .unwrap();
            s.discard(id, 4 << 20, 64 << 10, false).await.unwrap();
            gate.release.notify_one();
            let r = flush.await.unwrap();
            assert_eq!(r.is_err(), killed_before_the_checkpoint, "{r:?}");
            drop(s); // killed: no close
            let s = Store::open(tmp.path(), opts).await.unwrap();
            let case = format!("killed before the checkpoint: {killed_before_the_checkpoint}");
            let mut want = vec![1u8; 8 << 20];
            want[4 << 20..(4 << 20) + (64 << 10)].fill(0);
            assert!(s.read(id, 0, 8 << 20).await.unwrap() == want, "{case}");
            assert!(
                s.read(id, 16 << 20, 1 << 20).await.unwrap() == vec![2u8; 1 << 20],
                "{case}"
            );
            s.close().await.unwrap();
            let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
            assert!(
                report.is_clean() && report.leaked_bytes == 0,
                "{case}: {report:?}"
            );
        }
    }

    /// A process crash keeps every acknowledged write (the page cache outlived the process);
    /// after a restart of the machine only what a commit made durable counts: the writes
    /// logged since, whose pages a power loss may have lost, are dropped and their space
    /// returned, and nothing flushed is lost or reads as a checksum error. Here the page
    /// cache in fact kept everything, so a block rewritten in place reads its new data.
    #[tokio::test]
    async fn after_a_restart_only_commits_count_and_after_a_process_crash_everything_does() {
        for restarted in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let (s, id, _) = one_block_store_in(tmp.path()).await;
            s.write(id, 64 << 10, Bytes::from(vec![5u8; 4096]), false)
                .await
                .unwrap();
            s.write(id, 0, Bytes::from(vec![8u8; 4096]), false)
                .await
                .unwrap();
            drop(s);
            if restarted {
                std::fs::write(tmp.path().join(recovery::BOOT), "another boot\n").unwrap();
            }
            let pre = crate::store::fsck::fsck(tmp.path(), false).unwrap();
            assert!(pre.is_clean(), "{pre:?}");
            let s = Store::open(tmp.path(), StoreOptions::default())
                .await
                .unwrap();
            assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![8u8; 4096]);
            let fresh = s.read(id, 64 << 10, 4096).await.unwrap();
            let want = if restarted { 0u8 } else { 5 };
            assert_eq!(fresh, vec![want; 4096], "restarted: {restarted}");
            assert_eq!(
                s.object_info(id).unwrap().allocated_bytes,
                if restarted { 4096 } else { 8192 }
            );
            assert_eq!(s.stats().checksum_errors, 0);
            s.close().await.unwrap();
            let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
            assert!(report.is_clean() && report.leaked_bytes == 0, "{report:?}");
        }
    }

    /// An open that replayed writes no commit covered, killed after it made its new journal
    /// and before its checkpoint: the old journal has a successor now, so replay skips its
    /// uncovered records; open made them durable (segments synced, then a commit record in
    /// the old journal) before it made the new one.
    #[tokio::test]
    async fn an_open_killed_before_its_checkpoint_keeps_what_it_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, id, _) = one_block_store_in(tmp.path()).await;
        s.write(id, 64 << 10, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        drop(s);
        recovery::fault::arm(tmp.path(), "open's checkpoint");
        assert!(
            Store::open(tmp.path(), StoreOptions::default())
                .await
                .is_err()
        );
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(s.read(id, 64 << 10, 4096).await.unwrap(), vec![5u8; 4096]);
        assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![7u8; 4096]);
        s.close().await.unwrap();
    }

    /// An object creation whose commit never happened (the process killed during it),
    /// replayed by one open whose process is killed in turn: the next open must not apply the
    /// creation again over the checkpoint the first open wrote (found by review: open carried
    /// what it replayed into its new journal, and a later replay failed with "already
    /// exists", refusing the store).
    #[tokio::test]
    async fn what_an_open_replayed_is_not_replayed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, id, _) = one_block_store_in(tmp.path()).await;
        let other = ObjectId::new_v4();
        recovery::fault::arm(tmp.path(), "commit's segment sync");
        assert!(s.create_object(other, 1 << 20).await.is_err());
        s.write(id, 64 << 10, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        drop(s);
        for round in 0..2 {
            let s = Store::open(tmp.path(), StoreOptions::default())
                .await
                .unwrap_or_else(|e| panic!("open {round}: {e}"));
            assert!(s.object_info(other).is_ok(), "round {round}");
            assert_eq!(s.read(id, 64 << 10, 4096).await.unwrap(), vec![5u8; 4096]);
            drop(s); // killed again
        }
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A commit's record follows records logged after its end, intents among them: an
    /// intent announced after a clear of its region that the commit covers stays in force,
    /// or an in-place write after it could not be told from damage after a power loss.
    #[tokio::test]
    async fn an_intent_after_a_committed_clear_stays_in_force() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, _, slot) = one_block_store_in(tmp.path()).await;
        s.close().await.unwrap();
        let region = region_of(slot);
        let j = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("journal-")
            })
            .max()
            .unwrap();
        let mut raw = std::fs::read(&j).unwrap();
        let mut end = super::super::format::JOURNAL_HEADER;
        while let Some((_, n)) = Record::decode(&raw[end..]) {
            end += n;
        }
        let mut add = Vec::new();
        Record::IntentClear { region }.encode(&mut add);
        let covered = (end + add.len()) as u64;
        Record::Intent { region }.encode(&mut add);
        Record::CommitTo {
            seq: 99,
            end: covered,
        }
        .encode(&mut add);
        raw[end..end + add.len()].copy_from_slice(&add);
        std::fs::write(&j, &raw).unwrap();
        // After a restart: only what commits cover, and intents, count.
        std::fs::write(tmp.path().join(recovery::BOOT), "another boot\n").unwrap();
        let loaded = recovery::load(tmp.path()).unwrap();
        assert!(loaded.meta.marked.contains(&region));
        assert_eq!(loaded.commit_seq, 99);
    }

    /// A read that overlaps a write may find a block whose CRC does not match yet: it is
    /// retried holding its stripe, after the write, and is not a checksum error.
    #[tokio::test]
    async fn torn_read_is_retried_after_the_write() {
        let (_tmp, s, id, slot) = one_block_store().await;
        let (_, ci) = s.locate(slot, 0);
        let seg = s.seg_ref(slot).clone();
        let good = seg.crc(ci);
        // A write in flight: its stripe held, its CRC stored, its data not there yet.
        let write = s.lock_stripes(id, 0, 1, true).await;
        seg.set_crc(ci, !good);
        let read = tokio::spawn({
            let s = s.clone();
            async move { s.read(id, 0, 4096).await }
        });
        while !read.is_finished() && s.stats().read_retries == 0 {
            tokio::task::yield_now().await;
        }
        assert!(
            !read.is_finished(),
            "the read returned without waiting for the write"
        );
        seg.set_crc(ci, good);
        drop(write);
        assert_eq!(read.await.unwrap().unwrap(), vec![7u8; 4096]);
        let st = s.stats();
        assert_eq!((st.read_retries, st.checksum_errors), (1, 0));
        s.close().await.unwrap();
    }

    /// Blocks of a shared slot that lost their last holder are punched after the next
    /// commit; until then the slot's remaining holder copies up instead of writing in place,
    /// so the punch cannot land on its new data. After the commit it writes in place again.
    #[tokio::test]
    async fn slot_with_dead_blocks_is_copied_up_until_they_are_punched() {
        let (_tmp, s, a, slot) = one_block_store().await;
        let b = ObjectId::new_v4();
        s.write(a, 4096, Bytes::from(vec![8u8; 4096]), false)
            .await
            .unwrap();
        s.clone_object(a, b).await.unwrap();
        s.discard(a, 4096, 4096, false).await.unwrap();
        // `b` copies up: block 1 of `slot` now belongs to nobody.
        s.write(b, 0, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(slot_of(&s, a), slot);
        assert_eq!(s.inner.meta.lock().slots.punching.get(&slot), Some(&0b10));
        s.write(a, 4096, Bytes::from(vec![6u8; 4096]), false)
            .await
            .unwrap();
        let moved = slot_of(&s, a);
        assert_ne!(moved, slot, "wrote in place into a slot awaiting its punch");
        s.flush().await.unwrap();
        assert!(s.inner.meta.lock().slots.punching.is_empty());
        s.write(a, 8192, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(slot_of(&s, a), moved, "nothing pending: in place again");
        let mut want = vec![7u8; 4096];
        want.extend([6u8; 4096]);
        want.extend([5u8; 4096]);
        assert_eq!(s.read(a, 0, 3 * 4096).await.unwrap(), want);
        s.close().await.unwrap();
    }

    /// Reads hold no lock while they read, so the slots a delete frees must not be reused
    /// (or punched) until every read that planned before the delete has finished.
    #[tokio::test]
    async fn freed_slots_wait_for_reads_in_flight() {
        let (_tmp, s, id, slot) = one_block_store().await;
        let read_in_flight = s.inner.readers.enter();
        let delete = tokio::spawn({
            let s = s.clone();
            async move { s.delete_object(id).await }
        });
        // Until the delete either finishes or waits for the grace period.
        while !delete.is_finished() && !s.inner.readers.is_waiting() {
            tokio::task::yield_now().await;
        }
        assert!(
            !delete.is_finished(),
            "the delete's commit did not wait for a read in flight"
        );
        // The delete is logged (new reads find nothing) but its slot stays allocated.
        assert!(matches!(s.object_info(id), Err(StoreError::NotFound(_))));
        let used = |s: &Store| {
            let m = s.inner.meta.lock();
            m.slots.used[(slot / 64) as usize] & (1 << (slot % 64)) != 0
        };
        assert!(used(&s), "a freed slot was released under a read in flight");
        drop(read_in_flight);
        delete.await.unwrap().unwrap();
        assert!(!used(&s), "the slot was never released");
        s.close().await.unwrap();
    }

    fn slot_of(s: &Store, id: ObjectId) -> u32 {
        s.inner.meta.lock().objects[&id].map.get(0).unwrap().slot
    }

    /// A read through `a` planned on a slot it shares with its clone `b`. `a` copies the
    /// chunk up, so the slot keeps one holder, `b`, and is not freed (no grace period of
    /// its own). Writing it in place would put `b`'s data under `a`'s read: `b` copies up
    /// until a grace period begun after `a` left has passed, then writes in place again.
    /// Likewise a discard does not punch such a slot in place.
    #[tokio::test]
    async fn a_slot_a_holder_left_is_not_changed_in_place_under_its_reads() {
        let (_tmp, s, a, slot) = one_block_store().await;
        let b = ObjectId::new_v4();
        s.clone_object(a, b).await.unwrap();
        let read_through_a = s.inner.readers.enter();
        s.write(a, 4096, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        assert_ne!(slot_of(&s, a), slot, "a copied up");
        s.write(b, 0, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        let moved = slot_of(&s, b);
        assert_ne!(moved, slot, "b wrote in place under a read through a");
        drop(read_through_a);
        s.flush().await.unwrap();
        assert!(s.inner.meta.lock().slots.departed.is_empty());
        s.write(b, 4096, Bytes::from(vec![4u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(slot_of(&s, b), moved, "nothing pending: in place again");

        let c = ObjectId::new_v4();
        s.clone_object(b, c).await.unwrap();
        let read_through_c = s.inner.readers.enter();
        s.write(c, 8192, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        assert_ne!(slot_of(&s, c), moved, "c copied up");
        s.discard(b, 0, 4096, false).await.unwrap();
        let seg = s.seg_ref(moved).clone();
        assert_eq!(
            seg.crc(s.locate(moved, 0).1),
            crc32fast::hash(&[3u8; 4096]),
            "b punched in place under a read through c"
        );
        drop(read_through_c);
        s.flush().await.unwrap();
        {
            let m = s.inner.meta.lock();
            assert!(m.slots.departed.is_empty() && m.slots.punching.is_empty());
        }
        let mut want = vec![0u8; 4096];
        want.extend([4u8; 4096]);
        assert_eq!(s.read(b, 0, 8192).await.unwrap(), want);
        let mut want = vec![7u8; 4096];
        want.extend([2u8; 4096]);
        assert_eq!(s.read(a, 0, 8192).await.unwrap(), want);
        let mut want = vec![3u8; 4096];
        want.extend([4u8; 4096]);
        want.extend([5u8; 4096]);
        assert_eq!(s.read(c, 0, 3 * 4096).await.unwrap(), want);
        s.close().await.unwrap();
    }

    /// Shared chunks read the same through both objects at their own places, cost no space,
    /// part on either side's write, outlive their source and a reopen; a share into mapped
    /// space, past an end or into itself is refused with nothing changed.
    #[tokio::test]
    async fn shared_chunks_read_alike_cost_nothing_and_part_on_write() {
        let (tmp, s, a, _) = one_block_store().await; // 7s in a's block 0, 1 MiB
        let ck = 64 << 10;
        s.write(a, ck + 8192, Bytes::from(vec![8u8; 4096]), false)
            .await
            .unwrap();
        s.write(a, 3 * ck, Bytes::from(vec![9u8; ck as usize]), false)
            .await
            .unwrap();
        let b = ObjectId::new_v4();
        s.create_object(b, 8 * ck).await.unwrap();
        s.write(b, 0, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        let before = s.stats().physical_bytes;
        s.share_chunks(a, b, &[(0, 2, 3), (3, 5, 1)]).await.unwrap();
        assert_eq!(s.stats().physical_bytes, before, "sharing wrote no data");
        let want_a = s.read(a, 0, 4 * ck as usize).await.unwrap();
        let expect = |s: &Store| {
            let s = s.clone();
            let want_a = want_a.clone();
            async move {
                assert_eq!(s.read(b, 2 * ck, 4 * ck as usize).await.unwrap(), want_a);
                assert_eq!(s.read(b, 0, 4096).await.unwrap(), vec![1u8; 4096]);
                let tail = s.read(b, 6 * ck, 2 * ck as usize).await.unwrap();
                assert_eq!(tail, vec![0u8; 2 * ck as usize]);
            }
        };
        expect(&s).await;
        let holes: Vec<_> = s
            .extents(b, 2 * ck, 4 * ck)
            .unwrap()
            .into_iter()
            .filter(|e| !e.allocated)
            .map(|e| (e.offset, e.length))
            .collect();
        assert!(
            holes.iter().any(|&(o, l)| o <= 4 * ck && o + l >= 5 * ck),
            "a's hole stays one: {holes:?}"
        );

        for (src, sc, dst, dc, n) in [
            (a, 0, b, 2, 1),
            (a, 14, b, 6, 4),
            (a, 0, a, 8, 1),
            (a, 3, b, 7, 1), // the same destination chunk as the first run
        ] {
            assert!(
                matches!(
                    s.share_chunks(src, dst, &[(1, 7, 1), (sc, dc, n)]).await,
                    Err(StoreError::Invalid(_))
                ),
                "{sc} -> {dc} x {n}"
            );
        }
        expect(&s).await;

        // Writes on either side stay on their side.
        s.write(a, 0, Bytes::from(vec![5u8; 4096]), false)
            .await
            .unwrap();
        s.write(b, 5 * ck, Bytes::from(vec![6u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(s.read(b, 2 * ck, 4096).await.unwrap(), vec![7u8; 4096]);
        assert_eq!(s.read(a, 3 * ck, 4096).await.unwrap(), vec![9u8; 4096]);
        s.write(a, 0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        s.write(b, 5 * ck, Bytes::from(vec![9u8; 4096]), false)
            .await
            .unwrap();
        expect(&s).await;

        s.delete_object(a).await.unwrap();
        expect(&s).await;
        s.close().await.unwrap();
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        expect(&s).await;
        s.close().await.unwrap();
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A destination's partial last chunk takes a source chunk only if the source has no
    /// data in the blocks that reach past the destination's end: otherwise growing the
    /// destination would show them, and they would count as its allocation.
    #[tokio::test]
    async fn a_share_into_a_partial_last_chunk_brings_nothing_past_the_end() {
        let (tmp, s, a, _) = one_block_store().await; // 7s in a's block 0
        let ck = 64 << 10;
        s.write(a, ck + 9 * 4096, Bytes::from(vec![8u8; 4096]), false)
            .await
            .unwrap();
        // b ends 100 bytes into block 9 of its chunk 1: blocks 0..9 of it are whole.
        let b = ObjectId::new_v4();
        let b_size = ck + 9 * 4096 + 100;
        s.create_object(b, b_size).await.unwrap();
        for run in [(1, 1, 1), (0, 0, 2)] {
            assert!(
                matches!(
                    s.share_chunks(a, b, &[run]).await,
                    Err(StoreError::Invalid(_))
                ),
                "{run:?}"
            );
        }
        assert_eq!(s.object_info(b).unwrap().allocated_bytes, 0);
        // a's chunk 0 has only block 0: it fits.
        s.share_chunks(a, b, &[(0, 1, 1)]).await.unwrap();
        assert_eq!(s.object_info(b).unwrap().allocated_bytes, 4096);
        s.resize(b, 2 * ck).await.unwrap();
        let mut want = vec![7u8; 4096];
        want.resize(ck as usize, 0);
        assert_eq!(s.read(b, ck, ck as usize).await.unwrap(), want);
        s.close().await.unwrap();
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A grown clone shares the source's blocks, reads zeros past them, survives a reopen,
    /// and a clone smaller than its source is refused with nothing made.
    #[tokio::test]
    async fn a_grown_clone_reads_its_source_then_zeros() {
        let (tmp, s, a, _) = one_block_store().await;
        let b = ObjectId::new_v4();
        s.clone_object_grown(a, b, 1 << 40).await.unwrap();
        assert_eq!(s.object_info(b).unwrap().size, 1 << 40);
        assert_eq!(s.stats().physical_bytes, 4096);
        let c = ObjectId::new_v4();
        assert!(matches!(
            s.clone_object_grown(a, c, 4096).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(s.object_info(c), Err(StoreError::NotFound(_))));
        s.close().await.unwrap();
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(s.object_info(b).unwrap().size, 1 << 40);
        assert_eq!(s.read(b, 0, 4096).await.unwrap(), vec![7u8; 4096]);
        assert_eq!(s.read(b, 1 << 20, 4096).await.unwrap(), vec![0u8; 4096]);
        assert_eq!(
            s.read(b, (1 << 40) - 4096, 4096).await.unwrap(),
            vec![0u8; 4096]
        );
        assert_eq!(s.object_info(a).unwrap().size, 1 << 20);
        s.close().await.unwrap();
    }

    /// A delete whose object shares everything with a clone frees nothing, but a read of
    /// the deleted object may still be in flight: the clone copies up rather than writing
    /// in place until the delete's grace period is over, and the delete waits for it.
    #[tokio::test]
    async fn a_clone_does_not_write_in_place_under_reads_of_a_deleted_source() {
        let (tmp, s, a, slot) = one_block_store().await;
        let b = ObjectId::new_v4();
        s.clone_object(a, b).await.unwrap();
        let read_of_a = s.inner.readers.enter();
        let delete = tokio::spawn({
            let s = s.clone();
            async move { s.delete_object(a).await }
        });
        while !delete.is_finished() && !s.inner.readers.is_waiting() {
            tokio::task::yield_now().await;
        }
        assert!(
            !delete.is_finished(),
            "the delete did not wait for the read"
        );
        assert!(matches!(s.object_info(a), Err(StoreError::NotFound(_))));
        s.write(b, 0, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        assert_ne!(slot_of(&s, b), slot, "b wrote in place under a read of a");
        assert_eq!(s.stats().physical_bytes, 2 * 4096);
        drop(read_of_a);
        delete.await.unwrap().unwrap();
        // The deleted map is gone and with it the last holder of the old slot.
        assert_eq!(s.stats().physical_bytes, 4096);
        assert!(s.inner.meta.lock().graveyard.is_empty());
        assert_eq!(s.read(b, 0, 4096).await.unwrap(), vec![3u8; 4096]);
        s.close().await.unwrap();
        let report = crate::store::fsck::fsck(tmp.path(), false).unwrap();
        assert!(
            report.errors.is_empty() && report.leaked_bytes == 0,
            "{report:?}"
        );
    }

    /// A discard whose hole punch fails is an error and changes nothing: the blocks keep
    /// their data and read back without a checksum error.
    #[tokio::test]
    async fn a_failed_punch_leaves_the_blocks_readable() {
        let (_tmp, s, id, _) = one_block_store().await;
        s.write(id, 4096, Bytes::from(vec![8u8; 4096]), false)
            .await
            .unwrap();
        s.inner.fail_punches.store(true, Ordering::Relaxed);
        assert!(s.discard(id, 0, 4096, false).await.is_err());
        s.inner.fail_punches.store(false, Ordering::Relaxed);
        let mut want = vec![7u8; 4096];
        want.extend([8u8; 4096]);
        assert_eq!(s.read(id, 0, 8192).await.unwrap(), want);
        assert_eq!(s.stats().checksum_errors, 0);
        s.discard(id, 0, 4096, false).await.unwrap();
        assert_eq!(s.read(id, 0, 4096).await.unwrap(), vec![0u8; 4096]);
        s.close().await.unwrap();
    }

    /// A grave released by a reclaim dates the departures it causes back to that reclaim's
    /// commit, which ends them. A departure of the same slot made after that commit (a read
    /// through `b` may be reading it) must keep its own date and outlive the release.
    #[tokio::test]
    async fn a_graves_release_does_not_end_a_later_departure() {
        let (_tmp, s, a, slot) = one_block_store().await;
        let chunk = s.inner.sb.chunk_size as u64;
        let (b, c) = (ObjectId::new_v4(), ObjectId::new_v4());
        s.clone_object(a, b).await.unwrap();
        s.clone_object(a, c).await.unwrap();
        // `a` gets a leaf of its own: `slot` is held by a's leaf and the one b and c share.
        s.write(a, chunk, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
        let refs = |s: &Store| s.inner.meta.lock().slots.refcnt[slot as usize];
        assert_eq!(refs(&s), 2);
        let earlier_read = s.inner.readers.enter();
        let delete = tokio::spawn({
            let s = s.clone();
            async move { s.delete_object(a).await }
        });
        while !s.inner.readers.is_waiting() {
            tokio::task::yield_now().await;
        }
        // The delete's commit holds a's map for release after its grace period. A read
        // through `b` plans on `slot`, then `b` copies chunk 0 up.
        let read_through_b = s.inner.readers.enter();
        s.write(b, 4096, Bytes::from(vec![2u8; 4096]), false)
            .await
            .unwrap();
        assert_ne!(slot_of(&s, b), slot);
        drop(earlier_read);
        // Until the release: `slot` is then held by c's leaf alone.
        while refs(&s) != 1 {
            tokio::task::yield_now().await;
        }
        assert!(s.inner.meta.lock().slots.departed.contains_key(&slot));
        s.write(c, 0, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        assert_ne!(
            slot_of(&s, c),
            slot,
            "c wrote in place under a read through b"
        );
        drop(read_through_b);
        delete.await.unwrap().unwrap();
        assert_eq!(s.read(c, 0, 4096).await.unwrap(), vec![3u8; 4096]);
        assert_eq!(s.read(b, 0, 4096).await.unwrap(), vec![7u8; 4096]);
        s.close().await.unwrap();
    }
}
