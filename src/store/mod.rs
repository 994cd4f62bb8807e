//! The chunk store (stub of the public API; the real implementation lands next).
use std::path::Path;

use bytes::Bytes;
use uuid::Uuid;

pub type ObjectId = Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("object {0} not found")]
    NotFound(ObjectId),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// O_DIRECT data I/O instead of the page cache.
    pub direct_io: bool,
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
    pub checksum_errors: u64,
    pub healed_blocks: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
}

#[derive(Clone)]
pub struct Store {}

impl Store {
    pub async fn open(_dir: &Path, _opts: StoreOptions) -> Result<Store> {
        Ok(Store {})
    }
    pub fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    pub async fn read(&self, id: ObjectId, _off: u64, _len: usize) -> Result<Bytes> {
        Err(StoreError::NotFound(id))
    }
    pub async fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Flush, checkpoint metadata and release the store (lock file included).
    pub async fn close(self) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct FsckReport {
    pub errors: Vec<String>,
    pub repaired: Vec<String>,
}

/// Check (and with `repair`, fix what is safe in) the store in `dir`. The store must not be open.
pub fn fsck(_dir: &Path, _repair: bool) -> Result<FsckReport> {
    Ok(FsckReport::default())
}
