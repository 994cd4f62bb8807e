//! The JSON the Image API answers: Glance's image and member views, lists, version documents.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use super::service::{Image, Member};
use crate::time_fmt::seconds_z;

/// An image (Glance v2 view). Extra properties appear as top-level string members.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageView {
    pub id: String,
    pub name: Option<String>,
    /// queued, saving, uploading, importing, active, killed, deleted, pending_delete or
    /// deactivated.
    pub status: String,
    /// public, private, shared or community.
    pub visibility: String,
    pub protected: bool,
    pub os_hidden: bool,
    /// md5 of the data, hex.
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub owner: Option<String>,
    pub size: Option<u64>,
    pub virtual_size: Option<u64>,
    pub min_ram: u64,
    pub min_disk: u64,
    pub container_format: Option<String>,
    pub disk_format: Option<String>,
    /// `YYYY-MM-DDTHH:MM:SSZ`
    pub created_at: String,
    pub updated_at: String,
    pub tags: Vec<String>,
    #[serde(rename = "self")]
    pub self_link: String,
    pub file: String,
    pub schema: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_url: Option<String>,
    /// Extra properties (every value a string), StarlingX's among them.
    #[serde(flatten)]
    pub properties: BTreeMap<String, String>,
}

impl From<&Image> for ImageView {
    fn from(i: &Image) -> Self {
        ImageView {
            id: i.id.clone(),
            name: i.name.clone(),
            status: i.status.clone(),
            visibility: i.visibility.clone(),
            protected: i.protected,
            os_hidden: i.os_hidden,
            checksum: i.checksum.clone(),
            os_hash_algo: i.os_hash_algo.clone(),
            os_hash_value: i.os_hash_value.clone(),
            owner: i.owner.clone(),
            size: i.size,
            virtual_size: i.virtual_size,
            min_ram: i.min_ram,
            min_disk: i.min_disk,
            container_format: i.container_format.clone(),
            disk_format: i.disk_format.clone(),
            created_at: seconds_z(i.created_at),
            updated_at: seconds_z(i.updated_at),
            tags: i.tags.clone(),
            self_link: format!("/v2/images/{}", i.id),
            file: format!("/v2/images/{}/file", i.id),
            schema: "/v2/schemas/image".into(),
            direct_url: i.direct_url.clone(),
            properties: i.properties.clone(),
        }
    }
}

/// `GET /v2/images`
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageView>,
    /// The first page of the same query.
    pub first: String,
    /// The next page, present when this one was full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    pub schema: String,
}

/// An image member.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    pub image_id: String,
    pub member_id: String,
    /// pending, accepted or rejected.
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    pub schema: String,
}

impl From<&Member> for MemberView {
    fn from(m: &Member) -> Self {
        MemberView {
            image_id: m.image_id.clone(),
            member_id: m.member_id.clone(),
            status: m.status.clone(),
            created_at: seconds_z(m.created_at),
            updated_at: seconds_z(m.updated_at),
            schema: "/v2/schemas/member".into(),
        }
    }
}

/// `GET /v2/images/{id}/members`
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberList {
    pub members: Vec<MemberView>,
    pub schema: String,
}

/// One version of the Image API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageVersion {
    /// `v2.N`
    pub id: String,
    /// CURRENT or SUPPORTED.
    pub status: String,
    pub links: Vec<VersionLink>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionLink {
    pub rel: String,
    pub href: String,
}

/// Glance's version list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageVersions {
    pub versions: Vec<ImageVersion>,
}

/// `GET /v2/info/import`
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportInfo {
    #[serde(rename = "import-methods")]
    pub import_methods: ImportMethods,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportMethods {
    pub description: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: Vec<String>,
}
