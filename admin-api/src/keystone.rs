//! Identity: the Keystone v3 subset the OpenStack clients need.
//!
//! - Discovery: `GET /` (300 Multiple Choices, `{"versions": {"values": [...]}}`) and
//!   `GET /v3` (`{"version": {...}}`), as Keystone answers them.
//! - Tokens: `POST /v3/auth/tokens` (password or token method, project scope) -> 201 with
//!   `X-Subject-Token`; `GET`/`HEAD`/`DELETE /v3/auth/tokens` (validate, check, revoke);
//!   `GET /v3/auth/catalog`.
//! - Projects, users, roles, grants and role assignments under `/v3/...`; the one domain,
//!   `default` (`Default`), at `/v3/domains`.
//!
//! Errors use Keystone's body `{"error": {"code": 401, "title": "Unauthorized", "message":
//! "..."}}`; a 401 also carries `WWW-Authenticate: Keystone uri="<base>"` (added by the router).

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::schema::{IdentityError, IdentityErrorBody};
use crate::{AppState, auth::token_caller, model::*, time_fmt};

pub const SUBJECT_TOKEN: &str = "x-subject-token";
/// The only domain.
pub const DOMAIN_ID: &str = "default";
pub const DOMAIN_NAME: &str = "Default";
pub const REGION: &str = "RegionOne";
/// The Keystone API version cairn answers like (Keystone 2023.1+ says v3.14).
const VERSION_ID: &str = "v3.14";
const VERSION_UPDATED: &str = "2020-04-07T00:00:00Z";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(versions))
        .routes(routes!(versions_mounted))
        .routes(routes!(versions_mounted_slash))
        .routes(routes!(version_v3))
        .routes(routes!(version_v3_slash))
        .routes(routes!(
            issue_token,
            validate_token,
            check_token,
            revoke_token
        ))
        .routes(routes!(auth_catalog))
        .routes(routes!(list_projects, create_project))
        .routes(routes!(get_project, delete_project))
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, delete_user))
        .routes(routes!(list_user_projects))
        .routes(routes!(auth_projects))
        .routes(routes!(list_roles))
        .routes(routes!(get_role))
        .routes(routes!(list_grants))
        .routes(routes!(grant, check_grant, head_grant, revoke_grant))
        .routes(routes!(list_role_assignments))
        .routes(routes!(list_domains))
        .routes(routes!(get_domain))
}

// ---- errors ---------------------------------------------------------------------------------

/// A Keystone error response.
fn error(e: ServiceError) -> Response {
    let (status, message) = match e {
        ServiceError::NotFound(m) => (StatusCode::NOT_FOUND, m),
        ServiceError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
        ServiceError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
        ServiceError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
        ServiceError::Conflict(m) => (StatusCode::CONFLICT, m),
        ServiceError::OverLimit(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
        ServiceError::Unsupported(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, m),
        ServiceError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        ServiceError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
    };
    let body = IdentityError {
        error: IdentityErrorBody {
            code: status.as_u16(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            message,
        },
    };
    // A 401's `WWW-Authenticate` is added by the router (`keystone_challenge`).
    (status, Json(body)).into_response()
}

/// Runs a handler body; a [`ServiceError`] becomes a Keystone error response.
async fn answer(f: impl Future<Output = ServiceResult<Response>>) -> Response {
    match f.await {
        Ok(r) => r,
        Err(e) => error(e),
    }
}

fn bad_request(msg: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest(msg.into())
}

/// The request body, or the reason it could not be read in Keystone's error format (axum's
/// own rejection is plain text).
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// A JSON body, whatever the Content-Type (Keystone reads JSON regardless of it).
fn parse_body<T: DeserializeOwned>(body: &Body) -> ServiceResult<T> {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ServiceError::OverLimit(
                "The request body is too large.".into(),
            ));
        }
        Err(e) => {
            return Err(bad_request(format!(
                "Could not read the request body: {}",
                e.body_text()
            )));
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad_request(
            "The request body is empty; a JSON object is expected.",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("Malformed JSON request body: {e}.")))
}

/// Query parameters (repeated keys: the last wins).
fn parse_query(q: Option<&str>) -> ServiceResult<HashMap<String, String>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.unwrap_or(""))
        .map_err(|e| bad_request(format!("Malformed query string: {e}.")))?;
    // python-openstackclient sends unset filters as the string "None" (`?domain_id=None`,
    // `?group.id=None`): such id and flag filters mean "no filter". Names are kept as given.
    Ok(pairs
        .into_iter()
        .filter(|(k, v)| !(v == "None" && k != "name"))
        .collect())
}

/// Keystone's truthy query values (`?nocatalog`, `?include_names=True`).
fn truthy(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key)
        .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "0" | "false" | "no"))
}

fn bool_filter(q: &HashMap<String, String>, key: &str) -> ServiceResult<Option<bool>> {
    match q.get(key).map(|v| v.to_ascii_lowercase()) {
        None => Ok(None),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "") => Ok(Some(true)),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no") => Ok(Some(false)),
        Some(v) => Err(bad_request(format!(
            "Invalid value for query parameter {key}: {v:?} is not a boolean."
        ))),
    }
}

/// A domain reference is fine when it names the one domain.
fn is_default_domain(d: &DomainRef) -> bool {
    match (&d.id, &d.name) {
        (Some(id), _) => id == DOMAIN_ID,
        (None, Some(name)) => name == DOMAIN_NAME,
        (None, None) => false,
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: T) -> Response {
    (status, Json(body)).into_response()
}

/// A `{"self": ...}` link.
#[derive(Debug, Serialize, ToSchema)]
struct SelfLink {
    #[serde(rename = "self")]
    this: String,
}

/// A collection's links (cairn does not page).
#[derive(Debug, Serialize, ToSchema)]
struct CollectionLinks {
    #[serde(rename = "self")]
    this: String,
    previous: Option<String>,
    next: Option<String>,
}

// ---- discovery ------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
struct VersionLink {
    rel: String,
    href: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct MediaType {
    base: String,
    #[serde(rename = "type")]
    kind: String,
}

/// Keystone's description of API v3.
#[derive(Debug, Serialize, ToSchema)]
struct IdentityVersion {
    /// `v3.14`
    id: String,
    status: String,
    updated: String,
    links: Vec<VersionLink>,
    #[serde(rename = "media-types")]
    media_types: Vec<MediaType>,
}

/// `{"version": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct IdentityVersionDocument {
    version: IdentityVersion,
}

/// `{"versions": {"values": [...]}}`
#[derive(Debug, Serialize, ToSchema)]
struct IdentityVersions {
    versions: IdentityVersionValues,
}

#[derive(Debug, Serialize, ToSchema)]
struct IdentityVersionValues {
    values: Vec<IdentityVersion>,
}

fn version_doc(base: &str) -> IdentityVersion {
    IdentityVersion {
        id: VERSION_ID.into(),
        status: "stable".into(),
        updated: VERSION_UPDATED.into(),
        links: vec![VersionLink {
            rel: "self".into(),
            href: format!("{base}/v3/"),
        }],
        media_types: vec![MediaType {
            base: "application/json".into(),
            kind: "application/vnd.openstack.identity-v3+json".into(),
        }],
    }
}

#[utoipa::path(get, path = "/", tag = "identity",
    responses((status = 300, description = "Keystone's version list", body = IdentityVersions)))]
async fn versions(State(s): State<AppState>) -> Response {
    let base = s.service.public_url();
    json_response(
        StatusCode::MULTIPLE_CHOICES,
        IdentityVersions {
            versions: IdentityVersionValues {
                values: vec![version_doc(&base)],
            },
        },
    )
}

/// The root of the `/identity` mount (devstack's identity endpoint) answers as `/` does.
#[utoipa::path(get, path = "/identity", tag = "identity",
    responses((status = 300, description = "Keystone's version list", body = IdentityVersions)))]
async fn versions_mounted(state: State<AppState>) -> Response {
    versions(state).await
}

#[utoipa::path(get, path = "/identity/", tag = "identity",
    responses((status = 300, description = "Keystone's version list", body = IdentityVersions)))]
async fn versions_mounted_slash(state: State<AppState>) -> Response {
    versions(state).await
}

#[utoipa::path(get, path = "/v3", tag = "identity",
    responses((status = 200, description = "Keystone v3 version document", body = IdentityVersionDocument)))]
async fn version_v3(State(s): State<AppState>) -> Response {
    json_response(
        StatusCode::OK,
        IdentityVersionDocument {
            version: version_doc(&s.service.public_url()),
        },
    )
}

#[utoipa::path(get, path = "/v3/", tag = "identity",
    responses((status = 200, description = "Keystone v3 version document", body = IdentityVersionDocument)))]
async fn version_v3_slash(state: State<AppState>) -> Response {
    version_v3(state).await
}

// ---- tokens ---------------------------------------------------------------------------------

/// What `POST /v3/auth/tokens` takes.
#[derive(Deserialize, ToSchema)]
struct AuthBody {
    auth: AuthSection,
}

#[derive(Deserialize, ToSchema)]
struct AuthSection {
    identity: IdentitySection,
    /// A project (by id, or by name with its domain); absent or `"unscoped"`: the user's
    /// default project.
    #[serde(default)]
    #[schema(value_type = Option<AuthScope>)]
    scope: Option<Value>,
}

/// The scope cairn issues tokens for.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // the handler reads `scope` as JSON, to tell its other forms apart
struct AuthScope {
    project: ScopeProject,
}

#[derive(Deserialize, ToSchema)]
struct IdentitySection {
    /// `password` or `token`.
    #[schema(min_items = 1)]
    methods: Vec<String>,
    #[serde(default)]
    password: Option<PasswordSection>,
    #[serde(default)]
    token: Option<TokenSection>,
}

#[derive(Deserialize, ToSchema)]
struct PasswordSection {
    user: PasswordUser,
}

/// A user by id, or by name with its domain.
#[derive(Deserialize, ToSchema)]
struct PasswordUser {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainRef>,
    password: String,
}

#[derive(Deserialize, ToSchema)]
struct TokenSection {
    id: String,
}

/// The domain, by id (`default`) or name (`Default`).
#[derive(Deserialize, ToSchema)]
struct DomainRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize, ToSchema)]
struct ScopeProject {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainRef>,
}

/// Turns the body of `POST /v3/auth/tokens` into an [`AuthRequest`].
fn auth_request(body: AuthBody) -> ServiceResult<AuthRequest> {
    let ident = body.auth.identity;
    if ident.methods.is_empty() {
        return Err(bad_request(
            "Invalid input for field 'identity/methods': [] is too short.",
        ));
    }
    let unsupported = || {
        ServiceError::Unauthorized("Attempted to authenticate with an unsupported method.".into())
    };
    let method = if ident.methods.iter().any(|m| m == "password") {
        let pw = ident.password.ok_or_else(|| {
            bad_request("Invalid input for field 'identity': 'password' is a required property.")
        })?;
        let user = match (pw.user.id, pw.user.name) {
            (Some(id), _) => UserRef::Id(id),
            (None, Some(name)) => {
                let domain = pw.user.domain.ok_or_else(|| {
                    bad_request("Expecting to find domain in user. The server could not comply with the request since it is either malformed or otherwise incorrect.")
                })?;
                if !is_default_domain(&domain) {
                    // No such domain, hence no such user: the generic answer.
                    return Err(ServiceError::Unauthorized(
                        "The request you have made requires authentication.".into(),
                    ));
                }
                UserRef::Name { name }
            }
            (None, None) => {
                return Err(bad_request(
                    "Expecting to find id or name in user. The server could not comply with the request since it is either malformed or otherwise incorrect.",
                ));
            }
        };
        AuthMethod::Password {
            user,
            password: pw.user.password,
        }
    } else if ident.methods.iter().any(|m| m == "token") {
        let t = ident.token.ok_or_else(|| {
            bad_request("Invalid input for field 'identity': 'token' is a required property.")
        })?;
        AuthMethod::Token { token: t.id }
    } else {
        return Err(unsupported());
    };

    let scope = match body.auth.scope {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "unscoped" => None,
        Some(Value::Object(mut m)) => {
            if let Some(p) = m.remove("project") {
                let p: ScopeProject = serde_json::from_value(p).map_err(|e| {
                    bad_request(format!("Invalid input for field 'scope/project': {e}."))
                })?;
                Some(match (p.id, p.name) {
                    (Some(id), _) => ProjectRef::Id(id),
                    (None, Some(name)) => {
                        let domain = p.domain.ok_or_else(|| {
                            bad_request("Expecting to find domain in project. The server could not comply with the request since it is either malformed or otherwise incorrect.")
                        })?;
                        if !is_default_domain(&domain) {
                            return Err(ServiceError::Unauthorized(
                                "The request you have made requires authentication.".into(),
                            ));
                        }
                        ProjectRef::Name { name }
                    }
                    (None, None) => {
                        return Err(bad_request(
                            "Expecting to find id or name in project. The server could not comply with the request since it is either malformed or otherwise incorrect.",
                        ));
                    }
                })
            } else if m.contains_key("domain") || m.contains_key("system") {
                return Err(ServiceError::Unauthorized(
                    "cairn issues project-scoped tokens only; ask for a project scope.".into(),
                ));
            } else {
                return Err(bad_request(
                    "Invalid input for field 'scope': expected a project.",
                ));
            }
        }
        Some(_) => return Err(bad_request("Invalid input for field 'scope'.")),
    };
    Ok(AuthRequest { method, scope })
}

#[derive(Debug, Serialize, ToSchema)]
struct DomainView {
    id: String,
    name: String,
}

fn domain() -> DomainView {
    DomainView {
        id: DOMAIN_ID.into(),
        name: DOMAIN_NAME.into(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct Endpoint {
    id: String,
    /// public, internal or admin.
    interface: String,
    region: String,
    region_id: String,
    url: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct CatalogEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    id: String,
    endpoints: Vec<Endpoint>,
}

/// The service catalog: every API this daemon serves, at this daemon's URL.
fn catalog(base: &str, project_id: &str) -> Vec<CatalogEntry> {
    let entry = |ty: &str, name: &str, url: String| CatalogEntry {
        kind: ty.into(),
        name: name.into(),
        id: format!("{name}-{ty}"),
        endpoints: ["public", "internal", "admin"]
            .into_iter()
            .map(|iface| Endpoint {
                id: format!("{name}-{ty}-{iface}"),
                interface: iface.into(),
                region: REGION.into(),
                region_id: REGION.into(),
                url: url.clone(),
            })
            .collect(),
    };
    // Only what is served: clients probe every service they find (openstackclient's
    // `server list` fails on an image endpoint that answers 404). Each service has a root of
    // its own for version discovery. Block Storage is listed under its official type and the
    // aliases cinderclient (`volumev3`) and older clients (`volumev2`) look up.
    let volume = |v: &str| format!("{base}{}/{v}/{project_id}", crate::mount::VOLUME.prefix);
    vec![
        entry("identity", "keystone", format!("{base}/v3")),
        entry(
            "compute",
            "nova",
            format!("{base}{}/v2.1/{project_id}", crate::mount::COMPUTE.prefix),
        ),
        entry(
            "image",
            "glance",
            format!("{base}{}", crate::mount::IMAGE.prefix),
        ),
        entry("block-storage", "cinder", volume("v3")),
        entry("volumev3", "cinderv3", volume("v3")),
        entry("volumev2", "cinderv2", volume("v2")),
    ]
}

#[derive(Debug, Serialize, ToSchema)]
struct TokenUser {
    id: String,
    name: String,
    domain: DomainView,
    password_expires_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct TokenProject {
    id: String,
    name: String,
    domain: DomainView,
}

#[derive(Debug, Serialize, ToSchema)]
struct RoleRef {
    id: String,
    name: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct TokenView {
    methods: Vec<String>,
    user: TokenUser,
    audit_ids: Vec<String>,
    expires_at: String,
    issued_at: String,
    project: TokenProject,
    is_domain: bool,
    /// The roles on the project, and those they imply.
    roles: Vec<RoleRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    catalog: Option<Vec<CatalogEntry>>,
}

/// `{"token": {...}}`; the token itself is in `X-Subject-Token`.
#[derive(Debug, Serialize, ToSchema)]
struct TokenResponse {
    token: TokenView,
}

fn token_body(base: &str, info: &TokenInfo, with_catalog: bool) -> TokenResponse {
    let c = &info.caller;
    TokenResponse {
        token: TokenView {
            methods: info.methods.clone(),
            user: TokenUser {
                id: c.user_id.clone(),
                name: c.user_name.clone(),
                domain: domain(),
                password_expires_at: None,
            },
            audit_ids: vec![info.audit_id.clone()],
            expires_at: time_fmt::keystone(info.expires_at),
            issued_at: time_fmt::keystone(info.issued_at),
            project: TokenProject {
                id: c.project_id.clone(),
                name: c.project_name.clone(),
                domain: domain(),
            },
            is_domain: false,
            roles: info
                .role_ids
                .iter()
                .map(|r| RoleRef {
                    id: r.id.clone(),
                    name: r.name.clone(),
                })
                .collect(),
            catalog: with_catalog.then(|| catalog(base, &c.project_id)),
        },
    }
}

/// `GET /v3/auth/catalog`
#[derive(Debug, Serialize, ToSchema)]
struct CatalogResponse {
    catalog: Vec<CatalogEntry>,
    links: CollectionLinks,
}

fn with_subject(mut resp: Response, token: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(token) {
        resp.headers_mut().insert(SUBJECT_TOKEN, v);
    }
    resp
}

fn subject_token(headers: &HeaderMap) -> ServiceResult<String> {
    headers
        .get(SUBJECT_TOKEN)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| bad_request("Expecting to find X-Subject-Token in the request headers."))
}

fn token_not_found() -> ServiceError {
    ServiceError::NotFound("Could not find token.".into())
}

/// The caller, and the subject token it may look at (its own, or any for an admin).
async fn subject(state: &AppState, headers: &HeaderMap) -> ServiceResult<(String, TokenInfo)> {
    let caller = token_caller(state, headers).await?;
    let subject = subject_token(headers)?;
    let info = state
        .service
        .validate_token(&subject)
        .await
        .map_err(|e| match e {
            ServiceError::Unauthorized(_) => token_not_found(),
            other => other,
        })?;
    if !caller.is_admin() && info.caller.user_id != caller.user_id {
        return Err(ServiceError::Forbidden(
            "You are not authorized to perform the requested action: identity:validate_token."
                .into(),
        ));
    }
    Ok((subject, info))
}

#[utoipa::path(post, path = "/v3/auth/tokens", tag = "identity",
    params(("nocatalog" = Option<bool>, Query, description = "leave the service catalog out")),
    request_body(content = AuthBody, content_type = "application/json"),
    responses((status = 201, description = "token issued", body = TokenResponse,
                  headers(("X-Subject-Token" = String, description = "the token"))),
              (status = 400, description = "malformed request", body = IdentityError),
              (status = 401, description = "bad credentials or no access to the project", body = IdentityError)))]
async fn issue_token(State(s): State<AppState>, RawQuery(q): RawQuery, body: Body) -> Response {
    answer(async {
        let q = parse_query(q.as_deref())?;
        let req = auth_request(parse_body(&body)?)?;
        let issued = s.service.issue_token(req).await?;
        let body = token_body(
            &s.service.public_url(),
            &issued.info,
            !truthy(&q, "nocatalog"),
        );
        Ok(with_subject(
            json_response(StatusCode::CREATED, body),
            &issued.token,
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/auth/tokens", tag = "identity",
    params(("X-Subject-Token" = String, Header, description = "the token to validate"),
           ("nocatalog" = Option<bool>, Query, description = "leave the service catalog out")),
    responses((status = 200, description = "the subject token is valid; body as issued", body = TokenResponse,
                  headers(("X-Subject-Token" = String, description = "the token validated"))),
              (status = 404, description = "the subject token is not valid", body = IdentityError)))]
async fn validate_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    answer(async {
        let q = parse_query(q.as_deref())?;
        let (subject, info) = subject(&s, &headers).await?;
        let body = token_body(&s.service.public_url(), &info, !truthy(&q, "nocatalog"));
        Ok(with_subject(json_response(StatusCode::OK, body), &subject))
    })
    .await
}

#[utoipa::path(head, path = "/v3/auth/tokens", tag = "identity",
    params(("X-Subject-Token" = String, Header, description = "the token to check")),
    responses((status = 200, description = "the subject token is valid"),
              (status = 404, description = "the subject token is not valid")))]
async fn check_token(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let (subject, _) = subject(&s, &headers).await?;
        Ok(with_subject(StatusCode::OK.into_response(), &subject))
    })
    .await
}

#[utoipa::path(delete, path = "/v3/auth/tokens", tag = "identity",
    params(("X-Subject-Token" = String, Header, description = "the token to revoke")),
    responses((status = 204, description = "revoked"),
              (status = 403, description = "another user's token, and the caller is no admin", body = IdentityError),
              (status = 404, description = "the subject token is not valid", body = IdentityError)))]
async fn revoke_token(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let subject = subject_token(&headers)?;
        s.service.revoke_token(&caller, &subject).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

#[utoipa::path(get, path = "/v3/auth/catalog", tag = "identity",
    responses((status = 200, description = "the service catalog of the caller's token", body = CatalogResponse)))]
async fn auth_catalog(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let base = s.service.public_url();
        Ok(json_response(
            StatusCode::OK,
            CatalogResponse {
                catalog: catalog(&base, &caller.project_id),
                links: CollectionLinks {
                    this: format!("{base}/v3/auth/catalog"),
                    previous: None,
                    next: None,
                },
            },
        ))
    })
    .await
}

// ---- projects -------------------------------------------------------------------------------

/// An empty map (Keystone's `options`, `tags` and such, which cairn does not keep).
type Empty = std::collections::BTreeMap<String, String>;

#[derive(Debug, Serialize, ToSchema)]
struct ProjectView {
    id: String,
    name: String,
    description: String,
    enabled: bool,
    domain_id: String,
    parent_id: String,
    is_domain: bool,
    tags: Vec<String>,
    options: Empty,
    links: SelfLink,
}

/// `{"project": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct ProjectResponse {
    project: ProjectView,
}

/// `{"projects": [...], "links": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct ProjectsResponse {
    projects: Vec<ProjectView>,
    links: CollectionLinks,
}

fn project_view(base: &str, p: &Project) -> ProjectView {
    ProjectView {
        id: p.id.clone(),
        name: p.name.clone(),
        description: p.description.clone(),
        enabled: p.enabled,
        domain_id: DOMAIN_ID.into(),
        parent_id: DOMAIN_ID.into(),
        is_domain: false,
        tags: Vec::new(),
        options: Empty::new(),
        links: SelfLink {
            this: format!("{base}/v3/projects/{}", p.id),
        },
    }
}

fn links(base: &str, path: &str) -> CollectionLinks {
    CollectionLinks {
        this: format!("{base}{path}"),
        previous: None,
        next: None,
    }
}

/// The `domain_id` filter of a listing: every item is in `default`, so any other domain
/// lists nothing.
fn other_domain(q: &HashMap<String, String>) -> bool {
    q.get("domain_id").is_some_and(|d| d != DOMAIN_ID)
}

#[utoipa::path(get, path = "/v3/projects", tag = "identity",
    params(("name" = Option<String>, Query, description = "only the project of this name"),
           ("enabled" = Option<bool>, Query, description = "only enabled (or disabled) projects"),
           ("domain_id" = Option<String>, Query, description = "only projects of this domain (always `default`)")),
    responses((status = 200, description = "every project (an admin's token)", body = ProjectsResponse),
              (status = 403, description = "not an admin", body = IdentityError)))]
async fn list_projects(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let q = parse_query(q.as_deref())?;
        let enabled = bool_filter(&q, "enabled")?;
        let projects = s.service.list_projects(&caller).await?;
        let base = s.service.public_url();
        let items = projects
            .iter()
            .filter(|p| q.get("name").is_none_or(|n| *n == p.name))
            .filter(|p| enabled.is_none_or(|e| e == p.enabled))
            .filter(|_| !other_domain(&q) && !truthy(&q, "is_domain"))
            .map(|p| project_view(&base, p))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            ProjectsResponse {
                projects: items,
                links: links(&base, "/v3/projects"),
            },
        ))
    })
    .await
}

/// What `POST /v3/projects` takes.
#[derive(Deserialize, ToSchema)]
struct ProjectBody {
    project: NewProjectBody,
}

#[derive(Deserialize, ToSchema)]
struct NewProjectBody {
    #[schema(min_length = 1, max_length = 64)]
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    domain_id: Option<String>,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    is_domain: Option<bool>,
}

#[utoipa::path(post, path = "/v3/projects", tag = "identity",
    request_body(content = ProjectBody, content_type = "application/json"),
    responses((status = 201, description = "created", body = ProjectResponse),
              (status = 400, description = "malformed request", body = IdentityError),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 409, description = "a project of that name exists", body = IdentityError)))]
async fn create_project(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let b: ProjectBody = parse_body(&body)?;
        let p = b.project;
        if p.domain_id.as_deref().is_some_and(|d| d != DOMAIN_ID) {
            return Err(bad_request(
                "cairn has one domain, 'default': domain_id must be 'default'.",
            ));
        }
        if p.parent_id.as_deref().is_some_and(|d| d != DOMAIN_ID) {
            return Err(bad_request(
                "cairn projects are not nested: parent_id must be 'default' or absent.",
            ));
        }
        if p.is_domain == Some(true) {
            return Err(bad_request(
                "cairn has one domain: is_domain must be false.",
            ));
        }
        let created = s
            .service
            .create_project(
                &caller,
                NewProject {
                    name: p.name,
                    description: p.description.unwrap_or_default(),
                    enabled: p.enabled.unwrap_or(true),
                },
            )
            .await?;
        Ok(json_response(
            StatusCode::CREATED,
            ProjectResponse {
                project: project_view(&s.service.public_url(), &created),
            },
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/projects/{project_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id (or name)")),
    responses((status = 200, description = "the project (an admin's token, or one scoped to it)", body = ProjectResponse),
              (status = 403, description = "another project, and not an admin", body = IdentityError),
              (status = 404, description = "no such project", body = IdentityError)))]
async fn get_project(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let p = s.service.get_project(&caller, &project_id).await?;
        Ok(json_response(
            StatusCode::OK,
            ProjectResponse {
                project: project_view(&s.service.public_url(), &p),
            },
        ))
    })
    .await
}

#[utoipa::path(delete, path = "/v3/projects/{project_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 204, description = "deleted, with its role assignments and tokens"),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 404, description = "no such project", body = IdentityError),
              (status = 409, description = "the project still owns volumes or servers, or it holds the last admin", body = IdentityError)))]
async fn delete_project(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        s.service.delete_project(&caller, &project_id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

// ---- users ----------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
struct UserView {
    id: String,
    name: String,
    domain_id: String,
    enabled: bool,
    password_expires_at: Option<String>,
    options: Empty,
    links: SelfLink,
    /// Absent when the user has none, as Keystone leaves it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    default_project_id: Option<String>,
}

/// `{"user": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct UserResponse {
    user: UserView,
}

/// `{"users": [...], "links": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct UsersResponse {
    users: Vec<UserView>,
    links: CollectionLinks,
}

fn user_view(base: &str, u: &User) -> UserView {
    UserView {
        id: u.id.clone(),
        name: u.name.clone(),
        domain_id: DOMAIN_ID.into(),
        enabled: u.enabled,
        password_expires_at: None,
        options: Empty::new(),
        links: SelfLink {
            this: format!("{base}/v3/users/{}", u.id),
        },
        default_project_id: u.default_project_id.clone(),
    }
}

#[utoipa::path(get, path = "/v3/users", tag = "identity",
    params(("name" = Option<String>, Query, description = "only the user of this name"),
           ("enabled" = Option<bool>, Query, description = "only enabled (or disabled) users"),
           ("domain_id" = Option<String>, Query, description = "only users of this domain (always `default`)")),
    responses((status = 200, description = "every user (an admin's token)", body = UsersResponse),
              (status = 403, description = "not an admin", body = IdentityError)))]
async fn list_users(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let q = parse_query(q.as_deref())?;
        let enabled = bool_filter(&q, "enabled")?;
        let users = s.service.list_users(&caller).await?;
        let base = s.service.public_url();
        let items = users
            .iter()
            .filter(|u| q.get("name").is_none_or(|n| *n == u.name))
            .filter(|u| enabled.is_none_or(|e| e == u.enabled))
            .filter(|_| !other_domain(&q))
            .map(|u| user_view(&base, u))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            UsersResponse {
                users: items,
                links: links(&base, "/v3/users"),
            },
        ))
    })
    .await
}

/// What `POST /v3/users` takes.
#[derive(Deserialize, ToSchema)]
struct UserBody {
    user: NewUserBody,
}

#[derive(Deserialize, ToSchema)]
struct NewUserBody {
    #[schema(min_length = 1, max_length = 255)]
    name: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    default_project_id: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    domain_id: Option<String>,
}

#[utoipa::path(post, path = "/v3/users", tag = "identity",
    request_body(content = UserBody, content_type = "application/json"),
    responses((status = 201, description = "created", body = UserResponse),
              (status = 400, description = "malformed request, or no such default project", body = IdentityError),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 409, description = "a user of that name exists", body = IdentityError)))]
async fn create_user(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let b: UserBody = parse_body(&body)?;
        let u = b.user;
        if u.domain_id.as_deref().is_some_and(|d| d != DOMAIN_ID) {
            return Err(bad_request(
                "cairn has one domain, 'default': domain_id must be 'default'.",
            ));
        }
        let created = s
            .service
            .create_user(
                &caller,
                NewUser {
                    name: u.name,
                    password: u.password,
                    default_project_id: u.default_project_id,
                    enabled: u.enabled.unwrap_or(true),
                },
            )
            .await?;
        Ok(json_response(
            StatusCode::CREATED,
            UserResponse {
                user: user_view(&s.service.public_url(), &created),
            },
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/users/{user_id}", tag = "identity",
    params(("user_id" = String, Path, description = "user id (or name)")),
    responses((status = 200, description = "the user (an admin's token, or the user's own)", body = UserResponse),
              (status = 403, description = "another user, and not an admin", body = IdentityError),
              (status = 404, description = "no such user", body = IdentityError)))]
async fn get_user(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let u = s.service.get_user(&caller, &user_id).await?;
        Ok(json_response(
            StatusCode::OK,
            UserResponse {
                user: user_view(&s.service.public_url(), &u),
            },
        ))
    })
    .await
}

#[utoipa::path(delete, path = "/v3/users/{user_id}", tag = "identity",
    params(("user_id" = String, Path, description = "user id")),
    responses((status = 204, description = "deleted, with its role assignments and tokens"),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 404, description = "no such user", body = IdentityError),
              (status = 409, description = "the user is the last admin", body = IdentityError)))]
async fn delete_user(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        s.service.delete_user(&caller, &user_id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// The projects `user_id` holds a role on (the caller's own, or any user's for an admin).
async fn user_projects(
    s: &AppState,
    caller: &Caller,
    user_id: &str,
) -> ServiceResult<Vec<ProjectView>> {
    let assignments = s
        .service
        .list_role_assignments(caller, None, Some(user_id))
        .await?;
    let base = s.service.public_url();
    let mut ids: Vec<&str> = assignments.iter().map(|a| a.project_id.as_str()).collect();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match s.service.get_project(caller, id).await {
            Ok(p) => out.push(project_view(&base, &p)),
            // Deleted meanwhile.
            Err(ServiceError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v3/users/{user_id}/projects", tag = "identity",
    params(("user_id" = String, Path, description = "user id")),
    responses((status = 200, description = "the projects the user holds a role on (an admin's token, or the user's own)", body = ProjectsResponse),
              (status = 403, description = "another user, and not an admin", body = IdentityError)))]
async fn list_user_projects(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let items = user_projects(&s, &caller, &user_id).await?;
        let base = s.service.public_url();
        let path = format!("/v3/users/{user_id}/projects");
        Ok(json_response(
            StatusCode::OK,
            ProjectsResponse {
                projects: items,
                links: links(&base, &path),
            },
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/auth/projects", tag = "identity",
    responses((status = 200, description = "the projects the caller may scope to", body = ProjectsResponse)))]
async fn auth_projects(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let items = user_projects(&s, &caller, &caller.user_id).await?;
        let base = s.service.public_url();
        Ok(json_response(
            StatusCode::OK,
            ProjectsResponse {
                projects: items,
                links: links(&base, "/v3/auth/projects"),
            },
        ))
    })
    .await
}

// ---- roles and grants -----------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
struct RoleView {
    id: String,
    /// reader, member or admin.
    name: String,
    domain_id: Option<String>,
    description: Option<String>,
    options: Empty,
    links: SelfLink,
}

/// `{"role": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct RoleResponse {
    role: RoleView,
}

/// `{"roles": [...], "links": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct RolesResponse {
    roles: Vec<RoleView>,
    links: CollectionLinks,
}

fn role_view(base: &str, r: &Named) -> RoleView {
    RoleView {
        id: r.id.clone(),
        name: r.name.clone(),
        domain_id: None,
        description: None,
        options: Empty::new(),
        links: SelfLink {
            this: format!("{base}/v3/roles/{}", r.id),
        },
    }
}

#[utoipa::path(get, path = "/v3/roles", tag = "identity",
    params(("name" = Option<String>, Query, description = "only the role of this name")),
    responses((status = 200, description = "reader, member, admin (an admin's token)", body = RolesResponse),
              (status = 403, description = "not an admin", body = IdentityError)))]
async fn list_roles(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let q = parse_query(q.as_deref())?;
        let roles = s.service.list_roles(&caller).await?;
        let base = s.service.public_url();
        let items = roles
            .iter()
            .filter(|r| q.get("name").is_none_or(|n| *n == r.name))
            // Every cairn role is global: a domain-specific listing is empty.
            .filter(|_| !q.contains_key("domain_id"))
            .map(|r| role_view(&base, r))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            RolesResponse {
                roles: items,
                links: links(&base, "/v3/roles"),
            },
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/roles/{role_id}", tag = "identity",
    params(("role_id" = String, Path, description = "role id (or name)")),
    responses((status = 200, description = "the role (an admin's token)", body = RoleResponse),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 404, description = "no such role", body = IdentityError)))]
async fn get_role(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(role_id): Path<String>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let roles = s.service.list_roles(&caller).await?;
        let r = roles
            .iter()
            .find(|r| r.id == role_id)
            .or_else(|| roles.iter().find(|r| r.name == role_id))
            .ok_or_else(|| ServiceError::NotFound(format!("Could not find role: {role_id}.")))?;
        Ok(json_response(
            StatusCode::OK,
            RoleResponse {
                role: role_view(&s.service.public_url(), r),
            },
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/projects/{project_id}/users/{user_id}/roles", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id")),
    responses((status = 200, description = "the user's roles on the project (an admin's token)", body = RolesResponse),
              (status = 403, description = "not an admin", body = IdentityError)))]
async fn list_grants(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((project_id, user_id)): Path<(String, String)>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let assignments = s
            .service
            .list_role_assignments(&caller, Some(&project_id), Some(&user_id))
            .await?;
        let base = s.service.public_url();
        let items = assignments
            .iter()
            .map(|a| role_view(&base, &a.role))
            .collect();
        let path = format!("/v3/projects/{project_id}/users/{user_id}/roles");
        Ok(json_response(
            StatusCode::OK,
            RolesResponse {
                roles: items,
                links: links(&base, &path),
            },
        ))
    })
    .await
}

#[utoipa::path(put, path = "/v3/projects/{project_id}/users/{user_id}/roles/{role_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id"),
           ("role_id" = String, Path, description = "role id")),
    responses((status = 204, description = "granted (granting again changes nothing)"),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 404, description = "no such project, user or role", body = IdentityError)))]
async fn grant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((project_id, user_id, role_id)): Path<(String, String, String)>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        s.service
            .grant_role(&caller, &project_id, &user_id, &role_id)
            .await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// 204 when the user holds the role on the project, else 404.
async fn grant_exists(
    s: &AppState,
    headers: &HeaderMap,
    (project_id, user_id, role_id): (String, String, String),
) -> ServiceResult<Response> {
    let caller = token_caller(s, headers).await?;
    let held = s
        .service
        .list_role_assignments(&caller, Some(&project_id), Some(&user_id))
        .await?
        .iter()
        .any(|a| a.role.id == role_id);
    if held {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ServiceError::NotFound(format!(
            "Could not find role assignment with role: {role_id}, user or group: {user_id}, \
             project, domain, or system: {project_id}."
        )))
    }
}

#[utoipa::path(get, path = "/v3/projects/{project_id}/users/{user_id}/roles/{role_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id"),
           ("role_id" = String, Path, description = "role id")),
    responses((status = 204, description = "the user holds the role on the project"),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 404, description = "no such grant", body = IdentityError)))]
async fn check_grant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(ids): Path<(String, String, String)>,
) -> Response {
    answer(grant_exists(&s, &headers, ids)).await
}

#[utoipa::path(head, path = "/v3/projects/{project_id}/users/{user_id}/roles/{role_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id"),
           ("role_id" = String, Path, description = "role id")),
    responses((status = 204, description = "the user holds the role on the project"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such grant")))]
async fn head_grant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(ids): Path<(String, String, String)>,
) -> Response {
    answer(grant_exists(&s, &headers, ids)).await
}

#[utoipa::path(delete, path = "/v3/projects/{project_id}/users/{user_id}/roles/{role_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id"),
           ("role_id" = String, Path, description = "role id")),
    responses((status = 204, description = "revoked"),
              (status = 403, description = "not an admin", body = IdentityError),
              (status = 404, description = "no such project, user, role or grant", body = IdentityError),
              (status = 409, description = "it is the last admin role assignment", body = IdentityError)))]
async fn revoke_grant(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((project_id, user_id, role_id)): Path<(String, String, String)>,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        s.service
            .revoke_role(&caller, &project_id, &user_id, &role_id)
            .await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

#[utoipa::path(get, path = "/v3/role_assignments", tag = "identity",
    params(("user.id" = Option<String>, Query, description = "only this user's assignments"),
           ("scope.project.id" = Option<String>, Query, description = "only assignments on this project"),
           ("role.id" = Option<String>, Query, description = "only this role"),
           ("include_names" = Option<bool>, Query, description = "add names (and domains) to role, user and project")),
    responses((status = 200, description = "role assignments (an admin's token; others see their own with ?user.id=<self>)", body = RoleAssignmentsResponse),
              (status = 403, description = "not an admin", body = IdentityError)))]
async fn list_role_assignments(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let q = parse_query(raw.as_deref())?;
        // cairn has user grants on projects only: group, domain and system filters match none.
        let none = [
            "group.id",
            "scope.domain.id",
            "scope.system",
            "scope.OS-INHERIT:inherited_to",
        ]
        .iter()
        .any(|k| q.contains_key(*k));
        let mut assignments = if none {
            Vec::new()
        } else {
            s.service
                .list_role_assignments(
                    &caller,
                    q.get("scope.project.id").map(String::as_str),
                    q.get("user.id").map(String::as_str),
                )
                .await?
        };
        if let Some(r) = q.get("role.id") {
            assignments.retain(|a| a.role.id == *r);
        }
        let base = s.service.public_url();
        let names = truthy(&q, "include_names");
        let (users, projects) = if names && !assignments.is_empty() {
            (
                s.service.list_users(&caller).await?,
                s.service.list_projects(&caller).await?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let items = assignments
            .iter()
            .map(|a| {
                let user = users.iter().find(|u| u.id == a.user_id);
                let project = projects.iter().find(|p| p.id == a.project_id);
                RoleAssignment {
                    role: AssignmentRef {
                        id: a.role.id.clone(),
                        name: names.then(|| a.role.name.clone()),
                        domain: None,
                    },
                    user: AssignmentRef {
                        id: a.user_id.clone(),
                        name: user.map(|u| u.name.clone()),
                        domain: user.map(|_| domain()),
                    },
                    scope: AssignmentScope {
                        project: AssignmentRef {
                            id: a.project_id.clone(),
                            name: project.map(|p| p.name.clone()),
                            domain: project.map(|_| domain()),
                        },
                    },
                    links: AssignmentLink {
                        assignment: format!(
                            "{base}/v3/projects/{}/users/{}/roles/{}",
                            a.project_id, a.user_id, a.role.id
                        ),
                    },
                }
            })
            .collect();
        let path = match &raw {
            Some(r) if !r.is_empty() => format!("/v3/role_assignments?{r}"),
            _ => "/v3/role_assignments".to_owned(),
        };
        Ok(json_response(
            StatusCode::OK,
            RoleAssignmentsResponse {
                role_assignments: items,
                links: links(&base, &path),
            },
        ))
    })
    .await
}

/// A role, user or project in an assignment: names (and domains) with `include_names`.
#[derive(Debug, Serialize, ToSchema)]
struct AssignmentRef {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<DomainView>,
}

#[derive(Debug, Serialize, ToSchema)]
struct AssignmentScope {
    project: AssignmentRef,
}

#[derive(Debug, Serialize, ToSchema)]
struct AssignmentLink {
    assignment: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct RoleAssignment {
    role: AssignmentRef,
    user: AssignmentRef,
    scope: AssignmentScope,
    links: AssignmentLink,
}

/// `{"role_assignments": [...], "links": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct RoleAssignmentsResponse {
    role_assignments: Vec<RoleAssignment>,
    links: CollectionLinks,
}

// ---- domains --------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
struct DomainDetail {
    id: String,
    name: String,
    description: String,
    enabled: bool,
    tags: Vec<String>,
    options: Empty,
    links: SelfLink,
}

/// `{"domain": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct DomainResponse {
    domain: DomainDetail,
}

/// `{"domains": [...], "links": {...}}`
#[derive(Debug, Serialize, ToSchema)]
struct DomainsResponse {
    domains: Vec<DomainDetail>,
    links: CollectionLinks,
}

fn domain_view(base: &str) -> DomainDetail {
    DomainDetail {
        id: DOMAIN_ID.into(),
        name: DOMAIN_NAME.into(),
        description: "The default domain".into(),
        enabled: true,
        tags: Vec::new(),
        options: Empty::new(),
        links: SelfLink {
            this: format!("{base}/v3/domains/{DOMAIN_ID}"),
        },
    }
}

#[utoipa::path(get, path = "/v3/domains", tag = "identity",
    params(("name" = Option<String>, Query, description = "only the domain of this name"),
           ("enabled" = Option<bool>, Query, description = "only enabled (or disabled) domains")),
    responses((status = 200, description = "the one domain, `default`", body = DomainsResponse)))]
async fn list_domains(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    answer(async {
        token_caller(&s, &headers).await?;
        let q = parse_query(q.as_deref())?;
        let base = s.service.public_url();
        let enabled = bool_filter(&q, "enabled")?;
        let items = if q.get("name").is_none_or(|n| n == DOMAIN_NAME) && enabled != Some(false) {
            vec![domain_view(&base)]
        } else {
            Vec::new()
        };
        Ok(json_response(
            StatusCode::OK,
            DomainsResponse {
                domains: items,
                links: links(&base, "/v3/domains"),
            },
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/domains/{domain_id}", tag = "identity",
    params(("domain_id" = String, Path, description = "`default`")),
    responses((status = 200, description = "the domain", body = DomainResponse),
              (status = 404, description = "no such domain", body = IdentityError)))]
async fn get_domain(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(domain_id): Path<String>,
) -> Response {
    answer(async {
        token_caller(&s, &headers).await?;
        if domain_id != DOMAIN_ID {
            return Err(ServiceError::NotFound(format!(
                "Could not find domain: {domain_id}."
            )));
        }
        Ok(json_response(
            StatusCode::OK,
            DomainResponse {
                domain: domain_view(&s.service.public_url()),
            },
        ))
    })
    .await
}
