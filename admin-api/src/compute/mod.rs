//! Compute (nova) volumes extension, seed 000: `/extensions`, `/os-volumes`, a minimal
//! `/servers` registry and `/servers/{id}/os-volume_attachments`.
//!
//! The same routes are served under `/v1.1/{tenant_id}` (the seed), `/v2/{tenant_id}` (nova's
//! legacy v2 path) and `/v2.1/{tenant_id}` (what the service catalog advertises and what
//! python-novaclient calls). Under `/v2.1` requests are microversioned: cairn speaks 2.1 to
//! 2.35, the last microversion in which nova still proxies `os-volumes`.
//!
//! Every error is a Compute fault ([`fault::Fault`]); every response carries
//! `x-openstack-request-id` and `x-compute-request-id`.

pub(crate) mod fault;
mod filesystems;
mod servers;
pub(crate) mod volumes;

use std::collections::HashMap;

use axum::body::Bytes;
use axum::{
    extract::{FromRequestParts, OriginalUri, Path, Request},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::any,
};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

pub use fault::Fault;
use fault::FaultResult;

use crate::{AppState, auth, model::Caller, model::Role, mount::BaseUrl};

/// Path prefixes the family is served under (each followed by `/{tenant_id}`).
pub const PREFIXES: [&str; 3] = ["/v1.1", "/v2", "/v2.1"];

/// Microversions cairn accepts under `/v2.1`. 2.35 is nova's `MAX_PROXY_API_SUPPORT_VERSION`:
/// above it `os-volumes` no longer exists.
pub const MIN_VERSION: (u32, u32) = (2, 1);
pub const MAX_VERSION: (u32, u32) = (2, 35);

pub fn router() -> OpenApiRouter<AppState> {
    let mut r = OpenApiRouter::new();
    for prefix in PREFIXES {
        r = r.nest(prefix, family_routes(prefix));
    }
    // A nested router does not see its prefix with a bare trailing slash.
    r = r.route("/v1.1/", any(unknown_path));
    // Unauthenticated version documents (keystoneauth and novaclient discover with them).
    r.routes(routes!(version_v21))
        .routes(routes!(version_v21_slash))
        .routes(routes!(versions_root))
        .routes(routes!(versions_root_slash))
        .layer(middleware::from_fn(compute_headers))
}

/// The routes under one prefix.
fn family_routes(prefix: &str) -> OpenApiRouter<AppState> {
    let mut r = OpenApiRouter::new()
        .routes(with_bad_method(routes!(volumes::list_extensions)))
        .routes(with_bad_method(routes!(volumes::show_extension)))
        .routes(with_bad_method(routes!(
            volumes::list_volumes,
            volumes::create_volume
        )))
        .routes(with_bad_method(routes!(volumes::list_volumes_detail)))
        .routes(with_bad_method(routes!(
            volumes::show_volume,
            volumes::delete_volume
        )))
        .routes(with_bad_method(routes!(
            servers::list_servers,
            servers::create_server
        )))
        .routes(with_bad_method(routes!(servers::list_servers_detail)))
        .routes(with_bad_method(routes!(
            servers::show_server,
            servers::delete_server
        )))
        .routes(with_bad_method(routes!(
            servers::list_attachments,
            servers::attach
        )))
        .routes(with_bad_method(routes!(
            servers::show_attachment,
            servers::update_attachment,
            servers::detach
        )))
        .routes(with_bad_method(routes!(filesystems::list_fs)))
        .routes(with_bad_method(routes!(
            filesystems::show_fs,
            filesystems::put_fs,
            filesystems::delete_fs
        )))
        .routes(with_bad_method(routes!(filesystems::list_fs_instances)))
        .routes(with_bad_method(routes!(
            filesystems::connect_instance,
            filesystems::disconnect_instance
        )))
        // Unknown paths in the compute subtrees answer a Compute fault.
        .route(
            "/{tenant_id}/os-filesystem/{name}/instances/{id}/{*rest}",
            any(unknown_path),
        )
        .route("/{tenant_id}/os-volumes/{id}/{*rest}", any(unknown_path))
        .route("/{tenant_id}/servers/{id}/{*rest}", any(unknown_path))
        .route("/{tenant_id}/extensions/{alias}/{*rest}", any(unknown_path));
    match prefix {
        "/v1.1" => {
            // nova no longer serves a v1.1 version document; the prefix is compute's alone.
            r = r
                .route("/", any(unknown_path))
                .route("/{tenant_id}", any(unknown_path))
                .route("/{tenant_id}/", any(unknown_path))
                .route("/{tenant_id}/{*rest}", any(unknown_path));
        }
        "/v2.1" => {
            r = r
                .routes(with_bad_method(routes!(version_tenant)))
                .route("/{tenant_id}/", any(unknown_path))
                .route("/{tenant_id}/{*rest}", any(unknown_path))
                .layer(middleware::from_fn(microversion));
        }
        // `/v2` is shared with Block Storage and Image: only the compute subtrees are claimed.
        _ => r = r.routes(with_bad_method(routes!(version_tenant))),
    }
    r
}

pub(crate) type MethodRoutes = utoipa_axum::router::UtoipaMethodRouter<AppState>;

/// A known path with a method it does not serve: `405 badMethod` (plus `Allow`, set by axum).
pub(crate) fn with_bad_method((schemas, paths, method_router): MethodRoutes) -> MethodRoutes {
    (schemas, paths, method_router.fallback(bad_method))
}

async fn bad_method(method: axum::http::Method) -> Fault {
    Fault::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("The method {method} is not allowed for this resource."),
    )
}

pub(crate) async fn unknown_path(OriginalUri(uri): OriginalUri) -> Fault {
    Fault::not_found(format!("The resource could not be found: {}", uri.path()))
}

// ---- request context ---------------------------------------------------------------------

/// An authenticated Compute request: the caller, whose project is the URL's `{tenant_id}`,
/// the other path parameters, and the base URL for links.
pub(crate) struct Ctx {
    pub caller: Caller,
    pub tenant_id: String,
    params: HashMap<String, String>,
    /// `http://host/v2.1` (the prefix the request came in under).
    pub base: String,
    /// The request's own URL without query (for `Location`).
    pub url: String,
}

impl Ctx {
    /// A path parameter the route declares (empty if it does not, which would be a routing bug).
    pub fn param(&self, name: &str) -> &str {
        self.params
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Writes need member (or admin) on the project; a reader may only look.
    pub fn require_writer(&self) -> FaultResult<()> {
        if self.caller.has(Role::Member) {
            Ok(())
        } else {
            Err(Fault::forbidden(
                "Policy doesn't allow this operation to be performed: the reader role may only read.",
            ))
        }
    }

    /// `{base}/{tenant_id}/{rest}` for `self` links.
    pub fn link(&self, rest: &str) -> String {
        format!("{}/{}/{rest}", self.base, self.tenant_id)
    }

    /// Bookmark links omit the version prefix, as nova's do.
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
        // Authentication first (keystonemiddleware runs before nova sees the URL).
        let caller = auth::token_caller(state, &parts.headers).await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| Fault::bad_request(format!("Malformed request URL: {}", e.body_text())))?;
        let tenant_id = params.get("tenant_id").cloned().unwrap_or_default();
        if tenant_id != caller.project_id {
            // nova's wording (cinder's is the shorter "Malformed request url").
            return Err(Fault::bad_request(format!(
                "Malformed request URL: URL's project_id '{tenant_id}' doesn't match Context's project_id '{}'",
                caller.project_id
            )));
        }
        let path = parts
            .extensions
            .get::<OriginalUri>()
            .map(|u| u.0.path().to_owned())
            .unwrap_or_else(|| parts.uri.path().to_owned());
        let prefix = PREFIXES
            .iter()
            .rev() // `/v2.1` before `/v2`
            .find(|p| path.starts_with(&format!("{p}/")))
            .copied()
            .unwrap_or("/v2.1");
        let root = crate::mount::base_url(&parts.headers, &parts.extensions);
        Ok(Ctx {
            caller,
            tenant_id,
            params,
            base: format!("{root}{prefix}"),
            url: format!("{root}{path}"),
        })
    }
}

// ---- request bodies and queries ----------------------------------------------------------

/// The JSON object of a request body, or the fault nova gives.
pub(crate) fn json_body(
    headers: &HeaderMap,
    body: &Bytes,
) -> FaultResult<serde_json::Map<String, Value>> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        // nova accepts JSON only (and assumes JSON when no Content-Type is sent).
        if !essence.eq_ignore_ascii_case("application/json") && !essence.is_empty() {
            return Err(Fault::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Unsupported Content-Type: {ct:?}"),
            ));
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Fault::bad_request(
            "The request body is empty; a JSON object is required.",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Fault::bad_request(
            "The request body must be a JSON object.",
        )),
        Err(_) => Err(Fault::bad_request("Malformed request body")),
    }
}

/// Body extraction that never answers in axum's plain-text format.
pub(crate) fn body_or_fault(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> FaultResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Fault::new(StatusCode::PAYLOAD_TOO_LARGE, "Request is too large.")
        } else {
            Fault::bad_request(format!(
                "Could not read the request body: {}",
                e.body_text()
            ))
        }
    })
}

/// Query parameters; a repeated key keeps its last value.
pub(crate) fn query(raw: Option<&str>) -> FaultResult<HashMap<String, String>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|_| Fault::bad_request("Malformed query string."))?;
    Ok(pairs.into_iter().collect())
}

/// nova's `common.limited`: `offset` and `limit` (0 or absent = the 1000 maximum).
pub(crate) fn limited<T>(items: Vec<T>, q: &HashMap<String, String>) -> FaultResult<Vec<T>> {
    const MAX_LIMIT: usize = 1000;
    let parse = |name: &str| -> FaultResult<usize> {
        match q.get(name) {
            None => Ok(0),
            Some(v) => {
                let n: i64 = v
                    .trim()
                    .parse()
                    .map_err(|_| Fault::bad_request(format!("{name} param must be an integer")))?;
                if n < 0 {
                    return Err(Fault::bad_request(format!("{name} param must be positive")));
                }
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    };
    let offset = parse("offset")?;
    let limit = parse("limit")?;
    let limit = if limit == 0 {
        MAX_LIMIT
    } else {
        limit.min(MAX_LIMIT)
    };
    Ok(items.into_iter().skip(offset).take(limit).collect())
}

// ---- version discovery -------------------------------------------------------------------

/// A link of a version document.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionLink {
    rel: String,
    href: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MediaType {
    base: String,
    #[serde(rename = "type")]
    kind: String,
}

/// nova's version document.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ComputeVersion {
    id: String,
    status: String,
    /// The highest microversion ("" for the legacy v2 API).
    version: String,
    min_version: String,
    updated: String,
    links: Vec<VersionLink>,
    #[serde(rename = "media-types")]
    media_types: Vec<MediaType>,
}

/// `{"version": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ComputeVersionDocument {
    version: ComputeVersion,
}

/// `{"versions": [...]}`: nova's root document (both APIs).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ComputeVersions {
    versions: Vec<ComputeVersion>,
}

fn version_doc(root: &str, legacy_v2: bool) -> ComputeVersionDocument {
    ComputeVersionDocument {
        version: version(root, legacy_v2),
    }
}

fn version(root: &str, legacy_v2: bool) -> ComputeVersion {
    let link = |rel: &str, href: String, kind: Option<&str>| VersionLink {
        rel: rel.into(),
        href,
        kind: kind.map(str::to_owned),
    };
    let described = link(
        "describedby",
        "http://docs.openstack.org/".into(),
        Some("text/html"),
    );
    if legacy_v2 {
        // nova's legacy v2 document: no microversions.
        ComputeVersion {
            id: "v2.0".into(),
            status: "SUPPORTED".into(),
            version: String::new(),
            min_version: String::new(),
            updated: "2011-01-21T11:33:21Z".into(),
            links: vec![link("self", format!("{root}/v2/"), None), described],
            media_types: vec![MediaType {
                base: "application/json".into(),
                kind: "application/vnd.openstack.compute+json;version=2".into(),
            }],
        }
    } else {
        ComputeVersion {
            id: "v2.1".into(),
            status: "CURRENT".into(),
            version: format!("{}.{}", MAX_VERSION.0, MAX_VERSION.1),
            min_version: format!("{}.{}", MIN_VERSION.0, MIN_VERSION.1),
            updated: "2013-07-23T11:33:21Z".into(),
            links: vec![link("self", format!("{root}/v2.1/"), None), described],
            media_types: vec![MediaType {
                base: "application/json".into(),
                kind: "application/vnd.openstack.compute+json;version=2.1".into(),
            }],
        }
    }
}

/// The root of the catalog's compute endpoint (`/compute`): nova's version list, where
/// keystoneauth discovers the API versions and microversions.
#[utoipa::path(get, path = "/compute", tag = "compute",
    responses((status = 200, description = "Compute API versions (v2.0 legacy, v2.1 with 2.1 to 2.35)", body = ComputeVersions)))]
async fn versions_root(BaseUrl(root): BaseUrl) -> axum::Json<ComputeVersions> {
    let root = format!("{root}{}", crate::mount::COMPUTE.prefix);
    axum::Json(ComputeVersions {
        versions: vec![version(&root, true), version(&root, false)],
    })
}

#[utoipa::path(get, path = "/compute/", tag = "compute",
    responses((status = 200, description = "Compute API versions (v2.0 legacy, v2.1 with 2.1 to 2.35)", body = ComputeVersions)))]
async fn versions_root_slash(root: BaseUrl) -> axum::Json<ComputeVersions> {
    versions_root(root).await
}

#[utoipa::path(get, path = "/v2.1", tag = "compute",
    responses((status = 200, description = "Compute API version document (2.1 to 2.35)", body = ComputeVersionDocument)))]
async fn version_v21(BaseUrl(root): BaseUrl) -> axum::Json<ComputeVersionDocument> {
    axum::Json(version_doc(&root, false))
}

#[utoipa::path(get, path = "/v2.1/", tag = "compute",
    responses((status = 200, description = "Compute API version document (2.1 to 2.35)", body = ComputeVersionDocument)))]
async fn version_v21_slash(BaseUrl(root): BaseUrl) -> axum::Json<ComputeVersionDocument> {
    axum::Json(version_doc(&root, false))
}

/// nova answers the bare project URL (the catalog's compute endpoint) with the version
/// document too; keystoneauth fetches it to discover microversions.
#[utoipa::path(get, path = "/{tenant_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    responses((status = 200, description = "Compute API version document (v2.1: 2.1 to 2.35; v2: legacy)", body = ComputeVersionDocument)))]
async fn version_tenant(
    OriginalUri(uri): OriginalUri,
    BaseUrl(root): BaseUrl,
) -> axum::Json<ComputeVersionDocument> {
    axum::Json(version_doc(&root, !uri.path().starts_with("/v2.1/")))
}

// ---- headers -----------------------------------------------------------------------------

static REQUEST_ID: HeaderName = HeaderName::from_static("x-openstack-request-id");
static COMPUTE_REQUEST_ID: HeaderName = HeaderName::from_static("x-compute-request-id");
static API_VERSION: HeaderName = HeaderName::from_static("openstack-api-version");
static NOVA_API_VERSION: HeaderName = HeaderName::from_static("x-openstack-nova-api-version");

/// Request ids on every Compute response, as nova sends them.
async fn compute_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let id = format!("req-{}", uuid::Uuid::new_v4());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v.clone());
        resp.headers_mut().insert(COMPUTE_REQUEST_ID.clone(), v);
    }
    resp
}

/// The microversion a request asks for: `OpenStack-API-Version: <service> X.Y` wins over the
/// service's `legacy` header (`X-OpenStack-Nova-API-Version: X.Y`); none means `min`,
/// `latest` means `max`; outside them is a 406.
pub(crate) fn requested_version(
    headers: &HeaderMap,
    service: &str,
    legacy: Option<&HeaderName>,
    min: (u32, u32),
    max: (u32, u32),
) -> FaultResult<(u32, u32)> {
    let from_new = headers
        .get_all(&API_VERSION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|item| {
            let mut it = item.split_whitespace();
            match (it.next(), it.next()) {
                (Some(s), Some(ver)) if s.eq_ignore_ascii_case(service) => Some(ver.to_owned()),
                _ => None,
            }
        });
    let requested = from_new.or_else(|| {
        legacy
            .and_then(|h| headers.get(h))
            .map(|v| v.to_str().unwrap_or("?").trim().to_owned())
    });
    let Some(requested) = requested else {
        return Ok(min);
    };
    if requested.eq_ignore_ascii_case("latest") {
        return Ok(max);
    }
    let parsed = requested.split_once('.').and_then(|(a, b)| {
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|c| c.is_ascii_digit())
                && (s == "0" || !s.starts_with('0'))
        };
        if ok(a) && ok(b) {
            Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
        } else {
            None
        }
    });
    let Some(v) = parsed else {
        return Err(Fault::bad_request(format!(
            "API Version String {requested} is of invalid format. Must be of format MajorNum.MinorNum."
        )));
    };
    if v < min || v > max {
        return Err(Fault::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "Version {}.{} is not supported by the API. Minimum is {}.{} and maximum is {}.{}.",
                v.0, v.1, min.0, min.1, max.0, max.1
            ),
        ));
    }
    Ok(v)
}

/// Microversion negotiation for `/v2.1` routes: refuse what cairn does not speak, and say
/// which version answered.
async fn microversion(req: Request, next: Next) -> Response {
    let requested = requested_version(
        req.headers(),
        "compute",
        Some(&NOVA_API_VERSION),
        MIN_VERSION,
        MAX_VERSION,
    );
    let (mut resp, v) = match requested {
        Ok(v) => (next.run(req).await, v),
        Err(fault) => (fault.into_response(), MIN_VERSION),
    };
    let ver = format!("{}.{}", v.0, v.1);
    let h = resp.headers_mut();
    if let Ok(val) = HeaderValue::from_str(&format!("compute {ver}")) {
        h.insert(API_VERSION.clone(), val);
    }
    if let Ok(val) = HeaderValue::from_str(&ver) {
        h.insert(NOVA_API_VERSION.clone(), val);
    }
    h.insert(
        header::VARY,
        HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
    );
    resp
}

#[cfg(test)]
mod tests;
