//! The minimal server registry (`/servers`) and `/servers/{id}/os-volume_attachments`.

use std::collections::BTreeMap;

use axum::{
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use super::{Ctx, Fault, body_or_fault, fault::FaultResult, json_body};
use crate::{
    AppState,
    model::{AttachKind, AttachRequest, AttachTarget, Attachment, DeviceNaming, NewServer, Server},
    time_fmt,
};

fn links(ctx: &Ctx, id: &str) -> Value {
    json!([
        {"rel": "self", "href": ctx.link(&format!("servers/{id}"))},
        {"rel": "bookmark", "href": ctx.bookmark(&format!("servers/{id}"))},
    ])
}

/// nova's index view: id, name, links.
fn server_summary(ctx: &Ctx, s: &Server) -> Value {
    json!({"id": s.id, "name": s.name.clone().unwrap_or_default(), "links": links(ctx, &s.id)})
}

/// nova's show view at microversion 2.1, with what a storage daemon can know: no image,
/// flavor, host or network (empty values of the right types so that clients parse it).
fn server_view(ctx: &Ctx, s: &Server, attached: &[Attachment]) -> Value {
    let volumes: Vec<Value> = attached
        .iter()
        .map(|a| json!({"id": a.volume_id}))
        .collect();
    let created = time_fmt::seconds_z(s.created_at);
    json!({
        "id": s.id,
        "name": s.name.clone().unwrap_or_default(),
        "status": s.status,
        "tenant_id": s.project_id,
        "user_id": s.user_id,
        "metadata": s.metadata,
        "hostId": "",
        "image": "",
        "flavor": {"id": "cairn", "links": []},
        "created": created,
        "updated": created,
        "addresses": {},
        "accessIPv4": "",
        "accessIPv6": "",
        "progress": 0,
        "key_name": null,
        "config_drive": "",
        "links": links(ctx, &s.id),
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-STS:vm_state": s.status.to_ascii_lowercase(),
        "OS-EXT-STS:task_state": null,
        "OS-EXT-STS:power_state": 1,
        "os-extended-volumes:volumes_attached": volumes,
        "security_groups": [{"name": "default"}],
    })
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
    responses((status = 200, description = "`{\"servers\": [{\"id\", \"name\", \"links\"}]}`")))]
pub(super) async fn list_servers(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let servers = state.service.list_servers(&ctx.caller).await?;
    let views: Vec<Value> = servers.iter().map(|s| server_summary(&ctx, s)).collect();
    Ok(axum::Json(json!({ "servers": views })).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/servers/detail", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{\"servers\": [...]}` (full views)")))]
pub(super) async fn list_servers_detail(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let servers = state.service.list_servers(&ctx.caller).await?;
    let mut views = Vec::with_capacity(servers.len());
    for s in &servers {
        views.push(server_view(&ctx, s, &attached(&state, &ctx, s).await?));
    }
    Ok(axum::Json(json!({ "servers": views })).into_response())
}

/// Keys of nova's create schema that cairn accepts and ignores: it runs no instances.
const IGNORED_SERVER_KEYS: [&str; 20] = [
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
    request_body(content = String, content_type = "application/json",
        description = "`{\"server\": {\"name\": ..., \"metadata\": {...}}}`; imageRef, flavorRef and nova's other create keys are accepted and ignored"),
    responses((status = 202, description = "`{\"server\": {\"id\", \"links\", \"OS-DCF:diskConfig\", \"security_groups\"}}`"),
              (status = 400, description = "badRequest"),
              (status = 403, description = "forbidden: reader role")))]
pub(super) async fn create_server(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer()?;
    let new = parse_new_server(json_body(&headers, &body_or_fault(body)?)?)?;
    let server = state.service.create_server(&ctx.caller, new).await?;
    let body = json!({"server": {
        "id": server.id,
        "links": links(&ctx, &server.id),
        "OS-DCF:diskConfig": "MANUAL",
        "security_groups": [{"name": "default"}],
    }});
    let mut resp = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&ctx.link(&format!("servers/{}", server.id))) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/{tenant_id}/servers/{server_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id")),
    responses((status = 200, description = "`{\"server\": {...}}`"),
              (status = 404, description = "itemNotFound")))]
pub(super) async fn show_server(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let server = state
        .service
        .get_server(&ctx.caller, ctx.param("server_id"))
        .await?;
    let view = server_view(&ctx, &server, &attached(&state, &ctx, &server).await?);
    Ok(axum::Json(json!({ "server": view })).into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/servers/{server_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id")),
    responses((status = 204, description = "deleted; its volumes are detached"),
              (status = 403, description = "forbidden: reader role"),
              (status = 404, description = "itemNotFound")))]
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
fn attachment_view(a: &Attachment) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(a.volume_id));
    m.insert("serverId".into(), json!(a.server_id));
    m.insert("volumeId".into(), json!(a.volume_id));
    if let Some(d) = &a.device {
        m.insert("device".into(), json!(d));
    }
    m.insert("nbdUri".into(), json!(a.nbd_uri));
    Value::Object(m)
}

#[utoipa::path(get, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("limit" = Option<u32>, Query, description = "at most this many (max 1000)"),
           ("offset" = Option<u32>, Query, description = "skip this many")),
    responses((status = 200, description = "`{\"volumeAttachments\": [...]}`"),
              (status = 404, description = "itemNotFound: unknown server")))]
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
    let views: Vec<Value> = list.iter().map(attachment_view).collect();
    Ok(axum::Json(json!({ "volumeAttachments": views })).into_response())
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
    request_body(content = String, content_type = "application/json",
        description = "`{\"volumeAttachment\": {\"volumeId\": ..., \"device\": \"/dev/vdb\"}}` (device optional)"),
    responses((status = 202, description = "`{\"volumeAttachment\": {\"id\", \"serverId\", \"volumeId\", \"device\", \"nbdUri\"}}` (202 as the seed says; nova answers 200)"),
              (status = 400, description = "badRequest: invalid body"),
              (status = 403, description = "forbidden: reader role"),
              (status = 404, description = "itemNotFound: unknown server or volume"),
              (status = 409, description = "conflictingRequest: the volume is in use (and not multi-attach)")))]
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
        axum::Json(json!({ "volumeAttachment": attachment_view(&a) })),
    )
        .into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("volume_id" = String, Path, description = "attached volume id")),
    responses((status = 200, description = "`{\"volumeAttachment\": {...}}`"),
              (status = 404, description = "itemNotFound: unknown server, or the volume is not attached there")))]
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
    Ok(axum::Json(json!({ "volumeAttachment": attachment_view(a) })).into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/servers/{server_id}/os-volume_attachments/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("server_id" = String, Path, description = "server id"),
           ("volume_id" = String, Path, description = "attached volume id")),
    responses((status = 400, description = "badRequest: swapping volumes is not supported (as the 2011 extension)")))]
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
              (status = 403, description = "forbidden: reader role"),
              (status = 404, description = "itemNotFound: unknown server, or the volume is not attached there")))]
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
