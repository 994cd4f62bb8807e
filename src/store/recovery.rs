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
    create_journal(dir, 1, &sb, &[])?;
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

/// Create journal `generation` holding `records` (synced), and sync the directory. The
/// file is written under a temporary name and renamed into place complete: a journal whose
/// creation a crash cut short would otherwise be there empty, and open refuses a journal
/// without a valid header.
pub fn create_journal(
    dir: &Path,
    generation: u64,
    sb: &Superblock,
    records: &[Record],
) -> io::Result<File> {
    let mut buf = format::encode_journal_header(generation, sb.store_id).to_vec();
    for r in records {
        r.encode(&mut buf);
    }
    let path = journal_path(dir, generation);
    // Not a journal name to `list_journals` (the generation does not parse).
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
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    Ok(f)
}

#[derive(Debug)]
pub struct JournalInfo {
    pub generation: u64,
    pub path: PathBuf,
    pub valid_len: u64,
    pub file_len: u64,
    /// Records after the last commit (an unflushed tail), dropped.
    pub uncommitted: u64,
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

/// In `tail`, the bytes of a journal after the record where replay stopped: an intact Commit
/// record (at any offset) more than one past `last`, the last commit replayed, as (offset,
/// sequence). A crash tears only the last append, which holds at most one Commit (`last` + 1),
/// so such a record means the journal was damaged before commits that were durable, and
/// taking the damage for a torn tail would drop them (and punch their data as unreferenced).
fn commit_after_tear(tail: &[u8], last: u64) -> Option<(usize, u64)> {
    const COMMIT_LEN: usize = format::RECORD_HEADER + 8;
    (1..tail.len().saturating_sub(COMMIT_LEN - 1)).find_map(|i| {
        let at = &tail[i..];
        // Cheap filter first: payload length 8, type 9.
        if at[..4] != 8u32.to_le_bytes() || at[8] != 9 {
            return None;
        }
        match Record::decode(at) {
            Some((Record::Commit { seq }, _)) if seq > last.saturating_add(1) => Some((i, seq)),
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

    let mut journals = Vec::new();
    let mut stale = Vec::new();
    let mut foreign = Vec::new();
    let mut expect = next_gen;
    for (g, path) in list_journals(dir)? {
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
        let out_of_range = |rec: &Record| {
            beyond(rec).map_or(Ok(()), |what| {
                Err(StoreError::Damaged(format!(
                    "{}: a record names {what}, but only {segments} segment files exist",
                    path.display()
                )))
            })
        };
        let mut off = JOURNAL_HEADER;
        let mut batch: Vec<Record> = Vec::new();
        let mut committed_end = off;
        while let Some((rec, n)) = Record::decode(&data[off..]) {
            off += n;
            match rec {
                Record::Intent { .. } => {
                    out_of_range(&rec)?;
                    meta.apply(&rec)?
                }
                Record::Commit { seq } => {
                    for r in batch.drain(..) {
                        out_of_range(&r)?;
                        meta.apply(&r)
                            .map_err(|e| StoreError::Damaged(format!("{}: {e}", path.display())))?;
                    }
                    commit_seq = seq;
                    committed_end = off;
                }
                other => batch.push(other),
            }
        }
        if let Some((at, seq)) = commit_after_tear(&data[off..], commit_seq) {
            return Err(StoreError::Damaged(format!(
                "{}: the record at byte {off} is damaged, and commit {seq} follows it intact at \
                 byte {}: not a torn tail",
                path.display(),
                off + at
            )));
        }
        journals.push(JournalInfo {
            generation: g,
            path,
            valid_len: committed_end.max(off) as u64,
            file_len: data.len() as u64,
            uncommitted: batch.len() as u64,
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
