//! One shared filesystem's data plane: its metadata ([`Meta`]), its files' data in the store
//! (one thin object per regular file, made at its first write) and its quota.
//!
//! A file's object id is derived from the filesystem's id and the inode number (UUID version
//! 8: never equal to the version 4 ids of volumes and images), so the metadata needs no
//! column for it and the objects of a filesystem are found by prefix. Every object is
//! [`FILE_OBJECT_SIZE`] long and thin: a file's size lives in its inode, and writes never
//! resize an object. A small file costs the 4 KiB blocks it wrote, not a chunk.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use uuid::Uuid;

use super::meta::{Errno, Inode, Meta, R, SetAttr, now_ns};
use crate::store::{BLOCK, ObjectId, Store, StoreError};

/// Every file object's size, and so the largest file: 16 TiB.
pub const FILE_OBJECT_SIZE: u64 = 1 << 44;

pub struct Vol {
    pub id: String,
    prefix: [u8; 8],
    store: Store,
    pub meta: Mutex<Meta>,
    db_path: PathBuf,
    quota: AtomicU64,
    /// Blocks the store holds for this filesystem's files, in bytes.
    used: AtomicU64,
    /// Worst-case growth of writes in flight, in bytes.
    reserved: AtomicU64,
    /// Allocated bytes of each file object that exists.
    objects: Mutex<HashMap<u64, u64>>,
    /// Open handles per inode, across views: a file unlinked while open lives until its last
    /// close.
    open: Mutex<HashMap<u64, u32>>,
    /// The time of the last write of files whose write did not commit their inode (it did
    /// not grow them): committed at fsync, at the last close and by setattr, and shown by
    /// every attribute reply meanwhile. One commit per write would serialise writers on the
    /// metadata and checkpoint the WAL every thousand writes.
    times: Mutex<HashMap<u64, i64>>,
    pub gone: AtomicBool,
}

pub fn store_err(e: StoreError) -> Errno {
    match e {
        StoreError::NoSpace => libc::ENOSPC,
        StoreError::Checksum { .. } => {
            tracing::error!(error = %e, "shared filesystem read");
            libc::EIO
        }
        e => {
            tracing::error!(error = %e, "shared filesystem I/O");
            e.errno()
        }
    }
}

fn prefix_of(id: &str) -> [u8; 8] {
    let u = Uuid::parse_str(id).unwrap_or_else(|_| {
        // Ids are made as UUIDs; anything else still gets a stable prefix.
        let mut b = [0u8; 16];
        let h = crc32fast::hash(id.as_bytes()).to_be_bytes();
        b[..4].copy_from_slice(&h);
        Uuid::from_bytes(b)
    });
    let mut p = [0u8; 8];
    p.copy_from_slice(&u.as_bytes()[..8]);
    p
}

/// Object id of inode `ino` of the filesystem with `prefix`.
fn object_id(prefix: [u8; 8], ino: u64) -> ObjectId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&prefix);
    b[8..].copy_from_slice(&ino.to_be_bytes());
    Uuid::new_v8(b)
}

/// The inode an object of `prefix` holds, if it is one of them.
fn inode_of(prefix: [u8; 8], id: &ObjectId) -> Option<u64> {
    let mine = object_id(prefix, 0);
    let (a, b) = (id.as_bytes(), mine.as_bytes());
    if id.get_version_num() != 8 || a[..8] != b[..8] || a[8] & 0xc0 != b[8] & 0xc0 {
        return None;
    }
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&a[8..]);
    Some(u64::from_be_bytes(ino) & !(0xc0u64 << 56))
}

pub fn db_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.sqlite"))
}

/// Whether `[off, off+len)` is within what a file may hold.
fn check_range(off: u64, len: u64) -> R<()> {
    match off.checked_add(len) {
        Some(end) if end <= FILE_OBJECT_SIZE => Ok(()),
        _ => Err(libc::EFBIG),
    }
}

impl Vol {
    /// Opens (creating) the filesystem `id`'s metadata, counts its objects in the store, and
    /// drops the files a crash left with no name.
    pub async fn open(store: Store, dir: &Path, id: &str, quota: u64) -> anyhow::Result<Arc<Vol>> {
        let path = db_path(dir, id);
        let meta = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Meta::open(&path)).await??
        };
        let prefix = prefix_of(id);
        let mut objects = HashMap::new();
        let mut used = 0;
        for (oid, info) in store.list_objects() {
            if let Some(ino) = inode_of(prefix, &oid) {
                objects.insert(ino, info.allocated_bytes);
                used += info.allocated_bytes;
            }
        }
        let vol = Arc::new(Vol {
            id: id.to_owned(),
            prefix,
            store,
            meta: Mutex::new(meta),
            db_path: path,
            quota: AtomicU64::new(quota),
            used: AtomicU64::new(used),
            reserved: AtomicU64::new(0),
            objects: Mutex::new(objects),
            open: Mutex::new(HashMap::new()),
            times: Mutex::new(HashMap::new()),
            gone: AtomicBool::new(false),
        });
        let orphans =
            vol.meta.lock().orphans().map_err(|e| {
                anyhow::anyhow!("reading the orphans of filesystem {id}: errno {e}")
            })?;
        for ino in orphans {
            vol.purge(ino).await;
        }
        // Objects with no inode (made by a write whose inode a crash lost).
        let stray: Vec<u64> = {
            let objs = vol.objects.lock();
            let meta = vol.meta.lock();
            objs.keys()
                .copied()
                .filter(|&i| meta.get(i) == Err(libc::ENOENT))
                .collect()
        };
        for ino in stray {
            vol.drop_object(ino).await;
        }
        Ok(vol)
    }

    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    pub fn set_quota(&self, q: u64) {
        self.quota.store(q, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes the store holds for the file's data.
    pub fn allocated(&self, ino: u64) -> u64 {
        self.objects.lock().get(&ino).copied().unwrap_or(0)
    }

    fn object(&self, ino: u64) -> ObjectId {
        object_id(self.prefix, ino)
    }

    /// Whether the file has data in the store (it made its object).
    pub fn has_object(&self, ino: u64) -> bool {
        self.objects.lock().contains_key(&ino)
    }

    /// Takes `bytes` of quota for a write in flight; ENOSPC when they do not fit.
    fn reserve(&self, bytes: u64) -> R<Reservation<'_>> {
        let quota = self.quota();
        let before = self.reserved.fetch_add(bytes, Ordering::AcqRel);
        if self.used().saturating_add(before).saturating_add(bytes) > quota {
            self.reserved.fetch_sub(bytes, Ordering::AcqRel);
            return Err(libc::ENOSPC);
        }
        Ok(Reservation { vol: self, bytes })
    }

    /// Re-reads the object's allocation after a change and counts the difference.
    fn account(&self, ino: u64) {
        let now = match self.store.object_info(self.object(ino)) {
            Ok(i) => i.allocated_bytes,
            Err(_) => return,
        };
        let mut objs = self.objects.lock();
        if let Some(old) = objs.get_mut(&ino) {
            let prev = std::mem::replace(old, now);
            if now >= prev {
                self.used.fetch_add(now - prev, Ordering::AcqRel);
            } else {
                self.used.fetch_sub(prev - now, Ordering::AcqRel);
            }
        }
    }

    /// Bytes of `[off, off+len)` (whole blocks) that hold nothing yet: what writing it may
    /// allocate.
    fn unallocated(&self, ino: u64, off: u64, len: u64) -> R<u64> {
        let bs = BLOCK as u64;
        let (start, end) = (off / bs * bs, (off + len).div_ceil(bs) * bs);
        if !self.has_object(ino) {
            return Ok(end - start);
        }
        let ext = self
            .store
            .extents(self.object(ino), start, end - start)
            .map_err(store_err)?;
        Ok(ext.iter().filter(|e| !e.allocated).map(|e| e.length).sum())
    }

    async fn ensure_object(&self, ino: u64) -> R<()> {
        if self.has_object(ino) {
            return Ok(());
        }
        match self
            .store
            .create_object_unflushed(self.object(ino), FILE_OBJECT_SIZE)
            .await
        {
            Ok(()) | Err(StoreError::Exists(_)) => {}
            Err(e) => return Err(store_err(e)),
        }
        self.objects.lock().entry(ino).or_insert(0);
        Ok(())
    }

    /// Writes `data` at `off` (at the end of the file with `append`), growing the file.
    /// Returns the bytes written.
    pub async fn write(&self, ino: u64, off: u64, data: Bytes, append: bool) -> R<u32> {
        let len = data.len() as u64;
        let size = self.meta.lock().get(ino)?.size;
        let off = if append { size } else { off };
        check_range(off, len)?;
        if len == 0 {
            return Ok(0);
        }
        let need = self.unallocated(ino, off, len)?;
        let _r = self.reserve(need)?;
        self.ensure_object(ino).await?;
        self.store
            .write(self.object(ino), off, data, false)
            .await
            .map_err(store_err)?;
        self.account(ino);
        let t = now_ns();
        if off + len > size {
            // A grown file's size is committed before the reply: it survives kill -9.
            self.meta.lock().written(ino, off + len, t)?;
            self.times.lock().remove(&ino);
        } else {
            self.times.lock().insert(ino, t);
        }
        Ok(len as u32)
    }

    /// Reads up to `len` bytes at `off`, short at the end of the file.
    pub async fn read(&self, ino: u64, off: u64, len: u32) -> R<Bytes> {
        let size = self.meta.lock().get(ino)?.size;
        if off >= size {
            return Ok(Bytes::new());
        }
        let len = (len as u64).min(size - off) as usize;
        if !self.has_object(ino) {
            return Ok(Bytes::from(vec![0u8; len]));
        }
        self.store
            .read(self.object(ino), off, len)
            .await
            .map_err(store_err)
    }

    /// Makes `[off, off+len)` read as zeros and frees its whole blocks.
    async fn zero(&self, ino: u64, off: u64, len: u64) -> R<()> {
        if len == 0 || !self.has_object(ino) {
            return Ok(());
        }
        let need = self.unallocated(ino, off, len)?.min(2 * BLOCK as u64);
        // A partial block at either edge is written (with zeros): that may allocate it.
        let _r = self.reserve(need)?;
        self.store
            .write_zeroes(self.object(ino), off, len, true, false)
            .await
            .map_err(store_err)?;
        self.account(ino);
        Ok(())
    }

    /// `i` with the times of writes not yet committed.
    pub fn with_times(&self, mut i: Inode) -> Inode {
        if let Some(&t) = self.times.lock().get(&i.ino) {
            i.mtime = i.mtime.max(t);
            i.ctime = i.ctime.max(t);
        }
        i
    }

    /// Commits the times kept back for `ino` (all files with `None`).
    pub fn commit_times(&self, ino: Option<u64>) -> R<()> {
        let pending: Vec<(u64, i64)> = {
            let mut times = self.times.lock();
            match ino {
                Some(i) => times.remove(&i).map(|t| (i, t)).into_iter().collect(),
                None => times.drain().collect(),
            }
        };
        let mut meta = self.meta.lock();
        for (i, t) in pending {
            match meta.set_times(i, t) {
                Ok(()) | Err(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// setattr(2) of everything but the size: metadata only.
    pub fn set_meta(&self, ino: u64, a: &SetAttr) -> R<Inode> {
        self.commit_times(Some(ino))?;
        self.meta.lock().setattr(ino, a)
    }

    /// setattr(2), truncating or growing when the size changes.
    pub async fn setattr(&self, ino: u64, mut a: SetAttr) -> R<Inode> {
        if a.size.is_none() {
            return self.set_meta(ino, &a);
        }
        self.commit_times(Some(ino))?;
        if let Some(size) = a.size {
            check_range(size, 0)?;
            let old = self.meta.lock().get(ino)?;
            if !old.is_file() {
                return Err(if old.is_dir() {
                    libc::EISDIR
                } else {
                    libc::EINVAL
                });
            }
            if size < old.size {
                self.zero(ino, size, old.size - size).await?;
            }
            if size != old.size && a.mtime.is_none() {
                a.mtime = Some(now_ns());
            }
        }
        self.meta.lock().setattr(ino, &a)
    }

    /// fallocate(2): preallocation sets the size (space stays thin: blocks are taken when
    /// written, checked against the quota now), punching and zeroing free blocks.
    pub async fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> R<()> {
        check_range(off, len)?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let size = self.meta.lock().get(ino)?.size;
        let end = off + len;
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => {
                let need = self.unallocated(ino, off, len)?;
                if self.used().saturating_add(need) > self.quota() {
                    return Err(libc::ENOSPC);
                }
            }
            libc::FALLOC_FL_PUNCH_HOLE if keep => {
                self.zero(ino, off, end.min(size).saturating_sub(off))
                    .await?;
                return Ok(());
            }
            libc::FALLOC_FL_ZERO_RANGE => {
                self.zero(ino, off, end.min(size).saturating_sub(off))
                    .await?;
            }
            _ => return Err(libc::EOPNOTSUPP),
        }
        if !keep && end > size {
            self.meta.lock().written(ino, end, now_ns())?;
        }
        Ok(())
    }

    /// lseek(2) with SEEK_DATA or SEEK_HOLE.
    pub fn seek(&self, ino: u64, off: u64, data: bool) -> R<u64> {
        let size = self.meta.lock().get(ino)?.size;
        if off >= size {
            return Err(libc::ENXIO);
        }
        if !self.has_object(ino) {
            return if data { Err(libc::ENXIO) } else { Ok(off) };
        }
        let ext = self
            .store
            .extents(self.object(ino), off, size - off)
            .map_err(store_err)?;
        let hit = ext.iter().find(|e| e.allocated == data);
        match (hit, data) {
            (Some(e), _) => Ok(e.offset.max(off)),
            (None, true) => Err(libc::ENXIO),
            (None, false) => Ok(size),
        }
    }

    /// fsync(2): the store's data and every metadata commit made durable.
    pub async fn sync(&self) -> R<()> {
        self.commit_times(None)?;
        self.store.flush().await.map_err(store_err)?;
        let wal = self.meta.lock().wal_path();
        tokio::task::spawn_blocking(move || super::meta::sync_wal(&wal))
            .await
            .map_err(|_| libc::EIO)?
            .map_err(|e| {
                tracing::error!(error = %e, "syncing filesystem metadata");
                libc::EIO
            })
    }

    pub fn opened(&self, ino: u64) {
        *self.open.lock().entry(ino).or_insert(0) += 1;
    }

    /// A handle closed: the file goes if that was its last, and it has no name.
    pub async fn released(&self, ino: u64) {
        let last = {
            let mut open = self.open.lock();
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    open.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if last {
            if let Err(e) = self.commit_times(Some(ino)) {
                tracing::warn!(errno = e, ino, fs = %self.id, "could not record a file's times");
            }
            if self.meta.lock().get(ino).is_ok_and(|i| i.nlink == 0) {
                self.purge(ino).await;
            }
        }
    }

    /// Removes `name` from `parent`: the inode goes with its last name unless it is open.
    /// Returns it as it was left, and whether its data is to be dropped ([`Vol::dropped`]).
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> R<(Inode, bool)> {
        let mut meta = self.meta.lock();
        meta.remove(parent, name, dir, |ino| self.open.lock().contains_key(&ino))
    }

    /// The data of an inode [`Vol::remove`] dropped.
    pub async fn dropped(&self, ino: u64) {
        self.forget_times(ino);
        self.drop_object(ino).await;
    }

    pub fn forget_times(&self, ino: u64) {
        self.times.lock().remove(&ino);
    }

    /// An inode lost a name: it goes now unless it has other names or is open.
    pub async fn unlinked(&self, inode: &Inode) {
        if inode.nlink == 0 && !self.open.lock().contains_key(&inode.ino) {
            self.purge(inode.ino).await;
        }
    }

    async fn purge(&self, ino: u64) {
        self.times.lock().remove(&ino);
        if let Err(e) = self.meta.lock().purge(ino) {
            tracing::warn!(errno = e, ino, fs = %self.id, "could not drop an inode");
        }
        self.drop_object(ino).await;
    }

    async fn drop_object(&self, ino: u64) {
        let Some(bytes) = self.objects.lock().remove(&ino) else {
            return;
        };
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if let Err(e) = self.store.delete_object_unflushed(self.object(ino)).await {
            tracing::warn!(error = %e, ino, fs = %self.id, "could not free a file's data");
        }
    }

    /// Drops everything: the filesystem was deleted.
    pub async fn destroy(&self) {
        self.gone.store(true, Ordering::Release);
        let inos: Vec<u64> = self.objects.lock().keys().copied().collect();
        for ino in inos {
            self.drop_object(ino).await;
        }
        if let Err(e) = self.store.flush().await {
            tracing::warn!(error = %e, fs = %self.id, "flushing after deleting a filesystem");
        }
        remove_db(&self.db_path);
    }
}

/// Removes a metadata database and its WAL files.
pub fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, path = ?p, "removing filesystem metadata"),
        }
    }
}

/// Deletes the objects of a filesystem whose metadata is gone (deleted while stopped).
pub async fn drop_objects_of(store: &Store, id: &str) {
    let prefix = prefix_of(id);
    for (oid, _) in store.list_objects() {
        if inode_of(prefix, &oid).is_some()
            && let Err(e) = store.delete_object_unflushed(oid).await
        {
            tracing::warn!(error = %e, fs = id, "could not free a deleted filesystem's data");
        }
    }
}

struct Reservation<'a> {
    vol: &'a Vol,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.vol.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_map_back_to_inodes() {
        let p = prefix_of("3f2a0c4e-9b1d-4e7a-8c55-0123456789ab");
        for ino in [1u64, 2, 77, (1 << 40) - 1] {
            assert_eq!(inode_of(p, &object_id(p, ino)), Some(ino));
        }
        let other = prefix_of("11111111-9b1d-4e7a-8c55-0123456789ab");
        assert_eq!(inode_of(other, &object_id(p, 5)), None);
        assert_eq!(inode_of(p, &Uuid::new_v4()), None);
    }
}
