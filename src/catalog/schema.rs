//! Schema versioning: `PRAGMA user_version` holds the version of the last applied migration;
//! migrations are applied in order, each in its own `BEGIN IMMEDIATE` transaction together with
//! the `user_version` bump, so a crash leaves the catalog at one version or the next, never in
//! between.

use rusqlite::{Connection, TransactionBehavior};

use super::CatalogError;

/// One step of the schema. `version` is the `user_version` after it is applied.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Versions are 1, 2, 3... without gaps. Never edit a released
/// migration: add a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "server_user",
        sql: include_str!("migrations/0002_server_user.sql"),
    },
    Migration {
        version: 3,
        name: "images",
        sql: include_str!("migrations/0003_images.sql"),
    },
    Migration {
        version: 4,
        name: "volume_readonly",
        sql: include_str!("migrations/0004_volume_readonly.sql"),
    },
    Migration {
        version: 5,
        name: "snapshots",
        sql: include_str!("migrations/0005_snapshots.sql"),
    },
    Migration {
        version: 6,
        name: "volume_types",
        sql: include_str!("migrations/0006_volume_types.sql"),
    },
    Migration {
        version: 7,
        name: "volume_uploads",
        sql: include_str!("migrations/0007_volume_uploads.sql"),
    },
    Migration {
        version: 8,
        name: "messages",
        sql: include_str!("migrations/0008_messages.sql"),
    },
    Migration {
        version: 9,
        name: "volume_image_metadata",
        sql: include_str!("migrations/0009_volume_image_metadata.sql"),
    },
    Migration {
        version: 10,
        name: "filesystems",
        sql: include_str!("migrations/0010_filesystems.sql"),
    },
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

pub(crate) fn user_version(conn: &Connection) -> Result<u32, CatalogError> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    // user_version is a signed 32-bit header field; a negative value is not ours.
    u32::try_from(v).map_err(|_| CatalogError::NewerSchema {
        found: v,
        supported: SCHEMA_VERSION,
    })
}

/// Applies the migrations of `migrations` that `conn` lacks; returns the resulting version.
/// Refuses (changing nothing) a database whose version is newer than the last migration.
pub(crate) fn migrate(
    conn: &mut Connection,
    migrations: &[Migration],
) -> Result<u32, CatalogError> {
    let latest = migrations.last().map_or(0, |m| m.version);
    let mut current = user_version(conn)?;
    if current > latest {
        return Err(CatalogError::NewerSchema {
            found: current.into(),
            supported: latest,
        });
    }
    for m in migrations {
        // IMMEDIATE takes the write lock before reading the version, so two processes
        // cannot both apply the same migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        current = user_version(&tx)?;
        if current > latest {
            return Err(CatalogError::NewerSchema {
                found: current.into(),
                supported: latest,
            });
        }
        if current >= m.version {
            continue; // dropping `tx` rolls back nothing
        }
        tx.execute_batch(m.sql)
            .map_err(|source| CatalogError::Migration {
                version: m.version,
                name: m.name,
                source,
            })?;
        tx.pragma_update(None, "user_version", m.version)?;
        tx.commit()?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "catalog schema migrated"
        );
        current = m.version;
    }
    Ok(current)
}
