//! Clients of the external services a daemon may be pointed at: a Glance-compatible image
//! service (`--image-service-url`: where volumes are uploaded to) and a Keystone-compatible
//! identity service (`--identity-url`: where tokens this daemon did not issue are checked).
//!
//! Both are called with the caller's own token, as Cinder calls Glance. The HTTP client is
//! `ureq` (blocking), run on blocking threads; an upload's body comes from the store through
//! a bounded channel, so memory stays at a few pieces whatever the image's size.

use std::io::Read;
use std::time::Duration;

use admin_api::model::{Caller, Named, Role, ServiceError, ServiceResult, TokenInfo};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A connection that takes this long to make, or a response this long to come, is a
/// failure to communicate (the upload's body itself may take as long as it takes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_recv_body(Some(RESPONSE_TIMEOUT))
        .build()
        .into()
}

/// `url` without a trailing `/` or API version: the service's root.
fn root(url: &str, version: &str) -> String {
    let u = url.trim_end_matches('/');
    u.strip_suffix(version).unwrap_or(u).to_owned()
}

struct Reply {
    status: u16,
    body: Value,
}

/// Runs one request on a blocking thread.
async fn call(
    agent: ureq::Agent,
    method: &'static str,
    url: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Value>,
) -> Result<Reply, String> {
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("accept", "application/json");
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let sent = match body {
            Some(b) => agent.run(
                req.header("content-type", "application/json")
                    .body(b.to_string())
                    .map_err(|e| e.to_string())?,
            ),
            None => agent.run(req.body(()).map_err(|e| e.to_string())?),
        };
        let mut resp = sent.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The message in any OpenStack error body (`{"<name>": {"message"}}`, Glance's plain
/// text, or `{"error": {"message"}}`).
fn message(body: &Value) -> String {
    match body {
        Value::Object(m) => m
            .values()
            .find_map(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| body.to_string()),
        Value::String(s) => s.trim().chars().take(500).collect(),
        other => other.to_string(),
    }
}

/// A Glance-compatible image service (API v2) at `url`.
#[derive(Clone)]
pub struct RemoteImages {
    root: String,
    agent: ureq::Agent,
}

/// The failure to reach the image service, as seed 003's 500 row says.
fn unreachable(e: impl std::fmt::Display) -> ServiceError {
    tracing::error!(error = %e, "the image service could not be reached");
    ServiceError::Unavailable(format!("Failed to communicate with the image service: {e}"))
}

/// What the image service answered, mapped back to the caller: its 4xx mean the request
/// (or the caller's rights there) was refused; anything else is the service failing.
fn refused(what: &str, r: &Reply) -> ServiceError {
    let m = format!("The image service refused to {what}: {}", message(&r.body));
    match r.status {
        400 => ServiceError::BadRequest(m),
        401 => ServiceError::Unauthorized(m),
        403 => ServiceError::Forbidden(m),
        404 => ServiceError::NotFound(m),
        409 => ServiceError::Conflict(m),
        413 => ServiceError::OverLimit(m),
        415 => ServiceError::Unsupported(m),
        s => unreachable(format!("HTTP {s} to {what}: {}", message(&r.body))),
    }
}

/// An image as far as an upload needs it.
pub struct RemoteImage {
    pub id: String,
    pub status: String,
    pub disk_format: Option<String>,
    pub visibility: String,
    pub protected: bool,
}

impl RemoteImages {
    /// `url`: the service's endpoint (with or without `/v2`).
    pub fn new(url: &str) -> RemoteImages {
        RemoteImages {
            root: root(url, "/v2"),
            agent: agent(),
        }
    }

    pub fn url(&self) -> &str {
        &self.root
    }

    fn auth(token: &str) -> Vec<(&'static str, String)> {
        vec![("x-auth-token", token.to_owned())]
    }

    /// `POST /v2/images`: a queued image.
    pub async fn create(&self, token: &str, fields: Value) -> ServiceResult<RemoteImage> {
        let url = format!("{}/v2/images", self.root);
        let r = call(
            self.agent.clone(),
            "POST",
            url,
            Self::auth(token),
            Some(fields),
        )
        .await
        .map_err(unreachable)?;
        match r.status {
            200 | 201 => {}
            // The request itself, or the caller's rights or quota there.
            400 | 403 | 413 => return Err(refused("create the image", &r)),
            // Anything else says the endpoint is not a working image service (seed 003's
            // 500: "Information about end point of Glance is incorrect").
            s => {
                return Err(unreachable(format!(
                    "HTTP {s} to create an image at {}: {}",
                    self.root,
                    message(&r.body)
                )));
            }
        }
        Self::image(&r.body).ok_or_else(|| unreachable("no image in the answer to its creation"))
    }

    fn image(v: &Value) -> Option<RemoteImage> {
        Some(RemoteImage {
            id: v.get("id")?.as_str()?.to_owned(),
            status: v.get("status")?.as_str()?.to_owned(),
            disk_format: v
                .get("disk_format")
                .and_then(Value::as_str)
                .map(str::to_owned),
            visibility: v
                .get("visibility")
                .and_then(Value::as_str)
                .unwrap_or("shared")
                .to_owned(),
            protected: v.get("protected").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    pub async fn get(&self, token: &str, id: &str) -> ServiceResult<RemoteImage> {
        let url = format!("{}/v2/images/{id}", self.root);
        let r = call(self.agent.clone(), "GET", url, Self::auth(token), None)
            .await
            .map_err(unreachable)?;
        if r.status != 200 {
            return Err(refused("show the image", &r));
        }
        Self::image(&r.body).ok_or_else(|| unreachable("no image in the answer"))
    }

    pub async fn delete(&self, token: &str, id: &str) -> ServiceResult<()> {
        let url = format!("{}/v2/images/{id}", self.root);
        let r = call(self.agent.clone(), "DELETE", url, Self::auth(token), None)
            .await
            .map_err(unreachable)?;
        match r.status {
            200..=299 | 404 => Ok(()),
            _ => Err(refused("delete the image", &r)),
        }
    }

    /// `PUT /v2/images/{id}/file` of `body`, chunked (the length is not sent: the service
    /// counts it, as it does for any streamed upload).
    pub async fn upload(
        &self,
        token: &str,
        id: &str,
        mut body: admin_api::image::ByteStream,
    ) -> ServiceResult<()> {
        let url = format!("{}/v2/images/{id}/file", self.root);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
        let agent = self.agent.clone();
        let token = token.to_owned();
        let put = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader {
                rx,
                piece: Bytes::new(),
            };
            let req = ureq::http::Request::builder()
                .method("PUT")
                .uri(&url)
                .header("x-auth-token", token)
                .header("content-type", "application/octet-stream")
                .body(ureq::SendBody::from_reader(&mut reader))
                .map_err(|e| e.to_string())?;
            let mut resp = agent.run(req).map_err(|e| format!("PUT {url}: {e}"))?;
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Ok::<Reply, String>(Reply { status, body })
        });
        // Feed the body; a send fails once the request has ended (its answer tells why).
        let mut source_error = None;
        while let Some(piece) = body.next().await {
            let failed = piece.is_err();
            if let Err(e) = &piece {
                source_error = Some(e.to_string());
            }
            if tx.send(piece).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
        let r = put.await.map_err(|e| unreachable(e.to_string()))?.map_err(
            |e| match &source_error {
                Some(s) => ServiceError::Internal(format!("reading the volume: {s}")),
                None => unreachable(e),
            },
        )?;
        if let Some(s) = source_error {
            return Err(ServiceError::Internal(format!("reading the volume: {s}")));
        }
        match r.status {
            200..=299 => Ok(()),
            _ => Err(refused("take the image data", &r)),
        }
    }
}

/// The pieces a channel brings, read as one byte stream. An error piece ends the body with
/// that error (the request fails, and the image service sees a cut upload).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    piece: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(p)) => self.piece = p,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

/// A Keystone-compatible identity service (API v3) at `url`: checks tokens this daemon
/// did not issue, as keystonemiddleware does for an OpenStack service.
#[derive(Clone)]
pub struct RemoteIdentity {
    root: String,
    agent: ureq::Agent,
}

impl RemoteIdentity {
    pub fn new(url: &str) -> RemoteIdentity {
        RemoteIdentity {
            root: root(url, "/v3"),
            agent: agent(),
        }
    }

    /// `GET /v3/auth/tokens` with the token as its own subject. Any failure is a 401 to
    /// the caller (seed 003: "unauthorized (including Keystone down)").
    pub async fn validate(&self, token: &str) -> ServiceResult<TokenInfo> {
        let url = format!("{}/v3/auth/tokens", self.root);
        let headers = vec![
            ("x-auth-token", token.to_owned()),
            ("x-subject-token", token.to_owned()),
        ];
        let denied = |why: String| {
            tracing::info!(identity = %self.root, reason = %why, "a token the identity service did not accept");
            ServiceError::Unauthorized("The request you have made requires authentication.".into())
        };
        let r = call(self.agent.clone(), "GET", url, headers, None)
            .await
            .map_err(denied)?;
        if r.status != 200 {
            return Err(denied(format!("HTTP {}: {}", r.status, message(&r.body))));
        }
        token_info(&r.body["token"]).ok_or_else(|| denied("an unreadable token".into()))
    }
}

/// A Keystone v3 token body as this daemon's [`TokenInfo`]. Only project-scoped tokens
/// are taken (every API here is per project).
fn token_info(t: &Value) -> Option<TokenInfo> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let when = |v: &Value| OffsetDateTime::parse(v.as_str()?, &Rfc3339).ok();
    let expires_at = when(&t["expires_at"])?;
    if expires_at <= OffsetDateTime::now_utc() {
        return None;
    }
    let named: Vec<Named> = t["roles"]
        .as_array()?
        .iter()
        .filter_map(|r| {
            Some(Named {
                id: s(&r["id"])?,
                name: s(&r["name"])?,
            })
        })
        .collect();
    let mut roles: Vec<Role> = named.iter().filter_map(|n| Role::parse(&n.name)).collect();
    roles.sort();
    roles.dedup();
    Some(TokenInfo {
        caller: Caller {
            user_id: s(&t["user"]["id"])?,
            user_name: s(&t["user"]["name"]).unwrap_or_default(),
            project_id: s(&t["project"]["id"])?,
            project_name: s(&t["project"]["name"]).unwrap_or_default(),
            roles,
        },
        role_ids: named,
        methods: t["methods"]
            .as_array()
            .map(|m| m.iter().filter_map(s).collect())
            .unwrap_or_default(),
        audit_id: t["audit_ids"][0].as_str().unwrap_or_default().to_owned(),
        issued_at: when(&t["issued_at"]).unwrap_or(expires_at),
        expires_at,
    })
}

/// The fields of a new image in the image service, as Cinder sends them.
pub fn new_image_fields(
    name: &str,
    disk_format: &str,
    container_format: &str,
    min_disk: u64,
    visibility: Option<&str>,
    protected: Option<bool>,
) -> Value {
    let mut v = json!({
        "name": name,
        "disk_format": disk_format,
        "container_format": container_format,
        "min_disk": min_disk,
    });
    if let Some(vis) = visibility {
        v["visibility"] = json!(vis);
    }
    if let Some(p) = protected {
        v["protected"] = json!(p);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_drop_the_version_and_slashes() {
        assert_eq!(root("http://h:9292/", "/v2"), "http://h:9292");
        assert_eq!(root("http://h/image/v2/", "/v2"), "http://h/image");
        assert_eq!(root("http://h/identity/v3", "/v3"), "http://h/identity");
    }

    #[test]
    fn keystone_tokens_read_as_callers() {
        let t = json!({"methods": ["password"], "expires_at": "2999-01-01T00:00:00.000000Z",
            "issued_at": "2026-01-01T00:00:00.000000Z", "audit_ids": ["a1"],
            "user": {"id": "u", "name": "alice"}, "project": {"id": "p", "name": "demo"},
            "roles": [{"id": "r1", "name": "member"}, {"id": "r2", "name": "reader"}]});
        let i = token_info(&t).expect("a token");
        assert_eq!(i.caller.project_id, "p");
        assert!(i.caller.has(Role::Member) && !i.caller.is_admin());
        let mut expired = t.clone();
        expired["expires_at"] = json!("2001-01-01T00:00:00Z");
        assert!(token_info(&expired).is_none());
        let mut unscoped = t;
        unscoped.as_object_mut().unwrap().remove("project");
        assert!(token_info(&unscoped).is_none());
    }
}
