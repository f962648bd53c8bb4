//! TerraPeak: a pull-through caching proxy for the Terraform and OpenTofu registries.

pub mod airgap;
pub mod auth;
pub mod cache;
pub mod client_config;
pub mod commands;
pub mod config;
pub mod http;
pub mod inventory;
pub mod listener;
pub mod log_writer;
pub mod memory;
pub mod metrics;
pub mod registry;
mod runtime;
pub mod server;
pub mod status;
pub mod storage;
pub mod tls;
pub mod upstream;

#[doc(hidden)]
pub mod fuzzing {
    //! Entry points for the fuzz targets in `fuzz/` into code the public API does not reach.
    pub fn download_answer(body: &[u8]) -> Option<Vec<String>> {
        crate::cache::fuzz_download_answer(body)
    }
}
