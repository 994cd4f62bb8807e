//! Compute faults: `{"itemNotFound": {"message": "...", "code": 404}}`, named by status as nova's
//! `wsgi.Fault` names them.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::model::ServiceError;

/// One Compute error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: StatusCode,
    pub message: String,
}

impl Fault {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Fault {
        Fault {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Fault {
        Fault::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Fault {
        Fault::new(StatusCode::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Fault {
        Fault::new(StatusCode::FORBIDDEN, message)
    }

    /// nova `wsgi.Fault._fault_names`; anything unlisted is a `computeFault`.
    pub fn name(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "badRequest",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "itemNotFound",
            405 => "badMethod",
            409 => "conflictingRequest",
            413 | 429 => "overLimit",
            415 => "badMediaType",
            501 => "notImplemented",
            503 => "serviceUnavailable",
            _ => "computeFault",
        }
    }
}

impl From<ServiceError> for Fault {
    fn from(e: ServiceError) -> Fault {
        match e {
            ServiceError::NotFound(m) => Fault::new(StatusCode::NOT_FOUND, m),
            ServiceError::Unauthorized(m) => Fault::new(StatusCode::UNAUTHORIZED, m),
            ServiceError::Forbidden(m) => Fault::new(StatusCode::FORBIDDEN, m),
            ServiceError::BadRequest(m) => Fault::new(StatusCode::BAD_REQUEST, m),
            ServiceError::Conflict(m) => Fault::new(StatusCode::CONFLICT, m),
            // nova answers quota and device limits with 413 overLimit (403 for "too many disk
            // devices" in modern nova, but the quota family of errors is 413).
            ServiceError::OverLimit(m) => Fault::new(StatusCode::PAYLOAD_TOO_LARGE, m),
            ServiceError::Unsupported(m) => Fault::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, m),
            // Seed 003's 500 row: "Failed to communicate with glance-api", said as such.
            ServiceError::Unavailable(m) => Fault::new(StatusCode::INTERNAL_SERVER_ERROR, m),
            ServiceError::Internal(m) => {
                // The daemon already logged the cause; the client learns only that it failed.
                tracing::warn!(error = %m, "compute request failed inside the daemon");
                Fault::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Unexpected API Error. Please report this at the cairn issue tracker and attach the daemon log if possible.",
                )
            }
        }
    }
}

impl IntoResponse for Fault {
    fn into_response(self) -> Response {
        let body =
            json!({ self.name(): { "message": self.message, "code": self.status.as_u16() } });
        // A 401's `WWW-Authenticate` is added by the router (`keystone_challenge`).
        (self.status, Json(body)).into_response()
    }
}

pub type FaultResult<T> = Result<T, Fault>;
