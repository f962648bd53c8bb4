//! Eviction: one pass over the inventory, removing the least recently used units until the
//! store is within `storage.max_size`, and units unused past `cache.evict_unused_after`. Never
//! pinned units, nor units being filled or streamed.

use super::{Cache, CacheError};
use crate::inventory::{self, Eviction, Inventory, Limits};
use crate::storage::StorageKey;
use std::collections::HashSet;

/// What one pass did (or, dry, would do).
#[derive(Debug, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub stored_bytes_before: u64,
    pub stored_bytes_after: u64,
    pub objects_after: usize,
    pub evicted: Vec<Eviction>,
}

/// The order a unit's objects go in: artifacts first, the answers that point to them last, so
/// a client holding an answer finds its artifact or fetches it again, never a dangling link.
fn deletion_rank(k: &StorageKey) -> u8 {
    match k.leaf() {
        "location.json" => 3,
        "git-ref.json" => 2,
        _ if k.parent().ends_with("/download") => 3,
        _ => 0,
    }
}

/// The longest a purge waits for a fill's publish it would otherwise race.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Cache {
    /// What is stored, grouped into units, with last reads from every replica and the pins.
    pub async fn inventory(&self) -> Result<Inventory, CacheError> {
        let unavailable = |e: crate::storage::StorageError| CacheError::Unavailable(e.to_string());
        let mut objects = Vec::new();
        for prefix in ["providers", "modules", "pins", "_access"] {
            objects.extend(
                self.storage
                    .list_objects(prefix)
                    .await
                    .map_err(unavailable)?,
            );
        }
        let pins: HashSet<String> = objects
            .iter()
            .filter(|o| o.key.as_str().starts_with("pins/"))
            .map(|o| o.key.as_str().to_owned())
            .collect();
        let access = self.storage.access_times().await.map_err(unavailable)?;
        let inv = Inventory::build(objects, &access, &pins);
        self.metrics
            .cache_stored_bytes
            .set(inv.stored_bytes() as i64);
        self.metrics.cache_objects.set(inv.objects() as i64);
        Ok(inv)
    }

    /// Evicts least recently used units until `bytes` more are free in the store's terms (its
    /// counted size drops by at least that much); whether it removed anything.
    pub async fn make_room(&self, bytes: u64) -> bool {
        let Ok(inv) = self.inventory().await else {
            return false;
        };
        let limits = Limits {
            max_size: Some(inv.stored_bytes().saturating_sub(bytes)),
            unused_after: None,
        };
        match self.gc(limits, false, false).await {
            Ok(report) => !report.evicted.is_empty(),
            Err(_) => false,
        }
    }

    /// Whether any object of `unit` is being filled or streamed now. A finished fill that
    /// lingers for late joiners serves from its own file handle, which outlives the eviction.
    fn busy(&self, unit: &inventory::Unit) -> bool {
        let fills = self.fills.lock().expect("fills lock");
        unit.keys.iter().any(|k| {
            fills
                .get(k)
                .is_some_and(|f| !matches!(f.state().phase, super::fill::Phase::Done(_)))
                || self.storage.in_use(k)
        })
    }

    /// One eviction pass. A sealed TerraPeak evicts nothing unless `explicit` (the `gc`
    /// command).
    pub async fn gc(
        &self,
        limits: Limits,
        dry_run: bool,
        explicit: bool,
    ) -> Result<GcReport, CacheError> {
        let inv = self.inventory().await?;
        let before = inv.stored_bytes();
        let planned = if self.offline && !explicit {
            Vec::new()
        } else {
            inventory::plan(&inv, limits, crate::storage::unix_now(), &|u| self.busy(u))
        };
        let mut evicted = Vec::new();
        for mut e in planned {
            if !dry_run {
                // Checked again at the moment it goes: a reader may have started since.
                if self.busy(&e.unit) {
                    continue;
                }
                e.keys.sort_by_key(deletion_rank);
                let mut failed = None;
                for key in &e.keys {
                    if let Err(err) = self.storage.delete(key).await {
                        failed = Some(err);
                        break;
                    }
                }
                if let Some(err) = failed {
                    tracing::warn!(unit = %e.unit.label(), error = %err, "eviction failed; trying again on the next pass");
                    continue;
                }
                self.metrics
                    .evictions
                    .with_label_values(&[e.reason.as_str()])
                    .inc();
                tracing::info!(unit = %e.unit.label(), reason = e.reason.as_str(), bytes = e.bytes, "evicted");
            }
            evicted.push(e);
        }
        let freed: u64 = evicted.iter().map(|e| e.bytes).sum();
        let removed: usize = evicted.iter().map(|e| e.keys.len()).sum();
        let after = if dry_run {
            before
        } else {
            before - freed.min(before)
        };
        if !dry_run {
            self.metrics.cache_stored_bytes.set(after as i64);
            self.metrics
                .cache_objects
                .set(inv.objects().saturating_sub(removed) as i64);
        }
        Ok(GcReport {
            dry_run,
            stored_bytes_before: before,
            stored_bytes_after: after,
            objects_after: if dry_run {
                inv.objects()
            } else {
                inv.objects() - removed.min(inv.objects())
            },
            evicted,
        })
    }
}

/// What an admin asks to remove.
#[derive(Debug, Clone)]
pub enum Purge {
    /// A provider: every version, one version, or one platform of one version.
    Provider {
        host: String,
        name: String,
        version: Option<String>,
        platform: Option<String>,
    },
    /// One module version.
    Module {
        host: String,
        name: String,
        version: String,
    },
}

/// What a purge removed.
#[derive(Debug, serde::Serialize)]
pub struct PurgeReport {
    /// The units removed, as `host/name version [platform]`.
    pub removed: Vec<String>,
    pub objects: usize,
    pub bytes: u64,
}

impl Cache {
    /// Removes what `what` names from the store (units being read keep streaming from their
    /// open files); the next request fetches it again. `None` when nothing matched.
    pub async fn purge(&self, what: &Purge) -> Result<Option<PurgeReport>, CacheError> {
        // Verified bytes a client already has may still be on their way into the store: let
        // them land first, so what the purge removes does not reappear after it.
        let publishing: Vec<_> = {
            let fills = self.fills.lock().expect("fills lock");
            fills.values().filter(|f| f.publishing()).cloned().collect()
        };
        for fill in publishing {
            let _ = tokio::time::timeout(PUBLISH_WAIT, fill.settled()).await;
        }
        let inv = self.inventory().await?;
        let selected: Vec<&inventory::Unit> = inv
            .units
            .iter()
            .filter(|u| match what {
                Purge::Provider {
                    host,
                    name,
                    version,
                    platform,
                } => {
                    u.kind == inventory::Kind::Provider
                        && &u.host == host
                        && &u.name == name
                        && version.as_ref().is_none_or(|v| &u.version == v)
                        && platform
                            .as_ref()
                            .is_none_or(|p| u.platform.as_ref() == Some(p))
                }
                Purge::Module {
                    host,
                    name,
                    version,
                } => {
                    u.kind == inventory::Kind::Module
                        && &u.host == host
                        && &u.name == name
                        && &u.version == version
                }
            })
            .collect();
        if selected.is_empty() {
            return Ok(None);
        }
        let mut keys: Vec<StorageKey> = Vec::new();
        let mut bytes = 0;
        let chosen: HashSet<(&str, Option<&str>)> = selected
            .iter()
            .map(|u| (u.dir.as_str(), u.platform.as_deref()))
            .collect();
        for u in &selected {
            keys.extend(u.keys.iter().cloned());
            bytes += u.size;
        }
        // SHA256SUMS and its signature go when no platform of their version stays.
        for (dir, shared) in &inv.shared {
            let stays = inv.units.iter().any(|u| {
                &u.dir == dir && !chosen.contains(&(u.dir.as_str(), u.platform.as_deref()))
            });
            let touched = selected.iter().any(|u| &u.dir == dir);
            if touched && !stays {
                for o in shared {
                    keys.push(o.key.clone());
                    bytes += o.size;
                }
            }
        }
        // A whole provider: its version list too, so it is fetched again.
        if let Purge::Provider {
            host,
            name,
            version: None,
            ..
        } = what
        {
            if let Some(k) = StorageKey::parse(&format!("providers/{host}/{name}/versions.json")) {
                keys.push(k);
            }
        }
        keys.sort_by_key(deletion_rank);
        for key in &keys {
            self.storage
                .delete(key)
                .await
                .map_err(|e| CacheError::Unavailable(e.to_string()))?;
        }
        self.forget_finished_fills(&keys);
        Ok(Some(PurgeReport {
            removed: selected.iter().map(|u| u.label()).collect(),
            objects: keys.len(),
            bytes,
        }))
    }

    /// Sets or removes a pin mark (`pins/...`), which every replica's eviction honours; `by`
    /// says who set it (`warm`, `admin`).
    pub async fn set_pin(
        &self,
        key: &StorageKey,
        pinned: bool,
        by: &str,
    ) -> Result<(), CacheError> {
        let unavailable = |e: crate::storage::StorageError| CacheError::Unavailable(e.to_string());
        if pinned {
            let data = serde_json::to_vec(&serde_json::json!({
                "pinned_at": crate::storage::unix_now(),
                "by": by,
            }))
            .expect("serializes");
            let meta = crate::storage::ObjectMeta::new(
                data.len() as u64,
                sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &data))
                    .into(),
                "application/json",
            );
            self.storage
                .put_bytes(key, &data, &meta)
                .await
                .map_err(unavailable)
        } else {
            self.storage.delete(key).await.map_err(unavailable)
        }
    }

    /// Whether a pin mark is stored.
    pub async fn is_pinned(&self, key: &StorageKey) -> Result<bool, CacheError> {
        self.storage
            .meta(key)
            .await
            .map(|m| m.is_some())
            .map_err(|e| CacheError::Unavailable(e.to_string()))
    }
}
