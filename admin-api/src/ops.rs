//! Operations endpoints: `GET /healthz`, `GET /version`, `GET /metrics`.
//!
//! - `/healthz`: 200 `{"status":"ok","checks":{"store":"ok","catalog":"ok"}}` when every
//!   component is usable, else 503 with `"status":"unavailable"` and the failing checks'
//!   reasons.
//! - `/version`: [`VersionInfo`](crate::VersionInfo) as JSON.
//! - `/metrics`: OpenMetrics text (`application/openmetrics-text; version=1.0.0`), which
//!   Prometheus scrapes natively. Store series: `cairn_store_{objects, logical_bytes,
//!   allocated_bytes, physical_bytes, free_bytes, segments}` (gauges) and
//!   `cairn_store_{checksum_errors, healed_blocks, read_retries, reads, writes, read_bytes,
//!   written_bytes, flushes}_total` (counters). HTTP:
//!   `cairn_http_requests_total{method,route,status}`.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{AppState, error::json_error, schema::IdentityError};

/// `GET /healthz`
#[derive(Debug, Serialize, ToSchema)]
struct HealthResponse {
    /// `ok` or `unavailable`.
    status: String,
    /// Per component (`store`, `catalog`): `ok` or the reason it is not usable.
    checks: BTreeMap<String, String>,
}

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(version))
        .routes(routes!(metrics))
}

#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "every component is usable", body = HealthResponse),
              (status = 503, description = "a component is not usable; reasons in `checks`", body = HealthResponse)))]
async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.service.health().await;
    let checks = health
        .components
        .iter()
        .map(|c| {
            let v = match &c.status {
                Ok(()) => c.note.clone().unwrap_or_else(|| "ok".to_owned()),
                Err(reason) => reason.clone(),
            };
            (c.name.clone(), v)
        })
        .collect();
    let (status, word) = if health.is_healthy() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (
        status,
        Json(HealthResponse {
            status: word.into(),
            checks,
        }),
    )
        .into_response()
}

#[utoipa::path(get, path = "/version", tag = "ops",
    responses((status = 200, description = "name, version, commit and on-disk format versions", body = crate::VersionInfo)))]
async fn version(State(state): State<AppState>) -> Json<crate::VersionInfo> {
    Json(state.service.version())
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text"),
              (status = 500, description = "the metrics could not be encoded", body = IdentityError)))]
async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(_) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        ),
    }
}
