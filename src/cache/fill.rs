//! Artifact fills: one upstream download per key, spooled to a local file while it is hashed,
//! published only once the hash matches, and read by any number of clients while it runs.
//!
//! The fill runs in its own task and owns the spool file. Readers share its file handle and read
//! by position, so a reader never depends on the spool path (which is renamed on publish or
//! removed on failure). The last few MiB the fill wrote are also kept in memory, as the chunks
//! the upstream sent: readers near the head of the fill (all of them, under a stampede) send
//! those shared chunks instead of each reading its own copy back from the file. Until the fill
//! is verified, readers stay `HOLDBACK` bytes behind the writer: a truncated or corrupted
//! upstream body can never reach a client complete; it ends in an aborted transfer instead.

use super::CacheError;
use crate::storage::{ObjectMeta, Storage, StorageKey};
use crate::upstream::{Upstream, git};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::watch;
use url::Url;

/// Bytes held back from readers until the whole artifact is verified.
const HOLDBACK: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub enum Phase {
    Running,
    Done(Arc<ObjectMeta>),
    Failed(CacheError),
}

#[derive(Debug, Clone)]
pub struct FillState {
    pub written: u64,
    /// The upstream's Content-Length, once its headers arrived.
    pub total: Option<u64>,
    pub headers_seen: bool,
    pub phase: Phase,
}

/// What a fill needs to know about its artifact.
pub struct FillSpec {
    pub key: StorageKey,
    pub source: FillSource,
    pub expected_sha256: Option<[u8; 32]>,
    pub content_type: String,
    /// Extra sidecar fields recorded on publish.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Where a fill's bytes come from.
pub enum FillSource {
    Http(Url),
    /// The tree of one commit of a git repository, packed as `.tar.gz`.
    Git {
        url: String,
        resolved: git::Resolved,
    },
}

impl std::fmt::Display for FillSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillSource::Http(u) => write!(f, "{u}"),
            FillSource::Git { url, resolved } => write!(f, "{url} at {}", resolved.commit),
        }
    }
}

/// Bytes of the most recent chunks a fill keeps in memory for its readers.
const RECENT_MAX: usize = 4 << 20;

/// The most recent chunks a fill wrote, by offset.
#[derive(Default)]
struct Recent {
    chunks: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, at: u64, chunk: Bytes) {
        self.bytes += chunk.len();
        self.chunks.push_back((at, chunk));
        while self.bytes > RECENT_MAX && self.chunks.len() > 1 {
            if let Some((_, old)) = self.chunks.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    /// The bytes from `pos` to the end of the chunk that holds them, up to `limit`; `None` when
    /// `pos` is no longer (or not yet) in memory.
    fn slice(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let i = self
            .chunks
            .partition_point(|(at, _)| *at <= pos)
            .checked_sub(1)?;
        let (at, chunk) = &self.chunks[i];
        let end = (at + chunk.len() as u64).min(limit);
        (pos < end).then(|| chunk.slice((pos - at) as usize..(end - at) as usize))
    }
}

/// A fill in progress (or just finished).
pub struct Fill {
    file: Arc<std::fs::File>,
    recent: Arc<std::sync::Mutex<Recent>>,
    state: watch::Receiver<FillState>,
    /// Responses streaming from fills, for the metrics.
    readers: prometheus::IntGauge,
}

/// Counts a reader for as long as it lives.
struct ReaderGuard(prometheus::IntGauge);

impl ReaderGuard {
    fn new(gauge: &prometheus::IntGauge) -> ReaderGuard {
        gauge.inc();
        ReaderGuard(gauge.clone())
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Fill {
    /// Creates the spool file and starts the fill task. `on_end` runs once the fill has reached
    /// its final state, told whether it published (used to drop it from the registry of fills). Needs a Tokio runtime.
    pub fn start(
        tasks: &tokio_util::task::TaskTracker,
        metrics: &Arc<crate::metrics::Metrics>,
        storage: Storage,
        upstream: Arc<Upstream>,
        spec: FillSpec,
        on_end: impl FnOnce(bool) + Send + 'static,
    ) -> Result<Arc<Fill>, CacheError> {
        let spool = storage
            .spool_dir()
            .join(uuid::Uuid::new_v4().simple().to_string());
        // Creating an empty file is quick enough to do inline; it lets the caller register the
        // fill atomically with its start.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool)
            .map_err(|e| CacheError::Storage(format!("cannot create a spool file: {e}")))?;
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(FillState {
            written: 0,
            total: None,
            headers_seen: false,
            phase: Phase::Running,
        });
        let recent = Arc::new(std::sync::Mutex::new(Recent::default()));
        let fill = Arc::new(Fill {
            file: file.clone(),
            recent: recent.clone(),
            state: rx,
            readers: metrics.fill_readers.clone(),
        });
        let in_progress = metrics.fills_in_progress.clone();
        in_progress.inc();
        let mut on_end = Some(on_end);
        tasks.spawn(async move {
            let key = spec.key.clone();
            let result = run(&storage, &upstream, spec, file, &recent, &tx).await;
            drop(recent);
            let published = match result {
                Ok(meta) => {
                    // Verified: every reader may have every byte, whatever the store does. A
                    // local publish is a rename, so readers finish after it and a client's next
                    // request finds the object stored; an upload to S3 takes a while, so readers
                    // do not wait for it.
                    let meta = Arc::new(meta);
                    let quick = storage.publish_is_quick();
                    if !quick {
                        tx.send_modify(|s| s.phase = Phase::Done(meta.clone()));
                    }
                    let published = match storage.publish_file(&key, &spool, &meta).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(key = %key, error = %e, "storage write failed; the artifact was served from upstream without being kept");
                            false
                        }
                    };
                    if quick {
                        tx.send_modify(|s| s.phase = Phase::Done(meta.clone()));
                    }
                    published
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "artifact fill failed; nothing was cached");
                    // Leave the registry of fills before waking the waiters, so a retry that
                    // follows the error at once starts a new fill instead of joining this one.
                    if let Some(end) = on_end.take() {
                        end(false);
                    }
                    tx.send_modify(|s| s.phase = Phase::Failed(e));
                    false
                }
            };
            if !published {
                let _ = tokio::fs::remove_file(&spool).await;
            }
            if let Some(end) = on_end.take() {
                end(published);
            }
            in_progress.dec();
        });
        Ok(fill)
    }

    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// Waits until the upstream's headers arrived (so the length is known, if it was sent) or
    /// the fill ended.
    pub async fn headers(&self) -> FillState {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| s.headers_seen || !matches!(s.phase, Phase::Running))
            .await
            .map(|s| s.clone());
        state.unwrap_or_else(|_| self.state())
    }

    /// Waits for the final state.
    pub async fn finished(&self) -> FillState {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s.phase, Phase::Running))
            .await
            .map(|s| s.clone());
        state.unwrap_or_else(|_| self.state())
    }

    /// Streams bytes `start..end` (end exclusive; `None` = to the end) as the fill produces them.
    /// With `verified_only`, nothing is sent before the whole artifact is verified.
    pub fn reader(
        self: &Arc<Self>,
        start: u64,
        end: Option<u64>,
        verified_only: bool,
    ) -> BoxStream<'static, io::Result<Bytes>> {
        let rx = self.state.clone();
        let file = self.file.clone();
        let recent = self.recent.clone();
        let guard = ReaderGuard::new(&self.readers);
        futures_util::stream::unfold(
            (rx, (file, recent), start, false),
            move |(mut rx, file, mut pos, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let state = rx.borrow_and_update().clone();
                    let allowed = match &state.phase {
                        Phase::Failed(e) => {
                            let err = io::Error::other(e.to_string());
                            return Some((Err(err), (rx, file, pos, true)));
                        }
                        Phase::Done(meta) => meta.size,
                        Phase::Running if verified_only => 0,
                        Phase::Running => state.written.saturating_sub(HOLDBACK),
                    };
                    let limit = end.map_or(allowed, |e| e.min(allowed));
                    if pos < limit {
                        let (f, recent) = &file;
                        let shared = recent.lock().expect("recent chunks lock").slice(pos, limit);
                        if let Some(chunk) = shared {
                            pos += chunk.len() as u64;
                            return Some((Ok(chunk), (rx, file, pos, false)));
                        }
                        let f = f.clone();
                        let buf = crate::storage::buffers::buffer(limit - pos);
                        let read = tokio::task::spawn_blocking(move || buf.read_at(&f, pos))
                            .await
                            .unwrap_or_else(|e| Err(io::Error::other(e)));
                        return match read {
                            Ok(chunk) => {
                                pos += chunk.len() as u64;
                                Some((Ok(chunk), (rx, file, pos, false)))
                            }
                            Err(e) => Some((Err(e), (rx, file, pos, true))),
                        };
                    }
                    if let Phase::Done(meta) = &state.phase
                        && pos >= end.unwrap_or(meta.size).min(meta.size)
                    {
                        return None;
                    }
                    if rx.changed().await.is_err() {
                        let err = io::Error::other("artifact fill ended unexpectedly");
                        return Some((Err(err), (rx, file, pos, true)));
                    }
                }
            },
        )
        // The guard lives as long as the stream.
        .map(move |chunk| {
            let _counted = &guard;
            chunk
        })
        .boxed()
    }
}

async fn run(
    storage: &Storage,
    upstream: &Upstream,
    spec: FillSpec,
    file: Arc<std::fs::File>,
    recent: &std::sync::Mutex<Recent>,
    tx: &watch::Sender<FillState>,
) -> Result<ObjectMeta, CacheError> {
    // On failure here, waiters wake on the Failed phase the caller sets.
    let resp = match &spec.source {
        FillSource::Http(url) => upstream.open_artifact(url).await?,
        FillSource::Git { url, resolved } => {
            upstream
                .git_archive(url, resolved, &storage.spool_dir())
                .await?
        }
    };
    tx.send_modify(|s| {
        s.total = resp.content_length;
        s.headers_seen = true;
    });
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let mut body = resp.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(CacheError::Upstream)?;
        if resp
            .content_length
            .is_some_and(|n| written + chunk.len() as u64 > n)
        {
            return Err(CacheError::Integrity(format!(
                "{} sent more bytes than it announced",
                spec.source
            )));
        }
        hasher.update(&chunk);
        let f = file.clone();
        let at = written;
        let len = chunk.len() as u64;
        let kept = chunk.clone();
        tokio::task::spawn_blocking(move || f.write_all_at(&chunk, at))
            .await
            .map_err(|e| CacheError::Internal(e.to_string()))?
            .map_err(|e| CacheError::Storage(format!("spool write: {e}")))?;
        recent.lock().expect("recent chunks lock").push(at, kept);
        written += len;
        tx.send_modify(|s| s.written = written);
    }
    if let Some(n) = resp.content_length
        && written != n
    {
        return Err(CacheError::Integrity(format!(
            "{} ended after {written} of {n} bytes",
            spec.source
        )));
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if let Some(expected) = spec.expected_sha256
        && digest != expected
    {
        return Err(CacheError::Integrity(format!(
            "{} has sha256 {} but the registry promised {}",
            spec.source,
            hex::encode(digest),
            hex::encode(expected)
        )));
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(|e| CacheError::Internal(e.to_string()))?
        .map_err(|e| CacheError::Storage(format!("spool sync: {e}")))?;
    let mut meta = ObjectMeta::new(written, digest, &spec.content_type);
    meta.origin_url = Some(match &spec.source {
        FillSource::Http(url) => url.to_string(),
        FillSource::Git { url, .. } => url.clone(),
    });
    meta.etag = resp.etag;
    meta.last_modified = resp.last_modified;
    meta.extra = spec.extra;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_chunks_are_sliced_by_offset_and_the_oldest_go_first() {
        let mut recent = Recent::default();
        let chunk = |n: usize, b: u8| Bytes::from(vec![b; n]);
        recent.push(0, chunk(10, 1));
        recent.push(10, chunk(20, 2));
        assert_eq!(&recent.slice(0, 30).unwrap()[..], &[1; 10]);
        assert_eq!(&recent.slice(5, 30).unwrap()[..], &[1; 5]);
        assert_eq!(&recent.slice(12, 30).unwrap()[..], &[2; 18]);
        // Never past the limit (the bytes held back until the fill is verified).
        assert_eq!(&recent.slice(12, 20).unwrap()[..], &[2; 8]);
        assert!(recent.slice(20, 20).is_none());
        assert!(recent.slice(30, 100).is_none(), "not written yet");
        // Past the memory bound the oldest chunks are dropped; readers that far behind read
        // the file.
        let big = RECENT_MAX / 2;
        recent.push(30, chunk(big, 3));
        recent.push(30 + big as u64, chunk(big, 4));
        assert!(recent.slice(0, u64::MAX).is_none());
        assert!(recent.slice(29, u64::MAX).is_none());
        assert_eq!(recent.slice(30, 31).unwrap()[..], [3]);
        assert!(recent.bytes <= RECENT_MAX);
        // One chunk larger than the bound is still kept (it is the newest).
        recent.push(30 + 2 * big as u64, chunk(RECENT_MAX + 1, 5));
        assert_eq!(recent.chunks.len(), 1);
        assert_eq!(
            recent.slice(30 + 2 * big as u64, u64::MAX).unwrap().len(),
            RECENT_MAX + 1
        );
    }
}
