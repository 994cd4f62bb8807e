//! Crash test: a child process writes, discards, clones and flushes while the parent kills
//! it with SIGKILL at a random point of its progress, many times over one store. After each
//! kill: fsck finds no damage; the reopened store reads every acknowledged write and discard
//! back exactly, flushed or not (a process crash leaves the page cache, and the store promises
//! that much), and anything else only as the content of an op that was issued; fsck is clean
//! again.
//!
//! The child is this test binary re-run with `CAIRN_CRASH_CHILD` set (see `crash_child`).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use bytes::Bytes;
use cairn::store::{Store, StoreOptions};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use uuid::Uuid;

const BS: usize = 4096;
const BLOCKS: usize = 2048; // an 8 MiB object
const OBJ: Uuid = Uuid::from_u128(0xC0FFEE);
const SNAP: Uuid = Uuid::from_u128(0x5AA9);

/// Block content for op `tag` at object block `blk`: a header naming both, then filler
/// derived from them, so any block read back says which write produced it.
fn block(tag: u64, blk: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS);
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&blk.to_le_bytes());
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ blk;
    while v.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn opts() -> StoreOptions {
    // Tiny journals: checkpoints (and crashes in the middle of them) happen often.
    StoreOptions {
        checkpoint_bytes: 16 * 1024,
        ..StoreOptions::default()
    }
}

/// The child's side. Protocol on stdout, one `@@ `-prefixed line per event, printed *before* the op is
/// issued (`W tag first count`, `T tag first count` for a discard) or *after* it is
/// acknowledged (`A tag`: the op returned) or durable (`F tag`: every op up to tag is flushed;
/// `D tag`: that FUA write is durable).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("CAIRN_CRASH_CHILD") else {
        return;
    };
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED").unwrap().parse().unwrap();
    let base: u64 = std::env::var("CAIRN_CRASH_TAG").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Store::open(std::path::Path::new(&dir), opts())
            .await
            .unwrap();
        if store.object_info(OBJ).is_err() {
            store
                .create_object(OBJ, (BLOCKS * BS) as u64)
                .await
                .unwrap();
            println!("@@ C");
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tag = base;
        loop {
            let dice = rng.random_range(0..100);
            if dice < 60 {
                // Up to four concurrent writes to disjoint ranges.
                let n = rng.random_range(1..=4);
                let mut futs = Vec::new();
                let mut used: Vec<(usize, usize)> = Vec::new();
                for _ in 0..n {
                    let count = rng.random_range(1..=40usize);
                    let first = rng.random_range(0..BLOCKS - count);
                    if used
                        .iter()
                        .any(|&(f, c)| first < f + c && f < first + count)
                    {
                        continue;
                    }
                    used.push((first, count));
                    tag += 1;
                    let fua = rng.random_range(0..10) == 0;
                    let mut data = Vec::with_capacity(count * BS);
                    for b in first..first + count {
                        data.extend_from_slice(&block(tag, b as u64));
                    }
                    println!("@@ W {tag} {first} {count}");
                    let (s, t) = (store.clone(), tag);
                    futs.push(tokio::spawn(async move {
                        s.write(OBJ, (first * BS) as u64, Bytes::from(data), fua)
                            .await
                            .unwrap();
                        println!("@@ {} {t}", if fua { "D" } else { "A" });
                    }));
                }
                for f in futs {
                    f.await.unwrap();
                }
            } else if dice < 70 {
                tag += 1;
                let count = rng.random_range(1..=64usize);
                let first = rng.random_range(0..BLOCKS - count);
                println!("@@ T {tag} {first} {count}");
                store
                    .discard(OBJ, (first * BS) as u64, (count * BS) as u64, false)
                    .await
                    .unwrap();
                println!("@@ A {tag}");
            } else if dice < 75 {
                // A snapshot that takes part in copy-on-write, then goes away.
                if store.object_info(SNAP).is_ok() {
                    store.delete_object(SNAP).await.unwrap();
                } else {
                    store.clone_object(OBJ, SNAP).await.unwrap();
                }
            } else {
                store.flush().await.unwrap();
                println!("@@ F {tag}");
            }
        }
    });
}

#[derive(Clone, Copy)]
enum Kind {
    Write,
    Trim,
}

#[test]
fn kill9_loses_nothing_acknowledged() {
    let iterations: u64 = std::env::var("CAIRN_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(0x5EED ^ iterations);
    // What each block holds after the last iteration: Some(tag) or None (zeros).
    let mut held: Vec<Option<u64>> = vec![None; BLOCKS];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut total_kills = 0;
    for it in 0..iterations {
        let base = (it + 1) * 1_000_000;
        let kill_after = rng.random_range(1..400usize);
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("CAIRN_CRASH_CHILD", &dir)
            .env("CAIRN_CRASH_SEED", rng.random::<u64>().to_string())
            .env("CAIRN_CRASH_TAG", base.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        let mut line = String::new();
        // Kill after a random amount of progress (not time): the child keeps going while we
        // read, so the kill lands anywhere in its op stream.
        while lines.len() < kill_after {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // libtest's "test crash_child ... " has no newline: find the marker anywhere.
            if let Some(i) = line.find("@@ ") {
                lines.push(line[i + 3..].trim().to_string());
            }
        }
        child.kill().unwrap();
        for l in out.lines() {
            let l = l.unwrap();
            if let Some(i) = l.find("@@ ") {
                lines.push(l[i + 3..].trim().to_string());
            }
        }
        child.wait().unwrap();
        total_kills += 1;

        // Replay the child's log against the model.
        let mut ops: Vec<(u64, Kind, usize, usize)> = Vec::new();
        // Acknowledged (returned) or durable (FUA): either way present after a process crash.
        let mut acked: std::collections::HashSet<u64> = Default::default();
        let mut flushed_upto = base;
        for l in &lines {
            let f: Vec<&str> = l.split(' ').collect();
            match f[0] {
                "W" | "T" => ops.push((
                    f[1].parse().unwrap(),
                    if f[0] == "W" { Kind::Write } else { Kind::Trim },
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                )),
                "F" => flushed_upto = flushed_upto.max(f[1].parse().unwrap()),
                "A" | "D" => {
                    acked.insert(f[1].parse().unwrap());
                }
                _ => {}
            }
        }
        // Per block: the latest acknowledged op (or the previous iteration's content), then
        // any later op may or may not have landed. (Ops on one block never overlap: each
        // group of writes is disjoint and waited for before the next op.)
        let mut latest: Vec<Option<Option<u64>>> = vec![None; BLOCKS]; // Some(content) if an op is acknowledged
        let mut later: Vec<Vec<Option<u64>>> = vec![Vec::new(); BLOCKS];
        for &(tag, kind, first, count) in &ops {
            let content = match kind {
                Kind::Write => Some(tag),
                Kind::Trim => None,
            };
            let is_acked = tag <= flushed_upto || acked.contains(&tag);
            for b in first..first + count {
                if is_acked {
                    latest[b] = Some(content);
                    later[b].clear();
                } else {
                    later[b].push(content);
                }
            }
        }

        // fsck before reopening: an unflushed tail is a note, never an error.
        let report = cairn::store::fsck(&dir, false).unwrap();
        assert!(
            report.is_clean(),
            "iteration {it}: fsck after kill: {report:?}"
        );

        let got = rt.block_on(async {
            let s = Store::open(&dir, opts()).await.unwrap();
            let data = s
                .read(OBJ, 0, BLOCKS * BS)
                .await
                .unwrap_or_else(|e| panic!("iteration {it}: read: {e}"));
            s.close().await.unwrap();
            data
        });
        let mut next = held.clone();
        for b in 0..BLOCKS {
            let have = &got[b * BS..(b + 1) * BS];
            let content = if have.iter().all(|&x| x == 0) {
                None
            } else {
                let tag = u64::from_le_bytes(have[..8].try_into().unwrap());
                assert_eq!(
                    have,
                    &block(tag, b as u64)[..],
                    "iteration {it}: block {b} is not any write's content"
                );
                Some(tag)
            };
            let must = latest[b].unwrap_or(held[b]);
            assert!(
                content == must || later[b].contains(&content),
                "iteration {it}: block {b} holds {content:?}, acknowledged content was {must:?}, later ops {:?}",
                later[b]
            );
            next[b] = content;
        }
        held = next;
        let report = cairn::store::fsck(&dir, false).unwrap();
        assert!(
            report.is_clean(),
            "iteration {it}: fsck after reopen: {report:?}"
        );
        assert_eq!(report.leaked_bytes, 0, "iteration {it}: {report:?}");
        assert_eq!(report.unflushed_blocks, 0, "iteration {it}: {report:?}");
    }
    assert_eq!(total_kills, iterations);
}
