//! Crash recovery re-checksums the blocks of regions that were being written in place, and
//! accepts there only what a crash can leave: the data of the last write or of the one
//! before it. A block of the same region that was not written and is damaged stays a
//! checksum error (recovery once took every mismatch in such a region for a torn write).
//!
//! The writer is this test binary re-run with `CAIRN_HEAL_CHILD` set, killed with SIGKILL.
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use cairn::store::{Store, StoreError, StoreOptions};
use uuid::Uuid;

const BS: usize = 4096;
const CHUNK: u64 = 64 * 1024;
const OBJ: Uuid = Uuid::from_u128(0x4EA1);

fn data(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ tag)
        .collect()
}

#[test]
fn heal_child() {
    let Ok(dir) = std::env::var("CAIRN_HEAL_CHILD") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Store::open(Path::new(&dir), StoreOptions::default())
            .await
            .unwrap();
        // Chunk 0 rewritten in place (its region gets an intent), twice, flushed.
        s.write(OBJ, 0, Bytes::from(data(2, CHUNK as usize)), false)
            .await
            .unwrap();
        s.write(OBJ, 0, Bytes::from(data(3, CHUNK as usize)), false)
            .await
            .unwrap();
        s.flush().await.unwrap();
        println!("@@ ready");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        std::process::exit(3);
    });
}

#[test]
fn damage_next_to_an_in_place_write_is_not_healed() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        s.create_object(OBJ, 1 << 30).await.unwrap();
        s.write(OBJ, 0, Bytes::from(data(1, 2 * CHUNK as usize)), false)
            .await
            .unwrap();
        s.close().await.unwrap();
    });

    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args(["--exact", "heal_child", "--nocapture", "--test-threads=1"])
        .env("CAIRN_HEAL_CHILD", tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let ready = out
        .lines()
        .map(|l| l.unwrap())
        .any(|l| l.ends_with("@@ ready"));
    assert!(ready, "the child did not get ready");
    child.kill().unwrap();
    child.wait().unwrap();

    // Damage one block of chunk 1 (same region, not written since its commit).
    let seg = tmp.path().join("segments/00000000.seg");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let want = data(1, 2 * CHUNK as usize);
    let needle = &want[CHUNK as usize..CHUNK as usize + BS];
    let mut off = None;
    let mut buf = vec![0u8; BS];
    for i in 0..1024u64 {
        f.read_exact_at(&mut buf, i * BS as u64).unwrap();
        if buf == needle {
            off = Some(i * BS as u64);
            break;
        }
    }
    let off = off.expect("chunk 1's first block is in segment 0");
    f.write_all_at(&[!needle[100]], off + 100).unwrap();
    drop(f);

    let report = cairn::store::fsck(tmp.path(), false).unwrap();
    assert_eq!(report.checksum_errors, 1, "{report:?}");

    rt.block_on(async {
        let s = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        let got = s.read(OBJ, 0, CHUNK as usize).await.unwrap();
        assert_eq!(
            &got[..],
            &data(3, CHUNK as usize)[..],
            "the flushed rewrite"
        );
        let e = s.read(OBJ, CHUNK, BS).await.unwrap_err();
        assert!(matches!(e, StoreError::Checksum { .. }), "{e}");
        let got = s
            .read(OBJ, CHUNK + BS as u64, CHUNK as usize - BS)
            .await
            .unwrap();
        assert_eq!(&got[..], &want[CHUNK as usize + BS..]);
        s.close().await.unwrap();
    });
}
