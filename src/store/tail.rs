//! The live journal's end, memory-mapped: a record reaches the journal file's page cache the
//! moment it is logged, with no system call. A process crash leaves the page cache as it was,
//! so whatever was logged before a write was acknowledged is there for the next open on the
//! same boot; a commit fsyncs the file to make its records durable against a power loss too.
//!
//! The file is preallocated (`fallocate`), as the CRC files are: a store into an unbacked
//! page of a shared mapping on a full filesystem is a SIGBUS, not an error. Records that do
//! not fit wait in memory (`overflow`) until the file grows; an operation whose records are
//! there is not acknowledged before they are in the mapping (`Store::after_change`).
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use memmap2::MmapMut;

use super::format::Record;

/// A fresh journal's size: what a few thousand writes log, grown on demand.
pub const START_CAPACITY: usize = 1 << 20;
/// Grow once less than this share of the file (1/n) is left, before writers overflow.
const GROW_AT_FRACTION: usize = 4;
/// Largest single growth step.
const MAX_GROWTH: usize = 64 << 20;

/// The journal being appended to, or, before the store is open (replay, fsck), nothing but
/// an in-memory buffer.
#[derive(Default)]
pub struct Tail {
    mapped: Option<Mapped>,
    /// Records logged past the mapping's end, in order: they go in before anything else.
    overflow: Vec<u8>,
    /// Bytes that `Meta::log` appended since the last commit began.
    since_commit: usize,
    scratch: Vec<u8>,
}

struct Mapped {
    file: File,
    map: MmapMut,
    /// End of the records in the map.
    len: usize,
    generation: u64,
}

/// How urgently the journal file needs to grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Growth {
    /// Records wait in memory: whoever logged them must wait for the growth.
    Now,
    /// Running low: grow in the background.
    Soon,
}

impl Tail {
    /// Map journal `generation` (`file`, its whole length preallocated); its records end at
    /// byte `len`.
    pub fn mapped(file: File, generation: u64, len: usize) -> io::Result<Tail> {
        // SAFETY: journal files are private to this store, which holds the store lock;
        // nothing truncates them while mapped, and they are preallocated to their length.
        let map = unsafe { MmapMut::map_mut(&file)? };
        if len > map.len() {
            return Err(io::Error::other(format!(
                "journal {generation}: records end at {len}, past the file's {} bytes",
                map.len()
            )));
        }
        Ok(Tail {
            mapped: Some(Mapped {
                file,
                map,
                len,
                generation,
            }),
            ..Tail::default()
        })
    }

    /// Append an encoded record (or several).
    pub fn append(&mut self, bytes: &[u8]) {
        match &mut self.mapped {
            Some(m) if self.overflow.is_empty() && m.len + bytes.len() <= m.map.len() => {
                m.map[m.len..m.len + bytes.len()].copy_from_slice(bytes);
                m.len += bytes.len();
            }
            _ => self.overflow.extend_from_slice(bytes),
        }
    }

    /// Append a record logged by `Meta::log`.
    pub fn log(&mut self, rec: &Record) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        rec.encode(&mut buf);
        self.append(&buf);
        self.since_commit += buf.len();
        self.scratch = buf;
    }

    /// Append a record that is the store's own bookkeeping (an intent, a commit), only if it
    /// goes straight into the mapping. False: grow first.
    pub fn put(&mut self, recs: &[Record]) -> bool {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        for r in recs {
            r.encode(&mut buf);
        }
        let fits = self.fits(buf.len());
        if fits {
            self.append(&buf);
        }
        self.scratch = buf;
        fits
    }

    /// The logical end of the journal: where the next record goes once what waits in memory
    /// is in the file.
    pub fn pos(&self) -> u64 {
        (self.mapped.as_ref().map_or(0, |m| m.len) + self.overflow.len()) as u64
    }

    pub fn since_commit(&self) -> usize {
        self.since_commit
    }

    /// A commit begins: what was logged until now is its to commit.
    pub fn commit_began(&mut self) {
        self.since_commit = 0;
    }

    /// A commit that began failed before it was durable: its records wait for the next.
    pub fn commit_failed(&mut self, had: usize) {
        self.since_commit += had;
    }

    pub fn generation(&self) -> u64 {
        self.mapped.as_ref().map_or(0, |m| m.generation)
    }

    /// The journal file's descriptor (for fsync), while mapped.
    pub fn fd(&self) -> Option<RawFd> {
        self.mapped.as_ref().map(|m| m.file.as_raw_fd())
    }

    pub fn growth(&self) -> Option<Growth> {
        let m = self.mapped.as_ref()?;
        if !self.overflow.is_empty() {
            Some(Growth::Now)
        } else if m.map.len() - m.len < m.map.len() / GROW_AT_FRACTION {
            Some(Growth::Soon)
        } else {
            None
        }
    }

    /// What to grow to, and a handle on the file to grow, if it needs to. `room`: bytes that
    /// must fit besides what is logged.
    pub fn plan_growth(&self, room: usize) -> io::Result<Option<(File, u64, usize)>> {
        let Some(m) = self.mapped.as_ref() else {
            return Ok(None);
        };
        let need = m.len + self.overflow.len() + room;
        if self.growth().is_none() && need <= m.map.len() {
            return Ok(None);
        }
        let cap = m.map.len();
        let want = (cap + cap.min(MAX_GROWTH))
            .max(need + need / GROW_AT_FRACTION)
            .next_multiple_of(1 << 20);
        // An error (out of descriptors) is the caller's: "nothing to grow" would acknowledge
        // operations whose records wait in memory.
        let file = m.file.try_clone()?;
        Ok(Some((file, m.generation, want)))
    }

    /// Whether `n` more bytes go straight into the mapping.
    pub fn fits(&self, n: usize) -> bool {
        matches!(&self.mapped, Some(m) if self.overflow.is_empty() && m.len + n <= m.map.len())
    }

    /// The file of journal `generation` now holds `capacity` bytes: map them, and move in
    /// what waits in memory. Does nothing if the journal is another one by now.
    pub fn grown(&mut self, generation: u64, capacity: usize) -> io::Result<()> {
        let Some(m) = &mut self.mapped else {
            return Ok(());
        };
        if m.generation != generation || capacity <= m.map.len() {
            return Ok(());
        }
        // SAFETY: as in `mapped`; the file was grown to `capacity` with its blocks allocated.
        let map = unsafe { MmapMut::map_mut(&m.file)? };
        if map.len() < capacity {
            return Err(io::Error::other("the journal file did not grow"));
        }
        m.map = map;
        let pending = std::mem::take(&mut self.overflow);
        self.append(&pending);
        Ok(())
    }

    /// The records logged at or after byte `from` that a new journal must carry: everything
    /// but commit records and intents (a new journal is seeded with the intents in force).
    pub fn carry_from(&self, from: u64) -> Vec<u8> {
        let mapped: &[u8] = self.mapped.as_ref().map_or(&[], |m| &m.map[..m.len]);
        let from = (from as usize).min(mapped.len());
        let mut out = Vec::new();
        for part in [&mapped[from..], &self.overflow[..]] {
            let mut off = 0;
            while let Some((rec, n)) = Record::decode(&part[off..]) {
                if !matches!(
                    rec,
                    Record::Commit { .. } | Record::CommitTo { .. } | Record::Intent { .. }
                ) {
                    out.extend_from_slice(&part[off..off + n]);
                }
                off += n;
            }
        }
        out
    }

    /// Carried records go in as logged since the last commit.
    pub fn carry_in(&mut self, bytes: &[u8]) {
        self.append(bytes);
        self.since_commit += bytes.len();
    }
}

/// Grow journal `file` to `capacity` bytes, allocated (blocking).
pub fn allocate(file: &File, capacity: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, capacity as i64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(cap: u64) -> (tempfile::TempDir, File) {
        let tmp = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp.path().join("j"))
            .unwrap();
        allocate(&f, cap).unwrap();
        (tmp, f)
    }

    fn records(bytes: &[u8]) -> Vec<Record> {
        let mut off = 0;
        let mut v = Vec::new();
        while let Some((r, n)) = Record::decode(&bytes[off..]) {
            v.push(r);
            off += n;
        }
        v
    }

    /// Records past the end wait in memory, in order, and go in (and count) once the file
    /// has grown; a commit record never goes to memory.
    #[test]
    fn overflow_keeps_order_and_drains_on_growth() {
        let (tmp, f) = journal(4096);
        let mut t = Tail::mapped(f, 1, 0).unwrap();
        let rec = |i: u32| Record::Intent { region: i };
        let mut n = 0;
        while t.growth() != Some(Growth::Now) {
            t.log(&rec(n));
            n += 1;
        }
        let total = n + 10;
        for i in n..total {
            t.log(&rec(i));
        }
        assert!(!t.put(&[Record::CommitTo { seq: 1, end: 0 }]));
        let pos = t.pos();
        let (file, generation, cap) = t.plan_growth(0).unwrap().unwrap();
        allocate(&file, cap as u64).unwrap();
        t.grown(generation, cap).unwrap();
        assert_eq!(t.growth(), None, "{cap}");
        assert_eq!(t.pos(), pos);
        assert!(t.put(&[Record::CommitTo { seq: 1, end: pos }]));
        let on_disk = std::fs::read(tmp.path().join("j")).unwrap();
        let got = records(&on_disk);
        assert_eq!(got.len() as u32, total + 1);
        for (i, r) in got[..total as usize].iter().enumerate() {
            assert_eq!(*r, rec(i as u32));
        }
        assert_eq!(t.since_commit(), pos as usize);
    }

    #[test]
    fn carry_leaves_commits_and_intents_behind() {
        let (_tmp, f) = journal(1 << 20);
        let mut t = Tail::mapped(f, 1, 0).unwrap();
        let id = uuid::Uuid::from_u128(1);
        t.log(&Record::CreateObject { id, size: 1 });
        let end = t.pos();
        t.log(&Record::Resize { id, size: 2 });
        assert!(t.put(&[Record::Intent { region: 3 }]));
        assert!(t.put(&[Record::CommitTo { seq: 1, end }]));
        t.log(&Record::DeleteObject { id });
        assert_eq!(
            records(&t.carry_from(end)),
            [Record::Resize { id, size: 2 }, Record::DeleteObject { id }]
        );
    }
}
