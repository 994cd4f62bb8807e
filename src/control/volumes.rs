//! The one volume model: volumes, servers and attachments, with their permission rules and
//! status transitions. Store objects are created empty (thin: nothing is allocated until
//! written) and deleted with the volume.
//!
//! Every check-then-change runs inside one catalog transaction on the catalog's single
//! connection, so two requests racing on one volume serialise: the second sees the first's
//! attachment and is refused, never both accepted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use admin_api::model::*;

mod attach_flow;
mod messages;
mod snapshots;
mod types;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::images::{Images, VolumeSource};
use super::{Settings, TxError, new_id, now, parse_ts, ts};
use crate::image::convert::Probe;
use crate::nbd::{Fence, fence::Ending};
use crate::{
    catalog::Catalog,
    store::{Store, StoreError},
};

const GIB: u64 = 1 << 30;
/// How long a detach waits for the volume's NBD connections to let go of the store.
const EXPORT_END_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Volumes {
    pub(crate) catalog: Catalog,
    pub(crate) store: Store,
    pub(crate) settings: Settings,
    /// Where the exports of volumes that lost their last attachment are ended: a detach
    /// answers only once the volume's NBD connections no longer reach the store.
    fence: Arc<Fence>,
    /// One `os-extend` at a time (see `extend_volume`).
    extending: tokio::sync::Mutex<()>,
}

type Tx<T> = Result<T, TxError>;

fn not_found(kind: &str, id: &str) -> ServiceError {
    ServiceError::NotFound(format!("{kind} {id} could not be found."))
}

fn need(caller: &Caller, role: Role, what: &str) -> ServiceResult<()> {
    if caller.has(role) {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(format!(
            "Policy doesn't allow {what} to be performed (needs the {} role).",
            role.as_str()
        )))
    }
}

/// What a volume records of the image it is made from (cinder's volume_glance_metadata):
/// the image's identity, formats, sizes and checksum, and its own properties (not the ones
/// the daemon computes), every value a string.
fn image_metadata_of(i: &admin_api::image::Image) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = i
        .properties
        .iter()
        .filter(|(k, _)| !super::images::is_computed_property(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    put("image_id", Some(i.id.clone()));
    put("image_name", i.name.clone());
    put("checksum", i.checksum.clone());
    put("container_format", i.container_format.clone());
    put("disk_format", i.disk_format.clone());
    put("min_disk", Some(i.min_disk.to_string()));
    put("min_ram", Some(i.min_ram.to_string()));
    put("size", i.size.map(|s| s.to_string()));
    m
}

/// Canonical form of a UUID the client sent, or None if it is not one (then nothing matches).
fn canonical(id: &str) -> Option<String> {
    Uuid::parse_str(id).ok().map(|u| u.to_string())
}

const VOLUME_COLUMNS: &str = "v.id, v.project_id, v.user_id, u.name, v.name, v.description, \
     v.size_bytes, v.status, v.volume_type, v.availability_zone, v.source_image_id, \
     v.source_volume_id, v.bootable, v.multiattach, v.visibility, v.tag, v.metadata, \
     v.created_at, v.updated_at, v.readonly, v.snapshot_id, v.image_metadata";

fn volume_row(row: &Row<'_>, multiattach_limit: u32) -> rusqlite::Result<Volume> {
    let status: String = row.get(7)?;
    let visibility: String = row.get(14)?;
    let metadata: String = row.get(16)?;
    let multiattach: bool = row.get(13)?;
    let size_bytes: i64 = row.get(6)?;
    Ok(Volume {
        id: row.get(0)?,
        project_id: row.get(1)?,
        user_id: row.get(2)?,
        owner: row.get(3)?,
        name: row.get(4)?,
        description: row.get(5)?,
        size_gib: u64::try_from(size_bytes).unwrap_or(0) / GIB,
        status: VolumeStatus::parse(&status).unwrap_or(VolumeStatus::Error),
        volume_type: row.get(8)?,
        availability_zone: row.get(9)?,
        snapshot_id: row.get(20)?,
        source_image_id: row.get(10)?,
        source_volume_id: row.get(11)?,
        bootable: row.get(12)?,
        multiattach,
        visibility: if visibility == "public" {
            Visibility::Public
        } else {
            Visibility::Private
        },
        tag: row.get(15)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        created_at: parse_ts(&row.get::<_, String>(17)?)?,
        updated_at: parse_ts(&row.get::<_, String>(18)?)?,
        attachments: Vec::new(),
        user_limit: if multiattach { multiattach_limit } else { 1 },
        readonly: row.get(19)?,
        image_metadata: row
            .get::<_, Option<String>>(21)?
            .and_then(|m| serde_json::from_str(&m).ok()),
    })
}

const ATTACHMENT_COLUMNS: &str =
    "a.id, a.volume_id, a.server_id, a.device, a.kind, a.attached_at, s.node, s.vm_id";

fn attachment_row(row: &Row<'_>, nbd_url: &str) -> rusqlite::Result<Attachment> {
    let volume_id: String = row.get(1)?;
    let kind: String = row.get(4)?;
    Ok(Attachment {
        id: row.get(0)?,
        nbd_uri: format!("{nbd_url}/{volume_id}"),
        volume_id,
        server_id: row.get(2)?,
        device: row.get(3)?,
        kind: if kind == "static" {
            AttachKind::Static
        } else {
            AttachKind::Hot
        },
        attached_at: parse_ts(&row.get::<_, String>(5)?)?,
        node: row.get(6)?,
        vm_id: row.get(7)?,
    })
}

const SERVER_COLUMNS: &str =
    "s.id, s.project_id, s.user_id, s.name, s.node, s.vm_id, s.status, s.metadata, s.created_at";

fn server_row(row: &Row<'_>) -> rusqlite::Result<Server> {
    let metadata: String = row.get(7)?;
    Ok(Server {
        id: row.get(0)?,
        project_id: row.get(1)?,
        user_id: row.get(2)?,
        name: row.get(3)?,
        node: row.get(4)?,
        vm_id: row.get(5)?,
        status: row.get(6)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        created_at: parse_ts(&row.get::<_, String>(8)?)?,
    })
}

/// Reads one volume (with its attachments) inside a transaction.
fn load_volume(conn: &Connection, id: &str, settings: &Settings) -> Tx<Option<Volume>> {
    let sql = format!(
        "SELECT {VOLUME_COLUMNS} FROM volumes v LEFT JOIN users u ON u.id = v.user_id \
         WHERE v.id = ?1"
    );
    let Some(mut v) = conn
        .query_row(&sql, [id], |r| volume_row(r, settings.multiattach_limit))
        .optional()?
    else {
        return Ok(None);
    };
    v.attachments = load_attachments(conn, "a.volume_id = ?1", id, settings)?;
    Ok(Some(v))
}

fn load_attachments(
    conn: &Connection,
    filter: &str,
    arg: &str,
    settings: &Settings,
) -> Tx<Vec<Attachment>> {
    let sql = format!(
        "SELECT {ATTACHMENT_COLUMNS} FROM attachments a JOIN servers s ON s.id = a.server_id \
         WHERE {filter} ORDER BY a.attached_at, a.id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([arg], |r| attachment_row(r, &settings.nbd_url))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn load_server(conn: &Connection, id: &str) -> Tx<Option<Server>> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers s WHERE s.id = ?1");
    Ok(conn.query_row(&sql, [id], server_row).optional()?)
}

fn set_status(conn: &Connection, id: &str, from: VolumeStatus, to: VolumeStatus) -> Tx<()> {
    if !from.can_become(to) {
        return Err(ServiceError::Conflict(format!(
            "Volume {id} cannot go from {} to {}.",
            from.as_str(),
            to.as_str()
        ))
        .into());
    }
    conn.execute(
        "UPDATE volumes SET status = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, to.as_str(), ts(now())],
    )?;
    Ok(())
}

/// Whether `caller` may see volume `v` under the family's rules.
/// cinder's `_check_volume_availability` for an upload to an image.
pub(crate) fn check_upload(v: &Volume, force: bool) -> ServiceResult<()> {
    match v.status {
        VolumeStatus::Available => Ok(()),
        VolumeStatus::InUse if force => Ok(()),
        VolumeStatus::InUse => Err(ServiceError::BadRequest(
            "Invalid volume: Volume status is in-use.".into(),
        )),
        _ => Err(ServiceError::BadRequest(
            "Invalid volume: Volume status must be available/in-use.".into(),
        )),
    }
}

fn may_see(caller: &Caller, v: &Volume, pdisk_rules: bool) -> bool {
    if caller.is_admin() {
        return true;
    }
    if pdisk_rules {
        v.user_id.as_deref() == Some(caller.user_id.as_str()) || v.visibility == Visibility::Public
    } else {
        v.project_id == caller.project_id
    }
}

/// Whether `caller` may change volume `v` (delete, attach, detach).
fn may_change(caller: &Caller, v: &Volume, pdisk_rules: bool) -> bool {
    if caller.is_admin() {
        return true;
    }
    if !caller.has(Role::Member) {
        return false;
    }
    if pdisk_rules {
        v.user_id.as_deref() == Some(caller.user_id.as_str())
    } else {
        v.project_id == caller.project_id
    }
}

/// [`Volumes::changeable`] inside a transaction: the volume (404 unless the caller may see
/// it), if the caller may change it (403 `Policy doesn't allow <action> ...` otherwise).
fn changeable_in(
    conn: &Connection,
    caller: &Caller,
    key: &str,
    shown: &str,
    action: &str,
    settings: &Settings,
) -> Tx<Volume> {
    let v = load_volume(conn, key, settings)?.ok_or_else(|| not_found("Volume", shown))?;
    if !may_see(caller, &v, false) {
        return Err(not_found("Volume", shown).into());
    }
    if !may_change(caller, &v, false) {
        return Err(ServiceError::Forbidden(format!(
            "Policy doesn't allow {action} to be performed."
        ))
        .into());
    }
    Ok(v)
}

/// The next free device name on a server, or None when the naming scheme is exhausted.
fn next_device(used: &[String], naming: DeviceNaming) -> Option<String> {
    let (prefix, first) = match naming {
        DeviceNaming::DevPath => ("/dev/vd", b'b'),
        DeviceNaming::PdiskTarget => ("vd", b'a'),
    };
    (first..=b'z')
        .map(|c| format!("{prefix}{}", c as char))
        .find(|d| !used.iter().any(|u| same_device(u, d)))
}

/// pdisk names a device `vdb`, Compute `/dev/vdb`: on one server they are the same disk.
fn same_device(a: &str, b: &str) -> bool {
    a.strip_prefix("/dev/").unwrap_or(a) == b.strip_prefix("/dev/").unwrap_or(b)
}

/// The server a target names, creating a pdisk VM's record on first use when `create`.
fn resolve_target(
    conn: &Connection,
    caller: &Caller,
    target: &AttachTarget,
    create: bool,
) -> Tx<Option<Server>> {
    match target {
        AttachTarget::Server(id) => {
            let Some(id) = canonical(id) else {
                return Ok(None);
            };
            let server = load_server(conn, &id)?;
            Ok(server.filter(|s| caller.is_admin() || s.project_id == caller.project_id))
        }
        AttachTarget::Vm { node, vm_id } => {
            let sql = format!(
                "SELECT {SERVER_COLUMNS} FROM servers s WHERE s.node = ?1 AND s.vm_id = ?2"
            );
            if let Some(s) = conn
                .query_row(&sql, params![node, vm_id], server_row)
                .optional()?
            {
                // A VM is a server of the project that registered it: another project's
                // members may neither attach to it, nor detach from it, nor list its disks.
                if !caller.is_admin() && s.project_id != caller.project_id {
                    return Err(ServiceError::Forbidden(format!(
                        "VM {node}/{vm_id} belongs to another project."
                    ))
                    .into());
                }
                return Ok(Some(s));
            }
            if !create {
                return Ok(None);
            }
            let id = new_id();
            conn.execute(
                "INSERT INTO servers (id, project_id, user_id, name, node, vm_id, status, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'ACTIVE', ?7)",
                params![
                    id,
                    caller.project_id,
                    caller.user_id,
                    format!("{node}/{vm_id}"),
                    node,
                    vm_id,
                    ts(now())
                ],
            )?;
            load_server(conn, &id)
        }
    }
}

/// Removes one attachment and moves the volume on: in-use -> detaching -> available (or
/// back to in-use while other attachments remain). True when it was the last one: the
/// volume's export ends once this commits (see `Volumes::tx_ending`).
fn remove_attachment(conn: &Connection, a: &Attachment) -> Tx<bool> {
    conn.execute("DELETE FROM attachments WHERE id = ?1", [&a.id])?;
    let status: String = conn.query_row(
        "SELECT status FROM volumes WHERE id = ?1",
        [&a.volume_id],
        |r| r.get(0),
    )?;
    let remaining: i64 = conn.query_row(
        "SELECT count(*) FROM attachments WHERE volume_id = ?1",
        [&a.volume_id],
        |r| r.get(0),
    )?;
    let from = VolumeStatus::parse(&status).unwrap_or(VolumeStatus::Error);
    // `detaching` too: Block Storage's os-begin_detaching leaves a volume there until the
    // detach (by either family) ends the attachment.
    if matches!(from, VolumeStatus::InUse | VolumeStatus::Detaching) {
        if from == VolumeStatus::InUse {
            set_status(conn, &a.volume_id, from, VolumeStatus::Detaching)?;
        }
        let to = if remaining == 0 {
            VolumeStatus::Available
        } else {
            VolumeStatus::InUse
        };
        set_status(conn, &a.volume_id, VolumeStatus::Detaching, to)?;
    }
    Ok(remaining == 0)
}

impl Volumes {
    pub fn new(catalog: Catalog, store: Store, settings: Settings) -> Volumes {
        Volumes {
            catalog,
            store,
            settings,
            fence: Fence::new(),
            extending: Default::default(),
        }
    }

    /// Where this service ends NBD exports (handed to the NBD server's export source).
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// [`tx`](Self::tx) for changes that may take volumes' last attachments: `f` also
    /// returns those volumes. Their exports end right after the commit, in the same catalog
    /// job (not before: a rolled-back detach must not cut connections; not later: a caller
    /// dropped meanwhile must not lose the end). Then this waits until their connections take
    /// no more requests and the ones they took are done with the store, for all of them at
    /// once under one bound, so that a store stuck in I/O cannot hang the API: past it the
    /// detach still answers, and says so in the log.
    async fn tx_ending<T, F>(&self, f: F) -> ServiceResult<T>
    where
        F: FnOnce(&Connection, &Settings) -> Tx<(T, Vec<String>)> + Send + 'static,
        T: Send + 'static,
    {
        let settings = self.settings.clone();
        let fence = self.fence.clone();
        let (out, endings) = super::immediate_then(
            &self.catalog,
            move |conn| f(conn, &settings),
            move |(out, ended): (T, Vec<String>)| {
                let endings: Vec<Ending> = ended.iter().map(|v| fence.end(v)).collect();
                (out, endings)
            },
        )
        .await?;
        let all = futures_util::future::join_all(endings.iter().map(Ending::wait));
        if tokio::time::timeout(EXPORT_END_WAIT, all).await.is_err() {
            for e in endings.iter().filter(|e| e.active() > 0) {
                tracing::warn!(
                    volume = %e.name(),
                    connections = e.active(),
                    "detached, but NBD connections still have requests in the store after {EXPORT_END_WAIT:?}"
                );
            }
        }
        Ok(out)
    }

    /// Runs `f` in one IMMEDIATE transaction (the write lock is taken before the first read,
    /// so check-then-change cannot interleave), committing only on success.
    async fn tx<T, F>(&self, f: F) -> ServiceResult<T>
    where
        F: FnOnce(&Connection, &Settings) -> Tx<T> + Send + 'static,
        T: Send + 'static,
    {
        let settings = self.settings.clone();
        super::immediate(&self.catalog, move |conn| f(conn, &settings)).await
    }

    pub async fn create_volume(&self, caller: &Caller, new: NewVolume) -> ServiceResult<Volume> {
        self.create_volume_with(caller, new, None).await
    }

    /// Creates a volume, from an image when `new.source_image_id` names one (`images` then
    /// says what it is filled from: a copy-on-write clone of raw content, instant whatever
    /// the size, or a conversion that runs after this returns, the volume `downloading`).
    pub async fn create_volume_with(
        &self,
        caller: &Caller,
        new: NewVolume,
        images: Option<&Arc<Images>>,
    ) -> ServiceResult<Volume> {
        need(caller, Role::Member, "volume:create")?;
        let mut new = new;
        // A snapshot or a volume to clone: its size is the least (and the default).
        let clone = match (&new.snapshot_id, &new.source_volume_id) {
            (Some(s), _) => Some(("Snapshot", self.clone_source(caller, "Snapshot", s).await?)),
            (None, Some(v)) => Some(("Volume", self.clone_source(caller, "Volume", v).await?)),
            (None, None) => None,
        };
        if let Some((kind, (_, bytes))) = clone {
            let least = bytes.div_ceil(GIB);
            if new.size_gib == 0 {
                new.size_gib = least;
            } else if new.size_gib < least {
                let what = if kind == "Snapshot" {
                    "snapshot"
                } else {
                    "original volume"
                };
                return Err(ServiceError::BadRequest(format!(
                    "Invalid input received: Volume size '{}'GB cannot be smaller than the {what} size {least}GB. They must be >= original {} size.",
                    new.size_gib,
                    if kind == "Snapshot" {
                        "snapshot"
                    } else {
                        "volume"
                    }
                )));
            }
        }
        if new.size_gib == 0 {
            return Err(ServiceError::BadRequest(
                "Volume size must be a positive number of GiB.".into(),
            ));
        }
        let size_bytes = new
            .size_gib
            .checked_mul(GIB)
            .filter(|b| i64::try_from(*b).is_ok())
            .ok_or_else(|| {
                ServiceError::BadRequest(format!("Volume size {} GiB is too large.", new.size_gib))
            })?;
        let mut image_metadata = None;
        let source = match (&new.source_image_id, images) {
            (Some(image), Some(images)) => {
                let source = images.volume_source(caller, image, size_bytes).await?;
                image_metadata = Some(image_metadata_of(
                    &admin_api::image::ImageService::get_image(&**images, caller, image).await?,
                ));
                Some(source)
            }
            (Some(image), None) => {
                return Err(ServiceError::NotFound(format!(
                    "Image {image} could not be found."
                )));
            }
            (None, _) => clone.map(|(_, (object, bytes))| VolumeSource::Clone {
                object,
                virtual_size: bytes,
            }),
        };
        let id = Uuid::new_v4();
        let id_s = id.to_string();
        let metadata = serde_json::to_string(&new.metadata).unwrap_or_else(|_| "{}".into());
        let image_metadata = image_metadata.and_then(|m| serde_json::to_string(&m).ok());
        {
            let caller = caller.clone();
            let id_s = id_s.clone();
            let image = new.source_image_id.clone();
            let (snapshot, source_volume) = (new.snapshot_id.clone(), new.source_volume_id.clone());
            self.tx(move |conn, _| {
                let t = ts(now());
                conn.execute(
                    "INSERT INTO volumes (id, project_id, user_id, name, description, size_bytes, \
                     status, object_id, volume_type, availability_zone, multiattach, visibility, \
                     tag, metadata, created_at, updated_at, source_image_id, bootable, \
                     snapshot_id, source_volume_id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'creating', ?1, ?7, ?8, ?9, ?10, ?11, ?12, \
                     ?13, ?13, ?14, ?15, ?16, ?17)",
                    params![
                        id_s,
                        caller.project_id,
                        caller.user_id,
                        new.name,
                        new.description,
                        size_bytes as i64,
                        new.volume_type,
                        new.availability_zone.unwrap_or_else(|| "nova".into()),
                        new.multiattach,
                        new.visibility.unwrap_or(Visibility::Private).as_str(),
                        new.tag,
                        metadata,
                        t,
                        image,
                        // Cinder marks volumes made from images bootable.
                        image.is_some(),
                        snapshot.map(|s| canonical(&s).unwrap_or(s)),
                        source_volume.map(|v| canonical(&v).unwrap_or(v)),
                    ],
                )?;
                // From an image, what it records of it; a clone carries its source's (and
                // is bootable if the source is), as cinder copies volume_glance_metadata.
                conn.execute(
                    "UPDATE volumes SET \
                       image_metadata = COALESCE(?2, \
                         (SELECT image_metadata FROM snapshots WHERE id = volumes.snapshot_id), \
                         (SELECT image_metadata FROM volumes s WHERE s.id = volumes.source_volume_id)), \
                       bootable = bootable \
                         OR COALESCE((SELECT v.bootable FROM snapshots s JOIN volumes v \
                                      ON v.id = s.volume_id WHERE s.id = volumes.snapshot_id), 0) \
                         OR COALESCE((SELECT s.bootable FROM volumes s \
                                      WHERE s.id = volumes.source_volume_id), 0) \
                     WHERE id = ?1",
                    params![id_s, image_metadata],
                )?;
                Ok(())
            })
            .await?;
        }
        let created = match source {
            // Creating the object allocates nothing: blocks are allocated when written.
            None | Some(VolumeSource::Convert { .. }) => {
                self.store.create_object(id, size_bytes).await
            }
            Some(VolumeSource::Clone { object, .. }) => {
                self.store.clone_object_grown(object, id, size_bytes).await
            }
        };
        // Refused before anything was kept (a size past the store's largest object, an image
        // deleted meanwhile): the record goes too, so that a refused call changes nothing.
        let refused = match &created {
            Err(StoreError::Invalid(msg)) => Some(ServiceError::BadRequest(msg.clone())),
            Err(StoreError::NotFound(_)) => Some(ServiceError::NotFound(
                match (&new.snapshot_id, &new.source_volume_id) {
                    (Some(s), _) => format!("Snapshot {s} could not be found."),
                    (None, Some(v)) => format!("Volume {v} could not be found."),
                    (None, None) => format!(
                        "Image {} could not be found.",
                        new.source_image_id.as_deref().unwrap_or_default()
                    ),
                },
            )),
            _ => None,
        };
        if let Some(err) = refused {
            let id_s = id_s.clone();
            self.tx(move |conn, _| {
                conn.execute("DELETE FROM volumes WHERE id = ?1", [&id_s])?;
                Ok(())
            })
            .await?;
            return Err(err);
        }
        let to = match (&created, source) {
            (Ok(()), Some(VolumeSource::Convert { .. })) => VolumeStatus::Downloading,
            (Ok(()), _) => VolumeStatus::Available,
            (Err(e), _) => {
                tracing::error!(volume = %id, error = %e, "creating the volume's store object");
                VolumeStatus::Error
            }
        };
        let v = {
            let id_s = id_s.clone();
            self.tx(move |conn, s| {
                set_status(conn, &id_s, VolumeStatus::Creating, to)?;
                load_volume(conn, &id_s, s)?
                    .ok_or_else(|| ServiceError::Internal("volume vanished".into()).into())
            })
            .await?
        };
        match created {
            Ok(()) => {
                if let (Some(VolumeSource::Convert { object, probe }), Some(images)) =
                    (source, images)
                {
                    self.fill_from_image(images, id, object, probe);
                }
                tracing::info!(volume = %id, size_gib = v.size_gib, project = %v.project_id,
                    image = ?new.source_image_id, "volume created");
                Ok(v)
            }
            Err(StoreError::NoSpace) => Err(ServiceError::OverLimit(
                "No space left in the store for this volume.".into(),
            )),
            Err(_) => Err(ServiceError::Internal(
                "could not create the volume in the store; see the daemon log".into(),
            )),
        }
    }

    /// Converts image data into a `downloading` volume in the background; the volume becomes
    /// `available`, or `error` if the conversion fails.
    fn fill_from_image(&self, images: &Arc<Images>, id: Uuid, object: Uuid, probe: Probe) {
        let catalog = self.catalog.clone();
        images.fill_volume(id, object, probe, move |r| async move {
            let to = match &r {
                Ok(()) => VolumeStatus::Available,
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "filling a volume from its image failed");
                    VolumeStatus::Error
                }
            };
            let id_s = id.to_string();
            let recorded = super::immediate(&catalog, move |conn| {
                set_status(conn, &id_s, VolumeStatus::Downloading, to)
            })
            .await;
            match recorded {
                Ok(()) if r.is_ok() => tracing::info!(volume = %id, "volume filled from its image"),
                Ok(()) => {}
                Err(e) => tracing::error!(volume = %id, error = %e, "recording a volume fill"),
            }
        });
    }

    /// Volumes a restart caught `downloading`: filled again from the start (the object is
    /// emptied first), or `error` when their image can no longer be converted.
    pub async fn recover(&self, images: &Arc<Images>) -> ServiceResult<()> {
        let cut: Vec<(String, Option<String>, u64)> = self
            .tx(|conn, _| {
                Ok(conn
                    .prepare(
                        "SELECT id, source_image_id, size_bytes FROM volumes \
                         WHERE status = 'downloading'",
                    )?
                    .query_map([], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                    })?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .await?;
        for (id, image, size) in cut {
            let Ok(uuid) = Uuid::parse_str(&id) else {
                continue;
            };
            let again = match image {
                Some(image) => {
                    let emptied = async {
                        self.store.resize(uuid, 0).await?;
                        self.store.resize(uuid, size).await
                    };
                    match (images.source_for_recovery(&image).await, emptied.await) {
                        (Some(VolumeSource::Convert { object, probe }), Ok(())) => {
                            Some((object, probe))
                        }
                        _ => None,
                    }
                }
                None => None,
            };
            match again {
                Some((object, probe)) => {
                    tracing::info!(volume = %id, "filling a volume from its image again after a restart");
                    self.fill_from_image(images, uuid, object, probe);
                }
                None => {
                    tracing::warn!(volume = %id, "a volume fill cut by a restart cannot start again; the volume is in error");
                    self.tx(move |conn, _| {
                        set_status(conn, &id, VolumeStatus::Downloading, VolumeStatus::Error)
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    pub async fn list_volumes(
        &self,
        caller: &Caller,
        scope: VolumeScope,
    ) -> ServiceResult<Vec<Volume>> {
        let (filter, arg): (&str, String) = match scope {
            VolumeScope::Project => ("v.project_id = ?1", caller.project_id.clone()),
            VolumeScope::AllProjects => {
                need(caller, Role::Admin, "volume:get_all_tenants")?;
                ("?1 = ?1", String::new())
            }
            VolumeScope::PdiskVisible if caller.is_admin() => ("?1 = ?1", String::new()),
            VolumeScope::PdiskVisible => (
                "(v.user_id = ?1 OR v.visibility = 'public')",
                caller.user_id.clone(),
            ),
        };
        self.tx(move |conn, s| {
            let sql = format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes v LEFT JOIN users u ON u.id = v.user_id \
                 WHERE {filter} ORDER BY v.created_at, v.id"
            );
            let mut stmt = conn.prepare(&sql)?;
            let mut vols = stmt
                .query_map([&arg], |r| volume_row(r, s.multiattach_limit))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let asql = format!(
                "SELECT {ATTACHMENT_COLUMNS} FROM attachments a JOIN servers s ON s.id = a.server_id \
                 ORDER BY a.attached_at, a.id"
            );
            let mut by_volume: HashMap<String, Vec<Attachment>> = HashMap::new();
            let mut astmt = conn.prepare(&asql)?;
            for a in astmt.query_map([], |r| attachment_row(r, &s.nbd_url))? {
                let a = a?;
                by_volume.entry(a.volume_id.clone()).or_default().push(a);
            }
            for v in &mut vols {
                v.attachments = by_volume.remove(&v.id).unwrap_or_default();
            }
            Ok(vols)
        })
        .await
    }

    pub async fn get_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<Volume> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        self.tx(move |conn, s| {
            let v = load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &shown))?;
            if may_see(&caller, &v, pdisk_rules) {
                Ok(v)
            } else if pdisk_rules {
                Err(ServiceError::Forbidden("Not enough rights to see this volume.".into()).into())
            } else {
                Err(not_found("Volume", &shown).into())
            }
        })
        .await
    }

    pub async fn update_volume(
        &self,
        caller: &Caller,
        id: &str,
        update: VolumeUpdate,
    ) -> ServiceResult<Volume> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        self.tx(move |conn, s| {
            let v = load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &shown))?;
            if !may_see(&caller, &v, false) {
                return Err(not_found("Volume", &shown).into());
            }
            if !may_change(&caller, &v, false) {
                return Err(ServiceError::Forbidden(
                    "Policy doesn't allow volume:update to be performed.".into(),
                )
                .into());
            }
            let name = update.name.unwrap_or(v.name);
            let description = update.description.unwrap_or(v.description);
            let mut metadata = update.metadata.unwrap_or(v.metadata);
            metadata.extend(update.merge_metadata);
            if let Some(k) = update.delete_metadata_key
                && metadata.remove(&k).is_none()
            {
                return Err(
                    ServiceError::NotFound(format!("Metadata item was not found: {k}")).into(),
                );
            }
            let metadata = serde_json::to_string(&metadata).unwrap_or_else(|_| "{}".into());
            conn.execute(
                "UPDATE volumes SET name = ?2, description = ?3, metadata = ?4, updated_at = ?5 \
                 WHERE id = ?1",
                params![key, name, description, metadata, ts(now())],
            )?;
            load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &shown).into())
        })
        .await
    }

    /// Grows a volume (Block Storage `os-extend`), attached or not: the store object grows
    /// first (metadata only), then the record; NBD clients see the new size when they
    /// reconnect. Extends of one daemon run one at a time, so the object and the record
    /// always end at the same size.
    pub async fn extend_volume(
        &self,
        caller: &Caller,
        id: &str,
        new_size_gib: u64,
    ) -> ServiceResult<()> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let _one = self.extending.lock().await;
        let v = self.changeable(caller, &key, id, "volume:extend").await?;
        if !matches!(v.status, VolumeStatus::Available | VolumeStatus::InUse) {
            return Err(ServiceError::BadRequest(format!(
                "Invalid volume: Volume {id} status must be available or in-use to extend, but current status is: {}.",
                v.status.as_str()
            )));
        }
        if new_size_gib <= v.size_gib {
            return Err(ServiceError::BadRequest(format!(
                "Invalid input received: New size for extend must be greater than current size. (current: {}, extended: {}).",
                v.size_gib, new_size_gib
            )));
        }
        let bytes = new_size_gib
            .checked_mul(GIB)
            .filter(|b| i64::try_from(*b).is_ok())
            .ok_or_else(|| {
                ServiceError::BadRequest(format!("Volume size {new_size_gib} GiB is too large."))
            })?;
        let object = Uuid::parse_str(&key).map_err(|_| not_found("Volume", id))?;
        match self.store.resize(object, bytes).await {
            Ok(()) => {}
            Err(StoreError::NoSpace) => {
                return Err(ServiceError::OverLimit(
                    "Requested volume size exceeds the store's free space.".into(),
                ));
            }
            Err(StoreError::Invalid(m)) => return Err(ServiceError::BadRequest(m)),
            Err(StoreError::NotFound(_)) => return Err(not_found("Volume", id)),
            Err(e) => return Err(ServiceError::Internal(format!("growing the volume: {e}"))),
        }
        self.tx(move |conn, _| {
            conn.execute(
                "UPDATE volumes SET size_bytes = ?2, updated_at = ?3 WHERE id = ?1",
                params![key, bytes as i64, ts(now())],
            )?;
            Ok(())
        })
        .await?;
        tracing::info!(volume = %id, size_gib = new_size_gib, "volume extended");
        Ok(())
    }

    /// Starts an upload to an image: checks the volume's status (in-use needs `force`), takes
    /// a point-in-time copy-on-write clone of its data (returned: stream that, not the live
    /// volume) and makes the volume `uploading`. Returns the volume as it was and the clone.
    /// `request_id`: the API request's, kept for the message if the upload fails (see
    /// [`record_upload_failure`](Self::record_upload_failure)).
    pub async fn begin_upload(
        &self,
        caller: &Caller,
        id: &str,
        force: bool,
        request_id: Option<&str>,
    ) -> ServiceResult<(Volume, Uuid)> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let v = self
            .changeable(
                caller,
                &key,
                id,
                "volume_extension:volume_actions:upload_image",
            )
            .await?;
        check_upload(&v, force)?;
        let object = Uuid::parse_str(&key).map_err(|_| not_found("Volume", id))?;
        let copy = Uuid::new_v4();
        match self.store.clone_object(object, copy).await {
            Ok(()) => {}
            Err(StoreError::NoSpace) => {
                return Err(ServiceError::OverLimit(
                    "No space left in the store for the upload's copy.".into(),
                ));
            }
            Err(e) => return Err(ServiceError::Internal(format!("copying the volume: {e}"))),
        }
        let k = key.clone();
        let request_id = request_id.map(str::to_owned);
        let set = self
            .tx(move |conn, s| {
                let now_v = load_volume(conn, &k, s)?.ok_or_else(|| not_found("Volume", &k))?;
                check_upload(&now_v, force)?;
                set_status(conn, &k, now_v.status, VolumeStatus::Uploading)?;
                conn.execute(
                    "UPDATE volumes SET upload_copy = ?2, upload_image = NULL, \
                     upload_request_id = ?3 WHERE id = ?1",
                    params![k, copy.to_string(), request_id],
                )?;
                Ok(now_v)
            })
            .await;
        match set {
            Ok(v) => Ok((v, copy)),
            Err(e) => {
                let _ = self.store.delete_object(copy).await;
                Err(e)
            }
        }
    }

    /// The project a volume belongs to.
    pub async fn project_of(&self, id: &str) -> Option<String> {
        let key = id.to_owned();
        self.tx(move |conn, _| {
            Ok(conn
                .query_row(
                    "SELECT project_id FROM volumes WHERE id = ?1",
                    [&key],
                    |r| r.get::<_, String>(0),
                )
                .optional()?)
        })
        .await
        .ok()
        .flatten()
    }

    /// Records the image an upload fills (so that a restart resumes it).
    pub async fn set_upload_image(&self, id: &str, image: &str) -> ServiceResult<()> {
        let (key, image) = (id.to_owned(), image.to_owned());
        self.tx(move |conn, _| {
            conn.execute(
                "UPDATE volumes SET upload_image = ?2 WHERE id = ?1",
                params![key, image],
            )?;
            Ok(())
        })
        .await
    }

    /// Uploads a restart cut: (volume id, copy object, image id or None).
    pub async fn cut_uploads(&self) -> ServiceResult<Vec<(String, Uuid, Option<String>)>> {
        let rows: Vec<(String, Option<String>, Option<String>)> = self
            .tx(|conn, _| {
                Ok(conn
                    .prepare(
                        "SELECT id, upload_copy, upload_image FROM volumes \
                         WHERE status = 'uploading'",
                    )?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .await?;
        let mut out = Vec::new();
        for (id, copy, image) in rows {
            match copy.as_deref().and_then(|c| Uuid::parse_str(c).ok()) {
                Some(copy) => out.push((id, copy, image)),
                // Nothing to resume from: the volume just goes back.
                None => self.end_upload(&id, Uuid::nil()).await,
            }
        }
        Ok(out)
    }

    /// Ends an upload: the copy goes, and the volume is `in-use` again if it is attached,
    /// `available` otherwise.
    pub async fn end_upload(&self, id: &str, copy: Uuid) {
        if let Err(e) = self.store.delete_object(copy).await
            && !copy.is_nil()
        {
            tracing::warn!(volume = %id, error = %e, "deleting an upload's copy");
        }
        let key = id.to_owned();
        let r = self
            .tx(move |conn, s| {
                let v = load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &key))?;
                let to = if v.attachments.is_empty() {
                    VolumeStatus::Available
                } else {
                    VolumeStatus::InUse
                };
                if v.status == VolumeStatus::Uploading {
                    set_status(conn, &key, VolumeStatus::Uploading, to)?;
                }
                conn.execute(
                    "UPDATE volumes SET upload_copy = NULL, upload_image = NULL, \
                     upload_request_id = NULL WHERE id = ?1",
                    [&key],
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(volume = %id, error = %e, "ending an upload");
        }
    }

    /// Sets Block Storage's `bootable` and `readonly` flags.
    pub async fn set_volume_flags(
        &self,
        caller: &Caller,
        id: &str,
        flags: VolumeFlags,
    ) -> ServiceResult<()> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let v = self
            .changeable(caller, &key, id, "volume:update_readonly_flag")
            .await?;
        let bootable = flags.bootable.unwrap_or(v.bootable);
        let readonly = flags.readonly.unwrap_or(v.readonly);
        self.tx(move |conn, _| {
            conn.execute(
                "UPDATE volumes SET bootable = ?2, readonly = ?3, updated_at = ?4 WHERE id = ?1",
                params![key, bootable, readonly, ts(now())],
            )?;
            Ok(())
        })
        .await
    }

    /// Sets a volume's status whatever it was (Block Storage `os-reset_status`, admins only):
    /// the operator's way out of a status nothing else leaves.
    pub async fn reset_volume_status(
        &self,
        caller: &Caller,
        id: &str,
        status: VolumeStatus,
    ) -> ServiceResult<()> {
        need(
            caller,
            Role::Admin,
            "volume_extension:volume_admin_actions:reset_status",
        )?;
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let shown = id.to_owned();
        self.tx(move |conn, s| {
            load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &shown))?;
            conn.execute(
                "UPDATE volumes SET status = ?2, updated_at = ?3 WHERE id = ?1",
                params![key, status.as_str(), ts(now())],
            )?;
            Ok(())
        })
        .await?;
        tracing::warn!(volume = %id, status = status.as_str(), "volume status reset by an admin");
        Ok(())
    }

    /// The volume, if the caller may see it and change it (member of its project, or admin).
    async fn changeable(
        &self,
        caller: &Caller,
        key: &str,
        shown: &str,
        action: &str,
    ) -> ServiceResult<Volume> {
        let caller = caller.clone();
        let (key, shown, action) = (key.to_owned(), shown.to_owned(), action.to_owned());
        self.tx(move |conn, s| changeable_in(conn, &caller, &key, &shown, &action, s))
            .await
    }

    pub async fn delete_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<()> {
        let Some(key) = canonical(id) else {
            return Err(not_found("Volume", id));
        };
        let caller = caller.clone();
        let shown = id.to_owned();
        let key2 = key.clone();
        self.tx(move |conn, s| {
            let v = load_volume(conn, &key2, s)?.ok_or_else(|| not_found("Volume", &shown))?;
            if !may_see(&caller, &v, pdisk_rules) {
                return Err(if pdisk_rules {
                    ServiceError::Forbidden("Not enough rights to delete this volume.".into())
                } else {
                    not_found("Volume", &shown)
                }
                .into());
            }
            if !may_change(&caller, &v, pdisk_rules) {
                return Err(ServiceError::Forbidden(
                    "Not enough rights to delete this volume.".into(),
                )
                .into());
            }
            if !v.attachments.is_empty() {
                return Err(ServiceError::Conflict(format!(
                    "Volume {shown} is in use ({} attachment(s)); detach it first.",
                    v.attachments.len()
                ))
                .into());
            }
            let snapshots: i64 = conn.query_row(
                "SELECT count(*) FROM snapshots WHERE volume_id = ?1",
                [&key2],
                |r| r.get(0),
            )?;
            if snapshots > 0 {
                return Err(ServiceError::Conflict(format!(
                    "Volume {shown} has {snapshots} snapshot(s); delete them first."
                ))
                .into());
            }
            if !v.status.can_become(VolumeStatus::Deleting) {
                return Err(ServiceError::Conflict(format!(
                    "Volume {shown} is {}; it can be deleted when available or in error.",
                    v.status.as_str()
                ))
                .into());
            }
            set_status(conn, &key2, v.status, VolumeStatus::Deleting)?;
            Ok(())
        })
        .await?;
        let object = Uuid::parse_str(&key).map_err(|_| not_found("Volume", id))?;
        match self.store.delete_object(object).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(volume = %key, error = %e, "deleting the volume's store object");
                let k = key.clone();
                self.tx(move |conn, _| {
                    set_status(conn, &k, VolumeStatus::Deleting, VolumeStatus::Error)
                })
                .await?;
                return Err(ServiceError::Internal(
                    "could not delete the volume's data; it is now in error".into(),
                ));
            }
        }
        self.tx(move |conn, _| {
            conn.execute("DELETE FROM volumes WHERE id = ?1", [&key])?;
            Ok(())
        })
        .await?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    pub async fn create_server(&self, caller: &Caller, new: NewServer) -> ServiceResult<Server> {
        need(caller, Role::Member, "server:create")?;
        let caller = caller.clone();
        let metadata = serde_json::to_string(&new.metadata).unwrap_or_else(|_| "{}".into());
        self.tx(move |conn, _| {
            let id = new_id();
            conn.execute(
                "INSERT INTO servers (id, project_id, user_id, name, status, metadata, created_at) \
                 VALUES (?1, ?2, ?3, ?4, 'ACTIVE', ?5, ?6)",
                params![
                    id,
                    caller.project_id,
                    caller.user_id,
                    new.name,
                    metadata,
                    ts(now())
                ],
            )?;
            load_server(conn, &id)?
                .ok_or_else(|| ServiceError::Internal("server vanished".into()).into())
        })
        .await
    }

    pub async fn list_servers(&self, caller: &Caller) -> ServiceResult<Vec<Server>> {
        let project = caller.project_id.clone();
        self.tx(move |conn, _| {
            let sql = format!(
                "SELECT {SERVER_COLUMNS} FROM servers s WHERE s.project_id = ?1 \
                 ORDER BY s.created_at, s.id"
            );
            let mut stmt = conn.prepare(&sql)?;
            Ok(stmt
                .query_map([project], server_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    pub async fn get_server(&self, caller: &Caller, id: &str) -> ServiceResult<Server> {
        let caller = caller.clone();
        let id = id.to_owned();
        self.tx(move |conn, _| {
            resolve_target(conn, &caller, &AttachTarget::Server(id.clone()), false)?
                .ok_or_else(|| not_found("Server", &id).into())
        })
        .await
    }

    pub async fn delete_server(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        need(caller, Role::Member, "server:delete")?;
        let caller = caller.clone();
        let id = id.to_owned();
        self.tx_ending(move |conn, s| {
            let server = resolve_target(conn, &caller, &AttachTarget::Server(id.clone()), false)?
                .ok_or_else(|| not_found("Server", &id))?;
            let mut ended = Vec::new();
            for a in load_attachments(conn, "a.server_id = ?1", &server.id, s)? {
                if remove_attachment(conn, &a)? {
                    ended.push(a.volume_id);
                }
            }
            conn.execute("DELETE FROM servers WHERE id = ?1", [&server.id])?;
            Ok(((), ended))
        })
        .await
    }

    pub async fn attach(&self, caller: &Caller, req: AttachRequest) -> ServiceResult<Attachment> {
        let caller = caller.clone();
        let pdisk_rules = matches!(req.target, AttachTarget::Vm { .. });
        let result = self
            .tx(move |conn, s| {
                let shown = req.volume_id.clone();
                let key = canonical(&req.volume_id).ok_or_else(|| not_found("Volume", &shown))?;
                let v = load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &shown))?;
                if !may_see(&caller, &v, pdisk_rules) {
                    return Err(if pdisk_rules {
                        ServiceError::Forbidden("Not enough rights to attach this volume.".into())
                    } else {
                        not_found("Volume", &shown)
                    }
                    .into());
                }
                // pdisk lets anyone who sees a disk (public ones too) attach it; Compute needs
                // member on the volume's project.
                let allowed = caller.is_admin()
                    || (caller.has(Role::Member)
                        && (pdisk_rules || v.project_id == caller.project_id));
                if !allowed {
                    return Err(ServiceError::Forbidden(
                        "Not enough rights to attach this volume.".into(),
                    )
                    .into());
                }
                let server = resolve_target(conn, &caller, &req.target, true)?.ok_or_else(|| {
                    match &req.target {
                        AttachTarget::Server(id) => not_found("Server", id),
                        AttachTarget::Vm { node, vm_id } => not_found("VM", &format!("{node}/{vm_id}")),
                    }
                })?;
                if v.attachments.iter().any(|a| a.server_id == server.id) {
                    return Err(ServiceError::Conflict(format!(
                        "Volume {shown} is already attached to server {}.",
                        server.id
                    ))
                    .into());
                }
                if v.attachments.len() as u64 >= u64::from(v.user_limit) {
                    return Err(ServiceError::Conflict(if v.multiattach {
                        format!(
                            "Volume {shown} has no free attachment slot: it is attached {} time(s), its limit is {}.",
                            v.attachments.len(),
                            v.user_limit
                        )
                    } else {
                        format!("Volume {shown} is in use and is not a multi-attach volume.")
                    })
                    .into());
                }
                if !v.status.can_become(VolumeStatus::Attaching) {
                    return Err(ServiceError::BadRequest(format!(
                        "Invalid volume: volume {shown} is {}; it must be available to attach.",
                        v.status.as_str()
                    ))
                    .into());
                }
                let used: Vec<String> =
                    load_attachments(conn, "a.server_id = ?1", &server.id, s)?
                        .into_iter()
                        .filter_map(|a| a.device)
                        .collect();
                let device = match (&req.device, req.kind) {
                    (Some(d), _) => {
                        // A Compute server boots from /dev/vda (nova's libvirt naming): it is
                        // never free.
                        let root = matches!(req.naming, DeviceNaming::DevPath)
                            && same_device(d, "vda");
                        if root || used.iter().any(|u| same_device(u, d)) {
                            return Err(ServiceError::Conflict(match req.naming {
                                // nova's DevicePathInUse.
                                DeviceNaming::DevPath => {
                                    format!("The supplied device path ({d}) is in use.")
                                }
                                DeviceNaming::PdiskTarget => format!(
                                    "Device {d} is already in use on server {}.",
                                    server.id
                                ),
                            })
                            .into());
                        }
                        Some(d.clone())
                    }
                    (None, AttachKind::Static) => None,
                    (None, AttachKind::Hot) => Some(next_device(&used, req.naming).ok_or_else(|| {
                        ServiceError::OverLimit(match req.naming {
                            DeviceNaming::PdiskTarget => {
                                "Target limit reached. Restart instance to attach new disk".into()
                            }
                            DeviceNaming::DevPath => format!(
                                "Server {} has no free device name left (vdb..vdz are taken).",
                                server.id
                            ),
                        })
                    })?),
                };
                set_status(conn, &key, v.status, VolumeStatus::Attaching)?;
                let id = new_id();
                conn.execute(
                    "INSERT INTO attachments (id, volume_id, server_id, device, kind, attached_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![id, key, server.id, device, req.kind.as_str(), ts(now())],
                )?;
                // The export is served from the attachment on (NBD reads the catalog).
                set_status(conn, &key, VolumeStatus::Attaching, VolumeStatus::InUse)?;
                let a = load_attachments(conn, "a.id = ?1", &id, s)?
                    .pop()
                    .ok_or_else(|| ServiceError::Internal("attachment vanished".into()))?;
                Ok(a)
            })
            .await?;
        tracing::info!(volume = %result.volume_id, server = %result.server_id, device = ?result.device, "volume attached");
        Ok(result)
    }

    pub async fn detach(
        &self,
        caller: &Caller,
        target: AttachTarget,
        volume_id: &str,
        hot_only: bool,
    ) -> ServiceResult<Attachment> {
        let caller = caller.clone();
        let shown = volume_id.to_owned();
        let pdisk_rules = matches!(target, AttachTarget::Vm { .. });
        let a = self
            .tx_ending(move |conn, s| {
                let key = canonical(&shown).ok_or_else(|| not_found("Volume", &shown))?;
                let v = load_volume(conn, &key, s)?.ok_or_else(|| not_found("Volume", &shown))?;
                if !may_see(&caller, &v, pdisk_rules) {
                    return Err(if pdisk_rules {
                        ServiceError::Forbidden("Not enough rights to detach this volume.".into())
                    } else {
                        not_found("Volume", &shown)
                    }
                    .into());
                }
                if !(caller.is_admin() || caller.has(Role::Member)) {
                    return Err(ServiceError::Forbidden(
                        "Not enough rights to detach this volume.".into(),
                    )
                    .into());
                }
                let server = resolve_target(conn, &caller, &target, false)?;
                let a = server
                    .and_then(|srv| {
                        v.attachments
                            .iter()
                            .find(|a| a.server_id == srv.id)
                            .cloned()
                    })
                    .ok_or_else(|| {
                        ServiceError::NotFound(format!(
                            "Volume {shown} is not attached to that server."
                        ))
                    })?;
                if hot_only && a.kind == AttachKind::Static {
                    return Err(
                        ServiceError::BadRequest("Disk have not been hot-plugged".into()).into(),
                    );
                }
                let ended = match remove_attachment(conn, &a)? {
                    true => vec![a.volume_id.clone()],
                    false => Vec::new(),
                };
                Ok((a, ended))
            })
            .await?;
        tracing::info!(volume = %a.volume_id, server = %a.server_id, "volume detached");
        Ok(a)
    }

    pub async fn detach_all(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        need(caller, Role::Member, "volume:detach")?;
        let caller = caller.clone();
        self.tx_ending(move |conn, s| {
            let Some(server) = resolve_target(conn, &caller, &target, false)? else {
                return Ok((Vec::new(), Vec::new()));
            };
            let all = load_attachments(conn, "a.server_id = ?1", &server.id, s)?;
            let mut ended = Vec::new();
            for a in &all {
                if remove_attachment(conn, a)? {
                    ended.push(a.volume_id.clone());
                }
            }
            Ok((all, ended))
        })
        .await
    }

    pub async fn list_attachments(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        let caller = caller.clone();
        self.tx(move |conn, s| {
            let server = resolve_target(conn, &caller, &target, false)?;
            match (server, &target) {
                (Some(srv), _) => load_attachments(conn, "a.server_id = ?1", &srv.id, s),
                (None, AttachTarget::Vm { .. }) => Ok(Vec::new()),
                (None, AttachTarget::Server(id)) => Err(not_found("Server", id).into()),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(
            next_device(&[], DeviceNaming::DevPath).as_deref(),
            Some("/dev/vdb")
        );
        assert_eq!(
            next_device(&[], DeviceNaming::PdiskTarget).as_deref(),
            Some("vda")
        );
        let used = vec!["vda".to_owned(), "vdc".to_owned()];
        assert_eq!(
            next_device(&used, DeviceNaming::PdiskTarget).as_deref(),
            Some("vdb")
        );
        let all: Vec<String> = (b'a'..=b'z').map(|c| format!("vd{}", c as char)).collect();
        assert_eq!(next_device(&all, DeviceNaming::PdiskTarget), None);
        // Either family's spelling of a device takes it for both.
        let mixed = vec!["vdb".to_owned(), "/dev/vda".to_owned()];
        assert_eq!(
            next_device(&mixed, DeviceNaming::DevPath).as_deref(),
            Some("/dev/vdc")
        );
        assert_eq!(
            next_device(&mixed, DeviceNaming::PdiskTarget).as_deref(),
            Some("vdc")
        );
        assert!(same_device("/dev/vda", "vda") && !same_device("vda", "vdb"));
    }
}
