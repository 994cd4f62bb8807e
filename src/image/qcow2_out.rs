//! A store object written out as a qcow2 image, in stream order, with no temporary file.
//!
//! Everything before the data follows from the object's allocation map, so the layout is
//! known before the first byte: the header, the refcount table and blocks, the L1 table, the
//! L2 tables of the 512 MiB regions that hold data, then the data clusters in guest order.
//! Holes cost nothing on the wire and the length is known up front. The object must not
//! change while it streams (it is a point-in-time copy).
//!
//! Memory: one counter per 512 MiB region, one region's cluster list (at most 8192) at a
//! time, and a bounded channel of pieces (4 of at most 4 MiB).

use bytes::{BufMut, Bytes, BytesMut};
use uuid::Uuid;

use crate::store::{Store, StoreError};

const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
/// Guest bytes one L2 table maps (8192 entries of 64 KiB).
const REGION: u64 = (CS / 8) * CS;
/// 16-bit refcounts: clusters one refcount block counts.
const REFS_PER_BLOCK: u64 = CS / 2;
const COPIED: u64 = 1 << 63;
/// Data read from the store at once.
const READ_RUN: u64 = 4 << 20;

/// Where everything goes, in clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    size: u64,
    /// Data clusters per region.
    counts: Vec<u32>,
    refcount_table: u64,
    refcount_blocks: u64,
    l1_clusters: u64,
    l2_tables: u64,
    data: u64,
}

impl Layout {
    fn new(size: u64, counts: Vec<u32>) -> Layout {
        let l1_entries = size.div_ceil(REGION);
        let l1_clusters = (l1_entries * 8).div_ceil(CS).max(1);
        let l2_tables = counts.iter().filter(|&&c| c > 0).count() as u64;
        let data: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1_clusters + l2_tables + data;
            let rb2 = total.div_ceil(REFS_PER_BLOCK);
            let rt2 = (rb2 * 8).div_ceil(CS);
            if (rb2, rt2) == (rb, rt) {
                break;
            }
            (rb, rt) = (rb2.max(rb), rt2.max(rt));
        }
        Layout {
            size,
            counts,
            refcount_table: rt,
            refcount_blocks: rb,
            l1_clusters,
            l2_tables,
            data,
        }
    }

    fn total_clusters(&self) -> u64 {
        1 + self.refcount_table
            + self.refcount_blocks
            + self.l1_clusters
            + self.l2_tables
            + self.data
    }

    /// The image's length in bytes.
    fn bytes(&self) -> u64 {
        self.total_clusters() * CS
    }

    fn refcount_blocks_at(&self) -> u64 {
        1 + self.refcount_table
    }
    fn l1_at(&self) -> u64 {
        self.refcount_blocks_at() + self.refcount_blocks
    }
    fn l2_at(&self) -> u64 {
        self.l1_at() + self.l1_clusters
    }
    fn data_at(&self) -> u64 {
        self.l2_at() + self.l2_tables
    }

    fn header(&self) -> Bytes {
        let mut h = BytesMut::with_capacity(CS as usize);
        h.put_u32(0x5146_49fb); // "QFI\xfb"
        h.put_u32(3);
        h.put_u64(0); // no backing file
        h.put_u32(0);
        h.put_u32(CLUSTER_BITS);
        h.put_u64(self.size);
        h.put_u32(0); // no encryption
        h.put_u32(self.size.div_ceil(REGION) as u32);
        h.put_u64(self.l1_at() * CS);
        h.put_u64(CS); // refcount table right after the header
        h.put_u32(self.refcount_table as u32);
        h.put_u32(0); // no snapshots
        h.put_u64(0);
        h.put_u64(0); // incompatible features
        h.put_u64(0); // compatible features
        h.put_u64(0); // autoclear features
        h.put_u32(4); // refcount_order: 16-bit refcounts
        h.put_u32(104); // header length; the zeros after it end the extensions
        h.resize(CS as usize, 0);
        h.freeze()
    }
}

/// Guest cluster indices (absolute) of `[start, end)` that hold data: any allocated block.
fn data_clusters(
    store: &Store,
    object: Uuid,
    start: u64,
    end: u64,
) -> Result<Vec<u64>, StoreError> {
    let mut out: Vec<u64> = Vec::new();
    for e in store.extents(object, start, end - start)? {
        if !e.allocated {
            continue;
        }
        for c in e.offset / CS..(e.offset + e.length).div_ceil(CS) {
            if out.last() != Some(&c) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// The layout of `object` (`size` bytes) as qcow2.
fn layout(store: &Store, object: Uuid, size: u64) -> Result<Layout, StoreError> {
    let mut counts = Vec::new();
    let mut at = 0;
    while at < size {
        let end = (at + REGION).min(size);
        counts.push(data_clusters(store, object, at, end)?.len() as u32);
        at = end;
    }
    Ok(Layout::new(size, counts))
}

/// `object` (`size` bytes, unchanging while it streams) as a qcow2 stream, and its length.
/// The layout walks the whole allocation map (under the store's metadata lock, one 512 MiB
/// region at a time): a blocking thread does it, not an async worker.
pub async fn stream(
    store: Store,
    object: Uuid,
    size: u64,
) -> std::io::Result<(admin_api::image::ByteStream, u64)> {
    let lay = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || layout(&store, object, size))
            .await
            .map_err(std::io::Error::other)?
            .map_err(|e| std::io::Error::other(e.to_string()))?
    };
    let len = lay.bytes();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        if let Err(e) = produce(&store, object, &lay, &tx).await {
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    Ok((super::receiver_stream(rx), len))
}

/// Whether [`build`] can lay `size` bytes out in `store`: its chunks are the image's
/// clusters, and the object ends on one.
pub fn can_build(store: &Store, size: u64) -> bool {
    u64::from(store.chunk_size()) == CS && size.is_multiple_of(CS)
}

/// `src` (`size` bytes, unchanging meanwhile; see [`can_build`]) laid out as a qcow2 image in
/// the new object `dst`, whose length it returns. Only the metadata is written (from
/// [`stream`]'s producer); the data clusters are `src`'s chunks, shared copy-on-write in
/// one commit per 512 MiB region.
pub async fn build(store: Store, src: Uuid, size: u64, dst: Uuid) -> std::io::Result<u64> {
    let io = |e: StoreError| std::io::Error::other(e.to_string());
    if !can_build(&store, size) {
        return Err(std::io::Error::other(
            "the store's chunks are not the image's clusters",
        ));
    }
    let lay = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || layout(&store, src, size))
            .await
            .map_err(std::io::Error::other)?
            .map_err(io)?
    };
    let len = lay.bytes();
    store.create_object(dst, len).await.map_err(io)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let producer = {
        let (store, lay) = (store.clone(), lay.clone());
        tokio::spawn(async move { produce_meta(&store, src, &lay, &tx).await })
    };
    let mut at = 0u64;
    while let Some(piece) = rx.recv().await {
        let piece = piece?;
        let n = piece.len() as u64;
        // The object is new: zeros need no write.
        if piece.iter().any(|&b| b != 0) {
            store.write(dst, at, piece, false).await.map_err(io)?;
        }
        at += n;
    }
    producer.await.map_err(std::io::Error::other)?.map_err(io)?;
    if at != lay.data_at() * CS {
        return Err(std::io::Error::other("the qcow2 metadata came out short"));
    }
    let mut next_data = lay.data_at();
    for (r, &c) in lay.counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let start = r as u64 * REGION;
        let clusters = data_clusters(&store, src, start, (start + REGION).min(size)).map_err(io)?;
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for g in clusters {
            match runs.last_mut() {
                Some((s, _, n)) if *s + *n == g => *n += 1,
                _ => runs.push((g, next_data, 1)),
            }
            next_data += 1;
        }
        store.share_chunks(src, dst, &runs).await.map_err(io)?;
    }
    Ok(len)
}

async fn produce(
    store: &Store,
    object: Uuid,
    lay: &Layout,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), StoreError> {
    if produce_meta(store, object, lay, tx).await? {
        produce_data(store, object, lay, tx).await?;
    }
    Ok(())
}

/// Sends everything before the data clusters. False: the receiver went away.
async fn produce_meta(
    store: &Store,
    object: Uuid,
    lay: &Layout,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<bool, StoreError> {
    let send = |b: Bytes| async move { tx.send(Ok(b)).await.is_ok() };
    if !send(lay.header()).await {
        return Ok(false);
    }
    // Refcount table: the blocks' offsets.
    let mut t = BytesMut::with_capacity((lay.refcount_table * CS) as usize);
    for i in 0..lay.refcount_blocks {
        t.put_u64((lay.refcount_blocks_at() + i) * CS);
    }
    t.resize((lay.refcount_table * CS) as usize, 0);
    if !send(t.freeze()).await {
        return Ok(false);
    }
    // Refcount blocks: 1 for every cluster of the image.
    let total = lay.total_clusters();
    for b in 0..lay.refcount_blocks {
        let mut r = BytesMut::with_capacity(CS as usize);
        for i in b * REFS_PER_BLOCK..(b + 1) * REFS_PER_BLOCK {
            r.put_u16(u16::from(i < total));
        }
        if !send(r.freeze()).await {
            return Ok(false);
        }
    }
    // L1: each region with data points at its L2 table.
    let mut l1 = BytesMut::with_capacity((lay.l1_clusters * CS) as usize);
    let mut next_l2 = lay.l2_at();
    for &c in &lay.counts {
        if c > 0 {
            l1.put_u64((next_l2 * CS) | COPIED);
            next_l2 += 1;
        } else {
            l1.put_u64(0);
        }
    }
    l1.resize((lay.l1_clusters * CS) as usize, 0);
    if !send(l1.freeze()).await {
        return Ok(false);
    }
    // L2 tables, region by region; data clusters follow in the same order.
    let mut next_data = lay.data_at();
    for (r, &c) in lay.counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let start = r as u64 * REGION;
        let clusters = data_clusters(store, object, start, (start + REGION).min(lay.size))?;
        let mut l2 = vec![0u64; (CS / 8) as usize];
        for g in &clusters {
            l2[(g - start / CS) as usize] = (next_data * CS) | COPIED;
            next_data += 1;
        }
        let mut b = BytesMut::with_capacity(CS as usize);
        for e in l2 {
            b.put_u64(e);
        }
        if !send(b.freeze()).await {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sends the data clusters, in guest order.
async fn produce_data(
    store: &Store,
    object: Uuid,
    lay: &Layout,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), StoreError> {
    let send = |b: Bytes| async move { tx.send(Ok(b)).await.is_ok() };
    for (r, &c) in lay.counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let start = r as u64 * REGION;
        let clusters = data_clusters(store, object, start, (start + REGION).min(lay.size))?;
        // Contiguous guest clusters are read together, up to READ_RUN.
        let mut i = 0;
        while i < clusters.len() {
            let mut j = i + 1;
            while j < clusters.len()
                && clusters[j] == clusters[j - 1] + 1
                && ((j - i + 1) as u64) * CS <= READ_RUN
            {
                j += 1;
            }
            let off = clusters[i] * CS;
            let want = (j - i) as u64 * CS;
            let have = want.min(lay.size - off);
            let data = store.read(object, off, have as usize).await?;
            let piece = if have < want {
                let mut p = BytesMut::from(&data[..]);
                p.resize(want as usize, 0);
                p.freeze()
            } else {
                data
            };
            if !send(piece).await {
                return Ok(());
            }
            i = j;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_account_for_every_cluster() {
        // Empty 1 GiB: header, refcount table and block, one L1 cluster, nothing else.
        let l = Layout::new(1 << 30, vec![0, 0]);
        assert_eq!(l.total_clusters(), 4);
        assert_eq!((l.l1_at(), l.data_at()), (3, 4));
        // Two regions with data.
        let l = Layout::new(1 << 30, vec![3, 5]);
        assert_eq!(l.total_clusters(), 4 + 2 + 8);
        // Enough clusters for three refcount blocks (32768 clusters each).
        let l = Layout::new(
            4 << 30,
            vec![8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192],
        );
        assert_eq!(l.refcount_blocks, 3); // 65536 data clusters and 14 more
        assert!(l.total_clusters() <= l.refcount_blocks * REFS_PER_BLOCK);
        let h = l.header();
        assert_eq!(&h[..4], b"QFI\xfb");
        assert_eq!(u64::from_be_bytes(h[24..32].try_into().unwrap()), 4 << 30);
    }
}
