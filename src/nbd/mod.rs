//! NBD: cairn volumes served over the Network Block Device protocol.
//!
//! `proto` is the pure wire codec (no I/O); `server` runs the listeners and `conn` one
//! connection on top of it; `exports` says what is offered (attached volumes, images
//! with raw content, and internal exports for image conversion).

mod conn;
pub mod exports;
pub mod fence;
pub mod proto;
pub mod server;

pub use exports::{CatalogExports, ExportLease, InternalExports};
pub use fence::Fence;
pub use server::{Export, ExportSource, NbdConfig, NbdListeners, NbdServer};
