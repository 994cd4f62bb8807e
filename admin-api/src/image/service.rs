//! The Image family's service trait and the plain types that cross it.

use std::collections::BTreeMap;
use std::pin::Pin;

use axum::body::Bytes;
use futures_util::Stream;
use time::OffsetDateTime;

use crate::model::{Caller, ServiceError, ServiceResult};

/// An image record as the Image API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub name: Option<String>,
    /// queued, saving, uploading, importing, active, killed, deleted, pending_delete,
    /// deactivated.
    pub status: String,
    /// public, private, shared, community.
    pub visibility: String,
    pub protected: bool,
    pub os_hidden: bool,
    /// The owning project.
    pub owner: Option<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub size: Option<u64>,
    pub virtual_size: Option<u64>,
    /// MD5 of the data, hex.
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub min_ram: u64,
    pub min_disk: u64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub tags: Vec<String>,
    /// Extra properties, every value a string (Glance's permissive schema). Includes the
    /// daemon-maintained ones (`store`, `cache_raw_status`...).
    pub properties: BTreeMap<String, String>,
    pub direct_url: Option<String>,
}

/// What `POST /v2/images` asks for (validated by the API layer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewImage {
    pub id: Option<String>,
    pub name: Option<String>,
    pub visibility: Option<String>,
    pub protected: bool,
    pub os_hidden: bool,
    pub owner: Option<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub min_ram: u64,
    pub min_disk: u64,
    pub tags: Vec<String>,
    pub properties: BTreeMap<String, String>,
}

/// Which images a list starts from: Glance's visibility rules for the caller. Filters,
/// order and pages are the API layer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageScope {
    /// `visibility=`; None: Glance's default view (public, the caller's own, shared ones
    /// it is a member of; not other projects' community images).
    pub visibility: Option<VisibilityFilter>,
    /// Which memberships make a shared image listed (default accepted).
    pub member_status: MemberStatusFilter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisibilityFilter {
    Public,
    Private,
    Shared,
    Community,
    All,
}

impl VisibilityFilter {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "public" => Self::Public,
            "private" => Self::Private,
            "shared" => Self::Shared,
            "community" => Self::Community,
            "all" => Self::All,
            _ => return None,
        })
    }
    /// The visibility value it selects (None for all).
    pub fn as_visibility(self) -> Option<&'static str> {
        match self {
            Self::Public => Some("public"),
            Self::Private => Some("private"),
            Self::Shared => Some("shared"),
            Self::Community => Some("community"),
            Self::All => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemberStatusFilter {
    Pending,
    #[default]
    Accepted,
    Rejected,
    All,
}

impl MemberStatusFilter {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "accepted" => Self::Accepted,
            "rejected" => Self::Rejected,
            "all" => Self::All,
            _ => return None,
        })
    }
    pub fn as_status(self) -> Option<&'static str> {
        match self {
            Self::Pending => Some("pending"),
            Self::Accepted => Some("accepted"),
            Self::Rejected => Some("rejected"),
            Self::All => None,
        }
    }
}

/// A change to an image computed by the API layer (json-patch), applied by the service
/// inside its transaction to the image as it is there, so that checks and writes cannot
/// interleave with another request. The closure answers the family's errors.
pub type ImageEdit = Box<dyn FnOnce(&mut Image) -> ServiceResult<()> + Send>;

/// Image members (`/v2/images/{id}/members`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub image_id: String,
    pub member_id: String,
    /// pending, accepted, rejected.
    pub status: String,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// A body arriving from a client, chunk by chunk.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// An image's data going out: `len` bytes from `offset` of an object of `total` bytes.
pub struct ImageData {
    pub total: u64,
    pub offset: u64,
    pub len: u64,
    pub checksum: Option<String>,
    pub stream: ByteStream,
}

/// Where an upload's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// `PUT /file`: queued -> saving -> active.
    Direct,
    /// `PUT /stage` (glance-direct): queued -> uploading; `import` makes it active.
    Stage,
}

/// What the Image API needs from the daemon. Defaults answer "not implemented" so that a
/// router test fakes only what it calls.
#[async_trait::async_trait]
pub trait ImageService: Send + Sync + 'static {
    async fn create_image(&self, caller: &Caller, new: NewImage) -> ServiceResult<Image> {
        let _ = (caller, new);
        Err(unimplemented())
    }
    /// Every image of the scope the caller may see, in no particular order.
    async fn list_images(&self, caller: &Caller, scope: ImageScope) -> ServiceResult<Vec<Image>> {
        let _ = (caller, scope);
        Err(unimplemented())
    }
    /// An image the caller may see (own, public, community, shared with its project, any for
    /// an admin); NotFound otherwise.
    async fn get_image(&self, caller: &Caller, id: &str) -> ServiceResult<Image> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Applies `edit` to the image atomically. Only the owner or an admin may.
    async fn update_image(
        &self,
        caller: &Caller,
        id: &str,
        edit: ImageEdit,
    ) -> ServiceResult<Image> {
        let _ = (caller, id, edit);
        Err(unimplemented())
    }
    /// Deletes the image, its data and its raw cache (cancelling a running conversion).
    async fn delete_image(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// Deactivate (`active == false`) or reactivate; admin or owner.
    async fn set_active(&self, caller: &Caller, id: &str, active: bool) -> ServiceResult<()> {
        let _ = (caller, id, active);
        Err(unimplemented())
    }
    /// Streams `body` into the image's data. `size_hint`: the declared Content-Length.
    async fn upload(
        &self,
        caller: &Caller,
        id: &str,
        kind: UploadKind,
        body: ByteStream,
        size_hint: Option<u64>,
    ) -> ServiceResult<()> {
        let _ = (caller, id, kind, body, size_hint);
        Err(unimplemented())
    }
    /// `POST /import` with `glance-direct`: the staged data becomes the image's.
    async fn import(&self, caller: &Caller, id: &str) -> ServiceResult<()> {
        let _ = (caller, id);
        Err(unimplemented())
    }
    /// The image's data from `offset` (and at most `len` bytes); None when it has none.
    async fn download(
        &self,
        caller: &Caller,
        id: &str,
        range: Option<(u64, Option<u64>)>,
    ) -> ServiceResult<Option<ImageData>> {
        let _ = (caller, id, range);
        Err(unimplemented())
    }

    async fn list_members(&self, caller: &Caller, image_id: &str) -> ServiceResult<Vec<Member>> {
        let _ = (caller, image_id);
        Err(unimplemented())
    }
    async fn get_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
    ) -> ServiceResult<Member> {
        let _ = (caller, image_id, member_id);
        Err(unimplemented())
    }
    async fn add_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
    ) -> ServiceResult<Member> {
        let _ = (caller, image_id, member_id);
        Err(unimplemented())
    }
    async fn update_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
        status: &str,
    ) -> ServiceResult<Member> {
        let _ = (caller, image_id, member_id, status);
        Err(unimplemented())
    }
    async fn delete_member(
        &self,
        caller: &Caller,
        image_id: &str,
        member_id: &str,
    ) -> ServiceResult<()> {
        let _ = (caller, image_id, member_id);
        Err(unimplemented())
    }
}

fn unimplemented() -> ServiceError {
    ServiceError::Internal("not implemented".into())
}

/// An image service that has nothing (router tests of other families).
pub struct NoImages;

impl ImageService for NoImages {}
