//! OpenAPI pieces every family shares: security schemes and error bodies.
//!
//! Error bodies are built by each family's error type (`compute::Fault`, `keystone`'s
//! `KsError`, pdisk's `PdiskError`, [`crate::error::json_error`]) through the types below, so
//! that the schemas in `/openapi.json` are those of the bytes sent.

use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Response};
use utoipa::{Modify, ToSchema};

/// Name of the `X-Auth-Token` security scheme.
pub const TOKEN: &str = "token";
/// Name of the HTTP Basic security scheme (pdisk).
pub const BASIC: &str = "basic";

/// Adds the security schemes to the document.
pub struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            TOKEN,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Auth-Token",
                "A token from POST /v3/auth/tokens (its X-Subject-Token header).",
            ))),
        );
        let mut basic = Http::new(HttpAuthScheme::Basic);
        basic.description = Some("A user's name and password (pdisk only).".into());
        components.add_security_scheme(BASIC, SecurityScheme::Http(basic));
    }
}

/// Routes that take no credentials (version discovery, token issue, operations).
fn unauthenticated(path: &str, method: &str) -> bool {
    matches!(
        (method, path),
        (
            _,
            "/" | "/v3"
                | "/v3/"
                | "/v2.1"
                | "/v2.1/"
                | "/v2/{tenant_id}"
                | "/v2.1/{tenant_id}"
                | "/compute"
                | "/compute/"
                | "/identity"
                | "/identity/"
                | "/image"
                | "/image/"
                | "/versions"
                | "/image/versions"
                | "/volume"
                | "/volume/"
                | "/volume/v3"
                | "/volume/v3/"
                | "/volume/v2"
                | "/volume/v2/"
        ) | ("post", "/v3/auth/tokens")
            | (_, "/healthz" | "/version" | "/metrics")
    )
}

fn error_response(description: &str, schema: &str) -> RefOr<Response> {
    let mut r = Response::new(description);
    if schema == "GlanceErrorBody" {
        glance_error_content(&mut r);
    } else {
        r.content.insert(
            "application/json".into(),
            Content::new(Some(Ref::from_schema_name(schema))).into(),
        );
    }
    r.into()
}

/// What webob sends for an error: HTML without an `Accept`, JSON when asked, else text.
fn glance_error_content(r: &mut Response) {
    let text = || {
        Content::new(Some(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .build(),
        ))
    };
    r.content.insert(
        "application/json".into(),
        Content::new(Some(Ref::from_schema_name("GlanceErrorBody"))).into(),
    );
    r.content.insert("text/html".into(), text().into());
    r.content.insert("text/plain".into(), text().into());
}

/// What every operation of a family may answer besides what its handler documents: the
/// errors of authentication, of the URL's project, of microversions, of bodies. Added here
/// once per family, so that no handler can forget them; a handler's own entry for a status
/// (with its own description) wins.
pub fn complete(doc: &mut OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            ("get", item.get.as_mut()),
            ("put", item.put.as_mut()),
            ("post", item.post.as_mut()),
            ("delete", item.delete.as_mut()),
            ("head", item.head.as_mut()),
            ("patch", item.patch.as_mut()),
        ];
        for (method, op) in ops {
            if let Some(op) = op {
                complete_op(path, method, op);
            }
        }
    }
    add_mounted_aliases(doc);
}

/// Every route a service mount forwards is a route of its own ([`crate::mount`]): the copies
/// carry the original's description, with operation ids suffixed by the mount's name.
fn add_mounted_aliases(doc: &mut OpenApi) {
    let mut aliases = Vec::new();
    for (path, item) in &doc.paths.paths {
        for mount in crate::mount::MOUNTS {
            let mounted = format!("{}{path}", mount.prefix);
            if mount.inner(&mounted).is_none() {
                continue;
            }
            let mut item = item.clone();
            let suffix = format!("_{}", mount.prefix.trim_start_matches('/'));
            for op in [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
                item.head.as_mut(),
                item.patch.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if let Some(id) = op.operation_id.as_mut() {
                    id.push_str(&suffix);
                }
            }
            aliases.push((mounted, item));
        }
    }
    doc.paths.paths.extend(aliases);
}

fn complete_op(path: &str, method: &str, op: &mut Operation) {
    // The Compute routes are served under three prefixes from one handler each: operation
    // ids must be unique, so those of the seed's `/v1.1` and nova's legacy `/v2` say so
    // (`/v2.1`, the catalog's, keeps the plain name).
    for (prefix, suffix) in [("/v1.1/", "_v1_1"), ("/v2/", "_v2")] {
        if path.starts_with(prefix)
            && let Some(id) = op.operation_id.as_mut()
            && !id.ends_with(suffix)
        {
            id.push_str(suffix);
        }
    }
    let tag = op
        .tags
        .as_ref()
        .and_then(|t| t.first())
        .cloned()
        .unwrap_or_default();
    let open = unauthenticated(path, method);
    let body = op.request_body.is_some();
    let mut add = |status: &str, description: &str, schema: &str| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description, schema));
    };
    match tag.as_str() {
        "volume" => {
            if !open {
                add(
                    "400",
                    "badRequest: the URL's project is not the token's (\"Malformed request url\"), or the request is malformed",
                    "BadRequest",
                );
                add(
                    "401",
                    "unauthorized: no token, or not a valid one",
                    "Unauthorized",
                );
            }
            if path.starts_with("/v3/") {
                add(
                    "406",
                    "the requested microversion is outside 3.0 to 3.3",
                    "NotAcceptable",
                );
            }
            if body {
                add("413", "overLimit: the body is too large", "OverLimit");
                add("415", "badMediaType: the body is not JSON", "BadMediaType");
            }
        }
        "compute" => {
            if !open {
                add(
                    "400",
                    "badRequest: the URL's project is not the token's, or the request is malformed",
                    "BadRequest",
                );
                add(
                    "401",
                    "unauthorized: no token, or not a valid one",
                    "Unauthorized",
                );
            }
            if path.starts_with("/v2.1") {
                add(
                    "406",
                    "the requested microversion is outside 2.1 to 2.35",
                    "NotAcceptable",
                );
            }
            if body {
                add("413", "overLimit: the body is too large", "OverLimit");
                add("415", "badMediaType: the body is not JSON", "BadMediaType");
            }
        }
        "identity" => {
            add("400", "Bad Request: a malformed request", "IdentityError");
            if !open {
                add(
                    "401",
                    "Unauthorized: no token, or not a valid one",
                    "IdentityError",
                );
                add(
                    "403",
                    "Forbidden: the token's roles do not allow this",
                    "IdentityError",
                );
            } else if path == "/v3/auth/tokens" {
                add(
                    "401",
                    "Unauthorized: the credentials are wrong",
                    "IdentityError",
                );
            }
            if body {
                add("413", "Request Entity Too Large", "IdentityError");
                add(
                    "415",
                    "Unsupported Media Type: the body is not JSON",
                    "IdentityError",
                );
            }
        }
        "image" => {
            if !open {
                add(
                    "401",
                    "Unauthorized (keystonemiddleware's body): no token, or not a valid one",
                    "IdentityError",
                );
                add("400", "Bad Request: a malformed request", "GlanceErrorBody");
            }
            // Glance's errors: webob's body, negotiated from `Accept`.
            for (status, resp) in op.responses.responses.iter_mut() {
                if status.starts_with('4')
                    && status != "401"
                    && let RefOr::T(r) = resp
                    && r.content.is_empty()
                {
                    glance_error_content(r);
                }
            }
        }
        "pdisk" => {
            // pdisk answers missing rights with a 400, as the original.
            add(
                "400",
                "a malformed request, or not enough rights",
                "PdiskError",
            );
            add("401", "no credentials, or wrong ones", "PdiskError");
            if body {
                add("413", "the body is too large", "PdiskError");
                add("415", "the body is not of a type pdisk takes", "PdiskError");
            }
        }
        _ => {}
    }
    if !open && op.security.is_none() {
        let mut alternatives = vec![SecurityRequirement::new(TOKEN, Vec::<String>::new())];
        if tag == "pdisk" {
            alternatives.push(SecurityRequirement::new(BASIC, Vec::<String>::new()));
        }
        op.security = Some(alternatives);
    }
}

/// The inside of a Compute fault.
#[derive(Debug, Serialize, ToSchema)]
pub struct FaultBody {
    pub message: String,
    /// The HTTP status again.
    pub code: u16,
}

// One type per status, each with the key nova names it by (spelt out: utoipa does not read
// a `rename` that a macro hands it).
/// A Compute fault for status 400: `{"badRequest": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BadRequest {
    #[serde(rename = "badRequest")]
    pub fault: FaultBody,
}

/// A Compute fault for status 401: `{"unauthorized": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Unauthorized {
    #[serde(rename = "unauthorized")]
    pub fault: FaultBody,
}

/// A Compute fault for status 403: `{"forbidden": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Forbidden {
    #[serde(rename = "forbidden")]
    pub fault: FaultBody,
}

/// A Compute fault for status 404: `{"itemNotFound": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemNotFound {
    #[serde(rename = "itemNotFound")]
    pub fault: FaultBody,
}

/// A Compute fault for status 405: `{"badMethod": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BadMethod {
    #[serde(rename = "badMethod")]
    pub fault: FaultBody,
}

/// A Compute fault for status 406: `{"computeFault": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotAcceptable {
    #[serde(rename = "computeFault")]
    pub fault: FaultBody,
}

/// A Compute fault for status 409: `{"conflictingRequest": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictingRequest {
    #[serde(rename = "conflictingRequest")]
    pub fault: FaultBody,
}

/// A Compute fault for status 413: `{"overLimit": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OverLimit {
    #[serde(rename = "overLimit")]
    pub fault: FaultBody,
}

/// A Compute fault for status 415: `{"badMediaType": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BadMediaType {
    #[serde(rename = "badMediaType")]
    pub fault: FaultBody,
}

/// A Compute fault for status 500: `{"computeFault": {"message", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ComputeFault {
    #[serde(rename = "computeFault")]
    pub fault: FaultBody,
}

/// Keystone's error body (also the neutral one of paths outside every family).
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityError {
    pub error: IdentityErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityErrorBody {
    pub code: u16,
    /// The status's reason phrase, e.g. "Not Found".
    pub title: String,
    pub message: String,
}

/// pdisk's error body: `{"message": ["..."]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PdiskError {
    pub message: Vec<String>,
}
