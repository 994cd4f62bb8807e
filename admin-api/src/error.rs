//! Errors for paths that belong to no API family.
//!
//! Each family answers its own errors in its own documented format (Compute faults, pdisk
//! `{"message": [...]}`, Glance's webob body...). What falls outside every family gets this
//! neutral JSON shape: `{"error": {"code": 404, "title": "Not Found", "message": "..."}}`.

use axum::{
    Json,
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};

/// A neutral JSON error response.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = crate::schema::IdentityError {
        error: crate::schema::IdentityErrorBody {
            code: status.as_u16(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

/// Fallback for paths no family routes.
pub async fn not_found(uri: Uri) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no resource at {}", uri.path()),
    )
}

/// Fallback for a known path asked with a method it does not serve.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}
