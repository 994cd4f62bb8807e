//! Shared filesystems' data plane (seed 002, issue 26): each filesystem's tree over the store
//! ([`vol`], [`meta`]), and one FUSE mount that shows them ([`fuse`]):
//!
//! ```text
//! <mount-dir>/filesystems/<tenant_id>/<name>/   every filesystem, for operators
//!            (global ones under the tenant "global")
//! <mount-dir>/instances/<instance_id>/<name>/   the filesystems that instance may see now
//! ```
//!
//! Who sees what is the catalog's (servers, filesystems, their connections), read at the
//! moment of asking through a read-only connection of this module's own; every change there
//! moves [`crate::catalog::Catalog::access_generation`], after which each view checks its
//! grant again before answering.
pub mod fuse;
pub mod meta;
pub mod vol;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::store::Store;
use vol::Vol;

/// The tenant directory that holds global filesystems in the operators' tree.
pub const GLOBAL_TENANT: &str = "global";

/// A filesystem as the catalog has it.
#[derive(Clone, Debug)]
pub struct FsRecord {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub size_bytes: u64,
}

/// The filesystems' data, open on demand, shared by the FUSE mount and the control plane.
pub struct FsHub {
    store: Store,
    dir: PathBuf,
    catalog: Mutex<Connection>,
    generation: Arc<AtomicU64>,
    vols: tokio::sync::Mutex<HashMap<String, Arc<Vol>>>,
    rt: tokio::runtime::Handle,
}

impl FsHub {
    /// `dir` holds one metadata database per filesystem. Filesystems the catalog no longer
    /// has (deleted while the daemon was stopped) are dropped here.
    pub async fn open(
        store: Store,
        dir: PathBuf,
        catalog_path: &Path,
        generation: Arc<AtomicU64>,
    ) -> anyhow::Result<Arc<FsHub>> {
        std::fs::create_dir_all(&dir)?;
        let conn = Connection::open_with_flags(
            catalog_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let hub = Arc::new(FsHub {
            store,
            dir,
            catalog: Mutex::new(conn),
            generation,
            vols: tokio::sync::Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
        });
        let known: std::collections::HashSet<String> =
            hub.all().into_iter().map(|f| f.id).collect();
        for entry in std::fs::read_dir(&hub.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".sqlite")
                && !known.contains(id)
            {
                tracing::info!(fs = id, "dropping the data of a deleted filesystem");
                vol::drop_objects_of(&hub.store, id).await;
                vol::remove_db(&vol::db_path(&hub.dir, id));
            }
        }
        Ok(hub)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The filesystem `id`'s data, opened if it is not yet.
    pub async fn vol(&self, fs: &FsRecord) -> Result<Arc<Vol>, i32> {
        let mut vols = self.vols.lock().await;
        if let Some(v) = vols.get(&fs.id) {
            return Ok(v.clone());
        }
        let v = Vol::open(self.store.clone(), &self.dir, &fs.id, fs.size_bytes)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, fs = %fs.id, "opening a shared filesystem");
                libc::EIO
            })?;
        vols.insert(fs.id.clone(), v.clone());
        Ok(v)
    }

    /// [`FsHub::vol`] from a thread that is not the runtime's (a FUSE dispatch thread).
    pub fn vol_blocking(&self, fs: &FsRecord) -> Result<Arc<Vol>, i32> {
        if let Some(v) = self.vols.blocking_lock().get(&fs.id) {
            return Ok(v.clone());
        }
        self.rt.block_on(self.vol(fs))
    }

    /// Bytes of data the filesystem holds (for a shrink to check against).
    pub async fn used(&self, id: &str) -> u64 {
        let Some(fs) = self.by_id(id) else { return 0 };
        match self.vol(&fs).await {
            Ok(v) => v.used(),
            Err(_) => u64::MAX,
        }
    }

    pub async fn resized(&self, id: &str, size: u64) {
        if let Some(v) = self.vols.lock().await.get(id) {
            v.set_quota(size);
        }
    }

    /// The filesystem was deleted from the catalog: its data goes.
    pub async fn removed(&self, id: &str) {
        let v = self.vols.lock().await.remove(id);
        match v {
            Some(v) => v.destroy().await,
            None => {
                vol::drop_objects_of(&self.store, id).await;
                vol::remove_db(&vol::db_path(&self.dir, id));
            }
        }
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    // ---- the catalog, read-only ----

    fn query<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<T> {
        let conn = self.catalog.lock();
        match f(&conn) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "reading the catalog for the FUSE views");
                None
            }
        }
    }

    fn records(&self, sql: &str, arg: &str) -> Vec<FsRecord> {
        self.query(|c| {
            let mut st = c.prepare_cached(sql)?;
            st.query_map([arg], |r| {
                Ok(FsRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    tenant: r
                        .get::<_, Option<String>>(2)?
                        .unwrap_or_else(|| GLOBAL_TENANT.to_owned()),
                    size_bytes: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })?
            .collect()
        })
        .unwrap_or_default()
    }

    pub fn all(&self) -> Vec<FsRecord> {
        self.records(
            "SELECT id, name, project_id, size_bytes FROM filesystems WHERE ?1 = ?1 ORDER BY name",
            "",
        )
    }

    pub fn by_id(&self, id: &str) -> Option<FsRecord> {
        self.records(
            "SELECT id, name, project_id, size_bytes FROM filesystems WHERE id = ?1",
            id,
        )
        .pop()
    }

    pub fn tenants(&self) -> Vec<String> {
        let mut t: Vec<String> = self.all().into_iter().map(|f| f.tenant).collect();
        t.sort();
        t.dedup();
        t
    }

    pub fn of_tenant(&self, tenant: &str) -> Vec<FsRecord> {
        self.records(
            "SELECT id, name, project_id, size_bytes FROM filesystems \
             WHERE coalesce(project_id, 'global') = ?1 ORDER BY name",
            tenant,
        )
    }

    pub fn instances(&self) -> Vec<String> {
        self.query(|c| {
            let mut st = c.prepare_cached("SELECT id FROM servers ORDER BY id")?;
            st.query_map([], |r| r.get(0))?.collect()
        })
        .unwrap_or_default()
    }

    pub fn instance_exists(&self, id: &str) -> bool {
        self.query(|c| {
            c.query_row("SELECT 1 FROM servers WHERE id = ?1", [id], |_| Ok(()))
                .optional()
        })
        .flatten()
        .is_some()
    }

    /// The filesystems instance `id` may see now.
    pub fn visible_to(&self, id: &str) -> Vec<FsRecord> {
        self.records(
            "SELECT f.id, f.name, f.project_id, f.size_bytes FROM filesystems f \
             JOIN servers s ON s.id = ?1 \
             WHERE f.scope = 'global' \
                OR (f.scope = 'project' AND f.project_id = s.project_id) \
                OR (f.scope = 'instance' AND EXISTS (SELECT 1 FROM filesystem_instances fi \
                    WHERE fi.filesystem_id = f.id AND fi.server_id = s.id)) \
             ORDER BY f.name",
            id,
        )
    }
}
