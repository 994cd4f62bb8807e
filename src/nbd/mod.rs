//! NBD: cairn volumes served over the Network Block Device protocol.
//!
//! `proto` is the pure wire codec (no I/O); the server is built on it.

pub mod proto;
