//! Where cached objects live, behind `object_store`: a local directory or an S3-compatible bucket.
//!
//! Objects become visible only when complete: bytes are published under their final key first
//! (a rename within one filesystem, or a completed S3 upload), then the sidecar metadata is
//! written. An object whose sidecar is missing does not exist. The sidecar is the same JSON for
//! every backend.
//!
//! Layout, under the directory or the bucket's key prefix: `data/<key>` holds the bytes and
//! `meta/<key>.json` the sidecar. Artifact fills spool to a local directory (`staging/` under
//! `storage.file.path`), which is emptied at start-up: whatever a killed process left there was
//! never published.

mod behind;
pub(crate) mod buffers;
pub mod health;
mod s3;

use crate::config::MinioConfig;
use crate::metrics::Metrics;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use health::{Health, Reason, Side};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

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

    /// A key from outside (a bundle entry): `None` unless every segment is a plain name that
    /// cannot climb out of its folder.
    pub fn parse(s: &str) -> Option<StorageKey> {
        let ok = !s.is_empty()
            && s.split('/').all(|p| {
                !p.is_empty()
                    && p != "."
                    && p != ".."
                    && !p.contains(['\\', '\0'])
                    && !p.chars().any(char::is_control)
            });
        ok.then(|| StorageKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Everything before the last segment.
    pub fn parent(&self) -> &str {
        self.0.rsplit_once('/').map_or("", |(p, _)| p)
    }

    /// The last segment.
    pub fn leaf(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, l)| l)
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
        source: io::Error,
    },
    #[error("storage {operation} of {key} failed: {message}")]
    Store {
        operation: &'static str,
        key: String,
        message: String,
        reason: Reason,
    },
    #[error("corrupt sidecar for {0}")]
    CorruptMeta(String),
    #[error("the store failed moments ago; not asking it again yet")]
    Unavailable,
}

/// An object opened for reading: its sidecar and a handle on its bytes.
pub struct StoredObject {
    pub meta: ObjectMeta,
    body: StoredBody,
    /// Marks the object in use (eviction leaves it alone) until its stream ends.
    in_use: Option<InUse>,
}

/// Keys being read right now, with how many readers each.
type InUseMap = Arc<Mutex<std::collections::HashMap<StorageKey, usize>>>;

/// One reader of a stored object; eviction skips objects with readers.
struct InUse {
    map: InUseMap,
    key: StorageKey,
}

impl InUse {
    fn new(map: &InUseMap, key: &StorageKey) -> InUse {
        *map.lock()
            .expect("in-use lock")
            .entry(key.clone())
            .or_default() += 1;
        InUse {
            map: map.clone(),
            key: key.clone(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("in-use lock");
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

enum StoredBody {
    /// A local file, read directly.
    File(tokio::fs::File),
    /// A remote object, fetched (by range) when read.
    Remote {
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
    },
    /// A small object whose write to the store is still under way.
    Memory(Bytes),
}

impl StoredObject {
    /// Streams bytes `start..end` of the object.
    pub async fn stream(
        self,
        start: u64,
        end: u64,
    ) -> Result<BoxStream<'static, io::Result<Bytes>>, StorageError> {
        let in_use = self.in_use;
        let stream = match self.body {
            StoredBody::File(file) => file_stream(file.into_std().await, start, end - start),
            StoredBody::Memory(data) => {
                let end = (end as usize).min(data.len());
                let part = data.slice((start as usize).min(end)..end);
                futures_util::stream::once(async move { Ok(part) }).boxed()
            }
            StoredBody::Remote { store, path } => {
                if start == end {
                    return Ok(futures_util::stream::empty().boxed());
                }
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(start..end)),
                    ..Default::default()
                };
                let got = store
                    .get_opts(&path, opts)
                    .await
                    .map_err(|e| store_err("read", &path, e))?;
                // The object's whole size comes with the ranged answer: bytes that do not match
                // the sidecar (replaced between the two reads, or damaged) are never served.
                if got.meta.size != self.meta.size {
                    return Err(StorageError::Store {
                        operation: "read",
                        key: path.to_string(),
                        message: format!(
                            "{} bytes stored, the sidecar says {}",
                            got.meta.size, self.meta.size
                        ),
                        reason: Reason::Store,
                    });
                }
                got.into_stream()
                    .map(|r| r.map_err(io::Error::other))
                    .boxed()
            }
        };
        // The reader's mark lives as long as the stream.
        Ok(match in_use {
            Some(mark) => stream
                .map(move |chunk| {
                    let _ = &mark;
                    chunk
                })
                .boxed(),
            None => stream,
        })
    }

    /// The object as a local file positioned at its start, for readers that need to seek
    /// (zip parsing). A remote object is copied into an unlinked spool file first.
    pub async fn into_local_file(self, spool_dir: &Path) -> io::Result<std::fs::File> {
        match self.body {
            StoredBody::File(f) => Ok(f.into_std().await),
            body @ (StoredBody::Remote { .. } | StoredBody::Memory(_)) => {
                let size = self.meta.size;
                let tmp = spool_dir.join(uuid::Uuid::new_v4().simple().to_string());
                let mut out = tokio::fs::File::create_new(&tmp).await?;
                let _ = tokio::fs::remove_file(&tmp).await;
                let obj = StoredObject {
                    meta: self.meta,
                    body,
                    in_use: self.in_use,
                };
                let mut stream = obj.stream(0, size).await.map_err(io::Error::other)?;
                while let Some(chunk) = stream.next().await {
                    tokio::io::AsyncWriteExt::write_all(&mut out, &chunk?).await?;
                }
                tokio::io::AsyncWriteExt::flush(&mut out).await?;
                out.seek(io::SeekFrom::Start(0)).await?;
                Ok(out.into_std().await)
            }
        }
    }
}

/// Streams bytes `start..start + len` of `file` by positioned reads on the blocking pool, each
/// into a pooled buffer (see [`buffers`]) that goes straight to the client.
fn file_stream(file: std::fs::File, start: u64, len: u64) -> BoxStream<'static, io::Result<Bytes>> {
    let file = Arc::new(file);
    futures_util::stream::try_unfold((file, start, start + len), |(file, pos, end)| async move {
        if pos >= end {
            return Ok(None);
        }
        let reader = file.clone();
        let buf = buffers::buffer(end - pos);
        let chunk = tokio::task::spawn_blocking(move || buf.read_at(&reader, pos))
            .await
            .map_err(io::Error::other)??;
        let next = pos + chunk.len() as u64;
        Ok(Some((chunk, (file, next, end))))
    })
    .boxed()
}

fn store_err(operation: &'static str, path: &ObjectPath, e: object_store::Error) -> StorageError {
    StorageError::Store {
        operation,
        key: path.to_string(),
        reason: Reason::of_error(&e),
        message: with_causes(&e),
    }
}

/// An error's message followed by those of its causes that it does not already include
/// ("error sending request" alone does not say that the connection was reset).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl StorageError {
    /// The failure's class, or `None` for outcomes that say nothing about the store's health
    /// (a damaged sidecar, or a call skipped during a cool-down).
    pub fn reason(&self) -> Option<Reason> {
        match self {
            StorageError::Io { source, .. } => Some(Reason::of_io(source)),
            StorageError::Store { reason, .. } => Some(*reason),
            StorageError::CorruptMeta(_) | StorageError::Unavailable => None,
        }
    }
}

/// Which kind of store holds the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    S3,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::S3 => "s3",
        }
    }
}

/// Objects at least this large are uploaded to S3 in parts.
const MULTIPART_THRESHOLD: u64 = 8 << 20;
/// S3 part size for multipart uploads (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PART_CONCURRENCY: usize = 2;
/// Multipart uploads running at once; together with the part size this bounds upload memory.
const MAX_UPLOADS: usize = 4;

/// Total bytes of small objects (version lists, download answers, sums, records) kept in memory
/// in front of the store, so hot metadata is served without touching it.
const HOT_BUDGET: usize = 16 << 20;
/// Small objects larger than this are not kept in memory.
const HOT_MAX_OBJECT: usize = 1 << 20;

/// Recently read or written small objects, bounded by total size. When full, arbitrary entries
/// make room: the store still has everything.
#[derive(Default)]
struct Hot {
    map: std::collections::HashMap<StorageKey, (Arc<ObjectMeta>, Bytes)>,
    bytes: usize,
}

impl Hot {
    fn get(&self, key: &StorageKey) -> Option<(Arc<ObjectMeta>, Bytes)> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: &StorageKey, meta: Arc<ObjectMeta>, data: Bytes) {
        if data.len() > HOT_MAX_OBJECT {
            self.remove(key);
            return;
        }
        let cost = data.len() + key.as_str().len();
        if let Some((_, old)) = self.map.insert(key.clone(), (meta, data)) {
            self.bytes -= old.len() + key.as_str().len();
        }
        self.bytes += cost;
        while self.bytes > HOT_BUDGET {
            let Some(victim) = self.map.keys().find(|k| *k != key).cloned() else {
                break;
            };
            self.remove(&victim);
        }
    }

    fn remove(&mut self, key: &StorageKey) {
        if let Some((_, old)) = self.map.remove(key) {
            self.bytes -= old.len() + key.as_str().len();
        }
    }
}

/// The configured store. Cheap to clone.
#[derive(Clone)]
pub struct Storage(Arc<Inner>);

struct Inner {
    backend: Backend,
    /// Bulk reads and uploads: no overall deadline, only connect and idle limits.
    store: Arc<dyn ObjectStore>,
    /// Sidecars and small objects: a short overall deadline.
    small: Arc<dyn ObjectStore>,
    spool_dir: PathBuf,
    /// `spool_dir` relative to the local store's root (`staging`, or a command's own folder
    /// under it).
    spool_rel: String,
    /// Bytes that fills running now still expect to write into the spool directory.
    spool_reserved: Arc<std::sync::atomic::AtomicU64>,
    health: Health,
    uploads: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
    hot: Mutex<Hot>,
    /// Objects streaming to readers right now.
    in_use: InUseMap,
    /// Last reads of artifacts since the last flush, by key (seconds since the epoch).
    accessed: Mutex<std::collections::HashMap<StorageKey, u64>>,
    /// Last reads as flushed, so a flush writes only when one advanced by an hour (or is new).
    flushed: Mutex<std::collections::HashMap<StorageKey, u64>>,
    /// Told after every publish, so eviction can run when the store grew.
    published: Arc<tokio::sync::Notify>,
    /// Objects this process wrote or deleted so far (publishes, small writes, deletes).
    changes: std::sync::atomic::AtomicU64,
    /// Evicts to free bytes when a fill finds too little space (set when eviction is on).
    room: std::sync::OnceLock<RoomHook>,
    /// Small objects being written in the background (see [`behind`]).
    behind: behind::WriteBehind,
}

/// Frees at least the given number of bytes by eviction, if it can; says whether it removed
/// anything.
pub type RoomHook = Arc<dyn Fn(u64) -> BoxStream<'static, bool> + Send + Sync>;

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("backend", &self.0.backend)
            .field("store", &self.0.store.to_string())
            .finish_non_exhaustive()
    }
}

/// Free space set aside for one fill's spool file, given back when dropped.
pub struct SpoolReservation {
    reserved: Arc<std::sync::atomic::AtomicU64>,
    size: u64,
}

impl Drop for SpoolReservation {
    fn drop(&mut self) {
        self.reserved
            .fetch_sub(self.size, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Where replicas keep their access records: `_access/{replica}`.
const ACCESS_PREFIX: &str = "_access";

/// An access record's bytes: last read by key, in key order.
fn access_record(reads: &std::collections::HashMap<StorageKey, u64>) -> Vec<u8> {
    let map: std::collections::BTreeMap<&str, u64> =
        reads.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    serde_json::to_vec(&map).expect("serializes")
}

fn access_record_key(replica: &str) -> StorageKey {
    StorageKey::from_segments([ACCESS_PREFIX, replica])
}

/// The server's spool folder under the store's root; emptied at start-up.
pub const SERVER_SPOOL: &str = "staging";

/// `data/<key>`
fn data_path(key: &StorageKey) -> ObjectPath {
    ObjectPath::from(format!("data/{key}"))
}

/// `meta/<key>.json`
fn meta_path(key: &StorageKey) -> ObjectPath {
    ObjectPath::from(format!("meta/{key}.json"))
}

/// Empties (creating if needed) the local spool directory.
async fn reset_spool_dir(dir: &Path) -> io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::fs::create_dir_all(dir).await
}

impl Storage {
    /// A store in the local directory `root` (`data/`, `meta/`, `staging/`).
    pub async fn local(root: &Path, metrics: Arc<Metrics>) -> io::Result<Storage> {
        Storage::local_in(root, SERVER_SPOOL, metrics).await
    }

    /// A local store whose spool is `spool` under `root` (a command running beside a server
    /// uses a folder of its own, so neither empties the other's).
    pub async fn local_in(root: &Path, spool: &str, metrics: Arc<Metrics>) -> io::Result<Storage> {
        for dir in ["data", "meta"] {
            tokio::fs::create_dir_all(root.join(dir)).await?;
        }
        let spool_dir = root.join(spool);
        reset_spool_dir(&spool_dir).await?;
        let fs: Arc<dyn ObjectStore> = Arc::new(
            LocalFileSystem::new_with_prefix(root)
                .map_err(io::Error::other)?
                .with_fsync(true),
        );
        Ok(Storage::from_parts(
            Backend::File,
            fs.clone(),
            fs,
            (spool_dir, spool.to_owned()),
            metrics,
        ))
    }

    /// A store in an S3 bucket; artifacts spool under `spool_root/staging`.
    pub async fn s3(
        settings: &MinioConfig,
        spool_root: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<Storage, String> {
        Storage::s3_in(settings, spool_root, SERVER_SPOOL, metrics).await
    }

    /// An S3 store whose spool is `spool` under `spool_root`.
    pub async fn s3_in(
        settings: &MinioConfig,
        spool_root: &Path,
        spool: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Storage, String> {
        // The S3 client's TLS uses the process-wide rustls provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3::S3Handles { bulk, small } = s3::build(settings)?;
        let spool_dir = spool_root.join(spool);
        reset_spool_dir(&spool_dir)
            .await
            .map_err(|e| format!("{}: {e}", spool_dir.display()))?;
        Ok(Storage::from_parts(
            Backend::S3,
            bulk,
            small,
            (spool_dir, spool.to_owned()),
            metrics,
        ))
    }

    fn from_parts(
        backend: Backend,
        store: Arc<dyn ObjectStore>,
        small: Arc<dyn ObjectStore>,
        (spool_dir, spool_rel): (PathBuf, String),
        metrics: Arc<Metrics>,
    ) -> Storage {
        let storage = Storage(Arc::new(Inner {
            backend,
            store,
            small,
            spool_dir,
            spool_rel,
            spool_reserved: Arc::default(),
            health: Health::default(),
            uploads: tokio::sync::Semaphore::new(MAX_UPLOADS),
            metrics,
            hot: Mutex::new(Hot::default()),
            in_use: Arc::default(),
            accessed: Mutex::default(),
            flushed: Mutex::default(),
            published: Arc::new(tokio::sync::Notify::new()),
            changes: std::sync::atomic::AtomicU64::new(0),
            room: std::sync::OnceLock::new(),
            behind: Default::default(),
        }));
        // Every reason's series exists from the start, at 0.
        storage.sync_degraded_metric();
        storage
    }

    pub fn backend(&self) -> Backend {
        self.0.backend
    }

    /// A local directory for spool files that `publish_file` can take over.
    pub fn spool_dir(&self) -> PathBuf {
        self.0.spool_dir.clone()
    }

    /// Removes a command's own spool folder when it is done.
    pub async fn discard_spool(&self) {
        // Writes behind answers spool there too.
        self.settle_writes().await;
        if self.0.spool_rel != SERVER_SPOOL {
            let _ = tokio::fs::remove_dir_all(&self.0.spool_dir).await;
        }
    }

    /// Sets aside `size` bytes of the spool directory's free space for one artifact, when the
    /// filesystem has that much beyond `margin` and what other fills have set aside; else
    /// returns the free bytes. Space that cannot be measured is assumed to be there.
    pub fn reserve_spool(&self, size: u64, margin: u64) -> Result<SpoolReservation, u64> {
        use std::sync::atomic::Ordering;
        let reserved = &self.0.spool_reserved;
        let before = reserved.fetch_add(size, Ordering::AcqRel);
        let claim = SpoolReservation {
            reserved: reserved.clone(),
            size,
        };
        match rustix::fs::statvfs(&self.0.spool_dir) {
            Ok(fs) => {
                let free = fs.f_bavail.saturating_mul(fs.f_frsize);
                if free >= before.saturating_add(size).saturating_add(margin) {
                    Ok(claim)
                } else {
                    Err(free)
                }
            }
            Err(_) => Ok(claim),
        }
    }

    /// Whether new objects can be written: false for a moment after a write failed (a full or
    /// read-only disk, a failing bucket), so a miss goes straight to pass-through.
    pub fn writable(&self) -> bool {
        self.0.health.usable(Side::Write)
    }

    /// Whether reads can be asked of the store: false for a moment after a read failed.
    pub fn readable(&self) -> bool {
        self.0.health.usable(Side::Read)
    }

    /// Whether a write failed and none has succeeded since: an answer given meanwhile may not
    /// have been kept.
    pub fn write_degraded(&self) -> bool {
        self.0.health.degraded(Side::Write)
    }

    /// The sides of the store that are failing now, for `/readyz`.
    pub fn degradations(&self) -> Vec<health::Degradation> {
        self.0.health.report()
    }

    fn check(&self, side: Side) -> Result<(), StorageError> {
        if self.0.health.usable(side) {
            Ok(())
        } else {
            Err(StorageError::Unavailable)
        }
    }

    /// Notes the outcome of a store call in the metrics; failures (other than "not found")
    /// make the next calls on the same side skip the store for a moment.
    fn note<T>(
        &self,
        operation: &'static str,
        side: Side,
        started: Instant,
        result: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if !matches!(result, Err(StorageError::Unavailable)) {
            self.0.metrics.observe_storage(
                self.0.backend.as_str(),
                operation,
                started.elapsed(),
                result.is_ok(),
            );
        }
        match &result {
            Ok(_) => self.record_success(side),
            Err(e) => {
                if let Some(reason) = e.reason() {
                    self.record_failure(side, reason, e);
                }
            }
        }
        result
    }

    /// Whether an artifact fill may keep what it downloads: neither the spool nor the store
    /// failed a write moments ago.
    pub fn can_keep_artifacts(&self) -> bool {
        self.0.health.usable(Side::Spool) && self.0.health.usable(Side::Write)
    }

    /// An artifact's spool file could not be created or written.
    pub fn note_spool_failure(&self, e: &io::Error) {
        self.record_failure(Side::Spool, health::Reason::of_io(e), e);
    }

    /// An artifact's spool file took every byte.
    pub fn note_spool_success(&self) {
        self.record_success(Side::Spool);
    }

    /// Writes, syncs and removes a small spool file.
    async fn probe_spool(&self) -> io::Result<()> {
        let path = self
            .0
            .spool_dir
            .join(format!("probe-{}", uuid::Uuid::new_v4().simple()));
        let result = async {
            let mut f = tokio::fs::File::create_new(&path).await?;
            tokio::io::AsyncWriteExt::write_all(&mut f, b"probe").await?;
            // Tokio's file writes in the background: the write's own error surfaces in flush,
            // not in sync_data.
            tokio::io::AsyncWriteExt::flush(&mut f).await?;
            f.sync_data().await
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    fn record_success(&self, side: Side) {
        if let health::Change::Recovered { reason } = self.0.health.succeeded(side) {
            self.sync_degraded_metric();
            tracing::info!(
                backend = self.0.backend.as_str(),
                side = side.as_str(),
                after = reason.as_str(),
                "storage works again"
            );
        }
    }

    fn sync_degraded_metric(&self) {
        let now: Vec<Reason> = self.0.health.report().iter().map(|d| d.reason).collect();
        for reason in Reason::ALL {
            self.0
                .metrics
                .storage_degraded
                .with_label_values(&[reason.as_str()])
                .set(now.contains(&reason).into());
        }
    }

    fn record_failure(&self, side: Side, reason: Reason, e: &dyn std::fmt::Display) {
        let backend = self.0.backend.as_str();
        // A bucket that fails is a store fault whatever the transport said; only the local
        // spool has a disk to blame.
        let reason = match (self.0.backend, side) {
            (Backend::S3, Side::Read | Side::Write) => Reason::Store,
            _ => reason,
        };
        match self.0.health.failed(side, reason, e.to_string()) {
            health::Change::Failed { first, .. } => {
                self.sync_degraded_metric();
                match side {
                    Side::Write | Side::Spool => {
                        tracing::warn!(backend, side = side.as_str(), reason = reason.as_str(), error = %e, still = !first, "storage failed to write; cached objects are still served and everything new passes through from upstream")
                    }
                    Side::Read => {
                        tracing::warn!(backend, reason = reason.as_str(), error = %e, still = !first, "storage failed to read; serving from upstream until reads work again")
                    }
                }
            }
            health::Change::None | health::Change::Recovered { .. } => {}
        }
    }

    async fn get_small(&self, path: &ObjectPath) -> Result<Option<Bytes>, StorageError> {
        match self.0.small.get(path).await {
            Ok(got) => match got.bytes().await {
                Ok(b) => Ok(Some(b)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(store_err("read", path, e)),
            },
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("read", path, e)),
        }
    }

    async fn head(&self, key: &StorageKey) -> Result<Option<ObjectMeta>, StorageError> {
        let Some(raw) = self.get_small(&meta_path(key)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|_| StorageError::CorruptMeta(key.to_string()))
    }

    /// Every stored key under `prefix` (whole segments, e.g. `providers/registry.terraform.io`),
    /// from the sidecars: an object without one does not exist. Sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<StorageKey>, StorageError> {
        self.0.behind.settle().await;
        self.check(Side::Read)?;
        let started = Instant::now();
        let result = self.list_inner(prefix).await;
        self.note("list", Side::Read, started, result)
    }

    async fn list_inner(&self, prefix: &str) -> Result<Vec<StorageKey>, StorageError> {
        let base = ObjectPath::from(format!("meta/{}", prefix.trim_matches('/')));
        let mut listing = self.0.small.list(Some(&base));
        let mut keys = Vec::new();
        while let Some(item) = listing.next().await {
            let item = match item {
                Ok(i) => i,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(store_err("list", &base, e)),
            };
            let loc = item.location.as_ref();
            if let Some(key) = loc
                .strip_prefix("meta/")
                .and_then(|k| k.strip_suffix(".json"))
                .filter(|k| !k.starts_with("_probe/"))
            {
                keys.push(StorageKey(key.to_owned()));
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Whether a reader is streaming `key` now.
    pub fn in_use(&self, key: &StorageKey) -> bool {
        self.0.in_use.lock().expect("in-use lock").contains_key(key)
    }

    /// Sets how fills short of space make room (eviction); once.
    pub fn set_room_hook(&self, hook: RoomHook) {
        let _ = self.0.room.set(hook);
    }

    /// Asks eviction to free `bytes`; whether anything was removed (false without eviction).
    pub async fn make_room(&self, bytes: u64) -> bool {
        match self.0.room.get() {
            Some(hook) => hook(bytes).next().await.unwrap_or(false),
            None => false,
        }
    }

    /// Notified after every artifact publish.
    pub fn published(&self) -> Arc<tokio::sync::Notify> {
        self.0.published.clone()
    }

    /// A count of the writes and deletes this process made; a listing taken at one count is
    /// still this process's truth while the count stays.
    pub fn changes(&self) -> u64 {
        self.0.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn changed(&self) {
        self.0
            .changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every stored object under `prefix` with its size and when it was stored, from two
    /// listings (bytes and sidecars; an object without a sidecar does not exist), without
    /// reading any sidecar.
    pub async fn list_objects(
        &self,
        prefix: &str,
    ) -> Result<Vec<crate::inventory::Object>, StorageError> {
        self.0.behind.settle().await;
        self.check(Side::Read)?;
        let started = Instant::now();
        let result = async {
            let with_meta: std::collections::HashSet<StorageKey> =
                self.list_inner(prefix).await?.into_iter().collect();
            let base = ObjectPath::from(format!("data/{}", prefix.trim_matches('/')));
            let mut listing = self.0.small.list(Some(&base));
            let mut out = Vec::new();
            while let Some(item) = listing.next().await {
                let item = match item {
                    Ok(i) => i,
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(store_err("list", &base, e)),
                };
                let Some(key) = item.location.as_ref().strip_prefix("data/") else {
                    continue;
                };
                let key = StorageKey(key.to_owned());
                if with_meta.contains(&key) {
                    out.push(crate::inventory::Object {
                        key,
                        size: item.size,
                        stored_at: item.last_modified.timestamp().max(0) as u64,
                    });
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        }
        .await;
        self.note("list", Side::Read, started, result)
    }

    /// Removes an object: its sidecar first (from then on it does not exist), then its bytes.
    /// An open reader of a local file keeps reading it to the end.
    pub async fn delete(&self, key: &StorageKey) -> Result<(), StorageError> {
        // A write asked for before the delete never lands after it.
        self.0.behind.forget(key);
        self.0.behind.settle().await;
        self.check(Side::Write)?;
        let started = Instant::now();
        self.0.hot.lock().expect("hot lock").remove(key);
        let result = async {
            for path in [meta_path(key), data_path(key)] {
                match self.0.small.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(store_err("delete", &path, e)),
                }
            }
            Ok(())
        }
        .await;
        self.0.hot.lock().expect("hot lock").remove(key);
        self.changed();
        self.note("delete", Side::Write, started, result)
    }

    /// Writes the reads recorded since the last flush into this replica's access record
    /// (`_access/{replica}`), when a read is new or an hour past its recorded one, or whatever
    /// they are with `touch` (so a live replica's record never looks abandoned, see
    /// [`Storage::compact_access`]); returns whether it wrote.
    /// Requests never write to the store themselves.
    pub async fn flush_access(&self, replica: &str, touch: bool) -> Result<bool, StorageError> {
        const GRAIN: u64 = 3600;
        let fresh: Vec<(StorageKey, u64)> = self
            .0
            .accessed
            .lock()
            .expect("access lock")
            .drain()
            .collect();
        let record = {
            let mut flushed = self.0.flushed.lock().expect("access lock");
            let mut changed = false;
            // The first read of an object is recorded as it happened; later ones only once
            // they are an hour past the recorded one.
            for (key, at) in fresh {
                let old = flushed.entry(key).or_insert(0);
                if *old == 0 || at >= old.saturating_add(GRAIN) {
                    *old = at;
                    changed = true;
                }
            }
            let touched = touch && !flushed.is_empty();
            if !changed && !touched {
                return Ok(false);
            }
            access_record(&flushed)
        };
        self.write_access_record(replica, record).await?;
        Ok(true)
    }

    /// Folds the access records that no replica has written for `stale_after` (those of
    /// processes that are gone: every restart and every replica of a rolling update leaves
    /// one) into this replica's record, writes it, then removes them, so the records do not
    /// pile up and every pass reads a handful. Live replicas rewrite theirs more often than
    /// that (`flush_access` with `touch`), and each keeps its whole record in memory, so one
    /// whose record was folded by mistake (a store that failed its writes for that long)
    /// writes it again, whole, with its next flush. Returns how many records were folded.
    pub async fn compact_access(
        &self,
        replica: &str,
        stale_after: std::time::Duration,
    ) -> Result<usize, StorageError> {
        let own = access_record_key(replica);
        let now = unix_now();
        let stale: Vec<StorageKey> = self
            .list_objects(ACCESS_PREFIX)
            .await?
            .into_iter()
            .filter(|o| o.key != own && o.stored_at.saturating_add(stale_after.as_secs()) <= now)
            .map(|o| o.key)
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        for key in &stale {
            let Some((_, data)) = self.get_bytes(key).await? else {
                continue;
            };
            match serde_json::from_slice::<std::collections::HashMap<String, u64>>(&data) {
                Ok(map) => {
                    let mut flushed = self.0.flushed.lock().expect("access lock");
                    for (k, at) in map {
                        let e = flushed.entry(StorageKey(k)).or_insert(0);
                        *e = (*e).max(at);
                    }
                }
                Err(_) => tracing::warn!(key = %key, "unreadable access record; removed"),
            }
        }
        let record = access_record(&self.0.flushed.lock().expect("access lock"));
        // Written before anything is removed: a crash in between leaves both, merged alike.
        self.write_access_record(replica, record).await?;
        for key in &stale {
            self.delete(key).await?;
        }
        Ok(stale.len())
    }

    async fn write_access_record(
        &self,
        replica: &str,
        record: Vec<u8>,
    ) -> Result<(), StorageError> {
        let key = access_record_key(replica);
        let meta = ObjectMeta::new(
            record.len() as u64,
            Sha256::digest(&record).into(),
            "application/json",
        );
        self.put_bytes(&key, &record, &meta).await
    }

    /// Last reads by key, merged from every replica's access record and this process's own
    /// reads not flushed yet.
    pub async fn access_times(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, StorageError> {
        let mut out: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for key in self.list(ACCESS_PREFIX).await? {
            let Some((_, data)) = self.get_bytes(&key).await? else {
                continue;
            };
            let Ok(map) = serde_json::from_slice::<std::collections::HashMap<String, u64>>(&data)
            else {
                tracing::warn!(key = %key, "unreadable access record; ignored");
                continue;
            };
            for (k, at) in map {
                let e = out.entry(k).or_insert(0);
                *e = (*e).max(at);
            }
        }
        for (k, at) in self.0.accessed.lock().expect("access lock").iter() {
            let e = out.entry(k.as_str().to_owned()).or_insert(0);
            *e = (*e).max(*at);
        }
        Ok(out)
    }

    /// An object's sidecar, or `None` when it is not stored.
    pub async fn meta(&self, key: &StorageKey) -> Result<Option<ObjectMeta>, StorageError> {
        if let Some((meta, _)) = self.0.behind.get(key) {
            return Ok(Some((*meta).clone()));
        }
        if let Some((meta, _)) = self.0.hot.lock().expect("hot lock").get(key) {
            return Ok(Some((*meta).clone()));
        }
        self.check(Side::Read)?;
        let started = Instant::now();
        let result = self.head(key).await;
        self.note("read", Side::Read, started, result)
    }

    /// Opens an object for streaming, or `None` when it is not stored (or its bytes do not
    /// match its sidecar's size).
    pub async fn open(&self, key: &StorageKey) -> Result<Option<StoredObject>, StorageError> {
        if let Some((meta, data)) = self.0.behind.get(key) {
            return Ok(Some(StoredObject {
                meta: (*meta).clone(),
                body: StoredBody::Memory(data),
                in_use: Some(InUse::new(&self.0.in_use, key)),
            }));
        }
        self.check(Side::Read)?;
        let started = Instant::now();
        let result = self.open_inner(key).await;
        self.note("open", Side::Read, started, result)
    }

    async fn open_inner(&self, key: &StorageKey) -> Result<Option<StoredObject>, StorageError> {
        let Some(meta) = self.head(key).await? else {
            return Ok(None);
        };
        let path = data_path(key);
        let (size, body) = match self.0.backend {
            Backend::File => {
                let got = match self.0.store.get(&path).await {
                    Ok(g) => g,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(store_err("read", &path, e)),
                };
                let size = got.meta.size;
                match got.payload {
                    GetResultPayload::File(file, _) => {
                        (size, StoredBody::File(tokio::fs::File::from_std(file)))
                    }
                    GetResultPayload::Stream(_) => (
                        size,
                        StoredBody::Remote {
                            store: self.0.store.clone(),
                            path,
                        },
                    ),
                }
            }
            // No extra round trip: the size is checked against the sidecar when the bytes are
            // fetched (see `StoredObject::stream`).
            Backend::S3 => (
                meta.size,
                StoredBody::Remote {
                    store: self.0.store.clone(),
                    path,
                },
            ),
        };
        if size != meta.size {
            // Replaced between the two reads, or damaged: never serve bytes that do not match.
            tracing::warn!(key = %key, expected = meta.size, found = size, "stored object size does not match its sidecar");
            return Ok(None);
        }
        // Artifacts that are read are marked in use while streamed, and their read recorded
        // (in memory; flushed in coarse batches by `flush_access`).
        self.0
            .accessed
            .lock()
            .expect("access lock")
            .insert(key.clone(), unix_now());
        Ok(Some(StoredObject {
            meta,
            body,
            in_use: Some(InUse::new(&self.0.in_use, key)),
        }))
    }

    /// Reads a small object whole: from memory when it was read or written lately, else from
    /// the store, checking its bytes against the sidecar's sha256.
    pub async fn get_bytes(
        &self,
        key: &StorageKey,
    ) -> Result<Option<(Arc<ObjectMeta>, Bytes)>, StorageError> {
        if let Some(pending) = self.0.behind.get(key) {
            return Ok(Some(pending));
        }
        if let Some(hot) = self.0.hot.lock().expect("hot lock").get(key) {
            return Ok(Some(hot));
        }
        self.check(Side::Read)?;
        let started = Instant::now();
        let result = self.get_bytes_inner(key).await;
        let result = self.note("read", Side::Read, started, result)?;
        Ok(result.map(|(meta, data)| {
            let meta = Arc::new(meta);
            self.0
                .hot
                .lock()
                .expect("hot lock")
                .put(key, meta.clone(), data.clone());
            (meta, data)
        }))
    }

    async fn get_bytes_inner(
        &self,
        key: &StorageKey,
    ) -> Result<Option<(ObjectMeta, Bytes)>, StorageError> {
        // A small mutable object may be replaced (by this process or a replica) between reading
        // its sidecar and its bytes; one retry settles that race.
        for _ in 0..2 {
            let Some(meta) = self.head(key).await? else {
                return Ok(None);
            };
            let Some(data) = self.get_small(&data_path(key)).await? else {
                return Ok(None);
            };
            if hex::encode(Sha256::digest(&data)) == meta.sha256 {
                return Ok(Some((meta, data)));
            }
        }
        tracing::warn!(key = %key, "stored object does not match its sidecar; treating as absent");
        Ok(None)
    }

    /// Writes `key` and reads it back, whatever the store did moments ago (for `/readyz`). A
    /// success on a side ends that side's pause after a failure.
    pub async fn probe(&self, key: &StorageKey) -> Result<(), StorageError> {
        let data = Bytes::from(format!("{:?}", SystemTime::now()));
        let meta = ObjectMeta::new(
            data.len() as u64,
            Sha256::digest(&data).into(),
            "text/plain",
        );
        let started = Instant::now();
        let written = self.put_whole(key, data.clone(), &meta).await;
        let wrote = written.is_ok();
        let written = self.note("probe", Side::Write, started, written);
        // Reads are checked even when the write failed: a full disk still serves what it has.
        let started = Instant::now();
        let read = match self.get_bytes_inner(key).await {
            Ok(Some((_, read))) if !wrote || read == data => Ok(()),
            Ok(None) if !wrote => Ok(()),
            Ok(_) => Err(StorageError::Store {
                operation: "probe",
                key: key.to_string(),
                message: "the probe object did not read back".into(),
                reason: Reason::Store,
            }),
            Err(e) => Err(e),
        };
        let read = self.note("probe", Side::Read, started, read);
        let spooled = self.probe_spool().await;
        match &spooled {
            Ok(()) => self.record_success(Side::Spool),
            Err(e) => self.record_failure(Side::Spool, Reason::of_io(e), e),
        }
        let spooled = spooled.map_err(|source| StorageError::Io {
            key: "staging/".into(),
            source,
        });
        written.and(read).and(spooled)
    }

    /// Writes a small object whole (bytes, then sidecar).
    pub async fn put_bytes(
        &self,
        key: &StorageKey,
        data: &[u8],
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        self.check(Side::Write)?;
        let started = Instant::now();
        let data = Bytes::copy_from_slice(data);
        let result = self.put_whole(key, data.clone(), meta).await;
        let mut hot = self.0.hot.lock().expect("hot lock");
        match &result {
            Ok(()) => {
                self.changed();
                hot.put(key, Arc::new(meta.clone()), data)
            }
            // The store may hold either version now; the next read asks it.
            Err(_) => hot.remove(key),
        }
        drop(hot);
        self.note("write", Side::Write, started, result)
    }

    /// Writes a small object's bytes and its sidecar side by side: they live in separate trees,
    /// and a reader takes the object only when both are there and agree (so neither order of
    /// landing shows it half written). On disk each is a synced spool file renamed into place
    /// with its folders synced; done one after the other, a new object's write took twice that.
    async fn put_whole(
        &self,
        key: &StorageKey,
        data: Bytes,
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        let path = data_path(key);
        let (stored, described) =
            tokio::join!(self.put_small(key, &path, data), self.put_meta(key, meta));
        stored.and(described)
    }

    async fn put_meta(&self, key: &StorageKey, meta: &ObjectMeta) -> Result<(), StorageError> {
        let json = serde_json::to_vec(meta).expect("sidecar serializes");
        self.put_small(key, &meta_path(key), Bytes::from(json))
            .await
    }

    /// Writes one small object atomically: a spool file renamed into place locally, one PUT on S3.
    async fn put_small(
        &self,
        key: &StorageKey,
        path: &ObjectPath,
        data: Bytes,
    ) -> Result<(), StorageError> {
        match self.0.backend {
            Backend::File => {
                let spool = self.write_spool(key, &data).await?;
                self.rename_spool(&spool, path).await
            }
            Backend::S3 => self
                .0
                .small
                .put(path, data.into())
                .await
                .map(|_| ())
                .map_err(|e| store_err("write", path, e)),
        }
    }

    async fn write_spool(&self, key: &StorageKey, data: &[u8]) -> Result<PathBuf, StorageError> {
        let path = self
            .0
            .spool_dir
            .join(uuid::Uuid::new_v4().simple().to_string());
        let result = async {
            let mut f = tokio::fs::File::create_new(&path).await?;
            tokio::io::AsyncWriteExt::write_all(&mut f, data).await?;
            // Tokio's file writes in the background: a failed write (a full disk) is reported
            // by flush; sync_data alone would let a short file be published.
            tokio::io::AsyncWriteExt::flush(&mut f).await?;
            f.sync_data().await?;
            Ok::<_, io::Error>(())
        }
        .await;
        if let Err(source) = result {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(StorageError::Io {
                key: key.to_string(),
                source,
            });
        }
        Ok(path)
    }

    /// Moves a spool file (in the local store's `staging/`) to `to`.
    async fn rename_spool(&self, spool: &Path, to: &ObjectPath) -> Result<(), StorageError> {
        let name = spool
            .file_name()
            .and_then(|n| n.to_str())
            .expect("spool files have plain names");
        let from = ObjectPath::from(format!("{}/{name}", self.0.spool_rel));
        let result = self.0.store.rename(&from, to).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(spool).await;
        }
        result.map_err(|e| store_err("publish", to, e))
    }

    /// Publishes a complete, verified spool file under `key`, then its sidecar. The spool file is
    /// consumed. On S3, large files go up as a multipart upload that is aborted on failure, so
    /// no partial object ever becomes visible.
    pub async fn publish_file(
        &self,
        key: &StorageKey,
        spool: &Path,
        meta: &ObjectMeta,
    ) -> Result<(), StorageError> {
        let started = Instant::now();
        let result = async {
            self.check(Side::Write)?;
            let path = data_path(key);
            match self.0.backend {
                Backend::File => self.rename_spool(spool, &path).await?,
                Backend::S3 => {
                    let uploaded = self.upload(key, spool, &path, meta.size).await;
                    let _ = tokio::fs::remove_file(spool).await;
                    uploaded?;
                }
            }
            self.put_meta(key, meta).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(spool).await;
        } else {
            self.changed();
            self.0.published.notify_one();
        }
        self.note("publish", Side::Write, started, result)
    }

    async fn upload(
        &self,
        key: &StorageKey,
        spool: &Path,
        path: &ObjectPath,
        size: u64,
    ) -> Result<(), StorageError> {
        let io_err = |source| StorageError::Io {
            key: key.to_string(),
            source,
        };
        if size < MULTIPART_THRESHOLD {
            let data = tokio::fs::read(spool).await.map_err(io_err)?;
            return self
                .0
                .store
                .put(path, Bytes::from(data).into())
                .await
                .map(|_| ())
                .map_err(|e| store_err("write", path, e));
        }
        let _permit = self.0.uploads.acquire().await.expect("never closed");
        let upload = self
            .0
            .store
            .put_multipart(path)
            .await
            .map_err(|e| store_err("start upload", path, e))?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let result = async {
            let mut file = tokio::fs::File::open(spool).await.map_err(io_err)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).await.map_err(io_err)?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(PART_CONCURRENCY)
                    .await
                    .map_err(|e| store_err("upload", path, e))?;
                writer.write(&buf[..n]);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| store_err("complete upload", path, e)),
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key = %key, error = %abort, "could not abort a failed multipart upload; the bucket's lifecycle rule will remove it");
                }
                Err(e)
            }
        }
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
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let key = StorageKey::from_segments(["providers", "h", "ns", "t", "versions.json"]);
        assert!(store.get_bytes(&key).await.unwrap().is_none());
        store
            .put_bytes(&key, b"one", &meta_for(b"one"))
            .await
            .unwrap();
        let (meta, data) = store.get_bytes(&key).await.unwrap().unwrap();
        assert_eq!((&data[..], meta.size), (&b"one"[..], 3));
        // A fresh handle on the same directory reads it from disk, not from memory.
        let (_, data) = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap()
            .get_bytes(&key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&data[..], b"one");
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
        let mut body = opened.stream(1, 4).await.unwrap();
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"eco");
        // Nothing is left in staging after successful writes.
        assert_eq!(std::fs::read_dir(store.spool_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn bytes_without_a_sidecar_do_not_exist_and_staging_is_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let key = StorageKey::from_segments(["a", "b.zip"]);
        std::fs::create_dir_all(dir.path().join("data/a")).unwrap();
        std::fs::write(dir.path().join("data/a/b.zip"), b"partial").unwrap();
        std::fs::write(store.spool_dir().join("leftover"), b"partial").unwrap();
        assert!(store.open(&key).await.unwrap().is_none());
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        assert_eq!(std::fs::read_dir(store.spool_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_sidecar_that_disagrees_with_the_bytes_hides_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let key = StorageKey::from_segments(["k"]);
        store
            .put_bytes(&key, b"good", &meta_for(b"good"))
            .await
            .unwrap();
        std::fs::write(dir.path().join("data/k"), b"evil").unwrap();
        // This handle still has the verified copy in memory; a fresh one reads the disk.
        assert_eq!(
            &store.get_bytes(&key).await.unwrap().unwrap().1[..],
            b"good"
        );
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        assert!(store.get_bytes(&key).await.unwrap().is_none());
        std::fs::write(dir.path().join("data/k"), b"longer").unwrap();
        assert!(store.open(&key).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_published_spool_file_moves_into_place_with_its_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let key = StorageKey::from_segments(["artifacts", "x.zip"]);
        let spool = store.spool_dir().join("fill");
        std::fs::write(&spool, b"zip bytes").unwrap();
        store
            .publish_file(&key, &spool, &meta_for(b"zip bytes"))
            .await
            .unwrap();
        assert!(!spool.exists());
        assert_eq!(
            std::fs::read(dir.path().join("data/artifacts/x.zip")).unwrap(),
            b"zip bytes"
        );
        let local = store
            .open(&key)
            .await
            .unwrap()
            .unwrap()
            .into_local_file(&store.spool_dir())
            .await
            .unwrap();
        assert_eq!(local.metadata().unwrap().len(), 9);
    }

    #[tokio::test]
    async fn abandoned_access_records_are_folded_into_this_replicas_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::local(dir.path(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        let record = |entries: &[(&str, u64)]| {
            let map: std::collections::BTreeMap<&str, u64> = entries.iter().copied().collect();
            serde_json::to_vec(&map).unwrap()
        };
        let write = |replica: &'static str, data: Vec<u8>| {
            let store = store.clone();
            async move {
                store
                    .put_bytes(&access_record_key(replica), &data, &meta_for(&data))
                    .await
                    .unwrap()
            }
        };
        write("own", record(&[("providers/a.zip", 100)])).await;
        write(
            "gone",
            record(&[("providers/a.zip", 300), ("modules/m.tgz", 50)]),
        )
        .await;
        write("garbled", b"not json".to_vec()).await;
        write("live", record(&[("providers/b.zip", 70)])).await;
        let day = std::time::Duration::from_secs(24 * 3600);
        // Nothing is old enough yet.
        assert_eq!(store.compact_access("own", day).await.unwrap(), 0);
        let before = store.access_times().await.unwrap();
        // Two days without a write for "gone" and "garbled"; "own" is old too, but it is ours.
        let old = std::time::SystemTime::now() - 2 * day;
        for replica in ["gone", "garbled", "own"] {
            for path in [
                dir.path().join("data/_access").join(replica),
                dir.path()
                    .join("meta/_access")
                    .join(format!("{replica}.json")),
            ] {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
        assert_eq!(store.compact_access("own", day).await.unwrap(), 2);
        let left: Vec<String> = store
            .list(ACCESS_PREFIX)
            .await
            .unwrap()
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        assert_eq!(left, ["_access/live", "_access/own"]);
        // Nothing known was lost: the merged times are the same, now from two records.
        let after = store.access_times().await.unwrap();
        assert_eq!(after, before);
        assert_eq!(after["providers/a.zip"], 300);
        assert_eq!(after["modules/m.tgz"], 50);
        let (_, own) = store
            .get_bytes(&access_record_key("own"))
            .await
            .unwrap()
            .unwrap();
        let own: std::collections::HashMap<String, u64> = serde_json::from_slice(&own).unwrap();
        assert_eq!(own["modules/m.tgz"], 50);
        // A flush with `touch` rewrites the record though no read is new; without, it does not.
        assert!(!store.flush_access("own", false).await.unwrap());
        assert!(store.flush_access("own", true).await.unwrap());
    }
}
