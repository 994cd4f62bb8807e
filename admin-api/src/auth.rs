//! Who is calling: `X-Auth-Token` for every family, HTTP Basic as well for pdisk.
//!
//! Handlers take a [`Caller`] from [`authenticate`] and turn a failure into their family's
//! error format. Nothing is changed before authentication succeeds.

use axum::http::{HeaderMap, header};
use base64::Engine;

use crate::{
    AppState,
    model::{Caller, ServiceError, ServiceResult},
};

pub const AUTH_TOKEN: &str = "x-auth-token";

/// The caller behind `X-Auth-Token`, or Unauthorized.
pub async fn token_caller(state: &AppState, headers: &HeaderMap) -> ServiceResult<Caller> {
    let token = headers
        .get(AUTH_TOKEN)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ServiceError::Unauthorized("The request you have made requires authentication.".into())
        })?;
    Ok(state.service.validate_token(token).await?.caller)
}

/// `X-Auth-Token` if present, else HTTP Basic (pdisk's original scheme).
pub async fn token_or_basic_caller(state: &AppState, headers: &HeaderMap) -> ServiceResult<Caller> {
    if headers.contains_key(AUTH_TOKEN) {
        return token_caller(state, headers).await;
    }
    let Some((user, password)) = basic_credentials(headers) else {
        return Err(ServiceError::Unauthorized(
            "The request you have made requires authentication.".into(),
        ));
    };
    state.service.authenticate_basic(&user, &password).await
}

/// `Authorization: Basic base64(user:password)`, decoded.
pub fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    #[test]
    fn basic() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dGVzdDpwYTpzcw=="),
        );
        assert_eq!(
            super::basic_credentials(&h),
            Some(("test".into(), "pa:ss".into()))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(super::basic_credentials(&h), None);
    }
}
