//! The FUSE mount (fuser): the operators' tree and the instances' views over [`super::FsHub`].
//!
//! Node ids: 1 is the mount's root, 2 `filesystems/`, 3 `instances/`, and small numbers the
//! tenant and instance directories under them. A filesystem's inode `ino` seen through view
//! `v` (one per filesystem and viewer: the operators, or one instance) is `v << 40 | ino`:
//! two views of one file are two kernel inodes, so that taking a view away ends what was
//! cached under it and nothing else.
//!
//! Coherence: the directories made of the catalog (tenants, instances, the names under them)
//! are never cached (TTL 0), so a grant shows or goes at the next path walk. Inside a
//! filesystem attributes and entries are cached for [`TTL`], and a change made through one
//! view invalidates the other views' copies of that inode or entry (`notify_inval_*`, sent
//! right after the change from a thread of its own). Instance views open files with direct
//! I/O: every read and write reaches the daemon, which checks the grant each time, and two
//! instances always see each other's writes. The operators' view keeps the page cache while a
//! file is open, dropped at every open (close-to-open) and by the invalidations above.
//!
//! Data operations run as tasks on the daemon's runtime and reply when the store completes;
//! a dispatch thread only decodes, checks and spawns. Metadata operations are small SQLite
//! transactions done on the dispatch thread.
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use super::meta::{Inode, NewInode, R, ROOT, SetAttr};
use super::vol::Vol;
use super::{FsHub, FsRecord};

/// How long the kernel may keep attributes and entries inside a filesystem.
const TTL: Duration = Duration::from_secs(1);
const NONE: Duration = Duration::ZERO;
const FILESYSTEMS: u64 = 2;
const INSTANCES: u64 = 3;
const FIRST_SYNTH: u64 = 16;
const VIEW_SHIFT: u32 = 40;
const INO_MASK: u64 = (1 << VIEW_SHIFT) - 1;

/// Who looks through a view.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Viewer {
    Operators,
    Instance(String),
}

struct View {
    no: u64,
    fs: FsRecord,
    viewer: Viewer,
    vol: Arc<Vol>,
    /// The access generation `allowed` was worked out at, plus one (0: never).
    checked: AtomicU64,
    allowed: AtomicBool,
}

impl View {
    fn node(&self, ino: u64) -> u64 {
        self.no << VIEW_SHIFT | ino
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Synth {
    Tenant(String),
    Instance(String),
}

#[derive(Default)]
struct Synths {
    ids: HashMap<Synth, u64>,
    keys: Vec<Synth>,
}

#[derive(Default)]
struct Views {
    list: Vec<Arc<View>>,
    by_key: HashMap<(String, Viewer), u64>,
}

enum Node {
    Root,
    Filesystems,
    Instances,
    Tenant(String),
    Instance(String),
    In(Arc<View>, u64),
}

struct Invalidate {
    tx: Option<std::sync::mpsc::Sender<Inval>>,
    nodes: Vec<u64>,
}

impl Invalidate {
    fn send(self) {
        if let Some(tx) = self.tx {
            for n in self.nodes {
                let _ = tx.send(Inval::Inode(n));
            }
        }
    }
}

enum Inval {
    Inode(u64),
    Entry(u64, Vec<u8>),
}

pub struct CairnFs {
    hub: Arc<FsHub>,
    synths: Mutex<Synths>,
    views: Mutex<Views>,
    inval: Mutex<Option<std::sync::mpsc::Sender<Inval>>>,
    started: SystemTime,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn ts(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => super::meta::now_ns(),
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        },
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

impl CairnFs {
    fn new(hub: Arc<FsHub>, inval: std::sync::mpsc::Sender<Inval>) -> CairnFs {
        CairnFs {
            hub,
            synths: Mutex::new(Synths::default()),
            views: Mutex::new(Views::default()),
            inval: Mutex::new(Some(inval)),
            started: SystemTime::now(),
        }
    }

    fn send(&self, m: Inval) {
        if let Some(tx) = &*self.inval.lock() {
            let _ = tx.send(m);
        }
    }

    /// The other views of `view`'s filesystem.
    fn siblings(&self, view: &View) -> Vec<Arc<View>> {
        self.views
            .lock()
            .list
            .iter()
            .filter(|v| v.fs.id == view.fs.id && v.no != view.no)
            .cloned()
            .collect()
    }

    /// `ino` changed through `view`: the other views drop their copies.
    fn changed(&self, view: &View, ino: u64) {
        self.invalidator(view, ino).send();
    }

    /// What tells the other views of `view` that `ino` changed; sent after the reply of an
    /// operation that completes later.
    fn invalidator(&self, view: &View, ino: u64) -> Invalidate {
        let nodes: Vec<u64> = self.siblings(view).iter().map(|v| v.node(ino)).collect();
        let tx = if nodes.is_empty() {
            None
        } else {
            self.inval.lock().clone()
        };
        Invalidate { tx, nodes }
    }

    /// `name` in directory `dir` changed through `view`.
    fn renamed(&self, view: &View, dir: u64, name: &[u8]) {
        for v in self.siblings(view) {
            self.send(Inval::Entry(v.node(dir), name.to_vec()));
            self.send(Inval::Inode(v.node(dir)));
        }
    }

    fn synth_id(&self, key: Synth) -> u64 {
        let mut s = self.synths.lock();
        if let Some(&id) = s.ids.get(&key) {
            return id;
        }
        let id = FIRST_SYNTH + s.keys.len() as u64;
        s.keys.push(key.clone());
        s.ids.insert(key, id);
        id
    }

    fn view(&self, fs: &FsRecord, viewer: Viewer) -> R<Arc<View>> {
        let key = (fs.id.clone(), viewer.clone());
        {
            let views = self.views.lock();
            if let Some(&no) = views.by_key.get(&key) {
                return Ok(views.list[(no - 1) as usize].clone());
            }
        }
        let vol = self.hub.vol_blocking(fs)?;
        let mut views = self.views.lock();
        if let Some(&no) = views.by_key.get(&key) {
            return Ok(views.list[(no - 1) as usize].clone());
        }
        let no = views.list.len() as u64 + 1;
        let v = Arc::new(View {
            no,
            fs: fs.clone(),
            viewer,
            vol,
            checked: AtomicU64::new(0),
            allowed: AtomicBool::new(true),
        });
        views.list.push(v.clone());
        views.by_key.insert(key, no);
        Ok(v)
    }

    /// Whether `view` still stands: its filesystem exists and its viewer may see it.
    fn allowed(&self, view: &View) -> bool {
        if view.vol.gone.load(Ordering::Acquire) {
            return false;
        }
        let generation = self.hub.generation() + 1;
        if view.checked.load(Ordering::Acquire) == generation {
            return view.allowed.load(Ordering::Acquire);
        }
        let now = match &view.viewer {
            Viewer::Operators => self.hub.by_id(&view.fs.id),
            Viewer::Instance(i) => self
                .hub
                .visible_to(i)
                .into_iter()
                .find(|f| f.id == view.fs.id),
        };
        if let Some(f) = &now {
            view.vol.set_quota(f.size_bytes);
        }
        view.allowed.store(now.is_some(), Ordering::Release);
        view.checked.store(generation, Ordering::Release);
        now.is_some()
    }

    fn node(&self, id: u64) -> R<Node> {
        let view_no = id >> VIEW_SHIFT;
        if view_no > 0 {
            let v = self
                .views
                .lock()
                .list
                .get((view_no - 1) as usize)
                .cloned()
                .ok_or(libc::ESTALE)?;
            if !self.allowed(&v) {
                return Err(libc::EACCES);
            }
            return Ok(Node::In(v, id & INO_MASK));
        }
        Ok(match id {
            1 => Node::Root,
            FILESYSTEMS => Node::Filesystems,
            INSTANCES => Node::Instances,
            _ => {
                let s = self.synths.lock();
                match s.keys.get((id.wrapping_sub(FIRST_SYNTH)) as usize) {
                    Some(Synth::Tenant(t)) => Node::Tenant(t.clone()),
                    Some(Synth::Instance(i)) => Node::Instance(i.clone()),
                    None => return Err(libc::ESTALE),
                }
            }
        })
    }

    /// A node inside a filesystem: the catalog's directories cannot be changed.
    fn inner(&self, id: u64) -> R<(Arc<View>, u64)> {
        self.inner_or(id, libc::EPERM)
    }

    /// [`CairnFs::inner`], with `err` for the catalog's directories.
    fn inner_or(&self, id: u64, err: i32) -> R<(Arc<View>, u64)> {
        match self.node(id)? {
            Node::In(v, ino) => Ok((v, ino)),
            _ => Err(err),
        }
    }

    fn synth_attr(&self, id: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(id),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry(&self, view: &View, i: &Inode, reply: ReplyEntry) {
        reply.entry(&TTL, &attr_of(view, i), Generation(0));
    }

    /// The new or linked node of `r` as the entry reply, or its errno.
    fn made(&self, r: R<(Arc<View>, Inode)>, reply: ReplyEntry) {
        match r {
            Ok((v, i)) => self.entry(&v, &i, reply),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// The root of `fs` as `viewer` sees it, as a directory entry (never cached).
    fn fs_root_entry(&self, fs: &FsRecord, viewer: Viewer, reply: ReplyEntry) {
        let r = self.view(fs, viewer).and_then(|v| {
            let i = v.vol.meta.lock().get(ROOT)?;
            Ok((v, i))
        });
        match r {
            Ok((v, i)) => reply.entry_with_ttls(&TTL, &NONE, &attr_of(&v, &i), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Runs `f` on the runtime; its answer goes to `done`.
    fn spawn<F, T>(&self, f: F, done: impl FnOnce(R<T>) + Send + 'static)
    where
        F: std::future::Future<Output = R<T>> + Send + 'static,
        T: Send + 'static,
    {
        // Polled here first, inside the runtime's context: the work up to the store's first
        // wait (checks, metadata, the io_uring submission) is done without waking a worker,
        // and what completes at once is answered at once. What waits goes to the runtime,
        // which polls it again with its own waker and replies from the completion.
        let rt = self.hub.runtime();
        let _in = rt.enter();
        let mut f = Box::pin(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => done(r),
            std::task::Poll::Pending => {
                rt.spawn(async move { done(f.await) });
            }
        }
    }

    /// Mode and group of a new node in `parent`: set-group-ID directories pass their group
    /// (and, to directories, the bit) on.
    fn new_inode<'a>(
        parent: &Inode,
        req: &Request,
        mode: u32,
        rdev: u32,
        target: Option<&'a [u8]>,
    ) -> NewInode<'a> {
        let sgid = parent.mode & libc::S_ISGID != 0;
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let mut mode = mode;
        if sgid && is_dir {
            mode |= libc::S_ISGID;
        }
        NewInode {
            mode,
            uid: req.uid(),
            gid: if sgid { parent.gid } else { req.gid() },
            rdev,
            target,
        }
    }

    fn make(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> R<(Arc<View>, Inode)> {
        let (v, pino) = self.inner(parent)?;
        let name = name.as_bytes();
        let i = {
            let mut m = v.vol.meta.lock();
            let p = m.get(pino)?;
            m.create(pino, name, Self::new_inode(&p, req, mode, rdev, target))?
        };
        self.renamed(&v, pino, name);
        Ok((v, i))
    }

    fn open_flags(view: &View, flags: OpenFlags) -> FopenFlags {
        let mut out = FopenFlags::empty();
        if view.viewer != Viewer::Operators || flags.0 & libc::O_DIRECT != 0 {
            out |= FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        out
    }

    fn synth_entries(&self, node: &Node) -> Vec<(u64, FileType, String)> {
        match node {
            Node::Root => vec![
                (FILESYSTEMS, FileType::Directory, "filesystems".into()),
                (INSTANCES, FileType::Directory, "instances".into()),
            ],
            Node::Filesystems => self
                .hub
                .tenants()
                .into_iter()
                .map(|t| {
                    (
                        self.synth_id(Synth::Tenant(t.clone())),
                        FileType::Directory,
                        t,
                    )
                })
                .collect(),
            Node::Instances => self
                .hub
                .instances()
                .into_iter()
                .map(|i| {
                    (
                        self.synth_id(Synth::Instance(i.clone())),
                        FileType::Directory,
                        i,
                    )
                })
                .collect(),
            Node::Tenant(t) => self
                .hub
                .of_tenant(t)
                .into_iter()
                .filter_map(|f| {
                    let v = self.view(&f, Viewer::Operators).ok()?;
                    Some((v.node(ROOT), FileType::Directory, f.name))
                })
                .collect(),
            Node::Instance(i) => self
                .hub
                .visible_to(i)
                .into_iter()
                .filter_map(|f| {
                    let v = self.view(&f, Viewer::Instance(i.clone())).ok()?;
                    Some((v.node(ROOT), FileType::Directory, f.name))
                })
                .collect(),
            Node::In(..) => Vec::new(),
        }
    }
}

impl fuser::Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_EXPLICIT_INVAL_DATA,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "FUSE capability not offered by the kernel");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let node = match self.node(parent.0) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(e)),
        };
        let want = name.to_string_lossy();
        match node {
            Node::In(v, pino) => {
                let r = v.vol.meta.lock().lookup(pino, name.as_bytes());
                match r {
                    Ok(i) => self.entry(&v, &i, reply),
                    Err(e) => reply.error(errno(e)),
                }
            }
            Node::Tenant(ref t) => match self.hub.of_tenant(t).into_iter().find(|f| f.name == want)
            {
                Some(f) => self.fs_root_entry(&f, Viewer::Operators, reply),
                None => reply.error(Errno::ENOENT),
            },
            Node::Instance(ref i) => {
                match self.hub.visible_to(i).into_iter().find(|f| f.name == want) {
                    Some(f) => self.fs_root_entry(&f, Viewer::Instance(i.clone()), reply),
                    None => reply.error(Errno::ENOENT),
                }
            }
            Node::Root | Node::Filesystems | Node::Instances => {
                let hit = match node {
                    Node::Root => match &*want {
                        "filesystems" => Some(FILESYSTEMS),
                        "instances" => Some(INSTANCES),
                        _ => None,
                    },
                    Node::Filesystems => self
                        .hub
                        .tenants()
                        .into_iter()
                        .find(|t| *t == want)
                        .map(|t| self.synth_id(Synth::Tenant(t))),
                    _ => self
                        .hub
                        .instance_exists(&want)
                        .then(|| self.synth_id(Synth::Instance(want.to_string()))),
                };
                match hit {
                    Some(id) => reply.entry(&NONE, &self.synth_attr(id), Generation(0)),
                    None => reply.error(Errno::ENOENT),
                }
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino.0) {
            Ok(Node::In(v, i)) => {
                let r = v.vol.meta.lock().get(i);
                match r {
                    Ok(inode) => reply.attr(&TTL, &attr_of(&v, &inode)),
                    Err(e) => reply.error(errno(e)),
                }
            }
            Ok(_) => reply.attr(&NONE, &self.synth_attr(ino.0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (v, i) = match self.inner(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno(e)),
        };
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(ns),
            mtime: mtime.map(ns),
            ctime: ctime.map(|t| ns(TimeOrNow::SpecificTime(t))),
        };
        let this = self.siblings(&v);
        let tx = self.inval.lock().clone();
        let vv = v.clone();
        self.spawn(
            async move { vv.vol.setattr(i, a).await },
            move |r| match r {
                Ok(inode) => {
                    if let Some(tx) = tx {
                        for s in this {
                            let _ = tx.send(Inval::Inode(s.node(i)));
                        }
                    }
                    let attr = attr_of(&v, &inode);
                    reply.attr(&TTL, &attr)
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .inner(ino.0)
            .and_then(|(v, i)| v.vol.meta.lock().readlink(i))
        {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.made(self.make(req, parent.0, name, mode, rdev, None), reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.made(
            self.make(
                req,
                parent.0,
                name,
                libc::S_IFDIR | (mode & 0o7777),
                0,
                None,
            ),
            reply,
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes();
        if t.len() > libc::PATH_MAX as usize {
            return reply.error(Errno::ENAMETOOLONG);
        }
        self.made(
            self.make(req, parent.0, link_name, libc::S_IFLNK | 0o777, 0, Some(t)),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, false, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, true, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let (v, p) = self.inner(parent.0)?;
            let (v2, np) = self.inner(newparent.0)?;
            if v.no != v2.no {
                return Err(libc::EXDEV);
            }
            if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return Err(libc::EINVAL);
            }
            let replaced = v.vol.meta.lock().rename(
                p,
                name.as_bytes(),
                np,
                newname.as_bytes(),
                flags.contains(RenameFlags::RENAME_NOREPLACE),
                flags.contains(RenameFlags::RENAME_EXCHANGE),
            )?;
            self.renamed(&v, p, name.as_bytes());
            self.renamed(&v, np, newname.as_bytes());
            Ok((v, replaced))
        })();
        match r {
            Ok((v, replaced)) => self.spawn(
                async move {
                    if let Some(gone) = replaced {
                        v.vol.unlinked(&gone).await;
                    }
                    Ok(())
                },
                move |_: R<()>| reply.ok(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let (v, i) = self.inner(ino.0)?;
            let (v2, np) = self.inner(newparent.0)?;
            if v.no != v2.no {
                return Err(libc::EXDEV);
            }
            let inode = v.vol.meta.lock().link(i, np, newname.as_bytes())?;
            self.renamed(&v, np, newname.as_bytes());
            self.changed(&v, i);
            Ok((v, inode))
        })();
        self.made(r, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.inner(ino.0) {
            Ok((v, i)) => {
                let f = Self::open_flags(&v, flags);
                v.vol.opened(i);
                reply.opened(FileHandle(0), f)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let (v, i) = match self.inner(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno(e)),
        };
        self.spawn(
            async move { v.vol.read(i, offset, size).await },
            move |r| match r {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let (v, i) = match self.inner(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno(e)),
        };
        // The dispatch buffer is reused for the next request: the data is copied once here.
        let data = Bytes::copy_from_slice(data);
        let append = flags.0 & libc::O_APPEND != 0;
        let others = self.invalidator(&v, i);
        self.spawn(
            async move { v.vol.write(i, offset, data, append).await },
            move |r| match r {
                Ok(n) => {
                    reply.written(n);
                    others.send();
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Even through a view taken away: the open count must come down.
        let view_no = ino.0 >> VIEW_SHIFT;
        let v = self
            .views
            .lock()
            .list
            .get(view_no.wrapping_sub(1) as usize)
            .cloned();
        reply.ok();
        if let Some(v) = v {
            let i = ino.0 & INO_MASK;
            self.hub
                .runtime()
                .spawn(async move { v.vol.released(i).await });
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.inner(ino.0) {
            Ok((v, _)) => self.spawn(async move { v.vol.sync().await }, move |r| done(r, reply)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match self.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(e)),
        };
        if let Node::In(v, dir) = node {
            let r = (|| {
                let m = v.vol.meta.lock();
                let d = m.get(dir)?;
                if !d.is_dir() {
                    return Err(libc::ENOTDIR);
                }
                let mut after = offset as i64;
                if after < 1 {
                    if reply.add(INodeNo(v.node(dir)), 1, FileType::Directory, ".") {
                        return Ok(());
                    }
                    after = 1;
                }
                if after < 2 {
                    let parent = if dir == ROOT {
                        v.node(dir)
                    } else {
                        v.node(d.parent)
                    };
                    if reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                        return Ok(());
                    }
                    after = 2;
                }
                loop {
                    let batch = m.readdir(dir, after, 128)?;
                    if batch.is_empty() {
                        return Ok(());
                    }
                    for e in &batch {
                        if reply.add(
                            INodeNo(v.node(e.ino)),
                            e.cookie as u64,
                            kind(e.mode),
                            OsStr::from_bytes(&e.name),
                        ) {
                            return Ok(());
                        }
                        after = e.cookie;
                    }
                }
            })();
            return match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            };
        }
        let mut entries = vec![
            (ino.0, FileType::Directory, ".".to_owned()),
            (1, FileType::Directory, "..".to_owned()),
        ];
        entries.extend(self.synth_entries(&node));
        for (n, (id, k, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(id), n as u64 + 1, k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.node(ino.0) {
            Ok(Node::In(..)) => self.fsync(_req, ino, fh, datasync, reply),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        const FILES: u64 = 1 << 32;
        match self.node(ino.0) {
            Ok(Node::In(v, _)) => {
                let (quota, used) = (v.vol.quota(), v.vol.used());
                let free = quota.saturating_sub(used) / 4096;
                let inodes = v.vol.meta.lock().inode_count().unwrap_or(0);
                reply.statfs(
                    quota / 4096,
                    free,
                    free,
                    FILES,
                    FILES.saturating_sub(inodes),
                    4096,
                    super::meta::NAME_MAX as u32,
                    4096,
                );
            }
            Ok(_) => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.inner(ino.0).and_then(|(v, i)| {
            xattr_ns(name)?;
            v.vol.meta.lock().setxattr(
                i,
                name.as_bytes(),
                value,
                flags & libc::XATTR_CREATE != 0,
                flags & libc::XATTR_REPLACE != 0,
            )?;
            self.changed(&v, i);
            Ok(())
        });
        done(r, reply)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.inner_or(ino.0, libc::ENODATA).and_then(|(v, i)| {
            xattr_ns(name)?;
            v.vol.meta.lock().getxattr(i, name.as_bytes())
        });
        xattr_reply(r, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = match self.node(ino.0) {
            Ok(Node::In(v, i)) => v.vol.meta.lock().listxattr(i),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        xattr_reply(r, size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.inner(ino.0).and_then(|(v, i)| {
            xattr_ns(name)?;
            v.vol.meta.lock().removexattr(i, name.as_bytes())?;
            self.changed(&v, i);
            Ok(())
        });
        done(r, reply)
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the mode bits itself.
        match self.node(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mode = if mode & libc::S_IFMT == 0 {
            mode | libc::S_IFREG
        } else {
            mode
        };
        match self.make(req, parent.0, name, mode, 0, None) {
            Ok((v, i)) => {
                v.vol.opened(i.ino);
                let f = Self::open_flags(&v, OpenFlags(flags));
                reply.created(&TTL, &attr_of(&v, &i), Generation(0), FileHandle(0), f)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (v, i) = match self.inner(ino.0) {
            Ok(x) => x,
            Err(e) => return reply.error(errno(e)),
        };
        let others = self.invalidator(&v, i);
        self.spawn(
            async move { v.vol.fallocate(i, offset, length, mode).await },
            move |r| match r {
                Ok(()) => {
                    reply.ok();
                    others.send();
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls (programs ask a file whether it is a terminal: it is not).
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = self.inner(ino.0).and_then(|(v, i)| {
            let off = u64::try_from(offset).map_err(|_| libc::ENXIO)?;
            match whence {
                libc::SEEK_DATA => v.vol.seek(i, off, true),
                libc::SEEK_HOLE => v.vol.seek(i, off, false),
                _ => Err(libc::EINVAL),
            }
        });
        match r {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl CairnFs {
    fn remove(&self, parent: u64, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let r = self.inner(parent).and_then(|(v, p)| {
            let (inode, dropped) = v.vol.remove(p, name.as_bytes(), dir)?;
            self.renamed(&v, p, name.as_bytes());
            self.changed(&v, inode.ino);
            Ok((v, inode.ino, dropped))
        });
        match r {
            // The space is free when the caller hears back (statfs right after shows it).
            Ok((v, ino, true)) if v.vol.has_object(ino) => self.spawn(
                async move {
                    v.vol.dropped(ino).await;
                    Ok(())
                },
                move |_: R<()>| reply.ok(),
            ),
            Ok((v, ino, dropped)) => {
                if dropped {
                    v.vol.forget_times(ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// `ok` or the errno.
fn done(r: R<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn attr_of(v: &View, i: &Inode) -> FileAttr {
    let i = &v.vol.with_times(i.clone());
    FileAttr {
        ino: INodeNo(v.node(i.ino)),
        size: i.size,
        blocks: v.vol.allocated(i.ino) / 512,
        atime: ts(i.atime),
        mtime: ts(i.mtime),
        ctime: ts(i.ctime),
        crtime: ts(i.ctime),
        kind: kind(i.mode),
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Namespaces kept as plain data; `system.*` (POSIX ACLs) is not offered.
fn xattr_ns(name: &OsStr) -> R<()> {
    let n = name.as_bytes();
    if n.starts_with(b"user.") || n.starts_with(b"trusted.") || n.starts_with(b"security.") {
        Ok(())
    } else {
        Err(libc::EOPNOTSUPP)
    }
}

fn xattr_reply(r: R<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

/// The mount: unmounted when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    pub fn unmount(mut self) {
        if let Some(s) = self.session.take()
            && let Err(e) = s.umount_and_join()
        {
            tracing::warn!(error = %e, "unmounting the FUSE views");
        }
    }
}

/// Detaches whatever is mounted at `dir` (a mount a killed daemon left), if anything.
pub fn detach_stale(dir: &std::path::Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: `c` is a valid NUL-terminated path; umount2 only reads it.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            tracing::info!(dir = %dir.display(), "detached a mount an earlier run left");
        }
    }
}

/// Mounts the views at `dir` (a stale mount of an earlier run there is detached first).
pub fn mount(hub: Arc<FsHub>, dir: &std::path::Path, threads: usize) -> anyhow::Result<Mounted> {
    detach_stale(dir);
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("cairn".into()),
        fuser::MountOption::Subtype("cairn".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(threads.max(1));
    cfg.clone_fd = true;
    let (tx, rx) = std::sync::mpsc::channel();
    let session = fuser::Session::new(CairnFs::new(hub, tx), dir, &cfg)?;
    start_invalidations(rx, session.notifier());
    Ok(Mounted {
        session: Some(session.spawn()?),
    })
}

/// The thread that sends the kernel the invalidations queued by the views.
fn start_invalidations(rx: std::sync::mpsc::Receiver<Inval>, n: Notifier) {
    let spawned = std::thread::Builder::new()
        .name("cairn-fuse-inval".into())
        .spawn(move || {
            for m in rx {
                // ENOENT: the kernel holds no such node or entry; nothing to drop.
                let _ = match m {
                    Inval::Inode(node) => n.inval_inode(INodeNo(node), 0, 0),
                    Inval::Entry(parent, name) => {
                        n.inval_entry(INodeNo(parent), OsStr::from_bytes(&name))
                    }
                };
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no FUSE invalidation thread: other views may lag");
    }
}
