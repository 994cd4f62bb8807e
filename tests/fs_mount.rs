//! Shared filesystems through the real FUSE mount, used by ordinary programs: cp, rsync, tar,
//! diff, git, sqlite3, fio, dd, and a non-root user. Issue 26.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Cairn, Serve, admin_token, server};
use serde_json::json;

/// Runs `script` with bash (`set -euo pipefail`) in `dir`; its stdout, or a panic with both
/// streams.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` and returns (success, stdout + stderr), for what is meant to fail.
fn sh_status(dir: &Path, script: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

struct Fs<'a> {
    c: &'a Cairn,
    token: String,
    project: String,
}

impl Fs<'_> {
    fn new(c: &Cairn) -> Fs<'_> {
        let (token, project) = admin_token(c, "pw");
        Fs { c, token, project }
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> common::Reply {
        let body = body.map(|b| b.to_string());
        self.c.request(
            method,
            &format!("/v2.1/{}{path}", self.project),
            &[("X-Auth-Token", &self.token)],
            body.as_deref().map(|b| ("application/json", b)),
        )
    }

    fn put(&self, name: &str, size: &str, scope: &str) -> common::Reply {
        self.call(
            "PUT",
            &format!("/os-filesystem/{name}"),
            Some(json!({"fs_entry": {"size": size, "scope": scope}})),
        )
    }

    fn create(&self, name: &str, size: &str, scope: &str) -> PathBuf {
        let r = self.put(name, size, scope);
        assert_eq!(r.status, 200, "{}", r.body);
        self.operator_path(name)
    }

    fn operator_path(&self, name: &str) -> PathBuf {
        mount_dir(self.c)
            .join("filesystems")
            .join(&self.project)
            .join(name)
    }

    fn server(&self) -> String {
        server(self.c, &self.token, &self.project)
    }
}

fn mount_dir(c: &Cairn) -> PathBuf {
    c.data_dir().join("mnt")
}

fn start() -> Cairn {
    Serve::new().arg("--admin-password").arg("pw").start()
}

#[test]
fn real_programs_work_on_a_shared_filesystem() {
    let c = start();
    let fs = Fs::new(&c);
    let root = fs.create("work", "4Gb", "project");
    assert!(root.is_dir(), "{} missing", root.display());
    // A real tree: this crate's sources and a registry crate's, by cp -a, rsync and tar.
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    sh(
        &root,
        &format!(
            "cp -a {src}/src cp-tree && diff -r {src}/src cp-tree
             rsync -a {src}/tests/ rsync-tree/ && diff -r {src}/tests rsync-tree
             tar -C {src} -cf - src tests docs | tar -xf - -C . && diff -r {src}/docs docs
             mkdir moved && mv cp-tree moved/ && diff -r {src}/src moved/cp-tree
             rm -rf rsync-tree && test ! -e rsync-tree",
            src = src.display()
        ),
    );
    // git: a repository made, committed, branched and checked out on the mount.
    let log = sh(
        &root,
        "mkdir repo && cd repo && git init -q -b main
         git config user.email t@example.com && git config user.name t
         cp -a ../src . && git add -A && git commit -qm one
         git checkout -qb other && echo change >> src/lib.rs && git commit -qam two
         git checkout -q main && ! grep -q change src/lib.rs
         git checkout -q other && grep -q change src/lib.rs
         git fsck --strict 2>&1 && git log --format=%s",
    );
    assert!(log.ends_with("two\none\n"), "{log}");
    // sqlite3: transactions in WAL mode (its shared memory is an mmap of a file here) and
    // with a rollback journal.
    let sum = sh(
        &root,
        "sqlite3 w.db 'PRAGMA journal_mode=WAL; CREATE TABLE t(a); BEGIN;
            INSERT INTO t VALUES (1),(2),(3); COMMIT; BEGIN; INSERT INTO t VALUES (100);
            ROLLBACK; SELECT sum(a) FROM t; PRAGMA integrity_check;'
         sqlite3 r.db 'CREATE TABLE t(a); BEGIN; INSERT INTO t VALUES (5); COMMIT;
            SELECT sum(a) FROM t;'",
    );
    assert_eq!(sum, "wal\n6\nok\n5\n");
    // fio writes and verifies with checksums, buffered and direct, with io_uring.
    sh(
        &root,
        "fio --name=buffered --filename=fio-b --size=32m --bs=64k --rw=randwrite \
            --verify=crc32c --ioengine=psync --output=/dev/null
         fio --name=direct --filename=fio-d --size=16m --bs=4k --rw=randwrite --direct=1 \
            --verify=crc32c --ioengine=io_uring --iodepth=16 --output=/dev/null",
    );
    // Byte-level semantics programs rely on: O_APPEND, sparse files past 4 GiB with
    // SEEK_DATA/SEEK_HOLE, punching holes, truncation, mmap writes, hard links, xattrs.
    let out = sh(
        &root,
        r#"python3 - <<'EOF'
import mmap, os
fd = os.open("ap", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(fd, b"one,"); os.pwrite(fd, b"two", 0); os.close(fd)
print(open("ap").read())
fd = os.open("sparse", os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"x" * 8192, 1 << 20)
os.pwrite(fd, b"end", 5 << 30)
st = os.fstat(fd)
print(st.st_size, st.st_blocks, os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE),
      os.lseek(fd, 1 << 20, os.SEEK_HOLE), os.lseek(fd, (1 << 20) + 8192, os.SEEK_DATA))
assert os.pread(fd, 3, 5 << 30) == b"end" and os.pread(fd, 4, 4096) == bytes(4)
os.ftruncate(fd, (1 << 20) + 100)
print(os.fstat(fd).st_size, os.pread(fd, 200, 1 << 20) == b"x" * 100)
os.ftruncate(fd, 2 << 20)
print(os.pread(fd, 8, (1 << 20) + 96) == b"xxxx" + bytes(4))
os.close(fd)
fd = os.open("mapped", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 1 << 20)
m = mmap.mmap(fd, 1 << 20)
m[8192:8197] = b"hello"; m.flush(); m.close(); os.close(fd)
print(open("mapped", "rb").read()[8192:8197].decode())
os.link("mapped", "mapped-link")
os.setxattr("mapped", "user.colour", b"blue")
print(os.stat("mapped").st_nlink, os.getxattr("mapped-link", "user.colour").decode(),
      os.listxattr("mapped"))
EOF
fallocate -p -o 1048576 -l 8192 sparse
python3 - <<'EOF'
import os
fd = os.open("sparse", os.O_RDONLY)
try:
    print(os.lseek(fd, 0, os.SEEK_DATA))
except OSError as e:
    print("no data:", os.strerror(e.errno), os.pread(fd, 8, 1 << 20) == bytes(8))
EOF
"#,
    );
    assert_eq!(
        out,
        "one,two\n\
         5368709123 24 1048576 0 1056768 5368709120\n\
         1048676 True\n\
         True\n\
         hello\n\
         2 blue ['user.colour']\n\
         no data: No such device or address True\n"
    );
    // Renames: over an existing file, RENAME_NOREPLACE and RENAME_EXCHANGE (util-linux mv has
    // --exchange only lately: python's ctypes calls renameat2).
    let out = sh(
        &root,
        r#"echo a > ra; echo b > rb; echo c > rc
mv ra rb && cat rb && test ! -e ra
python3 - <<'EOF'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def renameat2(a, b, flags):
    r = libc.renameat2(-100, a.encode(), -100, b.encode(), flags)
    return 0 if r == 0 else ctypes.get_errno()
print(renameat2("rb", "rc", 1))
print(renameat2("rb", "rc", 2), open("rb").read().strip(), open("rc").read().strip())
EOF
"#,
    );
    assert_eq!(out, format!("a\n{}\n0 c a\n", libc::EEXIST));
}

#[test]
fn views_follow_instances_and_see_each_other() {
    let c = start();
    let fs = Fs::new(&c);
    let vm1 = fs.server();
    let vm2 = fs.server();
    let mnt = mount_dir(&c);
    let op = fs.create("home", "1Gb", "project");
    let v1 = mnt.join("instances").join(&vm1).join("home");
    let v2 = mnt.join("instances").join(&vm2).join("home");
    // Two instances of the project see one filesystem, and each other's writes at once.
    sh(
        &mnt,
        &format!(
            "echo from-vm1 > {v1}/note
             test \"$(cat {v2}/note)\" = from-vm1
             echo from-vm2 >> {v2}/note
             test \"$(cat {v1}/note)\" = \"$(printf 'from-vm1\\nfrom-vm2')\"
             test \"$(cat {op}/note)\" = \"$(printf 'from-vm1\\nfrom-vm2')\"
             mkdir {v2}/d && mv {v1}/note {v2}/d/ && test -f {op}/d/note && test ! -e {v1}/note",
            v1 = v1.display(),
            v2 = v2.display(),
            op = op.display()
        ),
    );
    // An instance made later sees the project's filesystem with no call to this API.
    let vm3 = fs.server();
    assert!(
        mnt.join("instances")
            .join(&vm3)
            .join("home/d/note")
            .is_file()
    );
    // Scope `instance`: only connected instances; a grant taken away ends what was open.
    fs.create("scratch", "100Mb", "instance");
    let s1 = mnt.join("instances").join(&vm1).join("scratch");
    assert!(!s1.exists());
    let r = fs.call(
        "PUT",
        &format!("/os-filesystem/scratch/instances/{vm1}"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(s1.is_dir());
    assert!(!mnt.join("instances").join(&vm2).join("scratch").exists());
    let mut held = std::fs::File::create(s1.join("held")).expect("create in scratch");
    use std::io::Write;
    held.write_all(b"before").expect("write before");
    let r = fs.call(
        "DELETE",
        &format!("/os-filesystem/scratch/instances/{vm1}"),
        None,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(!s1.exists());
    let e = held
        .write_all(b"after")
        .expect_err("a revoked view must refuse writes");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    drop(held);
    // The operators still see what was written before.
    assert_eq!(
        std::fs::read(fs.operator_path("scratch").join("held")).unwrap(),
        b"before"
    );
    // Deleting an instance removes its directory.
    let r = c.request(
        "DELETE",
        &format!("/compute/v2.1/{}/servers/{vm2}", fs.project),
        &[("X-Auth-Token", &fs.token)],
        None,
    );
    assert!(matches!(r.status, 202 | 204), "{}", r.body);
    assert!(!mnt.join("instances").join(&vm2).exists());
    let listed = sh(&mnt, "ls instances");
    assert!(listed.contains(&vm1) && !listed.contains(&vm2), "{listed}");
    // Deleting the filesystem removes it from every view.
    let r = fs.call("DELETE", "/os-filesystem/home", None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(!v1.exists() && !op.exists());
}

#[test]
fn permissions_are_the_kernels_for_a_non_root_user() {
    let c = start();
    let fs = Fs::new(&c);
    let root = fs.create("perm", "1Gb", "project");
    // As user nobody (65534): the root directory is root's, 0755.
    let as_nobody = |script: &str| {
        sh_status(
            &root,
            &format!("setpriv --reuid=65534 --regid=65534 --clear-groups bash -c '{script}'"),
        )
    };
    let (ok, out) = as_nobody("touch denied");
    assert!(!ok && out.contains("Permission denied"), "{out}");
    sh(
        &root,
        "mkdir mine && chown 65534:65534 mine
         echo secret > secret && chmod 600 secret
         mkdir -m 1777 sticky && echo root > sticky/roots",
    );
    let (ok, out) = as_nobody("cat secret");
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let (ok, out) = as_nobody("echo x > mine/f && chmod 640 mine/f && stat -c %a:%u mine/f");
    assert!(ok && out.trim() == "640:65534", "{out}");
    // Not the owner: chmod and chown refused; sticky directory: others' files stay.
    let (ok, out) = as_nobody("chmod 777 secret");
    assert!(!ok && out.contains("Operation not permitted"), "{out}");
    let (ok, out) = as_nobody("chown 65534 mine/f && chown 0 mine/f");
    assert!(!ok && out.contains("Operation not permitted"), "{out}");
    let (ok, out) = as_nobody("rm -f sticky/roots");
    assert!(!ok && out.contains("Operation not permitted"), "{out}");
    let (ok, _) = as_nobody("echo n > sticky/nobodys && rm sticky/nobodys");
    assert!(ok);
    // utimens by the owner to a given time, and the times shown back.
    let (ok, out) = as_nobody("touch -d @1000000000 mine/f && stat -c %Y mine/f");
    assert!(ok && out.trim() == "1000000000", "{out}");
}

#[test]
fn quota_is_enforced_and_reported() {
    let c = start();
    let fs = Fs::new(&c);
    let root = fs.create("small", "8Mb", "project");
    let df = sh(&root, "stat -f -c '%b %S' .");
    assert_eq!(df.trim(), format!("{} 4096", 8 * 256));
    // Writing past the quota: ENOSPC, and what was written before stays whole.
    let (ok, out) = sh_status(
        &root,
        "dd if=/dev/urandom of=big bs=1M count=12 conv=fsync 2>&1",
    );
    assert!(!ok && out.contains("No space left on device"), "{out}");
    let size: u64 = sh(&root, "stat -c %s big").trim().parse().unwrap();
    assert!(size <= 8 << 20 && size.is_multiple_of(1 << 20), "{size}");
    let free: u64 = sh(&root, "stat -f -c %a .").trim().parse().unwrap();
    assert!(free < 256, "{free} blocks free");
    // Shrinking below the data is refused; growing makes room.
    let r = fs.put("small", "4Mb", "project");
    assert_eq!(r.status, 409, "{}", r.body);
    let r = fs.put("small", "32Mb", "project");
    assert_eq!(r.status, 200, "{}", r.body);
    sh(&root, "dd if=/dev/zero of=more bs=1M count=12 status=none");
    // Deleting frees the space at once.
    sh(&root, "rm big more && test \"$(stat -f -c %a .)\" -gt 8000");
}

#[test]
fn fsynced_files_survive_kill_and_restart() {
    let dir = common::temp_dir();
    let data = dir.path().join("data");
    let serve = || {
        Serve::new()
            .data_dir(&data)
            .arg("--admin-password")
            .arg("pw")
            .start()
    };
    let mut c = serve();
    let fs = Fs::new(&c);
    let root = fs.create("keep", "1Gb", "project");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    sh(
        &root,
        &format!(
            "cp -a {src} tree && mkdir -p a/b && echo deep > a/b/c && ln -s b/c a/link
             dd if=/dev/urandom of=blob bs=1M count=8 status=none
             touch -d @1000000000 blob
             dd if=/dev/urandom of=blob bs=4k count=1 conv=notrunc status=none
             test $(stat -c %Y blob) -gt 1000000000
             sync -f blob",
            src = src.display(),
        ),
    );
    let before = sh(&root, "find . -printf '%p %s %m %y\\n' | sort");
    let sum = sh(&root, "md5sum blob");
    c.stop_with(libc::SIGKILL);
    drop(c);
    let c = serve();
    let fs2 = Fs::new(&c);
    let root2 = fs2.operator_path("keep");
    assert_eq!(sh(&root2, "find . -printf '%p %s %m %y\\n' | sort"), before);
    assert_eq!(sh(&root2, "md5sum blob"), sum);
    // The time of a write inside the file (kept back from the metadata until the close).
    let mtime: u64 = sh(&root2, "stat -c %Y blob").trim().parse().unwrap();
    assert!(mtime > 1_000_000_000, "{mtime}");
    sh(
        &root2,
        &format!(
            "diff -r {} tree && test \"$(cat a/link)\" = deep",
            src.display()
        ),
    );
}

#[test]
fn without_dev_fuse_the_rest_runs_and_says_so() {
    // A mount namespace whose /dev is an empty tmpfs: a host with no FUSE device.
    let mut c = Serve::new()
        .arg("--admin-password")
        .arg("pw")
        .wrapped_in(&[
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$@\"",
            "sh",
        ])
        .spawn();
    c.wait_ready();
    let h = c.get("/healthz");
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.json()["checks"]["fuse"], "disabled: /dev/fuse is missing");
    assert!(c.logs.contains("/dev/fuse is missing"), "{}", c.logs.text());
    // The API still serves filesystems' records.
    let fs = Fs::new(&c);
    let r = fs.put("nofuse", "1Gb", "project");
    assert_eq!(r.status, 200, "{}", r.body);
}
