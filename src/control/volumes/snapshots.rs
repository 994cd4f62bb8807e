//! Block Storage snapshots: a copy-on-write clone of a volume's store object, taken at one
//! instant (metadata only, whatever the volume's size), and the source of instant volumes.

use admin_api::model::*;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::{GIB, Tx, Volumes, canonical, load_volume, may_change, may_see, need, not_found};
use crate::control::{now, parse_ts, ts};
use crate::store::StoreError;

const SNAPSHOT_COLUMNS: &str = "id, project_id, user_id, volume_id, name, description, size_bytes, \
     status, metadata, created_at, updated_at";

fn snapshot_row(row: &Row<'_>) -> rusqlite::Result<Snapshot> {
    let size_bytes: i64 = row.get(6)?;
    let metadata: String = row.get(8)?;
    Ok(Snapshot {
        id: row.get(0)?,
        project_id: row.get(1)?,
        user_id: row.get(2)?,
        volume_id: row.get(3)?,
        name: row.get(4)?,
        description: row.get(5)?,
        size_gib: u64::try_from(size_bytes).unwrap_or(0) / GIB,
        status: row.get(7)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        created_at: parse_ts(&row.get::<_, String>(9)?)?,
        updated_at: parse_ts(&row.get::<_, String>(10)?)?,
    })
}

fn load_snapshot(conn: &Connection, id: &str) -> Tx<Option<Snapshot>> {
    let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1");
    Ok(conn.query_row(&sql, [id], snapshot_row).optional()?)
}

fn may_see_snapshot(caller: &Caller, s: &Snapshot) -> bool {
    caller.is_admin() || s.project_id == caller.project_id
}

fn set_snapshot_status(conn: &Connection, id: &str, status: &str) -> Tx<()> {
    conn.execute(
        "UPDATE snapshots SET status = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, status, ts(now())],
    )?;
    Ok(())
}

impl Volumes {
    pub async fn create_snapshot(
        &self,
        caller: &Caller,
        new: NewSnapshot,
    ) -> ServiceResult<Snapshot> {
        need(caller, Role::Member, "volume:create_snapshot")?;
        let Some(vkey) = canonical(&new.volume_id) else {
            return Err(not_found("Volume", &new.volume_id));
        };
        let id = Uuid::new_v4();
        let id_s = id.to_string();
        let metadata = serde_json::to_string(&new.metadata).unwrap_or_else(|_| "{}".into());
        {
            let (caller, id_s, vkey, shown) = (
                caller.clone(),
                id_s.clone(),
                vkey.clone(),
                new.volume_id.clone(),
            );
            let (name, description, force) = (new.name.clone(), new.description.clone(), new.force);
            self.tx(move |conn, s| {
                let v = load_volume(conn, &vkey, s)?.ok_or_else(|| not_found("Volume", &shown))?;
                if !may_see(&caller, &v, false) {
                    return Err(not_found("Volume", &shown).into());
                }
                if !may_change(&caller, &v, false) {
                    return Err(ServiceError::Forbidden(
                        "Policy doesn't allow volume:create_snapshot to be performed.".into(),
                    )
                    .into());
                }
                let ok = match v.status {
                    VolumeStatus::Available => true,
                    VolumeStatus::InUse => force,
                    _ => false,
                };
                if !ok {
                    return Err(ServiceError::BadRequest(format!(
                        "Invalid volume: Volume {shown} status must be available, but current status is: {}.",
                        v.status.as_str()
                    ))
                    .into());
                }
                let t = ts(now());
                conn.execute(
                    "INSERT INTO snapshots (id, project_id, user_id, volume_id, name, description, \
                     size_bytes, status, object_id, metadata, created_at, updated_at, \
                     image_metadata) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'creating', ?1, ?8, ?9, ?9, \
                     (SELECT image_metadata FROM volumes WHERE id = ?4))",
                    params![
                        id_s,
                        v.project_id,
                        caller.user_id,
                        vkey,
                        name,
                        description,
                        (v.size_gib * GIB) as i64,
                        metadata,
                        t
                    ],
                )?;
                Ok(())
            })
            .await?;
        }
        // The clone is the instant: writes acknowledged before it are in the snapshot, later
        // ones only in the volume (an in-use volume's guest keeps writing meanwhile).
        let object = Uuid::parse_str(&vkey).map_err(|_| not_found("Volume", &new.volume_id))?;
        let cloned = self.store.clone_object(object, id).await;
        let status = match &cloned {
            Ok(()) => "available",
            Err(e) => {
                tracing::error!(snapshot = %id, volume = %vkey, error = %e, "snapshot clone failed");
                "error"
            }
        };
        let snap = {
            let id_s = id_s.clone();
            self.tx(move |conn, _| {
                set_snapshot_status(conn, &id_s, status)?;
                load_snapshot(conn, &id_s)?
                    .ok_or_else(|| ServiceError::Internal("snapshot vanished".into()).into())
            })
            .await?
        };
        match cloned {
            Ok(()) => {
                tracing::info!(snapshot = %id, volume = %vkey, "snapshot created");
                Ok(snap)
            }
            Err(StoreError::NoSpace) => Err(ServiceError::OverLimit(
                "No space left in the store for this snapshot.".into(),
            )),
            Err(_) => Err(ServiceError::Internal(
                "could not take the snapshot in the store; it is in error".into(),
            )),
        }
    }

    pub async fn list_snapshots(&self, caller: &Caller, all: bool) -> ServiceResult<Vec<Snapshot>> {
        if all {
            need(caller, Role::Admin, "volume:get_all_snapshots")?;
        }
        let project = caller.project_id.clone();
        self.tx(move |conn, _| {
            let sql = format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ?1 OR project_id = ?2 \
                 ORDER BY created_at, id"
            );
            let mut stmt = conn.prepare(&sql)?;
            let out = stmt
                .query_map(params![all, project], snapshot_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(out)
        })
        .await
    }

    pub async fn get_snapshot(&self, caller: &Caller, id: &str) -> ServiceResult<Snapshot> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Snapshot", id));
        };
        let (caller, shown) = (caller.clone(), id.to_owned());
        self.tx(move |conn, _| match load_snapshot(conn, &key)? {
            Some(s) if may_see_snapshot(&caller, &s) => Ok(s),
            _ => Err(not_found("Snapshot", &shown).into()),
        })
        .await
    }

    pub async fn update_snapshot(
        &self,
        caller: &Caller,
        id: &str,
        name: Option<Option<String>>,
        description: Option<Option<String>>,
    ) -> ServiceResult<Snapshot> {
        need(caller, Role::Member, "volume:update_snapshot")?;
        let Some(key) = canonical(id) else {
            return Err(not_found("Snapshot", id));
        };
        let (caller, shown) = (caller.clone(), id.to_owned());
        self.tx(move |conn, _| {
            let s = match load_snapshot(conn, &key)? {
                Some(s) if may_see_snapshot(&caller, &s) => s,
                _ => return Err(not_found("Snapshot", &shown).into()),
            };
            conn.execute(
                "UPDATE snapshots SET name = ?2, description = ?3, updated_at = ?4 WHERE id = ?1",
                params![
                    key,
                    name.unwrap_or(s.name),
                    description.unwrap_or(s.description),
                    ts(now())
                ],
            )?;
            load_snapshot(conn, &key)?.ok_or_else(|| not_found("Snapshot", &shown).into())
        })
        .await
    }

    pub async fn delete_snapshot(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        need(caller, Role::Member, "volume:delete_snapshot")?;
        let Some(key) = canonical(id) else {
            return Err(not_found("Snapshot", id));
        };
        {
            let (caller, shown, key) = (caller.clone(), id.to_owned(), key.clone());
            self.tx(move |conn, _| {
                let s = match load_snapshot(conn, &key)? {
                    Some(s) if may_see_snapshot(&caller, &s) => s,
                    _ => return Err(not_found("Snapshot", &shown).into()),
                };
                if !matches!(s.status.as_str(), "available" | "error") {
                    return Err(ServiceError::BadRequest(format!(
                        "Invalid snapshot: Snapshot {shown} status must be available or error, but current status is: {}.",
                        s.status
                    ))
                    .into());
                }
                set_snapshot_status(conn, &key, "deleting")
            })
            .await?;
        }
        let object = Uuid::parse_str(&key).map_err(|_| not_found("Snapshot", id))?;
        match self.store.delete_object(object).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(snapshot = %key, error = %e, "deleting the snapshot's store object");
                let k = key.clone();
                self.tx(move |conn, _| set_snapshot_status(conn, &k, "error"))
                    .await?;
                return Err(ServiceError::Internal(
                    "could not delete the snapshot's data; it is now in error".into(),
                ));
            }
        }
        self.tx(move |conn, _| {
            conn.execute("DELETE FROM snapshots WHERE id = ?1", [&key])?;
            Ok(())
        })
        .await?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// What a new volume clones: a snapshot's object or a volume's, with its size in bytes.
    /// `kind` is "Snapshot" or "Volume".
    pub(super) async fn clone_source(
        &self,
        caller: &Caller,
        kind: &'static str,
        id: &str,
    ) -> ServiceResult<(Uuid, u64)> {
        let Some(key) = canonical(id) else {
            return Err(not_found(kind, id));
        };
        let (caller, shown) = (caller.clone(), id.to_owned());
        let size = self
            .tx(move |conn, s| {
                if kind == "Snapshot" {
                    match load_snapshot(conn, &key)? {
                        Some(snap) if may_see_snapshot(&caller, &snap) => {
                            if snap.status != "available" {
                                return Err(ServiceError::BadRequest(
                                    "Invalid snapshot: Originating snapshot status must be one of 'available' values".into(),
                                )
                                .into());
                            }
                            Ok(snap.size_gib * GIB)
                        }
                        _ => Err(not_found(kind, &shown).into()),
                    }
                } else {
                    let v = load_volume(conn, &key, s)?
                        .filter(|v| may_see(&caller, v, false))
                        .ok_or_else(|| not_found(kind, &shown))?;
                    if !matches!(v.status, VolumeStatus::Available | VolumeStatus::InUse) {
                        return Err(ServiceError::BadRequest(format!(
                            "Invalid volume: Source volume {shown} status must be available or in-use, but current status is: {}.",
                            v.status.as_str()
                        ))
                        .into());
                    }
                    Ok(v.size_gib * GIB)
                }
            })
            .await?;
        let object =
            Uuid::parse_str(&canonical(id).unwrap_or_default()).map_err(|_| not_found(kind, id))?;
        Ok((object, size))
    }
}
