//! Block Storage user messages (cinder's `cinder/message`, shown by `/messages` from
//! microversion 3.3): a record that an asynchronous action failed after its request was
//! answered 2xx, for the project that asked. The text users read is derived from the action
//! and detail ids; the underlying error stays in the daemon's log, as cinder keeps it out of
//! messages so as not to expose internals.
//!
//! A message is kept at least `message_ttl` (its `expires_at`). cinder's scheduler reaps
//! expired ones periodically; here they go lazily, at the start of every message read.

use admin_api::{
    model::{message_field as field, *},
    time_fmt,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use time::OffsetDateTime;

use super::{Tx, Volumes, canonical, not_found};
use crate::control::{new_id, now, parse_ts};

const MESSAGE_COLUMNS: &str = "id, project_id, request_id, resource_type, resource_uuid, \
     event_id, action_id, detail_id, message_level, created_at, expires_at";

/// Message timestamps are stored fixed-width (`...:SS.ffffffZ`) so that SQL compares them as
/// text (the reaping of expired ones).
fn message_ts(t: OffsetDateTime) -> String {
    time_fmt::keystone(t)
}

fn message_row(row: &Row<'_>) -> rusqlite::Result<UserMessage> {
    Ok(UserMessage {
        id: row.get(0)?,
        project_id: row.get(1)?,
        request_id: row.get(2)?,
        resource_type: row.get(3)?,
        resource_uuid: row.get(4)?,
        event_id: row.get(5)?,
        action_id: row.get(6)?,
        detail_id: row.get(7)?,
        message_level: row.get(8)?,
        created_at: parse_ts(&row.get::<_, String>(9)?)?,
        expires_at: parse_ts(&row.get::<_, String>(10)?)?,
    })
}

/// cinder's `cleanup_expired_messages`: deletes the messages whose `expires_at` has passed.
fn reap(conn: &Connection) -> Tx<()> {
    let n = conn
        .prepare_cached("DELETE FROM messages WHERE expires_at < ?1")?
        .execute([message_ts(now())])?;
    if n > 0 {
        tracing::info!(count = n, "deleted expired user messages");
    }
    Ok(())
}

/// A message the caller may see (its project's; any for an admin), or cinder's 404.
fn load_visible(conn: &Connection, caller: &Caller, id: &str) -> Tx<UserMessage> {
    let missing = || not_found("Message", id);
    let key = canonical(id).ok_or_else(missing)?;
    reap(conn)?;
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1");
    let m = conn
        .query_row(&sql, [&key], message_row)
        .optional()?
        .ok_or_else(missing)?;
    if caller.is_admin() || m.project_id == caller.project_id {
        Ok(m)
    } else {
        Err(missing().into())
    }
}

/// `created_at + ttl`, or the last instant the catalog's format holds when that is beyond it.
fn expiry(created: OffsetDateTime, ttl: std::time::Duration) -> OffsetDateTime {
    let last = time::macros::datetime!(9999-12-31 23:59:59.999999 UTC);
    time::Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| created.checked_add(ttl))
        .map_or(last, |t| t.min(last))
}

impl Volumes {
    /// Records that an upload of `volume_id` to an image failed, as cinder's volume manager
    /// does in `copy_volume_to_image`: an `ERROR` message for `project` (the project that
    /// asked for the upload), action `COPY_VOLUME_TO_IMAGE`, detail
    /// `FAILED_TO_UPLOAD_VOLUME` (event `VOLUME_VOLUME_003_004`), naming the upload's
    /// request. `reason` only goes to the log, with the message's id.
    ///
    /// Call it before [`end_upload`](Self::end_upload) (which forgets the upload's request).
    /// Failing to record is logged and otherwise ignored: the upload's own cleanup goes on.
    pub async fn record_upload_failure(
        &self,
        project: &str,
        volume_id: &str,
        reason: &ServiceError,
    ) {
        let (project, volume) = (project.to_owned(), volume_id.to_owned());
        let id = new_id();
        let event = field::event_id(
            field::RESOURCE_VOLUME,
            field::COPY_VOLUME_TO_IMAGE,
            field::FAILED_TO_UPLOAD_VOLUME,
        );
        let i = id.clone();
        let r = self
            .tx(move |conn, s| {
                let request_id: Option<String> = conn
                    .query_row(
                        "SELECT upload_request_id FROM volumes WHERE id = ?1",
                        [&volume],
                        |r| r.get(0),
                    )
                    .optional()?
                    .flatten();
                // An upload started before the catalog kept request ids has none of its own.
                let request_id = request_id.unwrap_or_else(|| format!("req-{}", new_id()));
                let created = now();
                conn.execute(
                    "INSERT INTO messages (id, project_id, request_id, resource_type, \
                     resource_uuid, event_id, action_id, detail_id, message_level, created_at, \
                     expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'ERROR', ?9, ?10)",
                    params![
                        i,
                        project,
                        request_id,
                        field::RESOURCE_VOLUME,
                        volume,
                        event,
                        field::COPY_VOLUME_TO_IMAGE.0,
                        field::FAILED_TO_UPLOAD_VOLUME.0,
                        message_ts(created),
                        message_ts(expiry(created, s.message_ttl)),
                    ],
                )?;
                Ok(())
            })
            .await;
        match r {
            Ok(()) => tracing::info!(volume = %volume_id, message = %id, error = %reason,
                "recorded a user message: the upload to an image failed"),
            Err(e) => tracing::error!(volume = %volume_id, error = %e,
                "recording the user message of a failed upload"),
        }
    }

    /// The messages the caller may see, newest first (cinder's default order: `created_at`,
    /// then `id`, descending).
    pub async fn list_messages(&self, caller: &Caller) -> ServiceResult<Vec<UserMessage>> {
        let caller = caller.clone();
        self.tx(move |conn, _| {
            reap(conn)?;
            let mut sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages");
            let all = caller.is_admin();
            if !all {
                sql.push_str(" WHERE project_id = ?1");
            }
            sql.push_str(" ORDER BY created_at DESC, id DESC");
            let mut stmt = conn.prepare(&sql)?;
            let rows = if all {
                stmt.query_map([], message_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            } else {
                stmt.query_map([&caller.project_id], message_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(rows)
        })
        .await
    }

    pub async fn get_message(&self, caller: &Caller, id: &str) -> ServiceResult<UserMessage> {
        let (caller, id) = (caller.clone(), id.to_owned());
        self.tx(move |conn, _| load_visible(conn, &caller, &id))
            .await
    }

    /// cinder's order: the message (404), then the policy (`message:delete`, member).
    pub async fn delete_message(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let (caller, key) = (caller.clone(), id.to_owned());
        self.tx(move |conn, _| {
            let m = load_visible(conn, &caller, &key)?;
            if !caller.has(Role::Member) {
                return Err(ServiceError::Forbidden(
                    "Policy doesn't allow message:delete to be performed.".into(),
                )
                .into());
            }
            conn.execute("DELETE FROM messages WHERE id = ?1", [&m.id])?;
            Ok(())
        })
        .await?;
        tracing::info!(message = %id, "user message deleted");
        Ok(())
    }
}
