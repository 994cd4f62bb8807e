//! Block Storage volume types (`__DEFAULT__` always exists) and a project's usage (`/limits`).

use admin_api::model::*;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::{GIB, Tx, Volumes, need};
use crate::control::{now, ts};

/// cinder's default type: made by the catalog migration, never deleted.
pub const DEFAULT_TYPE: &str = "__DEFAULT__";

fn type_row(row: &Row<'_>) -> rusqlite::Result<VolumeType> {
    let specs: String = row.get(4)?;
    Ok(VolumeType {
        id: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        is_public: row.get(3)?,
        extra_specs: serde_json::from_str(&specs).unwrap_or_default(),
    })
}

const TYPE_COLUMNS: &str = "id, name, description, is_public, extra_specs";

/// By id, or by name (`default`: the default type).
fn find_type(conn: &Connection, key: &str) -> Tx<Option<VolumeType>> {
    let key = if key == "default" { DEFAULT_TYPE } else { key };
    let sql = format!("SELECT {TYPE_COLUMNS} FROM volume_types WHERE id = ?1 OR name = ?1");
    Ok(conn.query_row(&sql, [key], type_row).optional()?)
}

fn type_not_found(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("Volume type {id} could not be found."))
}

fn check_name(name: &str) -> ServiceResult<()> {
    let n = name.trim();
    if n.is_empty() || name.chars().count() > 255 {
        return Err(ServiceError::BadRequest(
            "Invalid input received: Volume type name must be 1 to 255 characters, not blank."
                .into(),
        ));
    }
    Ok(())
}

impl Volumes {
    pub async fn list_volume_types(&self, caller: &Caller) -> ServiceResult<Vec<VolumeType>> {
        let admin = caller.is_admin();
        self.tx(move |conn, _| {
            let sql = format!(
                "SELECT {TYPE_COLUMNS} FROM volume_types WHERE is_public OR ?1 ORDER BY name"
            );
            let mut stmt = conn.prepare(&sql)?;
            let out = stmt
                .query_map([admin], type_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(out)
        })
        .await
    }

    pub async fn get_volume_type(&self, caller: &Caller, id: &str) -> ServiceResult<VolumeType> {
        let (admin, id) = (caller.is_admin(), id.to_owned());
        self.tx(move |conn, _| match find_type(conn, &id)? {
            Some(t) if t.is_public || admin => Ok(t),
            _ => Err(type_not_found(&id).into()),
        })
        .await
    }

    pub async fn create_volume_type(
        &self,
        caller: &Caller,
        new: VolumeTypeChange,
    ) -> ServiceResult<VolumeType> {
        need(caller, Role::Admin, "volume_extension:types_manage")?;
        let Some(name) = new.name.clone() else {
            return Err(ServiceError::BadRequest(
                "Invalid input for field/attribute name. Value: 'name' is a required property"
                    .into(),
            ));
        };
        check_name(&name)?;
        let id = Uuid::new_v4().to_string();
        let specs = serde_json::to_string(&new.extra_specs.unwrap_or_default())
            .unwrap_or_else(|_| "{}".into());
        self.tx(move |conn, _| {
            if find_type(conn, &name)?.is_some() {
                return Err(
                    ServiceError::Conflict(format!("Volume Type {name} already exists.")).into(),
                );
            }
            conn.execute(
                "INSERT INTO volume_types (id, name, description, is_public, extra_specs, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    name,
                    new.description.flatten(),
                    new.is_public.unwrap_or(true),
                    specs,
                    ts(now())
                ],
            )?;
            find_type(conn, &id)?.ok_or_else(|| type_not_found(&id).into())
        })
        .await
    }

    pub async fn update_volume_type(
        &self,
        caller: &Caller,
        id: &str,
        change: VolumeTypeChange,
    ) -> ServiceResult<VolumeType> {
        need(caller, Role::Admin, "volume_extension:types_manage")?;
        if let Some(n) = &change.name {
            check_name(n)?;
        }
        let id = id.to_owned();
        self.tx(move |conn, _| {
            let t = find_type(conn, &id)?.ok_or_else(|| type_not_found(&id))?;
            if let Some(n) = &change.name
                && *n != t.name
            {
                if t.name == DEFAULT_TYPE {
                    return Err(ServiceError::BadRequest(
                        "Invalid input received: the default volume type cannot be renamed.".into(),
                    )
                    .into());
                }
                if find_type(conn, n)?.is_some() {
                    return Err(
                        ServiceError::Conflict(format!("Volume Type {n} already exists.")).into(),
                    );
                }
                // Volumes name their type: they follow the rename.
                conn.execute(
                    "UPDATE volumes SET volume_type = ?2 WHERE volume_type = ?1",
                    params![t.name, n],
                )?;
            }
            let specs = serde_json::to_string(&change.extra_specs.unwrap_or(t.extra_specs))
                .unwrap_or_else(|_| "{}".into());
            conn.execute(
                "UPDATE volume_types SET name = ?2, description = ?3, is_public = ?4, \
                 extra_specs = ?5 WHERE id = ?1",
                params![
                    t.id,
                    change.name.unwrap_or(t.name),
                    change.description.unwrap_or(t.description),
                    change.is_public.unwrap_or(t.is_public),
                    specs
                ],
            )?;
            find_type(conn, &t.id)?.ok_or_else(|| type_not_found(&id).into())
        })
        .await
    }

    pub async fn delete_volume_type(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        need(caller, Role::Admin, "volume_extension:types_manage")?;
        let id = id.to_owned();
        self.tx(move |conn, _| {
            let t = find_type(conn, &id)?.ok_or_else(|| type_not_found(&id))?;
            if t.name == DEFAULT_TYPE {
                return Err(ServiceError::BadRequest(
                    "Invalid volume type: Default volume type can not be deleted.".into(),
                )
                .into());
            }
            let used: i64 = conn.query_row(
                "SELECT count(*) FROM volumes WHERE volume_type = ?1",
                [&t.name],
                |r| r.get(0),
            )?;
            if used > 0 {
                return Err(
                    ServiceError::BadRequest("Target volume type is still in use.".into()).into(),
                );
            }
            conn.execute("DELETE FROM volume_types WHERE id = ?1", [&t.id])?;
            Ok(())
        })
        .await
    }

    pub async fn volume_usage(&self, caller: &Caller) -> ServiceResult<VolumeUsage> {
        let project = caller.project_id.clone();
        self.tx(move |conn, _| {
            let (volumes, bytes): (i64, i64) = conn.query_row(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM volumes WHERE project_id = ?1",
                [&project],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let snapshots: i64 = conn.query_row(
                "SELECT count(*) FROM snapshots WHERE project_id = ?1",
                [&project],
                |r| r.get(0),
            )?;
            Ok(VolumeUsage {
                volumes: volumes.max(0) as u64,
                gigabytes: (bytes.max(0) as u64).div_ceil(GIB),
                snapshots: snapshots.max(0) as u64,
            })
        })
        .await
    }
}
