//! Segment files: slot data (`NNNNNNNN.seg`, sparse) and per-block CRC32s beside it
//! (`NNNNNNNN.crc`, memory-mapped, one little-endian u32 per 4 KiB block).
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use memmap2::MmapMut;

use super::format::{BLOCK, Superblock};

pub struct Segment {
    data: File,
    /// Buffered stores: the data file once more, with O_DIRECT, for large writes.
    dio: Option<File>,
    crc_file: File,
    crc: MmapMut,
    /// The CRC each block had before its latest write (format 2): recovery accepts a block
    /// of an intent region only if it matches this or the current one. None: a format-1
    /// segment seen by fsck, which does not create the file.
    prev_file: Option<File>,
    prev: Option<MmapMut>,
    blocks: usize,
}

pub fn data_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{index:08}.seg"))
}

pub fn crc_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{index:08}.crc"))
}

pub fn prev_crc_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{index:08}.pcrc"))
}

/// Create a CRC file of `len` bytes with its blocks allocated: a store into an unbacked page
/// of a shared mapping on a full filesystem is a SIGBUS for the whole daemon, not an error, so
/// running out of space must happen here. Made as `<name>.tmp`, synced and renamed, so that
/// a crash never leaves a short file under the final name (open refuses it as truncated).
fn make_crc_file(path: &Path, len: u64) -> io::Result<()> {
    let tmp = tmp_path(path);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| super::recovery::with_path(e, &tmp))?;
    allocate_crc_file(&tmp, len)?;
    std::fs::rename(&tmp, path)
}

/// Allocate all `len` bytes of an existing CRC file (see [`make_crc_file`]) and sync it.
fn allocate_crc_file(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| super::recovery::with_path(e, path))?;
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as i64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    f.sync_all()
}

/// `<path>.tmp`: a name that neither `count_segments` nor open takes for a segment's file.
fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

/// Open a CRC file of `len` bytes and map it.
fn open_crc_file(path: &Path, len: u64) -> io::Result<(File, MmapMut)> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| super::recovery::with_path(e, path))?;
    if f.metadata()?.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is truncated", path.display()),
        ));
    }
    // SAFETY: the CRC files are private to this store, which holds the store lock; nothing
    // else truncates them while mapped.
    let map = unsafe { MmapMut::map_mut(&f)? };
    Ok((f, map))
}

/// Make the files of new segment `index`: the CRC files, then the data file, each complete
/// and synced under a temporary name and then renamed. A segment exists (`count_segments`
/// goes by the `.seg` files) only once all three are whole: a crash in the middle once left
/// a `.seg` without its CRC files, or not yet full-sized, and every later open refused the
/// store. What a crash leaves here is replaced when the segment is made again.
fn make_files(dir: &Path, index: u32, sb: &Superblock) -> io::Result<()> {
    let crc_len = (sb.segment_bytes / BLOCK as u64) * 4;
    make_crc_file(&crc_path(dir, index), crc_len)?;
    #[cfg(test)]
    super::recovery::fault::point(dir, "segment file created")?;
    make_crc_file(&prev_crc_path(dir, index), crc_len)?;
    #[cfg(test)]
    super::recovery::fault::point(dir, "segment file created")?;
    // The renames above are durable before the data file can be.
    super::recovery::sync_dir(dir)?;
    let path = data_path(dir, index);
    let tmp = tmp_path(&path);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| super::recovery::with_path(e, &tmp))?;
    f.set_len(sb.segment_bytes)?;
    f.sync_all()?;
    #[cfg(test)]
    super::recovery::fault::point(dir, "segment file created")?;
    std::fs::rename(&tmp, &path)
}

impl Segment {
    /// Open segment `index`, creating its files first if `create` (data sparse, CRC files
    /// allocated; the caller syncs the directory). `make_prev`: create a missing
    /// previous-CRC file (a format-1 segment being upgraded), or complete one whose making a
    /// crash cut short (created, not yet allocated); otherwise such a segment has none.
    pub fn open(
        dir: &Path,
        index: u32,
        sb: &Superblock,
        direct: bool,
        create: bool,
        make_prev: bool,
    ) -> io::Result<Segment> {
        if create && let Err(e) = make_files(dir, index, sb) {
            #[cfg(test)]
            if super::recovery::fault::injected(&e) {
                // A process killed there: nothing is cleaned up.
                return Err(e);
            }
            // A segment that cannot be complete is not left behind half made.
            let _ = std::fs::remove_file(data_path(dir, index));
            for path in [crc_path(dir, index), prev_crc_path(dir, index)] {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(tmp_path(&path));
            }
            let _ = std::fs::remove_file(tmp_path(&data_path(dir, index)));
            return Err(e);
        }
        let blocks = (sb.segment_bytes / BLOCK as u64) as usize;
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let noatime = |direct: bool| libc::O_NOATIME | if direct { libc::O_DIRECT } else { 0 };
        let path = data_path(dir, index);
        // No atime: every cached read would otherwise read the clock and check whether the
        // inode's atime needs a write (~2% of a 4 KiB read). Refused (EPERM) unless the
        // daemon owns the file; then it is opened as usual.
        let data = match o.clone().custom_flags(noatime(direct)).open(&path) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => o.open(&path),
            r => r,
        }
        .map_err(|e| super::recovery::with_path(e, &path))?;
        if !direct {
            // No readahead: it caches runs in large folios (up to 2 MiB with an 8 MiB
            // read_ahead_kb), and a 4 KiB write into a large folio costs far more than into a
            // small one (random writes over data read that way ran 3x slower). Reads are sized by their callers (merged runs), so
            // losing readahead costs them little.
            // SAFETY: an advisory call on a descriptor we own; it touches no memory.
            let rc =
                unsafe { libc::posix_fadvise(data.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
            if rc != 0 {
                tracing::debug!(segment = index, errno = rc, "posix_fadvise(RANDOM) refused");
            }
        }
        let crc_len = (blocks * 4) as u64;
        let have = data.metadata()?.len();
        if have < sb.segment_bytes {
            // Also what a superblock with a wrong segment size looks like: say both sizes.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "segment {index} is truncated: {have} bytes, the superblock's segment size is {}",
                    sb.segment_bytes
                ),
            ));
        }
        let (crc_file, crc) = open_crc_file(&crc_path(dir, index), crc_len)?;
        let prev_path = prev_crc_path(dir, index);
        let have_prev = prev_path.exists();
        if make_prev && !have_prev {
            make_crc_file(&prev_path, crc_len)?;
        } else if make_prev {
            // An older binary made it in place: a crash may have left it short. Allocating a
            // complete file is a no-op, and zeroed previous CRCs heal nothing.
            allocate_crc_file(&prev_path, crc_len)?;
        }
        let (prev_file, prev) = if make_prev || have_prev {
            let (f, m) = open_crc_file(&prev_path, crc_len)?;
            (Some(f), Some(m))
        } else {
            (None, None)
        };
        let dio = if direct {
            None
        } else {
            o.clone()
                .custom_flags(noatime(true))
                .open(&path)
                .or_else(|_| o.clone().custom_flags(libc::O_DIRECT).open(&path))
                .ok()
        };
        Ok(Segment {
            data,
            dio,
            crc_file,
            crc,
            prev_file,
            prev,
            blocks,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    pub fn dio_fd(&self) -> Option<RawFd> {
        self.dio.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn crc_fd(&self) -> RawFd {
        self.crc_file.as_raw_fd()
    }

    pub fn file(&self) -> &File {
        &self.data
    }

    /// A CRC map as words. Both maps are `blocks * 4` bytes (checked at open).
    fn words<'a>(&self, map: &'a MmapMut) -> &'a [AtomicU32] {
        // SAFETY: the map is page-aligned, `blocks * 4` bytes long, and AtomicU32 has the
        // size and alignment of u32; all access goes through atomics.
        unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU32>(), self.blocks) }
    }

    fn crcs(&self) -> &[AtomicU32] {
        self.words(&self.crc)
    }

    /// Stored CRC of block `b` (segment-relative block index).
    pub fn crc(&self, b: usize) -> u32 {
        u32::from_le(self.crcs()[b].load(Ordering::Acquire))
    }

    /// Start loading the stored CRCs of blocks `b..b + n` into the cache, so that the miss on
    /// a cold CRC page overlaps the data read instead of following it.
    pub fn prefetch_crcs(&self, b: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let crcs = self.crcs();
            let end = (b + n).min(crcs.len());
            let mut i = b;
            while i < end {
                let line_end = (i | 15) + 1;
                let p = crcs[i].as_ptr().cast::<i8>().cast_const();
                // SAFETY: a prefetch hint for an address inside our map; it reads nothing.
                #[allow(unused_unsafe)]
                unsafe {
                    std::arch::x86_64::_mm_prefetch(p, std::arch::x86_64::_MM_HINT_T0)
                };
                i = line_end; // one 64-byte line holds 16 CRCs (the map is page-aligned)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, n);
    }

    pub fn set_crc(&self, b: usize, v: u32) {
        self.crcs()[b].store(v.to_le(), Ordering::Release);
    }

    fn prevs(&self) -> Option<&[AtomicU32]> {
        self.prev.as_ref().map(|m| self.words(m))
    }

    /// Whether data with CRC `crc`, found in block `b` after a crash, is what a write cut
    /// short left there: the data its previous CRC describes. Without previous CRCs (format
    /// 1, or the file lost) nothing is known to be one.
    pub fn crashed_write(&self, b: usize, crc: u32) -> bool {
        self.prevs()
            .is_some_and(|p| u32::from_le(p[b].load(Ordering::Acquire)) == crc)
    }

    /// A write of block `b` with CRC `v` is about to be issued: the current CRC becomes the
    /// previous one. Called before the data write, so that after a crash the block holds
    /// the data of one of the two.
    pub fn replace_crc(&self, b: usize, v: u32) {
        if let Some(p) = self.prevs() {
            p[b].store(self.crcs()[b].load(Ordering::Acquire), Ordering::Release);
        }
        self.set_crc(b, v);
    }

    pub fn prev_crc_fd(&self) -> Option<RawFd> {
        self.prev_file.as_ref().map(|f| f.as_raw_fd())
    }

    /// fsync both CRC files (which covers their mapped pages).
    pub fn sync_crcs(&self) -> io::Result<()> {
        self.crc_file.sync_all()?;
        if let Some(f) = &self.prev_file {
            f.sync_all()?;
        }
        Ok(())
    }
}

/// Segments per page of a [`SegTable`].
const SEG_PAGE: usize = 1024;

type SegPage = Box<[OnceLock<Arc<Segment>>]>;

/// The open segments by number: append-only, and looked up without a lock. Every read looks
/// its segment up, and a shared lock there is a cache line that both cores write each time.
pub struct SegTable {
    pages: Box<[OnceLock<SegPage>]>,
    len: AtomicUsize,
}

impl SegTable {
    /// A table with room for `max` segments.
    pub fn new(max: usize) -> SegTable {
        SegTable {
            pages: (0..max.div_ceil(SEG_PAGE))
                .map(|_| OnceLock::new())
                .collect(),
            len: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn get(&self, i: usize) -> Option<&Arc<Segment>> {
        if i >= self.len() {
            return None;
        }
        self.pages[i / SEG_PAGE].get()?[i % SEG_PAGE].get()
    }

    /// Append `seg` as the next segment. Callers serialise their pushes.
    pub fn push(&self, seg: Arc<Segment>) -> io::Result<()> {
        let i = self.len.load(Ordering::Acquire);
        let page = self
            .pages
            .get(i / SEG_PAGE)
            .ok_or_else(|| io::Error::other("segment table is full"))?
            .get_or_init(|| (0..SEG_PAGE).map(|_| OnceLock::new()).collect());
        page[i % SEG_PAGE]
            .set(seg)
            .map_err(|_| io::Error::other("segment pushed twice"))?;
        self.len.store(i + 1, Ordering::Release);
        Ok(())
    }

    /// The segments open now.
    pub fn snapshot(&self) -> Vec<Arc<Segment>> {
        (0..self.len())
            .filter_map(|i| self.get(i).cloned())
            .collect()
    }
}
