//! Criterion micro-benchmarks of the chunk store: 4 KiB random and 1 MiB sequential I/O on a
//! preallocated 1 GiB object (QD1 latency and time per op at a fixed concurrency), clone cost
//! for 1 GiB vs 1 TiB objects, and CRC32 throughput.
//!
//! Data lives in a temp dir under cargo's target dir (same disk as the repo, not tmpfs);
//! `CAIRN_BENCH_TMP` overrides it. Buffered I/O on a warm page cache: these measure the
//! store's CPU path, not the disk. Writes are acknowledged, not durable (no flush per op).
//! `scripts/bench/store` is the store-vs-plain-file comparison.
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn::store::{Store, StoreOptions};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use uuid::Uuid;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;
/// The I/O object: written fully once, then overwritten in place.
const OBJ_SIZE: u64 = GIB;
const QD_4K: usize = 32;
const QD_1M: usize = 8;
/// Chunks mapped in the dense 1 TiB clone source: 8x the 1 GiB object's 16 Ki chunks, one
/// 4 KiB block each so that setting it up stays quick.
const MANY_CHUNKS: u64 = 128 * 1024;

/// A temp dir on the disk the repo lives on: under cargo's target dir (found from the bench
/// binary's own path: `<target>/release/deps/store-*`), unless `CAIRN_BENCH_TMP` says otherwise.
fn bench_tmp() -> PathBuf {
    if let Some(d) = std::env::var_os("CAIRN_BENCH_TMP") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("bench binary path");
    let target = exe
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench-tmp")
}

/// splitmix64: cheap, seedable, good enough to spread offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A random `bs`-aligned offset of a `bs`-sized op inside `size`.
    fn offset(&mut self, size: u64, bs: u64) -> u64 {
        self.next() % (size / bs) * bs
    }
}

fn pattern(len: usize, seed: u64) -> Bytes {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

struct Fixture {
    rt: Runtime,
    store: Store,
    obj: Uuid,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let base = bench_tmp();
        std::fs::create_dir_all(&base).expect("create bench tmp dir");
        let dir = tempfile::Builder::new()
            .prefix("criterion-store-")
            .tempdir_in(&base)
            .expect("temp dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let obj = Uuid::new_v4();
        let store = rt.block_on(async {
            let store = Store::open(dir.path(), StoreOptions::default())
                .await
                .expect("open store");
            store.create_object(obj, OBJ_SIZE).await.expect("create");
            let data = pattern(MIB as usize, 1);
            for off in (0..OBJ_SIZE).step_by(MIB as usize) {
                store
                    .write(obj, off, data.clone(), false)
                    .await
                    .expect("fill");
            }
            store.flush().await.expect("flush");
            // Warm the page cache (and the CRC map) for the read benches.
            for off in (0..OBJ_SIZE).step_by(MIB as usize) {
                black_box(store.read(obj, off, MIB as usize).await.expect("warm"));
            }
            store
        });
        Fixture {
            rt,
            store,
            obj,
            _dir: dir,
        }
    }

    /// Run `iters` ops with `qd` tasks in flight; `op(i)` is the i-th op. Returns wall time,
    /// so criterion's "time per iteration" is the inverse of throughput at that depth.
    fn run_qd<F, Fut>(&self, iters: u64, qd: usize, op: F) -> Duration
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let next = Arc::new(AtomicU64::new(0));
        let op = Arc::new(op);
        self.rt.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..qd.min(iters as usize).max(1))
                .map(|_| {
                    let (next, op) = (next.clone(), op.clone());
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= iters {
                                break;
                            }
                            op(i).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("bench task");
            }
            start.elapsed()
        })
    }
}

/// Offsets for op `i`: random (hashed from `i`, so tasks need no shared RNG) or sequential.
fn rand_off(i: u64, bs: u64) -> u64 {
    Rng(i).offset(OBJ_SIZE, bs)
}

fn io_4k(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("store_4k");
    g.throughput(Throughput::Bytes(4 * KIB));
    let (store, obj) = (f.store.clone(), f.obj);
    let mut rng = Rng(7);
    g.bench_function("randread/qd1", |b| {
        b.to_async(&f.rt).iter(|| {
            let off = rng.offset(OBJ_SIZE, 4 * KIB);
            let s = &store;
            async move { black_box(s.read(obj, off, 4096).await.expect("read")) }
        })
    });
    g.bench_function(format!("randread/qd{QD_4K}"), |b| {
        b.iter_custom(|iters| {
            let s = store.clone();
            f.run_qd(iters, QD_4K, move |i| {
                let s = s.clone();
                async move {
                    black_box(s.read(obj, rand_off(i, 4 * KIB), 4096).await.expect("read"));
                }
            })
        })
    });
    let data = pattern(4096, 2);
    g.bench_function("randwrite/qd1", |b| {
        b.to_async(&f.rt).iter(|| {
            let off = rng.offset(OBJ_SIZE, 4 * KIB);
            let (s, d) = (&store, data.clone());
            async move { s.write(obj, off, d, false).await.expect("write") }
        })
    });
    g.bench_function(format!("randwrite/qd{QD_4K}"), |b| {
        b.iter_custom(|iters| {
            let (s, d) = (store.clone(), data.clone());
            f.run_qd(iters, QD_4K, move |i| {
                let (s, d) = (s.clone(), d.clone());
                async move {
                    s.write(obj, rand_off(i, 4 * KIB), d, false)
                        .await
                        .expect("write")
                }
            })
        })
    });
    g.finish();
    f.rt.block_on(f.store.flush()).expect("flush");
}

fn io_1m(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("store_1m");
    g.throughput(Throughput::Bytes(MIB));
    let (store, obj) = (f.store.clone(), f.obj);
    let slots = OBJ_SIZE / MIB;
    let mut pos = 0u64;
    g.bench_function("seqread/qd1", |b| {
        b.to_async(&f.rt).iter(|| {
            pos = (pos + 1) % slots;
            let (s, off) = (&store, pos * MIB);
            async move { black_box(s.read(obj, off, MIB as usize).await.expect("read")) }
        })
    });
    // Sequential at depth: op i takes the i-th MiB, so the stream is in order as issued.
    g.bench_function(format!("seqread/qd{QD_1M}"), |b| {
        b.iter_custom(|iters| {
            let s = store.clone();
            f.run_qd(iters, QD_1M, move |i| {
                let s = s.clone();
                async move {
                    let off = i % slots * MIB;
                    black_box(s.read(obj, off, MIB as usize).await.expect("read"));
                }
            })
        })
    });
    let data = pattern(MIB as usize, 3);
    g.bench_function("seqwrite/qd1", |b| {
        b.to_async(&f.rt).iter(|| {
            pos = (pos + 1) % slots;
            let (s, d, off) = (&store, data.clone(), pos * MIB);
            async move { s.write(obj, off, d, false).await.expect("write") }
        })
    });
    g.bench_function(format!("seqwrite/qd{QD_1M}"), |b| {
        b.iter_custom(|iters| {
            let (s, d) = (store.clone(), data.clone());
            f.run_qd(iters, QD_1M, move |i| {
                let (s, d) = (s.clone(), d.clone());
                async move {
                    s.write(obj, i % slots * MIB, d, false)
                        .await
                        .expect("write")
                }
            })
        })
    });
    g.finish();
    f.rt.block_on(f.store.flush()).expect("flush");
}

/// Map `chunks` chunks spread evenly over `size`, writing `len` bytes at the start of each.
fn map_spread(f: &Fixture, id: Uuid, size: u64, chunks: u64, len: usize) {
    f.rt.block_on(f.store.create_object(id, size))
        .expect("create");
    let stride = size / chunks;
    let data = pattern(len, 4);
    let s = f.store.clone();
    f.run_qd(chunks, QD_4K, move |i| {
        let (s, d) = (s.clone(), data.clone());
        async move { s.write(id, i * stride, d, false).await.expect("map") }
    });
    f.rt.block_on(f.store.flush()).expect("flush");
}

fn clones(c: &mut Criterion, f: &Fixture) {
    let chunk = f.store.chunk_size() as u64;
    let dense_chunks = OBJ_SIZE / chunk;
    // Same data mapped as the 1 GiB object (every chunk of it, full), spread over 1 TiB.
    let sparse = Uuid::new_v4();
    map_spread(f, sparse, TIB, dense_chunks, chunk as usize);
    let t = Instant::now();
    let many = Uuid::new_v4();
    map_spread(f, many, TIB, MANY_CHUNKS, 4096);
    eprintln!(
        "clone setup: {} chunks mapped in a 1 TiB object in {:.1?}",
        MANY_CHUNKS,
        t.elapsed()
    );

    let mut g = c.benchmark_group("clone");
    // Every clone is a journal append plus fdatasync: milliseconds, so fewer iterations.
    g.measurement_time(Duration::from_secs(3));
    let cases = [
        ("1GiB_16Ki_chunks", f.obj),
        ("1TiB_16Ki_chunks", sparse),
        ("1TiB_128Ki_chunks", many),
    ];
    for (name, src) in cases {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                f.rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dst = Uuid::new_v4();
                        let t = Instant::now();
                        f.store.clone_object(src, dst).await.expect("clone");
                        total += t.elapsed();
                        // Untimed: keeps the object table the same size across iterations.
                        f.store.delete_object(dst).await.expect("delete");
                    }
                    total
                })
            })
        });
    }
    // The floor under every clone: what the commit's durable journal append costs on this
    // disk, done by hand (small append + fdatasync to a file in the same directory).
    let floor = tempfile::tempfile_in(bench_tmp()).expect("floor file");
    g.bench_function("fsync_floor_append_64B", |b| {
        use std::os::unix::fs::FileExt;
        let rec = [0x5au8; 64];
        let mut off = 0u64;
        b.iter(|| {
            floor.write_all_at(&rec, off).expect("append");
            floor.sync_data().expect("fdatasync");
            off += rec.len() as u64;
        })
    });
    g.finish();
    let stats = f.store.stats();
    assert_eq!(
        stats.checksum_errors, 0,
        "checksum errors during the benches"
    );
}

fn store_benches(c: &mut Criterion) {
    let f = Fixture::new();
    io_4k(c, &f);
    io_1m(c, &f);
    clones(c, &f);
    let Fixture { rt, store, .. } = f;
    rt.block_on(store.close()).expect("close");
}

fn crc32(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32");
    for (name, len) in [("4KiB", 4 * KIB), ("1MiB", MIB)] {
        let buf = pattern(len as usize, 5);
        g.throughput(Throughput::Bytes(len));
        g.bench_function(name, |b| b.iter(|| crc32fast::hash(black_box(&buf))));
    }
    g.finish();
}

fn config() -> Criterion {
    // Small samples and short windows keep the whole run near two minutes on 2 cores.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = crc32, store_benches
}
criterion_main!(benches);
