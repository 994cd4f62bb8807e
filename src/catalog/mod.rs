//! The catalog: persistent control-plane records (projects, users, tokens, volumes, servers,
//! attachments, images, filesystems) in SQLite at `<data-dir>/catalog.sqlite`.
//!
//! SQLite (rusqlite, bundled) rather than redb: the records are relational (attachments join
//! volumes and servers, role assignments join users and projects), list endpoints filter and
//! sort on many columns, and foreign keys and CHECK constraints catch bugs. The database runs in
//! WAL mode with `synchronous=FULL` (a committed transaction survives power loss) and foreign
//! keys on. Schema versions: see [`schema`].
//!
//! # Threading
//!
//! One dedicated OS thread owns the one [`rusqlite::Connection`]; async callers send it
//! closures over a bounded channel and await the answer ([`Catalog::call`]). Why a thread
//! rather than `spawn_blocking` per call:
//! - a `Connection` is `Send` but not `Sync`: with `spawn_blocking` it would sit behind a mutex
//!   and each call would take a blocking-pool thread just to wait on that mutex;
//! - SQLite has a single writer anyway, so one connection loses no write concurrency, and
//!   control-plane reads are small;
//! - calls run in FIFO order, the prepared-statement cache stays warm, the channel bounds the
//!   backlog, and close is explicit (checkpoint the WAL, then close) instead of "whenever the
//!   last `Arc` drops".
//!
//! If reads ever contend with writes, add read-only connections (WAL allows concurrent readers)
//! beside this one.

pub mod schema;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

pub use schema::SCHEMA_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "catalog schema version {found} is newer than this cairn supports ({supported}); \
         refusing to touch it (upgrade cairn)"
    )]
    NewerSchema { found: i64, supported: u32 },
    #[error("catalog migration {version} ({name}) failed: {source}")]
    Migration {
        version: u32,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog journal mode is {0:?}, expected \"wal\"")]
    JournalMode(String),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the catalog is closed")]
    Closed,
    #[error("a catalog call panicked: {0}")]
    Panicked(String),
    #[error("could not start the catalog thread: {0}")]
    Thread(#[source] std::io::Error),
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// How long a connection waits for another process's lock before failing with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls queued for the catalog thread before callers wait for room.
const QUEUE_DEPTH: usize = 256;

/// Opens (creating if missing) the database at `path`, checks its schema version *before*
/// changing anything, sets the pragmas, and applies pending migrations.
pub fn open_connection(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Refuse a newer catalog before the journal-mode switch writes to the file.
    let found = schema::user_version(&conn)?;
    if found > SCHEMA_VERSION {
        return Err(CatalogError::NewerSchema {
            found: found.into(),
            supported: SCHEMA_VERSION,
        });
    }
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(CatalogError::JournalMode(mode));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    schema::migrate(&mut conn, schema::MIGRATIONS)?;
    Ok(conn)
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Msg {
    Job(Job),
    Close(oneshot::Sender<Result<()>>),
}

/// Handle to the catalog thread. Cheap to clone; every clone talks to the same connection.
#[derive(Clone)]
pub struct Catalog {
    tx: mpsc::Sender<Msg>,
    path: Arc<PathBuf>,
    access: Arc<AtomicU64>,
    /// Set by the update hook when a job changed an access table (see [`ACCESS_TABLES`]).
    touched: Arc<AtomicBool>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

impl Catalog {
    /// Opens the catalog at `path` on its own thread (see the module docs).
    pub async fn open(path: &Path) -> Result<Catalog> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (ready_tx, ready_rx) = oneshot::channel();
        let owned = path.to_path_buf();
        let access = Arc::new(AtomicU64::new(0));
        let touched = Arc::new(AtomicBool::new(false));
        let flag = touched.clone();
        std::thread::Builder::new()
            .name("cairn-catalog".into())
            .spawn(move || match open_connection(&owned) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    run(conn, rx, flag);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(CatalogError::Thread)?;
        ready_rx.await.map_err(|_| CatalogError::Closed)??;
        Ok(Catalog {
            tx,
            path: Arc::new(path.to_path_buf()),
            access,
            touched,
        })
    }

    /// Moves after every committed change to who may see which shared filesystem (servers,
    /// projects, filesystems and their connections): a reader that saw it move reads the
    /// catalog again.
    pub fn access_generation(&self) -> Arc<AtomicU64> {
        self.access.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the catalog thread with the connection and returns its result. Keep `f`
    /// short: every other call waits behind it.
    pub async fn call<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let (touched, access) = (self.touched.clone(), self.access.clone());
        let job: Job = Box::new(move |conn| {
            let out = catch_unwind(AssertUnwindSafe(|| f(conn))).unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(CatalogError::Panicked(msg))
            });
            // Moved before the caller hears back, and after the commit: whoever the caller
            // tells next reads the change.
            if touched.swap(false, Ordering::AcqRel) {
                access.fetch_add(1, Ordering::AcqRel);
            }
            let _ = reply_tx.send(out);
        });
        self.tx
            .send(Msg::Job(job))
            .await
            .map_err(|_| CatalogError::Closed)?;
        reply_rx.await.map_err(|_| CatalogError::Closed)?
    }

    /// A cheap query proving the connection works (for `/healthz`).
    pub async fn ping(&self) -> Result<()> {
        self.call(|conn| {
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })?;
            Ok(())
        })
        .await
    }

    /// The schema version of the open database.
    pub async fn schema_version(&self) -> Result<u32> {
        self.call(|conn| schema::user_version(conn)).await
    }

    /// Finishes the calls already queued, checkpoints the WAL into the main file and closes the
    /// connection. Later calls on any clone fail with [`CatalogError::Closed`].
    pub async fn close(&self) -> Result<()> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send(Msg::Close(reply_tx))
            .await
            .map_err(|_| CatalogError::Closed)?;
        reply_rx.await.map_err(|_| CatalogError::Closed)?
    }
}

/// Tables whose rows decide who sees which shared filesystem.
const ACCESS_TABLES: [&str; 4] = ["servers", "projects", "filesystems", "filesystem_instances"];

fn run(conn: Connection, mut rx: mpsc::Receiver<Msg>, flag: Arc<AtomicBool>) {
    let mut conn = conn;
    // Set by a change to those tables; the job moves the generation once it is over, so
    // after its commit (a reader seeing the new generation sees the change).
    let hook = move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| {
        if ACCESS_TABLES.contains(&table) {
            flag.store(true, Ordering::Relaxed);
        }
    };
    if let Err(e) = conn.update_hook(Some(hook)) {
        tracing::warn!(error = %e, "no catalog update hook: FUSE views follow changes late");
    }
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Job(job) => job(&mut conn),
            Msg::Close(reply) => {
                rx.close();
                // Fail whatever was queued behind the close.
                while let Ok(msg) = rx.try_recv() {
                    drop(msg);
                }
                let _ = reply.send(close_connection(conn));
                return;
            }
        }
    }
    // Every handle dropped without close: still checkpoint and close cleanly.
    if let Err(e) = close_connection(conn) {
        tracing::warn!(error = %e, "closing the catalog");
    }
}

fn close_connection(conn: Connection) -> Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    conn.close().map_err(|(_, e)| CatalogError::Sqlite(e))
}

#[cfg(test)]
mod tests;
