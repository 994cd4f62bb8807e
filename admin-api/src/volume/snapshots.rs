//! `/snapshots`: point-in-time copy-on-write clones of volumes (metadata only), the source of
//! instant volumes (`snapshot_id`).

use std::collections::BTreeMap;

use axum::{
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{Ctx, resource, text_field};
use crate::compute::volumes::{invalid, opt_string, parse_metadata};
use crate::compute::{Fault, body_or_fault, fault::FaultResult, json_body, query};
use crate::{
    AppState,
    model::{NewSnapshot, Snapshot},
    schema::{BadRequest, Forbidden, ItemNotFound, OverLimit},
    time_fmt,
};

/// cinder's snapshot view.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderSnapshot {
    id: String,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`
    created_at: String,
    updated_at: Option<String>,
    name: Option<String>,
    description: Option<String>,
    volume_id: String,
    /// creating, available, deleting or error.
    status: String,
    /// GiB: the volume's size when the snapshot was taken.
    size: u64,
    metadata: BTreeMap<String, String>,
    /// Always `100%` once available: a snapshot is taken at once.
    #[serde(rename = "os-extended-snapshot-attributes:progress")]
    progress: String,
    /// Admins only.
    #[serde(
        rename = "os-extended-snapshot-attributes:project_id",
        skip_serializing_if = "Option::is_none"
    )]
    project_id: Option<String>,
}

/// `{"snapshot": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderSnapshotResponse {
    snapshot: CinderSnapshot,
}

/// `{"snapshots": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderSnapshots {
    snapshots: Vec<CinderSnapshot>,
}

fn view(ctx: &Ctx, s: &Snapshot) -> CinderSnapshot {
    CinderSnapshot {
        id: s.id.clone(),
        created_at: time_fmt::compute(s.created_at),
        updated_at: Some(time_fmt::compute(s.updated_at)),
        name: s.name.clone(),
        description: s.description.clone(),
        volume_id: s.volume_id.clone(),
        status: s.status.clone(),
        size: s.size_gib,
        metadata: s.metadata.clone(),
        progress: if s.status == "available" {
            "100%"
        } else {
            "0%"
        }
        .into(),
        project_id: ctx.caller.is_admin().then(|| s.project_id.clone()),
    }
}

async fn list(state: &AppState, ctx: &Ctx, raw: Option<String>) -> FaultResult<Response> {
    let q = query(raw.as_deref())?;
    let all = q
        .get("all_tenants")
        .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false" | "no"))
        && ctx.caller.is_admin();
    let snaps = state.service.list_snapshots(&ctx.caller, all).await?;
    let keep = |s: &Snapshot| {
        q.get("name")
            .is_none_or(|n| s.name.as_deref() == Some(n.as_str()))
            && q.get("status").is_none_or(|st| &s.status == st)
            && q.get("volume_id").is_none_or(|v| &s.volume_id == v)
    };
    let mut snaps: Vec<&Snapshot> = snaps.iter().filter(|s| keep(s)).collect();
    // Newest first, as cinder.
    snaps.reverse();
    let start = match q.get("marker") {
        Some(m) => {
            1 + snaps.iter().position(|s| &s.id == m).ok_or_else(|| {
                Fault::bad_request(format!("Invalid input received: marker [{m}] not found"))
            })?
        }
        None => 0,
    };
    let limit = match q.get("limit") {
        Some(l) => l
            .trim()
            .parse::<usize>()
            .map_err(|_| Fault::bad_request("limit param must be an integer"))?,
        None => 1000,
    };
    let snapshots = snaps
        .into_iter()
        .skip(start)
        .take(limit.min(1000))
        .map(|s| view(ctx, s))
        .collect();
    Ok(axum::Json(CinderSnapshots { snapshots }).into_response())
}

const LIST_PARAMS: &str = "filters: name, status, volume_id; paging: limit (at most 1000), marker; newest first; all_tenants (admins)";

#[utoipa::path(get, path = "/{tenant_id}/snapshots", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("query" = Option<String>, Query, description = LIST_PARAMS)),
    responses((status = 200, description = "the project's snapshots", body = CinderSnapshots)))]
pub(super) async fn list_snapshots(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(raw): RawQuery,
) -> FaultResult<Response> {
    list(&state, &ctx, raw).await
}

#[utoipa::path(get, path = "/{tenant_id}/snapshots/detail", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("query" = Option<String>, Query, description = LIST_PARAMS)),
    responses((status = 200, description = "the project's snapshots (the same view)", body = CinderSnapshots)))]
pub(super) async fn list_snapshots_detail(
    State(state): State<AppState>,
    ctx: Ctx,
    RawQuery(raw): RawQuery,
) -> FaultResult<Response> {
    list(&state, &ctx, raw).await
}

/// What `POST /snapshots` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body `parse_create` checks key by key
pub(crate) struct CinderSnapshotCreateRequest {
    snapshot: CinderSnapshotCreate,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct CinderSnapshotCreate {
    #[schema(format = "uuid")]
    volume_id: String,
    /// Snapshot an in-use volume: a boolean, or "true"/"false".
    force: Option<bool>,
    #[schema(max_length = 255)]
    name: Option<String>,
    #[schema(max_length = 255)]
    description: Option<String>,
    #[schema(max_length = 255)]
    display_name: Option<String>,
    #[schema(max_length = 255)]
    display_description: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

fn parse_create(body: Map<String, Value>) -> FaultResult<NewSnapshot> {
    const KEYS: [&str; 7] = [
        "volume_id",
        "force",
        "name",
        "description",
        "display_name",
        "display_description",
        "metadata",
    ];
    let s = resource(&body, "snapshot", &KEYS)?;
    let Some(volume_id) = opt_string(s, "volume_id")? else {
        return Err(invalid("volume_id", "'volume_id' is a required property"));
    };
    let force = match s.get("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(v)) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "y" | "on" | "t" => true,
            "false" | "0" | "no" | "n" | "off" | "f" => false,
            _ => {
                return Err(Fault::bad_request(format!(
                    "Invalid input received: Invalid value '{v}' for force."
                )));
            }
        },
        Some(other) => {
            return Err(Fault::bad_request(format!(
                "Invalid input received: Invalid value '{other}' for force."
            )));
        }
    };
    Ok(NewSnapshot {
        volume_id,
        name: text_field(s, "name", "display_name")?.flatten(),
        description: text_field(s, "description", "display_description")?.flatten(),
        force,
        metadata: parse_metadata(s.get("metadata"))?,
    })
}

#[utoipa::path(post, path = "/{tenant_id}/snapshots", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    request_body(content = CinderSnapshotCreateRequest, content_type = "application/json"),
    responses((status = 202, description = "taken: the snapshot, `available`", body = CinderSnapshotResponse),
              (status = 400, description = "badRequest: invalid body, or the volume is in-use without force or busy", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound: the volume", body = ItemNotFound),
              (status = 413, description = "overLimit: no room in the store", body = OverLimit)))]
pub(super) async fn create_snapshot(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer("volume:create_snapshot")?;
    let body = json_body(&headers, &body_or_fault(body)?)?;
    let new = parse_create(body)?;
    let snap = state.service.create_snapshot(&ctx.caller, new).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(CinderSnapshotResponse {
            snapshot: view(&ctx, &snap),
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/snapshots/{snapshot_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "the snapshot", body = CinderSnapshotResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_snapshot(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let snap = state
        .service
        .get_snapshot(&ctx.caller, ctx.param("snapshot_id"))
        .await?;
    Ok(axum::Json(CinderSnapshotResponse {
        snapshot: view(&ctx, &snap),
    })
    .into_response())
}

/// What `PUT /snapshots/{id}` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct CinderSnapshotUpdateRequest {
    snapshot: CinderSnapshotUpdate,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct CinderSnapshotUpdate {
    /// null clears it.
    #[schema(max_length = 255)]
    name: Option<String>,
    #[schema(max_length = 255)]
    description: Option<String>,
    #[schema(max_length = 255)]
    display_name: Option<String>,
    #[schema(max_length = 255)]
    display_description: Option<String>,
}

#[utoipa::path(put, path = "/{tenant_id}/snapshots/{snapshot_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("snapshot_id" = String, Path, description = "snapshot id")),
    request_body(content = CinderSnapshotUpdateRequest, content_type = "application/json"),
    responses((status = 200, description = "the snapshot as updated", body = CinderSnapshotResponse),
              (status = 400, description = "badRequest: invalid body", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn update_snapshot(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    ctx.require_writer("volume:update_snapshot")?;
    let body = json_body(&headers, &body_or_fault(body)?)?;
    const KEYS: [&str; 4] = ["name", "description", "display_name", "display_description"];
    let s = resource(&body, "snapshot", &KEYS)?;
    let (name, description) = (
        text_field(s, "name", "display_name")?,
        text_field(s, "description", "display_description")?,
    );
    let snap = state
        .service
        .update_snapshot(&ctx.caller, ctx.param("snapshot_id"), name, description)
        .await?;
    Ok(axum::Json(CinderSnapshotResponse {
        snapshot: view(&ctx, &snap),
    })
    .into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/snapshots/{snapshot_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 202, description = "deleted (empty body)"),
              (status = 400, description = "badRequest: the snapshot is busy", body = BadRequest),
              (status = 403, description = "forbidden: reader role", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn delete_snapshot(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    ctx.require_writer("volume:delete_snapshot")?;
    state
        .service
        .delete_snapshot(&ctx.caller, ctx.param("snapshot_id"))
        .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_needs_a_volume_and_a_boolean_force() {
        let body = |v: Value| match serde_json::json!({ "snapshot": v }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let n = parse_create(body(serde_json::json!({"volume_id": "v", "force": "True",
            "display_name": "s"})))
        .unwrap();
        assert!(n.force);
        assert_eq!(n.name.as_deref(), Some("s"));
        assert!(parse_create(body(serde_json::json!({}))).is_err());
        assert!(
            parse_create(body(
                serde_json::json!({"volume_id": "v", "force": "maybe"})
            ))
            .is_err()
        );
        assert!(parse_create(body(serde_json::json!({"volume_id": "v", "force": 2}))).is_err());
        assert!(parse_create(body(serde_json::json!({"volume_id": "v", "size": 2}))).is_err());
    }
}
