//! Damaged or hostile metadata: refused with an error (never a panic, never healed by
//! throwing committed data away), and reported by fsck.
use std::path::Path;

use bytes::Bytes;
use cairn::store::{Store, StoreError, StoreOptions};
use uuid::Uuid;

fn fill(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ tag)
        .collect()
}

/// A store left as a crash leaves it: `writes` committed (flushed) into the journal, never
/// closed (no checkpoint since). Returns the object id.
async fn crashed_store(dir: &Path, writes: &[(u64, Vec<u8>)]) -> Uuid {
    let s = Store::open(dir, StoreOptions::default()).await.unwrap();
    let id = Uuid::from_u128(7);
    s.create_object(id, 1 << 30).await.unwrap();
    for (off, data) in writes {
        s.write(id, *off, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
    }
    drop(s);
    id
}

fn journals(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("journal-")
        })
        .collect();
    v.sort();
    v
}

fn segment_data_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join("segments/00000000.seg"))
        .unwrap()
        .blocks()
        * 512
}

/// The journal holding committed writes is gone: the store is damaged, and open must not
/// take the checkpoint alone for the truth (and punch the written data as unreferenced).
#[tokio::test]
async fn missing_journal_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    crashed_store(tmp.path(), &[(0, fill(1, 65536))]).await;
    let js = journals(tmp.path());
    assert_eq!(js.len(), 1);
    std::fs::remove_file(&js[0]).unwrap();
    let disk = segment_data_bytes(tmp.path());
    let e = Store::open(tmp.path(), StoreOptions::default())
        .await
        .err()
        .expect("a store without its journal is refused");
    assert!(
        matches!(&e, StoreError::Damaged(m) if m.contains("journal generation")),
        "{e}"
    );
    assert!(matches!(
        cairn::store::fsck(tmp.path(), true),
        Err(StoreError::Damaged(_))
    ));
    assert_eq!(
        segment_data_bytes(tmp.path()),
        disk,
        "written data was punched"
    );
}

/// One flipped byte early in the journal, with later commits intact after it: damage, not a
/// torn tail (a crash tears only the last append). Taking it for a tail dropped every later
/// commit and punched the data they wrote; fsck called the store clean.
#[tokio::test]
async fn damaged_record_before_durable_commits_is_refused() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    crashed_store(
        tmp.path(),
        &[
            (0, fill(1, 65536)),
            (1 << 20, fill(2, 65536)),
            (2 << 20, fill(3, 65536)),
        ],
    )
    .await;
    let js = journals(tmp.path());
    assert_eq!(js.len(), 1);
    // Header (40 bytes), then the CreateObject record: flip a byte of its payload.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&js[0])
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 40 + 12).unwrap();
    f.write_all_at(&[b[0] ^ 1], 40 + 12).unwrap();
    drop(f);
    let disk = segment_data_bytes(tmp.path());
    let e = Store::open(tmp.path(), StoreOptions::default())
        .await
        .err()
        .expect("a journal damaged before durable commits is refused");
    assert!(
        matches!(&e, StoreError::Damaged(m) if m.contains("not a torn tail")),
        "{e}"
    );
    assert!(matches!(
        cairn::store::fsck(tmp.path(), true),
        Err(StoreError::Damaged(_))
    ));
    assert_eq!(
        segment_data_bytes(tmp.path()),
        disk,
        "written data was punched"
    );
}

/// A torn last append (its Commit cut off, or intact after a torn record of the same
/// append) is still a torn tail: dropped, and the store opens.
#[tokio::test]
async fn torn_last_append_is_still_dropped() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let id = crashed_store(
        tmp.path(),
        &[(0, fill(1, 65536)), (1 << 20, fill(2, 65536))],
    )
    .await;
    let j = journals(tmp.path()).pop().unwrap();
    let raw = std::fs::read(&j).unwrap();
    // The journal ends with the second write's SetEntry (9 + 32 bytes) and the commit that
    // covers it (9 + 16): damage the SetEntry; the commit stays intact.
    let recs = journal_records(&raw);
    let (set_entry, commit) = (recs[recs.len() - 2], recs[recs.len() - 1]);
    assert_eq!((set_entry.1 - set_entry.0, commit.1 - commit.0), (41, 25));
    let set_entry = set_entry.0;
    let f = std::fs::OpenOptions::new().write(true).open(&j).unwrap();
    f.write_all_at(&[raw[set_entry + 20] ^ 1], set_entry as u64 + 20)
        .unwrap();
    drop(f);
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(s.read(id, 0, 65536).await.unwrap(), fill(1, 65536));
    assert_eq!(
        s.read(id, 1 << 20, 65536).await.unwrap(),
        vec![0u8; 65536],
        "the torn batch is dropped"
    );
    s.close().await.unwrap();
}

fn recrc(raw: &mut [u8]) {
    let n = raw.len() - 4;
    let crc = crc32fast::hash(&raw[..n]);
    raw[n..].copy_from_slice(&crc.to_le_bytes());
}

/// Where each record of a journal file starts and ends, up to the zeros of its preallocated
/// end.
fn journal_records(raw: &[u8]) -> Vec<(usize, usize)> {
    let mut off = cairn::store::format::JOURNAL_HEADER;
    let mut v = Vec::new();
    while let Some((_, n)) = cairn::store::format::Record::decode(&raw[off..]) {
        v.push((off, off + n));
        off += n;
    }
    v
}

/// Append `records` and a Commit to the store's last journal, as a committed batch.
fn append_committed(dir: &Path, records: &[cairn::store::format::Record]) {
    let j = journals(dir).pop().unwrap();
    let mut raw = std::fs::read(&j).unwrap();
    let end = journal_records(&raw)
        .last()
        .map_or(cairn::store::format::JOURNAL_HEADER, |r| r.1);
    let mut add = Vec::new();
    for r in records {
        r.encode(&mut add);
    }
    cairn::store::format::Record::Commit { seq: 1000 }.encode(&mut add);
    if raw.len() < end + add.len() {
        raw.resize(end + add.len(), 0);
    }
    raw[end..end + add.len()].copy_from_slice(&add);
    std::fs::write(&j, &raw).unwrap();
}

/// `r` is the refusal of a damaged store, its message naming `what`.
fn assert_damaged<T>(r: &Result<T, StoreError>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::Damaged(m)) if m.contains(what)),
        "want damage naming {what:?}: {:?}",
        r.as_ref().err()
    );
}

/// A cleanly closed store holding one object of `size` bytes with `writes`.
async fn closed_store(dir: &Path, size: u64, writes: &[(u64, Vec<u8>)]) -> Uuid {
    let s = Store::open(dir, StoreOptions::default()).await.unwrap();
    let id = Uuid::from_u128(7);
    s.create_object(id, size).await.unwrap();
    for (off, data) in writes {
        s.write(id, *off, Bytes::from(data.clone()), false)
            .await
            .unwrap();
    }
    s.close().await.unwrap();
    id
}

/// Open in a task of its own, so that a panic is an outcome rather than the test's end.
async fn open_outcome(dir: &Path) -> Result<Option<StoreError>, tokio::task::JoinError> {
    let dir = dir.to_path_buf();
    tokio::spawn(async move { Store::open(&dir, StoreOptions::default()).await.err() }).await
}

/// A checkpoint (its CRC intact) whose map points at slot u32::MAX: an error, not a panic
/// (nor, for a slot somewhat lower, tens of GiB of slot tables).
#[tokio::test]
async fn checkpoint_slot_past_the_segments_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    let p = tmp.path().join("checkpoint");
    let mut raw = std::fs::read(&p).unwrap();
    // Magic 8, version 4, next generation 8, sequence 8, node count 4; then the one leaf:
    // kind 1, count 2, then (key 1, slot 4, present 8).
    assert_eq!((raw[32], raw[33]), (0, 1));
    raw[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
    recrc(&mut raw);
    std::fs::write(&p, &raw).unwrap();
    let r = open_outcome(tmp.path()).await;
    assert!(
        matches!(&r, Ok(Some(StoreError::Damaged(m))) if m.contains("slot 4294967295")),
        "{r:?}"
    );
    assert!(matches!(
        cairn::store::fsck(tmp.path(), false),
        Err(StoreError::Damaged(_))
    ));
}

/// Journal records (their CRCs intact) naming slot u32::MAX or intent region u32::MAX.
#[tokio::test]
async fn journal_records_past_the_segments_are_errors() {
    use cairn::store::format::Record;
    for rec in [
        Record::SetEntry {
            id: Uuid::from_u128(7),
            chunk: 0,
            slot: u32::MAX,
            present: 1,
        },
        Record::Intent { region: u32::MAX },
    ] {
        let tmp = tempfile::tempdir().unwrap();
        closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
        append_committed(tmp.path(), std::slice::from_ref(&rec));
        let r = open_outcome(tmp.path()).await;
        assert!(
            matches!(&r, Ok(Some(StoreError::Damaged(m))) if m.contains("4294967295")),
            "{rec:?}: {r:?}"
        );
        assert!(matches!(
            cairn::store::fsck(tmp.path(), false),
            Err(StoreError::Damaged(_))
        ));
    }
}

/// A checkpoint (its CRC intact) whose object says depth 1 while its root is an inner node:
/// an error, not a panic in the map walks.
#[tokio::test]
async fn checkpoint_depth_that_differs_from_the_tree_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // 64 MiB: 1024 chunks, a two-level map.
    closed_store(tmp.path(), 64 << 20, &[(0, fill(1, 4096))]).await;
    let p = tmp.path().join("checkpoint");
    let good = std::fs::read(&p).unwrap();
    // The last object record: id 16, size 8, depth 1, root 4; then the CRC.
    let at = good.len() - 4 - 4 - 1;
    assert_eq!(good[at], 2);
    for depth in [1u8, 3] {
        let mut raw = good.clone();
        raw[at] = depth;
        recrc(&mut raw);
        std::fs::write(&p, &raw).unwrap();
        let r = open_outcome(tmp.path()).await;
        assert!(
            matches!(&r, Ok(Some(StoreError::Damaged(m))) if m.contains("depth")),
            "depth {depth}: {r:?}"
        );
        assert!(matches!(
            cairn::store::fsck(tmp.path(), false),
            Err(StoreError::Damaged(_))
        ));
    }
}

/// The last segment, referenced by no map, as a crash in its creation leaves it (the data
/// file made but not yet sized; or sized, without its CRC files): the store still opens
/// (and completes it), and fsck notes it rather than failing. A referenced segment cut
/// short is still refused.
#[tokio::test]
async fn segment_whose_creation_was_cut_short_does_not_brick_the_store() {
    for sized in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let id = closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
        let seg = std::fs::File::create(tmp.path().join("segments/00000001.seg")).unwrap();
        if sized {
            seg.set_len(1 << 30).unwrap();
        }
        drop(seg);
        let report = cairn::store::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert!(
            report.notes.iter().any(|n| n.starts_with("segment 1:")),
            "{report:?}"
        );
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("sized {sized}: {e}"));
        assert_eq!(s.read(id, 0, 4096).await.unwrap(), fill(1, 4096));
        s.close().await.unwrap();
        let report = cairn::store::fsck(tmp.path(), false).unwrap();
        assert!(report.is_clean() && report.notes.is_empty(), "{report:?}");
    }
    // Segment 0 holds the object's data: cut short, it is refused.
    let tmp = tempfile::tempdir().unwrap();
    closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    std::fs::File::options()
        .write(true)
        .open(tmp.path().join("segments/00000000.seg"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = Store::open(tmp.path(), StoreOptions::default())
        .await
        .err()
        .expect("a referenced segment cut short is refused");
    assert!(e.to_string().contains("truncated"), "{e}");
    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert!(!report.is_clean(), "{report:?}");
}

/// A format-2 store stopped by a crash with an intent region marked, one block there
/// damaged (not written since its commit), and the segment's `.pcrc` lost. fsck must call
/// that block damage, and `--repair` must not take it for a torn write and give it a CRC
/// that matches the damage.
#[tokio::test]
async fn lost_previous_crcs_do_not_make_damage_a_torn_write() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let chunk = fill(1, 65536);
    // Chunk 0 written, then its block 0 rewritten in place: the region has an intent.
    let id = crashed_store(tmp.path(), &[(0, chunk.clone()), (0, fill(2, 4096))]).await;
    // Damage block 5, which the second write did not touch.
    let seg_path = tmp.path().join("segments/00000000.seg");
    let seg = std::fs::read(&seg_path).unwrap();
    let at = seg
        .chunks(4096)
        .position(|b| b == &chunk[5 * 4096..6 * 4096])
        .unwrap() as u64
        * 4096;
    drop(seg);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg_path)
        .unwrap();
    f.write_all_at(b"rot", at + 100).unwrap();
    drop(f);
    std::fs::remove_file(tmp.path().join("segments/00000000.pcrc")).unwrap();

    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert_eq!(report.intent_regions, 1, "{report:?}");
    assert_eq!(
        (report.checksum_errors, report.unflushed_blocks),
        (1, 0),
        "{report:?}"
    );
    assert!(
        report.errors.iter().any(|e| e.contains("00000000.pcrc")),
        "{report:?}"
    );
    let report = cairn::store::fsck(tmp.path(), true).unwrap();
    assert!(report.repaired.is_empty(), "{report:?}");
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap();
    let r = s.read(id, 5 * 4096, 4096).await;
    assert!(matches!(r, Err(StoreError::Checksum { .. })), "{r:?}");
    assert_eq!(s.read(id, 0, 4096).await.unwrap(), fill(2, 4096));
    s.close().await.unwrap();
}

/// A checkpoint (its CRC intact) giving an object a size past the largest an object can
/// have (2^32 chunks): refused. Chunk indices are u32, so a write past 2^32 chunks landed
/// on chunk (index mod 2^32), overwriting the object's own data.
#[tokio::test]
async fn object_size_past_the_maximum_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let id = closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    let p = tmp.path().join("checkpoint");
    let mut raw = std::fs::read(&p).unwrap();
    // The object record: id 16, size 8, depth 1, root 4; then the CRC.
    let at = raw.len() - 4 - 4 - 1 - 8;
    assert_eq!(raw[at..at + 8], (1u64 << 20).to_le_bytes());
    let max = (1u64 << 32) * 65536;
    raw[at..at + 8].copy_from_slice(&(max + 65536).to_le_bytes());
    recrc(&mut raw);
    std::fs::write(&p, &raw).unwrap();
    let r = Store::open(tmp.path(), StoreOptions::default()).await;
    if let Ok(s) = &r {
        // What the size let through: chunk 2^32 is chunk 0.
        s.write(id, max, Bytes::from(vec![0xEEu8; 4096]), false)
            .await
            .unwrap();
        assert!(
            s.read(id, 0, 4096).await.unwrap() == fill(1, 4096),
            "a write past 2^32 chunks overwrote chunk 0"
        );
    }
    assert_damaged(&r, "size");
    // The same size from a committed Resize in the journal.
    let tmp = tempfile::tempdir().unwrap();
    let id = closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    use cairn::store::format::Record;
    append_committed(
        tmp.path(),
        &[Record::Resize {
            id,
            size: max + 65536,
        }],
    );
    assert_damaged(
        &Store::open(tmp.path(), StoreOptions::default()).await,
        "size",
    );
}

/// A map entry whose presence bitmap has bits past the chunk's blocks (a 64 KiB chunk has
/// 16): in the checkpoint (its CRC intact) or a committed SetEntry, refused. Taken as it
/// was, the object counted blocks it does not have, block status reported data in the next
/// chunks' range, and a write to the chunk (copying those "blocks" up) panicked the I/O
/// path ("read op past its buffer"), after which dropping the store hung.
#[tokio::test]
async fn presence_bits_past_the_chunk_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let id = closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    let p = tmp.path().join("checkpoint");
    let mut raw = std::fs::read(&p).unwrap();
    // The one leaf's entry: key at 35, slot 36..40, present 40..48.
    assert_eq!(raw[40..48], 1u64.to_le_bytes());
    raw[40..48].copy_from_slice(&(1u64 | 1 << 40).to_le_bytes());
    recrc(&mut raw);
    std::fs::write(&p, &raw).unwrap();
    let r = Store::open(tmp.path(), StoreOptions::default()).await;
    if let Ok(s) = &r {
        let info = s.object_info(id).unwrap();
        let ext = s.extents(id, 0, 1 << 20).unwrap();
        assert_eq!(
            info.allocated_bytes, 4096,
            "a block past the chunk counted; extents {ext:?}"
        );
    }
    assert_damaged(&r, "presence");

    // The same bitmap from a committed SetEntry in the journal.
    let tmp = tempfile::tempdir().unwrap();
    let id = closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    use cairn::store::format::Record;
    append_committed(
        tmp.path(),
        &[Record::SetEntry {
            id,
            chunk: 1,
            slot: 5,
            present: 1 << 20,
        }],
    );
    assert_damaged(
        &Store::open(tmp.path(), StoreOptions::default()).await,
        "presence",
    );
}

/// A format-1 store whose upgrade a crash cut short while it made a `.pcrc` (the file
/// created, not yet allocated): the next open completes the upgrade.
#[tokio::test]
async fn upgrade_cut_short_while_making_a_pcrc_is_completed() {
    let tmp = tempfile::tempdir().unwrap();
    let id = closed_store(tmp.path(), 1 << 20, &[(0, fill(1, 4096))]).await;
    let sbp = tmp.path().join("superblock");
    let mut sb = std::fs::read(&sbp).unwrap();
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    recrc(&mut sb);
    std::fs::write(&sbp, &sb).unwrap();
    let pcrc = tmp.path().join("segments/00000000.pcrc");
    std::fs::write(&pcrc, b"").unwrap();
    let s = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.read(id, 0, 4096).await.unwrap(), fill(1, 4096));
    s.close().await.unwrap();
    assert_eq!(
        std::fs::metadata(&pcrc).unwrap().len(),
        (1 << 30) / 4096 * 4
    );
    assert_eq!(
        u32::from_le_bytes(std::fs::read(&sbp).unwrap()[8..12].try_into().unwrap()),
        cairn::store::FORMAT_VERSION
    );
}

/// A file named like an old journal that is another store's (or no journal at all) is not
/// this store's to delete: open leaves it, byte for byte, and fsck mentions it. Found by
/// review: open deleted every `journal-N` below its checkpoint's generation unread.
#[tokio::test]
async fn journal_named_file_of_another_store_is_left_alone() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let data = fill(3, 65536);
    let id = closed_store(ours.path(), 1 << 30, &[(0, data.clone())]).await;
    closed_store(theirs.path(), 1 << 20, &[(4096, fill(4, 4096))]).await;
    // Each open checkpoints into a new generation: after these, generation 0 is stale.
    Store::open(ours.path(), StoreOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let their_journal = journals(theirs.path()).pop().unwrap();
    let foreign = std::fs::read(&their_journal).unwrap();
    let garbage = b"not a journal at all".to_vec();
    let name = |g: u64| ours.path().join(format!("journal-{g:016}"));
    assert!(
        journals(ours.path())
            .iter()
            .all(|p| *p != name(0) && *p != name(1))
    );
    std::fs::write(name(0), &foreign).unwrap();
    std::fs::write(name(1), &garbage).unwrap();

    let s = Store::open(ours.path(), StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(&s.read(id, 0, data.len()).await.unwrap()[..], &data[..]);
    s.close().await.unwrap();
    assert_eq!(std::fs::read(name(0)).unwrap(), foreign);
    assert_eq!(std::fs::read(name(1)).unwrap(), garbage);

    let report = cairn::store::fsck(ours.path(), false).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for g in [0, 1] {
        let file = name(g).display().to_string();
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains(&file) && n.contains("not this store's")),
            "{file} not mentioned: {:?}",
            report.notes
        );
    }
}
