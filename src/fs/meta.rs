//! One shared filesystem's metadata: inodes, directory entries and xattrs in a SQLite database
//! of its own (`<data-dir>/fs/<id>.sqlite`).
//!
//! Why a database per filesystem rather than the catalog or a journal of the store's own:
//! metadata operations are many small transactions that must be atomic (a rename touches two
//! directories and maybe an inode), which SQLite gives for free; one file per filesystem keeps
//! filesystems from serialising on one writer, makes deleting one a file removal, and keeps
//! the catalog small. WAL mode with `synchronous=NORMAL`: a commit reaches the WAL file's page
//! cache (so it survives kill -9) and [`sync_wal`] fsyncs the WAL for `fsync(2)`.
//!
//! Errors are errnos: this module's callers answer the kernel.
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

pub type Errno = i32;
pub type R<T> = Result<T, Errno>;

pub const ROOT: u64 = 1;
/// The first readdir cookie of a directory's entries: 1 and 2 are `.` and `..`.
pub const FIRST_COOKIE: i64 = 3;
pub const NAME_MAX: usize = 255;
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub rdev: u32,
    /// A directory's parent (`..`); 0 for others.
    pub parent: u64,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

pub struct DirEntry {
    pub cookie: i64,
    pub name: Vec<u8>,
    pub ino: u64,
    pub mode: u32,
}

/// What [`Meta::setattr`] changes; `None` leaves a field.
#[derive(Default, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<i64>,
    pub mtime: Option<i64>,
    pub ctime: Option<i64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inodes (
    ino     INTEGER PRIMARY KEY,
    mode    INTEGER NOT NULL,
    uid     INTEGER NOT NULL,
    gid     INTEGER NOT NULL,
    nlink   INTEGER NOT NULL,
    size    INTEGER NOT NULL DEFAULT 0,
    atime   INTEGER NOT NULL,
    mtime   INTEGER NOT NULL,
    ctime   INTEGER NOT NULL,
    rdev    INTEGER NOT NULL DEFAULT 0,
    parent  INTEGER NOT NULL DEFAULT 0,
    -- a symlink's target
    target  BLOB,
    -- a directory's next readdir cookie
    next_cookie INTEGER NOT NULL DEFAULT 3
);
CREATE TABLE IF NOT EXISTS dentries (
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    ino    INTEGER NOT NULL,
    cookie INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS dentries_cookie ON dentries (parent, cookie);
CREATE TABLE IF NOT EXISTS xattrs (
    ino   INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
";

const COLS: &str = "ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, parent";

fn row(r: &Row<'_>) -> rusqlite::Result<Inode> {
    Ok(Inode {
        ino: r.get::<_, i64>(0)? as u64,
        mode: r.get(1)?,
        uid: r.get(2)?,
        gid: r.get(3)?,
        nlink: r.get(4)?,
        size: r.get::<_, i64>(5)? as u64,
        atime: r.get(6)?,
        mtime: r.get(7)?,
        ctime: r.get(8)?,
        rdev: r.get(9)?,
        parent: r.get::<_, i64>(10)? as u64,
    })
}

fn io(e: rusqlite::Error) -> Errno {
    tracing::error!(error = %e, "filesystem metadata");
    libc::EIO
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn check_name(name: &[u8]) -> R<()> {
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

pub struct Meta {
    conn: Connection,
    wal: PathBuf,
    /// The next inode number: numbers are not reused while the daemon runs (the kernel may
    /// still hold a removed one), without AUTOINCREMENT's extra page per create.
    next_ino: u64,
}

/// What a new inode is made of.
pub struct NewInode<'a> {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub target: Option<&'a [u8]>,
}

impl Meta {
    pub fn open(path: &Path) -> rusqlite::Result<Meta> {
        let conn = Connection::open(path)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        let t = now_ns();
        conn.execute(
            "INSERT OR IGNORE INTO inodes (ino, mode, uid, gid, nlink, atime, mtime, ctime, \
             parent) VALUES (?1, ?2, 0, 0, 2, ?3, ?3, ?3, ?1)",
            params![ROOT as i64, libc::S_IFDIR | 0o755, t],
        )?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let max: i64 = conn.query_row("SELECT max(ino) FROM inodes", [], |r| r.get(0))?;
        Ok(Meta {
            conn,
            wal: PathBuf::from(wal),
            next_ino: max as u64 + 1,
        })
    }

    /// The WAL file, whose fsync ([`sync_wal`]) makes every committed transaction durable.
    pub fn wal_path(&self) -> PathBuf {
        self.wal.clone()
    }

    fn tx(&mut self) -> R<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(io)
    }

    pub fn get(&self, ino: u64) -> R<Inode> {
        get(&self.conn, ino)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<Inode> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let ino = child(&self.conn, parent, name)?.ok_or(libc::ENOENT)?;
        get(&self.conn, ino)
    }

    pub fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        self.conn
            .query_row(
                "SELECT target FROM inodes WHERE ino = ?1",
                [ino as i64],
                |r| r.get::<_, Option<Vec<u8>>>(0),
            )
            .optional()
            .map_err(io)?
            .ok_or(libc::ENOENT)?
            .ok_or(libc::EINVAL)
    }

    /// Makes `name` in `parent` a new inode (file, directory, symlink, node).
    pub fn create(&mut self, parent: u64, name: &[u8], new: NewInode<'_>) -> R<Inode> {
        check_name(name)?;
        let ino = self.next_ino;
        let tx = self.tx()?;
        let p = dir(&tx, parent)?;
        if child(&tx, parent, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        let t = now_ns();
        let is_dir = new.mode & libc::S_IFMT == libc::S_IFDIR;
        tx.execute(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, parent, \
             target, ino) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?7, ?8, ?9, ?10)",
            params![
                new.mode,
                new.uid,
                new.gid,
                if is_dir { 2 } else { 1 },
                new.target.map_or(0, |t| t.len() as i64),
                t,
                new.rdev,
                if is_dir { parent as i64 } else { 0 },
                new.target,
                ino as i64,
            ],
        )
        .map_err(io)?;
        add_entry(&tx, &p, name, ino)?;
        touch_dir(&tx, parent, if is_dir { 1 } else { 0 }, t)?;
        let inode = get(&tx, ino)?;
        tx.commit().map_err(io)?;
        self.next_ino += 1;
        Ok(inode)
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &[u8]) -> R<Inode> {
        check_name(name)?;
        let tx = self.tx()?;
        let p = dir(&tx, parent)?;
        let i = get(&tx, ino)?;
        if i.is_dir() {
            return Err(libc::EPERM);
        }
        if i.nlink == 0 {
            return Err(libc::ENOENT);
        }
        if child(&tx, parent, name)?.is_some() {
            return Err(libc::EEXIST);
        }
        let t = now_ns();
        add_entry(&tx, &p, name, ino)?;
        exec(
            &tx,
            "UPDATE inodes SET nlink = nlink + 1, ctime = ?2 WHERE ino = ?1",
            params![ino as i64, t],
        )?;
        touch_dir(&tx, parent, 0, t)?;
        let inode = get(&tx, ino)?;
        tx.commit().map_err(io)?;
        Ok(inode)
    }

    /// Removes `name` (a directory when `want_dir`, which must be empty). Returns the inode
    /// as it is after (`nlink == 0` when its last name went), and whether it is gone too: it
    /// is, in the same transaction, unless `keep` says it is open.
    pub fn remove(
        &mut self,
        parent: u64,
        name: &[u8],
        want_dir: bool,
        keep: impl Fn(u64) -> bool,
    ) -> R<(Inode, bool)> {
        let tx = self.tx()?;
        dir(&tx, parent)?;
        let ino = child(&tx, parent, name)?.ok_or(libc::ENOENT)?;
        let i = get(&tx, ino)?;
        match (want_dir, i.is_dir()) {
            (true, false) => return Err(libc::ENOTDIR),
            (false, true) => return Err(libc::EISDIR),
            _ => {}
        }
        if i.is_dir() && has_entries(&tx, ino)? {
            return Err(libc::ENOTEMPTY);
        }
        let t = now_ns();
        drop_name(&tx, parent, name, &i, t)?;
        touch_dir(&tx, parent, if i.is_dir() { -1 } else { 0 }, t)?;
        let after = get(&tx, ino)?;
        let gone = after.nlink == 0 && !keep(ino);
        if gone {
            purge_in(&tx, ino)?;
        }
        tx.commit().map_err(io)?;
        Ok((after, gone))
    }

    /// rename(2) with `RENAME_NOREPLACE` / `RENAME_EXCHANGE`. Returns the inode that lost its
    /// last name by being replaced, if any.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> R<Option<Inode>> {
        check_name(newname)?;
        let tx = self.tx()?;
        let (p, np) = (dir(&tx, parent)?, dir(&tx, newparent)?);
        let src = get(&tx, child(&tx, parent, name)?.ok_or(libc::ENOENT)?)?;
        let dst = match child(&tx, newparent, newname)? {
            Some(i) => Some(get(&tx, i)?),
            None => None,
        };
        if exchange && dst.is_none() {
            return Err(libc::ENOENT);
        }
        if noreplace && dst.is_some() {
            return Err(libc::EEXIST);
        }
        if dst.as_ref().is_some_and(|d| d.ino == src.ino) {
            // Two names of one inode: nothing to do (POSIX).
            return Ok(None);
        }
        // A directory cannot move under itself.
        if src.is_dir() && is_ancestor(&tx, src.ino, newparent)? {
            return Err(libc::EINVAL);
        }
        if exchange
            && let Some(d) = &dst
            && d.is_dir()
            && is_ancestor(&tx, d.ino, parent)?
        {
            return Err(libc::EINVAL);
        }
        let t = now_ns();
        if exchange {
            let d = dst.expect("checked above");
            set_entry_ino(&tx, parent, name, d.ino)?;
            set_entry_ino(&tx, newparent, newname, src.ino)?;
            for (i, to) in [(&src, newparent), (&d, parent)] {
                exec(
                    &tx,
                    "UPDATE inodes SET ctime = ?2, parent = CASE WHEN parent != 0 THEN ?3 \
                     ELSE 0 END WHERE ino = ?1",
                    params![i.ino as i64, t, to as i64],
                )?;
            }
            if parent != newparent {
                let moved = src.is_dir() as i64 - d.is_dir() as i64;
                touch_dir(&tx, parent, -moved, t)?;
                touch_dir(&tx, newparent, moved, t)?;
            } else {
                touch_dir(&tx, parent, 0, t)?;
            }
            tx.commit().map_err(io)?;
            return Ok(None);
        }
        let mut replaced = None;
        if let Some(d) = &dst {
            match (src.is_dir(), d.is_dir()) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if has_entries(&tx, d.ino)? => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            drop_name(&tx, newparent, newname, d, t)?;
            if d.is_dir() {
                touch_dir(&tx, newparent, -1, t)?;
            }
            replaced = Some(get(&tx, d.ino)?);
        }
        exec(
            &tx,
            "DELETE FROM dentries WHERE parent = ?1 AND name = ?2",
            params![parent as i64, name],
        )?;
        // Re-read: dropping `dst` may have moved the directory's cookie counter.
        let np = if dst.is_some() {
            dir(&tx, newparent)?
        } else {
            np
        };
        add_entry(&tx, &np, newname, src.ino)?;
        exec(
            &tx,
            "UPDATE inodes SET ctime = ?2, parent = CASE WHEN parent != 0 THEN ?3 ELSE 0 END \
             WHERE ino = ?1",
            params![src.ino as i64, t, newparent as i64],
        )?;
        let moved = if src.is_dir() && parent != newparent {
            1
        } else {
            0
        };
        touch_dir(&tx, p.ino, -moved, t)?;
        touch_dir(&tx, newparent, moved, t)?;
        tx.commit().map_err(io)?;
        Ok(replaced.filter(|r| r.nlink == 0))
    }

    pub fn setattr(&mut self, ino: u64, a: &SetAttr) -> R<Inode> {
        let tx = self.tx()?;
        let mut i = get(&tx, ino)?;
        if let Some(m) = a.mode {
            i.mode = (i.mode & libc::S_IFMT) | (m & 0o7777);
        }
        if let Some(u) = a.uid {
            i.uid = u;
        }
        if let Some(g) = a.gid {
            i.gid = g;
        }
        if let Some(s) = a.size {
            i.size = s;
        }
        if let Some(t) = a.atime {
            i.atime = t;
        }
        if let Some(t) = a.mtime {
            i.mtime = t;
        }
        i.ctime = a.ctime.unwrap_or_else(now_ns);
        exec(
            &tx,
            "UPDATE inodes SET mode = ?2, uid = ?3, gid = ?4, size = ?5, atime = ?6, mtime = ?7, \
             ctime = ?8 WHERE ino = ?1",
            params![
                ino as i64,
                i.mode,
                i.uid,
                i.gid,
                i.size as i64,
                i.atime,
                i.mtime,
                i.ctime
            ],
        )?;
        tx.commit().map_err(io)?;
        Ok(i)
    }

    /// A write that grew the file: its size (never shrunk by a late writer) and times.
    pub fn written(&mut self, ino: u64, size: u64, t: i64) -> R<()> {
        let n = exec(
            &self.conn,
            "UPDATE inodes SET size = max(size, ?2), mtime = ?3, ctime = ?3 WHERE ino = ?1",
            params![ino as i64, size as i64, t],
        )?;
        if n == 0 {
            return Err(libc::ENOENT);
        }
        Ok(())
    }

    /// Writes' times kept back by [`super::vol::Vol`] (see its `times`).
    pub fn set_times(&mut self, ino: u64, t: i64) -> R<()> {
        exec(
            &self.conn,
            "UPDATE inodes SET mtime = max(mtime, ?2), ctime = max(ctime, ?2) WHERE ino = ?1",
            params![ino as i64, t],
        )?;
        Ok(())
    }

    /// Entries of `dir` after cookie `after`, at most `limit`, in cookie order.
    pub fn readdir(&self, dir_ino: u64, after: i64, limit: usize) -> R<Vec<DirEntry>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT d.cookie, d.name, d.ino, i.mode FROM dentries d JOIN inodes i \
                 ON i.ino = d.ino WHERE d.parent = ?1 AND d.cookie > ?2 ORDER BY d.cookie \
                 LIMIT ?3",
            )
            .map_err(io)?;
        stmt.query_map(params![dir_ino as i64, after, limit as i64], |r| {
            Ok(DirEntry {
                cookie: r.get(0)?,
                name: r.get(1)?,
                ino: r.get::<_, i64>(2)? as u64,
                mode: r.get(3)?,
            })
        })
        .map_err(io)?
        .collect::<rusqlite::Result<_>>()
        .map_err(io)
    }

    /// Forgets an inode with no names left (its data is the caller's to drop).
    pub fn purge(&mut self, ino: u64) -> R<()> {
        let tx = self.tx()?;
        exec(
            &tx,
            "DELETE FROM inodes WHERE ino = ?1 AND nlink = 0",
            [ino as i64],
        )?;
        exec(&tx, "DELETE FROM xattrs WHERE ino = ?1", [ino as i64])?;
        tx.commit().map_err(io)
    }

    /// Inodes with no names: left by a crash while they were open.
    pub fn orphans(&self) -> R<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT ino FROM inodes WHERE nlink = 0")
            .map_err(io)?;
        stmt.query_map([], |r| r.get::<_, i64>(0).map(|i| i as u64))
            .map_err(io)?
            .collect::<rusqlite::Result<_>>()
            .map_err(io)
    }

    /// Number of inodes, for statfs.
    pub fn inode_count(&self) -> R<u64> {
        self.conn
            .query_row("SELECT count(*) FROM inodes", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(io)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> R<Vec<u8>> {
        get(&self.conn, ino)?;
        self.conn
            .query_row(
                "SELECT value FROM xattrs WHERE ino = ?1 AND name = ?2",
                params![ino as i64, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(io)?
            .ok_or(libc::ENODATA)
    }

    pub fn listxattr(&self, ino: u64) -> R<Vec<u8>> {
        get(&self.conn, ino)?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM xattrs WHERE ino = ?1 ORDER BY name")
            .map_err(io)?;
        let names = stmt
            .query_map([ino as i64], |r| r.get::<_, Vec<u8>>(0))
            .map_err(io)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(io)?;
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr(2): `create` = XATTR_CREATE, `replace` = XATTR_REPLACE.
    pub fn setxattr(
        &mut self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> R<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(libc::ERANGE);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(libc::E2BIG);
        }
        let tx = self.tx()?;
        get(&tx, ino)?;
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM xattrs WHERE ino = ?1 AND name = ?2)",
                params![ino as i64, name],
                |r| r.get(0),
            )
            .map_err(io)?;
        if create && exists {
            return Err(libc::EEXIST);
        }
        if replace && !exists {
            return Err(libc::ENODATA);
        }
        exec(
            &tx,
            "INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?1, ?2, ?3)",
            params![ino as i64, name, value],
        )?;
        touch(&tx, ino)?;
        tx.commit().map_err(io)
    }

    pub fn removexattr(&mut self, ino: u64, name: &[u8]) -> R<()> {
        let tx = self.tx()?;
        get(&tx, ino)?;
        let n = tx
            .execute(
                "DELETE FROM xattrs WHERE ino = ?1 AND name = ?2",
                params![ino as i64, name],
            )
            .map_err(io)?;
        if n == 0 {
            return Err(libc::ENODATA);
        }
        touch(&tx, ino)?;
        tx.commit().map_err(io)
    }
}

/// fsync of a WAL file: any descriptor of a file flushes all of its dirty pages, so this
/// makes every transaction committed to it durable.
pub fn sync_wal(wal: &Path) -> std::io::Result<()> {
    match std::fs::File::open(wal) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The inode's status changed now (ctime).
fn touch(conn: &Connection, ino: u64) -> R<()> {
    exec(
        conn,
        "UPDATE inodes SET ctime = ?2 WHERE ino = ?1",
        params![ino as i64, now_ns()],
    )?;
    Ok(())
}

fn purge_in(conn: &Connection, ino: u64) -> R<()> {
    exec(
        conn,
        "DELETE FROM inodes WHERE ino = ?1 AND nlink = 0",
        [ino as i64],
    )?;
    exec(conn, "DELETE FROM xattrs WHERE ino = ?1", [ino as i64])?;
    Ok(())
}

/// `execute` through the statement cache: these statements run on every operation.
fn exec(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> R<usize> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.execute(p))
        .map_err(io)
}

fn get(conn: &Connection, ino: u64) -> R<Inode> {
    conn.prepare_cached(&format!("SELECT {COLS} FROM inodes WHERE ino = ?1"))
        .map_err(io)?
        .query_row([ino as i64], row)
        .optional()
        .map_err(io)?
        .ok_or(libc::ENOENT)
}

fn dir(conn: &Connection, ino: u64) -> R<Inode> {
    let i = get(conn, ino)?;
    if !i.is_dir() {
        return Err(libc::ENOTDIR);
    }
    if i.nlink == 0 {
        return Err(libc::ENOENT);
    }
    Ok(i)
}

fn child(conn: &Connection, parent: u64, name: &[u8]) -> R<Option<u64>> {
    conn.prepare_cached("SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2")
        .map_err(io)?
        .query_row(params![parent as i64, name], |r| r.get::<_, i64>(0))
        .optional()
        .map(|o| o.map(|i| i as u64))
        .map_err(io)
}

fn has_entries(conn: &Connection, ino: u64) -> R<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM dentries WHERE parent = ?1)",
        [ino as i64],
        |r| r.get(0),
    )
    .map_err(io)
}

fn add_entry(conn: &Connection, parent: &Inode, name: &[u8], ino: u64) -> R<()> {
    let cookie: i64 = conn
        .query_row(
            "UPDATE inodes SET next_cookie = next_cookie + 1 WHERE ino = ?1 \
             RETURNING next_cookie - 1",
            [parent.ino as i64],
            |r| r.get(0),
        )
        .map_err(io)?;
    exec(
        conn,
        "INSERT INTO dentries (parent, name, ino, cookie) VALUES (?1, ?2, ?3, ?4)",
        params![parent.ino as i64, name, ino as i64, cookie],
    )?;
    Ok(())
}

fn set_entry_ino(conn: &Connection, parent: u64, name: &[u8], ino: u64) -> R<()> {
    exec(
        conn,
        "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
        params![parent as i64, name, ino as i64],
    )?;
    Ok(())
}

/// Removes the entry and one link of `i` (a directory loses both of its own).
fn drop_name(conn: &Connection, parent: u64, name: &[u8], i: &Inode, t: i64) -> R<()> {
    exec(
        conn,
        "DELETE FROM dentries WHERE parent = ?1 AND name = ?2",
        params![parent as i64, name],
    )?;
    let nlink = if i.is_dir() {
        0
    } else {
        i.nlink.saturating_sub(1)
    };
    exec(
        conn,
        "UPDATE inodes SET nlink = ?2, ctime = ?3 WHERE ino = ?1",
        params![i.ino as i64, nlink, t],
    )?;
    Ok(())
}

/// A directory's entries changed: its times, and its link count by `links` subdirectories.
fn touch_dir(conn: &Connection, ino: u64, links: i64, t: i64) -> R<()> {
    exec(
        conn,
        "UPDATE inodes SET mtime = ?2, ctime = ?2, nlink = nlink + ?3 WHERE ino = ?1",
        params![ino as i64, t, links],
    )?;
    Ok(())
}

/// Whether `ancestor` is `ino` or above it.
fn is_ancestor(conn: &Connection, ancestor: u64, mut ino: u64) -> R<bool> {
    loop {
        if ino == ancestor {
            return Ok(true);
        }
        if ino == ROOT {
            return Ok(false);
        }
        let parent = get(conn, ino)?.parent;
        if parent == 0 || parent == ino {
            return Ok(false);
        }
        ino = parent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32) -> NewInode<'static> {
        NewInode {
            mode,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        }
    }

    #[test]
    fn names_links_and_renames_keep_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Meta::open(&dir.path().join("m.sqlite")).unwrap();
        let a = m.create(ROOT, b"a", file(libc::S_IFDIR | 0o755)).unwrap();
        let b = m.create(ROOT, b"b", file(libc::S_IFDIR | 0o755)).unwrap();
        assert_eq!(m.get(ROOT).unwrap().nlink, 4);
        let f = m.create(a.ino, b"f", file(libc::S_IFREG | 0o644)).unwrap();
        assert_eq!(
            m.create(a.ino, b"f", file(libc::S_IFREG)),
            Err(libc::EEXIST)
        );
        m.link(f.ino, b.ino, b"g").unwrap();
        assert_eq!(m.get(f.ino).unwrap().nlink, 2);
        // Into its own subtree: refused.
        assert_eq!(
            m.rename(ROOT, b"a", a.ino, b"x", false, false),
            Err(libc::EINVAL)
        );
        assert_eq!(
            m.rename(ROOT, b"a", ROOT, b"b", false, false),
            Err(libc::ENOTEMPTY)
        );
        assert_eq!(
            m.rename(ROOT, b"a", ROOT, b"b", true, false),
            Err(libc::EEXIST)
        );
        // Over an existing file: the replaced one loses a link.
        let h = m.create(a.ino, b"h", file(libc::S_IFREG)).unwrap();
        assert_eq!(m.rename(a.ino, b"h", b.ino, b"g", false, false), Ok(None));
        assert_eq!(m.get(f.ino).unwrap().nlink, 1);
        assert_eq!(m.lookup(b.ino, b"g").unwrap().ino, h.ino);
        // A directory moving between parents moves a link of theirs.
        let c = m.create(a.ino, b"c", file(libc::S_IFDIR | 0o755)).unwrap();
        assert_eq!(m.get(a.ino).unwrap().nlink, 3);
        m.rename(a.ino, b"c", b.ino, b"c", false, false).unwrap();
        assert_eq!(m.get(a.ino).unwrap().nlink, 2);
        assert_eq!(m.get(b.ino).unwrap().nlink, 3);
        assert_eq!(m.get(c.ino).unwrap().parent, b.ino);
        // Exchange a directory and a file.
        m.rename(a.ino, b"f", b.ino, b"c", false, true).unwrap();
        assert_eq!(m.lookup(a.ino, b"f").unwrap().ino, c.ino);
        assert_eq!(m.get(c.ino).unwrap().parent, a.ino);
        assert_eq!(m.get(a.ino).unwrap().nlink, 3);
        assert_eq!(m.get(b.ino).unwrap().nlink, 2);
        let (gone, purged) = m.remove(b.ino, b"c", false, |_| true).unwrap();
        assert_eq!((gone.nlink, purged), (0, false));
        assert_eq!(m.orphans().unwrap(), vec![f.ino]);
        m.purge(f.ino).unwrap();
        assert_eq!(m.get(f.ino), Err(libc::ENOENT));
    }

    #[test]
    fn readdir_cookies_are_stable_under_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Meta::open(&dir.path().join("m.sqlite")).unwrap();
        for i in 0..10 {
            m.create(ROOT, format!("f{i}").as_bytes(), file(libc::S_IFREG))
                .unwrap();
        }
        let first = m.readdir(ROOT, 0, 4).unwrap();
        assert_eq!(first.len(), 4);
        // Removing a listed entry and adding one do not move the entries not yet listed.
        m.remove(ROOT, b"f1", false, |_| false).unwrap();
        m.create(ROOT, b"new", file(libc::S_IFREG)).unwrap();
        let rest = m.readdir(ROOT, first[3].cookie, 100).unwrap();
        let names: Vec<_> = rest.iter().map(|e| e.name.clone()).collect();
        let want: Vec<Vec<u8>> = (4..10)
            .map(|i| format!("f{i}").into_bytes())
            .chain([b"new".to_vec()])
            .collect();
        assert_eq!(names, want);
    }
}
