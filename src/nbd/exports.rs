//! The daemon's [`ExportSource`]: a volume is an export (named by its UUID) while it has at
//! least one attachment; read-only when every attachment is. An image's raw content is the
//! read-only export `image/<image-id>` (its raw cache once `Cached`, or the data of an active
//! raw image). Internal exports (`internal/<uuid>`, never listed) give `qemu-img` access to
//! store objects while it converts an image, for as long as an [`ExportLease`] lives.

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use super::fence::Fence;
use super::server::{Export, ExportSource};
use crate::catalog::Catalog;

pub struct CatalogExports {
    catalog: Catalog,
    fence: Option<Arc<Fence>>,
    internal: Arc<InternalExports>,
}

impl CatalogExports {
    /// `fence`: where the volume service ends exports (see [`Fence`]).
    pub fn new(
        catalog: Catalog,
        fence: Option<Arc<Fence>>,
        internal: Arc<InternalExports>,
    ) -> Self {
        CatalogExports {
            catalog,
            fence,
            internal,
        }
    }
}

/// Name prefix of internal exports.
const INTERNAL: &str = "internal/";
/// Name prefix of image exports.
pub const IMAGE_PREFIX: &str = "image/";

/// Exports the daemon opens for itself (image conversion), named by a random UUID that only
/// the process given the lease learns; never listed.
#[derive(Default)]
pub struct InternalExports {
    live: parking_lot::Mutex<HashMap<String, Export>>,
}

/// An internal export; it ends when the lease is dropped (connections already open keep
/// working until they close: the lease's holder ends those processes first).
pub struct ExportLease {
    registry: Arc<InternalExports>,
    name: String,
}

impl ExportLease {
    /// The export name to ask the NBD server for.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ExportLease {
    fn drop(&mut self) {
        self.registry.live.lock().remove(&self.name);
    }
}

impl InternalExports {
    /// Offers `object` until the returned lease is dropped.
    pub fn open(self: &Arc<Self>, object: Uuid, read_only: bool, what: &str) -> ExportLease {
        let name = format!("{INTERNAL}{}", Uuid::new_v4());
        self.live.lock().insert(
            name.clone(),
            Export {
                name: name.clone(),
                description: format!("cairn internal: {what}"),
                object,
                read_only,
            },
        );
        ExportLease {
            registry: self.clone(),
            name,
        }
    }

    fn get(&self, name: &str) -> Option<Export> {
        self.live.lock().get(name).cloned()
    }
}

/// The object behind an image's export: the raw cache when `Cached`, else the data of an
/// active raw image. (id, object).
const IMAGE_EXPORTS: &str = "SELECT id, CASE WHEN cache_status = 'Cached' \
       AND raw_object_id IS NOT NULL THEN raw_object_id ELSE data_object_id END, name \
     FROM images \
     WHERE status = 'active' AND ((cache_status = 'Cached' AND raw_object_id IS NOT NULL) \
       OR (disk_format = 'raw' AND data_object_id IS NOT NULL))";

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Export>> {
    let id: String = r.get(0)?;
    let object: String = r.get(1)?;
    let name: Option<String> = r.get(2)?;
    let Ok(object) = Uuid::parse_str(&object) else {
        return Ok(None);
    };
    let description = match name {
        Some(n) if !n.is_empty() => format!("cairn image {n} (raw, read-only)"),
        _ => "cairn image (raw, read-only)".to_owned(),
    };
    Ok(Some(Export {
        name: format!("{IMAGE_PREFIX}{}", id.to_ascii_lowercase()),
        description,
        object,
        read_only: true,
    }))
}

/// Attached volumes with their store object: (id, object_id, name, rw attachments; none for
/// a volume flagged read-only).
const ATTACHED: &str = "SELECT v.id, v.object_id, v.name, \
     CASE WHEN v.readonly THEN 0 ELSE \
       (SELECT count(*) FROM attachments a WHERE a.volume_id = v.id AND a.mode = 'rw') END \
     FROM volumes v \
     WHERE v.object_id IS NOT NULL \
       AND EXISTS (SELECT 1 FROM attachments a WHERE a.volume_id = v.id)";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Export>> {
    let id: String = r.get(0)?;
    let object: String = r.get(1)?;
    let name: Option<String> = r.get(2)?;
    let rw: i64 = r.get(3)?;
    let Ok(object) = Uuid::parse_str(&object) else {
        return Ok(None);
    };
    let description = match name {
        Some(n) if !n.is_empty() => format!("cairn volume {n}"),
        _ => "cairn volume".to_owned(),
    };
    Ok(Some(Export {
        name: id.to_ascii_lowercase(),
        description,
        object,
        read_only: rw == 0,
    }))
}

#[async_trait::async_trait]
impl ExportSource for CatalogExports {
    fn fence(&self) -> Option<Arc<Fence>> {
        self.fence.clone()
    }

    async fn lookup(&self, name: &str) -> Result<Option<Export>, String> {
        if name.starts_with(INTERNAL) {
            return Ok(self.internal.get(name));
        }
        let (image, id) = match name.strip_prefix(IMAGE_PREFIX) {
            Some(id) => (true, id),
            None => (false, name),
        };
        // Only UUIDs name exports; anything else is unknown without asking the catalog.
        let Ok(id) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let id = id.hyphenated().to_string();
        self.catalog
            .call(move |conn| {
                if image {
                    let sql = format!("{IMAGE_EXPORTS} AND lower(id) = ?1");
                    let mut stmt = conn.prepare_cached(&sql)?;
                    let mut rows = stmt.query_map([&id], image_row)?;
                    return Ok(rows.next().transpose()?.flatten());
                }
                let sql = format!("{ATTACHED} AND lower(v.id) = ?1");
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut rows = stmt.query_map([&id], row)?;
                Ok(rows.next().transpose()?.flatten())
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn list(&self) -> Result<Vec<Export>, String> {
        self.catalog
            .call(|conn| {
                let sql = format!("{ATTACHED} ORDER BY v.created_at, v.id");
                let mut stmt = conn.prepare_cached(&sql)?;
                let rows = stmt.query_map([], row)?;
                let mut out = Vec::new();
                for r in rows {
                    if let Some(e) = r? {
                        out.push(e);
                    }
                }
                let sql = format!("{IMAGE_EXPORTS} ORDER BY created_at, id");
                let mut stmt = conn.prepare_cached(&sql)?;
                for r in stmt.query_map([], image_row)? {
                    if let Some(e) = r? {
                        out.push(e);
                    }
                }
                Ok(out)
            })
            .await
            .map_err(|e| e.to_string())
    }
}
