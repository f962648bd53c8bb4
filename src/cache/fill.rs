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
//!
//! A fill whose bytes cannot be kept (the spool's filesystem is full, read-only or failing, or
//! the store refuses writes) passes them through instead: from that point on the chunks live
//! only in memory, and the fill waits for its slowest reader before it drops one, so every
//! client that joined still gets every verified byte while memory stays bounded. Nothing of a
//! passing fill is published; the next request tries to cache the artifact again.

use super::CacheError;
use crate::storage::{ObjectMeta, Storage, StorageKey};
use crate::upstream::{Upstream, git};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::io;
use std::sync::Arc;
use tokio::sync::watch;
use url::Url;

/// Bytes held back from readers until the whole artifact is verified.
pub(crate) const HOLDBACK: u64 = 64 * 1024;

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
    /// The bytes are passed through, not kept: the spool or the store cannot take them.
    pub passing: bool,
    /// The fill's task is over: what it kept is in the store (or never will be).
    pub settled: bool,
    pub phase: Phase,
}

/// What a fill needs to know about its artifact.
#[derive(Clone)]
pub struct FillSpec {
    pub key: StorageKey,
    pub source: FillSource,
    pub expected_sha256: Option<[u8; 32]>,
    pub content_type: String,
    /// Extra sidecar fields recorded on publish.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Where a fill's bytes come from.
#[derive(Clone)]
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

/// Bytes of the most recent chunks a fill keeps in memory for its readers; for a fill that
/// passes its bytes through, also about the most it holds for its slowest reader.
const RECENT_MAX: usize = 4 << 20;

/// Free space left on the spool's filesystem besides the artifacts being spooled: below it, a
/// fill passes its artifact through instead of failing half-way.
const SPACE_MARGIN: u64 = 8 << 20;

/// The chunks a fill keeps in memory, and where its readers are.
#[derive(Default)]
struct Window {
    chunks: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// End of the last chunk pushed.
    head: u64,
    /// Set once the fill passes its bytes through: the spool file holds `0..file_end`, and
    /// later bytes are only in memory.
    file_end: Option<u64>,
    /// While passing: the first byte at or past `file_end` still in memory. A reader can no
    /// longer start between `file_end` and this.
    memory_from: u64,
    /// Each reader's next byte, by reader id.
    readers: std::collections::HashMap<u64, u64>,
    next_reader: u64,
    /// How far the spool file has been written: chunks past it stay in memory, whatever the
    /// bound, until their batch is on file.
    on_file: u64,
    /// `bytes`, summed over every fill (`terrapeak_fill_memory_bytes`).
    gauge: Option<prometheus::IntGauge>,
}

impl Drop for Window {
    fn drop(&mut self) {
        self.count(-(self.bytes as i64));
    }
}

impl Window {
    fn push(&mut self, at: u64, chunk: Bytes) {
        self.bytes += chunk.len();
        self.count(chunk.len() as i64);
        self.head = at + chunk.len() as u64;
        self.chunks.push_back((at, chunk));
        self.evict();
    }

    /// Drops the oldest chunks beyond the memory bound: any of them while the spool file has
    /// every byte, only those every reader is past (or the file has) once passing.
    fn evict(&mut self) {
        let slowest = self.readers.values().copied().min().unwrap_or(u64::MAX);
        while self.bytes > RECENT_MAX && self.chunks.len() > 1 {
            let (at, len) = match self.chunks.front() {
                Some((at, c)) => (*at, c.len() as u64),
                None => break,
            };
            let end = at + len;
            if self.file_end.is_none() && end > self.on_file {
                break;
            }
            if let Some(file_end) = self.file_end {
                if end > file_end && end > slowest {
                    break;
                }
                if end > file_end {
                    self.memory_from = self.memory_from.max(end);
                }
            }
            self.chunks.pop_front();
            self.bytes -= len as usize;
            self.count(-(len as i64));
        }
    }

    fn count(&self, bytes: i64) {
        if let Some(g) = &self.gauge {
            g.add(bytes);
        }
    }

    /// Drops every chunk held in memory, once the spool file holds every byte.
    fn forget_chunks(&mut self) {
        debug_assert!(self.file_end.is_none() && self.on_file >= self.head);
        self.chunks.clear();
        self.count(-(self.bytes as i64));
        self.bytes = 0;
    }

    /// The spool file holds every byte before `end` now.
    fn wrote_to(&mut self, end: u64) {
        self.on_file = self.on_file.max(end);
        self.evict();
    }

    /// From `at` on, the bytes are kept only in memory.
    fn pass_from(&mut self, at: u64) {
        self.file_end = Some(at);
        self.memory_from = at;
    }

    /// Whether a passing fill must wait before reading more: it holds more than its bound, and
    /// some reader has yet to take bytes it may already have.
    fn full(&mut self) -> bool {
        if self.file_end.is_none() {
            return false;
        }
        self.evict();
        let slowest = self.readers.values().copied().min().unwrap_or(u64::MAX);
        self.bytes > RECENT_MAX && slowest < self.head.saturating_sub(HOLDBACK)
    }

    /// Registers a reader starting at `pos`, unless those bytes are gone.
    fn join(&mut self, pos: u64) -> Option<u64> {
        if let Some(file_end) = self.file_end
            && pos >= file_end
            && pos < self.memory_from
        {
            return None;
        }
        let id = self.next_reader;
        self.next_reader += 1;
        self.readers.insert(id, pos);
        Some(id)
    }

    /// Notes a reader's progress; true when the fill may be waiting for it.
    fn advance(&mut self, id: u64, pos: u64) -> bool {
        self.readers.insert(id, pos);
        self.file_end.is_some()
    }

    /// How far the spool file can serve a reader: to `limit`, or to where it stops holding
    /// every byte.
    fn file_limit(&self, limit: u64) -> u64 {
        self.on_file
            .min(self.file_end.unwrap_or(u64::MAX))
            .min(limit)
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
    /// The spool file; `None` when it could not even be created.
    file: Option<Arc<std::fs::File>>,
    window: Arc<std::sync::Mutex<Window>>,
    /// Woken when a reader moves on or leaves, for a passing fill that waits for room.
    room: Arc<tokio::sync::Notify>,
    state: watch::Receiver<FillState>,
    /// Responses streaming from fills, for the metrics.
    readers: prometheus::IntGauge,
    /// A client was answered with headers and a body streaming from this fill, so a failure
    /// reaches it as a cut transfer rather than an error status.
    answered: Arc<std::sync::atomic::AtomicBool>,
}

/// A reader's place in a fill, taken before the reader waits for anything, so a passing fill
/// keeps the bytes it needs. Leaving (dropping it) lets the fill move on.
pub struct Ticket {
    window: Arc<std::sync::Mutex<Window>>,
    room: Arc<tokio::sync::Notify>,
    id: u64,
    pos: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.window
            .lock()
            .expect("fill window lock")
            .readers
            .remove(&self.id);
        self.room.notify_waiters();
    }
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
    /// Creates the spool file and starts the fill task; returns the fill and a ticket for its
    /// first reader, at byte 0. `on_end` runs once the fill has reached its final state, told
    /// whether it published (used to drop it from the registry of fills). Needs a Tokio
    /// runtime.
    pub fn start(
        tasks: &tokio_util::task::TaskTracker,
        metrics: &Arc<crate::metrics::Metrics>,
        storage: Storage,
        upstream: Arc<Upstream>,
        spec: FillSpec,
        on_end: impl FnOnce(bool) + Send + 'static,
    ) -> (Arc<Fill>, Ticket) {
        let spool = storage
            .spool_dir()
            .join(uuid::Uuid::new_v4().simple().to_string());
        // Creating an empty file is quick enough to do inline; it lets the caller register the
        // fill atomically with its start. Without one (a full or read-only disk) the fill
        // passes its bytes through.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool)
        {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                storage.note_spool_failure(&e);
                None
            }
        };
        let (tx, rx) = watch::channel(FillState {
            written: 0,
            total: None,
            headers_seen: false,
            passing: false,
            settled: false,
            phase: Phase::Running,
        });
        let mut window = Window::default();
        window.gauge = Some(metrics.fill_memory_bytes.clone());
        let window = Arc::new(std::sync::Mutex::new(window));
        let room = Arc::new(tokio::sync::Notify::new());
        let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fill = Arc::new(Fill {
            file: file.clone(),
            window: window.clone(),
            room: room.clone(),
            state: rx,
            readers: metrics.fill_readers.clone(),
            answered: answered.clone(),
        });
        let first = fill.join(0).expect("a new fill has every byte ahead");
        let in_progress = metrics.fills_in_progress.clone();
        in_progress.inc();
        let metrics = metrics.clone();
        let mut on_end = Some(on_end);
        crate::runtime::spawn(tasks.track_future(async move {
            let key = spec.key.clone();
            let result = run(&storage, &upstream, spec, file, &window, &room, &tx).await;
            if matches!(result, Ok((_, Some(_)))) {
                // Every byte is on file: readers take the rest from there, and the fill, which
                // lingers for late joiners a while, keeps none of its chunks in memory.
                window.lock().expect("fill window lock").forget_chunks();
            }
            drop(window);
            let published = match result {
                Ok((meta, Some(spooled))) => {
                    // Verified: every reader may have every byte now. Making them durable
                    // (fsync) and publishing them follows, off the clients' path; requests
                    // meanwhile join this fill, which stays registered until the store has it.
                    let meta = Arc::new(meta);
                    tx.send_modify(|s| s.phase = Phase::Done(meta.clone()));
                    let synced = tokio::task::spawn_blocking(move || spooled.sync_data())
                        .await
                        .unwrap_or_else(|e| Err(io::Error::other(e)));
                    match synced {
                        Ok(()) => {
                            storage.note_spool_success();
                            match storage.publish_file(&key, &spool, &meta).await {
                                Ok(()) => true,
                                Err(e) => {
                                    tracing::warn!(key = %key, error = %e, "storage write failed; the artifact was served from upstream without being kept");
                                    false
                                }
                            }
                        }
                        Err(e) => {
                            storage.note_spool_failure(&e);
                            tracing::warn!(key = %key, error = %e, "spool sync failed; the artifact was served without being kept");
                            false
                        }
                    }
                }
                Ok((meta, None)) => {
                    // Passed through: verified for its readers, kept nowhere. The next request
                    // starts a new fill that tries to keep it.
                    if let Some(end) = on_end.take() {
                        end(false);
                    }
                    tx.send_modify(|s| s.phase = Phase::Done(Arc::new(meta)));
                    false
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "artifact fill failed; nothing was cached");
                    // Readers that already had their headers see a cut transfer, not this
                    // message: the status page keeps it for them.
                    if answered.load(std::sync::atomic::Ordering::Relaxed) {
                        metrics.problems.record(crate::status::Problem {
                            at: crate::storage::unix_now(),
                            class: if matches!(e, CacheError::Integrity(_)) {
                                "verification"
                            } else {
                                "transfer"
                            },
                            status: None,
                            path: key.to_string(),
                            upstream: None,
                            message: format!("transfer cut: {e}"),
                        });
                    }
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
            tx.send_modify(|s| s.settled = true);
            if let Some(end) = on_end.take() {
                end(published);
            }
            in_progress.dec();
        }));
        (fill, first)
    }

    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// A place for a reader starting at `pos`, or `None` when the fill passes its bytes through
    /// and no longer holds those.
    pub fn join(&self, pos: u64) -> Option<Ticket> {
        let id = self.window.lock().expect("fill window lock").join(pos)?;
        Some(Ticket {
            window: self.window.clone(),
            room: self.room.clone(),
            id,
            pos,
        })
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

    /// Notes that a client got headers and a body streaming from this fill.
    pub fn mark_answered(&self) {
        self.answered
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the fill has verified bytes it is still making durable and publishing.
    pub fn publishing(&self) -> bool {
        let s = self.state.borrow();
        matches!(s.phase, Phase::Done(_)) && !s.passing && !s.settled
    }

    /// Waits until the fill's task is over (its bytes published, or given up).
    pub async fn settled(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| s.settled).await;
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

    /// Streams bytes from the ticket's place to `end` (exclusive; `None` = to the end) as the
    /// fill produces them. With `verified_only`, nothing is sent before the whole artifact is
    /// verified (take the ticket after the fill finished, or a passing fill would wait for this
    /// reader forever).
    pub fn reader(
        self: &Arc<Self>,
        ticket: Ticket,
        end: Option<u64>,
        verified_only: bool,
    ) -> BoxStream<'static, io::Result<Bytes>> {
        let rx = self.state.clone();
        let fill = self.clone();
        let guard = ReaderGuard::new(&self.readers);
        futures_util::stream::unfold(
            (rx, fill, ticket, false),
            move |(mut rx, fill, mut ticket, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let state = rx.borrow_and_update().clone();
                    let allowed = match &state.phase {
                        Phase::Failed(e) => {
                            let err = io::Error::other(e.to_string());
                            return Some((Err(err), (rx, fill, ticket, true)));
                        }
                        Phase::Done(meta) => meta.size,
                        Phase::Running if verified_only => 0,
                        Phase::Running => state.written.saturating_sub(HOLDBACK),
                    };
                    let limit = end.map_or(allowed, |e| e.min(allowed));
                    let pos = ticket.pos;
                    if pos < limit {
                        match fill.next_chunk(&mut ticket, limit).await {
                            Ok(chunk) => return Some((Ok(chunk), (rx, fill, ticket, false))),
                            Err(e) => return Some((Err(e), (rx, fill, ticket, true))),
                        }
                    }
                    if let Phase::Done(meta) = &state.phase
                        && pos >= end.unwrap_or(meta.size).min(meta.size)
                    {
                        return None;
                    }
                    if rx.changed().await.is_err() {
                        let err = io::Error::other("artifact fill ended unexpectedly");
                        return Some((Err(err), (rx, fill, ticket, true)));
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

    /// The next bytes for a reader, up to `limit`: shared from memory when the fill still holds
    /// them, else read from the spool file.
    async fn next_chunk(&self, ticket: &mut Ticket, limit: u64) -> io::Result<Bytes> {
        let pos = ticket.pos;
        let file_limit = {
            let mut window = self.window.lock().expect("fill window lock");
            if let Some(chunk) = window.slice(pos, limit) {
                ticket.pos += chunk.len() as u64;
                if window.advance(ticket.id, ticket.pos) {
                    self.room.notify_waiters();
                }
                return Ok(chunk);
            }
            window.file_limit(limit)
        };
        let file = match &self.file {
            Some(f) if pos < file_limit => f.clone(),
            _ => {
                return Err(io::Error::other(format!(
                    "bytes from {pos} on are no longer held by this fill"
                )));
            }
        };
        let buf = crate::storage::buffers::buffer(file_limit - pos);
        let chunk = tokio::task::spawn_blocking(move || buf.read_at(&file, pos))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))?;
        ticket.pos += chunk.len() as u64;
        if self
            .window
            .lock()
            .expect("fill window lock")
            .advance(ticket.id, ticket.pos)
        {
            self.room.notify_waiters();
        }
        Ok(chunk)
    }
}

/// Runs the download; returns the verified object's sidecar and, when its bytes are all in the
/// spool file, that file, to be made durable and published (none: they were passed through).
async fn run(
    storage: &Storage,
    upstream: &Upstream,
    spec: FillSpec,
    file: Option<Arc<std::fs::File>>,
    window: &std::sync::Mutex<Window>,
    room: &tokio::sync::Notify,
    tx: &watch::Sender<FillState>,
) -> Result<(ObjectMeta, Option<Arc<std::fs::File>>), CacheError> {
    // On failure here, waiters wake on the Failed phase the caller sets.
    let resp = match &spec.source {
        FillSource::Http(url) => upstream.open_artifact(url).await?,
        FillSource::Git { url, resolved } => {
            upstream
                .git_archive(url, resolved, &storage.spool_dir())
                .await?
        }
    };
    // Pass through from the start when the bytes have nowhere to go: no spool file, a store
    // that refuses writes, or too little free space for the announced length.
    let mut reservation = None;
    let mut spool = match &file {
        Some(f) if storage.can_keep_artifacts() => match resp.content_length {
            Some(n) => {
                let mut reserved = storage.reserve_spool(n, SPACE_MARGIN);
                // With eviction on, least recently used units make room first.
                if let Err(free) = reserved
                    && storage
                        .make_room(n.saturating_add(SPACE_MARGIN).saturating_sub(free))
                        .await
                {
                    reserved = storage.reserve_spool(n, SPACE_MARGIN);
                }
                match reserved {
                    Ok(r) => {
                        reservation = Some(r);
                        Some(f.clone())
                    }
                    Err(free) => {
                        tracing::warn!(source = %spec.source, size = n, free, "too little free space to keep this artifact; passing it through");
                        None
                    }
                }
            }
            None => Some(f.clone()),
        },
        _ => None,
    };
    if spool.is_none() {
        window.lock().expect("fill window lock").pass_from(0);
    }
    tx.send_modify(|s| {
        s.total = resp.content_length;
        s.headers_seen = true;
        s.passing = spool.is_none();
    });
    let mut written: u64 = 0;
    let mut body = resp.body;
    // Chunks go to readers at once; behind them, in batches, to a hashing thread and (while
    // spooling) a writing thread, one batch of each in flight while the next gathers. The
    // download never waits for either unless they fall a batch behind, and the readers' last
    // bytes still wait for the whole digest.
    let mut batch = WriteBatch::default();
    let mut hashing = HashChain::default();
    let mut in_flight: Option<PendingWrite> = None;
    loop {
        let next = body.next().await;
        let last = next.is_none();
        if let Some(chunk) = next {
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
            let at = written;
            written += chunk.len() as u64;
            batch.add(at, chunk.clone());
            window.lock().expect("fill window lock").push(at, chunk);
            tx.send_modify(|s| s.written = written);
        }
        if batch.bytes >= WRITE_BATCH || (last && batch.bytes > 0) {
            let full = std::mem::take(&mut batch);
            hashing.feed(full.chunks.clone()).await?;
            if let Some(f) = spool.clone() {
                if settle_write(&mut in_flight, window, storage, &spec).await {
                    in_flight = Some(full.write(f));
                } else {
                    spool = None;
                    reservation = None;
                    tx.send_modify(|s| s.passing = true);
                }
            }
        }
        if last {
            break;
        }
        if spool.is_none() {
            wait_for_room(window, room).await;
        }
    }
    if spool.is_some() && !settle_write(&mut in_flight, window, storage, &spec).await {
        spool = None;
        reservation = None;
        tx.send_modify(|s| s.passing = true);
    }
    let digest = hashing.finish().await?;
    if let Some(n) = resp.content_length
        && written != n
    {
        return Err(CacheError::Integrity(format!(
            "{} ended after {written} of {n} bytes",
            spec.source
        )));
    }
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
    drop(reservation);
    let mut meta = ObjectMeta::new(written, digest, &spec.content_type);
    meta.origin_url = Some(match &spec.source {
        FillSource::Http(url) => url.to_string(),
        FillSource::Git { url, .. } => url.clone(),
    });
    meta.etag = resp.etag;
    meta.last_modified = resp.last_modified;
    meta.extra = spec.extra;
    Ok((meta, spool))
}

/// Bytes gathered for one write to the spool file.
const WRITE_BATCH: u64 = 1 << 20;

/// Chunks waiting to be written, contiguous from `start`.
#[derive(Default)]
struct WriteBatch {
    start: u64,
    chunks: Vec<Bytes>,
    bytes: u64,
}

/// A batch being written on a blocking thread: where it starts and ends, and how it went.
type PendingWrite = tokio::task::JoinHandle<(u64, u64, io::Result<()>)>;

impl WriteBatch {
    fn add(&mut self, at: u64, chunk: Bytes) {
        if self.chunks.is_empty() {
            self.start = at;
        }
        self.bytes += chunk.len() as u64;
        self.chunks.push(chunk);
    }

    /// Writes the batch on a blocking thread, all its chunks in one vectored write where the
    /// kernel takes them at once.
    fn write(self, file: Arc<std::fs::File>) -> PendingWrite {
        let batch = self;
        tokio::task::spawn_blocking(move || {
            let end = batch.start + batch.bytes;
            (
                batch.start,
                end,
                write_chunks_at(&file, &batch.chunks, batch.start),
            )
        })
    }
}

/// Writes `chunks` contiguously from `at` with `pwritev`, resuming after a short write.
fn write_chunks_at(file: &std::fs::File, chunks: &[Bytes], mut at: u64) -> io::Result<()> {
    // The kernel takes at most IOV_MAX (1024) slices per call.
    const MAX_SLICES: usize = 1024;
    let (mut first, mut skip) = (0, 0usize);
    while first < chunks.len() {
        let slices: Vec<io::IoSlice<'_>> = chunks[first..]
            .iter()
            .take(MAX_SLICES)
            .enumerate()
            .map(|(i, c)| io::IoSlice::new(if i == 0 { &c[skip..] } else { &c[..] }))
            .collect();
        let mut n = match rustix::io::pwritev(file, &slices, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        // Move past what was written: whole chunks, then part of the next.
        while first < chunks.len() && n >= chunks[first].len() - skip {
            n -= chunks[first].len() - skip;
            first += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
}

/// The sha256 of a fill, computed batch by batch on blocking threads, in order.
#[derive(Default)]
struct HashChain {
    idle: Option<Sha256>,
    running: Option<tokio::task::JoinHandle<Sha256>>,
}

impl HashChain {
    async fn take(&mut self) -> Result<Sha256, CacheError> {
        match self.running.take() {
            Some(run) => run.await.map_err(|e| CacheError::Internal(e.to_string())),
            None => Ok(self.idle.take().unwrap_or_default()),
        }
    }

    /// Hashes `chunks` after the batches before them.
    async fn feed(&mut self, chunks: Vec<Bytes>) -> Result<(), CacheError> {
        let mut hasher = self.take().await?;
        self.running = Some(tokio::task::spawn_blocking(move || {
            for c in &chunks {
                hasher.update(c);
            }
            hasher
        }));
        Ok(())
    }

    async fn finish(mut self) -> Result<[u8; 32], CacheError> {
        Ok(self.take().await?.finalize().into())
    }
}

/// Waits for the write in flight, if any. On success the window learns the file holds those
/// bytes; on failure the fill passes the rest through from the failed batch's start (those
/// bytes are still in memory) and this returns false.
async fn settle_write(
    in_flight: &mut Option<PendingWrite>,
    window: &std::sync::Mutex<Window>,
    storage: &Storage,
    spec: &FillSpec,
) -> bool {
    let Some(write) = in_flight.take() else {
        return true;
    };
    let (start, end, result) = match write.await {
        Ok(done) => done,
        Err(e) => (0, 0, Err(io::Error::other(e))),
    };
    match result {
        Ok(()) => {
            window.lock().expect("fill window lock").wrote_to(end);
            true
        }
        Err(e) => {
            storage.note_spool_failure(&e);
            tracing::warn!(source = %spec.source, at = start, error = %e, "spool write failed; passing the rest of this artifact through");
            let mut w = window.lock().expect("fill window lock");
            let from = w.on_file;
            w.pass_from(from);
            false
        }
    }
}

/// Waits until a passing fill's slowest reader has taken enough for it to drop a chunk.
async fn wait_for_room(window: &std::sync::Mutex<Window>, room: &tokio::sync::Notify) {
    loop {
        let notified = room.notified();
        tokio::pin!(notified);
        // Registered before the check, so a reader that moves on in between still wakes us.
        notified.as_mut().enable();
        if !window.lock().expect("fill window lock").full() {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_written_whole_at_their_offset() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("spool"))
            .unwrap();
        // More slices than one call takes, of uneven sizes, after a gap at the start.
        let chunks: Vec<Bytes> = (0..2500u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; 1 + (i as usize * 7) % 300]))
            .collect();
        write_chunks_at(&file, &chunks, 10).unwrap();
        let expected: Vec<u8> = std::iter::repeat_n(0u8, 10)
            .chain(chunks.iter().flat_map(|c| c.iter().copied()))
            .collect();
        assert_eq!(std::fs::read(dir.path().join("spool")).unwrap(), expected);
    }

    fn chunk(n: usize, b: u8) -> Bytes {
        Bytes::from(vec![b; n])
    }

    #[test]
    fn recent_chunks_are_sliced_by_offset_and_the_oldest_go_first() {
        let mut recent = Window::default();
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
        // the file, so a reader's place does not keep them.
        let behind = recent.join(0).unwrap();
        let big = RECENT_MAX / 2;
        recent.push(30, chunk(big, 3));
        recent.push(30 + big as u64, chunk(big, 4));
        // Not on file yet: kept past the bound.
        assert_eq!(&recent.slice(0, 30).unwrap()[..], &[1; 10]);
        assert!(recent.bytes > RECENT_MAX);
        assert_eq!(recent.file_limit(77), 0, "the file holds nothing yet");
        recent.wrote_to(recent.head);
        assert!(recent.slice(0, u64::MAX).is_none());
        assert!(recent.slice(29, u64::MAX).is_none());
        assert_eq!(recent.slice(30, 31).unwrap()[..], [3]);
        assert!(recent.bytes <= RECENT_MAX);
        assert!(!recent.full(), "a spooling fill never waits for readers");
        assert_eq!(recent.file_limit(77), 77);
        // One chunk larger than the bound is still kept (it is the newest).
        recent.push(30 + 2 * big as u64, chunk(RECENT_MAX + 1, 5));
        recent.wrote_to(recent.head);
        assert_eq!(recent.chunks.len(), 1);
        assert_eq!(
            recent.slice(30 + 2 * big as u64, u64::MAX).unwrap().len(),
            RECENT_MAX + 1
        );
        assert!(recent.readers.contains_key(&behind));
    }

    #[test]
    fn a_passing_fill_keeps_what_its_slowest_reader_needs() {
        let mut w = Window::default();
        let quarter = RECENT_MAX / 4;
        // 2 quarters spooled, then the spool failed at that offset.
        w.push(0, chunk(quarter, 1));
        w.push(quarter as u64, chunk(quarter, 2));
        let at = 2 * quarter as u64;
        w.wrote_to(at);
        w.pass_from(at);
        assert_eq!(
            w.file_limit(u64::MAX),
            at,
            "the file holds what came before"
        );
        // One reader still in the file's part, one at the head.
        let slow = w.join(0).unwrap();
        let fast = w.join(at).unwrap();
        for i in 0..5u64 {
            w.push(at + i * quarter as u64, chunk(quarter, 3 + i as u8));
        }
        // Over the bound: the spooled chunks went, the in-memory ones stay for the slow reader.
        assert_eq!(w.chunks.front().unwrap().0, at);
        assert!(w.bytes > RECENT_MAX);
        assert!(w.full(), "the fill waits for its slow reader");
        // A reader can still start in the file, or at a byte still in memory.
        assert!(w.join(1).is_some());
        assert!(w.join(at + 1).is_some());
        w.readers.retain(|id, _| *id == slow || *id == fast);
        // The fast reader takes all it may; the slow one moves past the first in-memory
        // chunk: that chunk can go.
        w.advance(fast, w.head - HOLDBACK);
        assert!(w.full());
        w.advance(slow, at + quarter as u64);
        assert!(!w.full());
        assert_eq!(w.chunks.front().unwrap().0, at + quarter as u64);
        assert_eq!(w.memory_from, at + quarter as u64);
        // Those bytes are gone from memory and were never in the file: nobody can start there.
        assert!(w.join(at).is_none());
        assert!(w.join(at + quarter as u64 - 1).is_none());
        assert!(w.join(at - 1).is_some());
        // Readers that took everything they may (all but the held-back tail) never make the
        // fill wait, however much it holds.
        let head = w.head;
        w.readers.clear();
        let id = w.join(head - HOLDBACK).unwrap();
        w.push(head, chunk(RECENT_MAX, 9));
        w.advance(id, w.head - HOLDBACK);
        assert!(!w.full());
        // Without readers nothing is kept beyond the bound.
        w.readers.clear();
        w.push(w.head, chunk(quarter, 10));
        assert!(w.bytes <= RECENT_MAX + quarter);
        assert!(!w.full());
    }
}
