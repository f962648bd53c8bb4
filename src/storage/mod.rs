//! Where cached objects live. Objects become visible only when complete: bytes are staged, then
//! published under their final key, then the sidecar metadata is written. An object whose sidecar
//! is missing does not exist.

mod local;

pub use local::LocalStore;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// A storage key: `/`-separated segments, each already validated by the cache layer, which is the
/// one place keys are built.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey(String);

impl StorageKey {
    /// Joins validated segments. Panics in debug builds on a segment that could escape a folder;
    /// the cache layer only passes validated names.
    pub fn from_segments<I, S>(segments: I) -> StorageKey
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let parts: Vec<String> = segments
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        debug_assert!(
            parts
                .iter()
                .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains(['/', '\\', '\0']))
        );
        StorageKey(parts.join("/"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sidecar: what the backends cannot hold themselves. Identical for every backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectMeta {
    pub size: u64,
    /// Lower-case hex sha256 of the stored bytes.
    pub sha256: String,
    pub content_type: String,
    /// Where the bytes came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_url: Option<String>,
    /// Seconds since the Unix epoch when the bytes were fetched.
    pub fetched_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// Verification facts (signing key, unsigned) and anything a later version adds.
    #[serde(default, flatten)]
    pub extra: Map<String, Value>,
}

impl ObjectMeta {
    pub fn new(size: u64, sha256: [u8; 32], content_type: &str) -> ObjectMeta {
        ObjectMeta {
            size,
            sha256: hex::encode(sha256),
            content_type: content_type.to_owned(),
            origin_url: None,
            fetched_at: unix_now(),
            etag: None,
            last_modified: None,
            extra: Map::new(),
        }
    }

    /// Seconds since the object was fetched.
    pub fn age_secs(&self) -> u64 {
        unix_now().saturating_sub(self.fetched_at)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt sidecar for {0}")]
    CorruptMeta(String),
}

/// An object opened for reading: its sidecar and a file positioned at its start.
pub struct StoredObject {
    pub meta: ObjectMeta,
    pub file: tokio::fs::File,
}

/// The configured backend.
#[derive(Debug, Clone)]
pub enum Storage {
    Local(LocalStore),
}

impl Storage {
    /// A directory for spool files that `publish_file` can take over cheaply.
    pub fn spool_dir(&self) -> PathBuf {
        match self {
            Storage::Local(s) => s.spool_dir(),
        }
    }

    pub async fn open(&self, key: &StorageKey) -> Result<Option<StoredObject>, StorageError> {
        match self {
            Storage::Local(s) => s.open(key).await,
        }
    }

    /// Reads a small object whole, checking its bytes against the sidecar's sha256.
    pub async fn get_bytes(
        &self,
        key: &StorageKey,
    ) -> Result<Option<(ObjectMeta, bytes::Bytes)>, StorageError> {
        match self {
            Storage::Local(s) => s.get_bytes(key).await,
        }
    }

    /// Writes a small object whole, atomically.
    pub async fn put_bytes(
        &self,
        key: &StorageKey,
        data: &[u8],
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        match self {
            Storage::Local(s) => s.put_bytes(key, data, meta).await,
        }
    }

    /// Publishes a complete, verified spool file under `key`. The spool file is consumed.
    pub async fn publish_file(
        &self,
        key: &StorageKey,
        spool: &std::path::Path,
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        match self {
            Storage::Local(s) => s.publish_file(key, spool, meta).await,
        }
    }
}
