//! The service trait the daemon implements, and the plain types that cross it.

use serde::Serialize;

use crate::model::*;

/// What the admin API needs from the daemon. Implemented by `cairn::service`; tests may
/// implement it with fakes.
///
/// `async-trait` keeps the trait usable as `Arc<dyn AdminService>` (native `async fn` in
/// traits is not dyn-compatible yet).
#[async_trait::async_trait]
pub trait AdminService: Send + Sync + 'static {
    /// Whether the daemon's parts can serve requests right now. Must not hang: implementors
    /// bound their own checks with a timeout.
    async fn health(&self) -> Health;

    /// Build and format identification for `/version`.
    fn version(&self) -> VersionInfo;

    /// A snapshot of the store counters for `/metrics`. Called on every scrape; must be cheap.
    fn store_metrics(&self) -> StoreMetrics;
    /// Image conversions (raw caches, volumes filled from images) for `/metrics`.
    fn conversion_metrics(&self) -> ConversionMetrics {
        ConversionMetrics::default()
    }

    /// Base URL of this API as clients reach it, without a trailing `/` (service catalog,
    /// Keystone `links`). The default suits router tests.
    fn public_url(&self) -> String {
        "http://localhost".to_owned()
    }

    // ---- identity -------------------------------------------------------------------------
    // Defaults answer `Internal("not implemented")` so that router tests can use small fakes;
    // the daemon implements every method.

    /// `POST /v3/auth/tokens`: check the credentials and issue a project-scoped token.
    async fn issue_token(&self, req: AuthRequest) -> ServiceResult<IssuedToken> {
        let _ = req;
        Err(unimplemented())
    }
    /// Resolve a token (`X-Auth-Token`, `X-Subject-Token`); expired or revoked -> Unauthorized.
    async fn validate_token(&self, token: &str) -> ServiceResult<TokenInfo> {
        let _ = token;
        Err(unimplemented())
    }
    /// Revoke `token` (`DELETE /v3/auth/tokens`). The caller must own it or be an admin.
    async fn revoke_token(&self, caller: &Caller, token: &str) -> ServiceResult<()> {
        let _ = (caller, token);
        Err(unimplemented())
    }
    /// HTTP Basic for pdisk: user name + password, scoped to the user's default project.
    async fn authenticate_basic(&self, user: &str, password: &str) -> ServiceResult<Caller> {
        let _ = (user, password);
        Err(unimplemented())
    }

    async fn list_projects(&self, caller: &Caller) -> ServiceResult<Vec<Project>> {
        let _ = caller;
        Err(unimplemented())
    }
    /// By id or, failing that, by name.
    async fn get_project(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<Project> {
        let _ = (caller, id_or_name);
        Err(unimplemented())
    }
    async fn create_project(&self, caller: &Caller, new: NewProject) -> ServiceResult<Project> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    async fn delete_project(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    async fn list_users(&self, caller: &Caller) -> ServiceResult<Vec<User>> {
        let _ = caller;
        Err(unimplemented())
    }
    /// By id or, failing that, by name.
    async fn get_user(&self, caller: &Caller, id_or_name: &str) -> ServiceResult<User> {
        let _ = (caller, id_or_name);
        Err(unimplemented())
    }
    async fn create_user(&self, caller: &Caller, new: NewUser) -> ServiceResult<User> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    async fn delete_user(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// The roles that exist (reader, member, admin) with their ids.
    async fn list_roles(&self, caller: &Caller) -> ServiceResult<Vec<Named>> {
        let _ = caller;
        Err(unimplemented())
    }
    async fn list_role_assignments(
        &self,
        caller: &Caller,
        project_id: Option<&str>,
        user_id: Option<&str>,
    ) -> ServiceResult<Vec<RoleAssignment>> {
        let _ = (caller, project_id, user_id);
        Err(unimplemented())
    }
    /// Grant `role` (id or name) to a user on a project. Idempotent.
    async fn grant_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        let _ = (caller, project_id, user_id, role);
        Err(unimplemented())
    }
    /// NotFound if the user does not hold the role there.
    async fn revoke_role(
        &self,
        caller: &Caller,
        project_id: &str,
        user_id: &str,
        role: &str,
    ) -> ServiceResult<()> {
        let _ = (caller, project_id, user_id, role);
        Err(unimplemented())
    }

    // ---- volumes, servers, attachments ----------------------------------------------------

    async fn create_volume(&self, caller: &Caller, new: NewVolume) -> ServiceResult<Volume> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    async fn list_volumes(
        &self,
        caller: &Caller,
        scope: VolumeScope,
    ) -> ServiceResult<Vec<Volume>> {
        let _ = (caller, scope);
        Err(unimplemented())
    }
    /// A volume the caller may see: its project's (any role), any for an admin. With
    /// `pdisk_rules`, also public disks of other projects, and "may see" follows pdisk
    /// (owner, public, admin).
    async fn get_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<Volume> {
        let _ = (caller, id, pdisk_rules);
        Err(unimplemented())
    }
    /// Name, description, metadata (Block Storage `PUT`); needs member on the volume's project.
    async fn update_volume(
        &self,
        caller: &Caller,
        id: &str,
        update: VolumeUpdate,
    ) -> ServiceResult<Volume> {
        let _ = (caller, id, update);
        Err(unimplemented())
    }
    /// Block Storage volume types: everyone lists and shows them, admins change them.
    async fn list_volume_types(&self, caller: &Caller) -> ServiceResult<Vec<VolumeType>> {
        let _ = caller;
        Err(unimplemented())
    }
    /// By id or name; `default` is the default type.
    async fn get_volume_type(&self, caller: &Caller, id: &str) -> ServiceResult<VolumeType> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    async fn create_volume_type(
        &self,
        caller: &Caller,
        new: VolumeTypeChange,
    ) -> ServiceResult<VolumeType> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    async fn update_volume_type(
        &self,
        caller: &Caller,
        id: &str,
        change: VolumeTypeChange,
    ) -> ServiceResult<VolumeType> {
        let _ = (caller, id, change);
        Err(unimplemented())
    }
    /// Refused while volumes use it, and for the default type.
    async fn delete_volume_type(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// What the caller's project holds (Block Storage `/limits`).
    async fn volume_usage(&self, caller: &Caller) -> ServiceResult<VolumeUsage> {
        let _ = caller;
        Err(unimplemented())
    }
    /// Block Storage snapshots: a point-in-time copy-on-write clone of a volume.
    async fn create_snapshot(&self, caller: &Caller, new: NewSnapshot) -> ServiceResult<Snapshot> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    /// The caller's project's snapshots (every project's with `all_projects`, admins).
    async fn list_snapshots(
        &self,
        caller: &Caller,
        all_projects: bool,
    ) -> ServiceResult<Vec<Snapshot>> {
        let _ = (caller, all_projects);
        Err(unimplemented())
    }
    async fn get_snapshot(&self, caller: &Caller, id: &str) -> ServiceResult<Snapshot> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Name and description (`Some(None)` clears).
    async fn update_snapshot(
        &self,
        caller: &Caller,
        id: &str,
        name: Option<Option<String>>,
        description: Option<Option<String>>,
    ) -> ServiceResult<Snapshot> {
        let _ = (caller, id, name, description);
        Err(unimplemented())
    }
    async fn delete_snapshot(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Block Storage `os-volume_upload_image`: a queued image is made, the volume goes
    /// `uploading`, and a job streams a point-in-time copy of its data into the image.
    async fn upload_volume_to_image(
        &self,
        caller: &Caller,
        id: &str,
        req: VolumeUpload,
    ) -> ServiceResult<VolumeUploaded> {
        let _ = (caller, id, req);
        Err(unimplemented())
    }
    /// Block Storage user messages (`/messages`, 3.3): the caller's project's, every
    /// project's for an admin; newest first; none past its `expires_at`.
    async fn list_messages(&self, caller: &Caller) -> ServiceResult<Vec<UserMessage>> {
        let _ = caller;
        Err(unimplemented())
    }
    /// One message; NotFound for another project's (unless admin) or an expired one.
    async fn get_message(&self, caller: &Caller, id: &str) -> ServiceResult<UserMessage> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Deletes a message: NotFound as [`get_message`](Self::get_message), then Forbidden
    /// without member (cinder's `message:delete`).
    async fn delete_message(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Block Storage `os-extend`: grow to `new_size_gib` (available or in-use).
    async fn extend_volume(
        &self,
        caller: &Caller,
        id: &str,
        new_size_gib: u64,
    ) -> ServiceResult<()> {
        let _ = (caller, id, new_size_gib);
        Err(unimplemented())
    }
    /// Block Storage `os-set_bootable` / `os-update_readonly_flag`.
    async fn set_volume_flags(
        &self,
        caller: &Caller,
        id: &str,
        flags: VolumeFlags,
    ) -> ServiceResult<()> {
        let _ = (caller, id, flags);
        Err(unimplemented())
    }
    /// Block Storage `os-reset_status` (admins).
    async fn reset_volume_status(
        &self,
        caller: &Caller,
        id: &str,
        status: VolumeStatus,
    ) -> ServiceResult<()> {
        let _ = (caller, id, status);
        Err(unimplemented())
    }
    /// Block Storage's attach-flow status steps (`os-reserve`, `os-unreserve`,
    /// `os-begin_detaching`, `os-roll_detaching`, `os-terminate_connection`).
    async fn volume_attach_step(
        &self,
        caller: &Caller,
        id: &str,
        step: AttachStep,
    ) -> ServiceResult<()> {
        let _ = (caller, id, step);
        Err(unimplemented())
    }
    /// Block Storage `os-attach`: attaches to a server as Compute does (same records, same
    /// export), taking a reserved (`attaching`) volume too.
    async fn volume_attach(
        &self,
        caller: &Caller,
        id: &str,
        req: VolumeAttach,
    ) -> ServiceResult<Attachment> {
        let _ = (caller, id, req);
        Err(unimplemented())
    }
    /// Block Storage `os-detach`: ends one attachment (the only one when `attachment_id` is
    /// `None`) as Compute's detach does, export fence included. `None` when there was none.
    async fn volume_detach(
        &self,
        caller: &Caller,
        id: &str,
        attachment_id: Option<String>,
    ) -> ServiceResult<Option<Attachment>> {
        let _ = (caller, id, attachment_id);
        Err(unimplemented())
    }
    /// Block Storage `os-initialize_connection`: where the volume's export is served.
    async fn volume_connection(
        &self,
        caller: &Caller,
        id: &str,
    ) -> ServiceResult<VolumeConnection> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Refused (Conflict) while attached; needs member on the volume's project (pdisk: the
    /// owner or an admin).
    async fn delete_volume(
        &self,
        caller: &Caller,
        id: &str,
        pdisk_rules: bool,
    ) -> ServiceResult<()> {
        let _ = (caller, id, pdisk_rules);
        Err(unimplemented())
    }

    /// Shared filesystems (seed 002): creates `name`, or resizes it (same scope and project).
    /// True when it was made.
    async fn put_filesystem(
        &self,
        caller: &Caller,
        name: &str,
        req: crate::filesystem::FsRequest,
    ) -> ServiceResult<(crate::filesystem::Filesystem, bool)> {
        let _ = (caller, name, req);
        Err(unimplemented())
    }

    async fn list_filesystems(
        &self,
        caller: &Caller,
    ) -> ServiceResult<Vec<crate::filesystem::Filesystem>> {
        let _ = caller;
        Err(unimplemented())
    }

    async fn get_filesystem(
        &self,
        caller: &Caller,
        name: &str,
    ) -> ServiceResult<crate::filesystem::Filesystem> {
        let _ = (caller, name);
        Err(unimplemented())
    }

    async fn delete_filesystem(&self, caller: &Caller, name: &str) -> ServiceResult<()> {
        let _ = (caller, name);
        Err(unimplemented())
    }

    /// The instances that see `name` now.
    async fn filesystem_instances(
        &self,
        caller: &Caller,
        name: &str,
    ) -> ServiceResult<Vec<String>> {
        let _ = (caller, name);
        Err(unimplemented())
    }

    /// Connects (`on`) or disconnects an instance of a scope `instance` filesystem.
    async fn connect_filesystem(
        &self,
        caller: &Caller,
        name: &str,
        instance: &str,
        on: bool,
    ) -> ServiceResult<()> {
        let _ = (caller, name, instance, on);
        Err(unimplemented())
    }

    async fn create_server(&self, caller: &Caller, new: NewServer) -> ServiceResult<Server> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    async fn list_servers(&self, caller: &Caller) -> ServiceResult<Vec<Server>> {
        let _ = caller;
        Err(unimplemented())
    }
    async fn get_server(&self, caller: &Caller, id: &str) -> ServiceResult<Server> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Detaches every volume of the server, then forgets it.
    async fn delete_server(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }

    /// Attach atomically: a volume at its user limit (1 unless multi-attach) -> Conflict, an
    /// unknown server or volume -> NotFound, pdisk targets past `vdz` -> OverLimit.
    async fn attach(&self, caller: &Caller, req: AttachRequest) -> ServiceResult<Attachment> {
        let _ = (caller, req);
        Err(unimplemented())
    }
    /// Detach `volume_id` from the target; NotFound if it is not attached there. With
    /// `hot_only`, a static (pdisk `attach`) attachment is refused with BadRequest.
    async fn detach(
        &self,
        caller: &Caller,
        target: AttachTarget,
        volume_id: &str,
        hot_only: bool,
    ) -> ServiceResult<Attachment> {
        let _ = (caller, target, volume_id, hot_only);
        Err(unimplemented())
    }
    /// Detach everything from the target (pdisk `detach`); returns what was detached.
    async fn detach_all(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        let _ = (caller, target);
        Err(unimplemented())
    }
    /// Attachments of one server (Compute) or VM (pdisk), oldest first.
    async fn list_attachments(
        &self,
        caller: &Caller,
        target: AttachTarget,
    ) -> ServiceResult<Vec<Attachment>> {
        let _ = (caller, target);
        Err(unimplemented())
    }
}

fn unimplemented() -> ServiceError {
    ServiceError::Internal("not implemented".into())
}

/// Health of each component; the daemon is healthy when every component is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub components: Vec<ComponentHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentHealth {
    /// Short component name, e.g. `store`, `catalog`.
    pub name: String,
    /// `Ok(())` when usable, otherwise a one-line reason.
    pub status: Result<(), String>,
    /// Shown instead of `ok` for a component that is usable but not all there (a feature
    /// off for want of something the host lacks).
    pub note: Option<String>,
}

impl ComponentHealth {
    pub fn ok(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Ok(()),
            note: None,
        }
    }
    /// Usable, with something missing that does not stop the rest: `note` says what.
    pub fn degraded(name: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Ok(()),
            note: Some(note.into()),
        }
    }
    pub fn failed(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Err(reason.into()),
            note: None,
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.components.iter().all(|c| c.status.is_ok())
    }
}

/// Body of `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct VersionInfo {
    pub name: String,
    pub version: String,
    /// Git commit the binary was built from, when known at build time.
    pub git_commit: Option<String>,
    /// On-disk format version of the chunk store this binary writes.
    pub store_format_version: u32,
    /// Schema version of the catalog database this binary writes.
    pub catalog_schema_version: u32,
}

/// Image conversion figures exported on `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversionMetrics {
    pub running: u64,
    pub waiting: u64,
    pub completed: u64,
    /// Of the completed ones, those done in-process (qcow2) rather than by `qemu-img`.
    pub in_process: u64,
    pub failed: u64,
    /// Virtual bytes of the running conversions, and how many of them are converted.
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// Store counters exported on `/metrics` (names in [`crate::ops`] docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreMetrics {
    pub objects: u64,
    pub logical_bytes: u64,
    pub allocated_bytes: u64,
    pub physical_bytes: u64,
    pub free_bytes: u64,
    pub segments: u64,
    pub checksum_errors: u64,
    pub healed_blocks: u64,
    pub read_retries: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
}
