//! The control plane's rules over the catalog and the store: identity (users, projects, roles,
//! tokens) and the one volume model (volumes, servers, attachments) every API family shows.
//!
//! Each operation is one catalog transaction, so two requests racing on one volume serialise
//! and see each other's result (no double attach, no lost update).

pub mod filesystems;
pub mod identity;
pub mod images;
pub mod volumes;

use admin_api::model::ServiceError;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::catalog::CatalogError;

/// Settings the control plane needs from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL of the admin API as clients reach it (service catalog, clouds.yaml).
    pub public_url: String,
    /// `nbd://host:port` prefix of export URIs.
    pub nbd_url: String,
    pub token_ttl: std::time::Duration,
    pub multiattach_limit: u32,
    /// The largest image upload taken (Glance's `image_size_cap`).
    pub image_size_cap: u64,
    /// The NBD server's unix socket (image conversions reach store objects through it).
    pub nbd_socket: std::path::PathBuf,
    /// Image conversions running at once.
    pub convert_jobs: usize,
    /// Show images' `direct_url` (Glance's `show_image_direct_url`).
    pub show_image_direct_url: bool,
    /// The external image service volumes are uploaded to (`None`: this daemon's own).
    pub image_service_url: Option<String>,
    /// The external identity service that checks tokens this daemon did not issue.
    pub identity_url: Option<String>,
    /// Scratch space (`<data-dir>/tmp`, emptied at start): volumes uploaded as vmdk or vdi
    /// are written there by `qemu-img`, then sent.
    pub tmp_dir: std::path::PathBuf,
    /// How long a Block Storage user message is kept at least (cinder's `message_ttl`).
    pub message_ttl: std::time::Duration,
}

/// Catalog timestamps: RFC 3339 UTC with microseconds (see the schema).
pub(crate) fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    // Stored with microseconds; truncate so a value reads back equal to what was returned.
    t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t)
}

pub(crate) fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

pub(crate) fn parse_ts(s: &str) -> rusqlite::Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A catalog failure is the daemon's fault: log it, tell the client only that it failed.
pub(crate) fn internal(e: CatalogError) -> ServiceError {
    tracing::error!(error = %e, "catalog call failed");
    ServiceError::Internal("internal error; see the daemon log".into())
}

/// Runs `f` in one IMMEDIATE transaction (the write lock is taken before the first read, so
/// check-then-change cannot interleave with another writer), committing only on success.
pub(crate) async fn immediate<T, F>(
    catalog: &crate::catalog::Catalog,
    f: F,
) -> Result<T, ServiceError>
where
    F: FnOnce(&rusqlite::Connection) -> Result<T, TxError> + Send + 'static,
    T: Send + 'static,
{
    immediate_then(catalog, f, |t| t).await
}

/// [`immediate`], then `after` with what `f` returned, once the commit succeeded, in the
/// same catalog job: ordered with every other catalog call, and done even if the caller's
/// future is dropped meanwhile.
pub(crate) async fn immediate_then<T, U, F, A>(
    catalog: &crate::catalog::Catalog,
    f: F,
    after: A,
) -> Result<U, ServiceError>
where
    F: FnOnce(&rusqlite::Connection) -> Result<T, TxError> + Send + 'static,
    A: FnOnce(T) -> U + Send + 'static,
    U: Send + 'static,
{
    let out = catalog
        .call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            match f(&tx) {
                Ok(t) => {
                    tx.commit()?;
                    Ok(Ok(after(t)))
                }
                Err(e) => Ok(Err(e)),
            }
        })
        .await
        .map_err(internal)?;
    out.map_err(ServiceError::from)
}

/// Errors inside a catalog transaction: either the client's (a [`ServiceError`] decided by
/// the rules) or the database's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TxError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Catalog(CatalogError::Sqlite(e))
    }
}

impl From<TxError> for ServiceError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Service(s) => s,
            TxError::Catalog(c) => internal(c),
        }
    }
}

#[cfg(test)]
mod tests;
