//! The verification record of a stored unit, for the status page: what each of its objects is,
//! where it came from and when, and how it was checked (the SHA256SUMS entry and the key that
//! signed it for a provider zip; the source and the resolved commit for a module). Read from
//! the sidecars and the stored answers; nothing here asks an upstream.

use super::{Cache, CacheError, keys};
use crate::inventory::{Kind, Unit};
use crate::registry::provider::{ProviderDownload, Sha256Sums};
use crate::storage::{ObjectMeta, StorageKey};
use serde_json::{Value, json};

fn object_json(key: &StorageKey, meta: &ObjectMeta) -> Value {
    let mut v = json!({
        "key": key.as_str(),
        "size": meta.size,
        "sha256": meta.sha256,
        "content_type": meta.content_type,
        "fetched_at": meta.fetched_at,
    });
    if let Some(u) = &meta.origin_url {
        v["origin_url"] = u.as_str().into();
    }
    for (k, x) in &meta.extra {
        v[k] = x.clone();
    }
    v
}

impl Cache {
    /// The record of `unit` as the store holds it now.
    pub async fn unit_record(&self, unit: &Unit) -> Result<Value, CacheError> {
        let unavailable = |e: crate::storage::StorageError| CacheError::Unavailable(e.to_string());
        let mut objects = Vec::new();
        for key in &unit.keys {
            if let Some(meta) = self.storage.meta(key).await.map_err(unavailable)? {
                objects.push(object_json(key, &meta));
            }
        }
        let mut record = json!({
            "unit": unit,
            "label": unit.label(),
            "objects": objects,
        });
        match unit.kind {
            Kind::Provider => self.provider_record(unit, &mut record).await?,
            Kind::Module => self.module_record(unit, &mut record).await?,
        }
        Ok(record)
    }

    async fn provider_record(&self, unit: &Unit, record: &mut Value) -> Result<(), CacheError> {
        let Some(answer_key) = unit.keys.iter().find(|k| k.parent().ends_with("/download")) else {
            return Ok(());
        };
        let Some((_, answer)) = self.read_small(answer_key).await else {
            return Ok(());
        };
        let Ok(doc) = serde_json::from_slice::<ProviderDownload>(&answer) else {
            return Ok(());
        };
        let zip = unit.keys.iter().find(|k| k.leaf() == doc.filename).cloned();
        let zip_meta = match &zip {
            Some(k) => self.read_meta(k).await,
            None => None,
        };
        let sums_key = StorageKey::parse(&format!("{}/{}", unit.dir, keys::SUMS_NAME));
        let (sums_entry, sums_meta) = match &sums_key {
            Some(k) => match self.read_small(k).await {
                Some((meta, data)) => {
                    let entry = Sha256Sums::parse(&data)
                        .ok()
                        .and_then(|s| s.get(&doc.filename).map(hex::encode));
                    (entry, Some(meta))
                }
                None => (None, None),
            },
            None => (None, None),
        };
        let key_ids: Vec<Value> = doc
            .signing_keys
            .as_ref()
            .map(|k| {
                k.gpg_public_keys
                    .iter()
                    .filter_map(|g| g.extra.get("key_id").cloned())
                    .collect()
            })
            .unwrap_or_default();
        let signed_by = sums_meta
            .as_ref()
            .and_then(|m| m.extra.get("signed_by").cloned());
        let unsigned = sums_meta
            .as_ref()
            .and_then(|m| m.extra.get("unsigned"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let stored_sha = zip_meta.as_ref().map(|m| m.sha256.clone());
        record["verification"] = json!({
            "filename": doc.filename,
            "registry_shasum": doc.shasum,
            "stored_sha256": stored_sha,
            "sha256sums_entry": sums_entry,
            "agrees": stored_sha.is_some()
                && stored_sha.as_deref() == Some(doc.shasum.as_str())
                && sums_entry.as_deref() == Some(doc.shasum.as_str()),
            "signed_by": signed_by,
            "unsigned": unsigned,
            "signing_key_ids": key_ids,
            "fetched_at": zip_meta.as_ref().map(|m| m.fetched_at),
            "origin_url": zip_meta.as_ref().and_then(|m| m.origin_url.clone()),
            "sha256sums_url": sums_meta.as_ref().and_then(|m| m.origin_url.clone()),
        });
        Ok(())
    }

    async fn module_record(&self, unit: &Unit, record: &mut Value) -> Result<(), CacheError> {
        let find = |leaf: &str| unit.keys.iter().find(|k| k.leaf() == leaf).cloned();
        let mut source = Value::Null;
        if let Some(k) = find(super::modules::LOCATION)
            && let Some((_, data)) = self.read_small(&k).await
        {
            source = serde_json::from_slice(&data).unwrap_or(Value::Null);
        }
        let archive = unit
            .keys
            .iter()
            .find(|k| k.leaf().ends_with(".tar.gz") || k.leaf().ends_with(".zip"))
            .cloned();
        let meta = match &archive {
            Some(k) => self.read_meta(k).await,
            None => None,
        };
        record["verification"] = json!({
            "source": source,
            "archive": archive.as_ref().map(|k| k.leaf().to_owned()),
            "sha256": meta.as_ref().map(|m| m.sha256.clone()),
            "git_commit": meta.as_ref().and_then(|m| m.extra.get("git_commit").cloned()),
            "git_ref": meta.as_ref().and_then(|m| m.extra.get("git_ref").cloned()),
            "fetched_at": meta.as_ref().map(|m| m.fetched_at),
            "origin_url": meta.as_ref().and_then(|m| m.origin_url.clone()),
        });
        Ok(())
    }

    async fn read_meta(&self, key: &StorageKey) -> Option<ObjectMeta> {
        self.storage.meta(key).await.ok().flatten()
    }
}
