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
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use utoipa_axum::{router::OpenApiRouter, routes};

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
        ServiceError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
    };
    let body = json!({"error": {
        "code": status.as_u16(),
        "title": status.canonical_reason().unwrap_or("Error"),
        "message": message,
    }});
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

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

// ---- discovery ------------------------------------------------------------------------------

fn version_doc(base: &str) -> Value {
    json!({
        "id": VERSION_ID,
        "status": "stable",
        "updated": VERSION_UPDATED,
        "links": [{"rel": "self", "href": format!("{base}/v3/")}],
        "media-types": [{
            "base": "application/json",
            "type": "application/vnd.openstack.identity-v3+json",
        }],
    })
}

#[utoipa::path(get, path = "/", tag = "identity",
    responses((status = 300, description = "Keystone version list (`{\"versions\": {\"values\": [...]}}`)")))]
async fn versions(State(s): State<AppState>) -> Response {
    let base = s.service.public_url();
    json_response(
        StatusCode::MULTIPLE_CHOICES,
        json!({"versions": {"values": [version_doc(&base)]}}),
    )
}

#[utoipa::path(get, path = "/v3", tag = "identity",
    responses((status = 200, description = "Keystone v3 version document")))]
async fn version_v3(State(s): State<AppState>) -> Response {
    json_response(
        StatusCode::OK,
        json!({"version": version_doc(&s.service.public_url())}),
    )
}

#[utoipa::path(get, path = "/v3/", tag = "identity",
    responses((status = 200, description = "Keystone v3 version document")))]
async fn version_v3_slash(state: State<AppState>) -> Response {
    version_v3(state).await
}

// ---- tokens ---------------------------------------------------------------------------------

#[derive(Deserialize)]
struct AuthBody {
    auth: AuthSection,
}

#[derive(Deserialize)]
struct AuthSection {
    identity: IdentitySection,
    #[serde(default)]
    scope: Option<Value>,
}

#[derive(Deserialize)]
struct IdentitySection {
    methods: Vec<String>,
    #[serde(default)]
    password: Option<PasswordSection>,
    #[serde(default)]
    token: Option<TokenSection>,
}

#[derive(Deserialize)]
struct PasswordSection {
    user: PasswordUser,
}

#[derive(Deserialize)]
struct PasswordUser {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainRef>,
    password: String,
}

#[derive(Deserialize)]
struct TokenSection {
    id: String,
}

#[derive(Deserialize)]
struct DomainRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
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

fn domain() -> Value {
    json!({"id": DOMAIN_ID, "name": DOMAIN_NAME})
}

/// The service catalog: every API this daemon serves, at this daemon's URL.
fn catalog(base: &str, project_id: &str) -> Value {
    let entry = |ty: &str, name: &str, url: String| {
        let endpoints: Vec<Value> = ["public", "internal", "admin"]
            .into_iter()
            .map(|iface| {
                json!({
                    "id": format!("{name}-{ty}-{iface}"),
                    "interface": iface,
                    "region": REGION,
                    "region_id": REGION,
                    "url": url,
                })
            })
            .collect();
        json!({"type": ty, "name": name, "id": format!("{name}-{ty}"), "endpoints": endpoints})
    };
    // Only what is served: clients probe every service they find (openstackclient's
    // `server list` fails on an image endpoint that answers 404). Block storage and images
    // join when their APIs do.
    json!([
        entry("identity", "keystone", format!("{base}/v3")),
        entry("compute", "nova", format!("{base}/v2.1/{project_id}")),
    ])
}

fn token_body(base: &str, info: &TokenInfo, with_catalog: bool) -> Value {
    let c = &info.caller;
    let mut token = json!({
        "methods": info.methods,
        "user": {
            "id": c.user_id,
            "name": c.user_name,
            "domain": domain(),
            "password_expires_at": null,
        },
        "audit_ids": [info.audit_id],
        "expires_at": time_fmt::keystone(info.expires_at),
        "issued_at": time_fmt::keystone(info.issued_at),
        "project": {"id": c.project_id, "name": c.project_name, "domain": domain()},
        "is_domain": false,
        "roles": info.role_ids,
    });
    if with_catalog {
        token["catalog"] = catalog(base, &c.project_id);
    }
    json!({"token": token})
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
    responses((status = 201, description = "token issued: secret in `X-Subject-Token`, body `{\"token\": {...}}`"),
              (status = 400, description = "malformed request"),
              (status = 401, description = "bad credentials or no access to the project")))]
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
    params(("X-Auth-Token" = String, Header, description = "the caller's token"),
           ("X-Subject-Token" = String, Header, description = "the token to validate"),
           ("nocatalog" = Option<bool>, Query, description = "leave the service catalog out")),
    responses((status = 200, description = "the subject token is valid; body as issued"),
              (status = 401, description = "the caller's token is not valid"),
              (status = 404, description = "the subject token is not valid")))]
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
    params(("X-Auth-Token" = String, Header, description = "the caller's token"),
           ("X-Subject-Token" = String, Header, description = "the token to check")),
    responses((status = 200, description = "the subject token is valid"),
              (status = 401, description = "the caller's token is not valid"),
              (status = 404, description = "the subject token is not valid")))]
async fn check_token(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let (subject, _) = subject(&s, &headers).await?;
        Ok(with_subject(StatusCode::OK.into_response(), &subject))
    })
    .await
}

#[utoipa::path(delete, path = "/v3/auth/tokens", tag = "identity",
    params(("X-Auth-Token" = String, Header, description = "the caller's token"),
           ("X-Subject-Token" = String, Header, description = "the token to revoke")),
    responses((status = 204, description = "revoked"),
              (status = 401, description = "the caller's token is not valid"),
              (status = 403, description = "another user's token, and the caller is no admin"),
              (status = 404, description = "the subject token is not valid")))]
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
    params(("X-Auth-Token" = String, Header, description = "the caller's token")),
    responses((status = 200, description = "the service catalog of the caller's token")))]
async fn auth_catalog(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let base = s.service.public_url();
        Ok(json_response(
            StatusCode::OK,
            json!({
                "catalog": catalog(&base, &caller.project_id),
                "links": {"self": format!("{base}/v3/auth/catalog"), "previous": null, "next": null},
            }),
        ))
    })
    .await
}

// ---- projects -------------------------------------------------------------------------------

fn project_view(base: &str, p: &Project) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "enabled": p.enabled,
        "domain_id": DOMAIN_ID,
        "parent_id": DOMAIN_ID,
        "is_domain": false,
        "tags": [],
        "options": {},
        "links": {"self": format!("{base}/v3/projects/{}", p.id)},
    })
}

fn collection(base: &str, key: &str, path: &str, items: Vec<Value>) -> Response {
    json_response(
        StatusCode::OK,
        json!({
            key: items,
            "links": {"self": format!("{base}{path}"), "previous": null, "next": null},
        }),
    )
}

/// The `domain_id` filter of a listing: every item is in `default`, so any other domain
/// lists nothing.
fn other_domain(q: &HashMap<String, String>) -> bool {
    q.get("domain_id").is_some_and(|d| d != DOMAIN_ID)
}

#[utoipa::path(get, path = "/v3/projects", tag = "identity",
    params(("X-Auth-Token" = String, Header, description = "an admin's token"),
           ("name" = Option<String>, Query, description = "only the project of this name"),
           ("enabled" = Option<bool>, Query, description = "only enabled (or disabled) projects"),
           ("domain_id" = Option<String>, Query, description = "only projects of this domain (always `default`)")),
    responses((status = 200, description = "`{\"projects\": [...], \"links\": {...}}`"),
              (status = 403, description = "not an admin")))]
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
        Ok(collection(&base, "projects", "/v3/projects", items))
    })
    .await
}

#[derive(Deserialize)]
struct ProjectBody {
    project: NewProjectBody,
}

#[derive(Deserialize)]
struct NewProjectBody {
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
    params(("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 201, description = "`{\"project\": {...}}`"),
              (status = 400, description = "malformed request"),
              (status = 403, description = "not an admin"),
              (status = 409, description = "a project of that name exists")))]
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
            json!({"project": project_view(&s.service.public_url(), &created)}),
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/projects/{project_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id (or name)"),
           ("X-Auth-Token" = String, Header, description = "an admin's token, or one scoped to this project")),
    responses((status = 200, description = "`{\"project\": {...}}`"),
              (status = 403, description = "another project, and not an admin"),
              (status = 404, description = "no such project")))]
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
            json!({"project": project_view(&s.service.public_url(), &p)}),
        ))
    })
    .await
}

#[utoipa::path(delete, path = "/v3/projects/{project_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 204, description = "deleted, with its role assignments and tokens"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such project"),
              (status = 409, description = "the project still owns volumes, servers, images or filesystems")))]
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

fn user_view(base: &str, u: &User) -> Value {
    let mut v = json!({
        "id": u.id,
        "name": u.name,
        "domain_id": DOMAIN_ID,
        "enabled": u.enabled,
        "password_expires_at": null,
        "options": {},
        "links": {"self": format!("{base}/v3/users/{}", u.id)},
    });
    // Keystone leaves the key out when there is no default project.
    if let Some(p) = &u.default_project_id {
        v["default_project_id"] = json!(p);
    }
    v
}

#[utoipa::path(get, path = "/v3/users", tag = "identity",
    params(("X-Auth-Token" = String, Header, description = "an admin's token"),
           ("name" = Option<String>, Query, description = "only the user of this name"),
           ("enabled" = Option<bool>, Query, description = "only enabled (or disabled) users"),
           ("domain_id" = Option<String>, Query, description = "only users of this domain (always `default`)")),
    responses((status = 200, description = "`{\"users\": [...], \"links\": {...}}`"),
              (status = 403, description = "not an admin")))]
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
        Ok(collection(&base, "users", "/v3/users", items))
    })
    .await
}

#[derive(Deserialize)]
struct UserBody {
    user: NewUserBody,
}

#[derive(Deserialize)]
struct NewUserBody {
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
    params(("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 201, description = "`{\"user\": {...}}`"),
              (status = 400, description = "malformed request, or no such default project"),
              (status = 403, description = "not an admin"),
              (status = 409, description = "a user of that name exists")))]
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
            json!({"user": user_view(&s.service.public_url(), &created)}),
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/users/{user_id}", tag = "identity",
    params(("user_id" = String, Path, description = "user id (or name)"),
           ("X-Auth-Token" = String, Header, description = "an admin's token, or this user's")),
    responses((status = 200, description = "`{\"user\": {...}}`"),
              (status = 403, description = "another user, and not an admin"),
              (status = 404, description = "no such user")))]
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
            json!({"user": user_view(&s.service.public_url(), &u)}),
        ))
    })
    .await
}

#[utoipa::path(delete, path = "/v3/users/{user_id}", tag = "identity",
    params(("user_id" = String, Path, description = "user id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 204, description = "deleted, with its role assignments and tokens"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such user")))]
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
async fn user_projects(s: &AppState, caller: &Caller, user_id: &str) -> ServiceResult<Vec<Value>> {
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
    params(("user_id" = String, Path, description = "user id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token, or this user's")),
    responses((status = 200, description = "`{\"projects\": [...]}`: the projects the user holds a role on"),
              (status = 403, description = "another user, and not an admin")))]
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
        Ok(collection(&base, "projects", &path, items))
    })
    .await
}

#[utoipa::path(get, path = "/v3/auth/projects", tag = "identity",
    params(("X-Auth-Token" = String, Header, description = "the caller's token")),
    responses((status = 200, description = "`{\"projects\": [...]}`: the projects the caller may scope to")))]
async fn auth_projects(State(s): State<AppState>, headers: HeaderMap) -> Response {
    answer(async {
        let caller = token_caller(&s, &headers).await?;
        let items = user_projects(&s, &caller, &caller.user_id).await?;
        let base = s.service.public_url();
        Ok(collection(&base, "projects", "/v3/auth/projects", items))
    })
    .await
}

// ---- roles and grants -----------------------------------------------------------------------

fn role_view(base: &str, r: &Named) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "domain_id": null,
        "description": null,
        "options": {},
        "links": {"self": format!("{base}/v3/roles/{}", r.id)},
    })
}

#[utoipa::path(get, path = "/v3/roles", tag = "identity",
    params(("X-Auth-Token" = String, Header, description = "an admin's token"),
           ("name" = Option<String>, Query, description = "only the role of this name")),
    responses((status = 200, description = "`{\"roles\": [...], \"links\": {...}}`: reader, member, admin"),
              (status = 403, description = "not an admin")))]
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
        Ok(collection(&base, "roles", "/v3/roles", items))
    })
    .await
}

#[utoipa::path(get, path = "/v3/roles/{role_id}", tag = "identity",
    params(("role_id" = String, Path, description = "role id (or name)"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 200, description = "`{\"role\": {...}}`"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such role")))]
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
            json!({"role": role_view(&s.service.public_url(), r)}),
        ))
    })
    .await
}

#[utoipa::path(get, path = "/v3/projects/{project_id}/users/{user_id}/roles", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 200, description = "`{\"roles\": [...], \"links\": {...}}`: the user's roles on the project"),
              (status = 403, description = "not an admin")))]
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
        Ok(collection(&base, "roles", &path, items))
    })
    .await
}

#[utoipa::path(put, path = "/v3/projects/{project_id}/users/{user_id}/roles/{role_id}", tag = "identity",
    params(("project_id" = String, Path, description = "project id"),
           ("user_id" = String, Path, description = "user id"),
           ("role_id" = String, Path, description = "role id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 204, description = "granted (granting again changes nothing)"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such project, user or role")))]
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
           ("role_id" = String, Path, description = "role id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 204, description = "the user holds the role on the project"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such grant")))]
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
           ("role_id" = String, Path, description = "role id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
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
           ("role_id" = String, Path, description = "role id"),
           ("X-Auth-Token" = String, Header, description = "an admin's token")),
    responses((status = 204, description = "revoked"),
              (status = 403, description = "not an admin"),
              (status = 404, description = "no such project, user, role or grant")))]
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
    params(("X-Auth-Token" = String, Header, description = "an admin's token"),
           ("user.id" = Option<String>, Query, description = "only this user's assignments"),
           ("scope.project.id" = Option<String>, Query, description = "only assignments on this project"),
           ("role.id" = Option<String>, Query, description = "only this role"),
           ("include_names" = Option<bool>, Query, description = "add names (and domains) to role, user and project")),
    responses((status = 200, description = "`{\"role_assignments\": [...], \"links\": {...}}`"),
              (status = 403, description = "not an admin")))]
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
                let mut role = json!({"id": a.role.id});
                let mut user = json!({"id": a.user_id});
                let mut project = json!({"id": a.project_id});
                if names {
                    role["name"] = json!(a.role.name);
                    if let Some(u) = users.iter().find(|u| u.id == a.user_id) {
                        user["name"] = json!(u.name);
                        user["domain"] = domain();
                    }
                    if let Some(p) = projects.iter().find(|p| p.id == a.project_id) {
                        project["name"] = json!(p.name);
                        project["domain"] = domain();
                    }
                }
                json!({
                    "role": role,
                    "user": user,
                    "scope": {"project": project},
                    "links": {"assignment": format!(
                        "{base}/v3/projects/{}/users/{}/roles/{}",
                        a.project_id, a.user_id, a.role.id
                    )},
                })
            })
            .collect();
        let path = match &raw {
            Some(r) if !r.is_empty() => format!("/v3/role_assignments?{r}"),
            _ => "/v3/role_assignments".to_owned(),
        };
        Ok(collection(&base, "role_assignments", &path, items))
    })
    .await
}

// ---- domains --------------------------------------------------------------------------------

fn domain_view(base: &str) -> Value {
    json!({
        "id": DOMAIN_ID,
        "name": DOMAIN_NAME,
        "description": "The default domain",
        "enabled": true,
        "tags": [],
        "options": {},
        "links": {"self": format!("{base}/v3/domains/{DOMAIN_ID}")},
    })
}

#[utoipa::path(get, path = "/v3/domains", tag = "identity",
    params(("X-Auth-Token" = String, Header, description = "any valid token"),
           ("name" = Option<String>, Query, description = "only the domain of this name")),
    responses((status = 200, description = "`{\"domains\": [...]}`: the one domain, `default`")))]
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
        Ok(collection(&base, "domains", "/v3/domains", items))
    })
    .await
}

#[utoipa::path(get, path = "/v3/domains/{domain_id}", tag = "identity",
    params(("domain_id" = String, Path, description = "`default`"),
           ("X-Auth-Token" = String, Header, description = "any valid token")),
    responses((status = 200, description = "`{\"domain\": {...}}`"),
              (status = 404, description = "no such domain")))]
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
            json!({"domain": domain_view(&s.service.public_url())}),
        ))
    })
    .await
}
