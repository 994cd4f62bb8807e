//! Images: Glance's records and rules over the catalog, their data in store objects.
//!
//! Data arrives as a stream and goes straight into a store object (holes stay holes), hashed
//! on the way (md5 and sha512), with at most one buffer of [`PIECE`] bytes per upload in
//! memory; it leaves the same way. The object is recorded in the catalog before it is
//! created, so an upload cut by a crash leaves a record the next start finds: its object is
//! deleted and the image is queued again ([`Images::recover`]).
//!
//! Visibility follows Glance: an admin sees everything; others see public and community
//! images, their project's own, and shared images their project is a member of.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use admin_api::image::{
    ByteStream, Image, ImageData, ImageEdit, ImageScope, ImageService, Member, NewImage,
    UploadKind, VisibilityFilter,
};
use admin_api::model::{Caller, Role, ServiceError, ServiceResult};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use md5::Digest;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::{Settings, TxError, now, parse_ts, ts};
use crate::catalog::Catalog;
use crate::image::ObjectReader;
use crate::image::convert::{ConvertError, Converter, Probe};
use crate::image::inspect::{self, Format};
use crate::store::{Store, StoreError};

/// Bytes gathered before a write to the store (and the most an upload holds in memory,
/// besides what the HTTP layer buffers).
pub const PIECE: usize = 1 << 20;
/// `image_member_quota`
const MEMBER_QUOTA: usize = 128;
/// What `store` says of where the data is (StarlingX: the store's URL scheme).
const STORE_NAME: &str = "cairn";

type Tx<T> = Result<T, TxError>;

/// Where a volume made from an image gets its content.
#[derive(Debug, Clone, Copy)]
pub enum VolumeSource {
    /// Raw content (a raw cache, a raw image): the volume is a copy-on-write clone of it.
    Clone { object: Uuid, virtual_size: u64 },
    /// The image's data is converted into the volume.
    Convert { object: Uuid, probe: Probe },
}

impl VolumeSource {
    pub fn virtual_size(&self) -> u64 {
        match self {
            VolumeSource::Clone { virtual_size, .. } => *virtual_size,
            VolumeSource::Convert { probe, .. } => probe.virtual_size,
        }
    }
}

/// The image rules, over the catalog and the store.
pub struct Images {
    catalog: Catalog,
    store: Store,
    settings: Settings,
    /// Raw-cache jobs are queued here once an image with `cache_raw` becomes active.
    cache_wanted: tokio::sync::mpsc::UnboundedSender<String>,
    cache_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Progress of running conversions (percent), shown as `cache_raw_progress`.
    pub(crate) progress: Arc<parking_lot::Mutex<BTreeMap<String, u8>>>,
    converter: Arc<Converter>,
    /// Running jobs (raw caches by image id, volume fills by volume id), so that deleting
    /// an image cancels its conversion and a shutdown stops them before the NBD server.
    jobs: parking_lot::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// For work that outlives a request (imports run after their 202).
    me: std::sync::Weak<Images>,
}

/// An image row with what only the daemon sees.
#[derive(Debug, Clone)]
struct Stored {
    image: Image,
    data_object: Option<String>,
    #[allow(dead_code)] // read by the raw-cache job (next)
    detected_format: Option<String>,
    raw_object: Option<String>,
    cache_status: Option<String>,
    cache_error: Option<String>,
    cache_size: Option<u64>,
}

const COLUMNS: &str = "id, owner, name, status, visibility, protected, os_hidden, disk_format, \
     container_format, size_bytes, virtual_size, checksum, os_hash_algo, os_hash_value, min_ram, \
     min_disk, data_object_id, detected_format, raw_object_id, cache_status, cache_error, \
     cache_size, properties, tags, created_at, updated_at";

fn u64_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
}

fn stored_row(row: &Row<'_>) -> rusqlite::Result<Stored> {
    let properties: String = row.get(22)?;
    let tags: String = row.get(23)?;
    Ok(Stored {
        image: Image {
            id: row.get(0)?,
            owner: row.get(1)?,
            name: row.get(2)?,
            status: row.get(3)?,
            visibility: row.get(4)?,
            protected: row.get(5)?,
            os_hidden: row.get(6)?,
            disk_format: row.get(7)?,
            container_format: row.get(8)?,
            size: u64_col(row, 9)?,
            virtual_size: u64_col(row, 10)?,
            checksum: row.get(11)?,
            os_hash_algo: row.get(12)?,
            os_hash_value: row.get(13)?,
            min_ram: u64_col(row, 14)?.unwrap_or(0),
            min_disk: u64_col(row, 15)?.unwrap_or(0),
            properties: serde_json::from_str(&properties).unwrap_or_default(),
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            created_at: parse_ts(&row.get::<_, String>(24)?)?,
            updated_at: parse_ts(&row.get::<_, String>(25)?)?,
            direct_url: None,
        },
        data_object: row.get(16)?,
        detected_format: row.get(17)?,
        raw_object: row.get(18)?,
        cache_status: row.get(19)?,
        cache_error: row.get(20)?,
        cache_size: u64_col(row, 21)?,
    })
}

fn load(conn: &Connection, id: &str) -> Tx<Option<Stored>> {
    let sql = format!("SELECT {COLUMNS} FROM images WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], stored_row)
        .optional()?)
}

/// Keys the daemon shows as properties; clients cannot set them (see the API's read-only
/// list), and they are never stored among the client's.
const COMPUTED: [&str; 6] = [
    "store",
    "cache_raw_status",
    "cache_raw_size",
    "cache_raw_url",
    "cache_raw_error",
    "cache_raw_progress",
];

/// Whether `key` is one of the properties the daemon computes (not the image's own).
pub(crate) fn is_computed_property(key: &str) -> bool {
    COMPUTED.contains(&key)
}

fn member_status(conn: &Connection, image: &str, project: &str) -> Tx<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT status FROM image_members WHERE image_id = ?1 AND member_id = ?2")?
        .query_row([image, project], |r| r.get(0))
        .optional()?)
}

/// Glance's `is_image_visible`.
fn visible(conn: &Connection, caller: &Caller, i: &Image) -> Tx<bool> {
    Ok(caller.is_admin()
        || i.owner.is_none()
        || matches!(i.visibility.as_str(), "public" | "community")
        || i.owner.as_deref() == Some(caller.project_id.as_str())
        || (i.visibility == "shared" && member_status(conn, &i.id, &caller.project_id)?.is_some()))
}

/// The owner's project (with the member role) or an admin may change an image.
fn may_modify(caller: &Caller, i: &Image) -> bool {
    caller.is_admin()
        || (caller.has(Role::Member) && i.owner.as_deref() == Some(caller.project_id.as_str()))
}

fn no_image(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("No image found with ID {id}"))
}

fn forbidden(action: &str) -> ServiceError {
    ServiceError::Forbidden(format!(
        "You are not authorized to complete {action} action."
    ))
}

/// The image the caller may see, or NotFound.
fn visible_image(conn: &Connection, caller: &Caller, id: &str) -> Tx<Stored> {
    let s = load(conn, id)?.ok_or_else(|| no_image(id))?;
    if !visible(conn, caller, &s.image)? {
        return Err(no_image(id).into());
    }
    Ok(s)
}

fn set_status(conn: &Connection, id: &str, status: &str) -> Tx<()> {
    conn.execute(
        "UPDATE images SET status = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, status, ts(now())],
    )?;
    Ok(())
}

/// The API's view of a stored image: the client's properties plus what the daemon keeps
/// (StarlingX's `store` and `cache_raw_*`).
fn view(
    s: &Stored,
    settings: &Settings,
    progress: &parking_lot::Mutex<BTreeMap<String, u8>>,
) -> Image {
    let nbd_url = &settings.nbd_url;
    let mut i = s.image.clone();
    // Glance's `show_image_direct_url`: where the data can be read without the API, the
    // NBD export of the image's raw content, once there is one.
    let raw_content = i.status == "active"
        && (s.cache_status.as_deref() == Some("Cached") || i.disk_format.as_deref() == Some("raw"));
    if settings.show_image_direct_url && raw_content {
        i.direct_url = Some(format!("{nbd_url}/image/{}", i.id));
    }
    for k in COMPUTED {
        i.properties.remove(k);
    }
    if s.data_object.is_some() && matches!(i.status.as_str(), "active" | "deactivated") {
        i.properties.insert("store".into(), STORE_NAME.into());
    }
    if let Some(status) = &s.cache_status {
        i.properties
            .insert("cache_raw_status".into(), status.clone());
        let size = match (status.as_str(), s.cache_size) {
            ("Cached", Some(n)) => n.to_string(),
            _ => "-".into(),
        };
        i.properties.insert("cache_raw_size".into(), size);
        match status.as_str() {
            "Cached" => {
                i.properties
                    .insert("cache_raw_url".into(), format!("{nbd_url}/image/{}", i.id));
            }
            "Error" => {
                i.properties.insert(
                    "cache_raw_error".into(),
                    s.cache_error.clone().unwrap_or_default(),
                );
            }
            "Caching" => {
                if let Some(p) = progress.lock().get(&i.id) {
                    i.properties
                        .insert("cache_raw_progress".into(), format!("{p}%"));
                }
            }
            _ => {}
        }
    }
    i
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running hashes of an upload.
struct Hashes {
    md5: md5::Md5,
    sha512: sha2::Sha512,
}

impl Hashes {
    fn new() -> Self {
        Hashes {
            md5: md5::Md5::new(),
            sha512: sha2::Sha512::new(),
        }
    }
}

fn store_error(e: StoreError) -> ServiceError {
    match e {
        StoreError::NoSpace => ServiceError::OverLimit(
            "Image storage media is full: There is not enough disk space on the image storage media."
                .into(),
        ),
        other => {
            tracing::error!(error = %other, "image data in the store");
            ServiceError::Internal("the image data could not be stored; see the daemon log".into())
        }
    }
}

impl Images {
    pub fn new(
        catalog: Catalog,
        store: Store,
        settings: Settings,
        converter: Arc<Converter>,
    ) -> Arc<Images> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new_cyclic(|me| Images {
            catalog,
            store,
            settings,
            cache_wanted: tx,
            cache_rx: parking_lot::Mutex::new(Some(rx)),
            progress: Arc::default(),
            converter,
            jobs: parking_lot::Mutex::default(),
            me: me.clone(),
        })
    }

    pub fn converter(&self) -> &Arc<Converter> {
        &self.converter
    }

    /// Runs raw-cache jobs as they are queued (at most the converter's job count convert at
    /// once; the others wait `Caching` at 0%). Returns when the queue closes.
    pub async fn run_cache_worker(self: Arc<Self>) {
        let Some(mut rx) = self.take_cache_queue() else {
            return;
        };
        while let Some(id) = rx.recv().await {
            self.spawn_job(id.clone(), {
                let me = self.clone();
                async move { me.cache_job(&id).await }
            });
        }
    }

    /// Runs `job` as the one job under `key` (a second one under a running key is dropped).
    fn spawn_job(&self, key: String, job: impl std::future::Future<Output = ()> + Send + 'static) {
        let Some(me) = self.me.upgrade() else { return };
        // Held while spawning, so that the job's own removal comes after its insertion.
        let mut jobs = self.jobs.lock();
        if jobs.get(&key).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let k = key.clone();
        let handle = tokio::spawn(async move {
            job.await;
            me.jobs.lock().remove(&k);
        });
        jobs.insert(key, handle);
    }

    /// Cancels the job under `key` (its `qemu-img` is killed) and waits until it is gone.
    async fn cancel_job(&self, key: &str) {
        let handle = self.jobs.lock().remove(key);
        if let Some(h) = handle {
            h.abort();
            let _ = h.await;
        }
    }

    /// Stops every running conversion, leaving its records as they are: the next start
    /// finds them and starts them again ([`Images::recover`]). Called before the NBD server
    /// stops, so that no job sees its exports go and records a failure.
    pub async fn stop_jobs(&self) {
        let handles: Vec<_> = self.jobs.lock().drain().map(|(_, h)| h).collect();
        for h in &handles {
            h.abort();
        }
        for h in handles {
            let _ = h.await;
        }
    }

    /// One raw-cache job: Queued -> Caching -> Cached (or Error with the reason).
    async fn cache_job(&self, id: &str) {
        let raw = Uuid::new_v4();
        let started = {
            let id = id.to_owned();
            self.tx(move |conn| {
                let Some(s) = load(conn, &id)? else {
                    return Ok(None);
                };
                let (Some(data), Some(size)) = (parse_object(&s.data_object), s.image.size) else {
                    return Ok(None);
                };
                if s.image.status != "active" || s.cache_status.as_deref() != Some("Queued") {
                    return Ok(None);
                }
                // Recorded before the object exists: a crash leaves a name recovery deletes.
                conn.execute(
                    "UPDATE images SET cache_status = 'Caching', raw_object_id = ?2, \
                     cache_error = NULL, cache_size = NULL WHERE id = ?1",
                    params![id, raw.to_string()],
                )?;
                let format = s.image.disk_format.clone().unwrap_or_else(|| "raw".into());
                Ok(Some((data, size, format)))
            })
            .await
        };
        let (data, size, format) = match started {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(image = %id, error = %e, "starting a raw-cache job");
                return;
            }
        };
        tracing::info!(image = %id, disk_format = %format, "raw cache: converting");
        self.progress.lock().insert(id.to_owned(), 0);
        let outcome = self.fill_cache(data, size, &format, raw, id).await;
        self.progress.lock().remove(id);
        let (status, error, cache_size) = match &outcome {
            Ok(allocated) => ("Cached", None, Some(*allocated as i64)),
            Err(e) => ("Error", Some(e.to_string()), None),
        };
        let recorded = {
            let id = id.to_owned();
            let error = error.clone();
            self.tx(move |conn| {
                Ok(conn.execute(
                    "UPDATE images SET cache_status = ?3, cache_error = ?4, cache_size = ?5, \
                     raw_object_id = CASE WHEN ?3 = 'Cached' THEN raw_object_id END \
                     WHERE id = ?1 AND raw_object_id = ?2",
                    params![id, raw.to_string(), status, error, cache_size],
                )?)
            })
            .await
        };
        if outcome.is_err() || !matches!(recorded, Ok(1)) {
            // Failed, or the image went meanwhile: nothing keeps the object.
            self.delete_data(raw).await;
        }
        match outcome {
            Ok(_) => tracing::info!(image = %id, "raw cache: cached"),
            Err(e) => tracing::warn!(image = %id, error = %e, "raw cache: failed"),
        }
    }

    /// Makes `raw` the raw content of `data`; returns its allocated bytes.
    async fn fill_cache(
        &self,
        data: Uuid,
        size: u64,
        format: &str,
        raw: Uuid,
        id: &str,
    ) -> Result<u64, ConvertError> {
        let started = std::time::Instant::now();
        let probe = self.converter.probe(data, size, format).await?;
        tracing::info!(image = %id, format = %probe.format, virtual_size = probe.virtual_size,
            probe_ms = started.elapsed().as_millis() as u64, "raw cache: image checked");
        if probe.is_raw() {
            // Raw content already: the cache is a clone (metadata only).
            self.store.clone_object(data, raw).await?;
        } else {
            self.store.create_object(raw, probe.virtual_size).await?;
            let progress = self.progress.clone();
            let id = id.to_owned();
            self.converter
                .convert(data, probe, raw, move |p| {
                    progress.lock().insert(id.clone(), p);
                })
                .await?;
        }
        Ok(self.store.object_info(raw)?.allocated_bytes)
    }

    /// What a new volume of `size_bytes` made from image `id` is filled from, after the
    /// checks Cinder makes (visible, active, not larger than the volume, `min_disk`).
    pub async fn volume_source(
        &self,
        caller: &Caller,
        id: &str,
        size_bytes: u64,
    ) -> ServiceResult<VolumeSource> {
        let s = {
            let caller = caller.clone();
            let id = id.to_owned();
            self.tx(move |conn| {
                visible_image(conn, &caller, &id).map_err(|e| match e {
                    TxError::Service(ServiceError::NotFound(_)) => {
                        ServiceError::NotFound(format!("Image {id} could not be found.")).into()
                    }
                    other => other,
                })
            })
            .await?
        };
        let i = &s.image;
        let (Some(data), Some(size), "active") =
            (parse_object(&s.data_object), i.size, i.status.as_str())
        else {
            return Err(ServiceError::BadRequest(format!(
                "Image {} is not active.",
                i.id
            )));
        };
        let gib = |b: u64| b.div_ceil(1 << 30);
        let volume_gib = size_bytes >> 30;
        if i.min_disk > volume_gib {
            return Err(ServiceError::BadRequest(format!(
                "Volume size {volume_gib}GB cannot be smaller than the image minDisk size {}GB.",
                i.min_disk
            )));
        }
        let cached = match (s.cache_status.as_deref(), parse_object(&s.raw_object)) {
            (Some("Cached"), Some(raw)) => Some(raw),
            _ => None,
        };
        let source = match cached {
            Some(raw) => VolumeSource::Clone {
                object: raw,
                virtual_size: i.virtual_size.unwrap_or(size),
            },
            None => {
                let format = i.disk_format.as_deref().unwrap_or("raw");
                let probe = self
                    .converter
                    .probe(data, size, format)
                    .await
                    .map_err(|e| match e {
                        ConvertError::Refused(m) => {
                            ServiceError::BadRequest(format!("Image {} is unacceptable: {m}", i.id))
                        }
                        other => {
                            tracing::error!(image = %i.id, error = %other, "probing an image for a volume");
                            ServiceError::Internal(
                                "the image could not be read; see the daemon log".into(),
                            )
                        }
                    })?;
                if probe.is_raw() {
                    VolumeSource::Clone {
                        object: data,
                        virtual_size: size,
                    }
                } else {
                    VolumeSource::Convert {
                        object: data,
                        probe,
                    }
                }
            }
        };
        if source.virtual_size() > size_bytes {
            return Err(ServiceError::BadRequest(format!(
                "Size of specified image {}GB is larger than volume size {volume_gib}GB.",
                gib(source.virtual_size())
            )));
        }
        Ok(source)
    }

    /// What a volume fill cut by a restart converts from again, if its image still has data
    /// to convert (no permission check: the volume was made by one that passed).
    pub async fn source_for_recovery(&self, id: &str) -> Option<VolumeSource> {
        let id = id.to_owned();
        let s = self.tx(move |conn| load(conn, &id)).await.ok().flatten()?;
        let (data, size) = (parse_object(&s.data_object)?, s.image.size?);
        let format = s.image.disk_format.as_deref().unwrap_or("raw");
        let probe = self.converter.probe(data, size, format).await.ok()?;
        (!probe.is_raw()).then_some(VolumeSource::Convert {
            object: data,
            probe,
        })
    }

    /// Converts image data into a new volume's object in the background; `done` records the
    /// outcome (the volume's status).
    pub fn fill_volume<F, Fut>(&self, volume: Uuid, object: Uuid, probe: Probe, done: F)
    where
        F: FnOnce(Result<(), ConvertError>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let converter = self.converter.clone();
        self.spawn_job(volume.to_string(), async move {
            let r = converter.convert(object, probe, volume, |_| {}).await;
            done(r).await;
        });
    }

    /// The queue of images whose raw cache is wanted (taken once, by the cache worker).
    pub fn take_cache_queue(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        self.cache_rx.lock().take()
    }

    async fn tx<T, F>(&self, f: F) -> ServiceResult<T>
    where
        F: FnOnce(&Connection) -> Tx<T> + Send + 'static,
        T: Send + 'static,
    {
        super::immediate(&self.catalog, f).await
    }

    /// The API's view of a stored image.
    fn view(&self, s: &Stored) -> Image {
        view(s, &self.settings, &self.progress)
    }

    /// Puts every image back in a state a client can act on after a restart: cut uploads and
    /// stages are queued again (their partial objects deleted), imports run again, and
    /// conversions that were running are queued again.
    pub async fn recover(&self) -> ServiceResult<()> {
        let (cut, importing, wanted) = self
            .tx(|conn| {
                let mut cut: Vec<(String, Option<String>)> = conn
                    .prepare(
                        "SELECT id, data_object_id FROM images WHERE status = 'saving' \
                         OR (status = 'uploading' AND size_bytes IS NULL)",
                    )?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                for (id, _) in &cut {
                    conn.execute(
                        "UPDATE images SET status = 'queued', data_object_id = NULL, \
                         size_bytes = NULL, checksum = NULL, os_hash_algo = NULL, \
                         os_hash_value = NULL, updated_at = ?2 WHERE id = ?1",
                        params![id, ts(now())],
                    )?;
                }
                let importing: Vec<String> = conn
                    .prepare("SELECT id FROM images WHERE status = 'importing'")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let partial: Vec<Option<String>> = conn
                    .prepare("SELECT raw_object_id FROM images WHERE cache_status = 'Caching'")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                conn.execute(
                    "UPDATE images SET cache_status = 'Queued', raw_object_id = NULL \
                     WHERE cache_status = 'Caching'",
                    [],
                )?;
                cut.extend(partial.into_iter().map(|o| (String::new(), o)));
                let wanted: Vec<String> = conn
                    .prepare("SELECT id FROM images WHERE cache_status = 'Queued'")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                Ok((cut, importing, wanted))
            })
            .await?;
        for (id, object) in cut {
            if id.is_empty() {
                tracing::info!("a raw-cache conversion was cut by a restart; it starts again");
            } else {
                tracing::warn!(image = %id, "an upload was cut by a restart; the image is queued again");
            }
            if let Some(o) = object.and_then(|o| Uuid::parse_str(&o).ok()) {
                self.delete_data(o).await;
            }
        }
        for id in importing {
            tracing::info!(image = %id, "finishing an import a restart interrupted");
            self.finish_import(id).await;
        }
        for id in wanted {
            let _ = self.cache_wanted.send(id);
        }
        Ok(())
    }

    async fn delete_data(&self, object: Uuid) {
        match self.store.delete_object(object).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => tracing::error!(object = %object, error = %e, "deleting image data"),
        }
    }

    /// Queues the raw cache if wanted (in the same transaction as the change that wants it).
    fn queue_cache_if_wanted(conn: &Connection, s: &Stored) -> Tx<bool> {
        let wanted = s.image.status == "active"
            && s.image.properties.get("cache_raw").map(String::as_str) == Some("True")
            && s.image.disk_format.as_deref() != Some("raw")
            && !matches!(
                s.cache_status.as_deref(),
                Some("Queued" | "Caching" | "Cached")
            );
        if wanted {
            conn.execute(
                "UPDATE images SET cache_status = 'Queued', cache_error = NULL, cache_size = NULL \
                 WHERE id = ?1",
                [&s.image.id],
            )?;
        }
        Ok(wanted)
    }

    /// [`Images::receive`] into a new object, cut to the size received and flushed.
    async fn receive_all(&self, object: Uuid, body: ByteStream) -> ServiceResult<(u64, Hashes)> {
        let cap = self.settings.image_size_cap;
        self.store
            .create_object(object, cap)
            .await
            .map_err(store_error)?;
        let (size, hashes) = self.receive(object, body).await?;
        self.store.resize(object, size).await.map_err(store_error)?;
        self.store.flush().await.map_err(store_error)?;
        Ok((size, hashes))
    }

    /// Streams `body` into a new object, hashing it. Returns the size and the hashes.
    async fn receive(&self, object: Uuid, mut body: ByteStream) -> ServiceResult<(u64, Hashes)> {
        let cap = self.settings.image_size_cap;
        let too_large = || {
            ServiceError::OverLimit(
                "The incoming image is too large: The provided image is too large.".into(),
            )
        };
        let mut hashes = Hashes::new();
        let mut buf = BytesMut::with_capacity(PIECE);
        let mut offset = 0u64;
        let mut received = 0u64;
        loop {
            let next = body.next().await;
            let end = next.is_none();
            if let Some(chunk) = next {
                let chunk = chunk.map_err(|e| {
                    ServiceError::BadRequest(format!("The image data could not be read: {e}"))
                })?;
                received += chunk.len() as u64;
                if received > cap {
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
                if buf.len() < PIECE {
                    continue;
                }
            }
            let piece = buf.split().freeze();
            if !piece.is_empty() {
                let (h, written) = tokio::join!(
                    hash(hashes, piece.clone()),
                    self.write_sparse(object, offset, piece.clone())
                );
                hashes = h?;
                written?;
                offset += piece.len() as u64;
            }
            if end {
                return Ok((offset, hashes));
            }
            buf.reserve(PIECE);
        }
    }

    /// Writes the non-zero chunk-sized pieces of `data` at `offset` (the object is new: what
    /// is not written reads as zeros and takes no space).
    async fn write_sparse(&self, object: Uuid, offset: u64, data: Bytes) -> ServiceResult<()> {
        let chunk = self.store.chunk_size() as usize;
        let mut i = 0;
        while i < data.len() {
            // Skip zero pieces, then gather the run of non-zero ones.
            let piece_end = |i: usize| (i + chunk).min(data.len());
            if data[i..piece_end(i)].iter().all(|&b| b == 0) {
                i = piece_end(i);
                continue;
            }
            let start = i;
            while i < data.len() && !data[i..piece_end(i)].iter().all(|&b| b == 0) {
                i = piece_end(i);
            }
            self.store
                .write(object, offset + start as u64, data.slice(start..i), false)
                .await
                .map_err(store_error)?;
        }
        Ok(())
    }

    /// Inspects stored data as Glance does on upload (bare containers only): the content must
    /// be what `disk_format` says and pass the safety checks.
    async fn inspect_upload(
        &self,
        object: Uuid,
        size: u64,
        disk_format: Option<&str>,
        container_format: Option<&str>,
    ) -> ServiceResult<(Option<String>, Option<u64>)> {
        let reader = ObjectReader::new(&self.store, object, size);
        let found = match inspect::inspect(&reader).await {
            Ok(f) => f,
            Err(inspect::InspectError::Multiple(m)) if container_format == Some("bare") => {
                return Err(ServiceError::Unsupported(format!(
                    "Multiple formats detected: {m}"
                )));
            }
            Err(inspect::InspectError::Multiple(_)) => return Ok((None, None)),
            Err(inspect::InspectError::Io(e)) => {
                tracing::error!(error = %e, "reading image data back for inspection");
                return Err(ServiceError::Internal(
                    "the image data could not be inspected; see the daemon log".into(),
                ));
            }
        };
        let claimed = disk_format.unwrap_or("raw");
        if container_format == Some("bare") {
            match inspect::check_claim(claimed, &found) {
                Ok(()) => {}
                Err(_) if claimed != found.format.as_str() && claimed != "raw" => {
                    return Err(ServiceError::Unsupported(format!(
                        "Image disk_format {claimed} does not match stream data {}",
                        found.format
                    )));
                }
                Err(_) => {
                    return Err(ServiceError::Unsupported(format!(
                        "Image failed safety checks: {}",
                        found
                            .violations
                            .iter()
                            .filter(|v| v.check != "mbr")
                            .map(|v| v.message.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        let virtual_size = if claimed == found.format.as_str() {
            found.virtual_size.or(Some(size))
        } else if claimed == "raw" || found.format == Format::Raw {
            Some(size)
        } else {
            None
        };
        Ok((Some(found.format.as_str().to_owned()), virtual_size))
    }

    /// Activates an image whose data is staged (glance-direct), or queues it again on failure.
    async fn finish_import(&self, id: String) {
        let loaded = {
            let id = id.clone();
            self.tx(move |conn| load(conn, &id)).await
        };
        let Ok(Some(s)) = loaded else { return };
        let (Some(object), Some(size)) = (
            s.data_object
                .as_deref()
                .and_then(|o| Uuid::parse_str(o).ok()),
            s.image.size,
        ) else {
            return;
        };
        let inspected = self
            .inspect_upload(
                object,
                size,
                s.image.disk_format.as_deref(),
                s.image.container_format.as_deref(),
            )
            .await;
        let ok = inspected.is_ok();
        let outcome = {
            let id = id.clone();
            self.tx(move |conn| {
                let Some(now_s) = load(conn, &id)? else {
                    return Ok(None);
                };
                if now_s.image.status != "importing" {
                    return Ok(None);
                }
                match inspected {
                    Ok((detected, virtual_size)) => {
                        conn.execute(
                            "UPDATE images SET status = 'active', detected_format = ?2, \
                             virtual_size = ?3, updated_at = ?4 WHERE id = ?1",
                            params![id, detected, virtual_size.map(|v| v as i64), ts(now())],
                        )?;
                        let after = load(conn, &id)?;
                        Ok(after
                            .filter(|a| Self::queue_cache_if_wanted(conn, a).unwrap_or(false))
                            .map(|_| true))
                    }
                    Err(e) => {
                        tracing::warn!(image = %id, error = %e, "import failed; the image is queued again");
                        conn.execute(
                            "UPDATE images SET status = 'queued', data_object_id = NULL, \
                             size_bytes = NULL, checksum = NULL, os_hash_algo = NULL, \
                             os_hash_value = NULL, virtual_size = NULL, updated_at = ?2 WHERE id = ?1",
                            params![id, ts(now())],
                        )?;
                        Ok(Some(false))
                    }
                }
            })
            .await
        };
        match outcome {
            Ok(Some(true)) => {
                let _ = self.cache_wanted.send(id);
            }
            Ok(Some(false)) if !ok => self.delete_data(object).await,
            _ => {}
        }
    }

    fn member_row(r: &Row<'_>) -> rusqlite::Result<Member> {
        Ok(Member {
            image_id: r.get(0)?,
            member_id: r.get(1)?,
            status: r.get(2)?,
            created_at: parse_ts(&r.get::<_, String>(3)?)?,
            updated_at: parse_ts(&r.get::<_, String>(4)?)?,
        })
    }

    /// The image (any the caller may see) for a members call: Glance words these 404s
    /// differently.
    fn member_image(conn: &Connection, caller: &Caller, id: &str) -> Tx<Stored> {
        visible_image(conn, caller, id).map_err(|e| match e {
            TxError::Service(ServiceError::NotFound(_)) => {
                ServiceError::NotFound(format!("Image {id} not found.")).into()
            }
            other => other,
        })
    }

    /// The image for a change of its members: its owner's (or an admin's) call, on a
    /// `shared` image. `policy` names the refused rule, `verb` the refused change.
    fn shared_image_of_owner(
        conn: &Connection,
        caller: &Caller,
        id: &str,
        policy: &str,
        verb: &str,
    ) -> Tx<Stored> {
        let s = Images::member_image(conn, caller, id)?;
        if !may_modify(caller, &s.image) {
            return Err(forbidden(policy).into());
        }
        if s.image.visibility != "shared" {
            return Err(ServiceError::Forbidden(format!(
                "Not allowed to {verb} members for image {id}."
            ))
            .into());
        }
        Ok(s)
    }

    fn load_member(conn: &Connection, image: &str, member: &str) -> Tx<Member> {
        conn.prepare_cached(
            "SELECT image_id, member_id, status, created_at, updated_at FROM image_members \
             WHERE image_id = ?1 AND member_id = ?2",
        )?
        .query_row([image, member], Self::member_row)
        .optional()?
        .ok_or_else(|| {
            ServiceError::NotFound(format!(
                "{member} not found in the member list of the image {image}."
            ))
            .into()
        })
    }
}

/// Feeds `piece` to both hashes on blocking threads (each in its own, side by side).
async fn hash(h: Hashes, piece: Bytes) -> ServiceResult<Hashes> {
    let Hashes {
        mut md5,
        mut sha512,
    } = h;
    let p2 = piece.clone();
    let a = tokio::task::spawn_blocking(move || {
        md5.update(&piece);
        md5
    });
    let b = tokio::task::spawn_blocking(move || {
        sha512.update(&p2);
        sha512
    });
    let (a, b) = tokio::join!(a, b);
    match (a, b) {
        (Ok(md5), Ok(sha512)) => Ok(Hashes { md5, sha512 }),
        _ => Err(ServiceError::Internal(
            "hashing the image data failed".into(),
        )),
    }
}

fn parse_object(o: &Option<String>) -> Option<Uuid> {
    o.as_deref().and_then(|o| Uuid::parse_str(o).ok())
}

#[async_trait::async_trait]
impl ImageService for Images {
    async fn create_image(&self, caller: &Caller, new: NewImage) -> ServiceResult<Image> {
        let caller = caller.clone();
        let s = self
            .tx(move |conn| {
                let id = new.id.clone().unwrap_or_else(|| Uuid::new_v4().to_string());
                if load(conn, &id)?.is_some() {
                    return Err(
                        ServiceError::Conflict(format!("Image ID {id} already exists!")).into(),
                    );
                }
                let t = ts(now());
                conn.execute(
                    "INSERT INTO images (id, owner, name, status, visibility, protected, os_hidden, \
                     disk_format, container_format, min_ram, min_disk, properties, tags, \
                     created_at, updated_at) \
                     VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13)",
                    params![
                        id,
                        new.owner.clone().unwrap_or_else(|| caller.project_id.clone()),
                        new.name,
                        new.visibility.as_deref().unwrap_or("shared"),
                        new.protected,
                        new.os_hidden,
                        new.disk_format,
                        new.container_format,
                        new.min_ram as i64,
                        new.min_disk as i64,
                        serde_json::to_string(&new.properties).unwrap_or_else(|_| "{}".into()),
                        serde_json::to_string(&new.tags).unwrap_or_else(|_| "[]".into()),
                        t
                    ],
                )?;
                load(conn, &id)?.ok_or_else(|| ServiceError::Internal("image vanished".into()).into())
            })
            .await?;
        tracing::info!(image = %s.image.id, owner = ?s.image.owner, "image created");
        Ok(self.view(&s))
    }

    async fn list_images(&self, caller: &Caller, scope: ImageScope) -> ServiceResult<Vec<Image>> {
        let caller = caller.clone();
        let rows = self
            .tx(move |conn| {
                let sql = format!(
                    "SELECT {COLUMNS}, (SELECT status FROM image_members m \
                     WHERE m.image_id = images.id AND m.member_id = ?1) FROM images"
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let rows = stmt
                    .query_map([&caller.project_id], |r| {
                        Ok((stored_row(r)?, r.get::<_, Option<String>>(26)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let me = Some(caller.project_id.as_str());
                let wanted_member = scope.member_status.as_status();
                Ok(rows
                    .into_iter()
                    .filter(|(s, membership)| {
                        let i = &s.image;
                        let own = i.owner.as_deref() == me;
                        let listed = caller.is_admin()
                            || matches!(i.visibility.as_str(), "public" | "community")
                            || own
                            || (i.visibility == "shared"
                                && membership
                                    .as_deref()
                                    .is_some_and(|m| wanted_member.is_none_or(|w| w == m)));
                        let by_visibility = match scope.visibility {
                            None => own || i.visibility != "community",
                            Some(VisibilityFilter::All) => true,
                            Some(v) => v.as_visibility() == Some(i.visibility.as_str()),
                        };
                        listed && by_visibility
                    })
                    .map(|(s, _)| s)
                    .collect::<Vec<_>>())
            })
            .await?;
        Ok(rows.iter().map(|s| self.view(s)).collect())
    }

    async fn get_image(&self, caller: &Caller, id: &str) -> ServiceResult<Image> {
        let caller = caller.clone();
        let id = id.to_owned();
        let s = self
            .tx(move |conn| visible_image(conn, &caller, &id))
            .await?;
        Ok(self.view(&s))
    }

    async fn update_image(
        &self,
        caller: &Caller,
        id: &str,
        edit: ImageEdit,
    ) -> ServiceResult<Image> {
        let caller = caller.clone();
        let id = id.to_owned();
        let settings = self.settings.clone();
        let progress = self.progress.clone();
        let (s, queued) = self
            .tx(move |conn| {
                let s = visible_image(conn, &caller, &id)?;
                if !may_modify(&caller, &s.image) {
                    return Err(forbidden("modify_image").into());
                }
                // The edit sees what the client sees; what it may not touch is put back.
                let mut image = view(&s, &settings, &progress);
                let before = image.clone();
                edit(&mut image)?;
                if image == before {
                    return Ok((s, false));
                }
                let mut props = image.properties.clone();
                for k in COMPUTED {
                    props.remove(k);
                }
                conn.execute(
                    "UPDATE images SET name = ?2, visibility = ?3, protected = ?4, os_hidden = ?5, \
                     disk_format = ?6, container_format = ?7, min_ram = ?8, min_disk = ?9, \
                     owner = ?10, properties = ?11, tags = ?12, updated_at = ?13 WHERE id = ?1",
                    params![
                        id,
                        image.name,
                        image.visibility,
                        image.protected,
                        image.os_hidden,
                        image.disk_format,
                        image.container_format,
                        image.min_ram as i64,
                        image.min_disk as i64,
                        image.owner,
                        serde_json::to_string(&props).unwrap_or_else(|_| "{}".into()),
                        serde_json::to_string(&image.tags).unwrap_or_else(|_| "[]".into()),
                        ts(now())
                    ],
                )?;
                let s = load(conn, &id)?.ok_or_else(|| no_image(&id))?;
                let queued = Images::queue_cache_if_wanted(conn, &s)?;
                let s = load(conn, &id)?.ok_or_else(|| no_image(&id))?;
                Ok((s, queued))
            })
            .await?;
        if queued {
            let _ = self.cache_wanted.send(s.image.id.clone());
        }
        Ok(self.view(&s))
    }

    async fn delete_image(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let caller = caller.clone();
        let key = id.to_owned();
        let s = self
            .tx(move |conn| {
                let s = visible_image(conn, &caller, &key)?;
                if !may_modify(&caller, &s.image) {
                    return Err(forbidden("delete_image").into());
                }
                if s.image.protected {
                    return Err(ServiceError::Forbidden(format!(
                        "Image {key} is protected and cannot be deleted."
                    ))
                    .into());
                }
                // Members go with the row (ON DELETE CASCADE); volumes made from it keep
                // their own data (clones) and forget the link.
                conn.execute("DELETE FROM images WHERE id = ?1", [&key])?;
                Ok(s)
            })
            .await?;
        // A running conversion stops before its objects go (one that ends first finds the
        // row gone and deletes its own object).
        self.cancel_job(&s.image.id).await;
        self.progress.lock().remove(&s.image.id);
        for object in [parse_object(&s.data_object), parse_object(&s.raw_object)]
            .into_iter()
            .flatten()
        {
            self.delete_data(object).await;
        }
        tracing::info!(image = %id, "image deleted");
        Ok(())
    }

    async fn set_active(&self, caller: &Caller, id: &str, active: bool) -> ServiceResult<()> {
        let caller = caller.clone();
        let id = id.to_owned();
        self.tx(move |conn| {
            let s = visible_image(conn, &caller, &id)?;
            let action = if active { "reactivate" } else { "deactivate" };
            if !may_modify(&caller, &s.image) {
                return Err(forbidden(action).into());
            }
            let (from, to) = if active {
                ("deactivated", "active")
            } else {
                ("active", "deactivated")
            };
            if s.image.status == to {
                return Ok(());
            }
            if s.image.status != from {
                return Err(ServiceError::Forbidden(format!(
                    "Not allowed to {action} image in status '{}'",
                    s.image.status
                ))
                .into());
            }
            set_status(conn, &id, to)
        })
        .await
    }

    async fn upload(
        &self,
        caller: &Caller,
        id: &str,
        kind: UploadKind,
        body: ByteStream,
        size_hint: Option<u64>,
    ) -> ServiceResult<()> {
        self.upload_task(caller, id, kind, Fill::Body(body), size_hint)
            .await
    }

    async fn import(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let caller = caller.clone();
        let key = id.to_owned();
        self.tx(move |conn| {
            let s = visible_image(conn, &caller, &key)?;
            if s.image.status == "active" {
                return Err(ServiceError::Conflict(
                    "Image with status active cannot be target for import".into(),
                )
                .into());
            }
            if s.image.status != "uploading" || s.image.size.is_none() {
                return Err(ServiceError::Conflict(
                    "Image needs to be staged before 'glance-direct' method can be used".into(),
                )
                .into());
            }
            if s.image.container_format.is_none() {
                return Err(ServiceError::Conflict(
                    "'container_format' needs to be set before import".into(),
                )
                .into());
            }
            if s.image.disk_format.is_none() {
                return Err(ServiceError::Conflict(
                    "'disk_format' needs to be set before import".into(),
                )
                .into());
            }
            if !may_modify(&caller, &s.image) {
                return Err(forbidden("modify_image").into());
            }
            set_status(conn, &key, "importing")
        })
        .await?;
        // Glance imports asynchronously (202); clients poll the status.
        let this = self.me.upgrade();
        let id = id.to_owned();
        match this {
            Some(this) => {
                tokio::spawn(async move { this.finish_import(id).await });
            }
            None => self.finish_import(id).await,
        }
        Ok(())
    }

    async fn download(
        &self,
        caller: &Caller,
        id: &str,
        range: Option<(u64, Option<u64>)>,
    ) -> ServiceResult<Option<ImageData>> {
        let caller2 = caller.clone();
        let key = id.to_owned();
        let s = self
            .tx(move |conn| visible_image(conn, &caller2, &key))
            .await?;
        if s.image.status == "deactivated" && !caller.is_admin() {
            return Err(ServiceError::Forbidden(
                "The requested image has been deactivated. Image data download is forbidden."
                    .into(),
            ));
        }
        let (Some(object), Some(total), true) = (
            parse_object(&s.data_object),
            s.image.size,
            matches!(s.image.status.as_str(), "active" | "deactivated"),
        ) else {
            return Ok(None);
        };
        let offset = range.map(|r| r.0).unwrap_or(0).min(total);
        let len = range
            .and_then(|r| r.1)
            .unwrap_or(total - offset)
            .min(total - offset);
        let store = self.store.clone();
        let end = offset + len;
        let stream = futures_util::stream::unfold(offset, move |pos| {
            let store = store.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let n = (end - pos).min(PIECE as u64) as usize;
                match store.read(object, pos, n).await {
                    Ok(b) => Some((Ok(b), pos + n as u64)),
                    Err(e) => {
                        tracing::error!(object = %object, offset = pos, error = %e, "reading image data");
                        // Ends the stream: the client sees a short body, never wrong bytes.
                        Some((Err(std::io::Error::other(e.to_string())), end))
                    }
                }
            }
        });
        Ok(Some(ImageData {
            total,
            offset,
            len,
            checksum: s.image.checksum.clone(),
            stream: Box::pin(stream),
        }))
    }

    async fn list_members(&self, caller: &Caller, image_id: &str) -> ServiceResult<Vec<Member>> {
        let caller = caller.clone();
        let id = image_id.to_owned();
        self.tx(move |conn| {
            let s = Images::member_image(conn, &caller, &id)?;
            if s.image.visibility != "shared" {
                return Err(ServiceError::Forbidden(format!(
                    "Not allowed to list members for image {id}: Only shared images have members."
                ))
                .into());
            }
            let owner_or_admin =
                caller.is_admin() || s.image.owner.as_deref() == Some(caller.project_id.as_str());
            let mut stmt = conn.prepare_cached(
                "SELECT image_id, member_id, status, created_at, updated_at FROM image_members \
                 WHERE image_id = ?1 AND (?2 OR member_id = ?3) ORDER BY created_at, member_id",
            )?;
            let rows = stmt
                .query_map(
                    params![id, owner_or_admin, caller.project_id],
                    Images::member_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn get_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
    ) -> ServiceResult<Member> {
        let caller = caller.clone();
        let (id, member) = (image_id.to_owned(), member_id.to_owned());
        self.tx(move |conn| {
            let s = Images::member_image(conn, &caller, &id)?;
            if s.image.visibility != "shared" {
                return Err(
                    ServiceError::NotFound("Only shared images have members.".into()).into(),
                );
            }
            let owner_or_admin =
                caller.is_admin() || s.image.owner.as_deref() == Some(caller.project_id.as_str());
            if !owner_or_admin && member != caller.project_id {
                return Err(ServiceError::NotFound(format!(
                    "{member} not found in the member list of the image {id}."
                ))
                .into());
            }
            Images::load_member(conn, &id, &member)
        })
        .await
    }

    async fn add_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
    ) -> ServiceResult<Member> {
        let caller = caller.clone();
        let (id, member) = (image_id.to_owned(), member_id.to_owned());
        self.tx(move |conn| {
            Images::shared_image_of_owner(conn, &caller, &id, "add_member", "create")?;
            if member_status(conn, &id, &member)?.is_some() {
                return Err(ServiceError::Conflict(format!(
                    "Member {member} is duplicated for image {id}"
                ))
                .into());
            }
            let count: i64 = conn.query_row(
                "SELECT count(*) FROM image_members WHERE image_id = ?1",
                [&id],
                |r| r.get(0),
            )?;
            if count as usize >= MEMBER_QUOTA {
                return Err(ServiceError::OverLimit(format!(
                    "Image member limit exceeded for image {id}: The limit has been exceeded on the number of allowed image members for this image. Attempted: {}, Maximum: {MEMBER_QUOTA}:",
                    count + 1
                ))
                .into());
            }
            let t = ts(now());
            conn.execute(
                "INSERT INTO image_members (image_id, member_id, status, created_at, updated_at) \
                 VALUES (?1, ?2, 'pending', ?3, ?3)",
                params![id, member, t],
            )?;
            Images::load_member(conn, &id, &member)
        })
        .await
    }

    async fn update_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
        status: &str,
    ) -> ServiceResult<Member> {
        let caller = caller.clone();
        let (id, member, status) = (image_id.to_owned(), member_id.to_owned(), status.to_owned());
        self.tx(move |conn| {
            let s = Images::member_image(conn, &caller, &id)?;
            // Only the member itself answers an invitation (Glance's modify_member).
            if !(caller.is_admin() || (caller.has(Role::Member) && caller.project_id == member)) {
                return Err(forbidden("modify_member").into());
            }
            if s.image.visibility != "shared" {
                return Err(ServiceError::Forbidden(format!(
                    "Not allowed to update members for image {id}."
                ))
                .into());
            }
            Images::load_member(conn, &id, &member)?;
            conn.execute(
                "UPDATE image_members SET status = ?3, updated_at = ?4 \
                 WHERE image_id = ?1 AND member_id = ?2",
                params![id, member, status, ts(now())],
            )?;
            Images::load_member(conn, &id, &member)
        })
        .await
    }

    async fn delete_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
    ) -> ServiceResult<()> {
        let caller = caller.clone();
        let (id, member) = (image_id.to_owned(), member_id.to_owned());
        self.tx(move |conn| {
            Images::shared_image_of_owner(conn, &caller, &id, "delete_member", "delete")?;
            Images::load_member(conn, &id, &member)?;
            conn.execute(
                "DELETE FROM image_members WHERE image_id = ?1 AND member_id = ?2",
                params![id, member],
            )?;
            Ok(())
        })
        .await
    }
}

/// Makes an image's data object in the store (given its id) and returns its size.
pub type BuildData =
    Box<dyn FnOnce(Uuid) -> futures_util::future::BoxFuture<'static, ServiceResult<u64>> + Send>;

/// Where an upload's data comes from.
enum Fill {
    /// A client's stream, written to a new object as it comes.
    Body(ByteStream),
    /// Made in the store by the daemon itself (a volume's chunks, shared), then read back
    /// for the hashes.
    Built(BuildData),
}

impl Images {
    /// An upload whose data the daemon makes in the store itself (see [`BuildData`]): the
    /// image goes through the states of a direct upload, is hashed and inspected the same
    /// way, but its data costs no copy. A volume uploaded to this daemon's own images.
    pub async fn upload_built(
        &self,
        caller: &Caller,
        id: &str,
        build: BuildData,
    ) -> ServiceResult<()> {
        self.upload_task(caller, id, UploadKind::Direct, Fill::Built(build), None)
            .await
    }

    /// [`Images::upload_now`] as a task of its own: a client that hangs up mid-upload drops
    /// the caller's future, and the upload must still end as a cut one (queued again, its
    /// object deleted).
    async fn upload_task(
        &self,
        caller: &Caller,
        id: &str,
        kind: UploadKind,
        fill: Fill,
        size_hint: Option<u64>,
    ) -> ServiceResult<()> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| ServiceError::Internal("shutting down".into()))?;
        let caller = caller.clone();
        let id = id.to_owned();
        tokio::spawn(async move { me.upload_now(&caller, &id, kind, fill, size_hint).await })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "an upload task failed");
                Err(ServiceError::Internal(
                    "the upload failed; see the daemon log".into(),
                ))
            })
    }

    /// Hashes `size` bytes of `object`, reading ahead while the hashes run.
    async fn hash_object(&self, object: Uuid, size: u64) -> ServiceResult<Hashes> {
        let mut hashes = Hashes::new();
        let mut pieces = crate::image::object_stream(self.store.clone(), object, size);
        while let Some(piece) = pieces.next().await {
            let piece = piece.map_err(|e| {
                tracing::error!(object = %object, error = %e, "reading image data to hash it");
                ServiceError::Internal(
                    "the image data could not be read; see the daemon log".into(),
                )
            })?;
            hashes = hash(hashes, piece).await?;
        }
        Ok(hashes)
    }

    /// [`ImageService::upload`], run as a task of its own.
    async fn upload_now(
        &self,
        caller: &Caller,
        id: &str,
        kind: UploadKind,
        fill: Fill,
        size_hint: Option<u64>,
    ) -> ServiceResult<()> {
        let cap = self.settings.image_size_cap;
        if size_hint.is_some_and(|n| n > cap) {
            return Err(ServiceError::OverLimit(
                "The incoming image is too large: The provided image is too large.".into(),
            ));
        }
        let object = Uuid::new_v4();
        let (to, from_status) = match kind {
            UploadKind::Direct => ("saving", "queued"),
            UploadKind::Stage => ("uploading", "queued"),
        };
        let s = {
            let caller = caller.clone();
            let id = id.to_owned();
            self.tx(move |conn| {
                let s = visible_image(conn, &caller, &id)?;
                if !may_modify(&caller, &s.image) {
                    return Err(forbidden(if kind == UploadKind::Direct {
                        "upload_image"
                    } else {
                        "modify_image"
                    })
                    .into());
                }
                if s.image.status != from_status {
                    return Err(ServiceError::Conflict(format!(
                        "Image status transition from {} to {to} is not allowed",
                        s.image.status
                    ))
                    .into());
                }
                if kind == UploadKind::Direct {
                    match (&s.image.disk_format, &s.image.container_format) {
                        (None, None) => {
                            return Err(ServiceError::BadRequest(
                                "Properties disk_format, container_format must be set prior to saving data."
                                    .into(),
                            )
                            .into());
                        }
                        (None, _) => {
                            return Err(ServiceError::BadRequest(
                                "Property disk_format must be set prior to saving data.".into(),
                            )
                            .into());
                        }
                        (_, None) => {
                            return Err(ServiceError::BadRequest(
                                "Property container_format must be set prior to saving data."
                                    .into(),
                            )
                            .into());
                        }
                        _ => {}
                    }
                }
                conn.execute(
                    "UPDATE images SET status = ?2, data_object_id = ?3, updated_at = ?4 WHERE id = ?1",
                    params![id, to, object.to_string(), ts(now())],
                )?;
                Ok(s)
            })
            .await?
        };
        let id = s.image.id.clone();
        let received = match fill {
            Fill::Body(body) => self.receive_all(object, body).await,
            Fill::Built(build) => match build(object).await {
                Ok(size) if size > cap => Err(ServiceError::OverLimit(
                    "The incoming image is too large: The provided image is too large.".into(),
                )),
                Ok(size) => self.hash_object(object, size).await.map(|h| (size, h)),
                Err(e) => Err(e),
            },
        };
        let checked = match (received, kind) {
            (Ok((size, hashes)), UploadKind::Direct) => self
                .inspect_upload(
                    object,
                    size,
                    s.image.disk_format.as_deref(),
                    s.image.container_format.as_deref(),
                )
                .await
                .map(|(detected, vsize)| (size, hashes, detected, vsize)),
            (Ok((size, hashes)), UploadKind::Stage) => Ok((size, hashes, None, None)),
            (Err(e), _) => Err(e),
        };
        let (size, hashes, detected, vsize) = match checked {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(image = %id, error = %e, "upload failed; the image is queued again");
                let i = id.clone();
                let o = object.to_string();
                let _ = self
                    .tx(move |conn| {
                        conn.execute(
                            "UPDATE images SET status = 'queued', data_object_id = NULL, \
                             updated_at = ?3 WHERE id = ?1 AND data_object_id = ?2",
                            params![i, o, ts(now())],
                        )?;
                        Ok(())
                    })
                    .await;
                self.delete_data(object).await;
                return Err(e);
            }
        };
        let md5 = hex(&hashes.md5.finalize());
        let sha512 = hex(&hashes.sha512.finalize());
        let done = {
            let id = id.clone();
            let o = object.to_string();
            self.tx(move |conn| {
                let Some(now_s) = load(conn, &id)? else {
                    return Ok(None);
                };
                if now_s.data_object.as_deref() != Some(o.as_str()) || now_s.image.status != to {
                    return Ok(None);
                }
                let status = if kind == UploadKind::Direct {
                    "active"
                } else {
                    "uploading"
                };
                conn.execute(
                    "UPDATE images SET status = ?2, size_bytes = ?3, checksum = ?4, \
                     os_hash_algo = 'sha512', os_hash_value = ?5, virtual_size = ?6, \
                     detected_format = ?7, updated_at = ?8 WHERE id = ?1",
                    params![
                        id,
                        status,
                        size as i64,
                        md5,
                        sha512,
                        vsize.map(|v| v as i64),
                        detected,
                        ts(now())
                    ],
                )?;
                let s = load(conn, &id)?.ok_or_else(|| no_image(&id))?;
                Ok(Some(Images::queue_cache_if_wanted(conn, &s)?))
            })
            .await?
        };
        match done {
            None => {
                // Deleted (or reset) while uploading: nothing refers to the object any more.
                self.delete_data(object).await;
                Err(ServiceError::Conflict(format!(
                    "Image {id} could not be found after upload. The image may have been deleted during the upload, cleaning up the chunks uploaded."
                )))
            }
            Some(queued) => {
                tracing::info!(image = %id, bytes = size, "image data stored");
                if queued {
                    let _ = self.cache_wanted.send(id);
                }
                Ok(())
            }
        }
    }
}
