//! `/volumes`: create, list (summary and detail, with cinder's filters, sorting and paging),
//! show, update, delete.

use std::collections::{BTreeMap, HashMap};

use axum::{
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, VOLUME_LIST_BOOTABLE, resource, text_field};
use crate::compute::volumes::{MULTIATTACH_TYPE, invalid, opt_string, parse_metadata, parse_size};
use crate::compute::{Fault, body_or_fault, fault::FaultResult, json_body, query};
use crate::{
    AppState,
    model::{NewVolume, ServiceError, Volume, VolumeScope, VolumeUpdate},
    schema::{BadRequest, Forbidden, ItemNotFound, OverLimit},
    time_fmt,
};

/// A `self` or `bookmark` link.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderLink {
    href: String,
    rel: String,
}

/// An attachment in a volume view.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderAttachment {
    /// The volume's id (cinder shows it as the attachment's `id`).
    id: String,
    attachment_id: String,
    volume_id: String,
    server_id: String,
    host_name: Option<String>,
    device: Option<String>,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`
    attached_at: String,
}

/// cinder's detail view (v2, and v3 at 3.0).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolume {
    id: String,
    /// creating, downloading (being filled from an image), available, attaching, in-use,
    /// detaching, uploading, deleting or error.
    status: String,
    /// GiB.
    size: u64,
    availability_zone: String,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`
    created_at: String,
    updated_at: Option<String>,
    name: Option<String>,
    description: Option<String>,
    volume_type: Option<String>,
    snapshot_id: Option<String>,
    source_volid: Option<String>,
    metadata: BTreeMap<String, String>,
    links: Vec<CinderLink>,
    user_id: Option<String>,
    /// `"true"` or `"false"`: a string, as cinder sends it.
    bootable: String,
    encrypted: bool,
    replication_status: Option<String>,
    consistencygroup_id: Option<String>,
    multiattach: bool,
    attachments: Vec<CinderAttachment>,
    migration_status: Option<String>,
    /// The image the volume was made from (`image_id`), when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_image_metadata: Option<BTreeMap<String, String>>,
    /// Admins only: the owning project.
    #[serde(
        rename = "os-vol-tenant-attr:tenant_id",
        skip_serializing_if = "Option::is_none"
    )]
    tenant_id: Option<String>,
    /// Admins only: where the volume lives.
    #[serde(
        rename = "os-vol-host-attr:host",
        skip_serializing_if = "Option::is_none"
    )]
    host: Option<String>,
}

/// cinder's summary view (`GET /volumes`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumeSummary {
    id: String,
    name: Option<String>,
    links: Vec<CinderLink>,
}

/// `{"volume": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumeResponse {
    volume: CinderVolume,
}

/// `{"volumes": [...], "volumes_links": [...]}` (detail).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumesDetail {
    volumes: Vec<CinderVolume>,
    /// A `next` link when the page is full and more follow.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    volumes_links: Vec<CinderLink>,
}

/// `{"volumes": [...], "volumes_links": [...]}` (summary).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumesSummary {
    volumes: Vec<CinderVolumeSummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    volumes_links: Vec<CinderLink>,
}

fn links(ctx: &Ctx, id: &str) -> Vec<CinderLink> {
    resource_links(ctx, "volumes", id)
}

/// The `self` and `bookmark` links of `{collection}/{id}`.
pub(super) fn resource_links(ctx: &Ctx, collection: &str, id: &str) -> Vec<CinderLink> {
    let rest = format!("{collection}/{id}");
    vec![
        CinderLink {
            href: ctx.link(&rest),
            rel: "self".into(),
        },
        CinderLink {
            href: ctx.bookmark(&rest),
            rel: "bookmark".into(),
        },
    ]
}

pub(super) fn detail(ctx: &Ctx, v: &Volume) -> CinderVolume {
    let admin = ctx.caller.is_admin();
    CinderVolume {
        id: v.id.clone(),
        status: v.status.as_str().to_owned(),
        size: v.size_gib,
        availability_zone: v.availability_zone.clone(),
        created_at: time_fmt::compute(v.created_at),
        updated_at: Some(time_fmt::compute(v.updated_at)),
        name: v.name.clone(),
        description: v.description.clone(),
        volume_type: v.volume_type.clone(),
        snapshot_id: v.snapshot_id.clone(),
        source_volid: v.source_volume_id.clone(),
        metadata: v.metadata.clone(),
        links: links(ctx, &v.id),
        user_id: v.user_id.clone(),
        bootable: v.bootable.to_string(),
        encrypted: false,
        replication_status: None,
        consistencygroup_id: None,
        multiattach: v.multiattach,
        attachments: v
            .attachments
            .iter()
            .map(|a| CinderAttachment {
                id: v.id.clone(),
                attachment_id: a.id.clone(),
                volume_id: v.id.clone(),
                server_id: a.server_id.clone(),
                host_name: None,
                device: a.device.clone(),
                attached_at: time_fmt::compute(a.attached_at),
            })
            .collect(),
        migration_status: None,
        volume_image_metadata: v.image_metadata.clone().or_else(|| {
            v.source_image_id
                .as_ref()
                .map(|i| BTreeMap::from([("image_id".to_owned(), i.clone())]))
        }),
        tenant_id: admin.then(|| v.project_id.clone()),
        host: admin.then(|| "cairn@store#store".to_owned()),
    }
}

fn summary(ctx: &Ctx, v: &Volume) -> CinderVolumeSummary {
    CinderVolumeSummary {
        id: v.id.clone(),
        name: v.name.clone(),
        links: links(ctx, &v.id),
    }
}

// ---- listing -----------------------------------------------------------------------------

/// The most a page holds (cinder's `osapi_max_limit`).
const MAX_LIMIT: usize = 1000;

/// Sort keys cinder takes that a cairn volume has.
const SORT_KEYS: [&str; 7] = [
    "created_at",
    "updated_at",
    "id",
    "name",
    "size",
    "status",
    "availability_zone",
];

fn sort_value(v: &Volume, key: &str) -> (String, u64) {
    match key {
        "created_at" => (time_fmt::compute(v.created_at), 0),
        "updated_at" => (time_fmt::compute(v.updated_at), 0),
        "name" => (v.name.clone().unwrap_or_default(), 0),
        "size" => (String::new(), v.size_gib),
        "status" => (v.status.as_str().to_owned(), 0),
        "availability_zone" => (v.availability_zone.clone(), 0),
        _ => (v.id.clone(), 0),
    }
}

/// `sort=key[:dir],...`, or `sort_key`/`sort_dir`; default newest first, as cinder.
fn sort_spec(q: &HashMap<String, String>) -> FaultResult<Vec<(String, bool)>> {
    let mut keys = Vec::new();
    if let Some(sort) = q.get("sort") {
        if q.contains_key("sort_key") || q.contains_key("sort_dir") {
            return Err(Fault::bad_request(
                "Invalid input received: The 'sort_key' and 'sort_dir' parameters are deprecated and cannot be used with the 'sort' parameter.",
            ));
        }
        for item in sort.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, d) = item.split_once(':').unwrap_or((item, "desc"));
            keys.push((k.trim().to_owned(), d.trim().to_owned()));
        }
    } else if let Some(k) = q.get("sort_key") {
        let d = q.get("sort_dir").cloned().unwrap_or_else(|| "desc".into());
        keys.push((k.clone(), d));
    }
    if keys.is_empty() {
        keys.push(("created_at".into(), "desc".into()));
    }
    let mut out = Vec::new();
    for (k, d) in keys {
        if !SORT_KEYS.contains(&k.as_str()) {
            return Err(Fault::bad_request(format!(
                "Invalid input received: Invalid sort key {k}"
            )));
        }
        let desc = match d.to_ascii_lowercase().as_str() {
            "desc" => true,
            "asc" => false,
            _ => {
                return Err(Fault::bad_request(
                    "Invalid input received: Unknown sort direction, must be 'desc' or 'asc'",
                ));
            }
        };
        out.push((k, desc));
    }
    // Ties broken by id, as cinder's paginate_query does.
    if !out.iter().any(|(k, _)| k == "id") {
        let desc = out[0].1;
        out.push(("id".into(), desc));
    }
    Ok(out)
}

fn non_negative(q: &HashMap<String, String>, name: &str) -> FaultResult<Option<usize>> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| Fault::bad_request(format!("{name} param must be an integer"))),
    }
}

/// cinder's `_check_boolean_filter_value`: from 3.2 on (`strict`) only boolean words, any
/// case (`strutils.bool_from_string(strict=True)`); before, `False`/`false`/`FALSE` (and
/// an empty value) are false and anything else is true.
fn bool_filter(key: &str, value: &str, strict: bool) -> FaultResult<bool> {
    if !strict {
        return Ok(!matches!(value, "False" | "false" | "FALSE" | ""));
    }
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "on" | "y" | "yes" => Ok(true),
        "0" | "f" | "false" | "off" | "n" | "no" => Ok(false),
        _ => Err(Fault::bad_request(format!(
            "Invalid input received: '{key} = {value}'"
        ))),
    }
}

/// Filters cinder takes on a listing: exact matches on the view's values. `strict`: the
/// request's microversion is 3.2 or later (see [`bool_filter`]).
fn matches(v: &Volume, q: &HashMap<String, String>, strict: bool) -> FaultResult<bool> {
    for (key, want) in q {
        let ok = match key.as_str() {
            "name" | "display_name" => v.name.as_deref() == Some(want.as_str()),
            "status" => v.status.as_str() == want,
            "availability_zone" => &v.availability_zone == want,
            "bootable" => bool_filter(key, want, strict)? == v.bootable,
            "volume_type" => v.volume_type.as_deref() == Some(want.as_str()),
            "metadata" => {
                // cinder takes a JSON object, or the Python dict repr clients send.
                let parsed: Option<Map<String, Value>> = serde_json::from_str(want)
                    .ok()
                    .or_else(|| serde_json::from_str(&want.replace('\'', "\"")).ok());
                let Some(m) = parsed else {
                    return Err(Fault::bad_request(format!(
                        "Invalid input received: metadata={want} is not a dictionary"
                    )));
                };
                m.iter().all(|(k, val)| {
                    v.metadata.get(k).map(String::as_str) == val.as_str().or(Some(""))
                        && val.is_string()
                })
            }
            // Paging, sorting and scope are not filters; unknown keys are ignored, as cinder
            // ignores filters it does not know for non-admins.
            _ => true,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The page of `volumes` the query asks for, and whether more follow it.
fn page(
    mut volumes: Vec<Volume>,
    q: &HashMap<String, String>,
    strict: bool,
) -> FaultResult<(Vec<Volume>, bool)> {
    let sort = sort_spec(q)?;
    let mut kept = Vec::new();
    for v in volumes.drain(..) {
        if matches(&v, q, strict)? {
            kept.push(v);
        }
    }
    kept.sort_by(|a, b| {
        for (key, desc) in &sort {
            let o = sort_value(a, key).cmp(&sort_value(b, key));
            let o = if *desc { o.reverse() } else { o };
            if o.is_ne() {
                return o;
            }
        }
        std::cmp::Ordering::Equal
    });
    let mut start = non_negative(q, "offset")?.unwrap_or(0);
    if let Some(marker) = q.get("marker") {
        let Some(i) = kept.iter().position(|v| &v.id == marker) else {
            return Err(Fault::bad_request(format!(
                "Invalid input received: marker [{marker}] not found"
            )));
        };
        start = i + 1;
    }
    let limit = non_negative(q, "limit")?;
    let take = limit.unwrap_or(MAX_LIMIT).min(MAX_LIMIT);
    let total = kept.len();
    let items: Vec<Volume> = kept.into_iter().skip(start).take(take).collect();
    let more = limit.is_some() && start + items.len() < total && !items.is_empty();
    Ok((items, more))
}

fn next_link(ctx: &Ctx, path: &str, q: &HashMap<String, String>, last: &str) -> Vec<CinderLink> {
    let mut pairs: Vec<(&str, &str)> = q
        .iter()
        .filter(|(k, _)| *k != "marker" && *k != "offset")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pairs.sort();
    pairs.push(("marker", last));
    let qs = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    vec![CinderLink {
        href: format!("{}?{qs}", ctx.link(path)),
        rel: "next".into(),
    }]
}

async fn listed(
    state: &AppState,
    ctx: &Ctx,
    raw: Option<String>,
) -> FaultResult<(Vec<Volume>, Vec<CinderLink>, HashMap<String, String>)> {
    let q = query(raw.as_deref())?;
    // `all_tenants` (any true value) is honoured for admins and ignored for others.
    let all = q
        .get("all_tenants")
        .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false" | "no"));
    let scope = if all && ctx.caller.is_admin() {
        VolumeScope::AllProjects
    } else {
        VolumeScope::Project
    };
    let mut filters = q.clone();
    filters.remove("all_tenants");
    let volumes = state.service.list_volumes(&ctx.caller, scope).await?;
    let (items, more) = page(volumes, &filters, ctx.version >= VOLUME_LIST_BOOTABLE)?;
    let next = match (more, items.last()) {
        (true, Some(last)) => next_link(ctx, "volumes", &q, &last.id),
        _ => Vec::new(),
    };
    Ok((items, next, q))
}

const LIST_PARAMS: &str = "filters: name, status, availability_zone, bootable (from 3.2 on a boolean word, else 400; before, anything but false is true), volume_type, metadata (a JSON object); paging: limit (at most 1000), marker, offset; sort=key[:asc|desc],... or sort_key/sort_dir (created_at, updated_at, id, name, size, status, availability_zone; default created_at desc); all_tenants (admins)";

#[utoipa::path(get, path = "/{tenant_id}/volumes", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("query" = Option<String>, Query, description = LIST_PARAMS)),
    responses((status = 200, description = "the project's volumes, summary view", body = CinderVolumesSummary)))]
pub(super) async fn list_volumes(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(raw): RawQuery,
) -> FaultResult<Response> {
    let (items, volumes_links, _) = listed(&state, &ctx, raw).await?;
    Ok(axum::Json(CinderVolumesSummary {
        volumes: items.iter().map(|v| summary(&ctx, v)).collect(),
        volumes_links,
    })
    .into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/volumes/detail", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("query" = Option<String>, Query, description = LIST_PARAMS)),
    responses((status = 200, description = "the project's volumes, detail view", body = CinderVolumesDetail)))]
pub(super) async fn list_volumes_detail(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(raw): RawQuery,
) -> FaultResult<Response> {
    let (items, volumes_links, _) = listed(&state, &ctx, raw).await?;
    Ok(axum::Json(CinderVolumesDetail {
        volumes: items.iter().map(|v| detail(&ctx, v)).collect(),
        volumes_links,
    })
    .into_response())
}

// ---- create ------------------------------------------------------------------------------

/// What `POST /volumes` takes (cinder's create schema, the keys cairn acts on).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body `parse_create` checks key by key
pub(crate) struct CinderVolumeCreateRequest {
    volume: CinderVolumeCreate,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct CinderVolumeCreate {
    /// GiB, at least 1 (an integer, or a string of digits); required unless `snapshot_id` or
    /// `source_volid` is given.
    #[schema(minimum = 1, maximum = 8589934591_u64)]
    size: Option<u64>,
    #[schema(max_length = 255)]
    name: Option<String>,
    #[schema(max_length = 255)]
    description: Option<String>,
    /// v1 names, still taken.
    #[schema(max_length = 255)]
    display_name: Option<String>,
    #[schema(max_length = 255)]
    display_description: Option<String>,
    /// `multiattach` (cinder's convention) makes a volume several servers may attach.
    #[schema(max_length = 255)]
    volume_type: Option<String>,
    /// Only `nova`.
    #[schema(max_length = 255)]
    availability_zone: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    multiattach: Option<bool>,
    /// The image to make the volume from: a copy-on-write clone of its raw content, or
    /// `downloading` while it is converted.
    #[serde(rename = "imageRef")]
    #[schema(format = "uuid")]
    image_ref: Option<String>,
    /// Same as `imageRef`.
    #[schema(format = "uuid")]
    image_id: Option<String>,
    /// A copy-on-write clone of this snapshot (`size` may then be left out: the snapshot's).
    #[schema(format = "uuid")]
    snapshot_id: Option<String>,
    /// A copy-on-write clone of this volume (`size` may then be left out: the volume's).
    #[schema(format = "uuid")]
    source_volid: Option<String>,
    consistencygroup_id: Option<String>,
    backup_id: Option<String>,
}

const CREATE_KEYS: [&str; 16] = [
    "size",
    "name",
    "description",
    "display_name",
    "display_description",
    "volume_type",
    "availability_zone",
    "metadata",
    "multiattach",
    "imageRef",
    "image_id",
    "snapshot_id",
    "source_volid",
    "consistencygroup_id",
    "backup_id",
    "source_replica",
];

fn parse_create(body: Map<String, Value>) -> FaultResult<NewVolume> {
    let v = resource(&body, "volume", &CREATE_KEYS)?;
    for key in ["backup_id", "source_replica"] {
        if opt_string(v, key)?.is_some() {
            return Err(Fault::bad_request(format!(
                "Invalid input received: creating a volume from {key} is not supported."
            )));
        }
    }
    let snapshot_id = opt_string(v, "snapshot_id")?;
    let source_volid = opt_string(v, "source_volid")?;
    // With a snapshot or a volume to clone, the size may be left out: the source's.
    let size_gib = match v.get("size") {
        None | Some(Value::Null) if snapshot_id.is_some() || source_volid.is_some() => 0,
        size => parse_size(size)?,
    };
    let name = text_field(v, "name", "display_name")?.flatten();
    let description = text_field(v, "description", "display_description")?.flatten();
    let volume_type = opt_string(v, "volume_type")?;
    let multiattach = match v.get("multiattach") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("multiattach", "is not of type 'boolean'")),
    } || volume_type.as_deref() == Some(MULTIATTACH_TYPE);
    let image = match opt_string(v, "imageRef")? {
        Some(i) => Some(i),
        None => opt_string(v, "image_id")?,
    };
    Ok(NewVolume {
        size_gib,
        name,
        description,
        volume_type,
        availability_zone: opt_string(v, "availability_zone")?,
        metadata: parse_metadata(v.get("metadata"))?,
        multiattach,
        source_image_id: image,
        snapshot_id,
        source_volume_id: source_volid,
        ..NewVolume::default()
    })
}

#[utoipa::path(post, path = "/{tenant_id}/volumes", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    request_body(content = CinderVolumeCreateRequest, content_type = "application/json"),
    responses((status = 202, description = "accepted: the volume, `creating`, `downloading` or already `available`", body = CinderVolumeResponse),
              (status = 400, description = "badRequest: invalid body, or an image that does not fit", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound: the image", body = ItemNotFound),
              (status = 413, description = "overLimit: quota", body = OverLimit)))]
pub(super) async fn create_volume(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer("volume:create")?;
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let new = parse_create(body)?;
    let volume = state.service.create_volume(&ctx.caller, new).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(CinderVolumeResponse {
            volume: detail(&ctx, &volume),
        }),
    )
        .into_response())
}

// ---- one volume --------------------------------------------------------------------------

#[utoipa::path(get, path = "/{tenant_id}/volumes/{volume_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "the volume", body = CinderVolumeResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_volume(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let volume = state
        .service
        .get_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await?;
    Ok(axum::Json(CinderVolumeResponse {
        volume: detail(&ctx, &volume),
    })
    .into_response())
}

/// What `PUT /volumes/{id}` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body `parse_update` checks key by key
pub(crate) struct CinderVolumeUpdateRequest {
    volume: CinderVolumeUpdate,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct CinderVolumeUpdate {
    /// null clears it.
    #[schema(max_length = 255)]
    name: Option<String>,
    #[schema(max_length = 255)]
    description: Option<String>,
    #[schema(max_length = 255)]
    display_name: Option<String>,
    #[schema(max_length = 255)]
    display_description: Option<String>,
    /// Replaces the whole map.
    metadata: Option<BTreeMap<String, String>>,
}

fn parse_update(body: Map<String, Value>) -> FaultResult<VolumeUpdate> {
    const KEYS: [&str; 5] = [
        "name",
        "description",
        "display_name",
        "display_description",
        "metadata",
    ];
    let v = resource(&body, "volume", &KEYS)?;
    Ok(VolumeUpdate {
        name: text_field(v, "name", "display_name")?,
        description: text_field(v, "description", "display_description")?,
        metadata: match v.get("metadata") {
            None => None,
            m => Some(parse_metadata(m)?),
        },
        ..VolumeUpdate::default()
    })
}

#[utoipa::path(put, path = "/{tenant_id}/volumes/{volume_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    request_body(content = CinderVolumeUpdateRequest, content_type = "application/json"),
    responses((status = 200, description = "the volume as updated", body = CinderVolumeResponse),
              (status = 400, description = "badRequest: invalid body", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn update_volume(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer("volume:update")?;
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let update = parse_update(body)?;
    let volume = state
        .service
        .update_volume(&ctx.caller, ctx.param("volume_id"), update)
        .await?;
    Ok(axum::Json(CinderVolumeResponse {
        volume: detail(&ctx, &volume),
    })
    .into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/volumes/{volume_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    responses((status = 202, description = "deleted (empty body)"),
              (status = 400, description = "badRequest: the volume is attached or busy (cinder's InvalidVolume)", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn delete_volume(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    ctx.require_writer("volume:delete")?;
    match state
        .service
        .delete_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await
    {
        Ok(()) => Ok(StatusCode::ACCEPTED.into_response()),
        // cinder's InvalidVolume for an attached or busy volume.
        Err(ServiceError::Conflict(_)) => Err(Fault::bad_request(
            "Invalid volume: Volume status must be available or error or error_restoring or error_extending or error_managing and must not be migrating, attached, belong to a group, have snapshots, awaiting a transfer, or be disassociated from snapshots after volume transfer.",
        )),
        Err(e) => Err(e.into()),
    }
}

// ---- metadata ----------------------------------------------------------------------------

/// `{"metadata": {...}}`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct CinderMetadata {
    metadata: BTreeMap<String, String>,
}

/// `{"meta": {"key": "value"}}`: one item.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct CinderMetaItem {
    meta: BTreeMap<String, String>,
}

/// The `metadata` object of a body, or cinder's error.
fn metadata_body(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<BTreeMap<String, String>> {
    let body = json_body(headers, &body_or_fault(body)?)?;
    match body.get("metadata") {
        Some(m @ Value::Object(_)) => parse_metadata(Some(m)),
        _ => Err(Fault::bad_request("Malformed request body")),
    }
}

async fn change_metadata(
    state: &AppState,
    ctx: &Ctx,
    update: VolumeUpdate,
) -> FaultResult<BTreeMap<String, String>> {
    ctx.require_writer("volume:update_volume_metadata")?;
    let v = state
        .service
        .update_volume(&ctx.caller, ctx.param("volume_id"), update)
        .await
        .map_err(|e| match e {
            // The volume exists (else it would say so): the key is what is missing.
            ServiceError::NotFound(m) if m.starts_with("Metadata") => {
                Fault::not_found("Metadata item was not found")
            }
            e => e.into(),
        })?;
    Ok(v.metadata)
}

#[utoipa::path(get, path = "/{tenant_id}/volumes/{volume_id}/metadata", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "the volume's metadata", body = CinderMetadata),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_metadata(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let v = state
        .service
        .get_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await?;
    Ok(axum::Json(CinderMetadata {
        metadata: v.metadata,
    })
    .into_response())
}

#[utoipa::path(post, path = "/{tenant_id}/volumes/{volume_id}/metadata", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    request_body(content = CinderMetadata, content_type = "application/json"),
    responses((status = 200, description = "merged: the volume's whole metadata", body = CinderMetadata),
              (status = 400, description = "badRequest: not a metadata object", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn merge_metadata(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    let merge = metadata_body(&headers, body)?;
    let update = VolumeUpdate {
        merge_metadata: merge,
        ..VolumeUpdate::default()
    };
    let metadata = change_metadata(&state, &ctx, update).await?;
    Ok(axum::Json(CinderMetadata { metadata }).into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/volumes/{volume_id}/metadata", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id")),
    request_body(content = CinderMetadata, content_type = "application/json"),
    responses((status = 200, description = "replaced: the volume's whole metadata", body = CinderMetadata),
              (status = 400, description = "badRequest: not a metadata object", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn replace_metadata(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    let all = metadata_body(&headers, body)?;
    let update = VolumeUpdate {
        metadata: Some(all),
        ..VolumeUpdate::default()
    };
    let metadata = change_metadata(&state, &ctx, update).await?;
    Ok(axum::Json(CinderMetadata { metadata }).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/volumes/{volume_id}/metadata/{key}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id"),
           ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "the item", body = CinderMetaItem),
              (status = 404, description = "itemNotFound: the volume or the key", body = ItemNotFound)))]
pub(super) async fn show_meta(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let v = state
        .service
        .get_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await?;
    let key = ctx.param("key");
    let Some(value) = v.metadata.get(key) else {
        return Err(Fault::not_found("Metadata item was not found"));
    };
    Ok(axum::Json(CinderMetaItem {
        meta: BTreeMap::from([(key.to_owned(), value.clone())]),
    })
    .into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/volumes/{volume_id}/metadata/{key}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id"),
           ("key" = String, Path, description = "metadata key")),
    request_body(content = CinderMetaItem, content_type = "application/json"),
    responses((status = 200, description = "set", body = CinderMetaItem),
              (status = 400, description = "badRequest: the body's key is not the URL's, or more than one item", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn set_meta(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let meta = match body.get("meta") {
        Some(m @ Value::Object(_)) => parse_metadata(Some(m))?,
        _ => return Err(Fault::bad_request("Malformed request body")),
    };
    let key = ctx.param("key").to_owned();
    if meta.len() > 1 {
        return Err(Fault::bad_request("Request body contains too many items"));
    }
    if !meta.contains_key(&key) {
        return Err(Fault::bad_request("Request body and URI mismatch"));
    }
    let update = VolumeUpdate {
        merge_metadata: meta.clone(),
        ..VolumeUpdate::default()
    };
    change_metadata(&state, &ctx, update).await?;
    Ok(axum::Json(CinderMetaItem { meta }).into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/volumes/{volume_id}/metadata/{key}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("volume_id" = String, Path, description = "volume id"),
           ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "removed (empty body)"),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound: the volume or the key", body = ItemNotFound)))]
pub(super) async fn delete_meta(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let update = VolumeUpdate {
        delete_metadata_key: Some(ctx.param("key").to_owned()),
        ..VolumeUpdate::default()
    };
    change_metadata(&state, &ctx, update).await?;
    Ok(StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sorting_defaults_to_newest_first_and_checks_keys() {
        assert_eq!(
            sort_spec(&q(&[])).unwrap(),
            vec![("created_at".into(), true), ("id".into(), true)]
        );
        assert_eq!(
            sort_spec(&q(&[("sort", "name:asc,size")])).unwrap(),
            vec![
                ("name".into(), false),
                ("size".into(), true),
                ("id".into(), false)
            ]
        );
        assert!(sort_spec(&q(&[("sort", "nope")])).is_err());
        assert!(sort_spec(&q(&[("sort_key", "name"), ("sort_dir", "up")])).is_err());
        assert!(sort_spec(&q(&[("sort", "name"), ("sort_key", "id")])).is_err());
    }

    #[test]
    fn bootable_filter_is_strict_from_3_2() {
        // Before 3.2 only the three spellings of false (and nothing) are false.
        for (value, want) in [
            ("False", false),
            ("FALSE", false),
            ("", false),
            ("no", true),
            ("0", true),
            ("maybe", true),
            ("true", true),
        ] {
            assert_eq!(
                bool_filter("bootable", value, false).unwrap(),
                want,
                "{value}"
            );
        }
        for (value, want) in [
            ("T", true),
            (" yes ", true),
            ("1", true),
            ("No", false),
            ("f", false),
            ("0", false),
        ] {
            assert_eq!(
                bool_filter("bootable", value, true).unwrap(),
                want,
                "{value}"
            );
        }
        let e = bool_filter("bootable", "maybe", true).unwrap_err();
        assert_eq!(e.message, "Invalid input received: 'bootable = maybe'");
    }

    #[test]
    fn create_takes_cinder_and_v1_names_and_refuses_the_rest() {
        let body = |v: Value| match serde_json::json!({ "volume": v }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let n = parse_create(body(serde_json::json!({"size": 2, "display_name": "a"}))).unwrap();
        assert_eq!((n.size_gib, n.name.as_deref()), (2, Some("a")));
        let n = parse_create(body(serde_json::json!({"size": "3", "name": "b",
            "imageRef": "i", "multiattach": true})))
        .unwrap();
        assert_eq!(n.source_image_id.as_deref(), Some("i"));
        assert!(n.multiattach);
        assert!(parse_create(body(serde_json::json!({"size": 0}))).is_err());
        assert!(parse_create(body(serde_json::json!({}))).is_err());
        let n = parse_create(body(serde_json::json!({"snapshot_id": "s"}))).unwrap();
        assert_eq!((n.size_gib, n.snapshot_id.as_deref()), (0, Some("s")));
        assert!(parse_create(body(serde_json::json!({"size": 1, "bogus": 1}))).is_err());
        assert!(parse_create(body(serde_json::json!({"size": 1, "multiattach": "x"}))).is_err());
        assert!(parse_create(Map::new()).is_err());
    }

    #[test]
    fn update_distinguishes_absent_from_null() {
        let body = |v: Value| match serde_json::json!({ "volume": v }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let u = parse_update(body(
            serde_json::json!({"name": null, "metadata": {"k": "v"}}),
        ))
        .unwrap();
        assert_eq!(u.name, Some(None));
        assert!(u.description.is_none());
        assert_eq!(u.metadata.unwrap()["k"], "v");
        assert!(parse_update(body(serde_json::json!({"size": 3}))).is_err());
    }
}
