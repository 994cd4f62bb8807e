//! Hostile metadata: random bytes of the checkpoint, or of one journal record, changed with
//! the CRC made to match (damage a CRC catches is covered elsewhere). fsck and open either
//! refuse with an error or give a store that reads, writes, discards, deletes and closes;
//! never a panic (counted by a panic hook, since the store's tasks catch theirs). Run with
//! thousands of cases before the checks at load, it found presence bits past the chunk
//! panicking a copy-up, and slot numbers sizing the slot tables into an out-of-memory kill.
use bytes::Bytes;
use cairn::store::{Store, StoreOptions};
use proptest::prelude::*;
use uuid::Uuid;

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            prev(info);
        }));
    });
}

fn recrc(raw: &mut [u8]) {
    let n = raw.len() - 4;
    let crc = crc32fast::hash(&raw[..n]);
    raw[n..].copy_from_slice(&crc.to_le_bytes());
}

async fn base(dir: &std::path::Path) {
    let s = Store::open(dir, StoreOptions::default()).await.unwrap();
    let a = Uuid::from_u128(1);
    s.create_object(a, 64 << 20).await.unwrap();
    for off in [0u64, 65536, 20 << 20] {
        s.write(a, off, Bytes::from(vec![off as u8 + 1; 8192]), false)
            .await
            .unwrap();
    }
    s.clone_object(a, Uuid::from_u128(2)).await.unwrap();
    s.write(
        Uuid::from_u128(2),
        4096,
        Bytes::from(vec![9u8; 4096]),
        false,
    )
    .await
    .unwrap();
    s.create_object(Uuid::from_u128(3), 100).await.unwrap();
    s.write(Uuid::from_u128(3), 0, Bytes::from(vec![5u8; 100]), false)
        .await
        .unwrap();
    s.close().await.unwrap();
}

async fn exercise(dir: std::path::PathBuf) -> Result<(), String> {
    let _ = cairn::store::fsck(&dir, false);
    let s = match Store::open(&dir, StoreOptions::default()).await {
        Ok(s) => s,
        Err(_) => return Ok(()),
    };
    for (id, info) in s.list_objects() {
        let n = info.size.min(1 << 20) as usize;
        let _ = s.read(id, 0, n).await;
        let _ = s.extents(id, 0, info.size);
        if info.size > 8192 {
            let _ = s.read(id, info.size - 8192, 8192).await;
            let _ = s
                .write(id, info.size - 8192, Bytes::from(vec![1u8; 8192]), false)
                .await;
        }
        let _ = s.write(id, 0, Bytes::from(vec![2u8; 4096]), false).await;
        let _ = s.discard(id, 0, info.size.min(1 << 20), false).await;
    }
    let _ = s.flush().await;
    if let Some((id, _)) = s.list_objects().first() {
        let _ = s.delete_object(*id).await;
    }
    let _ = s.close().await;
    let _ = cairn::store::fsck(&dir, true);
    Ok(())
}

/// A store stopped without a close: its journal holds creates, clones, writes, discards,
/// resizes, deletes and intents.
async fn crashed(dir: &std::path::Path) {
    let s = Store::open(dir, StoreOptions::default()).await.unwrap();
    let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    s.create_object(a, 64 << 20).await.unwrap();
    for off in [0u64, 65536, 20 << 20] {
        s.write(a, off, Bytes::from(vec![off as u8 + 1; 8192]), false)
            .await
            .unwrap();
    }
    s.flush().await.unwrap();
    s.write(a, 0, Bytes::from(vec![7u8; 4096]), false)
        .await
        .unwrap();
    s.clone_object(a, b).await.unwrap();
    s.write(b, 4096, Bytes::from(vec![9u8; 4096]), false)
        .await
        .unwrap();
    s.discard(a, 65536, 4096, false).await.unwrap();
    s.create_object(c, 100).await.unwrap();
    s.write(c, 0, Bytes::from(vec![5u8; 100]), false)
        .await
        .unwrap();
    s.resize(a, 30 << 20).await.unwrap();
    s.delete_object(c).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 100, ..ProptestConfig::default() })]
    #[test]
    fn mutated_journal_record_never_panics(rec in any::<prop::sample::Index>(), muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..3)) {
        count_panics();
        let before = PANICS.load(std::sync::atomic::Ordering::SeqCst);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        rt.block_on(crashed(tmp.path()));
        let j = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("journal-")).unwrap();
        let mut raw = std::fs::read(&j).unwrap();
        // Record boundaries.
        let mut offs = Vec::new();
        let mut off = 40;
        while let Some((_, n)) = cairn::store::format::Record::decode(&raw[off..]) {
            offs.push((off, n));
            off += n;
        }
        prop_assume!(!offs.is_empty());
        let (at, n) = offs[rec.index(offs.len())];
        // Mutate the payload (type byte included), then make the CRC match.
        for (i, v) in &muts {
            raw[at + 8 + i.index(n - 8)] = *v;
        }
        let crc = crc32fast::hash(&raw[at + 8..at + n]);
        raw[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&j, &raw).unwrap();
        let dir = tmp.path().to_path_buf();
        let r = rt.block_on(async move { tokio::spawn(exercise(dir)).await });
        prop_assert!(r.is_ok(), "panicked: {:?}", r);
        prop_assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), before, "a task panicked");
    }

    #[test]
    fn mutated_checkpoint_never_panics(muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        count_panics();
        let before = PANICS.load(std::sync::atomic::Ordering::SeqCst);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        rt.block_on(base(tmp.path()));
        let p = tmp.path().join("checkpoint");
        let mut raw = std::fs::read(&p).unwrap();
        let body = raw.len() - 4;
        // Past the header's magic and version.
        for (i, v) in &muts {
            let at = 12 + i.index(body - 12);
            raw[at] = *v;
        }
        recrc(&mut raw);
        std::fs::write(&p, &raw).unwrap();
        let dir = tmp.path().to_path_buf();
        let r = rt.block_on(async move { tokio::spawn(exercise(dir)).await });
        prop_assert!(r.is_ok(), "panicked: {:?} with {:?}", r, muts);
        prop_assert_eq!(PANICS.load(std::sync::atomic::Ordering::SeqCst), before, "a task panicked with {:?}", muts);
    }
}
