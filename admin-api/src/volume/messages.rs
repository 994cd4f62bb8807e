//! `/messages` (microversion 3.3): user messages, what went wrong in an asynchronous action
//! a request was already answered 2xx for (an upload to an image that failed later). List,
//! show and delete, as cinder's `MessagesController` at 3.3: no filters, sorting or paging
//! (3.5 added those); a project sees its own messages, an admin every project's.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use super::volumes::{CinderLink, resource_links};
use super::{Ctx, MESSAGES};
use crate::compute::fault::FaultResult;
use crate::{
    AppState,
    model::{UserMessage, message_field},
    schema::{Forbidden, ItemNotFound},
    time_fmt,
};

/// cinder's message view.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderMessage {
    id: String,
    /// `VOLUME_<resource type>_<action id>_<detail id>`, e.g. `VOLUME_VOLUME_003_004`.
    event_id: String,
    /// `<action>:<detail>`, e.g. `copy volume to image:Failed to upload volume to image at
    /// backend.`
    user_message: String,
    /// `ERROR`, `WARNING` or `INFO`.
    message_level: String,
    /// `VOLUME` (absent when the message concerns no resource).
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_uuid: Option<String>,
    /// `YYYY-MM-DDTHH:MM:SS.ffffff`
    created_at: String,
    /// Kept at least until then (`created_at` plus the daemon's `--message-ttl`).
    guaranteed_until: String,
    /// The `x-openstack-request-id` of the request that started the action.
    request_id: String,
    links: Vec<CinderLink>,
}

/// `{"message": {...}}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderMessageResponse {
    message: CinderMessage,
}

/// `{"messages": [...]}`
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CinderMessages {
    messages: Vec<CinderMessage>,
}

fn view(ctx: &Ctx, m: &UserMessage) -> CinderMessage {
    CinderMessage {
        id: m.id.clone(),
        event_id: m.event_id.clone(),
        user_message: message_field::user_message(m.action_id.as_deref(), m.detail_id.as_deref()),
        message_level: m.message_level.clone(),
        // cinder leaves out empty ones.
        resource_type: m.resource_type.clone().filter(|s| !s.is_empty()),
        resource_uuid: m.resource_uuid.clone().filter(|s| !s.is_empty()),
        created_at: time_fmt::compute(m.created_at),
        guaranteed_until: time_fmt::compute(m.expires_at),
        request_id: m.request_id.clone(),
        links: resource_links(ctx, "messages", &m.id),
    }
}

const VERSION_HEADER: &str =
    "`volume 3.3` (or later): below 3.3 the route answers 404, as cinder's";

#[utoipa::path(get, path = "/{tenant_id}/messages", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("OpenStack-API-Version" = Option<String>, Header, description = VERSION_HEADER)),
    responses((status = 200, description = "the project's messages (every project's for an admin), newest first; query parameters are ignored (filters, sorting and paging came in 3.5)", body = CinderMessages),
              (status = 404, description = "itemNotFound: the microversion is below 3.3", body = ItemNotFound)))]
pub(super) async fn list_messages(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    ctx.require_version(MESSAGES)?;
    let messages = state.service.list_messages(&ctx.caller).await?;
    Ok(axum::Json(CinderMessages {
        messages: messages.iter().map(|m| view(&ctx, m)).collect(),
    })
    .into_response())
}

#[utoipa::path(get, path = "/{tenant_id}/messages/{message_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("message_id" = String, Path, description = "message id"),
           ("OpenStack-API-Version" = Option<String>, Header, description = VERSION_HEADER)),
    responses((status = 200, description = "the message", body = CinderMessageResponse),
              (status = 404, description = "itemNotFound: no such message (or another project's, or expired), or the microversion is below 3.3", body = ItemNotFound)))]
pub(super) async fn show_message(State(state): State<AppState>, ctx: Ctx) -> FaultResult<Response> {
    ctx.require_version(MESSAGES)?;
    let m = state
        .service
        .get_message(&ctx.caller, ctx.param("message_id"))
        .await?;
    Ok(axum::Json(CinderMessageResponse {
        message: view(&ctx, &m),
    })
    .into_response())
}

#[utoipa::path(delete, path = "/{tenant_id}/messages/{message_id}", tag = "volume",
    params(("tenant_id" = String, Path, description = "project id (must be the token's)"),
           ("message_id" = String, Path, description = "message id"),
           ("OpenStack-API-Version" = Option<String>, Header, description = VERSION_HEADER)),
    responses((status = 204, description = "deleted"),
              (status = 403, description = "forbidden: reader role (`message:delete` needs member)", body = Forbidden),
              (status = 404, description = "itemNotFound: no such message (or another project's, or expired), or the microversion is below 3.3", body = ItemNotFound)))]
pub(super) async fn delete_message(
    State(state): State<AppState>,
    ctx: Ctx,
) -> FaultResult<Response> {
    ctx.require_version(MESSAGES)?;
    state
        .service
        .delete_message(&ctx.caller, ctx.param("message_id"))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
