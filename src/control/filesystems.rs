//! Shared filesystems (seed 002): their records and who may see them. The data plane (the
//! files, the FUSE views) is `crate::fs`.
//!
//! Access follows scope at the moment of asking: `global` filesystems are every instance's,
//! `project` ones every instance of the project (those made later too), `instance` ones only
//! those connected. Instances are Compute servers and pdisk VMs alike (one `servers` table);
//! deleting one drops its connections with it. Names are one namespace across the daemon (the
//! API addresses a filesystem by its name alone), stricter than the catalog's index.

use admin_api::filesystem::{self, Filesystem, FsRequest, FsScope};
use admin_api::model::{Caller, Role, ServiceError, ServiceResult};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{TxError, now, parse_ts, ts};
use crate::catalog::Catalog;

type Tx<T> = Result<T, TxError>;

pub struct Filesystems {
    catalog: Catalog,
    /// The data plane: what a filesystem holds (a shrink must fit it), and its data to drop
    /// with it. Absent in tests of the rules alone.
    data: std::sync::OnceLock<std::sync::Arc<crate::fs::FsHub>>,
}

const COLUMNS: &str = "id, name, scope, project_id, size_bytes, size_text, created_at";

fn row(r: &Row<'_>) -> rusqlite::Result<Filesystem> {
    let scope: String = r.get(2)?;
    let size: i64 = r.get(4)?;
    let size_bytes = u64::try_from(size).unwrap_or(0);
    Ok(Filesystem {
        id: r.get(0)?,
        name: r.get(1)?,
        scope: FsScope::parse(&scope).unwrap_or(FsScope::Instance),
        project_id: r.get(3)?,
        size_bytes,
        size_text: r
            .get::<_, Option<String>>(5)?
            .unwrap_or_else(|| format!("{}Gb", size_bytes >> 30)),
        created_at: parse_ts(&r.get::<_, String>(6)?)?,
    })
}

fn load(conn: &Connection, name: &str) -> Tx<Option<Filesystem>> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM filesystems WHERE name = ?1"),
            [name],
            row,
        )
        .optional()?)
}

/// `name`, if `caller` may see it; 404 otherwise (another project's is not told apart).
fn find(conn: &Connection, caller: &Caller, name: &str) -> Tx<Filesystem> {
    match load(conn, name)? {
        Some(fs) if visible(caller, &fs) => Ok(fs),
        _ => Err(not_found(name).into()),
    }
}

fn not_found(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("Filesystem {name} could not be found."))
}

fn own(caller: &Caller, fs: &Filesystem) -> bool {
    fs.project_id.as_deref() == Some(caller.project_id.as_str())
}

/// Whether `caller` may see `fs` at all: an admin every one, others the global ones and
/// their project's.
fn visible(caller: &Caller, fs: &Filesystem) -> bool {
    caller.is_admin() || fs.scope == FsScope::Global || own(caller, fs)
}

/// Whether `caller` may change `fs` (resize, delete, connect instances): an admin, or a member
/// of its project.
fn may_change(caller: &Caller, fs: &Filesystem) -> bool {
    caller.is_admin() || (own(caller, fs) && caller.has(Role::Member))
}

fn forbidden(what: &str) -> ServiceError {
    ServiceError::Forbidden(format!("Policy doesn't allow {what} to be performed."))
}

impl Filesystems {
    pub fn new(catalog: Catalog) -> Filesystems {
        Filesystems {
            catalog,
            data: std::sync::OnceLock::new(),
        }
    }

    pub fn set_data(&self, hub: std::sync::Arc<crate::fs::FsHub>) {
        let _ = self.data.set(hub);
    }

    async fn tx<T, F>(&self, f: F) -> ServiceResult<T>
    where
        F: FnOnce(&Connection) -> Tx<T> + Send + 'static,
        T: Send + 'static,
    {
        super::immediate(&self.catalog, f).await
    }

    /// Creates `name`, or resizes it when it exists with the same scope and project (the
    /// seed's `PUT`); the same name with another scope or project is 409. A non-admin may
    /// make only filesystems of its own project (scope `project` or `instance`).
    pub async fn put(
        &self,
        caller: &Caller,
        name: &str,
        req: FsRequest,
    ) -> ServiceResult<(Filesystem, bool)> {
        filesystem::check_name(name)?;
        let size = filesystem::parse_size(&req.size_text)?;
        if !caller.has(Role::Member) {
            return Err(forbidden("compute_extension:shared_filesystem:create"));
        }
        let project = match req.scope {
            FsScope::Project => Some(
                req.project
                    .clone()
                    .unwrap_or_else(|| caller.project_id.clone()),
            ),
            FsScope::Instance => Some(caller.project_id.clone()),
            FsScope::Global => None,
        };
        if !caller.is_admin()
            && (req.scope == FsScope::Global
                || project.as_deref().is_some_and(|p| p != caller.project_id))
        {
            return Err(forbidden("compute_extension:shared_filesystem:create"));
        }
        if let Some(hub) = self.data.get() {
            let existing = {
                let name = name.to_owned();
                self.tx(move |conn| load(conn, &name)).await?
            };
            if let Some(fs) = existing.filter(|f| visible(caller, f) && size < f.size_bytes) {
                let used = hub.used(&fs.id).await;
                if size < used {
                    return Err(ServiceError::Conflict(format!(
                        "Filesystem {name} holds {used} bytes: it cannot shrink to {size}."
                    )));
                }
            }
        }
        let caller = caller.clone();
        let name = name.to_owned();
        let out = self
            .tx(move |conn| {
                if let Some(p) = &project {
                    let known: bool = conn.query_row(
                        "SELECT EXISTS (SELECT 1 FROM projects WHERE id = ?1)",
                        [p],
                        |r| r.get(0),
                    )?;
                    if !known {
                        return Err(ServiceError::BadRequest(format!(
                            "Project {p} could not be found."
                        ))
                        .into());
                    }
                }
                match load(conn, &name)? {
                    Some(fs) => {
                        if !visible(&caller, &fs) {
                            return Err(ServiceError::Conflict(format!(
                                "A filesystem named {name} already exists."
                            ))
                            .into());
                        }
                        if fs.scope != req.scope || fs.project_id != project {
                            return Err(ServiceError::Conflict(format!(
                                "Filesystem {name} exists with another scope or project."
                            ))
                            .into());
                        }
                        if !may_change(&caller, &fs) {
                            return Err(
                                forbidden("compute_extension:shared_filesystem:update").into()
                            );
                        }
                        // Shrinking below what is stored is the data plane's to refuse (issue 26).
                        conn.execute(
                        "UPDATE filesystems SET size_bytes = ?2, size_text = ?3, updated_at = ?4 \
                         WHERE id = ?1",
                        params![fs.id, size as i64, req.size_text, ts(now())],
                    )?;
                        Ok((load(conn, &name)?.ok_or_else(|| not_found(&name))?, false))
                    }
                    None => {
                        let t = ts(now());
                        conn.execute(
                            "INSERT INTO filesystems (id, project_id, name, size_bytes, scope, \
                         status, created_at, updated_at, size_text) \
                         VALUES (?1, ?2, ?3, ?4, ?5, 'available', ?6, ?6, ?7)",
                            params![
                                uuid::Uuid::new_v4().to_string(),
                                project,
                                name,
                                size as i64,
                                req.scope.as_str(),
                                t,
                                req.size_text,
                            ],
                        )?;
                        Ok((load(conn, &name)?.ok_or_else(|| not_found(&name))?, true))
                    }
                }
            })
            .await?;
        if let Some(hub) = self.data.get() {
            hub.resized(&out.0.id, out.0.size_bytes).await;
        }
        Ok(out)
    }

    /// The filesystems `caller` may see, by name.
    pub async fn list(&self, caller: &Caller) -> ServiceResult<Vec<Filesystem>> {
        let caller = caller.clone();
        self.tx(move |conn| {
            let mut stmt =
                conn.prepare(&format!("SELECT {COLUMNS} FROM filesystems ORDER BY name"))?;
            let all = stmt
                .query_map([], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(all.into_iter().filter(|f| visible(&caller, f)).collect())
        })
        .await
    }

    pub async fn get(&self, caller: &Caller, name: &str) -> ServiceResult<Filesystem> {
        let caller = caller.clone();
        let name = name.to_owned();
        self.tx(move |conn| find(conn, &caller, &name)).await
    }

    pub async fn delete(&self, caller: &Caller, name: &str) -> ServiceResult<()> {
        let caller = caller.clone();
        let name = name.to_owned();
        let id = self
            .tx(move |conn| {
                let fs = find(conn, &caller, &name)?;
                if !may_change(&caller, &fs) {
                    return Err(forbidden("compute_extension:shared_filesystem:delete").into());
                }
                conn.execute("DELETE FROM filesystems WHERE id = ?1", [&fs.id])?;
                Ok(fs.id)
            })
            .await?;
        if let Some(hub) = self.data.get() {
            hub.removed(&id).await;
        }
        Ok(())
    }

    /// The instances that see `name` now (ids, sorted).
    pub async fn instances(&self, caller: &Caller, name: &str) -> ServiceResult<Vec<String>> {
        let caller = caller.clone();
        let name = name.to_owned();
        self.tx(move |conn| {
            let fs = find(conn, &caller, &name)?;
            Ok(instances_of(conn, &fs)?)
        })
        .await
    }

    /// Connects an instance to a scope `instance` filesystem (idempotent).
    pub async fn connect(&self, caller: &Caller, name: &str, server: &str) -> ServiceResult<()> {
        self.grant(caller, name, server, true).await
    }

    /// Disconnects it; 404 when it was not connected.
    pub async fn disconnect(&self, caller: &Caller, name: &str, server: &str) -> ServiceResult<()> {
        self.grant(caller, name, server, false).await
    }

    async fn grant(
        &self,
        caller: &Caller,
        name: &str,
        server: &str,
        on: bool,
    ) -> ServiceResult<()> {
        let caller = caller.clone();
        let (name, server) = (name.to_owned(), server.to_owned());
        self.tx(move |conn| {
            let fs = find(conn, &caller, &name)?;
            if !may_change(&caller, &fs) {
                return Err(forbidden("compute_extension:shared_filesystem:update").into());
            }
            let owner: Option<String> = conn
                .query_row(
                    "SELECT project_id FROM servers WHERE id = ?1",
                    [&server],
                    |r| r.get(0),
                )
                .optional()?;
            match owner {
                Some(p) if caller.is_admin() || p == caller.project_id => {}
                _ => {
                    return Err(ServiceError::NotFound(format!(
                        "Instance {server} could not be found."
                    ))
                    .into());
                }
            }
            if fs.scope != FsScope::Instance {
                return Err(ServiceError::BadRequest(format!(
                    "Filesystem {name} has scope {}: its instances follow the scope.",
                    fs.scope.as_str()
                ))
                .into());
            }
            if on {
                conn.execute(
                    "INSERT OR IGNORE INTO filesystem_instances (filesystem_id, server_id, \
                     created_at) VALUES (?1, ?2, ?3)",
                    params![fs.id, server, ts(now())],
                )?;
            } else if conn.execute(
                "DELETE FROM filesystem_instances WHERE filesystem_id = ?1 AND server_id = ?2",
                params![fs.id, server],
            )? == 0
            {
                return Err(ServiceError::NotFound(format!(
                    "Instance {server} is not connected to filesystem {name}."
                ))
                .into());
            }
            Ok(())
        })
        .await
    }
}

/// Who sees `fs`, from the servers there are now.
fn instances_of(conn: &Connection, fs: &Filesystem) -> rusqlite::Result<Vec<String>> {
    let (sql, arg) = match fs.scope {
        FsScope::Global => (
            "SELECT id FROM servers WHERE ?1 IS NOT NULL ORDER BY id",
            String::new(),
        ),
        FsScope::Project => (
            "SELECT id FROM servers WHERE project_id = ?1 ORDER BY id",
            fs.project_id.clone().unwrap_or_default(),
        ),
        FsScope::Instance => (
            "SELECT server_id FROM filesystem_instances WHERE filesystem_id = ?1 \
             ORDER BY server_id",
            fs.id.clone(),
        ),
    };
    let mut stmt = conn.prepare(sql)?;
    stmt.query_map([arg], |r| r.get(0))?.collect()
}
