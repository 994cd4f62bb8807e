//! Block Storage's legacy attach flow (cinder's volume actions `os-reserve`, `os-attach`,
//! `os-begin_detaching`, `os-detach`, `os-initialize_connection`, ...) on the one volume
//! model. `os-attach` makes the attachment record Compute's attach makes, so the views, the
//! limits and the NBD export are the same; `os-detach` ends it as Compute's detach does, the
//! export fence included. The status-only steps are cinder's conditional updates.
//!
//! Where cinder checks nothing because its volume manager trusts nova, cairn keeps its one
//! model whole: an attachment names a server this daemon knows (an unknown `instance_uuid`
//! is 404, `host_name` alone is 400), its device is free on that server, and a volume is
//! attached only from available, attaching (reserved) or in-use (multi-attach).

use admin_api::model::*;
use rusqlite::{Connection, params};

use super::{
    Tx, Volumes, canonical, changeable_in, load_attachments, not_found, remove_attachment,
    resolve_target, same_device, set_status,
};
use crate::control::{Settings, new_id, now, ts};

use VolumeStatus::{Attaching, Available, Detaching, InUse};

/// cinder's `os-attach` refusal of an `InvalidVolume` from its volume manager.
fn attach_refused(reason: impl std::fmt::Display) -> ServiceError {
    ServiceError::BadRequest(format!(
        "Error attaching volume - InvalidVolume: Invalid volume: {reason}"
    ))
}

/// cinder's `os-detach` refusal of a manager error (`kind`: its exception class).
fn detach_refused(kind: &str, message: impl std::fmt::Display) -> ServiceError {
    ServiceError::BadRequest(format!("Error detaching volume - {kind}: {message}"))
}

/// Where a volume rests once nothing is pending: in-use while attached, else available.
fn settled(v: &Volume) -> VolumeStatus {
    if v.attachments.is_empty() {
        Available
    } else {
        InUse
    }
}

/// Moves a volume to `to` through `detaching` when the direct step is not a transition
/// (in-use -> available).
fn settle(conn: &Connection, key: &str, from: VolumeStatus, to: VolumeStatus) -> Tx<()> {
    if from == to {
        return Ok(());
    }
    if !from.can_become(to) && from.can_become(Detaching) {
        set_status(conn, key, from, Detaching)?;
        return set_status(conn, key, Detaching, to);
    }
    set_status(conn, key, from, to)
}

/// `nbd://host:port` -> (host, port); an IPv6 host loses its brackets.
fn host_port(nbd_url: &str) -> Option<(String, u16)> {
    let rest = nbd_url.strip_prefix("nbd://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

impl Volumes {
    /// `os-reserve`, `os-unreserve`, `os-begin_detaching`, `os-roll_detaching` and
    /// `os-terminate_connection`, with cinder's conditions and words. Unreserve, roll back and
    /// terminate change nothing (and answer 202) when the volume is not in their status, as
    /// cinder's conditional updates do.
    pub async fn attach_step(
        &self,
        caller: &Caller,
        id: &str,
        step: AttachStep,
    ) -> ServiceResult<()> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        let moved = self
            .tx(move |conn, s| {
                let v = changeable_in(conn, &caller, &key, &shown, step.policy(), s)?;
                let to = match step {
                    AttachStep::Reserve => {
                        if !(v.status == Available || (v.multiattach && v.status == InUse)) {
                            let expected = if v.multiattach {
                                "available or in-use"
                            } else {
                                "available"
                            };
                            return Err(ServiceError::BadRequest(format!(
                                "Invalid volume: Volume status must be {expected} to reserve, but the status is {}.",
                                v.status.as_str()
                            ))
                            .into());
                        }
                        Some(Attaching)
                    }
                    // cinder's terminate_connection ends with an unreserve; the export itself
                    // lives while an attachment does (os-detach ends it).
                    AttachStep::Unreserve | AttachStep::TerminateConnection => {
                        (v.status == Attaching).then(|| settled(&v))
                    }
                    AttachStep::BeginDetaching => {
                        // cairn derives cinder's attach_status from the attachments.
                        if v.status != InUse || v.attachments.is_empty() {
                            return Err(ServiceError::BadRequest(
                                "Invalid volume: Unable to detach volume. Volume status must be 'in-use' and attach_status must be 'attached' to detach.".into(),
                            )
                            .into());
                        }
                        Some(Detaching)
                    }
                    AttachStep::RollDetaching => (v.status == Detaching).then(|| settled(&v)),
                };
                if let Some(to) = to {
                    set_status(conn, &key, v.status, to)?;
                }
                Ok(to.map(|to| (v.status, to)))
            })
            .await?;
        if let Some((from, to)) = moved {
            tracing::info!(volume = %id, ?step, from = from.as_str(), to = to.as_str(), "volume attach step");
        }
        Ok(())
    }

    /// `os-attach`: one attachment record, as Compute's attach makes it (hot-plugged, the
    /// mountpoint as its device, `ro` when asked), and the volume in-use.
    pub async fn cinder_attach(
        &self,
        caller: &Caller,
        id: &str,
        req: VolumeAttach,
    ) -> ServiceResult<Attachment> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        let (a, new) = self
            .tx(move |conn, s| {
                let v = changeable_in(
                    conn,
                    &caller,
                    &key,
                    &shown,
                    "volume_extension:volume_actions:attach",
                    s,
                )?;
                // cinder's API checks the read-only flag before its manager sees the request.
                if v.readonly && !req.read_only {
                    return Err(ServiceError::BadRequest(format!(
                        "Invalid attaching mode 'rw' for volume {shown}."
                    ))
                    .into());
                }
                let Some(instance) = req.instance_uuid.as_deref() else {
                    // cinder records a host attachment and trusts the caller; in cairn every
                    // attachment is a server's (Compute and pdisk list it, the server's
                    // deletion ends it), and no server has a host name.
                    return Err(ServiceError::BadRequest(
                        "Invalid input received: cairn attaches volumes to servers: instance_uuid is required (host_name alone names no server).".into(),
                    )
                    .into());
                };
                let server =
                    resolve_target(conn, &caller, &AttachTarget::Server(instance.to_owned()), false)?
                        .ok_or_else(|| {
                            ServiceError::NotFound(format!("Instance {instance} could not be found."))
                        })?;
                // cinder's manager: an attachment already tracked for that instance settles
                // the volume in-use and is the answer.
                if let Some(a) = v.attachments.iter().find(|a| a.server_id == server.id) {
                    if matches!(v.status, Attaching | Detaching) {
                        set_status(conn, &key, v.status, InUse)?;
                    }
                    return Ok((a.clone(), false));
                }
                let single = "volume is already attached and multiple attachments are not enabled";
                match v.status {
                    Available | Attaching => {}
                    InUse if v.multiattach => {}
                    InUse => return Err(attach_refused(single).into()),
                    other => {
                        return Err(attach_refused(format!(
                            "Volume status must be available, attaching or in-use to attach, but the status is {}.",
                            other.as_str()
                        ))
                        .into());
                    }
                }
                if v.attachments.len() as u64 >= u64::from(v.user_limit) {
                    return Err(attach_refused(if v.multiattach {
                        format!(
                            "volume has no free attachment slot: it is attached {} time(s), its limit is {}.",
                            v.attachments.len(),
                            v.user_limit
                        )
                    } else {
                        single.to_owned()
                    })
                    .into());
                }
                let taken = load_attachments(conn, "a.server_id = ?1", &server.id, s)?
                    .into_iter()
                    .filter_map(|a| a.device)
                    .any(|d| same_device(&d, &req.mountpoint));
                if taken {
                    return Err(attach_refused(format!(
                        "The supplied device path ({}) is in use.",
                        req.mountpoint
                    ))
                    .into());
                }
                if v.status != Attaching {
                    set_status(conn, &key, v.status, Attaching)?;
                }
                let aid = new_id();
                conn.execute(
                    "INSERT INTO attachments (id, volume_id, server_id, device, kind, mode, \
                     attached_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        aid,
                        key,
                        server.id,
                        req.mountpoint,
                        AttachKind::Hot.as_str(),
                        if req.read_only { "ro" } else { "rw" },
                        ts(now())
                    ],
                )?;
                // The export is served from the attachment on, as for Compute's attach.
                set_status(conn, &key, Attaching, InUse)?;
                let a = load_attachments(conn, "a.id = ?1", &aid, s)?
                    .pop()
                    .ok_or_else(|| ServiceError::Internal("attachment vanished".into()))?;
                Ok((a, true))
            })
            .await?;
        if new {
            tracing::info!(volume = %a.volume_id, server = %a.server_id, device = ?a.device, "volume attached (os-attach)");
        }
        Ok(a)
    }

    /// `os-detach`: ends the attachment named (or the only one) exactly as Compute's detach
    /// does: the volume moves on, and when it was the last attachment the export ends and
    /// this answers once its connections no longer reach the store.
    pub async fn cinder_detach(
        &self,
        caller: &Caller,
        id: &str,
        attachment_id: Option<String>,
    ) -> ServiceResult<Option<Attachment>> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        let a = self
            .tx_ending(move |conn, s| {
                let v = changeable_in(
                    conn,
                    &caller,
                    &key,
                    &shown,
                    "volume_extension:volume_actions:detach",
                    s,
                )?;
                let a = match attachment_id {
                    Some(aid) => {
                        let want = canonical(&aid);
                        let found = v
                            .attachments
                            .iter()
                            .find(|a| Some(&a.id) == want.as_ref());
                        match found {
                            Some(a) => a.clone(),
                            None => {
                                return Err(detach_refused(
                                    "VolumeAttachmentNotFound",
                                    format!(
                                        "Volume attachment could not be found with filter: attachment_id = {aid}."
                                    ),
                                )
                                .into());
                            }
                        }
                    }
                    None => match v.attachments.as_slice() {
                        [a] => a.clone(),
                        [] => {
                            // cinder: "detach called, but volume not attached": it rests
                            // available (a reservation or a begun detach ends there).
                            if matches!(v.status, Attaching | Detaching | InUse) {
                                settle(conn, &key, v.status, Available)?;
                            }
                            return Ok((None, Vec::new()));
                        }
                        _ => {
                            return Err(detach_refused(
                                "InvalidVolume",
                                "Invalid volume: Detach volume failed: More than one attachment, but no attachment_id provided.",
                            )
                            .into());
                        }
                    },
                };
                let ended = if remove_attachment(conn, &a)? {
                    vec![a.volume_id.clone()]
                } else {
                    Vec::new()
                };
                Ok((Some(a), ended))
            })
            .await?;
        if let Some(a) = &a {
            tracing::info!(volume = %a.volume_id, server = %a.server_id, "volume detached (os-detach)");
        }
        Ok(a)
    }

    /// `os-initialize_connection`: where the volume's export is served and whether it takes
    /// writes. The export answers while the volume has an attachment (NBD section).
    pub async fn connection(&self, caller: &Caller, id: &str) -> ServiceResult<VolumeConnection> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        let (v, writers) = self
            .tx(move |conn, s: &Settings| {
                let v = changeable_in(
                    conn,
                    &caller,
                    &key,
                    &shown,
                    "volume_extension:volume_actions:initialize_connection",
                    s,
                )?;
                let writers: i64 = conn.query_row(
                    "SELECT count(*) FROM attachments WHERE volume_id = ?1 AND mode = 'rw'",
                    [&key],
                    |r| r.get(0),
                )?;
                Ok((v, writers))
            })
            .await?;
        let nbd_url = &self.settings.nbd_url;
        let (host, port) = host_port(nbd_url).ok_or_else(|| {
            tracing::error!(nbd_url = %nbd_url, "the NBD URL is not nbd://host:port");
            ServiceError::Internal("the NBD address is unknown".into())
        })?;
        Ok(VolumeConnection {
            uri: format!("{nbd_url}/{}", v.id),
            host,
            port,
            export_name: v.id.clone(),
            // What the export does (src/nbd/exports.rs): read-only when flagged so, or when
            // it has attachments and none of them writes.
            read_only: v.readonly || (!v.attachments.is_empty() && writers == 0),
            volume_id: v.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_url_to_host_and_port() {
        assert_eq!(
            host_port("nbd://127.0.0.1:10809"),
            Some(("127.0.0.1".into(), 10809))
        );
        assert_eq!(host_port("nbd://[::1]:7"), Some(("::1".into(), 7)));
        assert_eq!(host_port("nbd://host"), None);
        assert_eq!(host_port("http://h:1"), None);
    }
}
