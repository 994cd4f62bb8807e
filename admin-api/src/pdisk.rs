//! The persistent-disk API (StratusLab pdisk, seed 001) under `/api`.
//!
//! A pdisk disk is a view of the one [`Volume`]: every property is a JSON string, `created`
//! is `yyyy/MM/dd HH:mm:ss`, `users` counts attachments. Errors are
//! `{"message": ["...", ...]}` with the original's status codes (mostly 400, 404 for unknown
//! routes and unknown disks on `hotdetach`, 422 for create validation). POST bodies are
//! form-encoded as the original, or JSON with the same fields.
//!
//! Where the seed and the original code disagree, or where both are silent, the choice is
//! listed in the README ("Persistent-disk API (seed 001)").

use std::collections::BTreeMap;

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState, auth,
    model::{
        AttachKind, AttachRequest, AttachTarget, Attachment, Caller, DeviceNaming, NewVolume,
        ServiceError, Visibility, Volume, VolumeScope,
    },
    schema::PdiskError,
    time_fmt,
};

/// Realm of the original's HTTP Basic challenge.
pub const REALM: &str = "Stratuslab Persistent Disk Storage";
/// Largest POST body read; pdisk bodies are a few short fields.
const MAX_BODY: usize = 64 * 1024;
/// Size bounds of the original (`CreateResource`), in GiB.
const MIN_SIZE: i64 = 1;
const MAX_SIZE: i64 = 1024;
/// Limits on extra create fields (stored as volume metadata, shown as disk properties).
const MAX_EXTRA_FIELDS: usize = 32;
const MAX_FIELD_LEN: usize = 255;
/// Property names of the disk view; an extra create field may not shadow them.
const DISK_KEYS: [&str; 7] = [
    "users",
    "created",
    "visibility",
    "tag",
    "owner",
    "uuid",
    "size",
];

pub fn router() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(with_405(routes!(list_disks)))
        .routes(with_405(routes!(show_disk, delete_disk)))
        .routes(with_405(routes!(create_disk, create_disk_get)))
        .routes(with_405(routes!(action_without_uuid)))
        .routes(with_405(routes!(action_with_uuid)))
        // Anything else under /api (nested fallbacks only see /api paths).
        .fallback(not_found);
    OpenApiRouter::new()
        .nest("/api", api)
        // The nested fallback covers `/api` and `/api/x...` but not `/api/` itself. Not an
        // endpoint, so not in the OpenAPI document.
        .route("/api/", axum::routing::any(not_found))
}

/// A known pdisk path asked with a method it does not serve answers in pdisk's format.
fn with_405(
    (schemas, paths, method_router): utoipa_axum::router::UtoipaMethodRouter<AppState>,
) -> utoipa_axum::router::UtoipaMethodRouter<AppState> {
    (schemas, paths, method_router.fallback(method_not_allowed))
}

// ---- error body ----------------------------------------------------------------------------

/// `{"message": [...]}` with `status`.
pub fn error(status: StatusCode, messages: Vec<String>) -> Response {
    (status, Json(PdiskError { message: messages })).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, vec![message.into()])
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        vec!["Unable to find requested resource.".into()],
    )
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        vec!["Method not allowed".into()],
    )
}

/// Failures every handler maps the same way; the rest are mapped per call with the
/// original's messages.
fn common_error(e: ServiceError) -> Response {
    match e {
        ServiceError::Unauthorized(m) => {
            let mut resp = error(StatusCode::UNAUTHORIZED, vec![m]);
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{REALM}\"")) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp
        }
        ServiceError::Internal(m) | ServiceError::Unavailable(m) => {
            tracing::error!(error = %m, "pdisk: service call failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                vec!["Internal server error".into()],
            )
        }
        ServiceError::NotFound(m)
        | ServiceError::Forbidden(m)
        | ServiceError::BadRequest(m)
        | ServiceError::Conflict(m)
        | ServiceError::OverLimit(m)
        | ServiceError::Unsupported(m) => bad_request(m),
    }
}

async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    auth::token_or_basic_caller(state, headers)
        .await
        .map_err(|e| match e {
            // A failed identity lookup is still "not authenticated" to the client.
            ServiceError::NotFound(m) | ServiceError::Forbidden(m) => {
                common_error(ServiceError::Unauthorized(m))
            }
            e => common_error(e),
        })
}

fn path_error(e: PathRejection) -> Response {
    bad_request(format!("Bad request path: {}", e.body_text()))
}

// ---- views ---------------------------------------------------------------------------------

/// A disk as the original's `DiskProperties`: every value a string, in the seed's key order,
/// then any extra properties given at creation.
#[derive(Serialize, ToSchema)]
struct DiskView {
    users: String,
    created: String,
    visibility: String,
    tag: String,
    owner: String,
    uuid: String,
    /// GiB.
    size: String,
    /// Extra fields given at creation, each a property of its own.
    #[serde(flatten)]
    #[schema(ignore)]
    extra: BTreeMap<String, String>,
}

/// `{"uuid": "..."}`
#[derive(Serialize, ToSchema)]
struct UuidResponse {
    uuid: String,
}

impl DiskView {
    fn of(v: &Volume) -> DiskView {
        DiskView {
            users: v.attachments.len().to_string(),
            created: time_fmt::pdisk(v.created_at),
            visibility: v.visibility.as_str().to_owned(),
            // A volume made by another family has a name rather than a tag.
            tag: v.tag.clone().or_else(|| v.name.clone()).unwrap_or_default(),
            owner: v.owner.clone().unwrap_or_default(),
            uuid: v.id.clone(),
            size: v.size_gib.to_string(),
            extra: v
                .metadata
                .iter()
                .filter(|(k, _)| !DISK_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// `json/action.ftl`: node, vm_id, [target], uuid.
#[derive(Serialize, ToSchema)]
struct ActionView {
    node: String,
    vm_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    uuid: Vec<String>,
}

fn ok_json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

// ---- request bodies ------------------------------------------------------------------------

/// The actions on a VM's disks (path parameter; documentation only).
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
enum DiskAction {
    Attach,
    Hotattach,
    Hotdetach,
    Detach,
}

/// The one action that takes no disk UUID.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
enum DetachAction {
    Detach,
}

/// Body of `POST /api/create` (documentation only: bodies are read by [`read_fields`]).
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct CreateFields {
    /// GiB, 1..1024 (a JSON number or string).
    #[schema(pattern = "^[0-9]+$")]
    size: String,
    tag: String,
    /// `private` or `public`.
    #[schema(pattern = "^(private|public)$")]
    visibility: String,
    /// `true` lets several VMs use the disk at once (cairn extension).
    multiattach: Option<String>,
}

/// Body of the actions (documentation only). Field names are case-insensitive.
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct VmFields {
    node: String,
    /// A JSON number or string.
    vm_id: String,
}

/// The fields of a POST body, in order, names as sent. Values are strings whatever the
/// encoding (JSON numbers and booleans are turned into their text).
struct Fields(Vec<(String, Option<String>)>);

impl Fields {
    /// First value of a field, names compared case-insensitively (as the original's `Form`).
    fn get(&self, name: &str) -> Option<&Option<String>> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// Reads and decodes a POST body: form-encoded or JSON; anything else is 415. An empty body
/// without a content type (e.g. `curl -X POST` with no data) reads as no fields.
async fn read_fields(headers: &HeaderMap, body: Body) -> Result<Fields, Response> {
    let bytes: Bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            vec![format!("Request body larger than {MAX_BODY} bytes")],
        )
    })?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("<not text>"));
    let essence = ctype
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match essence.as_str() {
        "application/x-www-form-urlencoded" => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
                .map_err(|e| bad_request(format!("Malformed form body: {e}")))?;
            Ok(Fields(
                pairs.into_iter().map(|(k, v)| (k, Some(v))).collect(),
            ))
        }
        "application/json" => {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Fields(Vec::new()));
            }
            let value: Value = serde_json::from_slice(&bytes)
                .map_err(|e| bad_request(format!("Malformed JSON body: {e}")))?;
            let Value::Object(map) = value else {
                return Err(bad_request("Malformed JSON body: expected an object"));
            };
            let mut fields = Vec::with_capacity(map.len());
            for (k, v) in map {
                let text = match v {
                    Value::String(s) => Some(s),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    Value::Null => None,
                    Value::Array(_) | Value::Object(_) => {
                        return Err(bad_request(format!(
                            "Invalid value for input {k}: expected a string or a number"
                        )));
                    }
                };
                fields.push((k, text));
            }
            Ok(Fields(fields))
        }
        "" if ctype.is_none() && bytes.is_empty() => Ok(Fields(Vec::new())),
        _ => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            vec![format!(
                "Unsupported media type {}: use application/x-www-form-urlencoded or application/json",
                ctype.unwrap_or("(none)")
            )],
        )),
    }
}

/// `node` and `vm_id` of an action body, with the original's checks: fewer than two fields
/// is "Missing input", any other field "Unknown input".
const MAX_VM_FIELD: usize = 255;

fn vm_of(fields: &Fields) -> Result<(String, String), &'static str> {
    if fields.0.len() < 2 {
        return Err("Missing input");
    }
    if fields
        .0
        .iter()
        .any(|(k, _)| !k.eq_ignore_ascii_case("node") && !k.eq_ignore_ascii_case("vm_id"))
    {
        return Err("Unknown input");
    }
    let value = |name| {
        fields
            .get(name)
            .and_then(|v| v.as_deref())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    match (value("node"), value("vm_id")) {
        // Bounded like Compute's server names, since the VM shows there as `node/vm_id`.
        (Some(node), Some(vm_id)) if node.len() > MAX_VM_FIELD || vm_id.len() > MAX_VM_FIELD => {
            Err("Input too long: node and vm_id are at most 255 bytes")
        }
        (Some(node), Some(vm_id)) => Ok((node, vm_id)),
        _ => Err("Missing input"),
    }
}

/// Validates a create body; every problem is collected (422 lists them all).
fn new_volume_of(fields: &Fields) -> Result<NewVolume, Vec<String>> {
    let mut errors = Vec::new();
    // A JSON `null` counts as absent.
    let text = |name: &str| fields.get(name).and_then(|v| v.clone());

    let visibility = match text("visibility").as_deref() {
        Some("private") => Some(Visibility::Private),
        Some("public") => Some(Visibility::Public),
        Some(_) => {
            errors.push("Invalid disk visibility".to_owned());
            None
        }
        None => {
            errors.push("Missing input: visibility".to_owned());
            None
        }
    };
    let size = match text("size") {
        None => {
            errors.push("Missing input: size".to_owned());
            None
        }
        // Java's Integer.parseInt: no whitespace, optional sign, fits in 32 bits.
        Some(s) => match s.parse::<i32>() {
            Err(_) => {
                errors.push("Size must be a valid positive integer".to_owned());
                None
            }
            Ok(n) if !(MIN_SIZE..=MAX_SIZE).contains(&i64::from(n)) => {
                errors.push(format!(
                    "Size must be an integer between {MIN_SIZE} and {MAX_SIZE}"
                ));
                None
            }
            Ok(n) => u64::try_from(n).ok(),
        },
    };
    let tag = match text("tag") {
        None => {
            errors.push("Missing input: tag".to_owned());
            None
        }
        Some(t) if t.chars().count() > MAX_FIELD_LEN => {
            errors.push(format!("Tag must be at most {MAX_FIELD_LEN} characters"));
            None
        }
        Some(t) => Some(t),
    };
    let multiattach = match text("multiattach").as_deref() {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => {
            errors.push("Invalid multiattach value: use true or false".to_owned());
            false
        }
    };

    // The original stored any other field as an extra disk property; so does cairn (as
    // volume metadata), within bounds and without shadowing the disk's own properties.
    let known = ["size", "tag", "visibility", "multiattach"];
    let mut metadata = BTreeMap::new();
    for (k, v) in &fields.0 {
        if known.iter().any(|n| k.eq_ignore_ascii_case(n)) {
            continue;
        }
        if DISK_KEYS.iter().any(|n| k.eq_ignore_ascii_case(n)) {
            errors.push(format!("Property {k} is set by the server"));
        } else if k.is_empty() || k.chars().count() > MAX_FIELD_LEN {
            errors.push(format!(
                "Property names must be 1 to {MAX_FIELD_LEN} characters"
            ));
        } else if v.as_deref().unwrap_or_default().chars().count() > MAX_FIELD_LEN {
            errors.push(format!(
                "Property {k} must be at most {MAX_FIELD_LEN} characters"
            ));
        } else {
            // First value wins, as for the known fields.
            metadata
                .entry(k.clone())
                .or_insert_with(|| v.clone().unwrap_or_default());
        }
    }
    if metadata.len() > MAX_EXTRA_FIELDS {
        errors.push(format!(
            "At most {MAX_EXTRA_FIELDS} extra properties are allowed"
        ));
    }

    match (size, visibility, tag) {
        (Some(size_gib), Some(visibility), Some(tag)) if errors.is_empty() => Ok(NewVolume {
            size_gib,
            tag: Some(tag),
            visibility: Some(visibility),
            multiattach,
            metadata,
            ..NewVolume::default()
        }),
        _ => Err(errors),
    }
}

// ---- disks ---------------------------------------------------------------------------------

/// List the disks the caller may see: its own, public ones; every disk for an admin.
#[utoipa::path(get, path = "/disks", tag = "pdisk",
    responses(
        (status = 200, description = "the disks the caller may see; every value is a string", body = Vec<DiskView>)))]
async fn list_disks(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match state
        .service
        .list_volumes(&caller, VolumeScope::PdiskVisible)
        .await
    {
        Ok(volumes) => {
            let disks: Vec<DiskView> = volumes.iter().map(DiskView::of).collect();
            ok_json(StatusCode::OK, &disks)
        }
        Err(e) => common_error(e),
    }
}

/// One disk, with `X-DiskUser-Limit` and `X-DiskUser-Remaining`. HEAD answers the same
/// status and headers (200 means the disk exists and is visible).
#[utoipa::path(get, path = "/disks/{uuid}", tag = "pdisk",
    params(("uuid" = String, Path, description = "disk UUID")),
    responses(
        (status = 200, description = "the disk", body = DiskView,
            headers(("X-DiskUser-Limit" = String, description = "how many VMs may use the disk at once"),
                    ("X-DiskUser-Remaining" = String, description = "limit minus current users"))),
        (status = 400, description = "`Disk does not exists` or `Not enough rights to display disk properties`", body = PdiskError)))]
async fn show_disk(
    State(state): State<AppState>,
    headers: HeaderMap,
    uuid: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(uuid) = match uuid {
        Ok(p) => p,
        Err(e) => return path_error(e),
    };
    let caller = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match state.service.get_volume(&caller, &uuid, true).await {
        Ok(v) => {
            let mut resp = ok_json(StatusCode::OK, &DiskView::of(&v));
            let h = resp.headers_mut();
            h.insert("x-diskuser-limit", HeaderValue::from(v.user_limit));
            h.insert(
                "x-diskuser-remaining",
                HeaderValue::from(v.users_remaining()),
            );
            resp
        }
        Err(ServiceError::NotFound(_)) => bad_request("Disk does not exists"),
        Err(ServiceError::Forbidden(_)) => {
            bad_request("Not enough rights to display disk properties")
        }
        Err(e) => common_error(e),
    }
}

/// Delete a disk: only its owner (or an admin), only while no VM uses it.
#[utoipa::path(delete, path = "/disks/{uuid}", tag = "pdisk",
    params(("uuid" = String, Path, description = "disk UUID")),
    responses(
        (status = 200, description = "deleted", body = UuidResponse),
        (status = 400, description = "`Disk does not exists`, `Not enough rights to delete disk` or `Can't remove the disk as it is in use`", body = PdiskError)))]
async fn delete_disk(
    State(state): State<AppState>,
    headers: HeaderMap,
    uuid: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(uuid) = match uuid {
        Ok(p) => p,
        Err(e) => return path_error(e),
    };
    let caller = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match state.service.delete_volume(&caller, &uuid, true).await {
        Ok(()) => ok_json(StatusCode::OK, &UuidResponse { uuid }),
        Err(ServiceError::NotFound(_)) => bad_request("Disk does not exists"),
        Err(ServiceError::Forbidden(_)) => bad_request("Not enough rights to delete disk"),
        Err(ServiceError::Conflict(_)) => bad_request("Can't remove the disk as it is in use"),
        Err(e) => common_error(e),
    }
}

/// Create a disk. Fields `size` (GiB, 1..1024), `tag`, `visibility` (`private`|`public`), all
/// required; optional `multiattach=true` (cairn) lets several VMs use it. Other fields are
/// kept as extra string properties of the disk.
#[utoipa::path(post, path = "/create", tag = "pdisk",
    request_body(description = "size, tag, visibility [, multiattach]",
        content((CreateFields = "application/x-www-form-urlencoded"), (CreateFields = "application/json"))),
    responses(
        (status = 201, description = "created", body = UuidResponse),
        (status = 400, description = "malformed body", body = PdiskError),
        (status = 415, description = "neither form-encoded nor JSON", body = PdiskError),
        (status = 422, description = "every validation message, e.g. `Invalid disk visibility`, `Size must be a valid positive integer`, `Size must be an integer between 1 and 1024`", body = PdiskError)))]
async fn create_disk(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let caller = match caller(&state, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let fields = match read_fields(&headers, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let new = match new_volume_of(&fields) {
        Ok(n) => n,
        Err(messages) => return error(StatusCode::UNPROCESSABLE_ENTITY, messages),
    };
    match state.service.create_volume(&caller, new).await {
        Ok(v) => ok_json(StatusCode::CREATED, &UuidResponse { uuid: v.id }),
        Err(ServiceError::Forbidden(_)) => bad_request("Not enough rights to create disk"),
        Err(e) => common_error(e),
    }
}

/// The original answered a GET of the create resource with 400 "Method not allowed".
#[utoipa::path(get, path = "/create", tag = "pdisk",
    responses((status = 400, description = "`Method not allowed` (as the original)", body = PdiskError)))]
async fn create_disk_get() -> Response {
    bad_request("Method not allowed")
}

// ---- actions -------------------------------------------------------------------------------

/// `detach` (every disk of a VM). `attach`, `hotattach` and `hotdetach` need a disk UUID.
#[utoipa::path(post, path = "/{action}", tag = "pdisk",
    params(("action" = inline(DetachAction), Path, description = "`detach`")),
    request_body(description = "exactly `node` and `vm_id`",
        content((VmFields = "application/x-www-form-urlencoded"), (VmFields = "application/json"))),
    responses(
        (status = 200, description = "the disks detached", body = ActionView),
        (status = 400, description = "`Missing input`, `Unknown input`, `Disk UUID not provided`, `Requested action does not exist`, `VM don't have disk attached`, `Not enough rights to detach disks`", body = PdiskError),
        (status = 415, description = "neither form-encoded nor JSON", body = PdiskError)))]
async fn action_without_uuid(
    State(state): State<AppState>,
    headers: HeaderMap,
    action: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    let Path(action) = match action {
        Ok(p) => p,
        Err(e) => return path_error(e),
    };
    run_action(&state, &headers, &action, None, body).await
}

/// `attach` (static, at VM launch), `hotattach` (assigns `vda`..`vdz`) and `hotdetach` of one
/// disk; `detach` ignores the UUID, as the original did.
#[utoipa::path(post, path = "/{action}/{uuid}", tag = "pdisk",
    params(("action" = inline(DiskAction), Path, description = "`attach`, `hotattach`, `hotdetach` or `detach`"),
           ("uuid" = String, Path, description = "disk UUID")),
    request_body(description = "exactly `node` and `vm_id`",
        content((VmFields = "application/x-www-form-urlencoded"), (VmFields = "application/json"))),
    responses(
        (status = 200, description = "attach and hotattach list every disk of the VM, hotdetach the remaining ones", body = ActionView),
        (status = 400, description = "`Missing input`, `Unknown input`, `Requested action does not exist`, `Bad disk UUID`, `Not enough rights to attach disk`, `Disk has no remaining user slot (limit N)`, `Target limit reached. Restart instance to attach new disk`, `Disk have not been hot-plugged`", body = PdiskError),
        (status = 404, description = "`Bad disk UUID` (hotdetach of an unknown disk)", body = PdiskError),
        (status = 415, description = "neither form-encoded nor JSON", body = PdiskError)))]
async fn action_with_uuid(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Response {
    let Path((action, uuid)) = match path {
        Ok(p) => p,
        Err(e) => return path_error(e),
    };
    run_action(&state, &headers, &action, Some(&uuid), body).await
}

#[derive(Clone, Copy)]
enum Action {
    Attach,
    HotAttach,
    HotDetach,
    Detach,
}

/// The original's order: credentials, then the body, then the action word.
async fn run_action(
    state: &AppState,
    headers: &HeaderMap,
    action: &str,
    uuid: Option<&str>,
    body: Body,
) -> Response {
    let caller = match caller(state, headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let fields = match read_fields(headers, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (node, vm_id) = match vm_of(&fields) {
        Ok(v) => v,
        Err(m) => return bad_request(m),
    };
    let action = match action {
        "attach" => Action::Attach,
        "hotattach" => Action::HotAttach,
        "hotdetach" => Action::HotDetach,
        "detach" => Action::Detach,
        _ => return bad_request("Requested action does not exist"),
    };
    let vm = AttachTarget::Vm {
        node: node.clone(),
        vm_id: vm_id.clone(),
    };
    let result = match (action, uuid) {
        (Action::Detach, _) => detach_all(state, &caller, vm).await,
        (_, None) => Err(bad_request("Disk UUID not provided")),
        (Action::Attach, Some(uuid)) => attach(state, &caller, vm, uuid, AttachKind::Static).await,
        (Action::HotAttach, Some(uuid)) => attach(state, &caller, vm, uuid, AttachKind::Hot).await,
        (Action::HotDetach, Some(uuid)) => hot_detach(state, &caller, vm, uuid).await,
    };
    match result {
        Ok((target, uuid)) => ok_json(
            StatusCode::OK,
            &ActionView {
                node,
                vm_id,
                target,
                uuid,
            },
        ),
        Err(r) => r,
    }
}

type ActionResult = Result<(Option<String>, Vec<String>), Response>;

fn volume_ids(attachments: &[Attachment]) -> Vec<String> {
    attachments.iter().map(|a| a.volume_id.clone()).collect()
}

/// Static or hot attach. Unlike the original, the user limit is enforced here (and
/// atomically by the service): a disk with no remaining user slot is refused.
async fn attach(
    state: &AppState,
    caller: &Caller,
    vm: AttachTarget,
    uuid: &str,
    kind: AttachKind,
) -> ActionResult {
    let volume = match state.service.get_volume(caller, uuid, true).await {
        Ok(v) => v,
        Err(ServiceError::NotFound(_)) => return Err(bad_request("Bad disk UUID")),
        Err(ServiceError::Forbidden(_)) => {
            return Err(bad_request("Not enough rights to attach disk"));
        }
        Err(e) => return Err(common_error(e)),
    };
    let no_slot = || {
        bad_request(format!(
            "Disk has no remaining user slot (limit {})",
            volume.user_limit
        ))
    };
    if let AttachTarget::Vm { node, vm_id } = &vm
        && volume
            .attachments
            .iter()
            .any(|a| a.node.as_deref() == Some(node) && a.vm_id.as_deref() == Some(vm_id))
    {
        return Err(bad_request("Disk is already attached to this VM"));
    }
    if volume.users_remaining() < 1 {
        return Err(no_slot());
    }
    let req = AttachRequest {
        volume_id: volume.id.clone(),
        target: vm.clone(),
        device: None,
        kind,
        naming: DeviceNaming::PdiskTarget,
    };
    let attachment = match state.service.attach(caller, req).await {
        Ok(a) => a,
        Err(ServiceError::NotFound(_)) => return Err(bad_request("Bad disk UUID")),
        Err(ServiceError::Forbidden(_)) => {
            return Err(bad_request("Not enough rights to attach disk"));
        }
        Err(ServiceError::OverLimit(_)) => {
            return Err(bad_request(
                "Target limit reached. Restart instance to attach new disk",
            ));
        }
        // Another request took the last slot between our check and the attach.
        Err(ServiceError::Conflict(_)) => return Err(no_slot()),
        Err(e) => return Err(common_error(e)),
    };
    let all = match state.service.list_attachments(caller, vm).await {
        Ok(a) => a,
        Err(e) => return Err(common_error(e)),
    };
    let target = match kind {
        AttachKind::Hot => Some(attachment.device.unwrap_or_default()),
        AttachKind::Static => None,
    };
    Ok((target, volume_ids(&all)))
}

/// Detach one hot-plugged disk; answers the disks still attached to the VM (as the seed says).
async fn hot_detach(
    state: &AppState,
    caller: &Caller,
    vm: AttachTarget,
    uuid: &str,
) -> ActionResult {
    let volume = match state.service.get_volume(caller, uuid, true).await {
        Ok(v) => v,
        Err(ServiceError::NotFound(_)) => {
            return Err(error(StatusCode::NOT_FOUND, vec!["Bad disk UUID".into()]));
        }
        Err(ServiceError::Forbidden(_)) => {
            return Err(bad_request("Not enough rights to detach disk"));
        }
        Err(e) => return Err(common_error(e)),
    };
    let detached = match state
        .service
        .detach(caller, vm.clone(), &volume.id, true)
        .await
    {
        Ok(a) => a,
        Err(ServiceError::NotFound(_) | ServiceError::BadRequest(_)) => {
            return Err(bad_request("Disk have not been hot-plugged"));
        }
        Err(ServiceError::Forbidden(_)) => {
            return Err(bad_request("Not enough rights to detach disk"));
        }
        Err(e) => return Err(common_error(e)),
    };
    let remaining = match state.service.list_attachments(caller, vm).await {
        Ok(a) => a,
        Err(e) => return Err(common_error(e)),
    };
    Ok((detached.device, volume_ids(&remaining)))
}

/// Detach every disk of a VM (called when it is killed); answers what was detached.
async fn detach_all(state: &AppState, caller: &Caller, vm: AttachTarget) -> ActionResult {
    match state.service.detach_all(caller, vm).await {
        Ok(detached) if detached.is_empty() => Err(bad_request("VM don't have disk attached")),
        Ok(detached) => Ok((None, volume_ids(&detached))),
        Err(ServiceError::NotFound(_)) => Err(bad_request("VM don't have disk attached")),
        Err(ServiceError::Forbidden(_)) => Err(bad_request("Not enough rights to detach disks")),
        Err(e) => Err(common_error(e)),
    }
}

#[cfg(test)]
#[path = "pdisk_tests.rs"]
mod tests;
