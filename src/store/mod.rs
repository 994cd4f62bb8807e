//! The chunk store: thin-provisioned, checksummed, copy-on-write objects over segment files.
//!
//! Layout and invariants: `docs/store-format.md`. In short: an object's address space is cut
//! into chunks; each mapped chunk points at a slot in a segment file plus a bitmap of which
//! 4 KiB blocks hold data. Every block has a CRC32 beside it, checked on every read. Metadata
//! changes go to a journal whose batches take effect only once their commit record is
//! durable, which happens after the data they refer to is durable (`flush`).
mod buf;
mod engine;
pub mod format;
mod fsck;
mod grace;
mod map;
mod meta;
mod recovery;
mod segment;
mod tail;
mod uring;

use std::io;
use std::path::PathBuf;

pub use engine::Store;
pub use format::{BLOCK, DEFAULT_CHUNK, FORMAT_VERSION, FormatError};
pub use fsck::{FsckReport, fsck};
use uuid::Uuid;

pub type ObjectId = Uuid;

/// This thread's number, handed out round robin at its first call: the index into
/// per-thread shards (counters, read grace periods) that keep each core on its own cache
/// lines. Take it modulo the shard count.
fn thread_index() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // Transparent: a source that is also in the message prints twice in an error chain.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("object {0} not found")]
    NotFound(ObjectId),
    #[error("object {0} already exists")]
    Exists(ObjectId),
    #[error("range {offset}+{len} is beyond the end of object {id} ({size} bytes)")]
    OutOfRange {
        id: ObjectId,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("checksum mismatch in object {id} at offset {offset}")]
    Checksum { id: ObjectId, offset: u64 },
    #[error("no space left in the store")]
    NoSpace,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("store at {0} is in use by another process")]
    Locked(PathBuf),
    /// The superblock is refused. (`error` is in the message, so it is not also a `source`.)
    #[error("store at {path}: {error}")]
    Format { path: PathBuf, error: FormatError },
    #[error("store is damaged: {0}")]
    Damaged(String),
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// The errno a block or file protocol should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => libc::ENOSPC,
                _ => libc::EIO,
            },
            StoreError::NoSpace => libc::ENOSPC,
            StoreError::NotFound(_) => libc::ENOENT,
            StoreError::Exists(_) => libc::EEXIST,
            StoreError::OutOfRange { .. } | StoreError::Invalid(_) => libc::EINVAL,
            StoreError::Checksum { .. } | StoreError::Damaged(_) => libc::EIO,
            StoreError::Locked(_) => libc::EBUSY,
            StoreError::Format { .. } => libc::EIO,
            StoreError::Closed => libc::ESHUTDOWN,
        }
    }
}

impl From<meta::MetaError> for StoreError {
    fn from(e: meta::MetaError) -> Self {
        match e {
            meta::MetaError::NotFound(id) => StoreError::NotFound(id),
            meta::MetaError::Exists(id) => StoreError::Exists(id),
            meta::MetaError::Damaged(m) => StoreError::Damaged(m),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// O_DIRECT data I/O instead of the page cache.
    pub direct_io: bool,
    /// Chunk size for a store created by this open (ignored for an existing store).
    pub chunk_size: u32,
    /// Start a new journal with a checkpoint once the journal passes this many bytes.
    pub checkpoint_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            direct_io: false,
            chunk_size: DEFAULT_CHUNK,
            checkpoint_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreStats {
    pub objects: u64,
    /// Sum of object virtual sizes.
    pub logical_bytes: u64,
    /// Sum over objects of mapped (allocated) bytes; shared blocks count once per object.
    pub allocated_bytes: u64,
    /// Bytes the segment files really hold (shared blocks once).
    pub physical_bytes: u64,
    /// Free bytes on the filesystem that holds the store.
    pub free_bytes: u64,
    pub segments: u64,
    pub chunk_size: u64,
    pub checksum_errors: u64,
    pub healed_blocks: u64,
    /// Reads whose first pass failed a checksum and were retried with writes held off. A
    /// read torn by a concurrent write succeeds on the retry; real damage fails it again and
    /// also counts in `checksum_errors`.
    pub read_retries: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    pub commits: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ObjectInfo {
    pub size: u64,
    pub allocated_bytes: u64,
}

/// A run of an object's address space, as block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Holds data; otherwise a hole that reads as zeros.
    pub allocated: bool,
}
