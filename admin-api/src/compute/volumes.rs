//! `/extensions` and `/os-volumes`.

use std::collections::BTreeMap;

use axum::{
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, Fault, body_or_fault, fault::FaultResult, json_body, limited, query};
use crate::{
    AppState,
    model::{NewVolume, ServiceError, Volume, VolumeScope},
    schema::{BadRequest, Forbidden, ItemNotFound, OverLimit},
    time_fmt,
};

/// The 2011 descriptor, byte for byte as the seed prints it (key order included, which a
/// serialised map would not keep).
const OS_VOLUMES: &str = r#"{"updated": "2011-03-25T00:00:00+00:00", "name": "Volumes", "links": [], "namespace": "http://docs.openstack.org/ext/volumes/api/v1.1", "alias": "os-volumes", "description": "Volumes support"}"#;

/// The extension descriptor (sent as the seed's bytes; this documents them).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Extension {
    updated: String,
    name: String,
    links: Vec<String>,
    namespace: String,
    alias: String,
    description: String,
}

/// `{"extensions": [...]}`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ExtensionsResponse {
    extensions: Vec<Extension>,
}

/// `{"extension": {...}}`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ExtensionResponse {
    extension: Extension,
}

fn raw_json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/{tenant_id}/extensions", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    responses((status = 200, description = "the os-volumes and os-shared-filesystem descriptors", body = ExtensionsResponse)))]
pub(super) async fn list_extensions(_ctx: Ctx) -> Response {
    let shared_fs = super::filesystems::SHARED_FS;
    raw_json(
        StatusCode::OK,
        format!(r#"{{"extensions": [{OS_VOLUMES}, {shared_fs}]}}"#),
    )
}

#[utoipa::path(get, path = "/{tenant_id}/extensions/{alias}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("alias" = String, Path, description = "extension alias, `os-volumes` or `os-shared-filesystem`")),
    responses((status = 200, description = "the descriptor", body = ExtensionResponse),
              (status = 404, description = "itemNotFound: no such extension", body = ItemNotFound)))]
pub(super) async fn show_extension(ctx: Ctx) -> FaultResult<Response> {
    let alias = ctx.param("alias");
    let descriptor = match alias {
        "os-volumes" => OS_VOLUMES,
        "os-shared-filesystem" => super::filesystems::SHARED_FS,
        _ => {
            return Err(Fault::not_found(format!(
                "Extension {alias} could not be found."
            )));
        }
    };
    Ok(raw_json(
        StatusCode::OK,
        format!(r#"{{"extension": {descriptor}}}"#),
    ))
}

/// A volume as nova's `_translate_volume_summary_view` shows it: all 11 keys, camelCase.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VolumeView {
    id: String,
    /// creating, downloading (being filled from an image), available, attaching, in-use,
    /// detaching, uploading, deleting or error.
    status: String,
    /// GiB.
    size: u64,
    availability_zone: String,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`
    created_at: String,
    /// One entry per attachment; `[{}]` when the volume is attached nowhere.
    attachments: Vec<VolumeAttachment>,
    display_name: Option<String>,
    display_description: Option<String>,
    volume_type: Option<String>,
    snapshot_id: Option<String>,
    metadata: BTreeMap<String, String>,
}

/// An attachment inside a volume view (every key absent in the empty placeholder).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VolumeAttachment {
    /// The volume id again (nova shows it as the attachment's id).
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
}

/// `{"volume": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VolumeResponse {
    volume: VolumeView,
}

/// `{"volumes": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VolumesResponse {
    volumes: Vec<VolumeView>,
}

pub(super) fn volume_view(v: &Volume) -> VolumeView {
    let attachments = if v.attachments.is_empty() {
        vec![VolumeAttachment {
            id: None,
            volume_id: None,
            server_id: None,
            device: None,
        }]
    } else {
        v.attachments
            .iter()
            .map(|a| VolumeAttachment {
                id: Some(v.id.clone()),
                volume_id: Some(v.id.clone()),
                server_id: Some(a.server_id.clone()),
                device: a.device.clone(),
            })
            .collect()
    };
    VolumeView {
        id: v.id.clone(),
        status: v.status.as_str().to_owned(),
        size: v.size_gib,
        availability_zone: v.availability_zone.clone(),
        created_at: time_fmt::compute(v.created_at),
        attachments,
        display_name: v.name.clone(),
        display_description: v.description.clone(),
        volume_type: v.volume_type.clone(),
        snapshot_id: v.snapshot_id.clone(),
        metadata: v.metadata.clone(),
    }
}

/// What `POST os-volumes` takes: nova's create schema (`schemas/volumes.py`), nothing else.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body `parse_new_volume` checks key by key
pub(crate) struct VolumeCreateRequest {
    volume: VolumeCreate,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct VolumeCreate {
    /// GiB, at least 1 (an integer, or a string of digits).
    #[schema(minimum = 1, maximum = 8589934591_u64)]
    size: u64,
    #[schema(max_length = 255)]
    display_name: Option<String>,
    #[schema(max_length = 255)]
    display_description: Option<String>,
    /// `multiattach` makes a volume that several servers may attach at once.
    #[schema(max_length = 255)]
    volume_type: Option<String>,
    #[schema(max_length = 255)]
    availability_zone: Option<String>,
    /// Keys 1 to 255 characters, values at most 255.
    metadata: Option<BTreeMap<String, String>>,
    /// A copy-on-write clone of this Block Storage snapshot (404 if there is none).
    #[schema(max_length = 255)]
    snapshot_id: Option<String>,
    /// A cairn extension (Cinder's key): the volume is made from this image, a copy-on-write
    /// clone of its raw content (instant), or `downloading` while it is converted. The size
    /// must hold the image's virtual size and `min_disk`.
    #[serde(rename = "imageRef")]
    #[schema(format = "uuid")]
    image_ref: Option<String>,
}

async fn list(state: &AppState, ctx: &Ctx, raw_query: Option<String>) -> FaultResult<Response> {
    let q = query(raw_query.as_deref())?;
    // cinder's `all_tenants` (any value), honoured for admins only and ignored otherwise.
    let scope = if q.contains_key("all_tenants") && ctx.caller.is_admin() {
        VolumeScope::AllProjects
    } else {
        VolumeScope::Project
    };
    let volumes = state.service.list_volumes(&ctx.caller, scope).await?;
    let volumes = limited(volumes, &q)?;
    let volumes = volumes.iter().map(volume_view).collect();
    Ok(axum::Json(VolumesResponse { volumes }).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/os-volumes", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("limit" = Option<u32>, Query, description = "at most this many (max 1000)"),
           ("offset" = Option<u32>, Query, description = "skip this many"),
           ("all_tenants" = Option<String>, Query, description = "admin: every project's volumes")),
    responses((status = 200, description = "the project's volumes", body = VolumesResponse)))]
pub(super) async fn list_volumes(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(q): RawQuery,
) -> FaultResult<Response> {
    list(&state, &ctx, q).await
}

#[utoipa::path(get, path = "/{tenant_id}/os-volumes/detail", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("limit" = Option<u32>, Query, description = "at most this many (max 1000)"),
           ("offset" = Option<u32>, Query, description = "skip this many"),
           ("all_tenants" = Option<String>, Query, description = "admin: every project's volumes")),
    responses((status = 200, description = "the project's volumes (the same view as the index)", body = VolumesResponse)))]
pub(super) async fn list_volumes_detail(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(q): RawQuery,
) -> FaultResult<Response> {
    list(&state, &ctx, q).await
}

pub(crate) fn invalid(field: &str, why: &str) -> Fault {
    Fault::bad_request(format!(
        "Invalid input for field/attribute {field}. Value: {why}"
    ))
}

pub(crate) fn opt_string(m: &Map<String, Value>, key: &str) -> FaultResult<Option<String>> {
    match m.get(key) {
        // nova's schema wants a string, but cinder (which nova proxies) takes null as "not
        // given", and so do clients that serialise unset options.
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= 255 => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(invalid(key, "is too long (255 characters at most)")),
        Some(_) => Err(invalid(key, "is not of type 'string'")),
    }
}

/// `size`: an integer or a string of digits, at least 1 (nova's `positive_integer`).
pub(crate) fn parse_size(v: Option<&Value>) -> FaultResult<u64> {
    let n = match v {
        None => {
            return Err(Fault::bad_request(
                "Invalid input for field/attribute volume. Value: 'size' is a required property",
            ));
        }
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| invalid("size", "is not a positive integer"))?,
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u64>()
            .map_err(|_| invalid("size", "is too large"))?,
        Some(_) => return Err(invalid("size", "is not a positive integer")),
    };
    if n < 1 {
        return Err(invalid("size", "is less than the minimum of 1"));
    }
    // Sizes are GiB; anything past 2^63 bytes cannot be addressed (and SQLite stores i64).
    if n > (i64::MAX as u64) >> 30 {
        return Err(invalid("size", "is too large"));
    }
    Ok(n)
}

/// `metadata`: an object of strings, keys 1 to 255 characters, values at most 255.
pub(crate) fn parse_metadata(v: Option<&Value>) -> FaultResult<BTreeMap<String, String>> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => {
            let mut out = BTreeMap::new();
            for (k, val) in m {
                let Value::String(s) = val else {
                    return Err(invalid(
                        "metadata",
                        &format!("value of '{k}' is not a string"),
                    ));
                };
                if k.is_empty() || k.chars().count() > 255 || s.chars().count() > 255 {
                    return Err(invalid(
                        "metadata",
                        "keys must be 1 to 255 characters, values at most 255",
                    ));
                }
                out.insert(k.clone(), s.clone());
            }
            Ok(out)
        }
        Some(_) => Err(invalid("metadata", "is not of type 'object'")),
    }
}

/// The volume type that makes a multi-attach volume (cinder's convention).
pub(crate) const MULTIATTACH_TYPE: &str = "multiattach";

/// The keys of `volume` that `POST os-volumes` takes (a test holds [`VolumeCreate`] to them).
pub(super) const VOLUME_KEYS: [&str; 8] = [
    "size",
    "imageRef",
    "volume_type",
    "metadata",
    "snapshot_id",
    "availability_zone",
    "display_name",
    "display_description",
];

/// nova's create schema (`schemas/volumes.py`): `volume` required, `size` required, the listed
/// optional keys, nothing else.
fn parse_new_volume(body: Map<String, Value>) -> FaultResult<NewVolume> {
    if let Some(k) = body.keys().find(|k| *k != "volume") {
        return Err(Fault::bad_request(format!(
            "Invalid input for field/attribute volume. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let Some(Value::Object(v)) = body.get("volume") else {
        return Err(Fault::bad_request(
            "Invalid input for field/attribute volume. Value: 'volume' is a required property and must be an object",
        ));
    };
    if let Some(k) = v.keys().find(|k| !VOLUME_KEYS.contains(&k.as_str())) {
        return Err(Fault::bad_request(format!(
            "Invalid input for field/attribute volume. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let size_gib = parse_size(v.get("size"))?;
    let metadata = parse_metadata(v.get("metadata"))?;
    let snapshot_id = opt_string(v, "snapshot_id")?;
    let volume_type = opt_string(v, "volume_type")?;
    Ok(NewVolume {
        size_gib,
        name: opt_string(v, "display_name")?,
        description: opt_string(v, "display_description")?,
        // nova's schema has no `multiattach`; cinder's conventional multi-attach volume type
        // is named so.
        multiattach: volume_type.as_deref() == Some(MULTIATTACH_TYPE),
        volume_type,
        availability_zone: opt_string(v, "availability_zone")?,
        snapshot_id,
        metadata,
        source_image_id: opt_string(v, "imageRef")?,
        ..NewVolume::default()
    })
}

#[utoipa::path(post, path = "/{tenant_id}/os-volumes", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    request_body(content = VolumeCreateRequest, content_type = "application/json"),
    responses((status = 200, description = "created (nova answers 200, not 202)", body = VolumeResponse,
                  headers(("Location" = String, description = "the volume's URL"))),
              (status = 400, description = "badRequest: invalid body", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound: the snapshot (cairn keeps none) or the image", body = ItemNotFound),
              (status = 413, description = "overLimit: quota", body = OverLimit)))]
pub(super) async fn create_volume(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer()?;
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let new = parse_new_volume(body)?;
    let volume = state.service.create_volume(&ctx.caller, new).await?;
    let mut resp = axum::Json(VolumeResponse {
        volume: volume_view(&volume),
    })
    .into_response();
    if let Ok(loc) =
        HeaderValue::from_str(&format!("{}/{}", ctx.url.trim_end_matches('/'), volume.id))
    {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/{tenant_id}/os-volumes/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "the volume", body = VolumeResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_volume(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let volume = state
        .service
        .get_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await?;
    Ok(axum::Json(VolumeResponse {
        volume: volume_view(&volume),
    })
    .into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/os-volumes/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("volume_id" = String, Path, description = "volume id")),
    responses((status = 202, description = "deleted (empty body)"),
              (status = 400, description = "badRequest: the volume is attached (cinder's InvalidVolume, as nova relays it)", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn delete_volume(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    ctx.require_writer()?;
    match state
        .service
        .delete_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await
    {
        Ok(()) => Ok(StatusCode::ACCEPTED.into_response()),
        // Upstream: cinder refuses with 400 InvalidVolume, nova relays it as a 400.
        Err(ServiceError::Conflict(m)) => Err(Fault::bad_request(m)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    /// The descriptor is sent as the seed's bytes; the documented schema must fit them.
    #[test]
    fn the_descriptor_fits_its_schema() {
        let list: super::ExtensionsResponse =
            serde_json::from_str(&format!(r#"{{"extensions": [{}]}}"#, super::OS_VOLUMES))
                .expect("extensions");
        assert_eq!(list.extensions.len(), 1);
        let one: super::ExtensionResponse =
            serde_json::from_str(&format!(r#"{{"extension": {}}}"#, super::OS_VOLUMES))
                .expect("extension");
        assert_eq!(one.extension.alias, "os-volumes");
    }
}
