//! Air-gapped networks: `warm` fills the store ahead of need, `export` writes what is stored into
//! one verified bundle (or Terraform's filesystem-mirror layout), `import` brings a bundle into
//! a sealed TerraPeak's store. The commands drive the same cache and storage code the server
//! uses; they need no running server and work on a bucket that replicas share.

pub mod bundle;
pub mod export;
pub mod import;
pub mod progress;
pub mod warm;

use crate::cache::Cache;
use crate::config::Config;
use crate::registry::Platform;
use crate::storage::StorageKey;
use std::path::PathBuf;
use std::sync::Arc;

/// What to warm or export, as the command line gave it.
#[derive(Debug, Default, Clone)]
pub struct SelectionArgs {
    pub lock_files: Vec<PathBuf>,
    pub roots: Vec<PathBuf>,
    pub manifests: Vec<PathBuf>,
    pub platforms: Vec<String>,
}

impl SelectionArgs {
    pub fn is_empty(&self) -> bool {
        self.lock_files.is_empty() && self.roots.is_empty() && self.manifests.is_empty()
    }

    /// Reads every input file. `--platform` applies to providers that name none.
    pub fn read(&self) -> Result<warm::Selection, String> {
        let mut sel = warm::Selection::default();
        for f in &self.lock_files {
            sel.add_lock_file(f)?;
        }
        for d in &self.roots {
            sel.add_root(d)?;
        }
        for m in &self.manifests {
            sel.add_manifest(m)?;
        }
        let platforms: Vec<Platform> = self
            .platforms
            .iter()
            .map(|p| Platform::parse(p).map_err(|e| format!("--platform: {e}")))
            .collect::<Result<_, _>>()?;
        // A lock file's providers name their platforms through their hashes, a manifest's may
        // name theirs; --platform (or this machine's) is for everything else.
        sel.default_platforms = if platforms.is_empty() {
            vec![warm::this_platform()]
        } else {
            platforms
        };
        Ok(sel)
    }
}

/// A command's cache over the configured store, spooling in a folder of its own (a server may
/// be running on the same store).
pub async fn open(config: &Config) -> Result<Arc<Cache>, String> {
    let spool = format!(
        "{}/cmd-{}",
        crate::storage::SERVER_SPOOL,
        uuid::Uuid::new_v4().simple()
    );
    crate::server::open_cache(config, &spool)
        .await
        .map(|(cache, _)| cache)
        .map_err(|e| e.to_string())
}

/// Every stored provider and module object, for `export --all`.
pub async fn everything(cache: &Cache) -> Result<Vec<StorageKey>, String> {
    let mut keys = Vec::new();
    for prefix in ["providers", "modules"] {
        keys.extend(
            cache
                .storage()
                .list(prefix)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(keys)
}
