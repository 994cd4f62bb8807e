//! Corruption is detected and reported, damaged or newer stores are refused untouched, and
//! concurrent readers and writers never see torn blocks or each other's data.
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn::store::{FormatError, Store, StoreError, StoreOptions};
use uuid::Uuid;

const BS: usize = 4096;

/// A self-describing block: (tag, block index) header, then filler derived from both.
fn block(tag: u64, blk: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS);
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&blk.to_le_bytes());
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ blk ^ 0xABCD;
    while v.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn blocks(tag: u64, first: u64, n: u64) -> Bytes {
    let mut v = Vec::with_capacity(n as usize * BS);
    for b in first..first + n {
        v.extend_from_slice(&block(tag, b));
    }
    Bytes::from(v)
}

/// Offset in segment 0 where `needle` (a whole block) is stored.
fn find_block(store_dir: &Path, needle: &[u8]) -> u64 {
    let seg = std::fs::read(store_dir.join("segments/00000000.seg")).unwrap();
    seg.chunks(BS)
        .position(|c| c == needle)
        .expect("block is in segment 0") as u64
        * BS as u64
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// A closed store holding one 1 MiB object with `data` at offset 0.
async fn closed_store_with(data: Bytes) -> (tempfile::TempDir, Uuid) {
    let tmp = tempfile::tempdir().unwrap();
    let id = Uuid::new_v4();
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    s.create_object(id, 1 << 20).await.unwrap();
    s.write(id, 0, data, false).await.unwrap();
    s.close().await.unwrap();
    (tmp, id)
}

#[tokio::test]
async fn flipped_data_byte_is_a_checksum_error_and_only_there() {
    let (tmp, id) = closed_store_with(blocks(1, 0, 64)).await;
    // Block 17 lives somewhere in the segment; damage one byte of it.
    let at = find_block(tmp.path(), &block(1, 17));
    flip(&tmp.path().join("segments/00000000.seg"), at + 1234);

    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert_eq!(report.checksum_errors, 1, "{report:?}");
    assert!(
        report.errors[0].contains(&format!("offset {}", 17 * BS)),
        "{report:?}"
    );

    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    let e = s.read(id, 17 * BS as u64, BS).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Checksum { offset, .. } if offset == 17 * BS as u64),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EIO);
    // A read spanning it fails as a whole; everything around it still reads exactly.
    assert!(s.read(id, 0, 64 * BS).await.is_err());
    assert_eq!(s.read(id, 0, 17 * BS).await.unwrap(), blocks(1, 0, 17));
    assert_eq!(
        s.read(id, 18 * BS as u64, 46 * BS).await.unwrap(),
        blocks(1, 18, 46)
    );
    // A partial write into the damaged block needs its old content: an error, not a
    // silently re-checksummed corruption. So does copying it up for a clone.
    assert!(
        s.write(id, 17 * BS as u64 + 10, Bytes::from_static(b"abc"), false)
            .await
            .is_err()
    );
    let c = Uuid::new_v4();
    s.clone_object(id, c).await.unwrap();
    assert!(
        s.write(c, 16 * BS as u64, Bytes::from(vec![7u8; 100]), false)
            .await
            .is_err()
    );
    assert!(s.stats().checksum_errors >= 4, "{:?}", s.stats());
    // Overwriting the whole block is the cure, as on a disk.
    s.write(id, 17 * BS as u64, blocks(2, 17, 1), false)
        .await
        .unwrap();
    assert_eq!(
        s.read(id, 17 * BS as u64, BS).await.unwrap(),
        blocks(2, 17, 1)
    );
    s.close().await.unwrap();
    // The clone still shares the damaged block, and fsck still says so; repair never "fixes" it.
    let report = cairn::store::fsck(tmp.path(), true).unwrap();
    assert_eq!(report.checksum_errors, 1, "{report:?}");
}

#[tokio::test]
async fn flipped_crc_byte_is_a_checksum_error() {
    let (tmp, id) = closed_store_with(blocks(3, 0, 8)).await;
    let at = find_block(tmp.path(), &block(3, 5));
    // One CRC (4 bytes) per 4 KiB block of the segment.
    flip(
        &tmp.path().join("segments/00000000.crc"),
        at / BS as u64 * 4 + 2,
    );
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        s.read(id, 5 * BS as u64, BS).await,
        Err(StoreError::Checksum { .. })
    ));
    assert_eq!(
        s.read(id, 4 * BS as u64, BS).await.unwrap(),
        blocks(3, 4, 1)
    );
    assert_eq!(s.stats().checksum_errors, 1);
    // Real damage is retried once (it could have been a torn read), then reported.
    assert_eq!(s.stats().read_retries, 1);
    s.close().await.unwrap();
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = walk(dir)
        .into_iter()
        .filter(|(n, _)| !n.ends_with("LOCK"))
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn damaged_newer_or_headless_stores_are_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    s.create_object(Uuid::new_v4(), 1 << 20).await.unwrap();
    s.close().await.unwrap();
    let sb = tmp.path().join("superblock");
    let good = std::fs::read(&sb).unwrap();

    // Damaged superblock.
    flip(&sb, 30);
    let before = snapshot(tmp.path());
    let e = refused_untouched(tmp.path()).await;
    assert!(
        matches!(
            e,
            StoreError::Format {
                error: FormatError::BadChecksum,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("damaged"), "{e}");
    assert!(cairn::store::fsck(tmp.path(), true).is_err());
    assert_eq!(snapshot(tmp.path()), before, "nothing was written");

    // A newer format version.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&sb, &newer).unwrap();
    let e = refused_untouched(tmp.path()).await;
    assert!(
        matches!(
            e,
            StoreError::Format {
                error: FormatError::TooNew { found: 99, .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("newer"), "{e}");

    // A checkpoint of a newer version (its CRC intact) is refused, not rewritten as ours.
    std::fs::write(&sb, &good).unwrap();
    let ckpt = tmp.path().join("checkpoint");
    let good_ckpt = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, with_version(good_ckpt.clone(), 99)).unwrap();
    let e = refused_untouched(tmp.path()).await;
    assert!(e.to_string().contains("version 99"), "{e}");
    std::fs::write(&ckpt, &good_ckpt).unwrap();

    // Store files but no superblock: damaged, never re-created over.
    std::fs::remove_file(&sb).unwrap();
    let e = refused_untouched(tmp.path()).await;
    assert!(matches!(e, StoreError::Damaged(_)), "{e}");

    // And the good one opens again.
    std::fs::write(&sb, &good).unwrap();
    Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

/// A superblock (CRC intact) whose segment size is not the one the segments were made with:
/// refused, naming both sizes, and nothing rewritten (the segment file is 1 GiB, so only the
/// top-level files are compared).
#[tokio::test]
async fn superblock_with_another_segment_size_is_refused() {
    let (tmp, _) = closed_store_with(blocks(1, 0, 1)).await;
    let sb = tmp.path().join("superblock");
    let mut bigger = std::fs::read(&sb).unwrap();
    bigger[16..24].copy_from_slice(&(2u64 << 30).to_le_bytes());
    std::fs::write(&sb, with_version(bigger, 2)).unwrap();
    // The top-level files (superblock, checkpoint, journals); not the segments.
    let small = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && !p.ends_with("LOCK"))
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = small(tmp.path());
    let e = Store::open(tmp.path(), StoreOptions::default())
        .await
        .err()
        .expect("the store is refused");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("segment 0 is truncated")
            && msg.contains(&(1u64 << 30).to_string())
            && msg.contains(&(2u64 << 30).to_string()),
        "{msg}"
    );
    assert_eq!(small(tmp.path()), before, "nothing was written");
}

/// Opening the store at `dir` fails and writes nothing: the error.
async fn refused_untouched(dir: &Path) -> StoreError {
    let before = snapshot(dir);
    let e = Store::open(dir, StoreOptions::default())
        .await
        .err()
        .expect("the store is refused");
    assert_eq!(snapshot(dir), before, "nothing was written");
    e
}

/// A metadata file (superblock, checkpoint) stamped with format `version`, its trailing CRC
/// (over everything before it) made to match.
fn with_version(mut raw: Vec<u8>, version: u32) -> Vec<u8> {
    raw[8..12].copy_from_slice(&version.to_le_bytes());
    let n = raw.len() - 4;
    let crc = crc32fast::hash(&raw[..n]);
    raw[n..].copy_from_slice(&crc.to_le_bytes());
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_writers_clones_and_flushes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    let id = Uuid::new_v4();
    const PRIVATE: u64 = 256; // blocks per task-private region
    const TASKS: u64 = 12;
    const SHARED: u64 = 512; // blocks everyone writes and reads
    let total = TASKS * PRIVATE + SHARED;
    s.create_object(id, total * BS as u64).await.unwrap();
    let shared0 = TASKS * PRIVATE;
    let check_shared = |data: &[u8], first: u64| {
        for (i, b) in data.chunks(BS).enumerate() {
            if b.iter().all(|&x| x == 0) {
                continue;
            }
            let tag = u64::from_le_bytes(b[..8].try_into().unwrap());
            assert_eq!(
                b,
                &block(tag, first + i as u64)[..],
                "torn or foreign block {}",
                first + i as u64
            );
        }
    };
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut x = t * 7919 + 1;
            let mut rnd = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let base = t * PRIVATE;
            let mut model = vec![0u64; PRIVATE as usize]; // tag per private block (0 = zeros)
            for step in 0..150u64 {
                let tag = (t + 1) * 1_000_000 + step;
                match rnd(10) {
                    0..=3 => {
                        let n = 1 + rnd(32);
                        let f = rnd(PRIVATE - n);
                        s.write(
                            id,
                            (base + f) * BS as u64,
                            blocks(tag, base + f, n),
                            rnd(8) == 0,
                        )
                        .await
                        .unwrap();
                        model[f as usize..(f + n) as usize].fill(tag);
                    }
                    4 => {
                        let n = 1 + rnd(48);
                        let f = rnd(PRIVATE - n);
                        s.discard(id, (base + f) * BS as u64, n * BS as u64, false)
                            .await
                            .unwrap();
                        model[f as usize..(f + n) as usize].fill(0);
                    }
                    5..=6 => {
                        let n = 1 + rnd(24);
                        let f = shared0 + rnd(SHARED - n);
                        s.write(id, f * BS as u64, blocks(tag, f, n), false)
                            .await
                            .unwrap();
                    }
                    7 => {
                        let n = 1 + rnd(64);
                        let f = shared0 + rnd(SHARED - n);
                        let got = s
                            .read(id, f * BS as u64, (n * BS as u64) as usize)
                            .await
                            .unwrap();
                        for (i, b) in got.chunks(BS).enumerate() {
                            if b.iter().any(|&x| x != 0) {
                                let tag = u64::from_le_bytes(b[..8].try_into().unwrap());
                                assert_eq!(b, &block(tag, f + i as u64)[..]);
                            }
                        }
                    }
                    8 => {
                        if rnd(4) == 0 {
                            // A snapshot taken under load, then dropped.
                            let c = Uuid::new_v4();
                            s.clone_object(id, c).await.unwrap();
                            let _ = s.read(c, 0, 4 * BS).await.unwrap();
                            s.delete_object(c).await.unwrap();
                        } else {
                            s.flush().await.unwrap();
                        }
                    }
                    _ => {
                        let got = s
                            .read(id, base * BS as u64, (PRIVATE * BS as u64) as usize)
                            .await
                            .unwrap();
                        for (i, b) in got.chunks(BS).enumerate() {
                            let want = if model[i] == 0 {
                                vec![0; BS]
                            } else {
                                block(model[i], base + i as u64)
                            };
                            assert_eq!(b, &want[..], "task {t} block {i}");
                        }
                    }
                }
            }
            model
        }));
    }
    let mut models = Vec::new();
    for h in handles {
        models.push(h.await.unwrap());
    }
    s.flush().await.unwrap();
    let all = s.read(id, 0, (total * BS as u64) as usize).await.unwrap();
    for (t, model) in models.iter().enumerate() {
        for (i, tag) in model.iter().enumerate() {
            let blk = t as u64 * PRIVATE + i as u64;
            let got = &all[blk as usize * BS..(blk as usize + 1) * BS];
            let want = if *tag == 0 {
                vec![0; BS]
            } else {
                block(*tag, blk)
            };
            assert_eq!(got, &want[..]);
        }
    }
    check_shared(&all[(shared0 as usize) * BS..], shared0);
    let stats = s.stats();
    assert_eq!(stats.checksum_errors, 0);
    let info = s.object_info(id).unwrap();
    let s2 = Arc::new(s);
    Arc::try_unwrap(s2).ok().unwrap().close().await.unwrap();
    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert!(report.is_clean() && report.leaked_bytes == 0, "{report:?}");
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(
        s.object_info(id).unwrap(),
        info,
        "accounting survives reopen"
    );
    assert_eq!(
        s.read(id, 0, (total * BS as u64) as usize).await.unwrap(),
        all
    );
    s.close().await.unwrap();
}

/// A read racing the delete of its object returns that object's data or NotFound, never a
/// checksum error or another object's blocks, while a writer refills the freed slots. The
/// race is rarely hit; `freed_slots_wait_for_reads_in_flight` (engine unit test) is the
/// deterministic check that freed slots outlast the reads that planned on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_delete_see_their_data_or_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    const N: u64 = 256;
    for round in 0..8u64 {
        let a = Uuid::new_v4();
        s.create_object(a, N * BS as u64).await.unwrap();
        s.write(a, 0, blocks(round + 1, 0, N), false).await.unwrap();
        s.flush().await.unwrap();
        let mut readers = Vec::new();
        for r in 0..4u64 {
            let s = s.clone();
            readers.push(tokio::spawn(async move {
                let mut k = r;
                loop {
                    let f = (k * 37) % (N - 8);
                    k += 1;
                    match s.read(a, f * BS as u64, 8 * BS).await {
                        Ok(got) => assert_eq!(got, blocks(round + 1, f, 8), "read at block {f}"),
                        Err(StoreError::NotFound(_)) => return k,
                        Err(e) => panic!("read of a deleted object: {e}"),
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        let b = Uuid::new_v4();
        s.create_object(b, N * BS as u64).await.unwrap();
        s.delete_object(a).await.unwrap();
        s.write(b, 0, blocks(100 + round, 0, N), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
        for h in readers {
            assert!(h.await.unwrap() > 0);
        }
        assert_eq!(
            s.read(b, 0, N as usize * BS).await.unwrap(),
            blocks(100 + round, 0, N)
        );
        s.delete_object(b).await.unwrap();
    }
    s.close().await.unwrap();
}

/// A format-1 store (no previous-CRC files) opens: it is upgraded to format 2 (the files are
/// made, the superblock says 2) and reads as before.
#[tokio::test]
async fn format_1_store_is_upgraded() {
    let (tmp, id) = closed_store_with(blocks(7, 0, 4)).await;

    // Make it what format 1 wrote: superblock version 1, no .pcrc files.
    let sbp = tmp.path().join("superblock");
    std::fs::write(&sbp, with_version(std::fs::read(&sbp).unwrap(), 1)).unwrap();
    let pcrc = tmp.path().join("segments/00000000.pcrc");
    std::fs::remove_file(&pcrc).unwrap();
    assert!(cairn::store::fsck(tmp.path(), false).unwrap().is_clean());

    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(s.read(id, 0, 4 * BS).await.unwrap(), blocks(7, 0, 4));
    s.close().await.unwrap();
    assert!(pcrc.exists());
    let sb = std::fs::read(&sbp).unwrap();
    assert_eq!(
        u32::from_le_bytes(sb[8..12].try_into().unwrap()),
        cairn::store::FORMAT_VERSION
    );
}
