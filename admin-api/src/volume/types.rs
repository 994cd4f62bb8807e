//! `/types` (volume types: everyone reads, admins change), `/limits` and
//! `/os-availability-zone`.

use std::collections::BTreeMap;

use axum::{
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, resource};
use crate::compute::volumes::{invalid, opt_string};
use crate::compute::{Fault, body_or_fault, fault::FaultResult, json_body};
use crate::{
    AppState,
    model::{VolumeType, VolumeTypeChange},
    schema::{BadRequest, Forbidden, ItemNotFound},
};

/// cinder's volume type view.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumeType {
    id: String,
    name: String,
    description: Option<String>,
    is_public: bool,
    #[serde(rename = "os-volume-type-access:is_public")]
    access_is_public: bool,
    extra_specs: BTreeMap<String, String>,
    qos_specs_id: Option<String>,
}

/// `{"volume_type": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumeTypeResponse {
    volume_type: CinderVolumeType,
}

/// `{"volume_types": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderVolumeTypes {
    volume_types: Vec<CinderVolumeType>,
}

fn view(t: VolumeType) -> CinderVolumeType {
    CinderVolumeType {
        id: t.id,
        name: t.name,
        description: t.description,
        is_public: t.is_public,
        access_is_public: t.is_public,
        extra_specs: t.extra_specs,
        qos_specs_id: None,
    }
}

fn one(t: VolumeType) -> Response {
    axum::Json(CinderVolumeTypeResponse {
        volume_type: view(t),
    })
    .into_response()
}

fn require_admin(ctx: &Ctx) -> FaultResult<()> {
    if ctx.caller.is_admin() {
        Ok(())
    } else {
        Err(Fault::forbidden(
            "Policy doesn't allow volume_extension:types_manage to be performed.",
        ))
    }
}

/// What `POST /types` and `PUT /types/{id}` take.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body `parse` checks
pub(crate) struct CinderVolumeTypeRequest {
    volume_type: CinderVolumeTypeBody,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct CinderVolumeTypeBody {
    /// Required to create; 1 to 255 characters.
    #[schema(max_length = 255)]
    name: Option<String>,
    #[schema(max_length = 255)]
    description: Option<String>,
    #[serde(rename = "os-volume-type-access:is_public")]
    access_is_public: Option<bool>,
    is_public: Option<bool>,
    /// Create only: string values (`multiattach: "<is> True"`, ...).
    extra_specs: Option<BTreeMap<String, String>>,
}

fn parse(body: Map<String, Value>, create: bool) -> FaultResult<VolumeTypeChange> {
    let keys: &[&str] = if create {
        &[
            "name",
            "description",
            "os-volume-type-access:is_public",
            "is_public",
            "extra_specs",
        ]
    } else {
        &["name", "description", "is_public"]
    };
    let t = resource(&body, "volume_type", keys)?;
    let flag = |k: &str| match t.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(k, "is not of type 'boolean'")),
    };
    let is_public = match flag("os-volume-type-access:is_public")? {
        Some(b) => Some(b),
        None => flag("is_public")?,
    };
    let extra_specs = match t.get("extra_specs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(
            m.iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(invalid(
                        "extra_specs",
                        &format!("value of '{k}' is not a string"),
                    )),
                })
                .collect::<FaultResult<BTreeMap<_, _>>>()?,
        ),
        Some(_) => return Err(invalid("extra_specs", "is not of type 'object'")),
    };
    Ok(VolumeTypeChange {
        name: opt_string(t, "name")?,
        description: t
            .contains_key("description")
            .then(|| opt_string(t, "description"))
            .transpose()?,
        is_public,
        extra_specs,
    })
}

#[utoipa::path(get, path = "/{tenant_id}/types", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    responses((status = 200, description = "the volume types (private ones for admins too)", body = CinderVolumeTypes)))]
pub(super) async fn list_types(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let types = state.service.list_volume_types(&ctx.caller).await?;
    Ok(axum::Json(CinderVolumeTypes {
        volume_types: types.into_iter().map(view).collect(),
    })
    .into_response())
}

#[utoipa::path(post, path = "/{tenant_id}/types", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    request_body(content = CinderVolumeTypeRequest, content_type = "application/json"),
    responses((status = 200, description = "created", body = CinderVolumeTypeResponse),
              (status = 400, description = "badRequest: invalid body", body = BadRequest),
              (status = 403, description = "forbidden: admins only", body = Forbidden),
              (status = 409, description = "conflictingRequest: the name exists", body = crate::schema::ConflictingRequest)))]
pub(super) async fn create_type(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    require_admin(&ctx)?;
    let change = parse(json_body(&headers, &body_or_fault(body)?)?, true)?;
    Ok(one(state
        .service
        .create_volume_type(&ctx.caller, change)
        .await?))
}

#[utoipa::path(get, path = "/{tenant_id}/types/{type_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name; `default` is the default type")),
    responses((status = 200, description = "the type", body = CinderVolumeTypeResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_type(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    Ok(one(state
        .service
        .get_volume_type(&ctx.caller, ctx.param("type_id"))
        .await?))
}

#[utoipa::path(put, path = "/{tenant_id}/types/{type_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name")),
    request_body(content = CinderVolumeTypeRequest, content_type = "application/json"),
    responses((status = 200, description = "updated (a rename carries the volumes of the type along)", body = CinderVolumeTypeResponse),
              (status = 400, description = "badRequest: invalid body, or renaming the default type", body = BadRequest),
              (status = 403, description = "forbidden: admins only", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound),
              (status = 409, description = "conflictingRequest: the new name exists", body = crate::schema::ConflictingRequest)))]
pub(super) async fn update_type(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    require_admin(&ctx)?;
    let change = parse(json_body(&headers, &body_or_fault(body)?)?, false)?;
    Ok(one(state
        .service
        .update_volume_type(&ctx.caller, ctx.param("type_id"), change)
        .await?))
}

#[utoipa::path(delete, path = "/{tenant_id}/types/{type_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name")),
    responses((status = 202, description = "deleted (empty body)"),
              (status = 400, description = "badRequest: volumes use it, or it is the default type", body = BadRequest),
              (status = 403, description = "forbidden: admins only", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn delete_type(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    require_admin(&ctx)?;
    state
        .service
        .delete_volume_type(&ctx.caller, ctx.param("type_id"))
        .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `{"extra_specs": {...}}`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct CinderExtraSpecs {
    extra_specs: BTreeMap<String, String>,
}

/// Merges `add` into the type's extra specs (and removes `remove`); returns them all.
async fn change_specs(
    state: &AppState,
    ctx: &Ctx,
    add: BTreeMap<String, String>,
    remove: Option<&str>,
) -> FaultResult<BTreeMap<String, String>> {
    require_admin(ctx)?;
    let id = ctx.param("type_id");
    let t = state.service.get_volume_type(&ctx.caller, id).await?;
    let mut specs = t.extra_specs;
    if let Some(k) = remove
        && specs.remove(k).is_none()
    {
        return Err(Fault::not_found(format!(
            "Volume Type {id} has no extra specs with key {k}."
        )));
    }
    specs.extend(add);
    let change = VolumeTypeChange {
        extra_specs: Some(specs),
        ..VolumeTypeChange::default()
    };
    Ok(state
        .service
        .update_volume_type(&ctx.caller, &t.id, change)
        .await?
        .extra_specs)
}

/// The string map under `key` of a body.
fn string_map(body: &Map<String, Value>, key: &str) -> FaultResult<BTreeMap<String, String>> {
    let Some(Value::Object(m)) = body.get(key) else {
        return Err(Fault::bad_request(format!(
            "Missing required element '{key}' in request body."
        )));
    };
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) if !k.is_empty() && k.len() <= 255 && s.len() <= 255 => {
                Ok((k.clone(), s.clone()))
            }
            _ => Err(invalid(
                key,
                &format!("'{k}' must map to a string of at most 255 characters"),
            )),
        })
        .collect()
}

#[utoipa::path(get, path = "/{tenant_id}/types/{type_id}/extra_specs", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name")),
    responses((status = 200, description = "the type's extra specs", body = CinderExtraSpecs),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_specs(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let t = state
        .service
        .get_volume_type(&ctx.caller, ctx.param("type_id"))
        .await?;
    Ok(axum::Json(CinderExtraSpecs {
        extra_specs: t.extra_specs,
    })
    .into_response())
}

#[utoipa::path(post, path = "/{tenant_id}/types/{type_id}/extra_specs", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name")),
    request_body(content = CinderExtraSpecs, content_type = "application/json"),
    responses((status = 200, description = "merged: all the type's extra specs", body = CinderExtraSpecs),
              (status = 400, description = "badRequest: not a map of strings", body = BadRequest),
              (status = 403, description = "forbidden: admins only", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn add_specs(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    require_admin(&ctx)?;
    let add = string_map(&json_body(&headers, &body_or_fault(body)?)?, "extra_specs")?;
    let extra_specs = change_specs(&state, &ctx, add, None).await?;
    Ok(axum::Json(CinderExtraSpecs { extra_specs }).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/types/{type_id}/extra_specs/{key}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name"),
           ("key" = String, Path, description = "extra spec key")),
    responses((status = 200, description = "`{key: value}`", body = BTreeMap<String, String>),
              (status = 404, description = "itemNotFound: the type or the key", body = ItemNotFound)))]
pub(super) async fn show_spec(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let id = ctx.param("type_id");
    let t = state.service.get_volume_type(&ctx.caller, id).await?;
    let key = ctx.param("key");
    let Some(v) = t.extra_specs.get(key) else {
        return Err(Fault::not_found(format!(
            "Volume Type {id} has no extra specs with key {key}."
        )));
    };
    Ok(axum::Json(BTreeMap::from([(key.to_owned(), v.clone())])).into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/types/{type_id}/extra_specs/{key}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name"),
           ("key" = String, Path, description = "extra spec key")),
    request_body(content = BTreeMap<String, String>, content_type = "application/json",
        description = "`{key: value}`, the URL's key"),
    responses((status = 200, description = "set", body = BTreeMap<String, String>),
              (status = 400, description = "badRequest: another key, or more than one", body = BadRequest),
              (status = 403, description = "forbidden: admins only", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn set_spec(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    require_admin(&ctx)?;
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let key = ctx.param("key").to_owned();
    if body.len() > 1 {
        return Err(Fault::bad_request("Request body contains too many items"));
    }
    let Some(Value::String(v)) = body.get(&key) else {
        return Err(Fault::bad_request("Request body and URI mismatch"));
    };
    let set = BTreeMap::from([(key, v.clone())]);
    change_specs(&state, &ctx, set.clone(), None).await?;
    Ok(axum::Json(set).into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/types/{type_id}/extra_specs/{key}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("type_id" = String, Path, description = "type id or name"),
           ("key" = String, Path, description = "extra spec key")),
    responses((status = 202, description = "removed (empty body)"),
              (status = 403, description = "forbidden: admins only", body = Forbidden),
              (status = 404, description = "itemNotFound: the type or the key", body = ItemNotFound)))]
pub(super) async fn delete_spec(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let key = ctx.param("key").to_owned();
    change_specs(&state, &ctx, BTreeMap::new(), Some(&key)).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// cinder's absolute limits: cairn sets no quotas (`-1`), and counts what the project holds.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CinderAbsoluteLimits {
    max_total_volumes: i64,
    max_total_snapshots: i64,
    max_total_volume_gigabytes: i64,
    max_total_backups: i64,
    max_total_backup_gigabytes: i64,
    total_volumes_used: u64,
    total_snapshots_used: u64,
    total_gigabytes_used: u64,
    total_backups_used: u64,
    total_backup_gigabytes_used: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderLimits {
    /// Always empty: no rate limits.
    rate: Vec<Value>,
    absolute: CinderAbsoluteLimits,
}

/// `{"limits": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderLimitsResponse {
    limits: CinderLimits,
}

#[utoipa::path(get, path = "/{tenant_id}/limits", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    responses((status = 200, description = "no quotas (-1) and what the project holds", body = CinderLimitsResponse)))]
pub(super) async fn limits(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let u = state.service.volume_usage(&ctx.caller).await?;
    Ok(axum::Json(CinderLimitsResponse {
        limits: CinderLimits {
            rate: Vec::new(),
            absolute: CinderAbsoluteLimits {
                max_total_volumes: -1,
                max_total_snapshots: -1,
                max_total_volume_gigabytes: -1,
                max_total_backups: -1,
                max_total_backup_gigabytes: -1,
                total_volumes_used: u.volumes,
                total_snapshots_used: u.snapshots,
                total_gigabytes_used: u.gigabytes,
                total_backups_used: 0,
                total_backup_gigabytes_used: 0,
            },
        },
    })
    .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ZoneState {
    available: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CinderZone {
    zone_name: String,
    zone_state: ZoneState,
}

/// `{"availabilityZoneInfo": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderZones {
    #[serde(rename = "availabilityZoneInfo")]
    availability_zone_info: Vec<CinderZone>,
}

#[utoipa::path(get, path = "/{tenant_id}/os-availability-zone", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    responses((status = 200, description = "the one zone, `nova`", body = CinderZones)))]
pub(super) async fn zones(_ctx: Ctx) -> Response {
    axum::Json(CinderZones {
        availability_zone_info: vec![CinderZone {
            zone_name: "nova".into(),
            zone_state: ZoneState { available: true },
        }],
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_bodies() {
        let body = |v: Value| match serde_json::json!({ "volume_type": v }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let c = parse(
            body(
                serde_json::json!({"name": "fast", "os-volume-type-access:is_public": false,
                "extra_specs": {"multiattach": "<is> True"}}),
            ),
            true,
        )
        .unwrap();
        assert_eq!(
            (c.name.as_deref(), c.is_public),
            (Some("fast"), Some(false))
        );
        assert_eq!(c.extra_specs.unwrap()["multiattach"], "<is> True");
        assert!(parse(body(serde_json::json!({"extra_specs": {"k": 1}})), true).is_err());
        assert!(parse(body(serde_json::json!({"extra_specs": {}})), false).is_err());
        let u = parse(body(serde_json::json!({"description": null})), false).unwrap();
        assert_eq!(u.description, Some(None));
        assert!(u.name.is_none());
    }
}
