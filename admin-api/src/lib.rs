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
use schema::SecuritySchemes;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub mod auth;
pub mod compute;
pub mod error;
pub mod filesystem;
pub mod image;
pub mod keystone;
mod metrics;
pub mod model;
pub mod mount;
pub mod ops;
pub mod pdisk;
pub mod schema;
mod service;
pub mod time_fmt;
pub mod volume;

pub use service::{
    AdminService, ComponentHealth, ConversionMetrics, Health, StoreMetrics, VersionInfo,
};

/// State shared by every handler of every family.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<dyn AdminService>,
    /// The Image family's service.
    pub images: Arc<dyn image::ImageService>,
    metrics: Arc<metrics::Metrics>,
}

/// The whole admin API: every family's router merged, `/openapi.json` generated from the same
/// route declarations (so the document cannot miss a route), a JSON 404 for unknown paths, a
/// JSON 405 for known paths with the wrong method, and request counting for `/metrics`.
pub fn router(service: Arc<dyn AdminService>) -> Router {
    router_with_images(service, Arc::new(image::NoImages))
}

/// [`router`] with an Image service.
pub fn router_with_images(
    service: Arc<dyn AdminService>,
    images: Arc<dyn image::ImageService>,
) -> Router {
    let state = AppState {
        metrics: Arc::new(metrics::Metrics::new(service.clone())),
        service,
        images,
    };
    let (routes, mut doc) = api_routes().split_for_parts();
    schema::complete(&mut doc);
    let doc = Arc::new(doc);
    let routes = routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            keystone_challenge,
        ))
        // `layer` (not `route_layer`) so that the fallbacks are counted too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track_requests,
        ))
        .with_state(state);
    // Outside the router, so that a mount is stripped before routing.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(mount::strip_mounts))
}

/// Token-authenticated families (identity, Compute) answer a 401 with the challenge
/// keystonemiddleware sends, naming the identity endpoint absolutely. One place for all:
/// a 401 that already carries a challenge (pdisk's Basic) keeps it.
async fn keystone_challenge(
    axum::extract::State(s): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut resp = next.run(req).await;
    let h = axum::http::header::WWW_AUTHENTICATE;
    if resp.status() == axum::http::StatusCode::UNAUTHORIZED
        && !resp.headers().contains_key(&h)
        && let Ok(v) = axum::http::HeaderValue::from_str(&format!(
            "Keystone uri=\"{}\"",
            s.service.public_url()
        ))
    {
        resp.headers_mut().insert(h, v);
    }
    resp
}

/// Every documented route with its OpenAPI description.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(ops::router())
        .merge(keystone::router())
        .merge(compute::router())
        .merge(pdisk::router())
        .merge(image::router())
        .merge(volume::router())
}

/// The OpenAPI document of every route, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_routes().into_openapi();
    schema::complete(&mut doc);
    doc
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "cairn admin API",
        description = "Identity (Keystone v3 subset), Compute volumes (os-volumes), persistent disks (pdisk) and operations endpoints of the cairn storage daemon."
    ),
    modifiers(&SecuritySchemes),
    components(schemas(
        schema::BadRequest,
        schema::Unauthorized,
        schema::Forbidden,
        schema::ItemNotFound,
        schema::BadMethod,
        schema::NotAcceptable,
        schema::ConflictingRequest,
        schema::OverLimit,
        schema::BadMediaType,
        schema::ComputeFault,
        schema::IdentityError,
        schema::PdiskError,
        image::GlanceErrorBody,
    ))
)]
struct ApiDoc;

#[cfg(test)]
mod tests;
