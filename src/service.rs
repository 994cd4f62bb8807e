//! The daemon's implementation of [`admin_api::AdminService`]: the admin API's view of the
//! store and the catalog.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use admin_api::{AdminService, ComponentHealth, Health, StoreMetrics, VersionInfo};

use crate::{
    catalog::{self, Catalog},
    store::{self, Store},
};

/// Git commit of the build, set by `build.rs` (or by `CAIRN_GIT_COMMIT` at build time).
pub const GIT_COMMIT: Option<&str> = option_env!("CAIRN_GIT_COMMIT");

/// How long a health check may wait for the catalog thread.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Name, version, commit and on-disk format versions of this binary.
pub fn version_info() -> VersionInfo {
    VersionInfo {
        name: env!("CARGO_PKG_NAME").to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: GIT_COMMIT.map(str::to_owned),
        store_format_version: store::FORMAT_VERSION,
        catalog_schema_version: catalog::SCHEMA_VERSION,
    }
}

pub struct DaemonService {
    store: Store,
    catalog: Catalog,
    shutting_down: AtomicBool,
}

impl DaemonService {
    pub fn new(store: Store, catalog: Catalog) -> Arc<Self> {
        Arc::new(Self {
            store,
            catalog,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// From now on `/healthz` answers 503, so load balancers stop sending new work while
    /// in-flight requests drain.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl AdminService for DaemonService {
    async fn health(&self) -> Health {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Health {
                components: vec![
                    ComponentHealth::failed("store", "shutting down"),
                    ComponentHealth::failed("catalog", "shutting down"),
                ],
            };
        }
        // The store has no failure state to ask yet: open means usable.
        let store = ComponentHealth::ok("store");
        let catalog = match tokio::time::timeout(HEALTH_TIMEOUT, self.catalog.ping()).await {
            Ok(Ok(())) => ComponentHealth::ok("catalog"),
            Ok(Err(e)) => ComponentHealth::failed("catalog", e.to_string()),
            Err(_) => {
                ComponentHealth::failed("catalog", format!("no answer within {HEALTH_TIMEOUT:?}"))
            }
        };
        Health {
            components: vec![store, catalog],
        }
    }

    fn version(&self) -> VersionInfo {
        version_info()
    }

    fn store_metrics(&self) -> StoreMetrics {
        let s = self.store.stats();
        StoreMetrics {
            objects: s.objects,
            logical_bytes: s.logical_bytes,
            allocated_bytes: s.allocated_bytes,
            physical_bytes: s.physical_bytes,
            free_bytes: s.free_bytes,
            segments: s.segments,
            checksum_errors: s.checksum_errors,
            healed_blocks: s.healed_blocks,
            reads: s.reads,
            writes: s.writes,
            read_bytes: s.read_bytes,
            written_bytes: s.written_bytes,
            flushes: s.flushes,
        }
    }
}
