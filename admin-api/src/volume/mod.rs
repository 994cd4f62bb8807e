//! Block Storage (cinder) v3, and v2 as seed 003 uses it: `/v3/{tenant_id}/volumes...` and
//! `/v2/{tenant_id}/volumes...`, also under the catalog's `/volume` endpoint, whose roots
//! (`/volume`, `/volume/v3`, `/volume/v2`) answer cinder's version documents.
//!
//! The volumes are the same as Compute's `os-volumes` and pdisk's disks: one model, three
//! views. Errors are cinder faults (the same shape as nova's), and every response carries
//! `x-openstack-request-id`. Under `/v3` requests are microversioned: cairn speaks 3.0 to
//! 3.3 (3.1: `visibility` and `protected` on `os-volume_upload_image`; 3.2: a strict
//! `bootable` filter; 3.3: user messages, `/messages`). `/v2` behaves as 3.0.

mod actions;
mod messages;
mod snapshots;
mod types;
mod volumes;

use std::collections::HashMap;

use axum::{
    extract::{FromRequestParts, OriginalUri, Path, Request},
    http::{HeaderName, HeaderValue, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::any,
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::compute::fault::FaultResult;
use crate::compute::{Fault, unknown_path, with_bad_method};
use crate::{AppState, auth, model::Caller, model::Role, mount::BaseUrl};

/// Path prefixes the family is served under (each followed by `/{tenant_id}`).
pub const PREFIXES: [&str; 2] = ["/v3", "/v2"];

/// Microversions cairn accepts under `/v3`.
pub const MIN_VERSION: (u32, u32) = (3, 0);
pub const MAX_VERSION: (u32, u32) = (3, 3);

/// `visibility` and `protected` on `os-volume_upload_image`.
pub const UPLOAD_IMAGE_PARAMS: (u32, u32) = (3, 1);
/// The `bootable` filter takes only boolean words (before: anything but false is true).
pub const VOLUME_LIST_BOOTABLE: (u32, u32) = (3, 2);
/// `/messages`.
pub const MESSAGES: (u32, u32) = (3, 3);

pub fn router() -> OpenApiRouter<AppState> {
    let mut r = OpenApiRouter::new();
    for prefix in PREFIXES {
        r = r.nest(prefix, family_routes(prefix));
    }
    r.routes(routes!(versions_root))
        .routes(routes!(versions_root_slash))
        .routes(routes!(version_v3))
        .routes(routes!(version_v3_slash))
        .routes(routes!(version_v2))
        .routes(routes!(version_v2_slash))
        .layer(middleware::from_fn(volume_headers))
}

fn family_routes(prefix: &str) -> OpenApiRouter<AppState> {
    let r = OpenApiRouter::new()
        .routes(with_bad_method(routes!(
            volumes::list_volumes,
            volumes::create_volume
        )))
        .routes(with_bad_method(routes!(volumes::list_volumes_detail)))
        .routes(with_bad_method(routes!(
            volumes::show_volume,
            volumes::update_volume,
            volumes::delete_volume
        )))
        .routes(with_bad_method(routes!(
            volumes::show_metadata,
            volumes::merge_metadata,
            volumes::replace_metadata
        )))
        .routes(with_bad_method(routes!(
            volumes::show_meta,
            volumes::set_meta,
            volumes::delete_meta
        )))
        .routes(with_bad_method(routes!(actions::volume_action)))
        .routes(with_bad_method(routes!(
            types::list_types,
            types::create_type
        )))
        .routes(with_bad_method(routes!(
            types::show_type,
            types::update_type,
            types::delete_type
        )))
        .routes(with_bad_method(routes!(
            types::show_specs,
            types::add_specs
        )))
        .routes(with_bad_method(routes!(
            types::show_spec,
            types::set_spec,
            types::delete_spec
        )))
        .route(
            "/{tenant_id}/types/{type_id}/extra_specs/{key}/{*rest}",
            any(unknown_path),
        )
        .route(
            "/{tenant_id}/snapshots/{snapshot_id}/{*rest}",
            any(unknown_path),
        )
        .routes(with_bad_method(routes!(types::limits)))
        .routes(with_bad_method(routes!(types::zones)))
        .routes(with_bad_method(routes!(
            snapshots::list_snapshots,
            snapshots::create_snapshot
        )))
        .routes(with_bad_method(routes!(snapshots::list_snapshots_detail)))
        .routes(with_bad_method(routes!(
            snapshots::show_snapshot,
            snapshots::update_snapshot,
            snapshots::delete_snapshot
        )))
        .route(
            "/{tenant_id}/volumes/{volume_id}/{*rest}",
            any(unknown_path),
        );
    if prefix == "/v3" {
        // Messages are a v3 resource only (cinder's v2 never had them).
        r.routes(with_bad_method(routes!(messages::list_messages)))
            .routes(with_bad_method(routes!(
                messages::show_message,
                messages::delete_message
            )))
            .layer(middleware::from_fn(microversion))
    } else {
        r
    }
}

// ---- request context ---------------------------------------------------------------------

/// An authenticated Block Storage request: the caller, whose project is the URL's
/// `{tenant_id}`, the other path parameters, and the base URL for links.
pub(crate) struct Ctx {
    pub caller: Caller,
    pub tenant_id: String,
    params: HashMap<String, String>,
    /// `http://host/volume/v3` (the prefix the request came in under).
    pub base: String,
    /// The request's microversion (3.0 under `/v2`, which has none).
    pub version: (u32, u32),
    /// The `x-openstack-request-id` the response carries.
    pub request_id: String,
}

impl Ctx {
    pub fn param(&self, name: &str) -> &str {
        self.params
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Writes need member (or admin) on the project; a reader may only look.
    pub fn require_writer(&self, action: &str) -> FaultResult<()> {
        if self.caller.has(Role::Member) {
            Ok(())
        } else {
            Err(Fault::forbidden(format!(
                "Policy doesn't allow {action} to be performed."
            )))
        }
    }

    /// `{base}/{tenant_id}/{rest}`: a `self` link.
    pub fn link(&self, rest: &str) -> String {
        format!("{}/{}/{rest}", self.base, self.tenant_id)
    }

    /// cinder's `VersionNotFoundForAPIMethod` for a method that needs microversion `min`:
    /// a bare 404, so that the method looks simply absent.
    pub fn require_version(&self, min: (u32, u32)) -> FaultResult<()> {
        if self.version >= min {
            Ok(())
        } else {
            Err(Fault::not_found("The resource could not be found."))
        }
    }

    /// A `bookmark` link: without the version, as cinder's.
    pub fn bookmark(&self, rest: &str) -> String {
        let root = self
            .base
            .rsplit_once('/')
            .map(|(root, _)| root)
            .unwrap_or(&self.base);
        format!("{root}/{}/{rest}", self.tenant_id)
    }
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = Fault;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Ctx, Fault> {
        let caller = auth::token_caller(state, &parts.headers).await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Fault::bad_request("Malformed request url"))?;
        let tenant_id = params.get("tenant_id").cloned().unwrap_or_default();
        if tenant_id != caller.project_id {
            // cinder's `Resource._process_stack`, word for word (seed 003's example).
            return Err(Fault::bad_request("Malformed request url"));
        }
        let path = parts
            .extensions
            .get::<OriginalUri>()
            .map(|u| u.0.path().to_owned())
            .unwrap_or_else(|| parts.uri.path().to_owned());
        let prefix = if path.starts_with("/v2/") {
            "/v2"
        } else {
            "/v3"
        };
        let root = crate::mount::base_url(&parts.headers, &parts.extensions);
        let version = parts
            .extensions
            .get::<Microversion>()
            .map_or(MIN_VERSION, |m| m.0);
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_else(new_request_id);
        Ok(Ctx {
            caller,
            tenant_id,
            params,
            base: format!("{root}{prefix}"),
            version,
            request_id,
        })
    }
}

// ---- request bodies ----------------------------------------------------------------------

/// The object under `key` (`volume`, `snapshot`) with no keys but `allowed`, or cinder's 400.
pub(crate) fn resource<'a>(
    body: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
    allowed: &[&str],
) -> FaultResult<&'a serde_json::Map<String, serde_json::Value>> {
    let Some(v) = body.get(key) else {
        return Err(Fault::bad_request(format!(
            "Missing required element '{key}' in request body."
        )));
    };
    let serde_json::Value::Object(m) = v else {
        return Err(crate::compute::volumes::invalid(
            key,
            "is not of type 'object'",
        ));
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(Fault::bad_request(format!(
            "Invalid input for field/attribute {key}. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    Ok(m)
}

/// A text field under its name or its v1 name (`name`/`display_name`): absent, or given
/// (`None` when null).
pub(crate) fn text_field(
    m: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    v1: &str,
) -> FaultResult<Option<Option<String>>> {
    for key in [name, v1] {
        if m.contains_key(key) {
            return Ok(Some(crate::compute::volumes::opt_string(m, key)?));
        }
    }
    Ok(None)
}

// ---- version discovery -------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVersionLink {
    rel: String,
    href: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderMediaType {
    base: String,
    #[serde(rename = "type")]
    kind: String,
}

/// One of cinder's version entries.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVersion {
    /// `v3.0` or `v2.0`.
    id: String,
    /// `CURRENT` (v3) or `DEPRECATED` (v2, as cinder marked it before removing it).
    status: String,
    /// The highest microversion ("" for v2).
    version: String,
    min_version: String,
    updated: String,
    links: Vec<CinderVersionLink>,
    #[serde(rename = "media-types")]
    media_types: Vec<CinderMediaType>,
}

/// `{"versions": [...]}`: cinder answers its root and each version's root with this.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVersions {
    versions: Vec<CinderVersion>,
}

fn version(root: &str, v3: bool) -> CinderVersion {
    let link = |rel: &str, href: String, kind: Option<&str>| CinderVersionLink {
        rel: rel.into(),
        href,
        kind: kind.map(str::to_owned),
    };
    let (id, status, version, min, updated, major) = if v3 {
        (
            "v3.0",
            "CURRENT",
            format!("{}.{}", MAX_VERSION.0, MAX_VERSION.1),
            format!("{}.{}", MIN_VERSION.0, MIN_VERSION.1),
            "2016-02-08T12:20:21Z",
            "3",
        )
    } else {
        (
            "v2.0",
            "DEPRECATED",
            String::new(),
            String::new(),
            "2017-02-25T12:00:00Z",
            "2",
        )
    };
    CinderVersion {
        id: id.into(),
        status: status.into(),
        version,
        min_version: min,
        updated: updated.into(),
        links: vec![
            link(
                "describedby",
                "https://docs.openstack.org/".into(),
                Some("text/html"),
            ),
            link("self", format!("{root}/v{major}/"), None),
        ],
        media_types: vec![CinderMediaType {
            base: "application/json".into(),
            kind: format!("application/vnd.openstack.volume+json;version={major}"),
        }],
    }
}

fn volume_root(base: &str) -> String {
    format!("{base}{}", crate::mount::VOLUME.prefix)
}

/// The root of the catalog's block-storage endpoint: cinder's version list.
#[utoipa::path(get, path = "/volume", tag = "volume",
    responses((status = 200, description = "Block Storage API versions (v3 with 3.0 to 3.3; v2, deprecated)", body = CinderVersions)))]
async fn versions_root(BaseUrl(base): BaseUrl) -> axum::Json<CinderVersions> {
    let root = volume_root(&base);
    axum::Json(CinderVersions {
        versions: vec![version(&root, false), version(&root, true)],
    })
}

#[utoipa::path(get, path = "/volume/", tag = "volume",
    responses((status = 200, description = "Block Storage API versions", body = CinderVersions)))]
async fn versions_root_slash(base: BaseUrl) -> axum::Json<CinderVersions> {
    versions_root(base).await
}

#[utoipa::path(get, path = "/volume/v3", tag = "volume",
    responses((status = 200, description = "the v3 version (3.0 to 3.3)", body = CinderVersions)))]
async fn version_v3(BaseUrl(base): BaseUrl) -> axum::Json<CinderVersions> {
    axum::Json(CinderVersions {
        versions: vec![version(&volume_root(&base), true)],
    })
}

#[utoipa::path(get, path = "/volume/v3/", tag = "volume",
    responses((status = 200, description = "the v3 version (3.0 to 3.3)", body = CinderVersions)))]
async fn version_v3_slash(base: BaseUrl) -> axum::Json<CinderVersions> {
    version_v3(base).await
}

#[utoipa::path(get, path = "/volume/v2", tag = "volume",
    responses((status = 200, description = "the v2 version", body = CinderVersions)))]
async fn version_v2(BaseUrl(base): BaseUrl) -> axum::Json<CinderVersions> {
    axum::Json(CinderVersions {
        versions: vec![version(&volume_root(&base), false)],
    })
}

#[utoipa::path(get, path = "/volume/v2/", tag = "volume",
    responses((status = 200, description = "the v2 version", body = CinderVersions)))]
async fn version_v2_slash(base: BaseUrl) -> axum::Json<CinderVersions> {
    version_v2(base).await
}

// ---- headers -----------------------------------------------------------------------------

static REQUEST_ID: HeaderName = HeaderName::from_static("x-openstack-request-id");
static API_VERSION: HeaderName = HeaderName::from_static("openstack-api-version");

/// The request id of a Block Storage request, made before its handler runs so that what
/// the request starts (an upload's failure message) can name it.
#[derive(Debug, Clone)]
struct RequestId(String);

/// The microversion a `/v3` request asked for (absent under `/v2`).
#[derive(Debug, Clone, Copy)]
struct Microversion((u32, u32));

fn new_request_id() -> String {
    format!("req-{}", uuid::Uuid::new_v4())
}

/// A request id on every Block Storage response, as cinder sends it.
async fn volume_headers(mut req: Request, next: Next) -> Response {
    let id = new_request_id();
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}

/// Microversion negotiation for `/v3` routes (`OpenStack-API-Version: volume 3.x`).
async fn microversion(mut req: Request, next: Next) -> Response {
    let requested =
        crate::compute::requested_version(req.headers(), "volume", None, MIN_VERSION, MAX_VERSION);
    let (mut resp, v) = match requested {
        Ok(v) => {
            req.extensions_mut().insert(Microversion(v));
            (next.run(req).await, v)
        }
        Err(fault) => (fault.into_response(), MIN_VERSION),
    };
    let h = resp.headers_mut();
    if let Ok(val) = HeaderValue::from_str(&format!("volume {}.{}", v.0, v.1)) {
        h.insert(API_VERSION.clone(), val);
    }
    h.insert(
        header::VARY,
        HeaderValue::from_static("OpenStack-API-Version"),
    );
    resp
}
