//! The daemon's [`ExportSource`]: a volume is an export (named by its UUID) while it has at
//! least one attachment; read-only when every attachment is.

use std::sync::Arc;

use uuid::Uuid;

use super::fence::Fence;
use super::server::{Export, ExportSource};
use crate::catalog::Catalog;

pub struct CatalogExports {
    catalog: Catalog,
    fence: Option<Arc<Fence>>,
}

impl CatalogExports {
    /// `fence`: where the volume service ends exports (see [`Fence`]).
    pub fn new(catalog: Catalog, fence: Option<Arc<Fence>>) -> Self {
        CatalogExports { catalog, fence }
    }
}

/// Attached volumes with their store object: (id, object_id, name, rw attachments).
const ATTACHED: &str = "SELECT v.id, v.object_id, v.name, \
     (SELECT count(*) FROM attachments a WHERE a.volume_id = v.id AND a.mode = 'rw') \
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
        // Only UUIDs name exports; anything else is unknown without asking the catalog.
        let Ok(id) = Uuid::parse_str(name) else {
            return Ok(None);
        };
        let id = id.hyphenated().to_string();
        self.catalog
            .call(move |conn| {
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
                Ok(out)
            })
            .await
            .map_err(|e| e.to_string())
    }
}
