//! Glance's error bodies: what webob renders for an `HTTPException`, negotiated from
//! `Accept` as webob does.
//!
//! - no `Accept`, `*/*` or HTML: an HTML page (what glanceclient parses into
//!   "404 Not Found: <explanation>");
//! - JSON: `{"message": "<explanation><br /><br />\n<detail>\n\n", "code": "404 Not Found",
//!   "title": "Not Found"}`;
//! - anything else (an empty `Accept` too): `text/plain`, `404 Not Found\n\n<explanation>...`.

use axum::{
    Json,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::ServiceError;

/// Glance's JSON error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct GlanceErrorBody {
    /// The explanation and detail in webob's template (`<br /><br />` and newlines).
    pub message: String,
    /// Status and reason, e.g. `404 Not Found`.
    pub code: String,
    /// The reason, e.g. `Not Found`.
    pub title: String,
}

/// An Image API error.
#[derive(Debug, Clone)]
pub struct GlanceError {
    pub status: StatusCode,
    pub explanation: String,
    /// webob's second part (empty for most errors).
    pub detail: String,
    /// Extra response headers (`Accept-Patch` on a 415 from PATCH).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

pub type GlanceResult<T> = Result<T, GlanceError>;

impl GlanceError {
    pub fn new(status: StatusCode, explanation: impl Into<String>) -> Self {
        GlanceError {
            status,
            explanation: explanation.into(),
            detail: String::new(),
            headers: Vec::new(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    /// A 415 for a body of type `content_type`, with Glance's detail.
    pub fn media_type(content_type: Option<&str>, detail: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "The request media type {} is not supported by this server.",
                content_type.unwrap_or("None")
            ),
        );
        e.detail = detail.into();
        e
    }

    pub fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    fn code(&self) -> String {
        format!(
            "{} {}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("Error")
        )
    }

    /// webob's body template.
    fn template(&self, escape: bool) -> String {
        let (e, d) = if escape {
            (html_escape(&self.explanation), html_escape(&self.detail))
        } else {
            (self.explanation.clone(), self.detail.clone())
        };
        format!("{e}<br /><br />\n{d}\n\n")
    }

    /// The response for a request with these headers.
    pub fn render(self, request: &HeaderMap) -> Response {
        let code = self.code();
        let mut resp = match negotiate(request) {
            Kind::Json => {
                let body = GlanceErrorBody {
                    message: self.template(false),
                    code,
                    title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
                };
                (self.status, Json(body)).into_response()
            }
            Kind::Html => (
                self.status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=UTF-8"),
                )],
                format!(
                    "<html>\n <head>\n  <title>{code}</title>\n </head>\n <body>\n  <h1>{code}</h1>\n  {}\n </body>\n</html>",
                    self.template(true)
                ),
            )
                .into_response(),
            Kind::Text => (
                self.status,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=UTF-8"),
                )],
                format!("{code}\n\n{}", strip_tags(&self.template(false))),
            )
                .into_response(),
        };
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp
    }
}

enum Kind {
    Html,
    Json,
    Text,
}

/// webob's `best_match(['text/html', 'application/json'])`, default text/plain.
fn negotiate(request: &HeaderMap) -> Kind {
    let values: Vec<&str> = request
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if values.is_empty() {
        return Kind::Html;
    }
    let mut best: Option<(f32, Kind)> = None;
    for item in values.iter().flat_map(|v| v.split(',')) {
        let mut parts = item.split(';');
        let range = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let kind = match range.as_str() {
            "text/html" | "text/*" | "*/*" => Kind::Html,
            "application/json" | "application/*" => Kind::Json,
            _ => continue,
        };
        // The first offer (HTML) wins ties, as in webob.
        let better = match &best {
            None => q > 0.0,
            Some((bq, bk)) => {
                q > *bq || (q == *bq && matches!(kind, Kind::Html) && !matches!(bk, Kind::Html))
            }
        };
        if better {
            best = Some((q, kind));
        }
    }
    best.map(|(_, k)| k).unwrap_or(Kind::Text)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#x27;")
}

/// webob's `strip_tags`: newlines become spaces, `<br />` a newline, other tags vanish.
fn strip_tags(s: &str) -> String {
    let s = s
        .replace('\n', " ")
        .replace('\r', "")
        .replace("<br />", "\n");
    let mut out = String::with_capacity(s.len());
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

impl From<ServiceError> for GlanceError {
    fn from(e: ServiceError) -> Self {
        let (status, m) = match e {
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
        GlanceError::new(status, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(accept: Option<&str>) -> (String, String) {
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(header::ACCEPT, HeaderValue::from_str(a).unwrap());
        }
        let resp = GlanceError::not_found("No image found with ID x").render(&h);
        let ct = resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt
            .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
            .unwrap();
        (ct, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[test]
    fn webob_negotiation() {
        let (ct, b) = body(None);
        assert!(ct.starts_with("text/html"));
        assert!(b.contains("<h1>404 Not Found</h1>\n  No image found with ID x<br /><br />"));
        let (ct, _) = body(Some("*/*"));
        assert!(ct.starts_with("text/html"));
        let (ct, b) = body(Some("application/json"));
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["message"], "No image found with ID x<br /><br />\n\n\n");
        assert_eq!(v["code"], "404 Not Found");
        let (ct, b) = body(Some(""));
        assert!(ct.starts_with("text/plain"));
        assert_eq!(b, "404 Not Found\n\nNo image found with ID x\n\n   ");
    }
}
