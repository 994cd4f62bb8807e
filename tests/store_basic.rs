//! Behaviour of the store's public API, byte for byte.
use bytes::Bytes;
use cairn::store::{Extent, Store, StoreError, StoreOptions};
use uuid::Uuid;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Create object `id` of `size` bytes holding `data` from offset 0.
async fn object_with(s: &Store, id: Uuid, size: u64, data: &[u8]) {
    s.create_object(id, size).await.unwrap();
    s.write(id, 0, Bytes::copy_from_slice(data), false)
        .await
        .unwrap();
}

async fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreOptions::default())
        .await
        .expect("open store")
}

#[tokio::test]
async fn write_read_unaligned_and_holes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let id = Uuid::new_v4();
    s.create_object(id, 1 << 30).await.unwrap();
    // Unmapped reads are zeros and allocate nothing.
    assert_eq!(s.read(id, 12345, 70000).await.unwrap(), vec![0u8; 70000]);
    assert_eq!(s.object_info(id).unwrap().allocated_bytes, 0);
    // An unaligned write spanning chunks.
    let data = pattern(7, 200_000);
    s.write(id, 65_000, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    let back = s.read(id, 60_000, 210_000).await.unwrap();
    assert_eq!(&back[..5000], &vec![0u8; 5000][..]);
    assert_eq!(&back[5000..205_000], &data[..]);
    assert_eq!(&back[205_000..], &vec![0u8; 5000][..]);
    // Allocation is exact at 4 KiB granularity: blocks 15..=64 (65000/4096=15, 264999/4096=64).
    assert_eq!(s.object_info(id).unwrap().allocated_bytes, 50 * 4096);
    // Overwrite in place, partially.
    s.write(id, 100_000, Bytes::from(vec![0xAB; 10]), false)
        .await
        .unwrap();
    let b = s.read(id, 99_990, 30).await.unwrap();
    assert_eq!(&b[..10], &data[34_990..35_000]);
    assert_eq!(&b[10..20], &[0xAB; 10]);
    assert_eq!(&b[20..], &data[35_010..35_020]);
    // Out of range.
    assert!(matches!(
        s.read(id, (1 << 30) - 10, 11).await,
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write(id, 1 << 30, Bytes::from_static(b"x"), false).await,
        Err(StoreError::OutOfRange { .. })
    ));
    s.close().await.unwrap();
}

#[tokio::test]
async fn clone_is_cow_and_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    let data = pattern(1, 1 << 20);
    object_with(&s, a, 16 << 20, &data).await;
    s.flush().await.unwrap();
    let phys = s.stats().physical_bytes;
    s.clone_object(a, b).await.unwrap();
    assert_eq!(s.stats().physical_bytes, phys, "clone copies no data");
    s.write(b, 4096, Bytes::from(vec![9u8; 4096]), false)
        .await
        .unwrap();
    // Copy-up copied one chunk (64 KiB) and no more.
    assert_eq!(s.stats().physical_bytes, phys + 65536);
    assert_eq!(s.read(a, 0, 1 << 20).await.unwrap(), data);
    let rb = s.read(b, 0, 1 << 20).await.unwrap();
    assert_eq!(&rb[..4096], &data[..4096]);
    assert_eq!(&rb[4096..8192], &[9u8; 4096]);
    assert_eq!(&rb[8192..], &data[8192..]);
    s.delete_object(a).await.unwrap();
    assert_eq!(s.read(b, 0, 4096).await.unwrap(), &data[..4096]);
    assert!(matches!(
        s.read(a, 0, 1).await,
        Err(StoreError::NotFound(_))
    ));
    s.flush().await.unwrap();
    s.delete_object(b).await.unwrap();
    assert_eq!(s.stats().physical_bytes, 0);
    s.close().await.unwrap();
}

/// Bytes the segment files take on the host filesystem.
fn segment_disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
        .sum()
}

/// Blocks of a shared chunk that one sharer discarded go, from the accounting and from the
/// disk, as soon as the other sharer lets go of them (not at the next open), and the sharer
/// that keeps the chunk can write them again.
#[tokio::test]
async fn blocks_one_sharer_discarded_go_when_the_other_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let data = pattern(3, 1 << 20);
    object_with(&s, a, 16 << 20, &data).await;
    s.flush().await.unwrap();
    let phys = s.stats().physical_bytes;
    assert_eq!(phys, 1 << 20);
    let disk = segment_disk_bytes(tmp.path());
    s.clone_object(a, b).await.unwrap();
    // `a` lets go of blocks 1..=4 of each of its sixteen 64 KiB chunks; `b` still has them.
    let hole = 4 * 4096u64;
    for c in 0..16u64 {
        s.discard(a, c * 65536 + 4096, hole, false).await.unwrap();
    }
    s.flush().await.unwrap();
    assert_eq!(s.stats().physical_bytes, phys);
    assert_eq!(s.object_info(a).unwrap().allocated_bytes, phys - 16 * hole);
    // `b` goes (delete commits): nobody holds those blocks any more.
    s.delete_object(b).await.unwrap();
    assert_eq!(s.stats().physical_bytes, phys - 16 * hole);
    // On the host too (less one block if the filesystem needed one for the split extents).
    let freed = disk - segment_disk_bytes(tmp.path()).min(disk);
    assert!(
        (16 * hole - 4096..=16 * hole).contains(&freed),
        "{freed} bytes punched"
    );
    let mut want = data.clone();
    for c in 0..16usize {
        want[c * 65536 + 4096..c * 65536 + 5 * 4096].fill(0);
    }
    assert_eq!(s.read(a, 0, 1 << 20).await.unwrap(), want);
    // Written again, one of them reads back and counts again.
    s.write(a, 65536 + 8192, Bytes::from(vec![7u8; 4096]), true)
        .await
        .unwrap();
    want[65536 + 8192..65536 + 3 * 4096].fill(7);
    assert_eq!(s.read(a, 0, 1 << 20).await.unwrap(), want);
    assert_eq!(s.stats().physical_bytes, phys - 16 * hole + 4096);
    // What a reopen derives from the maps is what the running store had.
    s.close().await.unwrap();
    let s = open(tmp.path()).await;
    assert_eq!(s.stats().physical_bytes, phys - 16 * hole + 4096);
    assert_eq!(s.read(a, 0, 1 << 20).await.unwrap(), want);
    s.close().await.unwrap();
    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// The same, when the other sharer lets go by copying up (a write, no commit yet), and the
/// keeper writes one of the dead blocks again before the commit that punches them: every
/// byte of both objects stays as written and the accounting is exact throughout.
#[tokio::test]
async fn keeper_writes_a_dead_block_before_its_punch() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let data = pattern(5, 65536);
    object_with(&s, a, 1 << 20, &data).await;
    s.clone_object(a, b).await.unwrap();
    s.discard(a, 4096, 4 * 4096, false).await.unwrap();
    // `b` copies its chunk up: blocks 1..=4 of the old slot now belong to nobody.
    s.write(b, 8 * 4096, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(s.stats().physical_bytes, 2 * 65536 - 4 * 4096);
    // `a` writes one of them before any commit: a copy-up, not a write in place.
    s.write(a, 2 * 4096, Bytes::from(vec![2u8; 4096]), false)
        .await
        .unwrap();
    let mut want_a = data.clone();
    want_a[4096..5 * 4096].fill(0);
    want_a[2 * 4096..3 * 4096].fill(2);
    let mut want_b = data.clone();
    want_b[8 * 4096..9 * 4096].fill(1);
    s.flush().await.unwrap();
    assert_eq!(s.read(a, 0, 65536).await.unwrap(), want_a);
    assert_eq!(s.read(b, 0, 65536).await.unwrap(), want_b);
    // a: 13 blocks (16, less the 4 it discarded, plus the one it wrote back), b: 16.
    assert_eq!(s.stats().physical_bytes, (13 + 16) * 4096);
    s.close().await.unwrap();
    let s = open(tmp.path()).await;
    assert_eq!(s.stats().physical_bytes, (13 + 16) * 4096);
    assert_eq!(s.read(a, 0, 65536).await.unwrap(), want_a);
    assert_eq!(s.read(b, 0, 65536).await.unwrap(), want_b);
    s.close().await.unwrap();
    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.leaked_bytes, 0, "{report:?}");
}

#[tokio::test]
async fn discard_zeroes_and_extents() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let id = Uuid::new_v4();
    s.create_object(id, 4 << 20).await.unwrap();
    s.write(id, 0, Bytes::from(pattern(3, 1 << 20)), false)
        .await
        .unwrap();
    s.discard(id, 8192, 8192, false).await.unwrap();
    s.write_zeroes(id, 100_000, 5000, false, false)
        .await
        .unwrap();
    s.write_zeroes(id, 200_000, 300_000, true, false)
        .await
        .unwrap();
    let r = s.read(id, 0, 1 << 20).await.unwrap();
    let mut want = pattern(3, 1 << 20);
    want[8192..16384].fill(0);
    want[100_000..105_000].fill(0);
    want[200_000..500_000].fill(0);
    assert_eq!(r, want);
    let ext = s.extents(id, 0, 4 << 20).unwrap();
    assert_eq!(
        ext[0],
        Extent {
            offset: 0,
            length: 8192,
            allocated: true
        }
    );
    assert_eq!(
        ext[1],
        Extent {
            offset: 8192,
            length: 8192,
            allocated: false
        }
    );
    assert_eq!(
        ext.last().unwrap(),
        &Extent {
            offset: 1 << 20,
            length: 3 << 20,
            allocated: false
        }
    );
    // A deallocating zeroing of partial blocks in a hole allocates nothing, within one block
    // and across a block boundary; without deallocation it must allocate.
    let before = s.object_info(id).unwrap().allocated_bytes;
    s.write_zeroes(id, (2 << 20) + 100, 1000, true, false)
        .await
        .unwrap();
    s.write_zeroes(id, (3 << 20) - 100, 200, true, false)
        .await
        .unwrap();
    assert_eq!(s.object_info(id).unwrap().allocated_bytes, before);
    assert!(
        s.extents(id, 1 << 20, 3 << 20)
            .unwrap()
            .iter()
            .all(|e| !e.allocated)
    );
    s.write_zeroes(id, (2 << 20) + 100, 1000, false, false)
        .await
        .unwrap();
    assert_eq!(s.object_info(id).unwrap().allocated_bytes, before + 4096);
    let r = s.read(id, 1 << 20, 3 << 20).await.unwrap();
    assert!(r.iter().all(|&b| b == 0));
    s.close().await.unwrap();
}

#[tokio::test]
async fn state_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::new_v4();
    let data = pattern(5, 300_000);
    {
        let s = open(tmp.path()).await;
        s.create_object(id, 1 << 20).await.unwrap();
        s.write(id, 777, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        s.close().await.unwrap();
    }
    let s = open(tmp.path()).await;
    assert_eq!(s.read(id, 777, data.len()).await.unwrap(), data);
    let report = tokio::task::spawn_blocking({
        let p = tmp.path().to_path_buf();
        move || cairn::store::fsck(&p, false)
    })
    .await
    .unwrap();
    assert!(
        matches!(report, Err(StoreError::Locked(_))),
        "fsck refuses an open store"
    );
    // Overwrite in place (this needs write intents), then stop cleanly: no intent may
    // survive, or the next open re-reads every region written since the last commit.
    s.write(id, 777, Bytes::from(pattern(6, 300_000)), false)
        .await
        .unwrap();
    s.close().await.unwrap();
    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.leaked_bytes, 0);
    assert_eq!(report.intent_regions, 0, "{report:?}");
    let s = open(tmp.path()).await;
    assert_eq!(s.read(id, 777, 300_000).await.unwrap(), pattern(6, 300_000));
    s.close().await.unwrap();
}

/// Shrinking to a size inside the old last block, when that block is partial, forgets the
/// bytes past the new end: growing again reads zeros there.
#[tokio::test]
async fn shrink_within_the_last_block_forgets_its_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let id = Uuid::new_v4();
    object_with(&s, id, 5000, &pattern(3, 5000)).await;
    s.resize(id, 4500).await.unwrap();
    s.resize(id, 5000).await.unwrap();
    let mut want = pattern(3, 4500);
    want.resize(5000, 0);
    assert_eq!(s.read(id, 0, 5000).await.unwrap(), want);
    s.close().await.unwrap();
}

/// A range whose end overflows u64 is out of range: an error, not a panic (debug builds
/// checked arithmetic) or a wrapped range.
#[tokio::test]
async fn ranges_that_overflow_are_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let id = Uuid::new_v4();
    object_with(&s, id, 1 << 20, &pattern(1, 4096)).await;
    let far = u64::MAX - 10;
    let w = s.write(id, far, Bytes::from(vec![1u8; 100]), false).await;
    assert!(matches!(w, Err(StoreError::OutOfRange { .. })), "{w:?}");
    let r = s.read(id, far, 100).await;
    assert!(matches!(r, Err(StoreError::OutOfRange { .. })), "{r:?}");
    let d = s.discard(id, far, 100, false).await;
    assert!(matches!(d, Err(StoreError::OutOfRange { .. })), "{d:?}");
    let z = s.write_zeroes(id, far, 100, true, false).await;
    assert!(matches!(z, Err(StoreError::OutOfRange { .. })), "{z:?}");
    assert_eq!(s.read(id, 0, 4096).await.unwrap(), pattern(1, 4096));
    s.close().await.unwrap();
}

/// A caller that goes away during a commit (an HTTP client hanging up on a DELETE) does not
/// stop it: the batch it took, with other objects' writes, still reaches the journal, so a
/// later flush that says they are durable is right, and they survive a crash.
#[tokio::test]
async fn a_dropped_commit_still_lands() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    s.create_object(a, 1 << 20).await.unwrap();
    s.create_object(b, 1 << 20).await.unwrap();
    s.write(a, 0, Bytes::from(pattern(9, 4096)), false)
        .await
        .unwrap();
    {
        let mut delete = Box::pin(s.delete_object(b));
        let pending = delete
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending();
        assert!(pending, "the delete did not get as far as its commit");
    }
    s.flush().await.unwrap();
    drop(s); // no close: as a crash leaves it
    let s = open(tmp.path()).await;
    assert_eq!(s.read(a, 0, 4096).await.unwrap(), pattern(9, 4096));
    assert!(matches!(s.object_info(b), Err(StoreError::NotFound(_))));
    s.close().await.unwrap();
}

/// `extents_upto` gives the first extents of `extents`, exactly, for any limit and range:
/// what NBD block status with REQ_ONE (or a capped reply) stands on.
#[tokio::test]
async fn extents_upto_is_a_prefix_of_extents() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path()).await;
    let id = Uuid::new_v4();
    s.create_object(id, 4 << 20).await.unwrap();
    // Every other block over three chunks, then a run of six, then a hole to the end.
    for b in (0..48u64).step_by(2) {
        s.write(id, b * 4096, Bytes::from(pattern(b as u8, 4096)), false)
            .await
            .unwrap();
    }
    s.write(id, 100 * 4096, Bytes::from(pattern(1, 6 * 4096)), false)
        .await
        .unwrap();
    for (off, len) in [(0, 4 << 20), (4095, 200_000), (8192 * 7 + 100, 1 << 20)] {
        let all = s.extents(id, off, len).unwrap();
        assert!(all.len() > 10, "{all:?}");
        for k in 1..=all.len() + 2 {
            let some = s.extents_upto(id, off, len, k).unwrap();
            assert_eq!(some, all[..k.min(all.len())], "limit {k} at {off}+{len}");
        }
    }
    s.close().await.unwrap();
}
