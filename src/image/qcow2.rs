//! In-process conversion of qcow2 to raw, from one store object into another.
//!
//! `qemu-img` through NBD moves every byte through two sockets and a process on the same two
//! cores: reading the image's export, then writing the target's (issue 24's benchmark (b)).
//! Here the `imago` crate reads the qcow2 metadata straight from the source object and says
//! where each guest range lives; data clusters are then copied from the source object into the
//! target by the store itself, several pieces in flight, and compressed clusters are inflated
//! by imago. Zero blocks are never written, so holes stay holes.
//!
//! It runs only on images that already passed every gate in front of `qemu-img` (the
//! in-process inspector, `qemu-img info`, `check` and `map`), and only where imago's memory is
//! small and bounded: clusters of 4 KiB to 64 KiB (an L1 table of at most 32 MiB for 64 TiB,
//! 128 cached L2 tables of one cluster each). Anything else, or anything imago cannot open
//! (an incompatible feature it does not know), goes to `qemu-img` as before.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::storage::drivers::CommonStorageHelper;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Mapping, Storage};
use uuid::Uuid;

use crate::store::Store;

/// The largest piece read or written at once.
const PIECE: u64 = 4 << 20;
/// Pieces in flight.
const IN_FLIGHT: usize = 8;
/// Zero detection granularity: the store's block.
const BLOCK: u64 = 4096;
/// Cluster sizes (as `cluster_bits`) converted in-process.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 12..=16;

/// A store object as imago's storage: read-only, and its length is the image's.
#[derive(Debug)]
struct ObjectStorage {
    io: Io,
    id: Uuid,
    len: u64,
    helper: CommonStorageHelper,
}

/// The store, used from the conversion thread: every operation runs as a task on the daemon's
/// runtime, whose background work (writeback kicks, commits) the store spawns where it runs.
#[derive(Clone)]
struct Io {
    store: Store,
    rt: tokio::runtime::Handle,
}

impl fmt::Debug for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Io")
    }
}

impl Io {
    async fn read(&self, id: Uuid, offset: u64, len: u64) -> io::Result<Bytes> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let store = self.store.clone();
        self.rt
            .spawn(async move { store.read(id, offset, len).await })
            .await
            .map_err(io::Error::other)?
            .map_err(|e| io::Error::other(format!("reading the image: {e}")))
    }

    async fn write(&self, id: Uuid, offset: u64, data: Bytes) -> io::Result<()> {
        let store = self.store.clone();
        self.rt
            .spawn(async move { store.write(id, offset, data, false).await })
            .await
            .map_err(io::Error::other)?
            .map_err(|e| io::Error::other(format!("writing the raw copy: {e}")))
    }
}

impl fmt::Display for ObjectStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cairn object {}", self.id)
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the image is read-only")
}

impl Storage for ObjectStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    async unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        // Past the end reads as zeros, as the trait asks (a compressed cluster's sector count
        // may reach past it); truncated images were refused by `qemu-img map` already.
        let want = bufv.len();
        let have = self.len.saturating_sub(offset).min(want);
        if have == want {
            let data = self.io.read(self.id, offset, have).await?;
            bufv.copy_from_slice(&data);
        } else {
            let mut buf = vec![0u8; want as usize];
            if have > 0 {
                let data = self.io.read(self.id, offset, have).await?;
                buf[..have as usize].copy_from_slice(&data);
            }
            bufv.copy_from_slice(&buf);
        }
        Ok(())
    }

    async unsafe fn pure_writev(&self, _bufv: IoVector<'_>, _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    async unsafe fn pure_write_zeroes(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(read_only())
    }

    async unsafe fn pure_discard(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(read_only())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}

/// Whether a qcow2 image with this header is converted in-process (see the module's text).
pub fn fits(header: &[u8]) -> bool {
    header
        .get(20..24)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .is_some_and(|bits| CLUSTER_BITS.contains(&bits))
}

/// Opens `src` (`src_len` bytes of qcow2) for reading, never opening anything it names.
async fn open(io: &Io, src: Uuid, src_len: u64) -> io::Result<FormatAccess<ObjectStorage>> {
    let storage = ObjectStorage {
        io: io.clone(),
        id: src,
        len: src_len,
        helper: CommonStorageHelper::default(),
    };
    let qcow2 = Qcow2::<ObjectStorage, FormatAccess<ObjectStorage>>::builder(storage)
        .backing(None)
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .await?;
    Ok(FormatAccess::new(qcow2))
}

/// Why an in-process conversion did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// imago could not open the image (so `qemu-img` should try); nothing was written.
    #[error("{0}")]
    Unsupported(io::Error),
    /// Reading the image or writing the target failed; the target may hold some of it.
    #[error("{0}")]
    Failed(io::Error),
}

/// Writes the blocks of `data` (guest bytes at `offset`) that are not all zeros into `target`,
/// whole runs at once.
async fn write_nonzero(io: &Io, target: Uuid, offset: u64, data: Bytes) -> io::Result<()> {
    let end = offset + data.len() as u64;
    let mut at = offset;
    let mut run: Option<u64> = None;
    while at < end {
        let next = ((at / BLOCK + 1) * BLOCK).min(end);
        let block = &data[(at - offset) as usize..(next - offset) as usize];
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                io.write(target, start, slice(&data, offset, start, at))
                    .await?;
                run = None;
            }
            _ => {}
        }
        at = next;
    }
    if let Some(start) = run {
        io.write(target, start, slice(&data, offset, start, end))
            .await?;
    }
    Ok(())
}

/// The bytes of `data` (which starts at `base`) from `start` to `end`.
fn slice(data: &Bytes, base: u64, start: u64, end: u64) -> Bytes {
    data.slice((start - base) as usize..(end - base) as usize)
}

/// Converts `src` (qcow2, `src_len` bytes) into `target`, an all-zero object of at least the
/// image's virtual size. `progress` gets the guest bytes done so far. The caller flushes.
///
/// imago's futures are not `Send`, so the walk runs on a thread of its own with a
/// single-threaded runtime; dropping the returned future stops it at its next piece.
pub async fn convert(
    store: &Store,
    src: Uuid,
    src_len: u64,
    target: Uuid,
    mut progress: impl FnMut(u64) + Send,
) -> Result<(), Qcow2Error> {
    let io = Io {
        store: store.clone(),
        rt: tokio::runtime::Handle::current(),
    };
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0u64);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cancelled = stop.0.clone();
    std::thread::Builder::new()
        .name("cairn-qcow2".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread().build() {
                Ok(rt) => rt.block_on(walk(&io, src, src_len, target, &cancelled, &done_tx)),
                Err(e) => Err(Qcow2Error::Unsupported(e)),
            };
            let _ = tx.send(result);
        })
        .map_err(Qcow2Error::Unsupported)?;
    let mut rx = std::pin::pin!(rx);
    loop {
        tokio::select! {
            result = &mut rx => {
                return result.unwrap_or_else(|_| {
                    Err(Qcow2Error::Failed(io::Error::other("the conversion thread ended")))
                });
            }
            changed = done_rx.changed() => match changed {
                Ok(()) => progress(*done_rx.borrow_and_update()),
                // The thread is done; its result follows.
                Err(_) => return (&mut rx).await.unwrap_or_else(|_| {
                    Err(Qcow2Error::Failed(io::Error::other("the conversion thread ended")))
                }),
            },
        }
    }
}

/// Tells the conversion thread to stop when the job is dropped (cancelled).
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

type Piece<'a> = std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + 'a>>;

async fn walk(
    io: &Io,
    src: Uuid,
    src_len: u64,
    target: Uuid,
    cancelled: &AtomicBool,
    done: &tokio::sync::watch::Sender<u64>,
) -> Result<(), Qcow2Error> {
    let image = open(io, src, src_len)
        .await
        .map_err(Qcow2Error::Unsupported)?;
    let size = image.size();
    let image = &image;
    let mut in_flight: FuturesUnordered<Piece<'_>> = FuturesUnordered::new();
    let mut offset = 0u64;
    while offset < size {
        if cancelled.load(Ordering::Relaxed) {
            return Err(Qcow2Error::Failed(io::Error::other("cancelled")));
        }
        let (mapping, len) = image
            .get_mapping(offset, (size - offset).min(PIECE))
            .await
            .map_err(Qcow2Error::Failed)?;
        if len == 0 {
            break; // end of file: the rest reads as zeros
        }
        let at = offset;
        match mapping {
            Mapping::Raw {
                offset: host_offset,
                ..
            } => in_flight.push(Box::pin(async move {
                if src_len.saturating_sub(host_offset) < len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("data at {host_offset} lies past the image's end"),
                    ));
                }
                let data = io.read(src, host_offset, len).await?;
                write_nonzero(io, target, at, data).await
            })),
            Mapping::Special { .. } => in_flight.push(Box::pin(async move {
                let mut buf = vec![0u8; len as usize];
                image.read(&mut buf, at).await?;
                write_nonzero(io, target, at, Bytes::from(buf)).await
            })),
            // Unallocated or zero clusters: the target already reads zeros there.
            _ => {}
        }
        offset += len;
        while in_flight.len() >= IN_FLIGHT {
            if let Some(r) = in_flight.next().await {
                r.map_err(Qcow2Error::Failed)?;
            }
        }
        done.send_replace(offset.saturating_sub(IN_FLIGHT as u64 * PIECE));
    }
    while let Some(r) = in_flight.next().await {
        r.map_err(Qcow2Error::Failed)?;
    }
    done.send_replace(size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cluster_bits: u32) -> Vec<u8> {
        let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
        h.resize(20, 0);
        h.extend_from_slice(&cluster_bits.to_be_bytes());
        h
    }

    #[test]
    fn only_small_clusters_are_converted_in_process() {
        assert!(fits(&header(12)) && fits(&header(16)));
        assert!(!fits(&header(9)) && !fits(&header(17)) && !fits(&header(21)));
        assert!(!fits(&header(16)[..22]));
    }
}
