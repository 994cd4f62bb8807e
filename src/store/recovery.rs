//! Opening a store from disk: the lock, the superblock, the checkpoint and the journals.
//! Loading is read-only so that `fsck` can use it on a store it must not change.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::format::{self, JOURNAL_HEADER, Record, Superblock};
use super::meta::Meta;
use super::{Result, StoreError};

pub const SUPERBLOCK: &str = "superblock";
pub const CHECKPOINT: &str = "checkpoint";
pub const LOCK: &str = "LOCK";
pub const SEGMENTS: &str = "segments";
/// The boot ID of the machine when the store was last opened for writing.
pub const BOOT: &str = "boot";

/// Fault injection for tests: [`fault::arm`] makes the next pass through a named point, for
/// a store under a given directory, fail there. A point stands either for a step that fails
/// (the caller carries on with the error) or for a process killed at that step: the error
/// then cuts everything after it short, cleanup included, and the test drops the store at once.
#[cfg(test)]
pub(super) mod fault {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// (directory, point, passes to let through first)
    static ARMED: Mutex<Vec<(PathBuf, &'static str, u32)>> = Mutex::new(Vec::new());

    pub fn arm(dir: &Path, point: &'static str) {
        arm_nth(dir, point, 0);
    }

    /// Fail the pass through `point` after `skip` others.
    pub fn arm_nth(dir: &Path, point: &'static str, skip: u32) {
        ARMED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((dir.to_path_buf(), point, skip));
    }

    /// Whether `e` is an injected fault (a killed process cleans nothing up).
    pub fn injected(e: &io::Error) -> bool {
        e.to_string().starts_with("injected fault at ")
    }

    /// A place where the store waits for the test: it says when it got there (`reached`) and
    /// goes on once released (`release`).
    #[derive(Default)]
    pub struct Gate {
        pub reached: tokio::sync::Notify,
        pub release: tokio::sync::Notify,
    }

    type Gates = Vec<(PathBuf, &'static str, std::sync::Arc<Gate>)>;
    static GATES: Mutex<Gates> = Mutex::new(Vec::new());

    /// Make the next pass through `point`, for a store under `dir`, wait at a gate.
    pub fn gate(dir: &Path, point: &'static str) -> std::sync::Arc<Gate> {
        let g = std::sync::Arc::new(Gate::default());
        GATES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((dir.to_path_buf(), point, g.clone()));
        g
    }

    /// Wait at `point` if a gate is set there for a directory that holds `path`.
    pub async fn pass(path: &Path, point: &'static str) {
        let gate = {
            let mut gates = GATES.lock().unwrap_or_else(|e| e.into_inner());
            gates
                .iter()
                .position(|(d, p, _)| *p == point && path.starts_with(d))
                .map(|i| gates.remove(i).2)
        };
        if let Some(g) = gate {
            g.reached.notify_one();
            g.release.notified().await;
        }
    }

    /// Fail once if `point` is armed for a directory that holds `path`.
    pub fn point(path: &Path, point: &'static str) -> io::Result<()> {
        let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
        match armed
            .iter()
            .position(|(d, p, _)| *p == point && path.starts_with(d))
        {
            Some(i) if armed[i].2 > 0 => {
                armed[i].2 -= 1;
                Ok(())
            }
            Some(i) => {
                armed.remove(i);
                Err(io::Error::other(format!("injected fault at {point}")))
            }
            None => Ok(()),
        }
    }
}

pub fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation:016}"))
}

/// Hold an exclusive advisory lock on the store for the life of the returned file.
pub fn lock(dir: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK))?;
    // SAFETY: flock on a descriptor we own; the result is checked.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        return Err(e.into());
    }
    Ok(f)
}

/// This boot of the machine (Linux's random boot ID), if the kernel says.
pub fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Whether the machine may have restarted since the store was last opened for writing: the
/// boot recorded then is not this one, or either is unknown. A process crash leaves the page
/// cache, so a block and its CRCs agree as the process left them; a restart (power loss,
/// kernel crash) keeps only what writeback had put on disk, each file on its own.
pub fn restarted_since_open(dir: &Path) -> bool {
    let recorded = fs::read_to_string(dir.join(BOOT)).ok();
    match (recorded, boot_id()) {
        (Some(r), Some(now)) => r.trim() != now,
        _ => true,
    }
}

/// Record this boot (durably), before anything is written in this session.
pub fn record_boot(dir: &Path) -> io::Result<()> {
    let id = boot_id().unwrap_or_default();
    if fs::read_to_string(dir.join(BOOT)).is_ok_and(|r| r.trim() == id && !id.is_empty()) {
        return Ok(());
    }
    write_atomic(dir, BOOT, format!("{id}\n").as_bytes())
}

/// A sync failed: what was not written back may be gone from the page cache as well, as
/// after a power loss, so the next open must judge the store as after a restart (only commits
/// count, and blocks that match neither CRC are torn writes, not damage). Forgetting the boot
/// makes it do so.
pub fn forget_boot(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(BOOT)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `name` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    replace_file(dir, name, data)?;
    sync_dir_after_rename(dir)
}

/// The directory sync that makes a rename durable.
pub fn sync_dir_after_rename(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    fault::point(dir, "directory sync after a rename")?;
    sync_dir(dir)
}

/// Replace `name` by `data`: temp file, fsync, rename. Not durable until the directory is
/// synced; once this returns, a crash may find either version.
pub fn replace_file(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))
}

pub fn read_superblock(dir: &Path) -> Result<Superblock> {
    let mut raw = Vec::new();
    File::open(dir.join(SUPERBLOCK))?
        .take(4096)
        .read_to_end(&mut raw)?;
    Superblock::decode(&raw).map_err(|error| StoreError::Format {
        path: dir.to_path_buf(),
        error,
    })
}

/// Create the files of a new, empty store. Refuses a directory that holds store files
/// without a superblock: that is a damaged store, not an empty one.
pub fn create(dir: &Path, chunk_size: u32) -> Result<Superblock> {
    let mut leftovers = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        if name == LOCK {
            continue;
        }
        if !creation_leftover(dir, &name)? {
            return Err(StoreError::Damaged(format!(
                "{} has no superblock but is not empty ({}); refusing to create a store over it",
                dir.display(),
                name.to_string_lossy()
            )));
        }
        if name != SEGMENTS {
            leftovers.push(dir.join(name));
        }
    }
    if !leftovers.is_empty() {
        tracing::info!(dir = %dir.display(), "a store creation was cut short; creating it again");
        for path in leftovers {
            fs::remove_file(path)?;
        }
    }
    if !chunk_size.is_power_of_two()
        || !(format::MIN_CHUNK..=format::MAX_CHUNK).contains(&chunk_size)
    {
        return Err(StoreError::Invalid(format!(
            "chunk size {chunk_size} must be a power of two in {}..={}",
            format::MIN_CHUNK,
            format::MAX_CHUNK
        )));
    }
    let sb = Superblock::new(chunk_size);
    fs::create_dir_all(dir.join(SEGMENTS))?;
    let meta = Meta::new(sb.chunk_size, sb.slots_per_segment());
    // The first open replaces it at once; no room needed.
    create_journal(dir, 1, &sb, &[], 0)?;
    write_atomic(dir, CHECKPOINT, &meta.encode_checkpoint(1, 0))?;
    // The superblock goes last: its presence means the store is complete.
    write_atomic(dir, SUPERBLOCK, &sb.encode())?;
    Ok(sb)
}

/// Whether `name` in `dir`, which has no superblock, is what a [`create`] cut short by a
/// crash leaves: an empty segment directory, journal 1, a checkpoint that names journal 1 and
/// holds no object, temporary files. Nothing was ever stored there: the superblock goes last,
/// and the first open replaces journal 1 and that checkpoint. Such a directory is made into a
/// store again; refusing it (as a damaged store) left a daemon killed in its first start
/// unable to start again. Anything else is refused.
fn creation_leftover(dir: &Path, name: &std::ffi::OsStr) -> Result<bool> {
    let Some(name) = name.to_str() else {
        return Ok(false);
    };
    let path = dir.join(name);
    if name == SEGMENTS {
        return Ok(path.is_dir() && fs::read_dir(&path)?.next().is_none());
    }
    if name == CHECKPOINT {
        let raw = fs::read(&path)?;
        let mut meta = Meta::new(format::DEFAULT_CHUNK, 1 << 14);
        return Ok(matches!(meta.decode_checkpoint(&raw), Ok((1, 0))) && meta.objects.is_empty());
    }
    let journal_1 = journal_path(dir, 1);
    let journal_1 = journal_1.file_name().and_then(|n| n.to_str()).unwrap_or("");
    Ok(name == journal_1
        || name
            .strip_suffix(".tmp")
            .is_some_and(|base| base == journal_1 || base == CHECKPOINT || base == SUPERBLOCK))
}

/// A journal made by [`make_journal`], not yet in place.
pub struct NewJournal {
    pub file: File,
    /// Its temporary name (not a journal name to `list_journals`: the generation does not
    /// parse).
    pub tmp: PathBuf,
    pub path: PathBuf,
    /// End of its records.
    pub len: usize,
}

/// Make journal `generation` holding `records`, `capacity` bytes long with its blocks
/// allocated, synced, under a temporary name: a journal whose creation a crash cut short
/// would otherwise be there incomplete, and open refuses a journal without a valid header.
pub fn make_journal(
    dir: &Path,
    generation: u64,
    sb: &Superblock,
    records: &[u8],
    capacity: usize,
) -> io::Result<NewJournal> {
    let mut buf = format::encode_journal_header(generation, sb.store_id).to_vec();
    buf.extend_from_slice(records);
    let path = journal_path(dir, generation);
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    #[cfg(test)]
    fault::point(dir, "journal file created")?;
    f.write_all(&buf)?;
    super::tail::allocate(&f, capacity.max(buf.len()) as u64)?;
    f.sync_all()?;
    Ok(NewJournal {
        file: f,
        tmp,
        path,
        len: buf.len(),
    })
}

/// [`make_journal`], renamed into place and the directory synced.
pub fn create_journal(
    dir: &Path,
    generation: u64,
    sb: &Superblock,
    records: &[u8],
    capacity: usize,
) -> io::Result<NewJournal> {
    let j = make_journal(dir, generation, sb, records, capacity)?;
    fs::rename(&j.tmp, &j.path)?;
    sync_dir(dir)?;
    Ok(j)
}

#[derive(Debug)]
pub struct JournalInfo {
    pub generation: u64,
    pub path: PathBuf,
    /// Records that no commit covers (logged since the last flush).
    pub pending: u64,
    /// Whether those were replayed (see [`Pending`]).
    pub replayed: bool,
    /// End of its last intact record.
    pub valid_end: u64,
    /// Bytes other than the zeros of its preallocated end after the last intact record: a
    /// record cut short, or pages of it a power loss did not write back.
    pub torn_bytes: u64,
}

/// What replay does with the records of the last journal that no commit covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// The process stopped but the machine did not: the page cache held every record logged
    /// before a write was acknowledged, with the data it refers to. Replayed.
    Replay,
    /// The machine restarted: only what a commit made durable counts. Dropped. (Also for a
    /// journal written before records were logged as they went, format 2, whose uncovered
    /// records are a torn last append.)
    Drop,
}

impl Pending {
    /// The rule for the store in `dir`, as it is on disk now.
    pub fn for_store(dir: &Path) -> Pending {
        if restarted_since_open(dir) {
            Pending::Drop
        } else {
            Pending::Replay
        }
    }
}

/// Drop the clean cached pages of `file`. After a restart the cache is empty anyway; after a
/// failed sync (which makes open judge the store as after a restart) it may hold pages that
/// Linux marked clean although they never reached the disk, and recovery must read the disk.
pub fn drop_cached(file: &File) {
    // SAFETY: an advisory call on a descriptor we own; it touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        tracing::debug!(errno = rc, "posix_fadvise(DONTNEED) refused");
    }
}

/// Append a commit record covering everything before byte `end` of the journal at `path`
/// (where its intact records end), and sync it: open makes what it replayed durable this
/// way once it has synced the segments, rather than carrying it into its new journal, where
/// a later replay would apply it again on top of the checkpoint that already holds it.
pub fn commit_in_place(path: &Path, end: u64, seq: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut rec = Vec::new();
    Record::CommitTo { seq, end }.encode(&mut rec);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| with_path(e, path))?;
    f.write_all_at(&rec, end)?;
    f.sync_data()
}

pub struct Loaded {
    pub sb: Superblock,
    pub meta: Meta,
    pub commit_seq: u64,
    pub journals: Vec<JournalInfo>,
    pub stale_journals: Vec<PathBuf>,
    /// Named like an old journal but with another store's (or no valid) header: kept.
    pub foreign_journals: Vec<PathBuf>,
    pub segments: u32,
}

/// Whether the file at `path` starts with the header of journal `generation` of store `id`.
fn journal_header_is(path: &Path, generation: u64, id: uuid::Uuid) -> Result<bool> {
    let mut head = Vec::with_capacity(JOURNAL_HEADER);
    fs::File::open(path)
        .and_then(|f| f.take(JOURNAL_HEADER as u64).read_to_end(&mut head))
        .map_err(|e| with_path(e, path))?;
    Ok(format::decode_journal_header(&head) == Some((generation, id)))
}

fn list_journals(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(g) = name
            .strip_prefix("journal-")
            .and_then(|g| g.parse::<u64>().ok())
        {
            out.push((g, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub fn count_segments(dir: &Path) -> Result<u32> {
    let mut idx = Vec::new();
    for e in fs::read_dir(dir.join(SEGMENTS))? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(i) = name
            .strip_suffix(".seg")
            .and_then(|i| i.parse::<u32>().ok())
        {
            idx.push(i);
        }
    }
    idx.sort();
    for (want, have) in idx.iter().enumerate() {
        if *have != want as u32 {
            return Err(StoreError::Damaged(format!(
                "segment file {want:08}.seg is missing"
            )));
        }
    }
    Ok(idx.len() as u32)
}

/// In `tail`, the bytes of a journal after the record where replay stopped: an intact commit
/// record (at any offset) more than one past `last`, the last commit replayed, as (offset,
/// sequence). What was not yet synced when a crash came holds at most one commit record
/// (`last` + 1: the next is written only once that one is durable), so such a record means
/// the journal was damaged before commits that were durable, and taking the damage for a
/// torn tail would drop them (and punch their data as unreferenced).
fn commit_after_tear(tail: &[u8], last: u64) -> Option<(usize, u64)> {
    const SHORTEST: usize = format::RECORD_HEADER + 8;
    (1..tail.len().saturating_sub(SHORTEST - 1)).find_map(|i| {
        let at = &tail[i..];
        // Cheap filter first: payload length 8 and type 9, or 16 and type 10.
        let len = u32::from_le_bytes(at[..4].try_into().ok()?);
        if !matches!((len, at[8]), (8, 9) | (16, 10)) {
            return None;
        }
        match Record::decode(at) {
            Some((Record::Commit { seq } | Record::CommitTo { seq, .. }, _))
                if seq > last.saturating_add(1) =>
            {
                Some((i, seq))
            }
            _ => None,
        }
    })
}

/// Load the committed state: checkpoint plus every committed journal batch after it.
pub fn load(dir: &Path) -> Result<Loaded> {
    let sb = read_superblock(dir)?;
    let path = dir.join(CHECKPOINT);
    let raw = fs::read(&path).map_err(|e| with_path(e, &path))?;
    let mut meta = Meta::new(sb.chunk_size, sb.slots_per_segment());
    let (next_gen, mut commit_seq) = meta.decode_checkpoint(&raw)?;
    let segments = count_segments(dir)?;
    // Every slot the metadata names must lie in a segment file. Checked before anything is
    // counted: slot tables are sized by the highest slot (u32::MAX overflowed, and a slot
    // near it allocated tens of GiB).
    let total = segments as u64 * sb.slots_per_segment() as u64;
    let total = u32::try_from(total).map_err(|_| {
        StoreError::Damaged(format!(
            "{segments} segment files are more than slots can address"
        ))
    })?;
    if let Some(slot) = meta.slot_beyond(total) {
        return Err(StoreError::Damaged(format!(
            "checkpoint: a map references slot {slot} but only {segments} segment files exist"
        )));
    }
    meta.derive_slots(total);
    // A record naming a slot (or an intent region) past the segment files.
    let beyond = |rec: &Record| match *rec {
        Record::SetEntry { slot, .. } if slot >= total => Some(format!("slot {slot}")),
        Record::Intent { region } | Record::IntentClear { region }
            if region as u64 * format::REGION_SLOTS as u64 >= total as u64 =>
        {
            Some(format!("intent region {region}"))
        }
        _ => None,
    };

    let pending_rule = Pending::for_store(dir);
    let live: Vec<(u64, PathBuf)> = list_journals(dir)?;
    let last_live = live.iter().map(|(g, _)| *g).max();
    let mut journals = Vec::new();
    let mut stale = Vec::new();
    let mut foreign = Vec::new();
    let mut expect = next_gen;
    for (g, path) in live {
        if g < next_gen {
            // Deleted at open, so only when it is this store's: a file that merely has a
            // journal's name (copied in by hand, from another store) is left alone.
            if journal_header_is(&path, g, sb.store_id)? {
                stale.push(path);
            } else {
                foreign.push(path);
            }
            continue;
        }
        if g != expect {
            return Err(StoreError::Damaged(format!(
                "journal generation {expect} is missing (found {g})"
            )));
        }
        expect += 1;
        if pending_rule == Pending::Drop {
            drop_cached(&File::open(&path).map_err(|e| with_path(e, &path))?);
        }
        let data = fs::read(&path)?;
        match format::decode_journal_header(&data) {
            Some((hg, id)) if hg == g && id == sb.store_id => {}
            _ => {
                return Err(StoreError::Damaged(format!(
                    "{} has a bad header",
                    path.display()
                )));
            }
        }
        let damaged = |what: String| StoreError::Damaged(format!("{}: {what}", path.display()));
        let out_of_range = |rec: &Record| {
            beyond(rec).map_or(Ok(()), |what| {
                Err(damaged(format!(
                    "a record names {what}, but only {segments} segment files exist"
                )))
            })
        };
        let apply =
            |meta: &mut Meta, rec: &Record| meta.apply(rec).map_err(|e| damaged(e.to_string()));
        // Records in file order, with where each starts, until a commit covers them. Intents
        // take effect at once and stay queued: a commit that covers an earlier IntentClear
        // of the same region must not undo an intent announced after that clear.
        let mut queue: std::collections::VecDeque<(usize, Record)> = Default::default();
        let mut off = JOURNAL_HEADER;
        while let Some((rec, n)) = Record::decode(&data[off..]) {
            let at = off;
            off += n;
            out_of_range(&rec)?;
            let end = match rec {
                Record::Intent { .. } => {
                    apply(&mut meta, &rec)?;
                    queue.push_back((at, rec));
                    continue;
                }
                Record::Commit { .. } => at,
                Record::CommitTo { end, .. } if end <= at as u64 => end as usize,
                Record::CommitTo { end, .. } => {
                    return Err(damaged(format!(
                        "the commit at byte {at} covers records up to byte {end}, after itself"
                    )));
                }
                other => {
                    queue.push_back((at, other));
                    continue;
                }
            };
            while queue.front().is_some_and(|(a, _)| *a < end) {
                let (_, r) = queue.pop_front().expect("checked");
                apply(&mut meta, &r)?;
            }
            for (_, r) in &queue {
                if matches!(r, Record::Intent { .. }) {
                    apply(&mut meta, r)?;
                }
            }
            apply(&mut meta, &rec)?;
            commit_seq = meta.commit_seq;
        }
        if let Some((at, seq)) = commit_after_tear(&data[off..], commit_seq) {
            return Err(damaged(format!(
                "the record at byte {off} is damaged, and commit {seq} follows it intact at \
                 byte {}: not a torn tail",
                off + at
            )));
        }
        // A journal with a successor carried these into it when the successor was made.
        let replay = pending_rule == Pending::Replay
            && Some(g) == last_live
            && format::journal_version(&data) >= format::FORMAT_VERSION;
        let pending = queue
            .iter()
            .filter(|(_, r)| !matches!(r, Record::Intent { .. }))
            .count() as u64;
        if replay {
            for (_, r) in &queue {
                apply(&mut meta, r)?;
            }
        }
        journals.push(JournalInfo {
            generation: g,
            path,
            pending,
            replayed: replay,
            valid_end: off as u64,
            torn_bytes: data[off..].iter().filter(|&&b| b != 0).count() as u64,
        });
    }
    // Journal `next_gen` is made (and synced) before any checkpoint naming it is renamed into
    // place, and outlives it: without it, committed changes since the checkpoint are lost,
    // and the space they wrote would look unreferenced (and be punched at open).
    if journals.is_empty() {
        return Err(StoreError::Damaged(format!(
            "journal generation {next_gen} is missing (the checkpoint names it)"
        )));
    }
    // Derive sharing afresh from the final maps (replay queued punches it will not do),
    // so that leak reclaim at open misses nothing.
    meta.derive_slots(total);
    if meta.slots_needed() > total {
        return Err(StoreError::Damaged(format!(
            "maps reference slot {} but only {segments} segment files exist",
            meta.slots_needed() - 1
        )));
    }
    meta.slots.freed.clear();
    Ok(Loaded {
        sb,
        meta,
        commit_seq,
        journals,
        stale_journals: stale,
        foreign_journals: foreign,
        segments,
    })
}

/// Byte ranges of a segment file that hold data the maps do not reference: whole free
/// slots and non-live blocks of used slots. Found with SEEK_DATA/SEEK_HOLE.
pub fn scan_leaks(
    file: &File,
    seg: u32,
    sb: &Superblock,
    meta: &Meta,
) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let sps = sb.slots_per_segment() as u64;
    let bpc = sb.blocks_per_chunk() as u64;
    let end = sb.segment_bytes;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < end {
        // SAFETY: lseek on our own descriptor; results checked.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (a, b) = (
            data as u64 / format::BLOCK as u64,
            (hole as u64).div_ceil(format::BLOCK as u64),
        );
        for blk in a..b.min(end / format::BLOCK as u64) {
            let slot = (seg as u64 * sps + blk / bpc) as usize;
            let live = if meta.slots.refcnt.get(slot).copied().unwrap_or(0) > 0 {
                meta.slots.live[slot]
            } else {
                0
            };
            if live & (1 << (blk % bpc)) == 0 {
                let off = blk * format::BLOCK as u64;
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += format::BLOCK as u64,
                    _ => out.push((off, format::BLOCK as u64)),
                }
            }
        }
        pos = hole as u64;
    }
    Ok(out)
}

pub fn punch(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on our own descriptor; result checked.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The error with the file it concerns in its message (io::Error carries no path).
pub fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
