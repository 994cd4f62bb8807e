//! `/extensions` and `/os-volumes`.

use std::collections::BTreeMap;

use axum::{
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use super::{Ctx, Fault, body_or_fault, fault::FaultResult, json_body, limited, query};
use crate::{
    AppState,
    model::{NewVolume, ServiceError, Volume, VolumeScope},
    time_fmt,
};

/// The 2011 descriptor, byte for byte as the seed prints it (key order included, which a
/// serialised map would not keep).
const OS_VOLUMES: &str = r#"{"updated": "2011-03-25T00:00:00+00:00", "name": "Volumes", "links": [], "namespace": "http://docs.openstack.org/ext/volumes/api/v1.1", "alias": "os-volumes", "description": "Volumes support"}"#;

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
    responses((status = 200, description = "`{\"extensions\": [...]}`: the os-volumes descriptor"),
              (status = 400, description = "badRequest: tenant is not the token's project"),
              (status = 401, description = "unauthorized")))]
pub(super) async fn list_extensions(_ctx: Ctx) -> Response {
    raw_json(
        StatusCode::OK,
        format!(r#"{{"extensions": [{OS_VOLUMES}]}}"#),
    )
}

#[utoipa::path(get, path = "/{tenant_id}/extensions/{alias}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("alias" = String, Path, description = "extension alias, `os-volumes`")),
    responses((status = 200, description = "`{\"extension\": {...}}`"),
              (status = 404, description = "itemNotFound: no such extension")))]
pub(super) async fn show_extension(ctx: Ctx) -> FaultResult<Response> {
    let alias = ctx.param("alias");
    if alias != "os-volumes" {
        return Err(Fault::not_found(format!(
            "Extension {alias} could not be found."
        )));
    }
    Ok(raw_json(
        StatusCode::OK,
        format!(r#"{{"extension": {OS_VOLUMES}}}"#),
    ))
}

/// nova's `_translate_volume_summary_view`: all 11 keys, camelCase, `attachments: [{}]` when
/// the volume is attached nowhere.
pub(super) fn volume_view(v: &Volume) -> Value {
    let attachments: Vec<Value> = if v.attachments.is_empty() {
        vec![json!({})]
    } else {
        v.attachments
            .iter()
            .map(|a| {
                let mut m = Map::new();
                // nova shows the volume id as the attachment id.
                m.insert("id".into(), json!(v.id));
                m.insert("volumeId".into(), json!(v.id));
                m.insert("serverId".into(), json!(a.server_id));
                if let Some(d) = &a.device {
                    m.insert("device".into(), json!(d));
                }
                Value::Object(m)
            })
            .collect()
    };
    json!({
        "id": v.id,
        "status": v.status.as_str(),
        "size": v.size_gib,
        "availabilityZone": v.availability_zone,
        "createdAt": time_fmt::compute(v.created_at),
        "attachments": attachments,
        "displayName": v.name,
        "displayDescription": v.description,
        "volumeType": v.volume_type,
        "snapshotId": v.snapshot_id,
        "metadata": v.metadata,
    })
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
    let views: Vec<Value> = volumes.iter().map(volume_view).collect();
    Ok(axum::Json(json!({ "volumes": views })).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/os-volumes", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("limit" = Option<u32>, Query, description = "at most this many (max 1000)"),
           ("offset" = Option<u32>, Query, description = "skip this many"),
           ("all_tenants" = Option<String>, Query, description = "admin: every project's volumes")),
    responses((status = 200, description = "`{\"volumes\": [...]}`")))]
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
    responses((status = 200, description = "`{\"volumes\": [...]}` (same view as the index)")))]
pub(super) async fn list_volumes_detail(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(q): RawQuery,
) -> FaultResult<Response> {
    list(&state, &ctx, q).await
}

fn invalid(field: &str, why: &str) -> Fault {
    Fault::bad_request(format!(
        "Invalid input for field/attribute {field}. Value: {why}"
    ))
}

fn opt_string(m: &Map<String, Value>, key: &str) -> FaultResult<Option<String>> {
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
fn parse_size(v: Option<&Value>) -> FaultResult<u64> {
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
    const ALLOWED: [&str; 7] = [
        "size",
        "volume_type",
        "metadata",
        "snapshot_id",
        "availability_zone",
        "display_name",
        "display_description",
    ];
    if let Some(k) = v.keys().find(|k| !ALLOWED.contains(&k.as_str())) {
        return Err(Fault::bad_request(format!(
            "Invalid input for field/attribute volume. Value: Additional properties are not allowed ('{k}' was unexpected)"
        )));
    }
    let size_gib = parse_size(v.get("size"))?;
    let metadata = match v.get("metadata") {
        None | Some(Value::Null) => BTreeMap::new(),
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
            out
        }
        Some(_) => return Err(invalid("metadata", "is not of type 'object'")),
    };
    let snapshot_id = opt_string(v, "snapshot_id")?;
    if let Some(s) = snapshot_id {
        // cairn keeps no snapshots; an unknown snapshot is a 404, as upstream.
        return Err(Fault::not_found(format!(
            "Snapshot {s} could not be found."
        )));
    }
    Ok(NewVolume {
        size_gib,
        name: opt_string(v, "display_name")?,
        description: opt_string(v, "display_description")?,
        volume_type: opt_string(v, "volume_type")?,
        availability_zone: opt_string(v, "availability_zone")?,
        snapshot_id: None,
        metadata,
        ..NewVolume::default()
    })
}

#[utoipa::path(post, path = "/{tenant_id}/os-volumes", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id")),
    request_body(content = String, content_type = "application/json",
        description = "`{\"volume\": {\"size\": 1, \"display_name\": ..., \"display_description\": ..., \"availability_zone\": ..., \"volume_type\": ..., \"metadata\": {...}}}`"),
    responses((status = 200, description = "`{\"volume\": {...}}` (nova answers 200, not 202)"),
              (status = 400, description = "badRequest: invalid body"),
              (status = 403, description = "forbidden: reader role"),
              (status = 415, description = "badMediaType: not JSON")))]
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
    let mut resp = axum::Json(json!({ "volume": volume_view(&volume) })).into_response();
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
    responses((status = 200, description = "`{\"volume\": {...}}`"),
              (status = 404, description = "itemNotFound")))]
pub(super) async fn show_volume(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let volume = state
        .service
        .get_volume(&ctx.caller, ctx.param("volume_id"), false)
        .await?;
    Ok(axum::Json(json!({ "volume": volume_view(&volume) })).into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/os-volumes/{volume_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("volume_id" = String, Path, description = "volume id")),
    responses((status = 202, description = "deleted (empty body)"),
              (status = 400, description = "badRequest: the volume is attached (cinder's InvalidVolume, as nova relays it)"),
              (status = 403, description = "forbidden: reader role"),
              (status = 404, description = "itemNotFound")))]
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
