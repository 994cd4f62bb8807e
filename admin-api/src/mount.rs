//! Per-service endpoint prefixes.
//!
//! Clients discover API versions at the root of each catalog endpoint, so services that share
//! one listener need roots of their own, as devstack serves them: `/compute`, `/image` (and
//! `/identity` beside Keystone's own `/`). A request under a mount is handed to the inner router
//! with the mount stripped, when its path belongs to that service; the mount travels in the
//! request's extensions so that links name it. The mounts' roots are ordinary routes of their
//! families (they answer that service's version document).
//!
//! The seeds' unprefixed paths keep working: this only adds aliases.

use axum::{
    extract::{FromRequestParts, OriginalUri, Request},
    http::{Extensions, HeaderMap, Uri, header, request::Parts},
    middleware::Next,
    response::Response,
};

/// The mount a request came in under (`""` for the unprefixed paths).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mount(pub &'static str);

/// A service prefix and the inner paths it serves.
pub struct ServiceMount {
    pub prefix: &'static str,
    /// Path prefixes (after the mount) that belong to this service.
    pub paths: &'static [&'static str],
    /// The `paths` themselves (with or without a trailing `/`) are routes of the mount's own,
    /// not forwarded: Block Storage's `/volume/v3` is cinder's version document, where the
    /// unprefixed `/v3` is Keystone's.
    pub own_roots: bool,
    /// When not empty: only `<path>/{project}/<resource>...` with one of these resources is
    /// forwarded (`/volume/v3/auth/tokens` must not reach Keystone, nor `/volume/v2/images`
    /// Glance).
    pub resources: &'static [&'static str],
    /// Forwarded only as they are (with or without a trailing `/`), nothing under them.
    pub exact: &'static [&'static str],
}

pub const COMPUTE: ServiceMount = ServiceMount {
    prefix: "/compute",
    // Not nova's legacy `/v2/`: under one listener it would reach the other services' `/v2`.
    paths: &["/v2.1", "/v1.1"],
    own_roots: false,
    resources: &[],
    exact: &[],
};

pub const IMAGE: ServiceMount = ServiceMount {
    prefix: "/image",
    paths: &["/versions", "/v2/images", "/v2/schemas", "/v2/info"],
    own_roots: false,
    resources: &[],
    exact: &[],
};

pub const IDENTITY: ServiceMount = ServiceMount {
    prefix: "/identity",
    // Keystone's subtrees only: Block Storage's `/v3/{project}/volumes` is not identity's.
    paths: &[
        "/v3/auth",
        "/v3/domains",
        "/v3/projects",
        "/v3/role_assignments",
        "/v3/roles",
        "/v3/users",
    ],
    own_roots: false,
    resources: &[],
    exact: &["/v3"],
};

pub const VOLUME: ServiceMount = ServiceMount {
    prefix: "/volume",
    paths: &["/v3", "/v2"],
    own_roots: true,
    resources: &[
        "volumes",
        "snapshots",
        "types",
        "limits",
        "os-availability-zone",
        "messages",
    ],
    exact: &[],
};

pub const MOUNTS: [ServiceMount; 4] = [COMPUTE, IMAGE, IDENTITY, VOLUME];

impl ServiceMount {
    /// The inner path for `path` when it lies under this mount and belongs to its service.
    /// The mount's own root (`/image`, `/image/`) is not forwarded: it is a route of its own.
    pub fn inner<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.prefix)?;
        if rest.is_empty() || rest == "/" {
            return None;
        }
        if self.exact.iter().any(|e| {
            rest.strip_prefix(e)
                .is_some_and(|t| t.is_empty() || t == "/")
        }) {
            return Some(rest);
        }
        self.paths
            .iter()
            // `/v2.1` covers `/v2.1/...` but not `/v2.10`.
            .any(|p| match rest.strip_prefix(p) {
                Some("" | "/") if self.own_roots => false,
                Some(tail) if !self.resources.is_empty() => {
                    let mut seg = tail.split('/').skip(1);
                    let (project, resource) = (seg.next(), seg.next());
                    project.is_some_and(|p| !p.is_empty())
                        && resource.is_some_and(|r| self.resources.contains(&r))
                }
                Some(tail) => p.ends_with('/') || tail.is_empty() || tail.starts_with('/'),
                None => false,
            })
            .then_some(rest)
    }
}

/// Middleware in front of the whole router: strips a mount from the path of a request that
/// belongs to it and records the mount. Everything else passes unchanged (so an unknown path
/// under a mount meets the ordinary 404).
pub async fn strip_mounts(mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let found = MOUNTS
        .iter()
        .find_map(|m| m.inner(path).map(|inner| (m.prefix, inner.to_owned())));
    if let Some((prefix, inner)) = found {
        let pq = match req.uri().query() {
            Some(q) => format!("{inner}?{q}"),
            None => inner,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri.clone();
                // Handlers read the path they were routed by (and the mount separately).
                req.extensions_mut().insert(OriginalUri(uri));
                req.extensions_mut().insert(Mount(prefix));
            }
        }
    }
    next.run(req).await
}

/// `http://host:port` as the client addressed us, plus the mount the request came in under:
/// the base of links that must lead back through the same endpoint.
pub fn base_url(headers: &HeaderMap, ext: &Extensions) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        })
        .unwrap_or("localhost");
    let mount = ext.get::<Mount>().copied().unwrap_or_default();
    format!("http://{host}{}", mount.0)
}

/// Extractor of [`base_url`].
pub struct BaseUrl(pub String);

impl<S: Send + Sync> FromRequestParts<S> for BaseUrl {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(BaseUrl(base_url(&parts.headers, &parts.extensions)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_services_own_paths_pass_its_mount() {
        assert_eq!(
            COMPUTE.inner("/compute/v2.1/p/os-volumes"),
            Some("/v2.1/p/os-volumes")
        );
        assert_eq!(COMPUTE.inner("/compute/v2.1"), Some("/v2.1"));
        assert_eq!(COMPUTE.inner("/compute/v2.10"), None);
        assert_eq!(COMPUTE.inner("/compute/v3/auth/tokens"), None);
        assert_eq!(COMPUTE.inner("/compute/"), None);
        assert_eq!(COMPUTE.inner("/computer/v2.1"), None);
        assert_eq!(
            IMAGE.inner("/image/v2/images/x/file"),
            Some("/v2/images/x/file")
        );
        assert_eq!(IMAGE.inner("/image/v2/p/os-volumes"), None);
        assert_eq!(
            VOLUME.inner("/volume/v3/p/volumes/detail"),
            Some("/v3/p/volumes/detail")
        );
        assert_eq!(VOLUME.inner("/volume/v2/p/volumes"), Some("/v2/p/volumes"));
        // Its version roots are its own routes (the unprefixed `/v3` is Keystone's).
        assert_eq!(VOLUME.inner("/volume/v3"), None);
        assert_eq!(VOLUME.inner("/volume/v3/"), None);
        assert_eq!(VOLUME.inner("/volume/v2/"), None);
        // Only Block Storage's resources pass.
        assert_eq!(VOLUME.inner("/volume/v3/auth/tokens"), None);
        assert_eq!(VOLUME.inner("/volume/v2/images"), None);
        assert_eq!(VOLUME.inner("/volume/v2/p/os-volumes"), None);
        assert_eq!(VOLUME.inner("/volume/v3/p/volumesx"), None);
        assert_eq!(VOLUME.inner("/volume/v3/p/volumes"), Some("/v3/p/volumes"));
        assert_eq!(
            VOLUME.inner("/volume/v3/p/messages/m"),
            Some("/v3/p/messages/m")
        );
        assert_eq!(IMAGE.inner("/image"), None);
        assert_eq!(
            IDENTITY.inner("/identity/v3/auth/tokens"),
            Some("/v3/auth/tokens")
        );
        assert_eq!(IDENTITY.inner("/identity/v3"), Some("/v3"));
        assert_eq!(IDENTITY.inner("/identity/v3/"), Some("/v3/"));
        assert_eq!(IDENTITY.inner("/identity/v3/p/volumes"), None);
    }
}
