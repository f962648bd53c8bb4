//! The local-directory backend.
//!
//! Layout under the root: `data/<key>` holds the bytes, `meta/<key>.json` the sidecar, and
//! `staging/` the files being written. Publishing renames within one filesystem, so a reader
//! sees the old object or the new one, never a part. Staging is emptied at start-up: whatever a
//! killed process left there was never published.

use super::{ObjectMeta, StorageError, StorageKey, StoredObject};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io_err(key: &StorageKey) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        key: key.to_string(),
        source,
    }
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root` and clears its staging area.
    pub async fn open_root(root: &Path) -> io::Result<LocalStore> {
        let store = LocalStore {
            root: root.to_path_buf(),
        };
        for dir in ["data", "meta"] {
            tokio::fs::create_dir_all(root.join(dir)).await?;
        }
        let staging = store.spool_dir();
        match tokio::fs::remove_dir_all(&staging).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        tokio::fs::create_dir_all(&staging).await?;
        Ok(store)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn data_path(&self, key: &StorageKey) -> PathBuf {
        self.root.join("data").join(key.as_str())
    }

    fn meta_path(&self, key: &StorageKey) -> PathBuf {
        self.root
            .join("meta")
            .join(format!("{}.json", key.as_str()))
    }

    fn staging_path(&self) -> PathBuf {
        self.spool_dir()
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    async fn head(&self, key: &StorageKey) -> Result<Option<ObjectMeta>, StorageError> {
        let raw = match tokio::fs::read(self.meta_path(key)).await {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(key)(e)),
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|_| StorageError::CorruptMeta(key.to_string()))
    }

    pub async fn open(&self, key: &StorageKey) -> Result<Option<StoredObject>, StorageError> {
        let Some(meta) = self.head(key).await? else {
            return Ok(None);
        };
        let file = match tokio::fs::File::open(self.data_path(key)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(key)(e)),
        };
        let len = file.metadata().await.map_err(io_err(key))?.len();
        if len != meta.size {
            // Replaced between the two reads, or damaged: never serve bytes that do not match.
            tracing::warn!(key = %key, expected = meta.size, found = len, "stored object size does not match its sidecar");
            return Ok(None);
        }
        Ok(Some(StoredObject { meta, file }))
    }

    pub async fn get_bytes(
        &self,
        key: &StorageKey,
    ) -> Result<Option<(ObjectMeta, Bytes)>, StorageError> {
        // A small mutable object may be replaced between reading its sidecar and its bytes;
        // one retry settles that race.
        for _ in 0..2 {
            let Some(meta) = self.head(key).await? else {
                return Ok(None);
            };
            let data = match tokio::fs::read(self.data_path(key)).await {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(key)(e)),
            };
            if hex::encode(Sha256::digest(&data)) == meta.sha256 {
                return Ok(Some((meta, Bytes::from(data))));
            }
        }
        tracing::warn!(key = %key, "stored object does not match its sidecar; treating as absent");
        Ok(None)
    }

    async fn write_staged(&self, key: &StorageKey, data: &[u8]) -> Result<PathBuf, StorageError> {
        let path = self.staging_path();
        let result = async {
            let mut f = tokio::fs::File::create(&path).await?;
            f.write_all(data).await?;
            f.sync_data().await?;
            Ok::<_, io::Error>(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(io_err(key)(e));
        }
        Ok(path)
    }

    async fn rename_into(
        &self,
        key: &StorageKey,
        from: &Path,
        to: &Path,
    ) -> Result<(), StorageError> {
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err(key))?;
        }
        tokio::fs::rename(from, to).await.map_err(io_err(key))
    }

    async fn write_meta(&self, key: &StorageKey, meta: &ObjectMeta) -> Result<(), StorageError> {
        let json = serde_json::to_vec(meta).expect("sidecar serializes");
        let staged = self.write_staged(key, &json).await?;
        let result = self.rename_into(key, &staged, &self.meta_path(key)).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&staged).await;
        }
        result
    }

    pub async fn put_bytes(
        &self,
        key: &StorageKey,
        data: &[u8],
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        let staged = self.write_staged(key, data).await?;
        self.publish_file(key, &staged, meta).await
    }

    pub async fn publish_file(
        &self,
        key: &StorageKey,
        spool: &Path,
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        if let Err(e) = self.rename_into(key, spool, &self.data_path(key)).await {
            let _ = tokio::fs::remove_file(spool).await;
            return Err(e);
        }
        self.write_meta(key, meta).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_for(data: &[u8]) -> ObjectMeta {
        ObjectMeta::new(
            data.len() as u64,
            Sha256::digest(data).into(),
            "application/json",
        )
    }

    #[tokio::test]
    async fn put_then_read_back_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path()).await.unwrap();
        let key = StorageKey::from_segments(["providers", "h", "ns", "t", "versions.json"]);
        assert!(store.get_bytes(&key).await.unwrap().is_none());
        store
            .put_bytes(&key, b"one", &meta_for(b"one"))
            .await
            .unwrap();
        let (meta, data) = store.get_bytes(&key).await.unwrap().unwrap();
        assert_eq!((&data[..], meta.size), (&b"one"[..], 3));
        store
            .put_bytes(&key, b"second", &meta_for(b"second"))
            .await
            .unwrap();
        assert_eq!(
            &store.get_bytes(&key).await.unwrap().unwrap().1[..],
            b"second"
        );
        let opened = store.open(&key).await.unwrap().unwrap();
        assert_eq!(opened.meta.size, 6);
        // Nothing is left in staging after successful writes.
        assert_eq!(std::fs::read_dir(store.spool_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn bytes_without_a_sidecar_do_not_exist_and_staging_is_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path()).await.unwrap();
        let key = StorageKey::from_segments(["a", "b.zip"]);
        std::fs::create_dir_all(dir.path().join("data/a")).unwrap();
        std::fs::write(dir.path().join("data/a/b.zip"), b"partial").unwrap();
        std::fs::write(store.spool_dir().join("leftover"), b"partial").unwrap();
        assert!(store.open(&key).await.unwrap().is_none());
        let store = LocalStore::open_root(dir.path()).await.unwrap();
        assert_eq!(std::fs::read_dir(store.spool_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_sidecar_that_disagrees_with_the_bytes_hides_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path()).await.unwrap();
        let key = StorageKey::from_segments(["k"]);
        store
            .put_bytes(&key, b"good", &meta_for(b"good"))
            .await
            .unwrap();
        std::fs::write(dir.path().join("data/k"), b"evil").unwrap();
        assert!(store.get_bytes(&key).await.unwrap().is_none());
        std::fs::write(dir.path().join("data/k"), b"longer").unwrap();
        assert!(store.open(&key).await.unwrap().is_none());
    }
}
