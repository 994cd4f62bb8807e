//! The cairn admin HTTP API.
//!
//! This crate owns everything HTTP: routing, JSON shapes, error formats and the Prometheus
//! exposition. It knows nothing of the store or the catalog: the daemon implements
//! [`AdminService`] and hands it to [`router`].
//!
//! Each API family lives in its own module with a `router()` returning `Router<AppState>`,
//! merged by [`router`]. Families so far:
//!
//! - [`ops`]: `/healthz`, `/version`, `/metrics` (operations endpoints).
//!
//! Later families (Compute `/v1.1/...`, pdisk `/api/...`, Keystone `/v3/...`, Image
//! `/v2/images...`, Block Storage `/v2/{tenant}/...`) are added as sibling modules, each with
//! its own error format; unknown paths outside every family answer a JSON 404 from [`error`].

use std::sync::Arc;

use axum::Router;

pub mod error;
mod metrics;
pub mod ops;
mod service;

pub use service::{AdminService, ComponentHealth, Health, StoreMetrics, VersionInfo};

/// State shared by every handler of every family.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<dyn AdminService>,
    metrics: Arc<metrics::Metrics>,
}

/// The whole admin API: every family's router merged, a JSON 404 for unknown paths, a JSON 405
/// for known paths with the wrong method, and request counting for `/metrics`.
pub fn router(service: Arc<dyn AdminService>) -> Router {
    let state = AppState {
        metrics: Arc::new(metrics::Metrics::new(service.clone())),
        service,
    };
    Router::new()
        .merge(ops::router())
        // Later families: .merge(compute::router()).merge(pdisk::router()) ...
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        // `layer` (not `route_layer`) so that the fallbacks are counted too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests;
