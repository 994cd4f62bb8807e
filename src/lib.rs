//! cairn: a storage daemon. The chunk store (`store`) is the heart; NBD, FUSE, the image
//! cache and the admin API are views of it.

pub mod catalog;
pub mod client;
pub mod config;
pub mod control;
pub mod fs;
pub mod image;
pub mod nbd;
pub mod remote;
pub mod service;
pub mod store;
