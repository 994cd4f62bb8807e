//! The minimal server registry (`/servers`) and `/servers/{id}/os-volume_attachments`.

use std::collections::BTreeMap;

use axum::{
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, Fault, body_or_fault, fault::FaultResult, json_body};
use crate::{
    AppState,
    model::{AttachKind, AttachRequest, AttachTarget, Attachment, DeviceNaming, NewServer, Server},
    schema::{BadRequest, ConflictingRequest, Forbidden, ItemNotFound, OverLimit},
    time_fmt,
};

/// A link of nova's views.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Link {
    /// `self` or `bookmark`.
    rel: String,
    href: String,
}

fn links(ctx: &Ctx, id: &str) -> Vec<Link> {
    vec![
        Link {
            rel: "self".into(),
            href: ctx.link(&format!("servers/{id}")),
        },
        Link {
            rel: "bookmark".into(),
            href: ctx.bookmark(&format!("servers/{id}")),
        },
    ]
}

/// nova's index view: id, name, links.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServerSummary {
    id: String,
    name: String,
    links: Vec<Link>,
}

/// `{"servers": [...]}` (index)
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServerSummaries {
    servers: Vec<ServerSummary>,
}

fn server_summary(ctx: &Ctx, s: &Server) -> ServerSummary {
    ServerSummary {
        id: s.id.clone(),
        name: s.name.clone().unwrap_or_default(),
        links: links(ctx, &s.id),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Flavor {
    id: String,
    links: Vec<Link>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VolumeRef {
    id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SecurityGroup {
    name: String,
}

/// nova's show view at microversion 2.1, with what a storage daemon can know: no image,
/// flavor, host or network (empty values of the right types so that clients parse it).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServerView {
    id: String,
    name: String,
    status: String,
    tenant_id: String,
    user_id: Option<String>,
    metadata: BTreeMap<String, String>,
    #[serde(rename = "hostId")]
    host_id: String,
    image: String,
    flavor: Flavor,
    created: String,
    updated: String,
    /// Always empty: cairn runs no instances.
    addresses: BTreeMap<String, Vec<String>>,
    #[serde(rename = "accessIPv4")]
    access_ipv4: String,
    #[serde(rename = "accessIPv6")]
    access_ipv6: String,
    progress: u32,
    key_name: Option<String>,
    config_drive: String,
    links: Vec<Link>,
    #[serde(rename = "OS-DCF:diskConfig")]
    disk_config: String,
    #[serde(rename = "OS-EXT-STS:vm_state")]
    vm_state: String,
    #[serde(rename = "OS-EXT-STS:task_state")]
    task_state: Option<String>,
    #[serde(rename = "OS-EXT-STS:power_state")]
    power_state: u32,
    #[serde(rename = "os-extended-volumes:volumes_attached")]
    volumes_attached: Vec<VolumeRef>,
    security_groups: Vec<SecurityGroup>,
}

/// `{"server": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServerResponse {
    server: ServerView,
}

/// `{"servers": [...]}` (detail)
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServersResponse {
    servers: Vec<ServerView>,
}

fn server_view(ctx: &Ctx, s: &Server, attached: &[Attachment]) -> ServerView {
    let created = time_fmt::seconds_z(s.created_at);
    ServerView {
        id: s.id.clone(),
        name: s.name.clone().unwrap_or_default(),
        status: s.status.clone(),
        tenant_id: s.project_id.clone(),
        user_id: s.user_id.clone(),
        metadata: s.metadata.clone(),
        host_id: String::new(),
        image: String::new(),
        flavor: Flavor {
            id: "cairn".into(),
            links: Vec::new(),
        },
        created: created.clone(),
        updated: created,
        addresses: BTreeMap::new(),
        access_ipv4: String::new(),
        access_ipv6: String::new(),
        progress: 0,
        key_name: None,
        config_drive: String::new(),
        links: links(ctx, &s.id),
        disk_config: "MANUAL".into(),
        vm_state: s.status.to_ascii_lowercase(),
        task_state: None,
        power_state: 1,
        volumes_attached: attached
            .iter()
            .map(|a| VolumeRef {
                id: a.volume_id.clone(),
            })
            .collect(),
        security_groups: vec![SecurityGroup {
            name: "default".into(),
        }],
    }
}

/// The server's attachments, for `os-extended-volumes:volumes_attached`.
async fn attached(state: &AppState, ctx: &Ctx, s: &Server) -> FaultResult<Vec<Attachment>> {
    Ok(state
        .service
        .list_attachments(&ctx.caller, AttachTarget::Server(s.id.clone()))
        .await?)
}

#[utoipa::path(get, path = "/{tenant_id}/servers", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    responses((status = 200, description = "the project's servers", body = ServerSummaries)))]
pub(super) async fn list_servers(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let servers = state.service.list_servers(&ctx.caller).await?;
    let servers = servers.iter().map(|s| server_summary(&ctx, s)).collect();
    Ok(axum::Json(ServerSummaries { servers }).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/servers/detail", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    responses((status = 200, description = "the project's servers, full views", body = ServersResponse)))]
pub(super) async fn list_servers_detail(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let servers = state.service.list_servers(&ctx.caller).await?;
    let mut views = Vec::with_capacity(servers.len());
    for s in &servers {
        views.push(server_view(&ctx, s, &attached(&state, &ctx, s).await?));
    }
    Ok(axum::Json(ServersResponse { servers: views }).into_response())
}

/// Keys of nova's create schema that cairn accepts and ignores: it runs no instances.
pub(super) const IGNORED_SERVER_KEYS: [&str; 20] = [
    "imageRef",
    "flavorRef",
    "networks",
    "key_name",
    "security_groups",
    "availability_zone",
    "user_data",
    "config_drive",
    "min_count",
    "max_count",
    "return_reservation_id",
    "block_device_mapping",
    "block_device_mapping_v2",
    "accessIPv4",
    "accessIPv6",
    "adminPass",
    "OS-DCF:diskConfig",
    "description",
    "personality",
    "scheduler_hints",
];

/// What `POST servers` takes: nova's create schema; cairn uses `name` and `metadata` and
/// accepts the rest (imageRef, flavorRef, networks, ...) without using it.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body `parse_new_server` checks key by key
pub(crate) struct ServerCreateRequest {
    server: ServerCreate,
    #[serde(rename = "os:scheduler_hints")]
    scheduler_hints: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct ServerCreate {
    /// 1 to 255 characters, not only spaces.
    #[schema(min_length = 1, max_length = 255)]
    name: String,
    /// Keys 1 to 255 characters, values at most 255.
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "imageRef")]
    image_ref: Option<Value>,
    #[serde(rename = "flavorRef")]
    flavor_ref: Option<Value>,
    networks: Option<Value>,
    key_name: Option<Value>,
    security_groups: Option<Value>,
    availability_zone: Option<Value>,
    user_data: Option<Value>,
    config_drive: Option<Value>,
    min_count: Option<Value>,
    max_count: Option<Value>,
    return_reservation_id: Option<Value>,
    block_device_mapping: Option<Value>,
    block_device_mapping_v2: Option<Value>,
    #[serde(rename = "accessIPv4")]
    access_ipv4: Option<Value>,
    #[serde(rename = "accessIPv6")]
    access_ipv6: Option<Value>,
    #[serde(rename = "adminPass")]
    admin_pass: Option<Value>,
    #[serde(rename = "OS-DCF:diskConfig")]
    disk_config: Option<Value>,
    description: Option<Value>,
    personality: Option<Value>,
    scheduler_hints: Option<Value>,
}

/// What `POST servers` answers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ServerCreated {
    server: NewServerView,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NewServerView {
    id: String,
    links: Vec<Link>,
    #[serde(rename = "OS-DCF:diskConfig")]
    disk_config: String,
    security_groups: Vec<SecurityGroup>,
}

fn parse_new_server(body: Map<String, Value>) -> FaultResult<NewServer> {
    let bad = |m: String| Fault::bad_request(format!("Invalid input for field/attribute {m}"));
    if let Some(k) = body
        .keys()
        .find(|k| *k != "server" && *k != "os:scheduler_hints")
    {
        return Err(bad(format!(
            "server. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let Some(Value::Object(s)) = body.get("server") else {
        return Err(bad(
            "server. Value: 'server' is a required property and must be an object".into(),
        ));
    };
    if let Some(k) = s
        .keys()
        .find(|k| *k != "name" && *k != "metadata" && !IGNORED_SERVER_KEYS.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "server. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let name = match s.get("name") {
        Some(Value::String(n)) if !n.trim().is_empty() && n.chars().count() <= 255 => n.clone(),
        Some(Value::String(_)) => {
            return Err(bad(
                "name. Value: must be 1 to 255 characters, not only spaces".into(),
            ));
        }
        None => return Err(bad("server. Value: 'name' is a required property".into())),
        Some(_) => return Err(bad("name. Value: is not of type 'string'".into())),
    };
    let metadata = match s.get("metadata") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                let Value::String(v) = v else {
                    return Err(bad(format!(
                        "metadata. Value: value of '{k}' is not a string"
                    )));
                };
                if k.is_empty() || k.chars().count() > 255 || v.chars().count() > 255 {
                    return Err(bad(
                        "metadata. Value: keys must be 1 to 255 characters, values at most 255"
                            .into(),
                    ));
                }
                out.insert(k.clone(), v.clone());
            }
            out
        }
        Some(_) => return Err(bad("metadata. Value: is not of type 'object'".into())),
    };
    Ok(NewServer {
        name: Some(name),
        metadata,
    })
}

#[utoipa::path(post, path = "/{tenant_id}/servers", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    request_body(content = ServerCreateRequest, content_type = "application/json"),
    responses((status = 202, description = "registered", body = ServerCreated,
                  headers(("Location" = String, description = "the server's URL"))),
              (status = 400, description = "badRequest", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 409, description = "conflictingRequest: the name is taken", body = ConflictingRequest),
              (status = 413, description = "overLimit: quota", body = OverLimit)))]
pub(super) async fn create_server(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer()?;
    let new = parse_new_server(json_body(&headers, &body_or_fault(body)?)?)?;
    let server = state.service.create_server(&ctx.caller, new).await?;
    let body = ServerCreated {
        server: NewServerView {
            links: links(&ctx, &server.id),
            id: server.id.clone(),
            disk_config: "MANUAL".into(),
            security_groups: vec![SecurityGroup {
                name: "default".into(),
            }],
        },
    };
    let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&ctx.link(&format!("servers/{}", server.id))) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/{tenant_id}/servers/{server_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id")),
    responses((status = 200, description = "the server", body = ServerResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_server(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let server = state
        .service
        .get_server(&ctx.caller, ctx.param("server_id"))
        .await?;
    let view = server_view(&ctx, &server, &attached(&state, &ctx, &server).await?);
    Ok(axum::Json(ServerResponse { server: view }).into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/servers/{server_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id")),
    responses((status = 204, description = "deleted; its volumes are detached"),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn delete_server(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    ctx.require_writer()?;
    state
        .service
        .delete_server(&ctx.caller, ctx.param("server_id"))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- attachments -------------------------------------------------------------------------

/// nova's attachment view (the volume id doubles as the attachment id), plus where the
/// export is served.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AttachmentView {
    id: String,
    server_id: String,
    volume_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Where the export is served, e.g. `nbd://127.0.0.1:10809/<volume-id>`.
    nbd_uri: String,
}

/// `{"volumeAttachment": {...}}`
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AttachmentResponse {
    volume_attachment: AttachmentView,
}

/// `{"volumeAttachments": [...]}`
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AttachmentsResponse {
    volume_attachments: Vec<AttachmentView>,
}

/// What `POST os-volume_attachments` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // documents the body `parse_attach` checks key by key
pub(crate) struct AttachRequestBody {
    volume_attachment: AttachBody,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct AttachBody {
    /// A volume id (a UUID).
    #[schema(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    volume_id: String,
    /// `/dev/` then lowercase letters and optional digits, e.g. `/dev/vdb`.
    #[schema(pattern = "^/dev/[a-z]+[0-9]*$", max_length = 37)]
    device: Option<String>,
}

fn attachment_view(a: &Attachment) -> AttachmentView {
    AttachmentView {
        id: a.volume_id.clone(),
        server_id: a.server_id.clone(),
        volume_id: a.volume_id.clone(),
        device: a.device.clone(),
        nbd_uri: a.nbd_uri.clone(),
    }
}

#[utoipa::path(get, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("limit" = Option<u32>, Query, description = "at most this many (max 1000)"),
           ("offset" = Option<u32>, Query, description = "skip this many")),
    responses((status = 200, description = "the server's attachments", body = AttachmentsResponse),
              (status = 404, description = "itemNotFound: unknown server", body = ItemNotFound)))]
pub(super) async fn list_attachments(
    State(state): State<AppState>,
    ctx: Ctx,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> FaultResult<Response> {
    let q = super::query(q.as_deref())?;
    let server = ctx.param("server_id").to_owned();
    let list = state
        .service
        .list_attachments(&ctx.caller, AttachTarget::Server(server))
        .await?;
    let list = super::limited(list, &q)?;
    let volume_attachments = list.iter().map(attachment_view).collect();
    Ok(axum::Json(AttachmentsResponse { volume_attachments }).into_response())
}

/// Canonical `8-4-4-4-12` hex UUID (nova's `volume_id` parameter type is a UUID).
fn is_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok() && s.len() == 36
}

fn parse_attach(body: Map<String, Value>) -> FaultResult<(String, Option<String>)> {
    let bad = |m: String| Fault::bad_request(format!("Invalid input for field/attribute {m}"));
    if let Some(k) = body.keys().find(|k| *k != "volumeAttachment") {
        return Err(bad(format!(
            "volumeAttachment. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let Some(Value::Object(a)) = body.get("volumeAttachment") else {
        return Err(bad(
            "volumeAttachment. Value: 'volumeAttachment' is a required property and must be an object".into(),
        ));
    };
    if let Some(k) = a.keys().find(|k| *k != "volumeId" && *k != "device") {
        return Err(bad(format!(
            "volumeAttachment. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let volume_id = match a.get("volumeId") {
        Some(Value::String(v)) if is_uuid(v) => v.to_ascii_lowercase(),
        Some(_) => return Err(bad("volumeId. Value: is not a 'uuid'".into())),
        None => {
            return Err(bad(
                "volumeAttachment. Value: 'volumeId' is a required property".into(),
            ));
        }
    };
    let device = match a.get("device") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) if valid_device(d) => Some(d.clone()),
        Some(_) => {
            return Err(bad(
                "device. Value: must be a device path such as /dev/vdb".into()
            ));
        }
    };
    Ok((volume_id, device))
}

/// nova's device pattern: `/dev/` then letters, then optional digits (`/dev/vdb`, `/dev/sdb1`).
fn valid_device(d: &str) -> bool {
    let Some(rest) = d.strip_prefix("/dev/") else {
        return false;
    };
    let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
    letters > 0 && rest.len() <= 32 && rest.bytes().skip(letters).all(|b| b.is_ascii_digit())
}

#[utoipa::path(post, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id")),
    request_body(content = AttachRequestBody, content_type = "application/json"),
    responses((status = 202, description = "attached (202 as the seed says; nova answers 200)", body = AttachmentResponse),
              (status = 400, description = "badRequest: invalid body", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound: unknown server or volume", body = ItemNotFound),
              (status = 409, description = "conflictingRequest: the volume is in use (and not multi-attach), or the device name is taken", body = ConflictingRequest),
              (status = 413, description = "overLimit: no device name left", body = OverLimit)))]
pub(super) async fn attach(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer()?;
    let (volume_id, device) = parse_attach(json_body(&headers, &body_or_fault(body)?)?)?;
    let req = AttachRequest {
        volume_id,
        target: AttachTarget::Server(ctx.param("server_id").to_owned()),
        device,
        kind: AttachKind::Hot,
        naming: DeviceNaming::DevPath,
    };
    let a = state.service.attach(&ctx.caller, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(AttachmentResponse {
            volume_attachment: attachment_view(&a),
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("volume_id" = String, Path, description = "attached volume id")),
    responses((status = 200, description = "the attachment", body = AttachmentResponse),
              (status = 404, description = "itemNotFound: unknown server, or the volume is not attached there", body = ItemNotFound)))]
pub(super) async fn show_attachment(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let server = ctx.param("server_id").to_owned();
    let volume = ctx.param("volume_id");
    let list = state
        .service
        .list_attachments(&ctx.caller, AttachTarget::Server(server.clone()))
        .await?;
    // Ids compare as UUIDs (the service accepts any case elsewhere).
    let a = list
        .iter()
        .find(|a| a.volume_id.eq_ignore_ascii_case(volume))
        .ok_or_else(|| {
            Fault::not_found(format!(
                "volume_id not found: {volume} is not attached to server {server}"
            ))
        })?;
    Ok(axum::Json(AttachmentResponse {
        volume_attachment: attachment_view(a),
    })
    .into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("volume_id" = String, Path, description = "attached volume id")),
    request_body(content = AttachRequestBody, content_type = "application/json"),
    responses((status = 400, description = "badRequest: swapping volumes is not supported (as the 2011 extension)", body = BadRequest)))]
pub(super) async fn update_attachment(ctx: Ctx) -> FaultResult<Response> {
    let _ = ctx;
    Err(Fault::bad_request(
        "Swapping volumes is not supported: detach the volume and attach the other one.",
    ))
}

#[utoipa::path(delete, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("volume_id" = String, Path, description = "attached volume id")),
    responses((status = 202, description = "detached (empty body)"),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound: unknown server, or the volume is not attached there", body = ItemNotFound)))]
pub(super) async fn detach(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    ctx.require_writer()?;
    let server = ctx.param("server_id").to_owned();
    state
        .service
        .detach(
            &ctx.caller,
            AttachTarget::Server(server),
            ctx.param("volume_id"),
            false,
        )
        .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
