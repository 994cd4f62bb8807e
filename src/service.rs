//! The daemon's implementation of [`admin_api::AdminService`]: the admin API's view of the
//! store and the catalog.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use uuid::Uuid;

use admin_api::image::ImageService;
use admin_api::{
    AdminService, ComponentHealth, ConversionMetrics, Health, StoreMetrics, VersionInfo, model::*,
};

use crate::{
    catalog::{self, Catalog},
    control::{Settings, identity::Identity, images::Images, volumes::Volumes},
    image::convert::Converter,
    nbd::InternalExports,
    remote::{RemoteIdentity, RemoteImages},
    store::{self, Store},
};

/// Git commit of the build, set by `build.rs` (or by `CAIRN_GIT_COMMIT` at build time).
pub const GIT_COMMIT: Option<&str> = option_env!("CAIRN_GIT_COMMIT");

/// How long a health check may wait for the catalog thread.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Name, version, commit and on-disk format versions of this binary.
pub fn version_info() -> VersionInfo {
    VersionInfo {
        name: env!("CARGO_PKG_NAME").to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: GIT_COMMIT.map(str::to_owned),
        store_format_version: store::FORMAT_VERSION,
        catalog_schema_version: catalog::SCHEMA_VERSION,
    }
}

pub struct DaemonService {
    store: Store,
    catalog: Catalog,
    identity: Identity,
    volumes: Arc<Volumes>,
    images: Arc<Images>,
    filesystems: crate::control::filesystems::Filesystems,
    /// Where volumes are uploaded to, when not to `images`.
    remote_images: Option<RemoteImages>,
    /// Checks the tokens `identity` did not issue.
    remote_identity: Option<RemoteIdentity>,
    /// (user, project) pairs of remote callers already recorded (see [`Identity::shadow`]).
    shadowed: parking_lot::Mutex<std::collections::HashSet<(String, String)>>,
    /// Scratch space for uploads as vmdk and vdi.
    tmp_dir: std::path::PathBuf,
    shutting_down: AtomicBool,
    /// The FUSE views' state for `/healthz`: `None` until the daemon decided, then `Ok` (mounted)
    /// or why not.
    fuse: parking_lot::Mutex<Option<Result<(), String>>>,
}

/// Where an upload to an image sends the volume.
enum UploadTarget {
    /// This daemon's own image service: the image's data is the copy's chunks, shared.
    Own,
    /// An external image service, called with the caller's token.
    Remote(RemoteImages, String),
}

impl DaemonService {
    /// `internal`: where image conversions open their NBD exports.
    pub fn new(
        store: Store,
        catalog: Catalog,
        settings: Settings,
        internal: Arc<InternalExports>,
    ) -> Arc<Self> {
        let converter = Converter::new(
            store.clone(),
            settings.nbd_socket.clone(),
            internal,
            settings.convert_jobs,
        );
        Arc::new(Self {
            filesystems: crate::control::filesystems::Filesystems::new(catalog.clone()),
            remote_images: settings.image_service_url.as_deref().map(RemoteImages::new),
            remote_identity: settings.identity_url.as_deref().map(RemoteIdentity::new),
            tmp_dir: settings.tmp_dir.clone(),
            shadowed: Default::default(),
            identity: Identity::new(catalog.clone(), settings.clone()),
            images: Images::new(catalog.clone(), store.clone(), settings.clone(), converter),
            volumes: Arc::new(Volumes::new(catalog.clone(), store.clone(), settings)),
            store,
            catalog,
            shutting_down: AtomicBool::new(false),
            fuse: parking_lot::Mutex::new(None),
        })
    }

    /// Shared filesystems' data: their quotas, and their data dropped with them.
    pub fn set_filesystem_data(&self, hub: Arc<crate::fs::FsHub>) {
        self.filesystems.set_data(hub);
    }

    /// Whether the FUSE views are mounted, or why not (shown by `/healthz`).
    pub fn set_fuse_status(&self, status: Result<(), String>) {
        *self.fuse.lock() = Some(status);
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn images(&self) -> Arc<Images> {
        self.images.clone()
    }

    /// Puts volumes and images a restart interrupted back in motion (see their `recover`);
    /// uploads of volumes to images start again from their copy (the image went back to
    /// `queued` with the images' recovery).
    pub async fn recover(&self) -> ServiceResult<()> {
        self.images.recover().await?;
        self.volumes.recover(&self.images).await?;
        for (volume, copy, image) in self.volumes.cut_uploads().await? {
            let Some(image) = image else {
                self.volumes.end_upload(&volume, copy).await;
                continue;
            };
            let Ok(v) = self.store.object_info(copy) else {
                self.volumes.end_upload(&volume, copy).await;
                continue;
            };
            let project = self.volumes.project_of(&volume).await.unwrap_or_default();
            let caller = system_caller(project);
            if let Err(ServiceError::NotFound(_)) = self.images.get_image(&caller, &image).await {
                // Not one of ours: an external image service's, which only the caller's
                // token (gone with the restart) may fill or delete there.
                tracing::error!(volume = %volume, image = %image,
                    "an upload to the external image service was cut by a restart; the volume \
                     is restored, the image there stays queued");
                self.volumes.end_upload(&volume, copy).await;
                continue;
            }
            tracing::info!(volume = %volume, image = %image, "resuming an upload to an image");
            self.spawn_upload(caller, UploadTarget::Own, volume, copy, image, v.size);
        }
        Ok(())
    }

    /// The job of an upload to an image: streams the copy into the image, then ends the
    /// upload (the copy goes, the volume's status comes back). A failed upload deletes its
    /// image; an image found already active (a restart after the end) is left alone.
    fn spawn_upload(
        &self,
        caller: Caller,
        target: UploadTarget,
        volume_id: String,
        copy: Uuid,
        image_id: String,
        size: u64,
    ) {
        let (images, volumes, store) = (
            self.images.clone(),
            self.volumes.clone(),
            self.store.clone(),
        );
        let tmp_dir = self.tmp_dir.clone();
        tokio::spawn(async move {
            // Fault injection (tests): the upload waits here until the named file exists,
            // having made `<file>.waiting`, so that a test can cut it.
            if let Some(gate) = std::env::var_os("CAIRN_UPLOAD_GATE").map(std::path::PathBuf::from)
            {
                let _ = std::fs::write(gate.with_extension("waiting"), b"");
                while !gate.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let started = std::time::Instant::now();
            let job = UploadJob {
                images: &images,
                tmp_dir: &tmp_dir,
                store: &store,
                image_id: &image_id,
                copy,
                size,
            };
            let r = match &target {
                UploadTarget::Own => upload_own(&job, &caller).await,
                UploadTarget::Remote(remote, token) => upload_remote(&job, remote, token).await,
            };
            match r {
                Ok(()) => tracing::info!(volume = %volume_id, image = %image_id,
                    ms = started.elapsed().as_millis() as u64, "volume uploaded to an image"),
                Err(e) => {
                    tracing::error!(volume = %volume_id, image = %image_id, error = %e,
                        "uploading a volume to an image failed; the image is deleted");
                    // What the project can read back (`cinder message-list`), as cinder does.
                    volumes
                        .record_upload_failure(&caller.project_id, &volume_id, &e)
                        .await;
                    let deleted = match &target {
                        UploadTarget::Own => images.delete_image(&caller, &image_id).await,
                        UploadTarget::Remote(remote, token) => {
                            remote.delete(token, &image_id).await
                        }
                    };
                    if let Err(e) = deleted {
                        tracing::warn!(image = %image_id, error = %e, "deleting a failed upload's image");
                    }
                }
            }
            volumes.end_upload(&volume_id, copy).await;
        });
    }

    /// Where detaching a volume ends its NBD export (see [`crate::nbd::Fence`]).
    pub fn export_fence(&self) -> std::sync::Arc<crate::nbd::Fence> {
        self.volumes.fence()
    }

    /// From now on `/healthz` answers 503, so load balancers stop sending new work while
    /// in-flight requests drain.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}

/// The daemon acting on its own (resuming work a restart cut), with admin rights in `project`.
fn system_caller(project: String) -> Caller {
    Caller {
        user_id: "cairn".into(),
        user_name: "cairn".into(),
        project_id: project,
        project_name: String::new(),
        roles: vec![Role::Admin],
    }
}

#[async_trait::async_trait]
impl AdminService for DaemonService {
    async fn health(&self) -> Health {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Health {
                components: vec![
                    ComponentHealth::failed("store", "shutting down"),
                    ComponentHealth::failed("catalog", "shutting down"),
                ],
            };
        }
        // The store has no failure state to ask yet: open means usable.
        let store = ComponentHealth::ok("store");
        let catalog = match tokio::time::timeout(HEALTH_TIMEOUT, self.catalog.ping()).await {
            Ok(Ok(())) => ComponentHealth::ok("catalog"),
            Ok(Err(e)) => ComponentHealth::failed("catalog", e.to_string()),
            Err(_) => {
                ComponentHealth::failed("catalog", format!("no answer within {HEALTH_TIMEOUT:?}"))
            }
        };
        let mut components = vec![store, catalog];
        if let Some(fuse) = &*self.fuse.lock() {
            components.push(match fuse {
                Ok(()) => ComponentHealth::ok("fuse"),
                // The rest of the daemon serves on: a note, not a failure.
                Err(why) => ComponentHealth::degraded("fuse", format!("disabled: {why}")),
            });
        }
        Health { components }
    }

    fn version(&self) -> VersionInfo {
        version_info()
    }

    fn conversion_metrics(&self) -> ConversionMetrics {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.images.converter().stats;
        ConversionMetrics {
            running: s.running.load(Relaxed),
            waiting: s.waiting.load(Relaxed),
            completed: s.completed.load(Relaxed),
            in_process: s.in_process.load(Relaxed),
            failed: s.failed.load(Relaxed),
            bytes_total: s.bytes_total.load(Relaxed),
            bytes_done: s.bytes_done.load(Relaxed),
        }
    }

    fn store_metrics(&self) -> StoreMetrics {
        let s = self.store.stats();
        StoreMetrics {
            objects: s.objects,
            logical_bytes: s.logical_bytes,
            allocated_bytes: s.allocated_bytes,
            physical_bytes: s.physical_bytes,
            free_bytes: s.free_bytes,
            segments: s.segments,
            checksum_errors: s.checksum_errors,
            healed_blocks: s.healed_blocks,
            read_retries: s.read_retries,
            reads: s.reads,
            writes: s.writes,
            read_bytes: s.read_bytes,
            written_bytes: s.written_bytes,
            flushes: s.flushes,
        }
    }

    fn public_url(&self) -> String {
        self.identity.settings.public_url.clone()
    }

    async fn issue_token(&self, req: AuthRequest) -> ServiceResult<IssuedToken> {
        self.identity.issue_token(req).await
    }

    async fn validate_token(&self, token: &str) -> ServiceResult<TokenInfo> {
        match (
            self.identity.validate_token(token).await,
            &self.remote_identity,
        ) {
            (Err(ServiceError::Unauthorized(_) | ServiceError::NotFound(_)), Some(remote)) => {
                let info = remote.validate(token).await?;
                let key = (info.caller.user_id.clone(), info.caller.project_id.clone());
                if !self.shadowed.lock().contains(&key) {
                    self.identity.shadow(&info.caller).await?;
                    self.shadowed.lock().insert(key);
                }
                Ok(info)
            }
            (local, _) => local,
        }
    }

    async fn revoke_token(&self, caller: &Caller, token: &str) -> ServiceResult<()> {
        self.identity.revoke_token(caller, token).await
    }

    async fn authenticate_basic(&self, user: &str, password: &str) -> ServiceResult<Caller> {
        self.identity.authenticate_basic(user, password).await
    }

    async fn list_projects(&self, caller: &Caller) -> ServiceResult<Vec<Project>> {
        self.identity.list_projects(caller).await
    }

    async fn get_project(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<Project> {
        self.identity.get_project(caller, id_or_name).await
    }

    async fn create_project(&self, caller: &Caller, new: NewProject) -> ServiceResult<Project> {
        self.identity.create_project(caller, new).await
    }

    async fn delete_project(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.identity.delete_project(caller, id).await
    }

    async fn list_users(&self, caller: &Caller) -> ServiceResult<Vec<User>> {
        self.identity.list_users(caller).await
    }

    async fn get_user(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<User> {
        self.identity.get_user(caller, id_or_name).await
    }

    async fn create_user(&self, caller: &Caller, new: NewUser) -> ServiceResult<User> {
        self.identity.create_user(caller, new).await
    }

    async fn delete_user(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.identity.delete_user(caller, id).await
    }

    async fn list_roles(&self, caller: &Caller) -> ServiceResult<Vec<Named>> {
        self.identity.list_roles(caller).await
    }

    async fn list_role_assignments(
        &self,
        caller: &Caller,
        project_id: Option<&str>,
        user_id: Option<&str>,
    ) -> ServiceResult<Vec<RoleAssignment>> {
        self.identity
            .list_role_assignments(caller, project_id, user_id)
            .await
    }

    async fn grant_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        self.identity
            .grant_role(caller, project_id, user_id, role)
            .await
    }

    async fn revoke_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        self.identity
            .revoke_role(caller, project_id, user_id, role)
            .await
    }

    async fn create_volume(&self, caller: &Caller, new: NewVolume) -> ServiceResult<Volume> {
        self.volumes
            .create_volume_with(caller, new, Some(&self.images))
            .await
    }

    async fn list_volumes(
        &self,
        caller: &Caller,
        scope: VolumeScope,
    ) -> ServiceResult<Vec<Volume>> {
        self.volumes.list_volumes(caller, scope).await
    }

    async fn get_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<Volume> {
        self.volumes.get_volume(caller, id, pdisk_rules).await
    }

    async fn update_volume(
        &self,
        caller: &Caller,
        id: &str,
        update: VolumeUpdate,
    ) -> ServiceResult<Volume> {
        self.volumes.update_volume(caller, id, update).await
    }

    async fn list_volume_types(&self, caller: &Caller) -> ServiceResult<Vec<VolumeType>> {
        self.volumes.list_volume_types(caller).await
    }

    async fn get_volume_type(&self, caller: &Caller, id: &str) -> ServiceResult<VolumeType> {
        self.volumes.get_volume_type(caller, id).await
    }

    async fn create_volume_type(
        &self,
        caller: &Caller,
        new: VolumeTypeChange,
    ) -> ServiceResult<VolumeType> {
        self.volumes.create_volume_type(caller, new).await
    }

    async fn update_volume_type(
        &self,
        caller: &Caller,
        id: &str,
        change: VolumeTypeChange,
    ) -> ServiceResult<VolumeType> {
        self.volumes.update_volume_type(caller, id, change).await
    }

    async fn delete_volume_type(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.volumes.delete_volume_type(caller, id).await
    }

    async fn volume_usage(&self, caller: &Caller) -> ServiceResult<VolumeUsage> {
        self.volumes.volume_usage(caller).await
    }

    async fn create_snapshot(&self, caller: &Caller, new: NewSnapshot) -> ServiceResult<Snapshot> {
        self.volumes.create_snapshot(caller, new).await
    }

    async fn list_snapshots(&self, caller: &Caller, all: bool) -> ServiceResult<Vec<Snapshot>> {
        self.volumes.list_snapshots(caller, all).await
    }

    async fn get_snapshot(&self, caller: &Caller, id: &str) -> ServiceResult<Snapshot> {
        self.volumes.get_snapshot(caller, id).await
    }

    async fn update_snapshot(
        &self,
        caller: &Caller,
        id: &str,
        name: Option<Option<String>>,
        description: Option<Option<String>>,
    ) -> ServiceResult<Snapshot> {
        self.volumes
            .update_snapshot(caller, id, name, description)
            .await
    }

    async fn delete_snapshot(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.volumes.delete_snapshot(caller, id).await
    }

    async fn upload_volume_to_image(
        &self,
        caller: &Caller,
        id: &str,
        req: VolumeUpload,
    ) -> ServiceResult<VolumeUploaded> {
        // cinder's order: the volume (404), the policy (403), then its status (400).
        let v = self.volumes.get_volume(caller, id, false).await?;
        if !caller.has(Role::Member) {
            return Err(ServiceError::Forbidden(
                "Policy doesn't allow volume_extension:volume_actions:upload_image to be performed."
                    .into(),
            ));
        }
        if req.visibility.as_deref() == Some("public") && !caller.is_admin() {
            return Err(ServiceError::Forbidden(
                "Policy doesn't allow volume_extension:volume_actions:upload_public to be performed."
                    .into(),
            ));
        }
        if req.disk_format == "iso" {
            // Accepted, and no image is made (seed 003's footnote).
            crate::control::volumes::check_upload(&v, req.force)?;
            return Ok(VolumeUploaded {
                volume: v,
                image_id: None,
                visibility: None,
                protected: None,
            });
        }
        let (before, copy) = self
            .volumes
            .begin_upload(caller, id, req.force, req.request_id.as_deref())
            .await?;
        let new = admin_api::image::NewImage {
            name: Some(req.image_name.clone()),
            disk_format: Some(req.disk_format.clone()),
            container_format: Some(req.container_format.clone()),
            min_disk: before.size_gib,
            visibility: req.visibility.clone(),
            protected: req.protected.unwrap_or(false),
            ..Default::default()
        };
        let made = match &self.remote_images {
            None => admin_api::image::ImageService::create_image(&*self.images, caller, new)
                .await
                .map(|i| (i.id, i.visibility, i.protected, UploadTarget::Own)),
            Some(remote) => match req.token.as_deref() {
                // Cinder creates the image in Glance first, with the caller's token.
                Some(token) => remote
                    .create(
                        token,
                        crate::remote::new_image_fields(
                            &req.image_name,
                            &req.disk_format,
                            &req.container_format,
                            before.size_gib,
                            req.visibility.as_deref(),
                            req.protected,
                        ),
                    )
                    .await
                    .map(|i| {
                        let target = UploadTarget::Remote(remote.clone(), token.to_owned());
                        (i.id, i.visibility, i.protected, target)
                    }),
                None => Err(ServiceError::Unauthorized(
                    "The request you have made requires authentication.".into(),
                )),
            },
        };
        let (image_id, visibility, protected, target) = match made {
            Ok(m) => m,
            Err(e) => {
                self.volumes.end_upload(&before.id, copy).await;
                return Err(e);
            }
        };
        if let Err(e) = self.volumes.set_upload_image(&before.id, &image_id).await {
            self.volumes.end_upload(&before.id, copy).await;
            return Err(e);
        }
        self.spawn_upload(
            caller.clone(),
            target,
            before.id.clone(),
            copy,
            image_id.clone(),
            before.size_gib << 30,
        );
        let volume = self.volumes.get_volume(caller, id, false).await;
        Ok(VolumeUploaded {
            volume: volume.unwrap_or(before),
            visibility: Some(visibility),
            protected: Some(protected),
            image_id: Some(image_id),
        })
    }

    async fn list_messages(&self, caller: &Caller) -> ServiceResult<Vec<UserMessage>> {
        self.volumes.list_messages(caller).await
    }

    async fn get_message(&self, caller: &Caller, id: &str) -> ServiceResult<UserMessage> {
        self.volumes.get_message(caller, id).await
    }

    async fn delete_message(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.volumes.delete_message(caller, id).await
    }

    async fn extend_volume(
        &self,
        caller: &Caller,
        id: &str,
        new_size_gib: u64,
    ) -> ServiceResult<()> {
        self.volumes.extend_volume(caller, id, new_size_gib).await
    }

    async fn set_volume_flags(
        &self,
        caller: &Caller,
        id: &str,
        flags: VolumeFlags,
    ) -> ServiceResult<()> {
        self.volumes.set_volume_flags(caller, id, flags).await
    }

    async fn reset_volume_status(
        &self,
        caller: &Caller,
        id: &str,
        status: VolumeStatus,
    ) -> ServiceResult<()> {
        self.volumes.reset_volume_status(caller, id, status).await
    }

    async fn delete_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<()> {
        self.volumes.delete_volume(caller, id, pdisk_rules).await
    }

    async fn volume_attach_step(
        &self,
        caller: &Caller,
        id: &str,
        step: AttachStep,
    ) -> ServiceResult<()> {
        self.volumes.attach_step(caller, id, step).await
    }

    async fn volume_attach(
        &self,
        caller: &Caller,
        id: &str,
        req: VolumeAttach,
    ) -> ServiceResult<Attachment> {
        self.volumes.cinder_attach(caller, id, req).await
    }

    async fn volume_detach(
        &self,
        caller: &Caller,
        id: &str,
        attachment_id: Option<String>,
    ) -> ServiceResult<Option<Attachment>> {
        self.volumes.cinder_detach(caller, id, attachment_id).await
    }

    async fn volume_connection(
        &self,
        caller: &Caller,
        id: &str,
    ) -> ServiceResult<VolumeConnection> {
        self.volumes.connection(caller, id).await
    }

    async fn put_filesystem(
        &self,
        caller: &Caller,
        name: &str,
        req: admin_api::filesystem::FsRequest,
    ) -> ServiceResult<(admin_api::filesystem::Filesystem, bool)> {
        self.filesystems.put(caller, name, req).await
    }

    async fn list_filesystems(
        &self,
        caller: &Caller,
    ) -> ServiceResult<Vec<admin_api::filesystem::Filesystem>> {
        self.filesystems.list(caller).await
    }

    async fn get_filesystem(
        &self,
        caller: &Caller,
        name: &str,
    ) -> ServiceResult<admin_api::filesystem::Filesystem> {
        self.filesystems.get(caller, name).await
    }

    async fn delete_filesystem(&self, caller: &Caller, name: &str) -> ServiceResult<()> {
        self.filesystems.delete(caller, name).await
    }

    async fn filesystem_instances(
        &self,
        caller: &Caller,
        name: &str,
    ) -> ServiceResult<Vec<String>> {
        self.filesystems.instances(caller, name).await
    }

    async fn connect_filesystem(
        &self,
        caller: &Caller,
        name: &str,
        instance: &str,
        on: bool,
    ) -> ServiceResult<()> {
        if on {
            self.filesystems.connect(caller, name, instance).await
        } else {
            self.filesystems.disconnect(caller, name, instance).await
        }
    }

    async fn create_server(&self, caller: &Caller, new: NewServer) -> ServiceResult<Server> {
        self.volumes.create_server(caller, new).await
    }

    async fn list_servers(&self, caller: &Caller) -> ServiceResult<Vec<Server>> {
        self.volumes.list_servers(caller).await
    }

    async fn get_server(&self, caller: &Caller, id: &str) -> ServiceResult<Server> {
        self.volumes.get_server(caller, id).await
    }

    async fn delete_server(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        self.volumes.delete_server(caller, id).await
    }

    async fn attach(&self, caller: &Caller, req: AttachRequest) -> ServiceResult<Attachment> {
        self.volumes.attach(caller, req).await
    }

    async fn detach(
        &self,
        caller: &Caller,
        target: AttachTarget,
        volume_id: &str,
        hot_only: bool,
    ) -> ServiceResult<Attachment> {
        self.volumes
            .detach(caller, target, volume_id, hot_only)
            .await
    }

    async fn detach_all(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        self.volumes.detach_all(caller, target).await
    }

    async fn list_attachments(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        self.volumes.list_attachments(caller, target).await
    }
}

/// What an upload job works on.
#[derive(Clone, Copy)]
struct UploadJob<'a> {
    images: &'a Arc<Images>,
    /// Scratch space for formats `qemu-img` writes.
    tmp_dir: &'a std::path::Path,
    store: &'a Store,
    image_id: &'a str,
    /// The volume's point-in-time copy.
    copy: Uuid,
    size: u64,
}

/// An upload into this daemon's own image service. Where the store allows, the image's data
/// is the copy's chunks, shared: raw is a clone of the copy, qcow2 writes only its metadata.
async fn upload_own(job: &UploadJob<'_>, caller: &Caller) -> ServiceResult<()> {
    use admin_api::image::UploadKind;
    let UploadJob {
        images,
        store,
        image_id,
        copy,
        size,
        ..
    } = *job;
    let image = images.get_image(caller, image_id).await?;
    match image.status.as_str() {
        "active" => return Ok(()),
        "queued" => {}
        other => return Err(ServiceError::Conflict(format!("the image is {other}"))),
    }
    if let Some(format @ ("vmdk" | "vdi")) = image.disk_format.as_deref() {
        let (body, len) = converted(job, format).await?;
        return images
            .upload(caller, image_id, UploadKind::Direct, body, Some(len))
            .await;
    }
    let qcow2 = image.disk_format.as_deref() == Some("qcow2");
    if qcow2 && !crate::image::qcow2_out::can_build(store, size) {
        let (body, len) = crate::image::qcow2_out::stream(store.clone(), copy, size)
            .await
            .map_err(|e| ServiceError::Internal(format!("qcow2 layout: {e}")))?;
        return images
            .upload(caller, image_id, UploadKind::Direct, body, Some(len))
            .await;
    }
    let store = store.clone();
    let build: crate::control::images::BuildData = Box::new(move |object| {
        Box::pin(async move {
            let made = if qcow2 {
                crate::image::qcow2_out::build(store, copy, size, object).await
            } else {
                store
                    .clone_object(copy, object)
                    .await
                    .map(|()| size)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            };
            made.map_err(|e| ServiceError::Internal(format!("the image's data: {e}")))
        })
    });
    images.upload_built(caller, image_id, build).await
}

/// An upload to an external image service: the copy streamed (raw as it is, qcow2 laid out
/// in stream order) in one chunked `PUT`.
async fn upload_remote(
    job: &UploadJob<'_>,
    remote: &RemoteImages,
    token: &str,
) -> ServiceResult<()> {
    let UploadJob {
        store,
        image_id,
        copy,
        size,
        ..
    } = *job;
    let image = remote.get(token, image_id).await?;
    match image.status.as_str() {
        "active" => return Ok(()),
        "queued" => {}
        other => return Err(ServiceError::Conflict(format!("the image is {other}"))),
    }
    let body = match image.disk_format.as_deref() {
        Some("qcow2") => {
            crate::image::qcow2_out::stream(store.clone(), copy, size)
                .await
                .map_err(|e| ServiceError::Internal(format!("qcow2 layout: {e}")))?
                .0
        }
        Some(format @ ("vmdk" | "vdi")) => converted(job, format).await?.0,
        _ => crate::image::object_stream(store.clone(), copy, size),
    };
    remote.upload(token, image_id, body).await
}

/// The copy as a `format` (vmdk, vdi) image: `qemu-img` writes it into the scratch space,
/// and it is read back from there. The file is unlinked once open, so it goes when the
/// stream ends (or with the next start's emptying of the scratch space, after a crash).
async fn converted(
    job: &UploadJob<'_>,
    format: &str,
) -> ServiceResult<(admin_api::image::ByteStream, u64)> {
    let UploadJob {
        images,
        tmp_dir,
        copy,
        size,
        ..
    } = *job;
    let path = tmp_dir.join(format!("upload-{}.{format}", Uuid::new_v4()));
    let made = images
        .converter()
        .export_file(copy, size, format, &path)
        .await;
    let opened = made
        .map_err(|e| ServiceError::Internal(format!("writing the volume as {format}: {e}")))
        .and_then(|()| {
            std::fs::File::open(&path)
                .and_then(|f| Ok((f.metadata()?.len(), f)))
                .map_err(|e| ServiceError::Internal(format!("reading {}: {e}", path.display())))
        });
    let _ = std::fs::remove_file(&path);
    let (len, file) = opened?;
    Ok((crate::image::file_stream(file), len))
}
