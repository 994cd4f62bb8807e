//! A segment fsync that fails loses the writes it could not write back: Linux marks those
//! pages clean and reports the error once per open file, so the same fsync retried returns
//! success over data that is not on the device (PostgreSQL's "fsyncgate"). A commit that
//! gave its batch back and let the next commit sync "again" acknowledged a flush whose data
//! was gone.
//!
//! The device: an ext4 on a loop device whose image is a sparse file on a small tmpfs. With
//! that tmpfs full, writeback of newly allocated blocks fails (the loop device cannot grow
//! its image); with room again, it works. Remounting the ext4 drops its page cache, which
//! leaves what reached the device, as a power loss does. Needs root and a loop device
//! (skipped, with a message, without one).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use cairn::store::{Store, StoreOptions};
use uuid::Uuid;

const BS: usize = 4096;
const A: Uuid = Uuid::from_u128(0xF5);

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// tmpfs at `base/t` holding the image of an ext4 on a loop device, mounted at `base/m`.
struct LoopFs {
    tmpfs: PathBuf,
    mnt: PathBuf,
    dev: String,
}

impl LoopFs {
    fn new(base: &Path) -> Option<LoopFs> {
        let (tmpfs, mnt) = (base.join("t"), base.join("m"));
        std::fs::create_dir_all(&tmpfs).ok()?;
        std::fs::create_dir_all(&mnt).ok()?;
        run(
            "mount",
            &["-t", "tmpfs", "-o", "size=48m", "tmpfs", tmpfs.to_str()?],
        )?;
        let mut fs = LoopFs {
            tmpfs,
            mnt,
            dev: String::new(),
        };
        let img = fs.tmpfs.join("disk.img");
        std::fs::File::create(&img).ok()?.set_len(256 << 20).ok()?;
        fs.dev = run("losetup", &["-f", "--show", img.to_str()?])?;
        // Everything mkfs lays out is written now, so only file data needs new image space.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &fs.dev,
            ],
        )?;
        fs.mount()?;
        Some(fs)
    }

    fn mount(&self) -> Option<String> {
        run(
            "mount",
            &["-o", "errors=continue", &self.dev, self.mnt.to_str()?],
        )
    }

    /// Drop the ext4's page cache: what is left is what reached the device. A closed store
    /// holds nothing open there (its rings let go of their registered files on close).
    fn remount(&self) {
        let mnt = self.mnt.to_str().unwrap();
        run("umount", &[mnt]).expect("umount: the closed store still holds files open");
        self.mount().expect("mount again");
    }

    /// Fill the tmpfs under the image; returns the filler's path.
    fn fill(&self) -> PathBuf {
        let p = self.tmpfs.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        for size in [1 << 20, BS] {
            let buf = vec![0x5au8; size];
            while f.write_all(&buf).is_ok() {}
        }
        p
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.tmpfs).status();
    }
}

fn block(tag: u8) -> Vec<u8> {
    (0..BS).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

#[test]
fn a_flush_after_a_failed_segment_sync_does_not_acknowledge_lost_data() {
    let base = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::new(base.path()) else {
        eprintln!("SKIPPED: needs root, a loop device and mkfs.ext4");
        return;
    };
    let dir = fs.mnt.join("store");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let second = rt.block_on(async {
        let s = Store::open(&dir, StoreOptions::default()).await.unwrap();
        s.create_object(A, 1 << 20).await.unwrap();
        s.write(A, 0, Bytes::from(block(1)), false).await.unwrap();
        s.flush().await.unwrap();

        let filler = fs.fill();
        // A new chunk: its block is allocated at writeback, where the image cannot grow.
        s.write(A, 64 << 10, Bytes::from(block(2)), false)
            .await
            .unwrap();
        let e = s.flush().await.expect_err("the segment sync fails");
        eprintln!("first flush: {e}");
        std::fs::remove_file(&filler).unwrap();
        let second = s.flush().await;
        eprintln!("second flush: {second:?}");
        drop(s);
        second.is_ok()
    });
    // Every task and blocking thread that held the store's files is gone after this.
    drop(rt);
    fs.remount();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Store::open(&dir, StoreOptions::default()).await.unwrap();
        assert_eq!(s.read(A, 0, BS).await.unwrap(), block(1));
        let got = s.read(A, 64 << 10, BS).await;
        if second {
            // Acknowledged: it must be there.
            assert_eq!(
                got.as_deref().ok(),
                Some(&block(2)[..]),
                "a flush returned Ok and its data is gone: {:?}",
                got.as_ref().map(|b| b[..8].to_vec())
            );
        } else {
            // Never acknowledged: zeros (the commit did not happen) or the data.
            let got = got.unwrap();
            assert!(got.iter().all(|&b| b == 0) || got[..] == block(2)[..]);
        }
        s.close().await.unwrap();
    });
    let report = cairn::store::fsck(&dir, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}
