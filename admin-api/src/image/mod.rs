//! Image API v2 (Glance) with the StarlingX properties of seed 004: images, their data
//! (streamed in and out, never held whole), glance-direct import, tags, members, the
//! schemas clients build their models from, and Glance's version documents.
//!
//! Served at the seed's paths (`/v2/images...`) and under the catalog's `/image` endpoint
//! (see [`crate::mount`]), whose root answers Glance's version list. Errors are Glance's
//! (webob's bodies, [`error`]); a missing or bad token is keystonemiddleware's JSON 401.

mod error;
mod patch;
mod props;
mod query;
mod schemas;
pub mod service;
mod view;

use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use error::GlanceResult;
pub use error::{GlanceError, GlanceErrorBody};
pub use service::*;
pub use view::*;

use crate::{AppState, auth, model::Caller, model::Role, mount::BaseUrl};

/// Import methods cairn offers (the create response's `OpenStack-image-import-methods`).
pub const IMPORT_METHODS: &str = "glance-direct";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(versions_root))
        .routes(routes!(versions_root_slash))
        .routes(routes!(versions))
        .routes(routes!(list_images, create_image))
        .routes(routes!(show_image, patch_image, put_image, delete_image))
        .routes(routes!(upload_file, download_file))
        .routes(routes!(stage))
        .routes(routes!(import_image))
        .routes(routes!(deactivate))
        .routes(routes!(reactivate))
        .routes(routes!(add_tag, delete_tag))
        .routes(routes!(list_members, add_member))
        .routes(routes!(show_member, update_member, delete_member))
        .routes(routes!(schema_image))
        .routes(routes!(schema_images))
        .routes(routes!(schema_member))
        .routes(routes!(schema_members))
        .routes(routes!(schema_metadefs_namespace))
        .routes(routes!(schema_metadefs_resource_type))
        .routes(routes!(info_import))
        .layer(middleware::from_fn(request_id))
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-openstack-request-id");

/// Glance sends a request id on every response.
async fn request_id(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&format!("req-{}", uuid::Uuid::new_v4())) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}

// ---- plumbing ---------------------------------------------------------------------------

/// Renders a handler's outcome: errors in Glance's format for this request's `Accept`, a
/// failed authentication as keystonemiddleware's JSON 401.
fn finish(headers: &HeaderMap, r: GlanceResult<Response>) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            crate::error::json_error(StatusCode::UNAUTHORIZED, e.explanation)
        }
        Err(e) => e.render(headers),
    }
}

async fn caller(s: &AppState, headers: &HeaderMap) -> GlanceResult<Caller> {
    Ok(auth::token_caller(s, headers).await?)
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// A JSON body, with Glance's messages for what is not one.
fn json_body(body: &Bytes) -> GlanceResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(GlanceError::bad_request("Body expected in request."));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => Ok(v),
        Ok(_) => Err(GlanceError::bad_request(
            "Unexpected body type. Expected list/dict.",
        )),
        Err(_) => Err(GlanceError::bad_request("Malformed JSON in request body.")),
    }
}

fn read_body(body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> GlanceResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GlanceError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The body of your request was too large for this server.",
            )
        } else {
            GlanceError::bad_request(format!(
                "Could not read the request body: {}",
                e.body_text()
            ))
        }
    })
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// Data bodies must say `application/octet-stream`.
fn require_octet_stream(headers: &HeaderMap) -> GlanceResult<()> {
    let ct = content_type(headers);
    let essence = ct
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if essence == "application/octet-stream" {
        Ok(())
    } else {
        Err(GlanceError::media_type(
            ct,
            format!("Invalid content type {}", ct.unwrap_or("None")),
        ))
    }
}

/// `x-openstack-image-size`, else `Content-Length`.
fn size_hint(headers: &HeaderMap) -> GlanceResult<Option<u64>> {
    let Some(v) = headers
        .get("x-openstack-image-size")
        .or_else(|| headers.get(header::CONTENT_LENGTH))
    else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            GlanceError::bad_request("Invalid or missing image size in request headers.")
        })
}

fn no_image(id: &str) -> GlanceError {
    GlanceError::not_found(format!("No image found with ID {id}"))
}

/// Ids Glance would never have given out are unknown without asking (and so are ids
/// longer than a UUID).
fn check_id(id: &str) -> GlanceResult<()> {
    if id.len() > 36 || id.is_empty() {
        return Err(no_image(id));
    }
    Ok(())
}

// ---- versions -----------------------------------------------------------------------------

/// Glance's version list, `v2.17` current, with links under the mount the request came in
/// by (keystoneauth takes the self link as the API's base).
fn version_list(base: &str) -> ImageVersions {
    let href = format!("{base}/v2/");
    let ids = [
        ("v2.17", "CURRENT"),
        ("v2.15", "SUPPORTED"),
        ("v2.9", "SUPPORTED"),
        ("v2.7", "SUPPORTED"),
        ("v2.6", "SUPPORTED"),
        ("v2.5", "SUPPORTED"),
        ("v2.4", "SUPPORTED"),
        ("v2.3", "SUPPORTED"),
        ("v2.2", "SUPPORTED"),
        ("v2.1", "SUPPORTED"),
        ("v2.0", "SUPPORTED"),
    ];
    ImageVersions {
        versions: ids
            .iter()
            .map(|(id, status)| ImageVersion {
                id: (*id).into(),
                status: (*status).into(),
                links: vec![VersionLink {
                    rel: "self".into(),
                    href: href.clone(),
                }],
            })
            .collect(),
    }
}

/// The root of the catalog's image endpoint: Glance answers 300 with its versions.
#[utoipa::path(get, path = "/image", tag = "image",
    responses((status = 300, description = "Image API versions", body = ImageVersions)))]
async fn versions_root(BaseUrl(base): BaseUrl) -> Response {
    json(
        StatusCode::MULTIPLE_CHOICES,
        &version_list(&format!("{base}{}", crate::mount::IMAGE.prefix)),
    )
}

#[utoipa::path(get, path = "/image/", tag = "image",
    responses((status = 300, description = "Image API versions", body = ImageVersions)))]
async fn versions_root_slash(base: BaseUrl) -> Response {
    versions_root(base).await
}

/// `GET /versions` (glanceclient asks here, with or without a token, and wants a 200).
#[utoipa::path(get, path = "/versions", tag = "image",
    responses((status = 200, description = "Image API versions", body = ImageVersions)))]
async fn versions(BaseUrl(base): BaseUrl) -> Response {
    json(StatusCode::OK, &version_list(&base))
}

// ---- images -------------------------------------------------------------------------------

/// What `POST /v2/images` takes: base attributes and any extra properties (string values).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; the handler validates it key by key
struct ImageCreate {
    /// A UUID for the image (generated when absent).
    id: Option<String>,
    name: Option<String>,
    /// public (admins only), private, shared (default) or community.
    visibility: Option<String>,
    protected: Option<bool>,
    os_hidden: Option<bool>,
    /// The owning project (admins may give another).
    owner: Option<String>,
    #[schema(value_type = Option<String>)]
    disk_format: Option<String>,
    #[schema(value_type = Option<String>)]
    container_format: Option<String>,
    min_ram: Option<u32>,
    min_disk: Option<u32>,
    tags: Option<Vec<String>>,
    /// Extra properties, StarlingX's among them (`cache_raw`, `sw_wrs_auto_recovery`,
    /// `hw_wrs_live_migration_timeout`, `hw_wrs_live_migration_max_downtime`).
    #[serde(flatten)]
    properties: std::collections::BTreeMap<String, String>,
}

/// Glance's create checks, in Glance's order.
fn new_image(body: Value, caller: &Caller) -> GlanceResult<NewImage> {
    let Value::Object(map) = body else {
        return Err(props::schema_error(format!(
            "{body} is not of type 'object'"
        )));
    };
    for key in ["direct_url", "self", "file", "schema", "stores"] {
        if map.contains_key(key) {
            return Err(props::read_only(key));
        }
    }
    let mut new = NewImage::default();
    for (key, value) in &map {
        if props::is_reserved(key) {
            return Err(props::reserved(key));
        }
        if props::READ_ONLY.contains(&key.as_str()) && key != "id" {
            return Err(props::read_only(key));
        }
        match key.as_str() {
            "id" => match value {
                Value::String(s) if is_uuid(s) => new.id = Some(s.to_ascii_lowercase()),
                _ => {
                    return Err(props::schema_error(format!(
                        "{value} does not match the UUID pattern"
                    )));
                }
            },
            k if props::BASE.contains(&k) => match (k, props::base_value(k, value)?) {
                ("name", props::BaseValue::Text(v)) => new.name = v,
                ("owner", props::BaseValue::Text(v)) => new.owner = v,
                ("visibility", props::BaseValue::Text(v)) => new.visibility = v,
                ("disk_format", props::BaseValue::Text(v)) => new.disk_format = v,
                ("container_format", props::BaseValue::Text(v)) => new.container_format = v,
                ("protected", props::BaseValue::Bool(b)) => new.protected = b,
                ("os_hidden", props::BaseValue::Bool(b)) => new.os_hidden = b,
                ("min_ram", props::BaseValue::Int(n)) => new.min_ram = n,
                ("min_disk", props::BaseValue::Int(n)) => new.min_disk = n,
                ("tags", props::BaseValue::Tags(t)) => new.tags = t,
                _ => return Err(props::read_only(k)),
            },
            k => {
                let v = props::extra_value(k, value)?;
                new.properties.insert(k.to_owned(), v);
            }
        }
    }
    if let Some(owner) = &new.owner
        && owner != &caller.project_id
        && !caller.is_admin()
    {
        return Err(GlanceError::forbidden(format!(
            "You are not permitted to create images owned by '{owner}'"
        )));
    }
    if new.visibility.as_deref() == Some("public") && !caller.is_admin() {
        return Err(GlanceError::forbidden(
            "You are not authorized to complete publicize_image action.",
        ));
    }
    if !caller.has(Role::Member) {
        return Err(GlanceError::forbidden(
            "You are not authorized to complete add_image action.",
        ));
    }
    if new.tags.len() > props::TAG_QUOTA {
        return Err(props::tag_quota(new.tags.len()));
    }
    let n = props::counted_properties(new.properties.keys());
    if n > props::PROPERTY_QUOTA {
        return Err(props::property_quota(n));
    }
    Ok(new)
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

#[utoipa::path(post, path = "/v2/images", tag = "image",
    request_body(content = ImageCreate, description = "the new image's attributes"),
    responses(
        (status = 201, description = "created (queued); `Location` names it", body = ImageView,
            headers(("Location" = String, description = "the image's URL"),
                    ("OpenStack-image-import-methods" = String, description = "import methods offered"))),
        (status = 403, description = "a read-only or reserved attribute, publishing without admin, or another project as owner"),
        (status = 409, description = "an image with this id exists"),
        (status = 413, description = "too many properties or tags")))]
async fn create_image(
    State(s): State<AppState>,
    BaseUrl(base): BaseUrl,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let body = json_body(&read_body(body)?)?;
        let new = new_image(body, &caller)?;
        let image = s.images.create_image(&caller, new).await?;
        let mut resp = json(StatusCode::CREATED, &ImageView::from(&image));
        if let Ok(v) = HeaderValue::from_str(&format!("{base}/v2/images/{}", image.id)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp.headers_mut().insert(
            HeaderName::from_static("openstack-image-import-methods"),
            HeaderValue::from_static(IMPORT_METHODS),
        );
        Ok(resp)
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(get, path = "/v2/images", tag = "image",
    params(
        ("limit" = Option<u32>, Query, description = "page size (default 25, at most 1000)"),
        ("marker" = Option<String>, Query, description = "start after this image"),
        ("sort_key" = Option<String>, Query, description = "name, status, container_format, disk_format, size, id, created_at or updated_at (repeatable)"),
        ("sort_dir" = Option<String>, Query, description = "asc or desc (repeatable)"),
        ("sort" = Option<String>, Query, description = "`key:dir,...` (not with sort_key/sort_dir)"),
        ("visibility" = Option<String>, Query, description = "public, private, shared, community or all"),
        ("member_status" = Option<String>, Query, description = "pending, accepted (default), rejected or all"),
        ("name" = Option<String>, Query, description = "a name, or `in:a,b`"),
        ("status" = Option<String>, Query, description = "a status, or `in:a,b`"),
        ("owner" = Option<String>, Query, description = "owning project"),
        ("tag" = Option<String>, Query, description = "a tag every listed image has (repeatable)"),
        ("protected" = Option<String>, Query, description = "true or false"),
        ("os_hidden" = Option<String>, Query, description = "true lists only hidden images"),
        ("size_min" = Option<u64>, Query, description = "at least this many bytes"),
        ("size_max" = Option<u64>, Query, description = "at most this many bytes"),
        ("created_at" = Option<String>, Query, description = "`gt|gte|lt|lte|eq|neq:` ISO 8601 time"),
        ("updated_at" = Option<String>, Query, description = "`gt|gte|lt|lte|eq|neq:` ISO 8601 time")),
    responses((status = 200, description = "a page of images", body = ImageList)))]
async fn list_images(
    State(s): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let q = query::ListQuery::parse(uri.query())?;
        let all = s.images.list_images(&caller, q.scope).await?;
        let page = q.page(all)?;
        let body = ImageList {
            first: q.first_link(),
            next: q.next_link(page.len(), page.last()),
            images: page.iter().map(ImageView::from).collect(),
            schema: "/v2/schemas/images".into(),
        };
        Ok(json(StatusCode::OK, &body))
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(get, path = "/v2/images/{image_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    responses((status = 200, description = "the image", body = ImageView),
              (status = 404, description = "no such image the caller may see")))]
async fn show_image(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        check_id(&id)?;
        let image = s.images.get_image(&caller, &id).await?;
        Ok(json(StatusCode::OK, &ImageView::from(&image)))
    }
    .await;
    finish(&headers, r)
}

/// One json-patch operation (2.1 style; 2.0 style puts the op name as the key of the path).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
struct PatchOperation {
    /// add, remove or replace
    op: String,
    /// `/<attribute>`
    path: String,
    /// the new value (add, replace)
    value: Option<Value>,
}

async fn update(
    s: AppState,
    headers: &HeaderMap,
    id: &str,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    allow_json: bool,
) -> GlanceResult<Response> {
    let caller = caller(&s, headers).await?;
    let dialect = patch::dialect(content_type(headers), allow_json)?;
    check_id(id)?;
    let body = json_body(&read_body(body)?)?;
    let edit = patch::edit(&body, dialect, caller.is_admin())?;
    let image = s.images.update_image(&caller, id, edit).await?;
    Ok(json(StatusCode::OK, &ImageView::from(&image)))
}

#[utoipa::path(patch, path = "/v2/images/{image_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    request_body(content = Vec<PatchOperation>, content_type = "application/openstack-images-v2.1-json-patch",
        description = "json-patch operations (also `application/openstack-images-v2.0-json-patch`)"),
    responses((status = 200, description = "the updated image", body = ImageView),
              (status = 403, description = "a read-only, reserved or base attribute, or not the owner"),
              (status = 404, description = "no such image"),
              (status = 409, description = "a property that does not exist (or already does, v2.0)"),
              (status = 413, description = "too many properties or tags"),
              (status = 415, description = "not a json-patch media type (see `Accept-Patch`)")))]
async fn patch_image(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = update(s, &headers, &id, body, false).await;
    finish(&headers, r)
}

/// Seed 004's "Modifies a specific image": the same patch as PATCH (plain JSON is read as
/// the 2.1 dialect).
#[utoipa::path(put, path = "/v2/images/{image_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    request_body(content = Vec<PatchOperation>, content_type = "application/openstack-images-v2.1-json-patch",
        description = "json-patch operations (also `application/json` or the 2.0 dialect)"),
    responses((status = 200, description = "the updated image", body = ImageView),
              (status = 403, description = "a read-only, reserved or base attribute, or not the owner"),
              (status = 404, description = "no such image"),
              (status = 409, description = "a property that does not exist"),
              (status = 413, description = "too many properties or tags"),
              (status = 415, description = "not a patch media type")))]
async fn put_image(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = update(s, &headers, &id, body, true).await;
    finish(&headers, r)
}

#[utoipa::path(delete, path = "/v2/images/{image_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    responses((status = 204, description = "deleted, with its data and raw cache"),
              (status = 403, description = "protected, or not the owner"),
              (status = 404, description = "no such image")))]
async fn delete_image(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let gone = || GlanceError::not_found(format!("Failed to find image {id} to delete"));
        if id.len() > 36 {
            return Err(gone());
        }
        match s.images.delete_image(&caller, &id).await {
            Ok(()) => Ok(no_content()),
            Err(crate::model::ServiceError::NotFound(_)) => Err(gone()),
            Err(e) => Err(e.into()),
        }
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(post, path = "/v2/images/{image_id}/actions/deactivate", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    responses((status = 204, description = "deactivated (data downloads refused to non-admins)"),
              (status = 403, description = "not active, or not the owner"),
              (status = 404, description = "no such image")))]
async fn deactivate(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = set_active(s, &headers, &id, false).await;
    finish(&headers, r)
}

#[utoipa::path(post, path = "/v2/images/{image_id}/actions/reactivate", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    responses((status = 204, description = "active again"),
              (status = 403, description = "not deactivated, or not the owner"),
              (status = 404, description = "no such image")))]
async fn reactivate(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = set_active(s, &headers, &id, true).await;
    finish(&headers, r)
}

async fn set_active(
    s: AppState,
    headers: &HeaderMap,
    id: &str,
    active: bool,
) -> GlanceResult<Response> {
    let caller = caller(&s, headers).await?;
    check_id(id)?;
    s.images.set_active(&caller, id, active).await?;
    Ok(no_content())
}

// ---- tags ---------------------------------------------------------------------------------

fn tags_not_found(id: &str, e: crate::model::ServiceError) -> GlanceError {
    match e {
        crate::model::ServiceError::NotFound(m) if m.starts_with("No image found") => {
            GlanceError::not_found(format!("Image {id} not found."))
        }
        other => other.into(),
    }
}

#[utoipa::path(put, path = "/v2/images/{image_id}/tags/{tag}", tag = "image",
    params(("image_id" = String, Path, description = "image id"), ("tag" = String, Path, description = "the tag")),
    responses((status = 204, description = "tagged (idempotent)"),
              (status = 400, description = "longer than 255 characters"),
              (status = 404, description = "no such image"),
              (status = 413, description = "too many tags")))]
async fn add_tag(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, tag)): Path<(String, String)>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        if tag.chars().count() > 255 {
            return Err(props::schema_error(format!("'{tag}' is too long")));
        }
        let image_id = id.clone();
        let edit: ImageEdit = Box::new(move |image: &mut Image| {
            if !image.tags.contains(&tag) {
                image.tags.push(tag);
            }
            if image.tags.len() > props::TAG_QUOTA {
                return Err(crate::model::ServiceError::OverLimit(format!(
                    "Image tag limit exceeded for image {image_id}: The limit has been exceeded on the number of allowed image tags. Attempted: {}, Maximum: {}:",
                    image.tags.len(),
                    props::TAG_QUOTA
                )));
            }
            Ok(())
        });
        s.images
            .update_image(&caller, &id, edit)
            .await
            .map_err(|e| tags_not_found(&id, e))?;
        Ok(no_content())
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(delete, path = "/v2/images/{image_id}/tags/{tag}", tag = "image",
    params(("image_id" = String, Path, description = "image id"), ("tag" = String, Path, description = "the tag")),
    responses((status = 204, description = "untagged"),
              (status = 404, description = "no such image, or not tagged so")))]
async fn delete_tag(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, tag)): Path<(String, String)>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let edit: ImageEdit = Box::new(move |image: &mut Image| {
            let before = image.tags.len();
            image.tags.retain(|t| t != &tag);
            if image.tags.len() == before {
                return Err(crate::model::ServiceError::NotFound(
                    "The resource could not be found.".into(),
                ));
            }
            Ok(())
        });
        s.images
            .update_image(&caller, &id, edit)
            .await
            .map_err(|e| tags_not_found(&id, e))?;
        Ok(no_content())
    }
    .await;
    finish(&headers, r)
}

// ---- data ---------------------------------------------------------------------------------

/// Image data: raw bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
struct ImageBytes(Vec<u8>);

fn body_stream(body: Body) -> ByteStream {
    Box::pin(
        body.into_data_stream()
            .map_err(|e| std::io::Error::other(e.to_string())),
    )
}

#[utoipa::path(put, path = "/v2/images/{image_id}/file", tag = "image",
    params(("image_id" = String, Path, description = "image id"),
           ("x-openstack-image-size" = Option<u64>, Header, description = "the data's size, when known")),
    request_body(content = ImageBytes, content_type = "application/octet-stream", description = "the image data, streamed"),
    responses((status = 204, description = "stored; the image is active"),
              (status = 400, description = "disk_format or container_format not set"),
              (status = 404, description = "no such image"),
              (status = 409, description = "the image is not queued"),
              (status = 413, description = "larger than the size cap, or no space in the store"),
              (status = 415, description = "not application/octet-stream, or the data does not match the disk_format or fails the safety checks")))]
async fn upload_file(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let r = upload(s, &headers, &id, body, UploadKind::Direct).await;
    finish(&headers, r)
}

#[utoipa::path(put, path = "/v2/images/{image_id}/stage", tag = "image",
    params(("image_id" = String, Path, description = "image id"),
           ("x-openstack-image-size" = Option<u64>, Header, description = "the data's size, when known")),
    request_body(content = ImageBytes, content_type = "application/octet-stream", description = "the image data, streamed"),
    responses((status = 204, description = "staged; the image is uploading"),
              (status = 404, description = "no such image"),
              (status = 409, description = "the image is not queued"),
              (status = 413, description = "larger than the size cap, or no space in the store"),
              (status = 415, description = "not application/octet-stream")))]
async fn stage(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let r = upload(s, &headers, &id, body, UploadKind::Stage).await;
    finish(&headers, r)
}

async fn upload(
    s: AppState,
    headers: &HeaderMap,
    id: &str,
    body: Body,
    kind: UploadKind,
) -> GlanceResult<Response> {
    let caller = caller(&s, headers).await?;
    require_octet_stream(headers)?;
    let hint = size_hint(headers)?;
    check_id(id)?;
    s.images
        .upload(&caller, id, kind, body_stream(body), hint)
        .await?;
    Ok(no_content())
}

/// `Range: bytes=a-b`, `bytes=a-`, `bytes=-n` against an image of `total` bytes:
/// (offset, length).
fn parse_range(value: &str, total: u64) -> GlanceResult<(u64, u64)> {
    let invalid = || {
        let mut e = GlanceError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "The Range requested is not available.",
        );
        e.detail = "Invalid Range header.".into();
        e
    };
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(invalid)?;
    if spec.contains(',') {
        return Err(GlanceError::bad_request(
            "Requests with multiple ranges are not supported in Glance. You may make multiple single-range requests instead.",
        ));
    }
    let (a, b) = spec.split_once('-').ok_or_else(invalid)?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| invalid())?;
        if n == 0 {
            return Err(invalid());
        }
        let n = n.min(total);
        return Ok((total - n, n));
    }
    let start: u64 = a.parse().map_err(|_| invalid())?;
    let end: Option<u64> = if b.is_empty() {
        None
    } else {
        Some(b.parse().map_err(|_| invalid())?)
    };
    if end.is_some_and(|e| e < start) {
        return Err(invalid());
    }
    if start >= total {
        let mut e = GlanceError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "The Range requested is not available.",
        );
        e.detail = format!(
            "Invalid start position in Range header. Start position MUST be in the inclusive range [0, {}].",
            total.saturating_sub(1)
        );
        return Err(e);
    }
    let end = end.unwrap_or(total - 1).min(total - 1);
    Ok((start, end - start + 1))
}

#[utoipa::path(get, path = "/v2/images/{image_id}/file", tag = "image",
    params(("image_id" = String, Path, description = "image id"),
           ("Range" = Option<String>, Header, description = "one `bytes=` range")),
    responses(
        (status = 200, description = "the data, streamed", content_type = "application/octet-stream", body = ImageBytes,
            headers(("Content-MD5" = String, description = "the md5 checksum, hex"))),
        (status = 204, description = "the image has no data"),
        (status = 206, description = "the requested range", content_type = "application/octet-stream", body = ImageBytes,
            headers(("Content-Range" = String, description = "bytes a-b/size"))),
        (status = 403, description = "deactivated (non-admins)"),
        (status = 404, description = "no such image"),
        (status = 416, description = "a range outside the data")))]
async fn download_file(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        check_id(&id)?;
        let range_header = headers
            .get(header::RANGE)
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let range = match &range_header {
            None => None,
            Some(v) => {
                let image = s.images.get_image(&caller, &id).await?;
                match image.size {
                    Some(total) if total > 0 => Some(parse_range(v, total)?),
                    _ => None,
                }
            }
        };
        let data = s
            .images
            .download(&caller, &id, range.map(|(o, l)| (o, Some(l))))
            .await?;
        let Some(data) = data else {
            return Ok(no_content());
        };
        let status = if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        let mut resp = Response::new(Body::from_stream(data.stream));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len));
        if let Some(md5) = data
            .checksum
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            h.insert(HeaderName::from_static("content-md5"), md5);
        }
        if range.is_some()
            && let Ok(v) = HeaderValue::from_str(&format!(
                "bytes {}-{}/{}",
                data.offset,
                data.offset + data.len.saturating_sub(1),
                data.total
            ))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
        Ok(resp)
    }
    .await;
    finish(&headers, r)
}

/// `POST /v2/images/{id}/import`
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
struct ImportRequest {
    method: ImportMethod,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
struct ImportMethod {
    /// `glance-direct`
    name: String,
}

#[utoipa::path(post, path = "/v2/images/{image_id}/import", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    request_body(content = ImportRequest, description = "`{\"method\": {\"name\": \"glance-direct\"}}`"),
    responses((status = 202, description = "importing; the image becomes active when done"),
              (status = 400, description = "no method, or one cairn does not offer"),
              (status = 404, description = "no such image"),
              (status = 409, description = "not staged, or formats not set")))]
async fn import_image(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let body = json_body(&read_body(body)?)?;
        let method = body
            .get("method")
            .ok_or_else(|| GlanceError::bad_request("Import request requires a 'method' field."))?;
        let name = method
            .get("name")
            .ok_or_else(|| GlanceError::bad_request("Import request requires a 'name' field."))?;
        if name.as_str() != Some("glance-direct") {
            let shown = name
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| name.to_string());
            return Err(GlanceError::bad_request(format!(
                "Unknown import method name '{shown}'."
            )));
        }
        for flag in ["all_stores_must_succeed", "all_stores"] {
            if body.get(flag).is_some_and(|v| !v.is_boolean()) {
                return Err(GlanceError::bad_request(format!(
                    "'{flag}' must be boolean value only"
                )));
            }
        }
        check_id(&id)?;
        s.images.import(&caller, &id).await?;
        Ok(StatusCode::ACCEPTED.into_response())
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(get, path = "/v2/info/import", tag = "image",
    responses((status = 200, description = "the import methods offered", body = ImportInfo)))]
async fn info_import(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let r = async {
        caller(&s, &headers).await?;
        Ok(json(
            StatusCode::OK,
            &ImportInfo {
                import_methods: ImportMethods {
                    description: "Import methods available.".into(),
                    kind: "array".into(),
                    value: vec![IMPORT_METHODS.into()],
                },
            },
        ))
    }
    .await;
    finish(&headers, r)
}

// ---- members ------------------------------------------------------------------------------

/// `POST /v2/images/{id}/members`
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
struct MemberCreate {
    /// The project to share with.
    member: String,
}

/// `PUT /v2/images/{id}/members/{member_id}`
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
struct MemberUpdate {
    /// pending, accepted or rejected
    status: String,
}

#[utoipa::path(get, path = "/v2/images/{image_id}/members", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    responses((status = 200, description = "the members the caller may see", body = MemberList),
              (status = 403, description = "the image is not shared"),
              (status = 404, description = "no such image")))]
async fn list_members(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let members = s.images.list_members(&caller, &id).await?;
        Ok(json(
            StatusCode::OK,
            &MemberList {
                members: members.iter().map(MemberView::from).collect(),
                schema: "/v2/schemas/members".into(),
            },
        ))
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(post, path = "/v2/images/{image_id}/members", tag = "image",
    params(("image_id" = String, Path, description = "image id")),
    request_body(content = MemberCreate, description = "the project to share with"),
    responses((status = 200, description = "the new member (pending)", body = MemberView),
              (status = 403, description = "not shared, or not the owner"),
              (status = 404, description = "no such image"),
              (status = 409, description = "already a member"),
              (status = 413, description = "too many members")))]
async fn add_member(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let body = json_body(&read_body(body)?)?;
        let Value::Object(map) = body else {
            return Err(GlanceError::bad_request(
                "Expected a member in the form: {\"member\": \"image_id\"}",
            ));
        };
        let member = match map.get("member") {
            None => return Err(GlanceError::bad_request("Member to be added not specified")),
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_) | Value::Null | Value::Bool(false)) => {
                return Err(GlanceError::bad_request("Member can't be empty"));
            }
            Some(other) => other.to_string(),
        };
        let m = s.images.add_member(&caller, &id, &member).await?;
        Ok(json(StatusCode::OK, &MemberView::from(&m)))
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(get, path = "/v2/images/{image_id}/members/{member_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id"), ("member_id" = String, Path, description = "member project id")),
    responses((status = 200, description = "the member", body = MemberView),
              (status = 404, description = "no such image or member")))]
async fn show_member(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, member)): Path<(String, String)>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let m = s.images.get_member(&caller, &id, &member).await?;
        Ok(json(StatusCode::OK, &MemberView::from(&m)))
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(put, path = "/v2/images/{image_id}/members/{member_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id"), ("member_id" = String, Path, description = "member project id")),
    request_body(content = MemberUpdate, description = "the member's answer"),
    responses((status = 200, description = "the member", body = MemberView),
              (status = 400, description = "no status, or not pending/accepted/rejected"),
              (status = 403, description = "only the member itself may answer"),
              (status = 404, description = "no such image or member")))]
async fn update_member(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, member)): Path<(String, String)>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        let body = json_body(&read_body(body)?)?;
        let Value::Object(map) = body else {
            return Err(GlanceError::bad_request(
                "Expected a status in the form: {\"status\": \"status\"}",
            ));
        };
        let status = match map.get("status") {
            None => return Err(GlanceError::bad_request("Status not specified")),
            Some(Value::String(st))
                if matches!(st.as_str(), "pending" | "accepted" | "rejected") =>
            {
                st.clone()
            }
            Some(_) => {
                return Err(GlanceError::bad_request(
                    "Incorrect request: Status must be \"pending\", \"accepted\" or \"rejected\".",
                ));
            }
        };
        let m = s
            .images
            .update_member(&caller, &id, &member, &status)
            .await?;
        Ok(json(StatusCode::OK, &MemberView::from(&m)))
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(delete, path = "/v2/images/{image_id}/members/{member_id}", tag = "image",
    params(("image_id" = String, Path, description = "image id"), ("member_id" = String, Path, description = "member project id")),
    responses((status = 204, description = "no longer shared with the project"),
              (status = 403, description = "not the owner"),
              (status = 404, description = "no such image or member")))]
async fn delete_member(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, member)): Path<(String, String)>,
) -> Response {
    let r = async {
        let caller = caller(&s, &headers).await?;
        s.images.delete_member(&caller, &id, &member).await?;
        Ok(no_content())
    }
    .await;
    finish(&headers, r)
}

// ---- schemas ------------------------------------------------------------------------------

/// A JSON Schema document.
#[derive(ToSchema)]
#[allow(dead_code)]
struct JsonSchemaDocument(Map<String, Value>);

async fn schema_response(s: AppState, headers: HeaderMap, doc: fn() -> Value) -> Response {
    let r = async {
        caller(&s, &headers).await?;
        Ok(json(StatusCode::OK, &doc()))
    }
    .await;
    finish(&headers, r)
}

#[utoipa::path(get, path = "/v2/schemas/image", tag = "image",
    responses((status = 200, description = "the image schema (extra properties: strings)", body = JsonSchemaDocument)))]
async fn schema_image(State(s): State<AppState>, headers: HeaderMap) -> Response {
    schema_response(s, headers, schemas::image).await
}

#[utoipa::path(get, path = "/v2/schemas/images", tag = "image",
    responses((status = 200, description = "the image list schema", body = JsonSchemaDocument)))]
async fn schema_images(State(s): State<AppState>, headers: HeaderMap) -> Response {
    schema_response(s, headers, schemas::images).await
}

#[utoipa::path(get, path = "/v2/schemas/member", tag = "image",
    responses((status = 200, description = "the member schema", body = JsonSchemaDocument)))]
async fn schema_member(State(s): State<AppState>, headers: HeaderMap) -> Response {
    schema_response(s, headers, schemas::member).await
}

#[utoipa::path(get, path = "/v2/schemas/members", tag = "image",
    responses((status = 200, description = "the member list schema", body = JsonSchemaDocument)))]
async fn schema_members(State(s): State<AppState>, headers: HeaderMap) -> Response {
    schema_response(s, headers, schemas::members).await
}

#[utoipa::path(get, path = "/v2/schemas/metadefs/namespace", tag = "image",
    responses((status = 200, description = "the metadata namespace schema (glanceclient reads it at start-up)", body = JsonSchemaDocument)))]
async fn schema_metadefs_namespace(State(s): State<AppState>, headers: HeaderMap) -> Response {
    schema_response(s, headers, schemas::metadefs_namespace).await
}

#[utoipa::path(get, path = "/v2/schemas/metadefs/resource_type", tag = "image",
    responses((status = 200, description = "the resource type association schema", body = JsonSchemaDocument)))]
async fn schema_metadefs_resource_type(State(s): State<AppState>, headers: HeaderMap) -> Response {
    schema_response(s, headers, schemas::metadefs_resource_type).await
}
