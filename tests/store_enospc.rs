//! A full filesystem (a small tmpfs mounted for the test; needs root): writes that need space
//! fail with an error and the process lives on (no SIGBUS from the memory-mapped CRC and
//! journal files), and a flush that failed for want of space loses nothing: its changes go
//! into the next flush that succeeds, so after a SIGKILL the reopened store shows them and
//! fsck is clean. (Once, a failed commit dropped its journal records: a discard was undone by
//! the crash while the slots it freed already held another object's data.)
//!
//! The store's journals start at 4 KiB here (small checkpoints), so the discards' records
//! outgrow the journal while the filesystem is full: those discards fail for want of space
//! (their records wait in memory), and so does the flush, until there is room again.
//!
//! The store runs in a child process (this test binary re-run with `CAIRN_ENOSPC_CHILD` set)
//! so that the parent can kill it without a clean close.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::Bytes;
use cairn::store::{Store, StoreOptions};
use uuid::Uuid;

const BS: usize = 4096;
const CHUNK: u64 = 64 * 1024;
const CHUNKS: u64 = 200;
const A: Uuid = Uuid::from_u128(0xA);
const B: Uuid = Uuid::from_u128(0xB);

fn block(tag: u8, i: u64) -> Vec<u8> {
    (0..BS)
        .map(|k| (k as u64 ^ i.wrapping_mul(31)) as u8 ^ tag)
        .collect()
}

/// A tmpfs of `mib` MiB, unmounted on drop (then its mount point goes with the temp dir).
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn new(mib: u32) -> Tmpfs {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir, t)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: files a failed test left open must not keep the mount around.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the filesystem holding `path` with a file there; returns its path.
fn fill(path: &Path) -> PathBuf {
    let p = path.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let mb = vec![0x5au8; 1 << 20];
    while f.write_all(&mb).is_ok() {}
    let small = vec![0x5au8; BS];
    while f.write_all(&small).is_ok() {}
    p
}

fn opts() -> StoreOptions {
    StoreOptions {
        checkpoint_bytes: 4096,
        ..StoreOptions::default()
    }
}

#[test]
fn enospc_child() {
    let Ok(dir) = std::env::var("CAIRN_ENOSPC_CHILD") else {
        return;
    };
    let fs = PathBuf::from(dir);
    let store_dir = fs.join("store");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Store::open(&store_dir, opts()).await.unwrap();
        s.create_object(A, 1 << 30).await.unwrap();
        // One block in each of CHUNKS chunks of A's first 1 MiB stripes (one lane).
        for c in 0..CHUNKS {
            let off = (c / 16) * (2 << 20) + (c % 16) * CHUNK;
            s.write(A, off, Bytes::from(block(1, c)), false)
                .await
                .unwrap();
        }
        s.flush().await.unwrap();

        let filler = fill(&fs);
        // A write that needs a new segment file (the other lane) fails; the process lives.
        let e = s
            .write(A, 1 << 20, Bytes::from(block(9, 0)), false)
            .await
            .expect_err("no space for a new segment");
        println!("@@ write without space: {e}");
        // Discards log records; the journal cannot grow to take them all.
        let mut failed = None;
        for c in 0..CHUNKS {
            let off = (c / 16) * (2 << 20) + (c % 16) * CHUNK;
            if let Err(e) = s.discard(A, off, BS as u64, false).await {
                failed.get_or_insert(e);
            }
        }
        let e = failed.expect("a discard whose records the journal cannot take");
        println!("@@ discard without space: {e}");
        let e = s.flush().await.expect_err("flush without space");
        println!("@@ flush without space: {e}");

        std::fs::remove_file(&filler).unwrap();
        s.flush().await.unwrap();
        // B takes the slots the discards freed.
        s.create_object(B, 1 << 30).await.unwrap();
        for c in 0..CHUNKS {
            s.write(B, c * CHUNK, Bytes::from(block(2, c)), false)
                .await
                .unwrap();
        }
        s.flush().await.unwrap();
        println!("@@ ready");
        std::io::stdout().flush().unwrap();
        // Wait to be killed.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        std::process::exit(3);
    });
}

#[test]
fn full_filesystem_fails_writes_and_keeps_flushed_changes() {
    let fs = Tmpfs::new(12);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args(["--exact", "enospc_child", "--nocapture", "--test-threads=1"])
        .env("CAIRN_ENOSPC_CHILD", &fs.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut events = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        // libtest may print "test enospc_child ... " in front of the first line.
        if let Some(ev) = line.find("@@ ").map(|i| &line[i + 3..]) {
            events.push(ev.to_owned());
            if ev == "ready" {
                break;
            }
        }
    }
    assert_eq!(
        events.last().map(String::as_str),
        Some("ready"),
        "{events:?}"
    );
    assert_eq!(events.len(), 4, "{events:?}");
    for (ev, what) in events.iter().zip(["write", "discard", "flush"]) {
        assert!(
            ev.starts_with(&format!("{what} without space")),
            "{events:?}"
        );
        assert!(ev.to_lowercase().contains("no space"), "{events:?}");
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the child died on its own: {status:?}"
    );

    let store_dir = fs.0.join("store");
    let report = cairn::store::fsck(&store_dir, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Store::open(&store_dir, opts()).await.unwrap();
        // The discards survived the crash: A reads zeros and holds nothing.
        assert_eq!(s.object_info(A).unwrap().allocated_bytes, 0);
        for c in 0..CHUNKS {
            let off = (c / 16) * (2 << 20) + (c % 16) * CHUNK;
            let got = s.read(A, off, BS).await.unwrap();
            assert!(got.iter().all(|&b| b == 0), "A chunk {c} is not zero");
            let got = s.read(B, c * CHUNK, BS).await.unwrap();
            assert_eq!(&got[..], &block(2, c)[..], "B chunk {c}");
        }
        s.close().await.unwrap();
    });
}
