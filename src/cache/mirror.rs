//! The provider network mirror protocol: `index.json` lists versions, `{version}.json` lists
//! every platform with TerraPeak's archive URL and its hashes: `zh:` from the verified SHA256SUMS
//! (no zip download needed) and `h1:` once the zip has passed through TerraPeak.

use super::keys::{self, ProviderFile, ProviderRelease};
use super::{Body, Cache, CacheError, CacheStatus, Served, dirhash, store_behind};
use crate::registry::provider::ProviderVersions;
use crate::registry::{Arch, FileName, Host, Os, Platform, ProviderName, Version};
use crate::storage::ObjectMeta;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

impl Cache {
    async fn parsed_versions(
        &self,
        host: &Host,
        name: &ProviderName,
    ) -> Result<(CacheStatus, ProviderVersions), CacheError> {
        let served = self.provider_versions(host, name).await?;
        let Body::Bytes(data) = served.body else {
            return Err(CacheError::Internal("version list is not in memory".into()));
        };
        let doc = serde_json::from_slice(&data).map_err(|e| CacheError::Internal(e.to_string()))?;
        Ok((served.status, doc))
    }

    /// `GET /v1/mirror/{host}/{ns}/{type}/index.json`
    pub async fn mirror_index(
        &self,
        host: &Host,
        name: &ProviderName,
    ) -> Result<Served, CacheError> {
        let (status, doc) = self.parsed_versions(host, name).await?;
        let versions: Map<String, Value> = doc
            .versions
            .iter()
            .filter(|v| Version::try_from(v.version.as_str()).is_ok())
            .map(|v| (v.version.clone(), json!({})))
            .collect();
        let body = serde_json::to_vec(&json!({ "versions": versions })).expect("serializes");
        Ok(Served::json(status, Bytes::from(body)))
    }

    /// `GET /v1/mirror/{host}/{ns}/{type}/{version}.json`. Answers from download answers and the
    /// verified SHA256SUMS only; it never waits for a zip.
    pub async fn mirror_version(
        &self,
        host: &Host,
        name: &ProviderName,
        version: &Version,
        links: &super::Links,
    ) -> Result<Served, CacheError> {
        let (mut status, doc) = self.parsed_versions(host, name).await?;
        let entry = doc
            .versions
            .iter()
            .find(|v| v.version == version.as_str())
            .ok_or_else(|| {
                CacheError::NotFound(format!("{host}/{name} has no version {version}"))
            })?;
        let platforms: Vec<Platform> = entry
            .extra
            .get("platforms")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(Platform {
                    os: Os::try_from(p.get("os")?.as_str()?).ok()?,
                    arch: Arch::try_from(p.get("arch")?.as_str()?).ok()?,
                })
            })
            .collect();
        let releases: Vec<ProviderRelease> = platforms
            .into_iter()
            .map(|platform| ProviderRelease {
                host: host.clone(),
                name: name.clone(),
                version: version.clone(),
                platform,
            })
            .collect();
        let docs =
            futures_util::future::join_all(releases.iter().map(|r| self.download_doc(r))).await;
        let mut archives = Map::new();
        let mut sums = None;
        let mut first_error = None;
        for (r, result) in releases.iter().zip(docs) {
            let (doc_status, doc) = match result {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(release = %r, error = %e, "platform left out of the mirror answer");
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            if doc_status == CacheStatus::Miss {
                status = CacheStatus::Miss;
            }
            // Every platform of a version shares one SHA256SUMS: verify it once.
            if sums.is_none() {
                sums = Some(self.verified_sums(r, &doc).await?.0);
            }
            let sums = sums.as_ref().expect("set above");
            let file = FileName::try_from(doc.filename.as_str())
                .map_err(|e| CacheError::Internal(e.to_string()))?;
            let Some(digest) = sums.get(&doc.filename) else {
                return Err(CacheError::Integrity(format!(
                    "SHA256SUMS does not list {}",
                    doc.filename
                )));
            };
            if doc.expected_sha256().as_ref() != Some(digest) {
                return Err(CacheError::Integrity(format!(
                    "SHA256SUMS disagrees with the registry about {}",
                    doc.filename
                )));
            }
            let mut hashes = vec![Value::from(format!("zh:{}", hex::encode(digest)))];
            if let Some(h1) = self.h1_of_stored_zip(r, &file).await {
                hashes.insert(0, Value::from(h1));
            }
            let zip = ProviderFile::Zip(file);
            archives.insert(
                r.platform.to_string(),
                json!({ "url": links.artifact(&keys::provider_artifact_path(r, &zip)), "hashes": hashes }),
            );
        }
        if archives.is_empty() {
            return Err(first_error.unwrap_or_else(|| {
                CacheError::NotFound(format!("{host}/{name} {version} lists no platforms"))
            }));
        }
        let body = serde_json::to_vec(&json!({ "archives": archives })).expect("serializes");
        Ok(Served::json(status, Bytes::from(body)))
    }

    /// The `h1:` hash of a provider zip TerraPeak holds, computed once and kept beside it.
    async fn h1_of_stored_zip(&self, r: &ProviderRelease, file: &FileName) -> Option<String> {
        let h1_key = keys::provider_h1(r, file);
        if let Some((_, data)) = self.read_small(&h1_key).await {
            return String::from_utf8(data.to_vec()).ok();
        }
        let stored = self
            .storage
            .open(&keys::provider_file(r, &ProviderFile::Zip(file.clone())))
            .await
            .ok()??;
        let std_file = stored
            .into_local_file(&self.storage.spool_dir())
            .await
            .inspect_err(|e| tracing::warn!(release = %r, error = %e, "cannot read a stored zip"))
            .ok()?;
        let h1 = tokio::task::spawn_blocking(move || {
            dirhash::hash1_zip(std::io::BufReader::new(std_file))
        })
        .await
        .ok()?
        .inspect_err(
            |e| tracing::warn!(release = %r, error = %e, "cannot compute h1 of a stored zip"),
        )
        .ok()?;
        let meta = ObjectMeta::new(
            h1.len() as u64,
            Sha256::digest(h1.as_bytes()).into(),
            "text/plain",
        );
        store_behind(&self.storage, &h1_key, Bytes::from(h1.clone()), meta);
        Some(h1)
    }
}
