//! TerraPeak: a pull-through caching proxy for the Terraform and OpenTofu registries.

pub mod auth;
pub mod cache;
pub mod client_config;
pub mod config;
pub mod http;
pub mod log_writer;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod storage;
pub mod upstream;
