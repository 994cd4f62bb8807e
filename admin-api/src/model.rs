//! The one control-plane model every API family is a view of.
//!
//! A volume is one record whatever family created it: a pdisk disk, a Compute volume and a
//! Block Storage volume are translations of [`Volume`]. The daemon owns the rules (permissions,
//! status transitions, limits); the families own shapes and error formats.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Roles cairn knows, weakest first. A user holds roles per project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Member,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Reader, Role::Member, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Who is calling: resolved from a token (or pdisk Basic credentials) by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub project_name: String,
    /// Roles on `project_id`.
    pub roles: Vec<Role>,
}

impl Caller {
    pub fn has(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r >= role)
    }
    pub fn is_admin(&self) -> bool {
        self.has(Role::Admin)
    }
}

/// A named thing with an id, as Keystone shows users and projects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Named {
    pub id: String,
    pub name: String,
}

/// Everything Keystone's token body needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub caller: Caller,
    /// Role ids as stored (Keystone shows `{"id", "name"}` per role).
    pub role_ids: Vec<Named>,
    pub methods: Vec<String>,
    pub audit_id: String,
    pub issued_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// A freshly issued token: the secret (sent once, in `X-Subject-Token`) and what it grants.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub info: TokenInfo,
}

/// How a caller proves who it is to `POST /v3/auth/tokens`.
#[derive(Debug, Clone)]
pub enum AuthMethod {
    Password {
        /// User by name (with domain name or id) or by id.
        user: UserRef,
        password: String,
    },
    Token {
        token: String,
    },
}

#[derive(Debug, Clone)]
pub enum UserRef {
    Id(String),
    Name { name: String },
}

/// Project scope of a token request. `None` in [`AuthRequest`] means the user's default project.
#[derive(Debug, Clone)]
pub enum ProjectRef {
    Id(String),
    Name { name: String },
}

#[derive(Debug, Clone)]
pub struct AuthRequest {
    pub method: AuthMethod,
    pub scope: Option<ProjectRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub description: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub default_project_id: Option<String>,
    pub enabled: bool,
}

#[derive(Debug, Clone, Default)]
pub struct NewProject {
    pub name: String,
    pub description: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub name: String,
    pub password: Option<String>,
    pub default_project_id: Option<String>,
    pub enabled: bool,
}

/// One role of one user on one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleAssignment {
    pub user_id: String,
    pub project_id: String,
    pub role: Named,
}

/// Volume lifecycle. Transitions are validated by the daemon ([`VolumeStatus::can_become`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeStatus {
    Creating,
    Available,
    Attaching,
    InUse,
    Detaching,
    Deleting,
    Error,
    Uploading,
    /// Being filled from an image (Cinder's name for it).
    Downloading,
}

impl VolumeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStatus::Creating => "creating",
            VolumeStatus::Available => "available",
            VolumeStatus::Attaching => "attaching",
            VolumeStatus::InUse => "in-use",
            VolumeStatus::Detaching => "detaching",
            VolumeStatus::Deleting => "deleting",
            VolumeStatus::Error => "error",
            VolumeStatus::Uploading => "uploading",
            VolumeStatus::Downloading => "downloading",
        }
    }

    pub fn parse(s: &str) -> Option<VolumeStatus> {
        use VolumeStatus::*;
        [
            Creating,
            Available,
            Attaching,
            InUse,
            Detaching,
            Deleting,
            Error,
            Uploading,
            Downloading,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// The transitions a volume may take. Everything else is refused.
    pub fn can_become(self, to: VolumeStatus) -> bool {
        use VolumeStatus::*;
        matches!(
            (self, to),
            (Creating, Available)
                | (Creating, Error)
                | (Creating, Downloading)
                | (Downloading, Available)
                | (Downloading, Error)
                | (Available, Attaching)
                | (Available, Deleting)
                | (Available, Uploading)
                | (Attaching, InUse)
                | (Attaching, Available)
                | (Attaching, Error)
                // another attachment of a multi-attach volume
                | (InUse, Attaching)
                | (InUse, Detaching)
                | (InUse, Uploading)
                | (Detaching, Available)
                | (Detaching, InUse)
                | (Detaching, Error)
                | (Uploading, Available)
                | (Uploading, InUse)
                | (Error, Deleting)
                | (Deleting, Error)
        )
    }
}

/// pdisk visibility of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Private,
    Public,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Public => "public",
        }
    }
}

/// pdisk distinguishes disks attached at VM launch from hot-plugged ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    Static,
    Hot,
}

impl AttachKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachKind::Static => "static",
            AttachKind::Hot => "hot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The attachment's own id (Compute shows the volume id as the attachment `id`).
    pub id: String,
    pub volume_id: String,
    pub server_id: String,
    /// Device as the client named it (`/dev/vdb`) or as assigned (`vda` for pdisk hotattach).
    pub device: Option<String>,
    pub kind: AttachKind,
    pub attached_at: OffsetDateTime,
    /// pdisk's VM identity of the server, when it has one.
    pub node: Option<String>,
    pub vm_id: Option<String>,
    /// Where the export is served, e.g. `nbd://127.0.0.1:10809/<volume-id>`.
    pub nbd_uri: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub project_id: String,
    /// Creator's user id and name (pdisk `owner`); `None` if that user is gone.
    pub user_id: Option<String>,
    pub owner: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub size_gib: u64,
    pub status: VolumeStatus,
    pub volume_type: Option<String>,
    pub availability_zone: String,
    pub snapshot_id: Option<String>,
    pub source_volume_id: Option<String>,
    pub source_image_id: Option<String>,
    pub bootable: bool,
    pub multiattach: bool,
    pub visibility: Visibility,
    pub tag: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub attachments: Vec<Attachment>,
    /// How many attachments the volume may have at once (pdisk `X-DiskUser-Limit`).
    pub user_limit: u32,
    /// Block Storage's read-only flag: exported read-only whatever the attachments ask.
    pub readonly: bool,
    /// What the volume recorded of the image it was made from (cinder's
    /// `volume_image_metadata`), directly or through the volume or snapshot it was cloned from.
    pub image_metadata: Option<BTreeMap<String, String>>,
}

impl Volume {
    /// pdisk `X-DiskUser-Remaining`.
    pub fn users_remaining(&self) -> i64 {
        i64::from(self.user_limit) - self.attachments.len() as i64
    }
}

#[derive(Debug, Clone, Default)]
pub struct NewVolume {
    pub size_gib: u64,
    pub name: Option<String>,
    pub description: Option<String>,
    pub volume_type: Option<String>,
    pub availability_zone: Option<String>,
    pub snapshot_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub multiattach: bool,
    pub visibility: Option<Visibility>,
    pub tag: Option<String>,
    /// Made from this image (Compute `imageRef`, pdisk/client `--image`).
    pub source_image_id: Option<String>,
    /// A copy-on-write clone of this volume (Block Storage `source_volid`).
    pub source_volume_id: Option<String>,
}

/// `os-volume_upload_image`: the image to make of a volume.
#[derive(Debug, Clone, Default)]
pub struct VolumeUpload {
    pub image_name: String,
    pub force: bool,
    pub disk_format: String,
    pub container_format: String,
    /// The caller's token, for an external image service (which is called with it).
    pub token: Option<String>,
    /// The image's visibility (microversion 3.1 on; `None` before: the image service's
    /// default).
    pub visibility: Option<String>,
    /// The image's `protected` (3.1 on).
    pub protected: Option<bool>,
    /// The request's `x-openstack-request-id`: a user message about the upload failing later
    /// names it, as cinder's does.
    pub request_id: Option<String>,
}

/// What `os-volume_upload_image` answers: the volume (now `uploading`) and the new image
/// (`None` for `iso`, which is accepted and makes no image, as seed 003 says).
#[derive(Debug, Clone)]
pub struct VolumeUploaded {
    pub volume: Volume,
    pub image_id: Option<String>,
    /// The new image's visibility and `protected`, as the image service made it (cinder
    /// answers what Glance returned).
    pub visibility: Option<String>,
    pub protected: Option<bool>,
}

/// A Block Storage user message (`/messages`, microversion 3.3): the outcome of an
/// asynchronous action an API call already answered 2xx for, e.g. an upload to an image
/// that failed later. Its text is derived from `action_id` and `detail_id` (see
/// [`message_field`]); nothing of the underlying error is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMessage {
    pub id: String,
    pub project_id: String,
    /// The request that started the action.
    pub request_id: String,
    /// `VOLUME`, `VOLUME_SNAPSHOT`, `VOLUME_BACKUP`.
    pub resource_type: Option<String>,
    pub resource_uuid: Option<String>,
    /// `VOLUME_<resource>_<action>_<detail>`.
    pub event_id: String,
    pub action_id: Option<String>,
    pub detail_id: Option<String>,
    /// `ERROR`, `WARNING` or `INFO`.
    pub message_level: String,
    pub created_at: OffsetDateTime,
    /// Kept at least until then (cinder's `expires_at`, shown as `guaranteed_until`).
    pub expires_at: OffsetDateTime,
}

/// cinder's `message_field`: the resources, actions and details user messages are made of,
/// and the user-visible text of each (an event is `VOLUME_<resource>_<action>_<detail>`).
pub mod message_field {
    /// A message's resource type.
    pub const RESOURCE_VOLUME: &str = "VOLUME";

    /// (id, text) of an action.
    pub type Action = (&'static str, &'static str);
    /// (id, text) of a detail.
    pub type Detail = (&'static str, &'static str);

    pub const COPY_VOLUME_TO_IMAGE: Action = ("003", "copy volume to image");
    pub const UNKNOWN_ERROR: Detail = ("001", "An unknown error occurred.");
    pub const FAILED_TO_UPLOAD_VOLUME: Detail =
        ("004", "Failed to upload volume to image at backend.");

    /// Every action cinder defines (ids are stable: stored messages refer to them).
    pub const ACTIONS: [Action; 16] = [
        ("001", "schedule allocate volume"),
        ("002", "attach volume"),
        COPY_VOLUME_TO_IMAGE,
        ("004", "update attachment"),
        ("005", "copy image to volume"),
        ("006", "unmanage volume"),
        ("007", "extend volume"),
        ("008", "create volume from backend storage"),
        ("009", "create snapshot"),
        ("010", "delete snapshot"),
        ("011", "update snapshot"),
        ("012", "update snapshot metadata"),
        ("013", "create backup"),
        ("014", "delete backup"),
        ("015", "restore backup"),
        ("016", "reimage volume"),
    ];

    /// Every detail cinder defines.
    pub const DETAILS: [Detail; 30] = [
        UNKNOWN_ERROR,
        ("002", "Driver is not initialized at present."),
        ("003", "Could not find any available weighted backend."),
        FAILED_TO_UPLOAD_VOLUME,
        ("005", "Volume's attach mode is invalid."),
        ("006", "Not enough quota resource for operation."),
        (
            "007",
            "Image used for creating volume exceeds available space.",
        ),
        ("008", "Unmanaging encrypted volumes is not supported."),
        ("009", "Compute service failed to extend volume."),
        ("010", "Volume Driver failed to extend volume."),
        ("011", "Image signature verification failed."),
        ("012", "Driver failed to create the volume."),
        ("013", "Snapshot failed to create."),
        ("014", "Volume snapshot update metadata failed."),
        ("015", "Snapshot is busy."),
        ("016", "Snapshot failed to delete."),
        ("017", "Backup status is invalid."),
        ("018", "Backup service is down."),
        (
            "019",
            "Failed to get backup device from the volume service.",
        ),
        ("020", "Backup driver failed to create backup."),
        ("021", "Failed to attach volume."),
        ("022", "Failed to detach volume."),
        ("023", "Cleanup of temporary volume/snapshot failed."),
        (
            "024",
            "Backup failed to schedule. Service not found for creating backup.",
        ),
        ("025", "Backup driver failed to delete backup."),
        ("026", "Backup driver failed to restore backup."),
        ("027", "Volume status is invalid."),
        ("028", "Compute service failed to reimage volume."),
        (
            "029",
            "The image disk format must be the same as the volume format for the volume type you are requesting.",
        ),
        (
            "030",
            "Incremental backup not possible, forcing full backup.",
        ),
    ];

    /// cinder's `event_id`: `VOLUME_<resource type>_<action id>_<detail id>`.
    pub fn event_id(resource_type: &str, action: Action, detail: Detail) -> String {
        format!("VOLUME_{resource_type}_{}_{}", action.0, detail.0)
    }

    /// The text of an action id; `unknown action` for one cinder does not define.
    pub fn translate_action(id: Option<&str>) -> &'static str {
        ACTIONS
            .iter()
            .find(|a| Some(a.0) == id)
            .map_or("unknown action", |a| a.1)
    }

    /// The text of a detail id; the unknown error's for one cinder does not define.
    pub fn translate_detail(id: Option<&str>) -> &'static str {
        DETAILS
            .iter()
            .find(|d| Some(d.0) == id)
            .map_or(UNKNOWN_ERROR.1, |d| d.1)
    }

    /// What a user reads: `<action>:<detail>` (cinder's `_build_user_message`).
    pub fn user_message(action_id: Option<&str>, detail_id: Option<&str>) -> String {
        format!(
            "{}:{}",
            translate_action(action_id),
            translate_detail(detail_id)
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn events_and_texts_are_cinders() {
            assert_eq!(
                event_id(
                    RESOURCE_VOLUME,
                    COPY_VOLUME_TO_IMAGE,
                    FAILED_TO_UPLOAD_VOLUME
                ),
                "VOLUME_VOLUME_003_004"
            );
            assert_eq!(
                user_message(Some("003"), Some("004")),
                "copy volume to image:Failed to upload volume to image at backend."
            );
            assert_eq!(
                user_message(Some("999"), None),
                "unknown action:An unknown error occurred."
            );
            // Ids are unique and in order.
            for (i, a) in ACTIONS.iter().enumerate() {
                assert_eq!(a.0, format!("{:03}", i + 1));
            }
            for (i, d) in DETAILS.iter().enumerate() {
                assert_eq!(d.0, format!("{:03}", i + 1));
            }
        }
    }
}

/// A Block Storage volume type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeType {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub is_public: bool,
    pub extra_specs: BTreeMap<String, String>,
}

/// A new volume type, or the changes to one (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct VolumeTypeChange {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub is_public: Option<bool>,
    pub extra_specs: Option<BTreeMap<String, String>>,
}

/// What a project holds (Block Storage `/limits`; cairn sets no quotas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeUsage {
    pub volumes: u64,
    pub gigabytes: u64,
    pub snapshots: u64,
}

/// A Block Storage snapshot: a copy-on-write clone of a volume, taken at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub project_id: String,
    pub user_id: Option<String>,
    pub volume_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// The volume's size when the snapshot was taken.
    pub size_gib: u64,
    /// creating, available, deleting or error.
    pub status: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, Default)]
pub struct NewSnapshot {
    pub volume_id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Snapshot an in-use volume (cinder's `force`).
    pub force: bool,
    pub metadata: BTreeMap<String, String>,
}

/// What `PUT .../volumes/{id}` changes (Block Storage): each field when given; `Some(None)`
/// clears a name or description.
#[derive(Debug, Clone, Default)]
pub struct VolumeUpdate {
    pub name: Option<Option<String>>,
    pub description: Option<Option<String>>,
    /// Replaces the whole metadata map.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Merged into the metadata (after `metadata`).
    pub merge_metadata: BTreeMap<String, String>,
    /// A metadata key to remove; NotFound if it is not there.
    pub delete_metadata_key: Option<String>,
}

/// Flags of a volume (Block Storage actions); each changes when given.
#[derive(Debug, Clone, Copy, Default)]
pub struct VolumeFlags {
    pub bootable: Option<bool>,
    pub readonly: Option<bool>,
}

/// Block Storage's legacy attach flow, the steps that change a volume's status but make or
/// end no attachment (cinder's `volume_actions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStep {
    /// `os-reserve`: available (or in-use, multi-attach) -> attaching.
    Reserve,
    /// `os-unreserve`: attaching -> in-use with attachments, else available; otherwise
    /// nothing.
    Unreserve,
    /// `os-begin_detaching`: in-use (attached) -> detaching.
    BeginDetaching,
    /// `os-roll_detaching`: detaching -> in-use; otherwise nothing.
    RollDetaching,
    /// `os-terminate_connection`: cinder unreserves; the export lives on until `os-detach`.
    TerminateConnection,
}

impl AttachStep {
    /// cinder's policy name for the step (in `Policy doesn't allow ...` refusals).
    pub fn policy(self) -> &'static str {
        match self {
            AttachStep::Reserve => "volume_extension:volume_actions:reserve",
            AttachStep::Unreserve => "volume_extension:volume_actions:unreserve",
            AttachStep::BeginDetaching => "volume_extension:volume_actions:begin_detaching",
            AttachStep::RollDetaching => "volume_extension:volume_actions:roll_detaching",
            AttachStep::TerminateConnection => {
                "volume_extension:volume_actions:terminate_connection"
            }
        }
    }
}

/// Block Storage `os-attach`: an attachment of the one model, to a Compute server.
#[derive(Debug, Clone)]
pub struct VolumeAttach {
    /// The server (a UUID, checked by the family).
    pub instance_uuid: Option<String>,
    /// cinder's host attachment; cairn attaches to servers only (see the daemon's rule).
    pub host_name: Option<String>,
    /// The device on the server, as the client names it (`/dev/vdc`).
    pub mountpoint: String,
    /// `mode: "ro"`: the attachment asks for read-only access.
    pub read_only: bool,
}

/// Where a volume's NBD export is served (Block Storage `os-initialize_connection`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConnection {
    pub volume_id: String,
    /// `nbd://host:port/<volume-id>`.
    pub uri: String,
    pub host: String,
    pub port: u16,
    /// The export's name: the volume id.
    pub export_name: String,
    /// The export refuses writes (read-only flag, or every attachment read-only).
    pub read_only: bool,
}

/// Which volumes a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeScope {
    /// The caller's project (Compute, Block Storage).
    Project,
    /// Every project (admin only; Compute `all_tenants`).
    AllProjects,
    /// pdisk: the caller's own disks plus public ones; everything for an admin.
    PdiskVisible,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub id: String,
    pub project_id: String,
    pub user_id: Option<String>,
    pub name: Option<String>,
    pub node: Option<String>,
    pub vm_id: Option<String>,
    pub status: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, Default)]
pub struct NewServer {
    pub name: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// What a family asks when attaching.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub volume_id: String,
    pub target: AttachTarget,
    /// A device the client asked for; `None` means "assign one".
    pub device: Option<String>,
    pub kind: AttachKind,
    /// How to name an assigned device.
    pub naming: DeviceNaming,
}

#[derive(Debug, Clone)]
pub enum AttachTarget {
    /// A Compute server by id.
    Server(String),
    /// A pdisk VM by `(node, vm_id)`; registered as a server on first use.
    Vm { node: String, vm_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceNaming {
    /// `/dev/vdb`, `/dev/vdc`, ... (Compute; `vda` is the root disk).
    DevPath,
    /// `vda` .. `vdz` (pdisk hotattach), none after `vdz`.
    PdiskTarget,
}

/// Everything that can go wrong in a service call, for each family to put in its own format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// No such resource, or the caller may not know it exists.
    #[error("{0}")]
    NotFound(String),
    /// No or bad credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Known caller, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The request is malformed or invalid in itself.
    #[error("{0}")]
    BadRequest(String),
    /// Valid request, but the resource's state forbids it now (e.g. attaching an in-use volume).
    #[error("{0}")]
    Conflict(String),
    /// A limit was reached (too many devices, users, quota).
    #[error("{0}")]
    OverLimit(String),
    /// The content is of a kind the service does not take (image data that is not what its
    /// disk_format says, or unsafe).
    #[error("{0}")]
    Unsupported(String),
    /// The daemon failed; details are logged, the client sees a generic message.
    #[error("{0}")]
    Internal(String),
    /// A service this daemon calls for the request (an external image service) could not be
    /// reached or failed. A 500, whose message says so (it is the operator's to fix).
    #[error("{0}")]
    Unavailable(String),
}

pub type ServiceResult<T> = Result<T, ServiceError>;
