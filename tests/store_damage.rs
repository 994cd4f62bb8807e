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
