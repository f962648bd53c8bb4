//! Sealed mode (`cache.offline`): no upstream is ever asked, version lists list only what the
//! store holds (so a constraint resolves to a version the enclave has), and a miss says what is
//! missing and how to bring it in.

use super::keys::{self, ProviderFile, ProviderRelease};
use super::{Cache, CacheError, CacheStatus, Served};
use crate::registry::module::{ArchiveKind, ModuleVersions};
use crate::registry::provider::{ProviderDownload, ProviderVersions};
use crate::registry::{FileName, Host, ModuleAddress, Platform, ProviderName, Version};
use crate::storage::StorageKey;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet};

impl Cache {
    /// Whether this TerraPeak is sealed: nothing is fetched, everything comes from the store.
    pub fn sealed(&self) -> bool {
        self.offline
    }

    /// The 404 for something a sealed TerraPeak does not hold, counted by `kind` (provider,
    /// module).
    pub(crate) fn sealed_miss(&self, kind: &'static str, what: &str) -> CacheError {
        self.metrics.offline_misses.with_label_values(&[kind]).inc();
        let message = format!(
            "{what} is not in this sealed TerraPeak (cache.offline: no upstream is asked); \
             warm it on a connected TerraPeak (terrapeak warm), export a bundle there \
             (terrapeak export) and import it here (terrapeak import)"
        );
        self.metrics.problems.record(crate::status::Problem {
            at: crate::storage::unix_now(),
            class: "offline",
            status: Some(404),
            path: what.to_owned(),
            upstream: None,
            message: message.clone(),
        });
        CacheError::NotFound(message)
    }

    /// A sealed version list built lately: building one lists the store (an S3 LIST) and
    /// reads the stored answers, so it is kept for `cache.versions_ttl`; an import shows up
    /// within that time.
    fn sealed_memo_get(&self, key: &StorageKey) -> Option<Bytes> {
        let memo = self.sealed_lists.lock().expect("sealed memo lock");
        memo.get(key)
            .filter(|(at, _)| at.elapsed() < self.versions_ttl)
            .map(|(_, data)| data.clone())
    }

    fn sealed_memo_put(&self, key: StorageKey, data: Bytes) {
        let mut memo = self.sealed_lists.lock().expect("sealed memo lock");
        // Bounded: drop what has expired, and everything if that is not enough.
        if memo.len() >= 10_000 {
            let ttl = self.versions_ttl;
            memo.retain(|_, (at, _)| at.elapsed() < ttl);
            if memo.len() >= 10_000 {
                memo.clear();
            }
        }
        memo.insert(key, (std::time::Instant::now(), data));
    }

    /// A refresh asked of a sealed TerraPeak.
    pub(crate) fn sealed_refresh(&self) -> CacheError {
        CacheError::Conflict(
            "this TerraPeak is sealed (cache.offline): version lists come from the store and are never refreshed from upstream".into(),
        )
    }

    /// Lists stored keys for sealed answers; a failing store is a 503, not a miss.
    async fn stored_keys(&self, prefix: &str) -> Result<HashSet<StorageKey>, CacheError> {
        self.storage
            .list(prefix)
            .await
            .map(|keys| keys.into_iter().collect())
            .map_err(|e| CacheError::Unavailable(e.to_string()))
    }

    /// The platforms of each version of a provider whose zip and SHA256SUMS are stored.
    pub(crate) async fn stored_provider_platforms(
        &self,
        host: &Host,
        name: &ProviderName,
    ) -> Result<BTreeMap<String, (Vec<Platform>, Option<Value>)>, CacheError> {
        let versions_key = keys::provider_versions(host, name);
        let prefix = versions_key.parent().to_owned();
        let stored = self.stored_keys(&prefix).await?;
        let mut found: BTreeMap<String, (Vec<Platform>, Option<Value>)> = BTreeMap::new();
        let mut docs: Vec<&StorageKey> = stored
            .iter()
            .filter(|k| k.parent().ends_with("/download") && k.leaf().ends_with(".json"))
            .collect();
        docs.sort();
        for doc_key in docs {
            let rest = &doc_key.as_str()[prefix.len() + 1..];
            let Some((version, _)) = rest.split_once('/') else {
                continue;
            };
            let (Ok(version), Ok(platform)) = (
                Version::try_from(version),
                Platform::parse(doc_key.leaf().trim_end_matches(".json")),
            ) else {
                continue;
            };
            let Some((_, data)) = self.read_small(doc_key).await else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<ProviderDownload>(&data) else {
                continue;
            };
            let Ok(zip) = FileName::try_from(doc.filename.as_str()) else {
                continue;
            };
            let release = ProviderRelease {
                host: host.clone(),
                name: name.clone(),
                version,
                platform,
            };
            if !stored.contains(&keys::provider_file(&release, &ProviderFile::Zip(zip)))
                || !stored.contains(&keys::provider_file(&release, &ProviderFile::Sums))
            {
                continue;
            }
            let entry = found
                .entry(release.version.to_string())
                .or_insert_with(|| (Vec::new(), doc.extra.get("protocols").cloned()));
            entry.0.push(release.platform);
        }
        Ok(found)
    }

    /// A sealed provider version list: the stored list (whatever its age) narrowed to the
    /// versions and platforms whose zips are stored, or one built from the store alone.
    pub(crate) async fn sealed_provider_versions(
        &self,
        host: &Host,
        name: &ProviderName,
    ) -> Result<Served, CacheError> {
        let memo_key = keys::provider_versions(host, name);
        if let Some(data) = self.sealed_memo_get(&memo_key) {
            return Ok(Served::json(CacheStatus::Hit, data));
        }
        let present = self.stored_provider_platforms(host, name).await?;
        if present.is_empty() {
            return Err(self.sealed_miss("provider", &format!("provider {host}/{name}")));
        }
        let platform_json = |p: &Platform| json!({"os": p.os.as_str(), "arch": p.arch.as_str()});
        let cached = self
            .read_small(&keys::provider_versions(host, name))
            .await
            .and_then(|(_, data)| serde_json::from_slice::<ProviderVersions>(&data).ok());
        let doc = match cached {
            Some(mut doc) => {
                let mut listed = BTreeSet::new();
                doc.versions.retain_mut(|entry| {
                    let Some((platforms, _)) = present.get(&entry.version) else {
                        return false;
                    };
                    listed.insert(entry.version.clone());
                    entry.extra.insert(
                        "platforms".into(),
                        Value::Array(platforms.iter().map(platform_json).collect()),
                    );
                    true
                });
                // Imported versions the stored list does not know (it predates them).
                for (version, (platforms, protocols)) in &present {
                    if !listed.contains(version) {
                        let entry = synthesized_entry(version, platforms, protocols);
                        doc.versions
                            .push(serde_json::from_value(entry).expect("an entry's shape"));
                    }
                }
                serde_json::to_value(doc).expect("serializes")
            }
            None => json!({
                "versions": present
                    .iter()
                    .map(|(v, (platforms, protocols))| synthesized_entry(v, platforms, protocols))
                    .collect::<Vec<_>>()
            }),
        };
        let data = Bytes::from(serde_json::to_vec(&doc).expect("serializes"));
        self.sealed_memo_put(memo_key, data.clone());
        Ok(Served::json(CacheStatus::Hit, data))
    }

    /// The versions of a module whose location and archive are stored.
    pub(crate) async fn stored_module_versions(
        &self,
        host: &Host,
        module: &ModuleAddress,
    ) -> Result<BTreeSet<String>, CacheError> {
        let versions_key = keys::module_versions(host, module);
        let prefix = versions_key.parent().to_owned();
        let stored = self.stored_keys(&prefix).await?;
        let mut located = BTreeSet::new();
        let mut archived = BTreeSet::new();
        for key in &stored {
            let rest = &key.as_str()[prefix.len() + 1..];
            let Some((version, leaf)) = rest.split_once('/') else {
                continue;
            };
            if Version::try_from(version).is_err() {
                continue;
            }
            if leaf == super::modules::LOCATION {
                located.insert(version.to_owned());
            } else if is_archive_leaf(leaf) {
                archived.insert(version.to_owned());
            }
        }
        Ok(located.intersection(&archived).cloned().collect())
    }

    /// A sealed module version list: the stored versions whose archive is stored.
    pub(crate) async fn sealed_module_versions(
        &self,
        host: &Host,
        module: &ModuleAddress,
    ) -> Result<Served, CacheError> {
        let memo_key = keys::module_versions(host, module);
        if let Some(data) = self.sealed_memo_get(&memo_key) {
            return Ok(Served::json(CacheStatus::Hit, data));
        }
        let present = self.stored_module_versions(host, module).await?;
        if present.is_empty() {
            return Err(self.sealed_miss("module", &format!("module {host}/{module}")));
        }
        let cached = self
            .read_small(&keys::module_versions(host, module))
            .await
            .and_then(|(_, data)| serde_json::from_slice::<ModuleVersions>(&data).ok());
        let doc = match cached {
            Some(mut doc) if !doc.modules.is_empty() => {
                let mut listed = BTreeSet::new();
                for entry in &mut doc.modules {
                    entry.versions.retain(|v| present.contains(&v.version));
                    listed.extend(entry.versions.iter().map(|v| v.version.clone()));
                }
                let missing: Vec<Value> = present
                    .iter()
                    .filter(|v| !listed.contains(*v))
                    .map(|v| json!({ "version": v }))
                    .collect();
                let mut value = serde_json::to_value(doc).expect("serializes");
                if let Some(list) = value["modules"][0]["versions"].as_array_mut() {
                    list.extend(missing);
                }
                value
            }
            _ => json!({
                "modules": [{
                    "versions": present.iter().map(|v| json!({ "version": v })).collect::<Vec<_>>()
                }]
            }),
        };
        let data = Bytes::from(serde_json::to_vec(&doc).expect("serializes"));
        self.sealed_memo_put(memo_key, data.clone());
        Ok(Served::json(CacheStatus::Hit, data))
    }
}

fn synthesized_entry(version: &str, platforms: &[Platform], protocols: &Option<Value>) -> Value {
    json!({
        "version": version,
        "protocols": protocols.clone().unwrap_or_else(|| json!(["5.0"])),
        "platforms": platforms
            .iter()
            .map(|p| json!({"os": p.os.as_str(), "arch": p.arch.as_str()}))
            .collect::<Vec<_>>(),
    })
}

/// Whether a module version's file is an archive TerraPeak serves: `module.<ext>` from an
/// archive source, or `git-<commit>.tar.gz` from a git source.
pub fn is_archive_leaf(leaf: &str) -> bool {
    [
        ArchiveKind::TarGz,
        ArchiveKind::Zip,
        ArchiveKind::TarXz,
        ArchiveKind::TarBz2,
    ]
    .iter()
    .any(|k| k.file_name() == leaf)
        || (leaf.starts_with("git-") && leaf.ends_with(".tar.gz"))
}
