//! The service trait the daemon implements, and the plain types that cross it.

use serde::Serialize;

/// What the admin API needs from the daemon. Implemented by `cairn::service`; tests may
/// implement it with fakes.
///
/// `async-trait` keeps the trait usable as `Arc<dyn AdminService>` (native `async fn` in
/// traits is not dyn-compatible yet).
#[async_trait::async_trait]
pub trait AdminService: Send + Sync + 'static {
    /// Whether the daemon's parts can serve requests right now. Must not hang: implementors
    /// bound their own checks with a timeout.
    async fn health(&self) -> Health;

    /// Build and format identification for `/version`.
    fn version(&self) -> VersionInfo;

    /// A snapshot of the store counters for `/metrics`. Called on every scrape; must be cheap.
    fn store_metrics(&self) -> StoreMetrics;
}

/// Health of each component; the daemon is healthy when every component is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub components: Vec<ComponentHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentHealth {
    /// Short component name, e.g. `store`, `catalog`.
    pub name: String,
    /// `Ok(())` when usable, otherwise a one-line reason.
    pub status: Result<(), String>,
}

impl ComponentHealth {
    pub fn ok(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Ok(()),
        }
    }
    pub fn failed(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Err(reason.into()),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.components.iter().all(|c| c.status.is_ok())
    }
}

/// Body of `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub name: String,
    pub version: String,
    /// Git commit the binary was built from, when known at build time.
    pub git_commit: Option<String>,
    /// On-disk format version of the chunk store this binary writes.
    pub store_format_version: u32,
    /// Schema version of the catalog database this binary writes.
    pub catalog_schema_version: u32,
}

/// Store counters exported on `/metrics` (names in [`crate::ops`] docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreMetrics {
    pub objects: u64,
    pub logical_bytes: u64,
    pub allocated_bytes: u64,
    pub physical_bytes: u64,
    pub free_bytes: u64,
    pub segments: u64,
    pub checksum_errors: u64,
    pub healed_blocks: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
}
