//! storebench: the chunk store against plain pread/pwrite on a regular file in the same
//! directory, the same workloads in one run, contenders interleaved (plain, store, plain,
//! store, ...) so that page-cache and disk drift hit both alike. Run by `scripts/bench/store`.
//!
//! Contenders, each keeping `depth` ops in flight on the same data set size:
//! - `plain-threads`: `depth` OS threads doing pread/pwrite (fio psync, numjobs = depth);
//! - `plain-uring`: one thread with its own io_uring (fio's io_uring engine, iodepth = depth);
//! - `limit`: `plain-threads` plus crc32fast over every 4 KiB block it reads (after the pread)
//!   or writes (before the pwrite): what a store that checksums every block cannot beat;
//! - `store`: `depth` tokio tasks calling `Store::read` / `Store::write` (CRC32 always on).
//!
//! These are diagnostics, not floors: they say where the store's time goes against its
//! physical limit (store / limit) and against no checksums at all (store / plain), for the
//! NBD and FUSE figures that users see.
//!
//! Writes are acknowledged, not durable: every write phase is followed by an untimed flush
//! (fdatasync / `Store::flush`) so the next phase starts clean; its time is reported apart.
//! CPU is the process's getrusage delta over the measured window, i.e. every thread of the
//! side under test (tokio workers, the store's ring thread, io_uring's kernel workers).
//!
//! Afterwards, an interleaved clone-cost check: objects of 1 GiB and 1 TiB, sparse and densely
//! mapped, cloned in turn, beside the fdatasync floor every clone's commit pays.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use cairn::store::{Store, StoreOptions};
use clap::{Parser, ValueEnum};
use memmap2::MmapMut;
use serde::Serialize;
use tokio::runtime::Runtime;
use uuid::Uuid;

const MIB: u64 = 1 << 20;
/// Everything storebench creates in `--dir`.
const OURS: [&str; 3] = ["plain.dat", "store", "clones"];

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    about = "Chunk store vs plain pread/pwrite on a file in the same directory",
    args_override_self = true
)]
struct Args {
    /// Directory for the plain file and the store (same filesystem for both); what an earlier
    /// run left there is removed first.
    #[arg(long)]
    dir: PathBuf,
    /// Data set size per contender, MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Ramp seconds per phase (running the workload, not counted).
    #[arg(long, default_value_t = 3.0)]
    ramp: f64,
    /// Repetitions of each plain/store pair.
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// In-flight ops for the 4 KiB workloads.
    #[arg(long, default_value_t = 32)]
    depth_4k: usize,
    /// In-flight ops for the 1 MiB workloads.
    #[arg(long, default_value_t = 8)]
    depth_1m: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "randread4k,randwrite4k,seqread1m,seqwrite1m"
    )]
    workloads: Vec<Workload>,
    /// Plain engines to compare against; ratios are against the first.
    #[arg(long, value_delimiter = ',', default_value = "threads")]
    plain: Vec<PlainEngine>,
    /// Leave out the `limit` contender (plain threads + CRC32 of every block).
    #[arg(long)]
    no_limit: bool,
    /// Page cache (buffered) and/or O_DIRECT, for both contenders alike.
    #[arg(long, value_delimiter = ',', default_value = "buffered")]
    modes: Vec<IoMode>,
    /// Shorthand for `--modes direct`.
    #[arg(long)]
    direct_io: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/store.json")]
    json: PathBuf,
    /// Free-form label stored in the JSON (e.g. the git commit).
    #[arg(long, default_value = "")]
    label: String,
    /// Keep the data files afterwards.
    #[arg(long)]
    keep: bool,
    /// Run only the store side (for profiling; no comparison is printed).
    #[arg(long)]
    store_only: bool,
    /// Clones per source object in the interleaved clone-cost check (0: skip it).
    #[arg(long, default_value_t = 200)]
    clones: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Workload {
    Randread4k,
    Randwrite4k,
    Seqread1m,
    Seqwrite1m,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Randread4k => "randread4k",
            Workload::Randwrite4k => "randwrite4k",
            Workload::Seqread1m => "seqread1m",
            Workload::Seqwrite1m => "seqwrite1m",
        }
    }
    fn bs(self) -> usize {
        match self {
            Workload::Randread4k | Workload::Randwrite4k => 4096,
            Workload::Seqread1m | Workload::Seqwrite1m => MIB as usize,
        }
    }
    fn write(self) -> bool {
        matches!(self, Workload::Randwrite4k | Workload::Seqwrite1m)
    }
    fn random(self) -> bool {
        matches!(self, Workload::Randread4k | Workload::Randwrite4k)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum PlainEngine {
    Threads,
    Uring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum IoMode {
    Buffered,
    Direct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Plain(PlainEngine),
    /// Plain threads with CRC32 over every block: the store's physical limit.
    Limit,
    Store,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Plain(PlainEngine::Threads) => "plain-threads",
            Side::Plain(PlainEngine::Uring) => "plain-uring",
            Side::Limit => "limit",
            Side::Store => "store",
        }
    }
}

/// splitmix64: cheap and seedable; spreads offsets and makes incompressible data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write back and evict a file's page-cache pages.
fn drop_cache(path: &std::path::Path) -> anyhow::Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.sync_all()?;
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(r == 0, "posix_fadvise {}: errno {r}", path.display());
    Ok(())
}

/// Page-aligned (O_DIRECT needs it) buffer filled from `seed`.
fn aligned(len: usize, seed: u64) -> io::Result<MmapMut> {
    let mut m = MmapMut::map_anon(len)?;
    Rng(seed).fill(&mut m);
    Ok(m)
}

/// A counter on its own cache line, so workers do not bounce one line between cores.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

/// Shared by the workers of one phase and the thread that times it.
struct Ctl {
    stop: AtomicBool,
    cursor: AtomicU64,
    counts: Vec<Counter>,
    size: u64,
    wl: Workload,
}

impl Ctl {
    fn new(n: usize, size: u64, wl: Workload) -> Arc<Ctl> {
        Arc::new(Ctl {
            stop: AtomicBool::new(false),
            cursor: AtomicU64::new(0),
            counts: (0..n).map(|_| Counter::default()).collect(),
            size,
            wl,
        })
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn count(&self, i: usize) {
        self.counts[i].0.fetch_add(1, Ordering::Relaxed);
    }
    fn ops(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }
    /// Random: uniform over the data set. Sequential: one shared cursor, so the in-flight
    /// ops together walk the file in order (as fio's iodepth does), wrapping at the end.
    fn next_off(&self, rng: &mut Rng) -> u64 {
        let bs = self.wl.bs() as u64;
        if self.wl.random() {
            rng.next() % (self.size / bs) * bs
        } else {
            self.cursor.fetch_add(bs, Ordering::Relaxed) % self.size
        }
    }
}

#[derive(Clone, Copy)]
struct Usage {
    user: f64,
    sys: f64,
    csw: i64,
}

fn usage() -> Usage {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF covers every thread.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        user: secs(ru.ru_utime),
        sys: secs(ru.ru_stime),
        csw: ru.ru_nvcsw + ru.ru_nivcsw,
    }
}

struct Snap {
    ops: u64,
    at: Instant,
    ru: Usage,
}

impl Snap {
    fn take(ctl: &Ctl) -> Snap {
        Snap {
            ops: ctl.ops(),
            at: Instant::now(),
            ru: usage(),
        }
    }
}

/// Sleep, waking early if a worker gave up (it sets `stop` on error).
fn nap(ctl: &Ctl, d: Duration) {
    let end = Instant::now() + d;
    while !ctl.stopped() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[derive(Serialize, Clone)]
struct Phase {
    mode: IoMode,
    workload: Workload,
    side: &'static str,
    rep: usize,
    depth: usize,
    ops: u64,
    wall_s: f64,
    iops: f64,
    mb_per_s: f64,
    cpu_user_s: f64,
    cpu_sys_s: f64,
    /// CPU seconds per wall second.
    cpu_cores: f64,
    cpu_us_per_op: f64,
    ctx_switches_per_op: f64,
    /// Untimed flush after a write phase (what the phase left dirty).
    flush_ms: Option<f64>,
    warm_s: f64,
    /// Cache-line round trip between CPUs 0 and 1 before and after the phase, ns (see
    /// `core_roundtrip_ns`).
    xcore_ns: [Option<f64>; 2],
}

/// Round trip of a cache line between CPUs 0 and 1: two pinned threads ping-pong an atomic.
/// On a VM this shows whether the host runs the two vCPUs on sibling or distant cores (about
/// 60 against 340 ns on the test VM, switching every few seconds). The store's workers share
/// more lines per operation than the plain file's threads, so the distant placement costs it
/// more; the column tells which placement a phase ran in. None if pinning fails.
fn core_roundtrip_ns() -> Option<f64> {
    const ROUNDS: u64 = 100_000;
    fn pin(cpu: usize) -> bool {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it, and
        // sched_setaffinity(0, ..) only changes the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    let flag = AtomicU64::new(0);
    let ok = AtomicBool::new(true);
    std::thread::scope(|s| {
        let (flag, ok) = (&flag, &ok);
        s.spawn(move || {
            if !pin(1) {
                ok.store(false, Ordering::SeqCst);
            }
            for i in 0..ROUNDS {
                while flag.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                flag.store(2 * i + 2, Ordering::Release);
            }
        });
        s.spawn(move || {
            if !pin(0) {
                ok.store(false, Ordering::SeqCst);
            }
            let t = Instant::now();
            for i in 0..ROUNDS {
                flag.store(2 * i + 1, Ordering::Release);
                while flag.load(Ordering::Acquire) != 2 * i + 2 {
                    std::hint::spin_loop();
                }
            }
            t.elapsed().as_secs_f64() * 1e9 / ROUNDS as f64
        })
        .join()
        .ok()
        .filter(|_| ok.load(Ordering::SeqCst))
    })
}

/// Time one phase: ramp, then the measured window; then stop the workers.
fn window(ctl: &Ctl, a: &Args) -> (Snap, Snap) {
    nap(ctl, Duration::from_secs_f64(a.ramp));
    let s0 = Snap::take(ctl);
    nap(ctl, Duration::from_secs_f64(a.seconds));
    let s1 = Snap::take(ctl);
    ctl.stop.store(true, Ordering::Relaxed);
    (s0, s1)
}

fn stop_on_err<T>(ctl: &Ctl, r: io::Result<T>) -> io::Result<T> {
    if r.is_err() {
        ctl.stop.store(true, Ordering::Relaxed);
    }
    r
}

/// CRC32 of every 4 KiB block, as the store computes on every read and write.
fn checksum_blocks(buf: &[u8]) -> u32 {
    buf.chunks(cairn::store::BLOCK)
        .fold(0, |acc, b| acc ^ crc32fast::hash(b))
}

/// `crc`: the `limit` contender, which checksums what it reads or writes.
fn plain_thread(file: &File, ctl: &Ctl, i: usize, crc: bool) -> io::Result<()> {
    let mut buf = aligned(ctl.wl.bs(), 1000 + i as u64)?;
    let mut rng = Rng(2000 + i as u64);
    while !ctl.stopped() {
        let off = ctl.next_off(&mut rng);
        if ctl.wl.write() {
            if crc {
                std::hint::black_box(checksum_blocks(&buf));
            }
            file.write_all_at(&buf, off)?;
        } else {
            file.read_exact_at(&mut buf, off)?;
            if crc {
                std::hint::black_box(checksum_blocks(&buf));
            }
        }
        ctl.count(i);
    }
    Ok(())
}

fn plain_uring(file: &File, ctl: &Ctl, depth: usize) -> io::Result<()> {
    use io_uring::{IoUring, opcode, types};
    let bs = ctl.wl.bs();
    let mut ring = IoUring::new((depth as u32).next_power_of_two())?;
    let mut bufs = (0..depth)
        .map(|i| aligned(bs, 1000 + i as u64))
        .collect::<io::Result<Vec<_>>>()?;
    let fd = types::Fd(file.as_raw_fd());
    let mut rng = Rng(2000);
    let mut issue = |ring: &mut IoUring, bufs: &mut [MmapMut], i: usize| {
        let off = ctl.next_off(&mut rng);
        let p = bufs[i].as_mut_ptr();
        let e = if ctl.wl.write() {
            opcode::Write::new(fd, p, bs as u32).offset(off).build()
        } else {
            opcode::Read::new(fd, p, bs as u32).offset(off).build()
        };
        // SAFETY: bufs[i] outlives the op: we return only once nothing is in flight (or leak
        // the buffers), and slot i gets a new op only after its completion. The queue holds
        // `depth` entries, so the push cannot fail.
        unsafe { ring.submission().push(&e.user_data(i as u64)) }
            .map_err(|_| io::Error::other("submission queue full"))
    };
    for i in 0..depth {
        issue(&mut ring, &mut bufs, i)?;
    }
    let mut inflight = depth;
    let mut err: Option<io::Error> = None;
    let mut done = Vec::with_capacity(depth);
    while inflight > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(e) => {
                // Ops may still be in flight: the kernel could still write into the buffers.
                std::mem::forget(bufs);
                std::mem::forget(ring);
                return Err(e);
            }
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(i, res) in &done {
            inflight -= 1;
            if res < 0 {
                err.get_or_insert(io::Error::from_raw_os_error(-res));
            } else if res as usize != bs {
                err.get_or_insert(io::Error::other(format!("short transfer: {res} of {bs}")));
            } else {
                ctl.count(0);
            }
            if err.is_some() {
                ctl.stop.store(true, Ordering::Relaxed);
            } else if !ctl.stopped() {
                issue(&mut ring, &mut bufs, i)?;
                inflight += 1;
            }
        }
    }
    err.map_or(Ok(()), Err)
}

async fn store_task(
    store: Store,
    obj: Uuid,
    ctl: Arc<Ctl>,
    i: usize,
    data: Bytes,
) -> cairn::store::Result<()> {
    let bs = ctl.wl.bs();
    let mut rng = Rng(2000 + i as u64);
    while !ctl.stopped() {
        let off = ctl.next_off(&mut rng);
        if ctl.wl.write() {
            store.write(obj, off, data.clone(), false).await?;
        } else {
            let got = store.read(obj, off, bs).await?;
            debug_assert_eq!(got.len(), bs);
        }
        ctl.count(i);
    }
    Ok(())
}

struct Bench {
    args: Args,
    rt: Runtime,
    size: u64,
    plain_path: PathBuf,
    store_dir: PathBuf,
    obj: Uuid,
}

struct Open {
    mode: IoMode,
    /// For the workload (O_DIRECT in direct mode).
    plain: File,
    store: Store,
}

impl Bench {
    /// Create both data sets with the same bytes: the plain file and one store object.
    fn fill(&self) -> anyhow::Result<()> {
        let t = Instant::now();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.plain_path)
            .with_context(|| format!("create {}", self.plain_path.display()))?;
        let store = self
            .rt
            .block_on(Store::open(&self.store_dir, StoreOptions::default()))?;
        self.rt.block_on(store.create_object(self.obj, self.size))?;
        // Write the plain file in pieces as large as the store's writes to its segments: the
        // page cache builds folios as large as the writes that create them, and 4 KiB random
        // writes into 1 MiB folios cost several times more (measured: 3.5x fewer IOPS than
        // into 64 KiB ones), so other pieces would handicap one side.
        let piece = store.max_write().min(MIB as usize);
        let mut buf = vec![0u8; MIB as usize];
        for off in (0..self.size).step_by(MIB as usize) {
            Rng(off).fill(&mut buf);
            for (k, p) in buf.chunks(piece).enumerate() {
                f.write_all_at(p, off + (k * piece) as u64)?;
            }
            self.rt
                .block_on(store.write(self.obj, off, Bytes::copy_from_slice(&buf), false))?;
        }
        f.sync_all()?;
        self.rt.block_on(store.close())?;
        println!(
            "filled {} MiB twice (plain file + store object) in {:.1} s",
            self.size / MIB,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn open(&self, mode: IoMode) -> anyhow::Result<Open> {
        let direct = mode == IoMode::Direct;
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let plain = o.open(&self.plain_path)?;
        if direct {
            // The data sets were written through the page cache: drop it for both sides, or
            // every O_DIRECT write must first invalidate cached pages (which makes ext4 punt
            // the store's io_uring writes to io-wq, serialised per file) and the run measures
            // the fill's leftovers instead of an O_DIRECT deployment.
            drop_cache(&self.plain_path)?;
            for e in std::fs::read_dir(self.store_dir.join("segments"))? {
                let path = e?.path();
                if path.extension().is_some_and(|x| x == "seg") {
                    drop_cache(&path)?;
                }
            }
        }
        let opts = StoreOptions {
            direct_io: direct,
            ..StoreOptions::default()
        };
        let store = self.rt.block_on(Store::open(&self.store_dir, opts))?;
        Ok(Open { mode, plain, store })
    }

    /// Read the whole data set once (buffered mode only) so the phase starts on a warm cache
    /// whatever ran before it.
    fn warm(&self, o: &Open, side: Side) -> anyhow::Result<f64> {
        if o.mode == IoMode::Direct {
            return Ok(0.0);
        }
        let t = Instant::now();
        match side {
            Side::Plain(_) | Side::Limit => {
                let mut buf = vec![0u8; MIB as usize];
                for off in (0..self.size).step_by(MIB as usize) {
                    o.plain.read_exact_at(&mut buf, off)?;
                }
            }
            Side::Store => {
                let (store, obj, size) = (o.store.clone(), self.obj, self.size);
                self.rt.block_on(async move {
                    let next = Arc::new(AtomicU64::new(0));
                    let tasks: Vec<_> = (0..8)
                        .map(|_| {
                            let (store, next) = (store.clone(), next.clone());
                            tokio::spawn(async move {
                                loop {
                                    let off = next.fetch_add(MIB, Ordering::Relaxed);
                                    if off >= size {
                                        return Ok::<_, cairn::store::StoreError>(());
                                    }
                                    store.read(obj, off, MIB as usize).await?;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await??;
                    }
                    Ok::<_, anyhow::Error>(())
                })?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }

    fn phase(&self, o: &Open, wl: Workload, side: Side, rep: usize) -> anyhow::Result<Phase> {
        let xcore_before = core_roundtrip_ns();
        let warm_s = self.warm(o, side)?;
        let depth = if wl.bs() == 4096 {
            self.args.depth_4k
        } else {
            self.args.depth_1m
        };
        let a = &self.args;
        let (s0, s1) = match side {
            Side::Plain(PlainEngine::Threads) | Side::Limit => {
                let ctl = Ctl::new(depth, self.size, wl);
                let crc = side == Side::Limit;
                std::thread::scope(|s| {
                    let workers: Vec<_> = (0..depth)
                        .map(|i| {
                            let (ctl, f) = (&ctl, &o.plain);
                            s.spawn(move || stop_on_err(ctl, plain_thread(f, ctl, i, crc)))
                        })
                        .collect();
                    let w = window(&ctl, a);
                    for h in workers {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("plain worker panicked"))??;
                    }
                    Ok::<_, anyhow::Error>(w)
                })?
            }
            Side::Plain(PlainEngine::Uring) => {
                let ctl = Ctl::new(1, self.size, wl);
                std::thread::scope(|s| {
                    let (c, f) = (&ctl, &o.plain);
                    let h = s.spawn(move || stop_on_err(c, plain_uring(f, c, depth)));
                    let w = window(&ctl, a);
                    h.join()
                        .map_err(|_| anyhow::anyhow!("plain worker panicked"))??;
                    Ok::<_, anyhow::Error>(w)
                })?
            }
            Side::Store => {
                let ctl = Ctl::new(depth, self.size, wl);
                let obj = self.obj;
                let tasks = (0..depth)
                    .map(|i| {
                        // Aligned source data: in direct mode an unaligned write would be
                        // staged through a bounce buffer, which plain does not pay.
                        let data = Bytes::from_owner(aligned(wl.bs(), 1000 + i as u64)?);
                        let (store, ctl2) = (o.store.clone(), ctl.clone());
                        let ctl3 = ctl.clone();
                        Ok(self.rt.spawn(async move {
                            let r = store_task(store, obj, ctl2, i, data).await;
                            if r.is_err() {
                                ctl3.stop.store(true, Ordering::Relaxed);
                            }
                            r
                        }))
                    })
                    .collect::<io::Result<Vec<_>>>()?;
                let w = window(&ctl, a);
                self.rt.block_on(async {
                    for t in tasks {
                        t.await??;
                    }
                    Ok::<_, anyhow::Error>(())
                })?;
                w
            }
        };
        let flush_ms = if wl.write() {
            let t = Instant::now();
            match side {
                Side::Plain(_) | Side::Limit => o.plain.sync_data()?,
                Side::Store => self.rt.block_on(o.store.flush())?,
            }
            Some(t.elapsed().as_secs_f64() * 1e3)
        } else {
            None
        };
        let xcore_ns = [xcore_before, core_roundtrip_ns()];
        let ops = s1.ops - s0.ops;
        let wall = (s1.at - s0.at).as_secs_f64();
        let (user, sys) = (s1.ru.user - s0.ru.user, s1.ru.sys - s0.ru.sys);
        let per_op = |x: f64| if ops == 0 { 0.0 } else { x / ops as f64 };
        Ok(Phase {
            mode: o.mode,
            workload: wl,
            side: side.label(),
            rep,
            depth,
            ops,
            wall_s: wall,
            iops: ops as f64 / wall,
            mb_per_s: ops as f64 * wl.bs() as f64 / wall / 1e6,
            cpu_user_s: user,
            cpu_sys_s: sys,
            cpu_cores: (user + sys) / wall,
            cpu_us_per_op: per_op((user + sys) * 1e6),
            ctx_switches_per_op: per_op((s1.ru.csw - s0.ru.csw) as f64),
            flush_ms,
            warm_s,
            xcore_ns,
        })
    }
}

#[derive(Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        min: v.first().copied().unwrap_or(f64::NAN),
        median,
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

#[derive(Serialize)]
struct SideSummary {
    side: &'static str,
    iops: Spread,
    mb_per_s: Spread,
    cpu_us_per_op: Spread,
    cpu_cores: Spread,
}

/// The store against one other side: medians and the back-to-back pairs of each repetition.
#[derive(Serialize)]
struct Versus {
    /// median(store IOPS) / median(other IOPS).
    ratio: f64,
    /// store/other of each repetition's pair.
    paired: Spread,
}

#[derive(Serialize)]
struct Summary {
    mode: IoMode,
    workload: Workload,
    baseline: &'static str,
    plain: SideSummary,
    /// Plain threads + CRC32 over every block, if it ran.
    limit: Option<SideSummary>,
    store: SideSummary,
    /// store / plain.
    vs_plain: Versus,
    /// store / limit: how close the store comes to what checksumming every block allows.
    vs_limit: Option<Versus>,
    /// Cache-line round trip between CPUs 0 and 1 around the store's phases, ns (see
    /// `core_roundtrip_ns`).
    store_xcore_ns: Spread,
}

fn summarize(phases: &[Phase], mode: IoMode, wl: Workload, plain: Side) -> Option<Summary> {
    let of = |side: Side| -> Vec<&Phase> {
        phases
            .iter()
            .filter(|p| p.mode == mode && p.workload == wl && p.side == side.label())
            .collect()
    };
    let side_sum = |side: Side, v: &[&Phase]| SideSummary {
        side: side.label(),
        iops: spread(v.iter().map(|p| p.iops).collect()),
        mb_per_s: spread(v.iter().map(|p| p.mb_per_s).collect()),
        cpu_us_per_op: spread(v.iter().map(|p| p.cpu_us_per_op).collect()),
        cpu_cores: spread(v.iter().map(|p| p.cpu_cores).collect()),
    };
    let (p, l, s) = (of(plain), of(Side::Limit), of(Side::Store));
    if p.is_empty() || s.is_empty() {
        return None;
    }
    let ss = side_sum(Side::Store, &s);
    let versus = |other: &[&Phase], os: &SideSummary| Versus {
        ratio: ss.iops.median / os.iops.median,
        paired: spread(
            other
                .iter()
                .filter_map(|op| {
                    s.iter()
                        .find(|sp| sp.rep == op.rep)
                        .map(|sp| sp.iops / op.iops)
                })
                .collect(),
        ),
    };
    let ps = side_sum(plain, &p);
    let vs_plain = versus(&p, &ps);
    let (limit, vs_limit) = if l.is_empty() {
        (None, None)
    } else {
        let ls = side_sum(Side::Limit, &l);
        let v = versus(&l, &ls);
        (Some(ls), Some(v))
    };
    let store_xcore_ns = spread(
        s.iter()
            .flat_map(|p| p.xcore_ns.iter().flatten().copied())
            .collect(),
    );
    Some(Summary {
        mode,
        workload: wl,
        baseline: plain.label(),
        plain: ps,
        limit,
        store: ss,
        vs_plain,
        vs_limit,
        store_xcore_ns,
    })
}

fn fs_type(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return "?".into();
    };
    // SAFETY: zeroed out-struct and a valid C string.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "?".into();
    }
    match s.f_type as u64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        t => format!("0x{t:x}"),
    }
}

fn kfmt(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn print_table(sums: &[Summary]) {
    println!();
    println!(
        "{:<8} {:<11} {:>22} {:>6} | {:>22} {:>6} | {:>22} {:>7} {:>6} | {:>11} {:>11} | {:>9}",
        "mode",
        "workload",
        "plain IOPS med(range)",
        "us/op",
        "limit IOPS med(range)",
        "us/op",
        "store IOPS med(range)",
        "MB/s",
        "us/op",
        "st/plain",
        "st/limit",
        "xcore ns"
    );
    let iops = |x: &Spread| format!("{} ({}-{})", kfmt(x.median), kfmt(x.min), kfmt(x.max));
    let vs = |v: &Versus| format!("{:.2} {:.2}-{:.2}", v.ratio, v.paired.min, v.paired.max);
    for s in sums {
        println!(
            "{:<8} {:<11} {:>22} {:>6.1} | {:>22} {:>6} | {:>22} {:>7.0} {:>6.1} | {:>11} {:>11} | {:>9}",
            format!("{:?}", s.mode).to_lowercase(),
            s.workload.name(),
            iops(&s.plain.iops),
            s.plain.cpu_us_per_op.median,
            s.limit.as_ref().map_or("-".into(), |l| iops(&l.iops)),
            s.limit
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1}", l.cpu_us_per_op.median)),
            iops(&s.store.iops),
            s.store.mb_per_s.median,
            s.store.cpu_us_per_op.median,
            vs(&s.vs_plain),
            s.vs_limit.as_ref().map_or("-".into(), vs),
            format!("{:.0}-{:.0}", s.store_xcore_ns.min, s.store_xcore_ns.max),
        );
    }
    println!(
        "\nplain = {} (pread/pwrite); limit = plain threads + crc32fast over every 4 KiB block \
         read or written: what a store that checks every block cannot beat.\nst/plain, st/limit \
         = median store IOPS / median of the other, then the range of each repetition's \
         back-to-back pair. Diagnostics, not floors.\nus/op = process CPU (user+sys) per op over \
         the window. Writes: acknowledged, not durable.\nxcore = cache-line round trip between \
         CPUs 0 and 1 around the store's phases, ns: on a VM, low = sibling vCPUs, high = \
         distant ones, which slows the store's 4 KiB reads far more than the plain file's.",
        sums.first().map_or("-", |s| s.baseline)
    );
}

#[derive(Serialize)]
struct CloneCase {
    source: &'static str,
    virtual_bytes: u64,
    mapped_chunks: u64,
    /// Microseconds per clone_object (metadata + durable journal commit).
    us: Spread,
    p10_us: f64,
    p90_us: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Clone cost must not grow with the object: clone sources of very different size and map
/// density in turn (interleaved, so disk drift hits all alike), each clone deleted untimed.
/// Beside them, the floor every clone pays: a small append + fdatasync by hand.
fn clone_check(rt: &Runtime, dir: &Path, n: usize) -> anyhow::Result<Vec<CloneCase>> {
    const TIB: u64 = 1 << 40;
    let store = rt.block_on(Store::open(dir, StoreOptions::default()))?;
    let chunk = store.chunk_size() as u64;
    // (name, size, chunks mapped with one 4 KiB block each)
    let specs: [(&'static str, u64, u64); 4] = [
        ("1GiB_16Ki_chunks", 1 << 30, (1 << 30) / chunk),
        ("1TiB_16Ki_chunks", TIB, (1 << 30) / chunk),
        ("1TiB_128Ki_chunks", TIB, 128 << 10),
        ("1TiB_1_chunk", TIB, 1),
    ];
    let t = Instant::now();
    let mut ids = Vec::new();
    for &(_, size, chunks) in &specs {
        let id = Uuid::new_v4();
        let s = store.clone();
        rt.block_on(async move {
            s.create_object(id, size).await?;
            let stride = size / chunks;
            let next = Arc::new(AtomicU64::new(0));
            let tasks: Vec<_> = (0..32)
                .map(|_| {
                    let (s, next) = (s.clone(), next.clone());
                    let data = Bytes::from(vec![0x5a; 4096]);
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= chunks {
                                return Ok::<_, cairn::store::StoreError>(());
                            }
                            s.write(id, i * stride, data.clone(), false).await?;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            s.flush().await?;
            Ok::<_, anyhow::Error>(())
        })?;
        ids.push(id);
    }
    println!(
        "clone check: sources mapped in {:.1} s; {n} clones each, interleaved",
        t.elapsed().as_secs_f64()
    );
    let floor_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("fsync-floor"))?;
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(n); specs.len() + 1];
    let rec = [0x5au8; 64];
    let cases = ids.len() + 1;
    for k in 0..n {
        // Rotate the order each round: whichever case follows the floor's fdatasync (or any
        // other) pays a little more, and that must not look like a size effect.
        for j in 0..cases {
            let i = (k + j) % cases;
            let us = match ids.get(i) {
                Some(&src) => {
                    let (dst, s) = (Uuid::new_v4(), store.clone());
                    // Timed in a task on the runtime, as the daemon's API handlers call it
                    // (a commit runs in a task of its own; from outside the runtime that
                    // adds two cross-thread wakeups).
                    let task = rt.spawn(async move {
                        let t = Instant::now();
                        s.clone_object(src, dst).await?;
                        let us = t.elapsed().as_secs_f64() * 1e6;
                        s.delete_object(dst).await?;
                        Ok::<_, anyhow::Error>(us)
                    });
                    rt.block_on(task)??
                }
                None => {
                    let t = Instant::now();
                    floor_file.write_all_at(&rec, (k * rec.len()) as u64)?;
                    floor_file.sync_data()?;
                    t.elapsed().as_secs_f64() * 1e6
                }
            };
            times[i].push(us);
        }
    }
    rt.block_on(store.close())?;
    let mut out = Vec::new();
    let names = specs
        .iter()
        .map(|&(name, size, chunks)| (name, size, chunks))
        .chain([("fsync_floor_append_64B", 0, 0)]);
    for ((name, size, chunks), mut v) in names.zip(times) {
        v.sort_by(f64::total_cmp);
        let (p10, p90) = (percentile(&v, 0.1), percentile(&v, 0.9));
        out.push(CloneCase {
            source: name,
            virtual_bytes: size,
            mapped_chunks: chunks,
            us: spread(v),
            p10_us: p10,
            p90_us: p90,
        });
    }
    for c in &out {
        println!(
            "  {:<24} median {:>7.1} us  p10 {:>7.1}  p90 {:>7.1}  (min {:.1}, max {:.1})",
            c.source, c.us.median, c.p10_us, c.p90_us, c.us.min, c.us.max
        );
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.direct_io {
        args.modes = vec![IoMode::Direct];
    }
    if args.plain.is_empty() || args.reps == 0 || args.depth_4k == 0 || args.depth_1m == 0 {
        bail!("need at least one plain engine, one repetition and a non-zero depth");
    }
    let size = args.size_mib * MIB;
    if size == 0 {
        bail!("--size-mib must be > 0");
    }
    if args.dir.exists() {
        // Only ever delete what a previous run left, never a directory given by mistake.
        for e in std::fs::read_dir(&args.dir)? {
            let name = e?.file_name();
            if !OURS.iter().any(|o| name == *o) {
                bail!(
                    "{} holds {:?}, which storebench did not create; give an empty or new --dir",
                    args.dir.display(),
                    name
                );
            }
        }
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("empty {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let fs = fs_type(&args.dir);
    if fs == "tmpfs" {
        eprintln!(
            "warning: {} is on tmpfs; that is not a disk benchmark",
            args.dir.display()
        );
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!(
        "storebench: dir {} ({fs}), {} MiB per side, {} s + {} s ramp per phase, {} reps, \
         depth {} (4k) / {} (1M), {cpus} CPUs, kernel {kernel}",
        args.dir.display(),
        args.size_mib,
        args.seconds,
        args.ramp,
        args.reps,
        args.depth_4k,
        args.depth_1m
    );
    let bench = Bench {
        rt: tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        size,
        plain_path: args.dir.join("plain.dat"),
        store_dir: args.dir.join("store"),
        obj: Uuid::new_v4(),
        args: args.clone(),
    };
    bench.fill()?;
    let mut sides: Vec<Side> = if args.store_only {
        Vec::new()
    } else {
        args.plain.iter().map(|&e| Side::Plain(e)).collect()
    };
    sides.dedup();
    if !args.store_only && !args.no_limit {
        sides.push(Side::Limit);
    }
    sides.push(Side::Store);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut phases = Vec::new();
    for &mode in &args.modes {
        let o = bench.open(mode)?;
        for &wl in &args.workloads {
            for rep in 0..args.reps {
                for &side in &sides {
                    let p = bench.phase(&o, wl, side, rep)?;
                    println!(
                        "{:<8} {:<11} rep {}/{} {:<13} {:>9} IOPS {:>7.0} MB/s  cpu {:.2} cores \
                         {:>6.1} us/op ({:.1} usr {:.1} sys s) {:>5.2} csw/op  xcore {}{}{}",
                        format!("{mode:?}").to_lowercase(),
                        wl.name(),
                        rep + 1,
                        args.reps,
                        p.side,
                        kfmt(p.iops),
                        p.mb_per_s,
                        p.cpu_cores,
                        p.cpu_us_per_op,
                        p.cpu_user_s,
                        p.cpu_sys_s,
                        p.ctx_switches_per_op,
                        p.xcore_ns
                            .map(|x| x.map_or("-".into(), |ns| format!("{ns:.0}")))
                            .join("/"),
                        if p.warm_s > 0.0 {
                            format!("  warm {:.1} s", p.warm_s)
                        } else {
                            String::new()
                        },
                        p.flush_ms
                            .map(|f| format!("  flush {f:.0} ms"))
                            .unwrap_or_default()
                    );
                    phases.push(p);
                }
            }
        }
        let stats = o.store.stats();
        if stats.checksum_errors > 0 {
            bail!(
                "the store reported {} checksum errors",
                stats.checksum_errors
            );
        }
        bench.rt.block_on(o.store.close())?;
    }
    let mut sums = Vec::new();
    for &mode in &args.modes {
        for &wl in &args.workloads {
            for &side in sides.iter().filter(|s| matches!(s, Side::Plain(_))) {
                sums.extend(summarize(&phases, mode, wl, side));
            }
        }
    }
    print_table(&sums);
    let clones = if args.clones > 0 {
        println!();
        clone_check(&bench.rt, &args.dir.join("clones"), args.clones)?
    } else {
        Vec::new()
    };
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let out = serde_json::json!({
        "bench": "store",
        "label": args.label,
        "started_unix": started,
        "host": { "cpus": cpus, "kernel": kernel, "fs": fs },
        "config": args,
        "phases": phases,
        "summary": sums,
        "clone": clones,
    });
    std::fs::write(&args.json, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("write {}", args.json.display()))?;
    println!("JSON: {}", args.json.display());
    if !args.keep {
        std::fs::remove_dir_all(&args.dir)?;
    }
    Ok(())
}
