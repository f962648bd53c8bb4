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
