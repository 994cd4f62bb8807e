//! The NBD server driven by real clients (libnbd's nbdinfo, qemu-io, qemu-img) against the
//! real daemon: volumes created and attached through the `cairn` CLI, data checked byte for
//! byte over TCP and the unix socket.

mod common;

use std::{path::PathBuf, process::Command};

use common::{Cairn, Serve, run_cairn};

struct Nbd {
    c: Cairn,
    data: String,
}

impl Nbd {
    fn start() -> Nbd {
        Nbd::serve(Serve::new())
    }

    /// On a data dir that outlives the daemon (for restarts).
    fn start_in(dir: &std::path::Path) -> Nbd {
        Nbd::serve(Serve::new().data_dir(dir))
    }

    fn serve(s: Serve) -> Nbd {
        let c = s
            .arg("--admin-password")
            .arg("nbd-test-pw")
            .env("RUST_LOG", "info,cairn::nbd=debug")
            .start();
        let data = c.data_dir().to_str().expect("utf8 path").to_owned();
        Nbd { c, data }
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--data-dir", &self.data]);
        let (status, out, err) = run_cairn(&all);
        assert!(status.success(), "cairn {args:?} failed: {err}\n{out}");
        out
    }

    /// A fresh 1 GiB volume attached to server `vm`: (uuid, nbd:// URI over TCP).
    fn attached_volume(&self, vm: &str) -> (String, String) {
        let uri = self.cli(&["volume", "create", "--size", "1G", "--attach", vm]);
        let uri = uri.trim().to_owned();
        let id = uri.rsplit('/').next().expect("uuid").to_owned();
        (id, uri)
    }

    /// A daemon with a volume of `gib` GiB attached to vm1, and a server vm2 for it to
    /// move to (see `across_a_move`): (daemon, volume id).
    fn moving_volume(gib: u64) -> (Nbd, String) {
        let n = Nbd::start();
        let size = format!("{gib}G");
        let uri = n.cli(&["volume", "create", "--size", &size, "--attach", "vm1"]);
        let id = uri.trim().rsplit('/').next().expect("uuid").to_owned();
        let _ = n.attached_volume("vm2");
        (n, id)
    }

    fn socket(&self) -> PathBuf {
        self.c.data_dir().join("nbd.sock")
    }

    fn unix_uri(&self, id: &str) -> String {
        format!("nbd+unix:///{id}?socket={}", self.socket().display())
    }

    fn tcp_port(uri: &str) -> String {
        let hostport = uri
            .trim_start_matches("nbd://")
            .split('/')
            .next()
            .expect("host");
        hostport.rsplit(':').next().expect("port").to_owned()
    }
}

/// Runs a tool; (success, stdout, stderr).
fn run(tool: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(tool: &str, args: &[&str]) -> String {
    let (success, out, err) = run(tool, args);
    assert!(success, "{tool} {args:?} failed:\n{out}\n{err}");
    out
}

#[test]
fn exports_are_attached_volumes() {
    let n = Nbd::start();
    let (id, uri) = n.attached_volume("vm1");

    let sock = format!("nbd+unix:///?socket={}", n.socket().display());
    let list = ok("nbdinfo", &["--list", &sock]);
    assert!(list.contains(&format!("export=\"{id}\"")), "{list}");

    for u in [uri.clone(), n.unix_uri(&id)] {
        let info = ok("nbdinfo", &[&u]);
        assert!(info.contains("export-size: 1073741824"), "{info}");
        assert!(info.contains("can_flush: true"), "{info}");
        assert!(info.contains("can_fua: true"), "{info}");
        assert!(info.contains("block_size_maximum: 33554432"), "{info}");
        assert!(info.contains("using structured packets"), "{info}");
    }

    // Unknown: refused with NBD_REP_ERR_UNKNOWN (libnbd shows it as ENOENT).
    let unknown = n.unix_uri("00000000-0000-4000-8000-000000000000");
    let (success, _, err) = run("nbdinfo", &[&unknown]);
    assert!(!success);
    assert!(err.contains("No such file or directory"), "{err}");
    let (success, _, err) = run("nbdinfo", &[&n.unix_uri("not-a-uuid")]);
    assert!(!success, "{err}");

    // Detached: no longer offered, neither by name nor in the list.
    n.cli(&["volume", "detach", &id, "--server", "vm1"]);
    let (success, _, err) = run("nbdinfo", &[&n.unix_uri(&id)]);
    assert!(!success);
    assert!(err.contains("No such file or directory"), "{err}");
    let list = ok("nbdinfo", &["--list", &sock]);
    assert!(!list.contains(&id), "{list}");
}

#[test]
fn qemu_io_patterns_over_tcp_and_unix() {
    let n = Nbd::start();
    let (id, uri) = n.attached_volume("vm1");
    let unix = n.unix_uri(&id);

    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd -f 1M 4k",
            &uri,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // qemu (>= 8.2) negotiates extended headers; libnbd 1.14 (nbdsh, nbdinfo) does not, so
    // both header modes are covered.
    let line = n.c.logs.wait_for(std::time::Duration::from_secs(10), |l| {
        l.contains("NBD transmission") && l.contains("extended=true")
    });
    assert!(
        line.is_some(),
        "qemu did not use extended headers:\n{}",
        n.c.logs.text()
    );
    // Another connection, another transport: the data is there, the rest reads as zeroes.
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0 1028k 60k",
            "-c",
            "read -P 0 1073737728 4k",
            "-c",
            "write -P 0x11 4095 3",
            "-c",
            "read -P 0x11 4095 3",
            "-c",
            "read -P 0xab 4094 1",
            "-c",
            "flush",
            &unix,
        ],
    );
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );

    // Past the end: refused, and the connection goes on serving.
    let (_, out, err) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 1073741824 4k",
            "-c",
            "read -P 0xab 0 4095",
            &unix,
        ],
    );
    assert!(
        out.contains("read failed") || err.contains("read failed"),
        "{out}{err}"
    );
    assert!(out.contains("read 4095/4095 bytes"), "{out}{err}");
    assert!(!out.contains("Pattern verification"), "{out}");
}

#[test]
fn qemu_img_convert_in_and_compare_out() {
    let n = Nbd::start();
    let (id, uri) = n.attached_volume("vm1");
    let tmp = common::temp_dir();
    let src = tmp.path().join("random.img");
    let mut data = vec![0u8; 8 << 20];
    rand::fill(&mut data[..]);
    // A hole in the middle, so that zero runs go through too.
    data[3 << 20..4 << 20].fill(0);
    std::fs::write(&src, &data).expect("write source");
    let src = src.to_str().expect("utf8").to_owned();
    let port = Nbd::tcp_port(&uri);
    let sock = n.socket().display().to_string();

    let targets = [
        (
            uri.clone(),
            format!(
                "driver=raw,size={},file.driver=nbd,file.server.type=inet,\
                 file.server.host=127.0.0.1,file.server.port={port},file.export={id}",
                data.len()
            ),
        ),
        (
            n.unix_uri(&id),
            format!(
                "driver=raw,size={},file.driver=nbd,file.server.type=unix,\
                 file.server.path={sock},file.export={id}",
                data.len()
            ),
        ),
    ];
    for (target, opts) in targets {
        // Fresh content per transport: overwrite with zeroes first, then convert in.
        ok("qemu-io", &["-f", "raw", "-c", "write -z 0 8M", &target]);
        ok(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", &src, &target],
        );
        let out = ok(
            "qemu-img",
            &[
                "compare",
                "--image-opts",
                &format!("driver=raw,file.driver=file,file.filename={src}"),
                &opts,
            ],
        );
        assert!(out.contains("Images are identical"), "{out}");
        // And out again to a file, compared here byte for byte.
        let back = tmp.path().join("back.img");
        ok(
            "qemu-img",
            &[
                "convert",
                "--image-opts",
                &opts,
                "-O",
                "raw",
                back.to_str().expect("utf8"),
            ],
        );
        assert!(
            std::fs::read(&back).expect("read back") == data,
            "data differs via {target}"
        );
    }
}

#[test]
fn stale_socket_is_replaced_and_removed_on_shutdown() {
    let tmp = common::temp_dir();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let sock = data.join("nbd.sock");
    // A socket file left behind by a daemon that died.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind stale socket"));
    assert!(sock.exists());

    let mut c = Serve::new()
        .data_dir(&data)
        .arg("--admin-password")
        .arg("nbd-test-pw")
        .start();
    let list = ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(list.contains("protocol: newstyle-fixed"), "{list}");
    let status = c.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status:?}\n{}", c.logs.text());
    assert!(!sock.exists(), "socket left behind");
    assert!(c.logs.contains("NBD stopped"), "{}", c.logs.text());
}

#[test]
fn trim_zero_and_block_status() {
    let n = Nbd::start();
    let (id, uri) = n.attached_volume("vm1");
    let unix = n.unix_uri(&id);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 2M",
            "-c",
            "write -P 0x6b 8M 1M",
            &uri,
        ],
    );
    // Allocated where written, holes (reading as zeroes) elsewhere.
    let map = ok("nbdinfo", &["--map", &unix]);
    let lines: Vec<&str> = map.lines().map(str::trim).collect();
    assert!(
        lines[0].starts_with("0") && lines[0].contains("2097152") && lines[0].contains("data"),
        "{map}"
    );
    assert!(lines[1].contains("hole,zero"), "{map}");
    assert!(map.contains("8388608") && map.contains("1048576"), "{map}");

    // discard and write -z: zeroes read back, the rest is untouched.
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "discard 0 1M",
            "-c",
            "write -z 1M 4k",
            "-c",
            "write -z -u 8M 1M",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0 1M 4k",
            "-c",
            "read -P 0x5a 1052672 1044480",
            "-c",
            "read -P 0 8M 1M",
            &unix,
        ],
    );
    assert!(!out.contains("failed") && !out.contains("Pattern"), "{out}");
    let map = ok("nbdinfo", &["--map", &unix]);
    assert!(
        map.lines().next().is_some_and(|l| l.contains("hole,zero")),
        "{map}"
    );
}

/// Protocol corners through libnbd's Python binding (nbdsh's module).
#[test]
fn protocol_corners_with_libnbd() {
    let n = Nbd::start();
    let (id, _) = n.attached_volume("vm1");
    let script = format!(
        r#"
import nbd
sock = {sock:?}
def conn():
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.set_strict_mode(0)  # let bad requests reach the server
    h.set_export_name({id:?})
    h.connect_unix(sock)
    return h
a, b = conn(), conn()
assert a.get_structured_replies_negotiated()
assert a.can_meta_context("base:allocation")
assert a.can_multi_conn() and a.can_fua() and a.can_trim() and a.can_zero() and a.can_fast_zero()
# FUA write on one connection, flush, read on the other.
a.pwrite(b"\x42" * 65536, 4096, nbd.CMD_FLAG_FUA)
a.flush()
assert b.pread(65536, 4096) == b"\x42" * 65536
# Block status: data then hole|zero.
seen = []
def cb(meta, off, entries, err):
    seen.extend(entries)
b.block_status(1 << 20, 0, cb)
assert seen[0] == 4096 and seen[1] == nbd.STATE_HOLE | nbd.STATE_ZERO, seen
assert seen[2] == 65536 and seen[3] == 0, seen
# Errors keep the connection alive.
size = a.get_size()
for f, want in [(lambda: a.pread(4096, size), "EINVAL"),
                (lambda: a.pwrite(b"x" * 4096, size - 1), "ENOSPC"),
                (lambda: a.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO), "ENOTSUP")]:
    try:
        f()
        raise SystemExit("no error")
    except nbd.Error as e:
        assert e.errno == want, (e.errno, want, e.string)
assert a.pread(4096, 4096) == b"\x42" * 4096
# Simple replies only (as the Linux kernel client): data and errors stay correct.
c = nbd.NBD()
c.set_request_structured_replies(False)
c.set_strict_mode(0)
c.set_export_name({id:?})
c.connect_unix(sock)
assert not c.get_structured_replies_negotiated()
c.pwrite(b"\x17" * 8192, 1 << 20)
assert c.pread(8192, 1 << 20) == b"\x17" * 8192
try:
    c.pread(4096, size)
    raise SystemExit("no error")
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
assert c.pread(4096, 4096) == b"\x42" * 4096
a.shutdown(); b.shutdown(); c.shutdown()
print("OK")
"#,
        sock = n.socket().display().to_string(),
        id = id,
    );
    let out = ok("/usr/bin/python3", &["-c", &script]);
    assert!(out.contains("OK"), "{out}");
}

/// What a client was told survives `kill -9` of the daemon: writes flushed on their own
/// connection or on another one (CAN_MULTI_CONN), FUA writes, flushed trims and zeroes, and
/// acknowledged writes never flushed, over flushed data and into a hole; fsck is clean
/// afterwards.
#[test]
fn flushed_and_acknowledged_writes_survive_kill9_of_the_daemon() {
    let tmp = common::temp_dir();
    let dir = tmp.path().join("data");
    let mut n = Nbd::start_in(&dir);
    let (id, _) = n.attached_volume("vm1");
    // Shared by both scripts: the data of each region, regenerated from its seed.
    let common = format!(
        r#"
import nbd, random, sys
M = 1 << 20
def data(seed, n):
    return random.Random(seed).randbytes(n)
def conn():
    h = nbd.NBD()
    h.set_export_name({id:?})
    h.connect_unix({sock:?})
    return h
a, b = conn(), conn()
"#,
        sock = n.socket().display().to_string(),
    );
    let before = format!(
        r#"{common}
a.pwrite(data(1, M), 0)                       # flushed on the other connection
a.pwrite(data(2, 65536), 512 * M + 3)         # unaligned, ditto
b.flush()
b.pwrite(data(4, M), 200 * M)
b.trim(512 << 10, 200 * M + (256 << 10))
b.zero(4096, 200 * M + (768 << 10), nbd.CMD_FLAG_NO_HOLE)
b.zero(8192, 200 * M + (900 << 10))
a.flush()
a.pwrite(data(3, 256 << 10), 100 * M, nbd.CMD_FLAG_FUA)  # after the last flush
a.pwrite(data(5, 65536), 0)                   # over flushed data, never flushed
b.pwrite(data(6, M), 300 * M)                 # into a hole, never flushed
print("ready", flush=True)
sys.stdin.readline()
"#
    );
    let (mut py, _) = python_until_ready(&before);
    n.c.signal(libc::SIGKILL);
    n.c.wait_exit(std::time::Duration::from_secs(30));
    py.kill().expect("kill the client");
    py.wait().expect("wait");

    n = Nbd::start_in(&dir);
    let list = ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", n.socket().display()),
        ],
    );
    assert!(list.contains(&id), "the attachment survives: {list}");
    let after = format!(
        r#"{common}
def same(got, want, what):
    assert got == want, what
same(a.pread(M - 65536, 65536), data(1, M)[65536:], "flushed write")
same(b.pread(65536, 512 * M + 3), data(2, 65536), "unaligned flushed write")
same(a.pread(4098, 512 * M), bytes(3) + data(2, 65536)[:4095], "its first block")
same(a.pread(256 << 10, 100 * M), data(3, 256 << 10), "FUA write")
want = bytearray(data(4, M))
want[256 << 10:768 << 10] = bytes(512 << 10)
want[768 << 10:(768 << 10) + 4096] = bytes(4096)
want[900 << 10:(900 << 10) + 8192] = bytes(8192)
same(b.pread(M, 200 * M), bytes(want), "flushed trim and zeroes")
same(a.pread(65536, 0), data(5, 65536), "acknowledged overwrite, never flushed")
same(b.pread(M, 300 * M), data(6, M), "acknowledged write into a hole, never flushed")
same(a.pread(M, 400 * M), bytes(M), "never written")
print("OK", flush=True)
"#
    );
    let out = ok("/usr/bin/python3", &["-c", &after]);
    assert!(out.contains("OK"), "{out}");
    assert_eq!(n.c.stop_with(libc::SIGTERM).code(), Some(0));
    let (status, out, err) = run_cairn(&["fsck", "--data-dir", &n.data]);
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("clean"), "{out}");
}

/// What a guest was told is written survives `kill -9` of the daemon, flushed or not, as with
/// qemu-nbd and nbdkit (whose writes sit in the page cache, which a process crash leaves):
/// four connections stay open across the kill (so nothing flushes on close), 400 blocks are
/// written and flushed, then 2000 more are written and acknowledged but never flushed (a
/// third over the flushed ones, the rest at fresh offsets), with larger writes, trims and
/// zeroings among them; then writes are left in flight, each beside acknowledged data in the
/// same chunks. After the restart every acknowledged write reads back exactly; a block of a
/// write in flight holds its old or its new data, never anything else, and the acknowledged
/// data beside it is intact. fsck is clean. (Before the store journaled records as it went,
/// 1328 of 1728 acknowledged blocks read back wrong in the issue's run of this.)
#[test]
fn acknowledged_writes_survive_kill9_unflushed_with_writes_in_flight() {
    let tmp = common::temp_dir();
    let dir = tmp.path().join("data");
    let mut n = Nbd::start_in(&dir);
    let (id, _) = n.attached_volume("vm1");
    // The plan, the same in both scripts: ops in order, as (kind, conn, block, blocks, seed).
    let plan = format!(
        r#"
import nbd, random, sys
B = 4096
def data(seed, n):
    return random.Random(seed).randbytes(n)
def conn():
    h = nbd.NBD()
    h.set_export_name({id:?})
    h.connect_unix({sock:?})
    return h
def plan(blocks):
    rng = random.Random(21)
    flushed = rng.sample(range(0, blocks, 16), 400)   # spread out: chunks of their own
    ops = [("w", i % 4, b, 1, 1000 + i) for i, b in enumerate(flushed)]
    acked = []
    for i in range(2000):
        seed = 5000 + i
        if i % 3 == 0:
            b = rng.choice(flushed)                     # over flushed data
        else:
            b = rng.randrange(blocks)                    # fresh, mostly
        if i % 100 == 7:
            n = 64                                       # 256 KiB
            b = min(b, blocks - n)
        else:
            n = 1
        kind = "w"
        if i % 200 == 50:
            kind, n = "t", 16                            # trim 64 KiB
        elif i % 200 == 150:
            kind, n = "z", 2                             # zero 8 KiB, allocated
        b = min(b, blocks - n)
        acked.append((kind, i % 4, b, n, seed))
    # In flight at the kill: 16 blocks each, starting 3 blocks before an acknowledged block
    # of its own chunk or the next, so copy-up and partial chunks meet acknowledged data.
    loose = [(("w", i % 4, max(0, b - 3), 16, 90000 + i)) for i, (_, _, b, _, _) in
             enumerate(acked[1::37])]
    return ops, acked, loose
"#,
        sock = n.socket().display().to_string(),
    );
    let before = format!(
        r#"{plan}
hs = [conn() for _ in range(4)]
blocks = hs[0].get_size() // B
ops, acked, loose = plan(blocks)
def run(kind, c, b, n, seed):
    h = hs[c]
    if kind == "w":
        h.pwrite(data(seed, n * B), b * B)
    elif kind == "t":
        h.trim(n * B, b * B)
    else:
        h.zero(n * B, b * B, nbd.CMD_FLAG_NO_HOLE)
for op in ops:
    run(*op)
hs[0].flush()
for op in acked:
    run(*op)
bufs = []
for (_, c, b, n, seed) in loose:
    buf = bytearray(data(seed, n * B))
    bufs.append(buf)
    hs[c].aio_pwrite(buf, b * B)
for _ in range(200):
    for h in hs:
        h.poll(0)
print("ready", flush=True)
sys.stdin.readline()
"#
    );
    let (mut py, _) = python_until_ready(&before);
    n.c.signal(libc::SIGKILL);
    n.c.wait_exit(std::time::Duration::from_secs(30));
    py.kill().expect("kill the client");
    py.wait().expect("wait");

    n = Nbd::start_in(&dir);
    let after = format!(
        r#"{plan}
h = conn()
blocks = h.get_size() // B
ops, acked, loose = plan(blocks)
want = {{}}                                             # block -> bytes; absent: zeros
for (kind, c, b, n, seed) in ops + acked:
    d = data(seed, n * B) if kind == "w" else bytes(n * B)
    for k in range(n):
        want[b + k] = d[k * B:(k + 1) * B]
either = {{}}                                           # block -> the new data in flight
for (_, c, b, n, seed) in loose:
    d = data(seed, n * B)
    for k in range(n):
        either.setdefault(b + k, []).append(d[k * B:(k + 1) * B])
zero = bytes(B)
bad = []
step = 1024
for first in range(0, blocks, step):
    got = h.pread(step * B, first * B)
    for k in range(step):
        blk = first + k
        have = got[k * B:(k + 1) * B]
        old = want.get(blk, zero)
        if have != old and have not in either.get(blk, []):
            bad.append((blk, blk in either))
assert not bad, (len(bad), bad[:10])
print("OK", len(want), "blocks", len(either), "in flight", flush=True)
"#
    );
    let out = ok("/usr/bin/python3", &["-c", &after]);
    assert!(out.contains("OK"), "{out}");
    assert_eq!(n.c.stop_with(libc::SIGTERM).code(), Some(0));
    let (status, out, err) = run_cairn(&["fsck", "--data-dir", &n.data]);
    assert_eq!(status.code(), Some(0), "{out}\n{err}");
}

/// SIGTERM with a client connected that never flushed: the daemon answers what it took, ends
/// the connection, flushes and exits 0 while the client keeps its socket open; the data is
/// there at the next start.
#[test]
fn sigterm_with_a_client_attached_keeps_its_unflushed_writes() {
    let tmp = common::temp_dir();
    let dir = tmp.path().join("data");
    let mut n = Nbd::start_in(&dir);
    let (id, _) = n.attached_volume("vm1");
    let script = format!(
        r#"
import nbd, random, sys
h = nbd.NBD()
h.set_export_name({id:?})
h.connect_unix({sock:?})
h.pwrite(random.Random(3).randbytes(1 << 20), 7 << 20)
h.pwrite(random.Random(4).randbytes(4096), 0)
print("ready", flush=True)
sys.stdin.readline()
"#,
        sock = n.socket().display().to_string(),
    );
    let (mut py, _) = python_until_ready(&script);
    assert_eq!(n.c.stop_with(libc::SIGTERM).code(), Some(0));
    py.kill().expect("kill the client");
    py.wait().expect("wait");
    n = Nbd::start_in(&dir);
    let check = format!(
        r#"
import nbd, random
h = nbd.NBD()
h.set_export_name({id:?})
h.connect_unix({sock:?})
assert h.pread(1 << 20, 7 << 20) == random.Random(3).randbytes(1 << 20)
assert h.pread(4096, 0) == random.Random(4).randbytes(4096)
print("OK")
"#,
        sock = n.socket().display().to_string(),
    );
    assert!(ok("/usr/bin/python3", &["-c", &check]).contains("OK"));
    assert!(
        n.c.logs.contains("replayed_records=0"),
        "a clean stop leaves nothing to replay"
    );
}

/// Block status over a volume more fragmented than one reply may describe: the reply is
/// capped at 65536 descriptors, exact for the range it covers, and the client goes on from
/// where it ended; with REQ_ONE (as qemu asks) it is one descriptor.
#[test]
fn block_status_of_a_fragmented_volume_is_capped_and_exact() {
    let n = Nbd::start();
    let (id, _) = n.attached_volume("vm1");
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_export_name({id:?})
h.connect_unix({sock:?})
blocks = 65536 + 4                  # every other 4 KiB block: twice as many extents
buf = bytearray(b"\x5a" * 4096)
for i in range(0, blocks, 2):
    h.aio_pwrite(buf, i * 4096)
    while h.aio_in_flight() >= 64:
        h.poll(-1)
        h.aio_peek_command_completed()
while h.aio_in_flight() > 0:
    h.poll(-1)
    h.aio_peek_command_completed()
h.flush()
def status(off, flags=0):
    seen = []
    h.block_status((1 << 30) - off, off, lambda m, o, e, err: seen.extend(e), flags)
    return [(seen[i], seen[i + 1]) for i in range(0, len(seen), 2)]
hole = nbd.STATE_HOLE | nbd.STATE_ZERO
first = status(0)
assert len(first) == 65536, len(first)
assert all(d == (4096, 0 if k % 2 == 0 else hole) for k, d in enumerate(first)), first[:4]
rest = status(65536 * 4096)
assert rest == [(4096, 0), (4096, hole), (4096, 0), ((1 << 30) - 65539 * 4096, hole)], rest
assert status(0, nbd.CMD_FLAG_REQ_ONE) == [(4096, 0)]
assert status(4096, nbd.CMD_FLAG_REQ_ONE) == [(4096, hole)]
h.shutdown()
print("OK")
"#,
        sock = n.socket().display().to_string(),
    );
    let out = ok("/usr/bin/python3", &["-c", &script]);
    assert!(out.contains("OK"), "{out}");
}

/// Detaching a volume ends its export, and the detach answers only once that holds: a
/// write on an old connection after it is refused and never lands (the volume may be
/// attached elsewhere next). Connections to other exports stay.
#[test]
fn detach_closes_the_exports_connections() {
    use std::io::{BufRead, Write};

    let n = Nbd::start();
    let (id, _) = n.attached_volume("vm1");
    let (other, _) = n.attached_volume("vm2");
    // One connection to each export; wait for a line on stdin between the phases.
    let script = format!(
        r#"
import nbd, sys
def conn(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix({sock:?})
    return h
a, b = conn({id:?}), conn({other:?})
a.pwrite(b"\x01" * 4096, 0)
a.flush()
print("ready", flush=True)
sys.stdin.readline()
try:
    a.pwrite(b"\x03" * 4096, 0)
    a.flush()
    print("still open", flush=True)
except nbd.Error as e:
    print("closed", flush=True)
b.pwrite(b"\x02" * 4096, 0)
assert b.pread(4096, 0) == b"\x02" * 4096
print("other ok", flush=True)
sys.stdin.readline()
c = conn({id:?})
print("now", c.pread(4096, 0)[:1].hex(), flush=True)
"#,
        sock = n.socket().display().to_string(),
    );
    let (mut py, out) = python_until_ready(&script);
    let mut stdin = py.stdin.take().expect("stdin");

    // No waiting for the connection to notice: the detach returning is the fence.
    n.cli(&["volume", "detach", &id, "--server", "vm1"]);
    stdin.write_all(b"go\n").expect("write");
    let mut lines = out.lines();
    let mut next = || lines.next().expect("a line").expect("line");
    assert_eq!(next(), "closed");
    assert_eq!(next(), "other ok");
    // Attached elsewhere: the refused write is not there.
    n.cli(&["volume", "attach", &id, "--server", "vm2"]);
    stdin.write_all(b"go\n").expect("write");
    assert_eq!(next(), "now 01");
    let status = py.wait().expect("wait");
    assert!(status.success());
    let ended = n.c.logs.wait_for(std::time::Duration::from_secs(30), |l| {
        l.contains("NBD export ended") && l.contains(&id)
    });
    assert!(ended.is_some(), "{}", n.c.logs.text());
}

/// nbdcopy (4 connections because CAN_MULTI_CONN, 64 requests in flight each, sparse via
/// block status) in and out, and fio's nbd engine verifying its random writes.
#[test]
fn nbdcopy_and_fio_verify() {
    let n = Nbd::start();
    let (id, _) = n.attached_volume("vm1");
    let unix = n.unix_uri(&id);
    let tmp = common::temp_dir();
    // 1 GiB sparse source: random data in a few places, holes elsewhere.
    let src = tmp.path().join("src.img");
    let f = std::fs::File::create(&src).expect("create");
    f.set_len(1 << 30).expect("size");
    drop(f);
    let mut regions = Vec::new();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src)
            .expect("open");
        for (off, len) in [
            (0u64, 3 << 20),
            (100 << 20, 1 << 20),
            ((1 << 30) - 65536, 65536),
        ] {
            let mut d = vec![0u8; len];
            rand::fill(&mut d[..]);
            f.write_all_at(&d, off).expect("write");
            regions.push((off, d));
        }
    }
    let src = src.to_str().expect("utf8").to_owned();
    let dst = tmp.path().join("dst.img");
    ok("nbdcopy", &[&src, &unix]);
    ok("nbdcopy", &[&unix, dst.to_str().expect("utf8")]);
    // Byte for byte, 1 MiB at a time: the random regions, zeroes elsewhere.
    {
        use std::io::Read;
        let mut f = std::fs::File::open(&dst).expect("open copy");
        assert_eq!(f.metadata().expect("stat").len(), 1 << 30);
        let mut buf = vec![0u8; 1 << 20];
        let mut want = vec![0u8; 1 << 20];
        for mb in 0..1024u64 {
            f.read_exact(&mut buf).expect("read copy");
            want.fill(0);
            let (a, b) = (mb << 20, (mb + 1) << 20);
            for (off, d) in &regions {
                let end = off + d.len() as u64;
                let (s, e) = ((*off).max(a), end.min(b));
                if s < e {
                    want[(s - a) as usize..(e - a) as usize]
                        .copy_from_slice(&d[(s - off) as usize..(e - off) as usize]);
                }
            }
            assert!(buf == want, "nbdcopy round trip differs in MiB {mb}");
        }
    }

    let out = ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={unix}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    );
    assert!(!out.is_empty());
}

/// SIGTERM with NBD clients connected (one mid-handshake, one in transmission): the daemon
/// closes them and exits cleanly, without waiting for the handshake deadline.
#[test]
fn shutdown_closes_open_connections() {
    use std::io::{BufRead, Write};

    let mut n = Nbd::start();
    let (id, _) = n.attached_volume("vm1");
    let script = format!(
        r#"
import nbd, socket, sys
idle = socket.socket(socket.AF_UNIX)
idle.connect({sock:?})
idle.recv(18)  # the greeting; then say nothing
h = nbd.NBD()
h.set_export_name({id:?})
h.connect_unix({sock:?})
h.pwrite(b"\x01" * 4096, 0)
print("ready", flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0)
    print("still open", flush=True)
except nbd.Error:
    print("closed", flush=True)
print("idle eof" if idle.recv(1) == b"" else "idle data", flush=True)
"#,
        sock = n.socket().display().to_string(),
    );
    let (mut py, out) = python_until_ready(&script);

    let status = n.c.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status:?}\n{}", n.c.logs.text());
    assert!(n.c.logs.contains("NBD stopped"), "{}", n.c.logs.text());
    assert!(!n.socket().exists());

    py.stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write");
    let rest: Vec<String> = out.lines().map(|l| l.expect("line")).collect();
    assert!(py.wait().expect("wait").success(), "{rest:?}");
    assert_eq!(rest, ["closed", "idle eof"]);
}

/// Run an nbdsh-style Python script (Debian's python3, which has the `nbd` module) that
/// prints "ready" once set up and then waits for a line on stdin: the child and its output
/// after "ready".
fn python_until_ready(
    script: &str,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead as _;
    use std::process::Stdio;
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = std::io::BufReader::new(py.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready");
    (py, out)
}

/// A raw NBD client (Python, no libnbd): enough of the fixed-newstyle handshake and of
/// simple-reply transmission to stall where libnbd never would.
const RAW_NBD: &str = r#"
import socket, struct, sys
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
def recvall(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b
def greet(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    recvall(s, 18)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s
def send_go(s, name, name_infos=0):
    nb = name.encode()
    data = struct.pack(">I", len(nb)) + nb + struct.pack(">H", name_infos) + b"\x00\x01" * name_infos
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
def read_reply_header(s):
    magic, opt, typ, ln = struct.unpack(">QIII", recvall(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return typ, ln
def read_go(s):
    while True:
        typ, ln = read_reply_header(s)
        recvall(s, ln)
        if typ == 1:
            return True
        if typ & 0x80000000:
            return False
def write_req(s, off, length, cookie=1):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie, off, length))
def read_simple(s):
    magic, err, cookie = struct.unpack(">IIQ", recvall(s, 16))
    assert magic == 0x67446698, hex(magic)
    return err
def outcome(s):
    try:
        return "errno %d" % read_simple(s)
    except (EOFError, ConnectionError) as e:
        return "closed"
"#;

/// Block 0 of export `id` as read by a new libnbd connection: its first byte, in hex.
fn first_byte(n: &Nbd, id: &str) -> String {
    byte_at(n, id, 0)
}

/// The byte at `offset` of export `id`, read by a new libnbd connection, in hex.
fn byte_at(n: &Nbd, id: &str, offset: u64) -> String {
    let probe = format!(
        r#"
import nbd
h = nbd.NBD()
h.set_export_name({id:?})
h.connect_unix({sock:?})
print(h.pread(1, {offset})[:1].hex())
"#,
        sock = n.socket().display().to_string(),
    );
    ok("/usr/bin/python3", &["-c", &probe]).trim().to_owned()
}

/// Volume `id` moves from server vm1 to vm2 (`volume detach`, then `attach`) under an old
/// client of vm1: `script`, a raw client (after [`RAW_NBD`]) that prints "ready" and then
/// waits for a line. `then` runs after the move, the script goes on, and its next line of
/// output is returned.
fn across_a_move(n: &Nbd, id: &str, script: &str, then: impl FnOnce()) -> String {
    use std::io::{BufRead, Write};
    let (mut py, out) = python_until_ready(&format!("{RAW_NBD}\n{script}"));
    let mut stdin = py.stdin.take().expect("stdin");
    n.cli(&["volume", "detach", id, "--server", "vm1"]);
    n.cli(&["volume", "attach", id, "--server", "vm2"]);
    then();
    stdin.write_all(b"go\n").expect("write");
    let line = out.lines().next().expect("a line").expect("line");
    assert!(py.wait().expect("wait").success());
    line
}

/// A client whose WRITE payload is still on its way when the detach comes (a host cut off
/// mid-request) neither holds the detach up nor gets its write in afterwards: the request is
/// refused once its payload arrives, after the volume was attached elsewhere. Found by
/// review: the reader waited for the payload holding the fence, the detach answered after
/// its 30 s bound, and the late write landed on the next server's volume.
#[test]
fn a_write_whose_payload_is_late_is_fenced_too() {
    let (n, id) = Nbd::moving_volume(1);
    let script = format!(
        r#"
s = greet({sock:?})
send_go(s, {id:?})
assert read_go(s)
write_req(s, 0, 65536)
s.sendall(b"\x03" * 100)
print("ready", flush=True)
sys.stdin.readline()
s.sendall(b"\x03" * (65536 - 100))
print(outcome(s), flush=True)
"#,
        sock = n.socket().display().to_string(),
    );
    let old = across_a_move(&n, &id, &script, || assert_eq!(first_byte(&n, &id), "00"));
    assert!(
        // 108: NBD_ESHUTDOWN.
        old == "errno 108" || old == "closed",
        "the late write was served: {old}"
    );
    // Refused or cut off, it is not there, and new connections work.
    assert_eq!(first_byte(&n, &id), "00");
    assert!(
        !n.c.logs.text().contains("still have requests in the store"),
        "the detach waited for the stalled client: {}",
        n.c.logs.text()
    );
}

/// A connection whose GO was looked up before the detach and answered after it (the server
/// blocked writing the replies to a client not reading them) cannot write once the volume is
/// attached elsewhere. Found by review: it joined the fence only after the handshake, found
/// the export again after the re-attach (same volume), and wrote to the new server's volume.
#[test]
fn a_go_answered_across_a_detach_and_reattach_is_fenced() {
    let (n, id) = Nbd::moving_volume(1);
    let script = format!(
        r#"
s = greet({sock:?})
# NBD_INFO_NAME asked for 30000 times: ~1.7 MB of replies, more than the socket buffers,
# so the server blocks writing them. The first reply header proves the lookup is done.
send_go(s, {id:?}, 30000)
typ, ln = read_reply_header(s)
print("ready", flush=True)
sys.stdin.readline()
try:
    recvall(s, ln)
    if not read_go(s):
        print("go refused", flush=True)
        sys.exit(0)
except (EOFError, ConnectionError):
    print("closed", flush=True)
    sys.exit(0)
try:
    write_req(s, 0, 4096)
    s.sendall(b"\x03" * 4096)
except ConnectionError:
    print("closed", flush=True)
    sys.exit(0)
print(outcome(s), flush=True)
"#,
        sock = n.socket().display().to_string(),
    );
    let old = across_a_move(&n, &id, &script, || {});
    assert_ne!(old, "errno 0", "vm1's write was served after the detach");
    assert_eq!(first_byte(&n, &id), "00");
}

/// A zeroing that writes zeroes as data (NO_HOLE), 4 GiB long, stops when the export ends:
/// it is answered ESHUTDOWN, the detach does not wait for the rest of it, and nothing of it
/// lands on what the volume's next server writes. Found by review: the zeroing ran to its
/// end (the detach waited for it, up to its 30 s bound, and then answered while it went on).
#[test]
fn a_long_zeroing_stops_when_the_export_ends() {
    let (n, id) = Nbd::moving_volume(5);
    const LEN: u64 = (4 << 30) - 4096;
    let script = format!(
        r#"
s = greet({sock:?})
send_go(s, {id:?})
assert read_go(s)
# NBD_CMD_WRITE_ZEROES (6) with NBD_CMD_FLAG_NO_HOLE (2), then a READ (0) past it: the
# READ's reply proves the reader admitted the zeroing.
s.sendall(struct.pack(">IHHQQI", 0x25609513, 2, 6, 10, 0, {LEN})
          + struct.pack(">IHHQQI", 0x25609513, 0, 0, 99, 4 << 30, 4096))
magic, err, cookie = struct.unpack(">IIQ", recvall(s, 16))
assert (cookie, err) == (99, 0), (cookie, err)
recvall(s, 4096)
print("ready", flush=True)
sys.stdin.readline()
print(outcome(s), flush=True)
"#,
        sock = n.socket().display().to_string(),
    );
    // vm2 writes the zeroing's last block.
    let last = LEN - 4096;
    let write = format!(
        r#"
import nbd
h = nbd.NBD()
h.set_export_name({id:?})
h.connect_unix({sock:?})
h.pwrite(b"\x05" * 4096, {last})
h.flush()
"#,
        sock = n.socket().display().to_string(),
    );
    let old = across_a_move(&n, &id, &script, || {
        ok("/usr/bin/python3", &["-c", &write]);
    });
    // 108: NBD_ESHUTDOWN. Had it run to its end, it would be errno 0.
    assert_eq!(
        old, "errno 108",
        "the zeroing was not stopped by the detach"
    );
    assert_eq!(byte_at(&n, &id, last), "05");
}
