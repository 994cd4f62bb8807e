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
use serde_json::{Map, Value, json};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{AppState, error::json_error};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(version))
        .routes(routes!(metrics))
}

#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "every component is usable"),
              (status = 503, description = "a component is not usable; reasons in `checks`")))]
async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.service.health().await;
    let checks: Map<String, Value> = health
        .components
        .iter()
        .map(|c| {
            let v = match &c.status {
                Ok(()) => "ok".to_owned(),
                Err(reason) => reason.clone(),
            };
            (c.name.clone(), Value::String(v))
        })
        .collect();
    if health.is_healthy() {
        (
            StatusCode::OK,
            Json(json!({"status": "ok", "checks": checks})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "checks": checks})),
        )
            .into_response()
    }
}

#[utoipa::path(get, path = "/version", tag = "ops",
    responses((status = 200, description = "name, version, commit and on-disk format versions")))]
async fn version(State(state): State<AppState>) -> Json<crate::VersionInfo> {
    Json(state.service.version())
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(_) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        ),
    }
}
