//! `/os-filesystem` (seed 002, the `os-shared-filesystem` extension): shared filesystems and
//! the instances that see them. The seed's samples are not valid JSON; they are read as
//! `{"fs_entry": {...}}`, `{"fs_entries": [...]}`, `{"instance_entries": [{"id"}]}`.

use axum::{
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{Ctx, Fault, body_or_fault, fault::FaultResult, json_body};
use crate::{
    AppState,
    filesystem::{Filesystem, FsRequest, FsScope},
    schema::{BadRequest, ConflictingRequest, Forbidden, ItemNotFound},
};

/// The seed's descriptor, byte for byte (key order included).
pub(super) const SHARED_FS: &str = r#"{"updated": "2012-04-11T00:00:00+00:00", "name": "Shared_fs", "links": [], "namespace": "http://docs.openstack.org/ext/shared_filesystem/api/v1.1", "alias": "os-shared-filesystem", "description": "Shared filesystem support"}"#;

/// What `PUT .../os-filesystem/{name}` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct FsEntryRequest {
    fs_entry: FsEntryBody,
}

/// A filesystem as asked for.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct FsEntryBody {
    /// A whole number and a unit: `4Gb`, `80Gb`, `512Mb`, `2Tb` (powers of 1024).
    size: String,
    scope: ScopeName,
    /// Scope `project`: whose instances see it (the caller's project when absent).
    #[schema(nullable = false)]
    project: Option<String>,
}

/// `global`, `project` or `instance`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ScopeName {
    Global,
    Project,
    Instance,
}

/// A filesystem as the seed shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FsEntry {
    name: String,
    /// As it was asked for (`4Gb`).
    size: String,
    scope: ScopeName,
    /// Scope `project` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<String>,
}

/// `{"fs_entry": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FsEntryResponse {
    fs_entry: FsEntry,
}

/// `{"fs_entries": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FsEntriesResponse {
    fs_entries: Vec<FsEntry>,
}

/// An instance that sees a filesystem.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InstanceEntry {
    id: String,
}

/// `{"instance_entries": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InstanceEntriesResponse {
    instance_entries: Vec<InstanceEntry>,
}

/// `{"instance_entry": {"id"}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InstanceEntryResponse {
    instance_entry: InstanceEntry,
}

fn entry(fs: Filesystem) -> FsEntry {
    let scope = match fs.scope {
        FsScope::Global => ScopeName::Global,
        FsScope::Project => ScopeName::Project,
        FsScope::Instance => ScopeName::Instance,
    };
    FsEntry {
        project: (fs.scope == FsScope::Project)
            .then_some(fs.project_id)
            .flatten(),
        name: fs.name,
        size: fs.size_text,
        scope,
    }
}

fn parse_put(body: serde_json::Map<String, Value>) -> FaultResult<FsRequest> {
    let Some(Value::Object(e)) = body.get("fs_entry") else {
        return Err(Fault::bad_request("Missing fs_entry in the request body."));
    };
    let text = |key: &str| match e.get(key) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(Fault::bad_request(format!("{key} must be a string."))),
    };
    let size_text = text("size")?.ok_or_else(|| Fault::bad_request("Missing size."))?;
    let scope = text("scope")?.ok_or_else(|| Fault::bad_request("Missing scope."))?;
    let scope = FsScope::parse(&scope).ok_or_else(|| {
        Fault::bad_request(format!(
            "Invalid scope '{scope}': global, project or instance."
        ))
    })?;
    let project = text("project")?;
    if project.is_some() && scope != FsScope::Project {
        return Err(Fault::bad_request(
            "project is given only with scope project.",
        ));
    }
    Ok(FsRequest {
        size_text,
        scope,
        project,
    })
}

#[utoipa::path(get, path = "/{tenant_id}/os-filesystem", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)")),
    responses((status = 200, description = "the filesystems the caller sees", body = FsEntriesResponse)))]
pub(super) async fn list_fs(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let all = state.service.list_filesystems(&ctx.caller).await?;
    let body = FsEntriesResponse {
        fs_entries: all.into_iter().map(entry).collect(),
    };
    Ok(axum::Json(body).into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/os-filesystem/{name}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("name" = String, Path, description = "filesystem name")),
    responses((status = 200, description = "the filesystem", body = FsEntryResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn show_fs(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    let fs = state
        .service
        .get_filesystem(&ctx.caller, ctx.param("name"))
        .await?;
    Ok(axum::Json(FsEntryResponse {
        fs_entry: entry(fs),
    })
    .into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/os-filesystem/{name}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("name" = String, Path, description = "filesystem name: letters, digits, '-', '_', '.'")),
    request_body(content = FsEntryRequest, content_type = "application/json"),
    responses((status = 200, description = "made, or resized (same scope and project)", body = FsEntryResponse),
              (status = 400, description = "badRequest: name, size, scope or project", body = BadRequest),
              (status = 403, description = "forbidden: a reader, or a non-admin asking for a global filesystem or another project's", body = Forbidden),
              (status = 409, description = "conflictingRequest: the name is taken with another scope or project", body = ConflictingRequest)))]
pub(super) async fn put_fs(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> FaultResult<Response> {
    let req = parse_put(json_body(&headers, &body_or_fault(body)?)?)?;
    let (fs, _) = state
        .service
        .put_filesystem(&ctx.caller, ctx.param("name"), req)
        .await?;
    Ok(axum::Json(FsEntryResponse {
        fs_entry: entry(fs),
    })
    .into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/os-filesystem/{name}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("name" = String, Path, description = "filesystem name")),
    responses((status = 202, description = "deleted"),
              (status = 403, description = "forbidden", body = Forbidden),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn delete_fs(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    state
        .service
        .delete_filesystem(&ctx.caller, ctx.param("name"))
        .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/os-filesystem/{name}/instances", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("name" = String, Path, description = "filesystem name")),
    responses((status = 200, description = "the instances that see it now", body = InstanceEntriesResponse),
              (status = 404, description = "itemNotFound", body = ItemNotFound)))]
pub(super) async fn list_fs_instances(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let ids = state
        .service
        .filesystem_instances(&ctx.caller, ctx.param("name"))
        .await?;
    let body = InstanceEntriesResponse {
        instance_entries: ids.into_iter().map(|id| InstanceEntry { id }).collect(),
    };
    Ok(axum::Json(body).into_response())
}

#[utoipa::path(put, path = "/{tenant_id}/os-filesystem/{name}/instances/{instance_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("name" = String, Path, description = "filesystem name"),
           ("instance_id" = String, Path, description = "a server of the project")),
    responses((status = 200, description = "connected", body = InstanceEntryResponse),
              (status = 400, description = "badRequest: the filesystem's scope is not instance", body = BadRequest),
              (status = 403, description = "forbidden", body = Forbidden),
              (status = 404, description = "itemNotFound: no such filesystem or instance", body = ItemNotFound)))]
pub(super) async fn connect_instance(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    let id = ctx.param("instance_id").to_owned();
    state
        .service
        .connect_filesystem(&ctx.caller, ctx.param("name"), &id, true)
        .await?;
    Ok(axum::Json(InstanceEntryResponse {
        instance_entry: InstanceEntry { id },
    })
    .into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/os-filesystem/{name}/instances/{instance_id}", tag = "compute",
    params(("tenant_id" = String, Path, description = "project id"),
           ("name" = String, Path, description = "filesystem name"),
           ("instance_id" = String, Path, description = "a connected instance")),
    responses((status = 202, description = "disconnected"),
              (status = 403, description = "forbidden", body = Forbidden),
              (status = 404, description = "itemNotFound: no such filesystem, or the instance is not connected", body = ItemNotFound)))]
pub(super) async fn disconnect_instance(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    state
        .service
        .connect_filesystem(
            &ctx.caller,
            ctx.param("name"),
            ctx.param("instance_id"),
            false,
        )
        .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
