//! The cache policy: what is immutable and what expires, single flight per key, verification
//! before publishing, stale copies when the upstream fails, and the streaming tee from upstream to
//! client and store.

mod dirhash;
mod fill;
mod flight;
mod gc;
pub mod keys;
mod mirror;
mod modules;
mod record;
mod sealed;

pub use gc::{GcReport, Purge, PurgeReport};
pub use keys::{ModuleRelease, ProviderFile, ProviderRelease};
pub use modules::ModuleAnswer;
pub use sealed::is_archive_leaf;

use crate::registry::provider::{ProviderDownload, ProviderVersions, Sha256Sums};
use crate::registry::signature::verify_detached;
use crate::registry::{FileName, Host, ProviderName};
use crate::storage::{ObjectMeta, Storage, StorageKey};
use crate::upstream::{Upstream, UpstreamError};
use bytes::Bytes;
use fill::{Fill, FillSource, FillSpec, Phase};
use flight::Flights;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use url::Url;

/// How long a published fill stays joinable after it finished.
const FINISHED_FILL_LINGER: Duration = Duration::from_secs(5);

/// Makes the `s/{expiry}/{signature}` segments for an artifact path (access control on).
pub type PathSigner = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// How TerraPeak writes links to its own artifact routes into answers: the base URL clients
/// reach it at and, with access control on, a signature in each path.
pub struct Links {
    base: String,
    sign: Option<PathSigner>,
}

impl Links {
    pub fn new(base: &str, sign: Option<PathSigner>) -> Links {
        Links {
            base: base.trim_end_matches('/').to_owned(),
            sign,
        }
    }

    /// `{base}/artifacts/[s/{expiry}/{signature}/]{path}`.
    pub fn artifact(&self, path: &str) -> String {
        match &self.sign {
            Some(sign) => format!("{}/artifacts/{}/{path}", self.base, sign(path)),
            None => format!("{}/artifacts/{path}", self.base),
        }
    }
}

/// How the store is doing, for `/readyz`.
#[derive(Debug, serde::Serialize)]
pub struct StoreReport {
    pub backend: &'static str,
    /// Cached objects can be read.
    pub readable: bool,
    /// New objects (artifacts included) can be kept; while false, misses pass through.
    pub writable: bool,
    /// The sides of the store that fail now; empty when it is healthy.
    pub degraded: Vec<crate::storage::health::Degradation>,
}

/// Why the cache could not answer. Cloneable so that single-flight waiters all get it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("verification failed: {0}")]
    Integrity(String),
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable(u64),
    #[error("internal error: {0}")]
    Internal(String),
    /// The store cannot be read now (sealed mode lists it to answer).
    #[error("the store cannot be read now: {0}")]
    Unavailable(String),
    /// The request contradicts how this TerraPeak is set up (a refresh when sealed).
    #[error("{0}")]
    Conflict(String),
}

/// How an answer was produced, for `X-Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Stale,
    /// Served from upstream without being kept: the store is failing.
    Pass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Pass => "PASS",
        }
    }
}

/// A body ready to send.
pub enum Body {
    Empty,
    Bytes(Bytes),
    Stream(BoxStream<'static, io::Result<Bytes>>),
}

/// A byte range as a client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=start-` or `bytes=start-end` (end inclusive).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl RangeSpec {
    /// Resolves against the object's length into `start..end` (end exclusive).
    fn resolve(self, total: u64) -> Result<(u64, u64), CacheError> {
        let (start, end) = match self {
            RangeSpec::From { start, end } => {
                (start, end.map_or(total, |e| e.saturating_add(1).min(total)))
            }
            RangeSpec::Suffix(n) => (total.saturating_sub(n), total),
        };
        if start >= end || start >= total {
            return Err(CacheError::RangeNotSatisfiable(total));
        }
        Ok((start, end))
    }
}

/// An answer: what to send and what it is.
pub struct Served {
    pub status: CacheStatus,
    pub content_type: String,
    /// Length of the body sent, when known in advance.
    pub length: Option<u64>,
    /// For a partial answer: `start..end` (end exclusive) of `total`.
    pub range: Option<(u64, u64, u64)>,
    /// Hex sha256 of the whole object, when known (becomes the ETag).
    pub sha256: Option<String>,
    pub body: Body,
}

impl Served {
    fn json(status: CacheStatus, data: Bytes) -> Served {
        Served {
            status,
            content_type: "application/json".into(),
            length: Some(data.len() as u64),
            range: None,
            sha256: None,
            body: Body::Bytes(data),
        }
    }

    /// In-memory bytes, honouring a range.
    fn bytes(
        status: CacheStatus,
        content_type: &str,
        data: Bytes,
        want: Want,
        range: Option<RangeSpec>,
    ) -> Result<Served, CacheError> {
        let total = data.len() as u64;
        let (start, end) = match range {
            Some(r) => r.resolve(total)?,
            None => (0, total),
        };
        let data = data.slice(start as usize..end as usize);
        Ok(Served {
            status,
            content_type: content_type.into(),
            length: Some(end - start),
            range: range.map(|_| (start, end, total)),
            sha256: None,
            body: match want {
                Want::Body => Body::Bytes(data),
                Want::HeadersOnly => Body::Empty,
            },
        })
    }
}

/// One artifact fill under way.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FillProgress {
    pub key: String,
    pub written: u64,
    pub total: Option<u64>,
    pub passing: bool,
}

/// Whether the body is wanted (GET) or only its headers (HEAD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Body,
    HeadersOnly,
}

pub struct Cache {
    storage: Storage,
    /// The configured upstream registries, by the host name Terraform knows them by.
    upstreams: HashMap<Host, Arc<Upstream>>,
    default_host: Host,
    versions_ttl: Duration,
    /// How long past the TTL a version list may still be served; `None` = without limit.
    max_stale: Option<Duration>,
    negative_ttl: Duration,
    negative: Mutex<HashMap<StorageKey, Instant>>,
    json_flights: Flights<Result<Bytes, CacheError>>,
    /// Git ref resolutions under way, so a fleet's cold requests for one module ask the git
    /// host once.
    git_flights: Flights<Result<crate::upstream::git::Resolved, CacheError>>,
    fills: Arc<Mutex<HashMap<StorageKey, Arc<Fill>>>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Every fill task, so shutdown can wait for fills still publishing.
    fill_tasks: tokio_util::task::TaskTracker,
    /// This process's own probe object, so replicas on one bucket do not read each other's.
    probe_key: StorageKey,
    /// Sealed mode (`cache.offline`): answers come from the store only.
    offline: bool,
    /// Sealed version lists built lately, by their stored list's key.
    sealed_lists: Mutex<HashMap<StorageKey, (Instant, Bytes)>>,
}

pub(crate) fn panicked() -> CacheError {
    CacheError::Internal("a fill task panicked".into())
}

impl Cache {
    /// `upstreams` must not be empty; the first is the default (registry mode).
    pub fn new(
        storage: Storage,
        upstreams: Vec<Upstream>,
        versions_ttl: Duration,
        max_stale: Option<Duration>,
        negative_ttl: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Cache {
        let default_host = upstreams[0].host().clone();
        Cache {
            storage,
            upstreams: upstreams
                .into_iter()
                .map(|u| (u.host().clone(), Arc::new(u)))
                .collect(),
            default_host,
            versions_ttl,
            max_stale,
            negative_ttl,
            negative: Mutex::new(HashMap::new()),
            json_flights: Flights::default().count_joins(metrics.singleflight_joined.clone()),
            git_flights: Flights::default().count_joins(metrics.singleflight_joined.clone()),
            fills: Arc::new(Mutex::new(HashMap::new())),
            fill_tasks: tokio_util::task::TaskTracker::new(),
            metrics,
            probe_key: StorageKey::from_segments([
                "_probe".to_owned(),
                format!("readyz-{}", uuid::Uuid::new_v4().simple()),
            ]),
            offline: false,
            sealed_lists: Mutex::new(HashMap::new()),
        }
    }

    /// Seals the cache (`cache.offline`): no upstream is asked, version lists come from what
    /// is stored.
    pub fn with_offline(mut self, offline: bool) -> Cache {
        self.offline = offline;
        self
    }

    /// The store this cache keeps its objects in.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The artifact fills under way, for the status page: storage key, bytes so far, the
    /// announced length, and whether the bytes are passed through without being kept.
    pub fn fills_in_progress(&self) -> Vec<FillProgress> {
        let fills = self.fills.lock().expect("fills lock");
        let mut out: Vec<FillProgress> = fills
            .iter()
            .filter_map(|(key, fill)| {
                let s = fill.state();
                matches!(s.phase, Phase::Running).then(|| FillProgress {
                    key: key.to_string(),
                    written: s.written,
                    total: s.total,
                    passing: s.passing,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Drops finished fills of `keys` that linger for late joiners, so a purged object is
    /// not served from a fill's copy afterwards.
    pub(crate) fn forget_finished_fills(&self, keys: &[StorageKey]) {
        let mut fills = self.fills.lock().expect("fills lock");
        for key in keys {
            if fills
                .get(key)
                .is_some_and(|f| !matches!(f.state().phase, Phase::Running))
            {
                fills.remove(key);
            }
        }
    }

    /// The configured upstream hosts, the default first.
    pub fn upstream_hosts(&self) -> Vec<Host> {
        let mut hosts: Vec<Host> = self.upstreams.keys().cloned().collect();
        hosts.sort_by_key(|h| (h != &self.default_host, h.to_string()));
        hosts
    }

    /// Waits (up to `limit`) for every artifact fill to end, publishing included, and for the
    /// small objects still being written behind their answers. Returns whether they all did.
    pub async fn finish_fills(&self, limit: Duration) -> bool {
        self.fill_tasks.close();
        tokio::time::timeout(limit, async {
            self.fill_tasks.wait().await;
            self.storage.settle_writes().await;
        })
        .await
        .is_ok()
    }

    /// The host name of the default upstream registry.
    pub fn default_host(&self) -> &Host {
        &self.default_host
    }

    /// Writes and reads back a small object, then says how the store is doing.
    pub async fn store_report(&self) -> StoreReport {
        // The probe's outcome is in the health it updates.
        let _ = self.storage.probe(&self.probe_key).await;
        StoreReport {
            backend: self.storage.backend().as_str(),
            readable: self.storage.readable(),
            writable: self.storage.can_keep_artifacts(),
            degraded: self.storage.degradations(),
        }
    }

    /// Reads a small object; a storage failure is logged and treated as a miss, so a sick store
    /// never turns an answerable request into an error.
    async fn read_small(&self, key: &StorageKey) -> Option<(Arc<ObjectMeta>, Bytes)> {
        match self.storage.get_bytes(key).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "storage read failed; treating as a miss");
                None
            }
        }
    }

    fn negative_hit(&self, key: &StorageKey) -> bool {
        let mut map = self.negative.lock().expect("negative lock");
        match map.get(key) {
            Some(at) if at.elapsed() < self.negative_ttl => true,
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember_not_found(&self, key: &StorageKey) {
        let mut map = self.negative.lock().expect("negative lock");
        // Bounded: a flood of distinct unknown names must not grow memory without limit.
        if map.len() >= 10_000 {
            let ttl = self.negative_ttl;
            map.retain(|_, at| at.elapsed() < ttl);
            if map.len() >= 10_000 {
                map.clear();
            }
        }
        map.insert(key.clone(), Instant::now());
    }

    /// The upstream registry configured for `host`; any other host is a 404, so no request
    /// ever reaches a host TerraPeak was not configured with or did not learn from one.
    fn upstream(&self, host: &Host) -> Result<Arc<Upstream>, CacheError> {
        self.upstreams.get(host).cloned().ok_or_else(|| {
            CacheError::NotFound(format!("{host} is not a configured upstream registry"))
        })
    }

    /// The provider version list: fresh within the TTL, refetched after it, and the last good
    /// copy (STALE) when the upstream cannot answer.
    pub async fn provider_versions(
        &self,
        host: &Host,
        name: &ProviderName,
    ) -> Result<Served, CacheError> {
        self.provider_versions_with(host, name, false).await
    }

    /// Fetches the provider version list from upstream now, whatever the age of the stored
    /// one (which stays if the upstream fails). Not in sealed mode.
    pub async fn refresh_provider_versions(
        &self,
        host: &Host,
        name: &ProviderName,
    ) -> Result<Served, CacheError> {
        self.provider_versions_with(host, name, true).await
    }

    async fn provider_versions_with(
        &self,
        host: &Host,
        name: &ProviderName,
        force: bool,
    ) -> Result<Served, CacheError> {
        let upstream = self.upstream(host)?;
        if self.offline {
            if force {
                return Err(self.sealed_refresh());
            }
            return self.sealed_provider_versions(host, name).await;
        }
        let (what, name) = (format!("provider {name}"), name.clone());
        self.version_list(
            keys::provider_versions(host, &name),
            what,
            force,
            async move {
                let body = upstream.provider_versions(&name).await?;
                let doc: ProviderVersions = serde_json::from_slice(&body)
                    .map_err(|e| UpstreamError::Invalid(format!("version list for {name}: {e}")))?;
                Ok(serde_json::to_vec(&doc).expect("serializes"))
            },
        )
        .await
    }

    /// A version list (providers or modules) under the TTL policy: fresh within the TTL,
    /// refetched after it, the last good copy (STALE) when the upstream cannot answer, and
    /// upstream 404s remembered briefly. `fetch` returns the parsed and re-serialized document.
    async fn version_list<F>(
        &self,
        key: StorageKey,
        what: String,
        force: bool,
        fetch: F,
    ) -> Result<Served, CacheError>
    where
        F: std::future::Future<Output = Result<Vec<u8>, UpstreamError>> + Send + 'static,
    {
        let ttl = self.versions_ttl.as_secs();
        // A copy older than TTL + max_stale is not served at all: fetch, and fail if that fails.
        let cached = if force {
            None
        } else {
            self.read_small(&key).await.filter(|(meta, _)| {
                self.max_stale
                    .is_none_or(|max| meta.age_secs() < ttl.saturating_add(max.as_secs()))
            })
        };
        if let Some((meta, data)) = &cached
            && meta.age_secs() < ttl
        {
            return Ok(Served::json(CacheStatus::Hit, data.clone()));
        }
        if cached.is_none() && !force && self.negative_hit(&key) {
            return Err(CacheError::NotFound(format!("{what} not found")));
        }
        let work = {
            let storage = self.storage.clone();
            let key = key.clone();
            async move {
                let data = Bytes::from(fetch.await?);
                let meta = ObjectMeta::new(
                    data.len() as u64,
                    Sha256::digest(&data).into(),
                    "application/json",
                );
                store_behind(&storage, &key, data.clone(), meta);
                Ok(data)
            }
        };
        if let Some((meta, data)) = cached {
            // Past the TTL: answer at once with the copy we have and refresh it in the
            // background, one refresh per key. If the refresh fails, the copy stays.
            let age = meta.age_secs();
            let key_for_log = key.clone();
            self.json_flights.start(
                key.as_str(),
                async move {
                    let result = work.await;
                    match &result {
                        // The open circuit was logged once, when it opened.
                        Err(e @ CacheError::Upstream(UpstreamError::CircuitOpen(_))) => {
                            tracing::debug!(key = %key_for_log, error = %e, age_secs = age, "version list refresh skipped; the stale copy stays");
                        }
                        Err(e) => {
                            tracing::warn!(key = %key_for_log, error = %e, age_secs = age, "version list refresh failed; the stale copy stays");
                        }
                        Ok(_) => {}
                    }
                    result
                },
                Err(panicked()),
            );
            return Ok(Served::json(CacheStatus::Stale, data));
        }
        match self
            .json_flights
            .run(key.as_str(), work, Err(panicked()))
            .await
        {
            Ok(data) => Ok(Served::json(self.miss(), data)),
            Err(CacheError::Upstream(UpstreamError::NotFound(_))) => {
                self.remember_not_found(&key);
                Err(CacheError::NotFound(format!("{what} not found")))
            }
            Err(e) => Err(e),
        }
    }

    /// The download answer as the upstream gave it (URLs made absolute), from the cache or
    /// fetched once. Download answers for a release never change.
    async fn download_doc(
        &self,
        r: &ProviderRelease,
    ) -> Result<(CacheStatus, ProviderDownload), CacheError> {
        let upstream = self.upstream(&r.host)?;
        let release = r.clone();
        self.immutable_doc(keys::provider_download(r), r.to_string(), async move {
            let (url, body) = upstream
                .provider_download(&release.name, &release.version, &release.platform)
                .await?;
            Ok((parse_download(&url, &body, &release)?, url.to_string()))
        })
        .await
    }

    /// A document that never changes once published (a download answer, a module location):
    /// from the store, or fetched once for all concurrent askers and stored. `fetch` returns the
    /// parsed document and the URL it came from. Upstream 404s are remembered briefly.
    pub(crate) async fn immutable_doc<T, F>(
        &self,
        key: StorageKey,
        what: String,
        fetch: F,
    ) -> Result<(CacheStatus, T), CacheError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
        F: std::future::Future<Output = Result<(T, String), CacheError>> + Send + 'static,
    {
        if let Some((_, data)) = self.read_small(&key).await {
            match serde_json::from_slice(&data) {
                Ok(doc) => return Ok((CacheStatus::Hit, doc)),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "unreadable cached document; refetching")
                }
            }
        }
        if self.offline {
            let kind = if key.as_str().starts_with("modules/") {
                "module"
            } else {
                "provider"
            };
            return Err(self.sealed_miss(kind, &what));
        }
        if self.negative_hit(&key) {
            return Err(CacheError::NotFound(format!("{what} not found")));
        }
        let work = {
            let storage = self.storage.clone();
            let key = key.clone();
            async move {
                let (doc, origin) = fetch.await?;
                let data = Bytes::from(serde_json::to_vec(&doc).expect("serializes"));
                let mut meta = ObjectMeta::new(
                    data.len() as u64,
                    Sha256::digest(&data).into(),
                    "application/json",
                );
                meta.origin_url = Some(origin);
                // Kept before it is answered: the artifact request it leads to may reach
                // another replica on the same store, which must find it there.
                store_or_warn(&storage, &key, &data, &meta).await;
                Ok(data)
            }
        };
        match self
            .json_flights
            .run(key.as_str(), work, Err(panicked()))
            .await
        {
            Ok(data) => {
                let doc = serde_json::from_slice(&data)
                    .map_err(|e| CacheError::Internal(e.to_string()))?;
                Ok((self.miss(), doc))
            }
            Err(CacheError::Upstream(UpstreamError::NotFound(_))) => {
                self.remember_not_found(&key);
                Err(CacheError::NotFound(format!("{what} not found")))
            }
            Err(e) => Err(e),
        }
    }

    /// The download answer with its three links pointing at TerraPeak (`links`).
    pub async fn provider_download(
        &self,
        r: &ProviderRelease,
        links: &Links,
    ) -> Result<Served, CacheError> {
        self.upstream(&r.host)?;
        let (status, mut doc) = self.download_doc(r).await?;
        if status != CacheStatus::Hit {
            self.prefetch_sums(r, &doc);
        }
        rewrite_download(&mut doc, r, links)?;
        let data = Bytes::from(serde_json::to_vec(&doc).expect("serializes"));
        Ok(Served::json(status, data))
    }

    /// The download answer this TerraPeak handed out for `r`, or a 404: artifact routes fetch
    /// only what a registry answer pointed to, and a probe for anything else never reaches the
    /// upstream. While the store fails, the answer may never have been kept, so the registry is
    /// asked again (the same request a client's download call makes).
    async fn handed_out(&self, r: &ProviderRelease) -> Result<ProviderDownload, CacheError> {
        let key = keys::provider_download(r);
        match self.read_small(&key).await {
            Some((_, data)) => {
                serde_json::from_slice(&data).map_err(|e| CacheError::Internal(e.to_string()))
            }
            None if self.offline => Err(self.sealed_miss("provider", &format!("provider {r}"))),
            None if self.answers_may_be_unkept() => Ok(self.download_doc(r).await?.1),
            None => Err(CacheError::NotFound(format!(
                "no artifact of {r} was handed out by this TerraPeak"
            ))),
        }
    }

    /// Whether an answer handed out lately may be missing from the store: a write failed with
    /// none succeeding since, or reads fail.
    fn answers_may_be_unkept(&self) -> bool {
        self.storage.write_degraded() || !self.storage.readable()
    }

    /// The status of an answer that was not in the store: a `MISS` that is now kept (or being
    /// kept, behind the answer), or a `PASS` when the store is failing (a store that cannot be
    /// read is taken to be unable to keep it either) and the answer went out without being kept.
    fn miss(&self) -> CacheStatus {
        if self.storage.writable() && self.storage.readable() {
            CacheStatus::Miss
        } else {
            CacheStatus::Pass
        }
    }

    /// A provider artifact: the zip, SHA256SUMS or its signature.
    pub async fn provider_artifact(
        &self,
        r: &ProviderRelease,
        file: &ProviderFile,
        want: Want,
        range: Option<RangeSpec>,
    ) -> Result<Served, CacheError> {
        let upstream = self.upstream(&r.host)?;
        // Each artifact has exactly one URL per platform it was handed out for: a zip's name
        // names its platform, and SHA256SUMS and its signature are served only under a
        // platform whose download answer was handed out.
        let key = keys::provider_file(r, file);
        let mut doc = None;
        match file {
            ProviderFile::Zip(name) => {
                let suffix = format!("_{}_{}.zip", r.platform.os, r.platform.arch);
                if !name.as_str().ends_with(&suffix) {
                    return Err(CacheError::NotFound(format!(
                        "{name} is not the {}_{} archive of {r}",
                        r.platform.os, r.platform.arch
                    )));
                }
            }
            ProviderFile::Sums | ProviderFile::Signature => {
                doc = Some(self.handed_out(r).await?);
            }
        }
        // Only what a handed-out answer pointed to is ever stored, so a stored zip can be
        // served without reading that answer again: its hit path is one storage open.
        if let Some(served) = self
            .serve_stored(&key, want, range, CacheStatus::Hit)
            .await?
        {
            return Ok(served);
        }
        let doc = match doc {
            Some(d) => d,
            None => self.handed_out(r).await?,
        };
        match file {
            ProviderFile::Sums | ProviderFile::Signature => {
                if *file == ProviderFile::Signature && doc.signature_url().is_none() {
                    return Err(CacheError::NotFound(format!("{r} has no signature")));
                }
                let (_, sums) = self.verified_sums(r, &doc).await?;
                // Kept, or still being written behind its answer (PASS if the store fails).
                if let Some(served) = self.serve_stored(&key, want, range, self.miss()).await? {
                    return Ok(served);
                }
                // Not kept, so the store is failing: pass through what was just verified.
                let data = match file {
                    ProviderFile::Sums => sums,
                    _ => {
                        let url = doc.signature_url().expect("checked above");
                        let url =
                            Url::parse(url).map_err(|e| CacheError::Internal(e.to_string()))?;
                        let sig = upstream.fetch_small(&url).await?;
                        verify_detached(&sums, &sig, &doc.armored_keys()).map_err(|e| {
                            CacheError::Integrity(format!("SHA256SUMS of {r}: {e}"))
                        })?;
                        sig
                    }
                };
                let content_type = match file {
                    ProviderFile::Sums => "text/plain; charset=utf-8",
                    _ => "application/octet-stream",
                };
                Served::bytes(CacheStatus::Pass, content_type, data, want, range)
            }
            ProviderFile::Zip(name) => {
                if name.as_str() != doc.filename {
                    return Err(CacheError::NotFound(format!(
                        "{name} was not handed out by this TerraPeak"
                    )));
                }
                let (sums, _) = self.verified_sums(r, &doc).await?;
                let expected = doc.expected_sha256().ok_or_else(|| {
                    CacheError::Integrity(format!("{r}: the registry's shasum is not a sha256"))
                })?;
                if sums.get(&doc.filename) != Some(&expected) {
                    return Err(CacheError::Integrity(format!(
                        "SHA256SUMS does not list {} with the registry's shasum",
                        doc.filename
                    )));
                }
                let url = Url::parse(&doc.download_url)
                    .map_err(|e| CacheError::Internal(e.to_string()))?;
                let spec = FillSpec {
                    key,
                    source: FillSource::Http(url),
                    expected_sha256: Some(expected),
                    content_type: "application/zip".into(),
                    extra: serde_json::Map::new(),
                };
                self.serve_fill(upstream, spec, want, range).await
            }
        }
    }

    /// SHA256SUMS for a release, verified against the release's signing keys and stored with its
    /// signature. Stored SHA256SUMS were verified before they were published.
    async fn verified_sums(
        &self,
        r: &ProviderRelease,
        doc: &ProviderDownload,
    ) -> Result<(Sha256Sums, Bytes), CacheError> {
        let sums_key = keys::provider_file(r, &ProviderFile::Sums);
        if let Some((_, data)) = self.read_small(&sums_key).await {
            let parsed =
                Sha256Sums::parse(&data).map_err(|e| CacheError::Integrity(e.to_string()))?;
            return Ok((parsed, data));
        }
        if self.offline {
            return Err(self.sealed_miss("provider", &format!("SHA256SUMS of {r}")));
        }
        let work = self.sums_work(r, doc)?;
        let data = self
            .json_flights
            .run(sums_key.as_str(), work, Err(panicked()))
            .await
            .inspect_err(|e| tracing::warn!(release = %r, error = %e, "SHA256SUMS not verified; nothing was cached"))?;
        let parsed = Sha256Sums::parse(&data).map_err(|e| CacheError::Integrity(e.to_string()))?;
        Ok((parsed, data))
    }

    /// The work of fetching, verifying and keeping a release's SHA256SUMS and signature: one
    /// future, for all concurrent askers (and a prefetch) through the metadata single flight.
    fn sums_work(
        &self,
        r: &ProviderRelease,
        doc: &ProviderDownload,
    ) -> Result<
        impl std::future::Future<Output = Result<Bytes, CacheError>> + Send + 'static,
        CacheError,
    > {
        let sums_key = keys::provider_file(r, &ProviderFile::Sums);
        let upstream = self.upstream(&r.host)?;
        let storage = self.storage.clone();
        let sig_key = keys::provider_file(r, &ProviderFile::Signature);
        let (sums_key, doc, r) = (sums_key.clone(), doc.clone(), r.clone());
        Ok(async move {
            // A prefetch, or another platform of the release, may have kept it meanwhile.
            if let Ok(Some((_, data))) = storage.get_bytes(&sums_key).await {
                return Ok(data);
            }
            let sums_url =
                Url::parse(&doc.shasums_url).map_err(|e| CacheError::Internal(e.to_string()))?;
            let sig_url = match doc.signature_url() {
                Some(u) => Some(Url::parse(u).map_err(|e| CacheError::Internal(e.to_string()))?),
                None => None,
            };
            let (sums, sig) = tokio::join!(upstream.fetch_small(&sums_url), async {
                match &sig_url {
                    Some(u) => upstream.fetch_small(u).await.map(Some),
                    None => Ok(None),
                }
            });
            let (sums, sig) = (sums?, sig?);
            Sha256Sums::parse(&sums)
                .map_err(|e| CacheError::Integrity(format!("SHA256SUMS of {r}: {e}")))?;
            let mut extra = serde_json::Map::new();
            let mut kept = Vec::with_capacity(2);
            match (&sig, &sig_url) {
                (Some(sig), Some(sig_url)) => {
                    let keys = doc.armored_keys();
                    let signer = verify_detached(&sums, sig, &keys)
                        .map_err(|e| CacheError::Integrity(format!("SHA256SUMS of {r}: {e}")))?;
                    extra.insert("signed_by".into(), signer.into());
                    let mut meta = ObjectMeta::new(
                        sig.len() as u64,
                        Sha256::digest(sig).into(),
                        "application/octet-stream",
                    );
                    meta.origin_url = Some(sig_url.to_string());
                    kept.push((sig_key.clone(), sig.clone(), meta));
                }
                _ => {
                    tracing::warn!(release = %r, "upstream offers no signature; keeping SHA256SUMS as unsigned");
                    extra.insert("unsigned".into(), true.into());
                }
            }
            let mut meta = ObjectMeta::new(
                sums.len() as u64,
                Sha256::digest(&sums).into(),
                "text/plain; charset=utf-8",
            );
            meta.origin_url = Some(sums_url.to_string());
            meta.extra = extra;
            // The signature is kept before SHA256SUMS, so stored sums always have theirs.
            kept.push((sums_key.clone(), sums.clone(), meta));
            storage.put_bytes_behind(kept);
            Ok(sums)
        })
    }

    /// Starts fetching a release's SHA256SUMS and signature in the background, right after its
    /// download answer was fetched: Terraform asks for them next, and the zip's fill needs them
    /// before it can stream.
    fn prefetch_sums(&self, r: &ProviderRelease, doc: &ProviderDownload) {
        if self.offline {
            return;
        }
        let sums_key = keys::provider_file(r, &ProviderFile::Sums);
        let Ok(work) = self.sums_work(r, doc) else {
            return;
        };
        let release = r.clone();
        self.json_flights.start(
            sums_key.as_str(),
            async move {
                let result = work.await;
                if let Err(e) = &result {
                    tracing::warn!(release = %release, error = %e, "SHA256SUMS prefetch failed; it is fetched again when asked for");
                }
                result
            },
            Err(panicked()),
        );
    }

    /// Serves a stored object, or `None` when it is not stored.
    async fn serve_stored(
        &self,
        key: &StorageKey,
        want: Want,
        range: Option<RangeSpec>,
        status: CacheStatus,
    ) -> Result<Option<Served>, CacheError> {
        let opened = match self.storage.open(key).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "storage read failed; treating as a miss");
                None
            }
        };
        let Some(stored) = opened else {
            return Ok(None);
        };
        let meta = stored.meta.clone();
        let total = meta.size;
        let (start, end) = match range {
            Some(r) => r.resolve(total)?,
            None => (0, total),
        };
        let body = match want {
            Want::HeadersOnly => Body::Empty,
            Want::Body => match stored.stream(start, end).await {
                Ok(stream) => Body::Stream(stream),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "storage read failed; treating as a miss");
                    return Ok(None);
                }
            },
        };
        Ok(Some(Served {
            status,
            content_type: meta.content_type.clone(),
            length: Some(end - start),
            range: range.map(|_| (start, end, total)),
            sha256: Some(meta.sha256.clone()),
            body,
        }))
    }

    /// Joins the fill for `spec.key`, or starts it, and serves from it while it runs.
    async fn serve_fill(
        &self,
        upstream: Arc<Upstream>,
        spec: FillSpec,
        want: Want,
        range: Option<RangeSpec>,
    ) -> Result<Served, CacheError> {
        let key = spec.key.clone();
        if self.offline {
            let kind = if key.as_str().starts_with("modules/") {
                "module"
            } else {
                "provider"
            };
            return Err(self.sealed_miss(kind, key.as_str()));
        }
        let content_type = spec.content_type.clone();
        // A reader takes its place (ticket) at once, before it waits for anything: a fill that
        // passes its bytes through keeps only what its readers still need.
        let (fill, ticket, started) = {
            let mut map = self.fills.lock().expect("fills lock");
            match map.get(&key) {
                Some(f) => {
                    self.metrics.singleflight_joined.inc();
                    let ticket = f.join(0);
                    (f.clone(), ticket, false)
                }
                None => {
                    let fills = self.fills.clone();
                    let end_key = key.clone();
                    // Registered under the same lock hold that starts it, so the fill's own
                    // removal (which takes this lock) always finds this entry. A failed fill
                    // leaves at once, so the next request retries; a published one stays a
                    // little longer, so a request that missed the store just before the publish
                    // joins it instead of downloading the same bytes again.
                    let (fill, ticket) =
                        self.start_fill(upstream.clone(), &spec, move |published| {
                            let remove = move || {
                                fills.lock().expect("fills lock").remove(&end_key);
                            };
                            if published {
                                crate::runtime::spawn(async move {
                                    tokio::time::sleep(FINISHED_FILL_LINGER).await;
                                    remove();
                                });
                            } else {
                                remove();
                            }
                        });
                    map.insert(key.clone(), fill.clone());
                    (fill, Some(ticket), true)
                }
            }
        };
        if let Some(served) = self
            .serve_from_fill(&fill, ticket, started, &content_type, want, range)
            .await?
        {
            return Ok(served);
        }
        // The fill passes its bytes through and no longer holds the ones this client needs:
        // a download of its own, from the first byte (a range is answered whole, as RFC 9110
        // allows).
        let (fill, ticket) = self.start_fill(upstream, &spec, |_| {});
        let served = self
            .serve_from_fill(&fill, Some(ticket), true, &content_type, want, None)
            .await?;
        served.ok_or_else(|| CacheError::Internal("a new fill refused its first reader".into()))
    }

    fn start_fill(
        &self,
        upstream: Arc<Upstream>,
        spec: &FillSpec,
        on_end: impl FnOnce(bool) + Send + 'static,
    ) -> (Arc<Fill>, fill::Ticket) {
        Fill::start(
            &self.fill_tasks,
            &self.metrics,
            self.storage.clone(),
            upstream,
            spec.clone(),
            on_end,
        )
    }

    /// Serves one client from a fill; `None` when the fill passes its bytes through and no
    /// longer holds the ones this client needs. `started` says this request started the fill,
    /// so its answer is a `MISS` however fast the fill was over (a small one can finish before
    /// this looks).
    async fn serve_from_fill(
        &self,
        fill: &Arc<Fill>,
        mut ticket: Option<fill::Ticket>,
        started: bool,
        content_type: &str,
        want: Want,
        mut range: Option<RangeSpec>,
    ) -> Result<Option<Served>, CacheError> {
        // A fill another request started that already verified and kept its bytes (and is
        // publishing them) serves like the store.
        let already = fill.state();
        let kept_already = !started && matches!(already.phase, Phase::Done(_)) && !already.passing;
        if want == Want::HeadersOnly {
            ticket = None;
        }
        let mut state = fill.headers().await;
        if let Phase::Failed(e) = &state.phase {
            return Err(e.clone());
        }
        if state.passing {
            // Nothing is kept, so a range could only be cut from a copy held whole in memory:
            // the whole artifact is sent instead.
            range = None;
        }
        if range.is_some() {
            // A range is sent only from verified bytes: the ticket is taken again afterwards,
            // or a passing fill would hold every byte for a reader that takes none yet.
            ticket = None;
            state = fill.finished().await;
            if let Phase::Failed(e) = &state.phase {
                return Err(e.clone());
            }
        }
        // A HEAD answer must carry the true length (go-getter skips a download whose length
        // matches what it has); when the upstream sent none (git archives), wait for the end.
        if want == Want::HeadersOnly
            && state.total.is_none()
            && matches!(state.phase, Phase::Running)
        {
            state = fill.finished().await;
            if let Phase::Failed(e) = &state.phase {
                return Err(e.clone());
            }
        }
        // An artifact no larger than what readers are held back by sends no byte before it is
        // verified: wait for that, so a bad one is a clean 502 rather than a 200 whose
        // connection is cut before (or just after) its headers.
        if want == Want::Body
            && !state.passing
            && matches!(state.phase, Phase::Running)
            && state.total.is_some_and(|t| t <= fill::HOLDBACK)
        {
            state = fill.finished().await;
            if let Phase::Failed(e) = &state.phase {
                return Err(e.clone());
            }
        }
        let total = match &state.phase {
            Phase::Done(meta) => Some(meta.size),
            _ => state.total,
        };
        let (start, end, partial) = match (range, total) {
            (Some(r), Some(total)) => {
                let (s, e) = r.resolve(total)?;
                (s, Some(e), Some((s, e, total)))
            }
            _ => (0, total, None),
        };
        let body = match want {
            Want::HeadersOnly => Body::Empty,
            Want::Body => {
                let ticket = match ticket {
                    Some(t) => Some(t),
                    None => fill.join(start),
                };
                let Some(ticket) = ticket else {
                    return Ok(None);
                };
                fill.mark_answered();
                Body::Stream(fill.reader(ticket, end, partial.is_some()))
            }
        };
        let status = if state.passing {
            CacheStatus::Pass
        } else if kept_already {
            CacheStatus::Hit
        } else {
            self.miss()
        };
        Ok(Some(Served {
            status,
            content_type: content_type.to_owned(),
            length: end.map(|e| e - start),
            range: partial,
            sha256: match &state.phase {
                Phase::Done(meta) if kept_already => Some(meta.sha256.clone()),
                _ => None,
            },
            body,
        }))
    }
}

/// Stores a metadata answer before it goes out; a storage failure is logged and the answer
/// still goes out.
pub(crate) async fn store_or_warn(
    storage: &Storage,
    key: &StorageKey,
    data: &[u8],
    meta: &ObjectMeta,
) {
    if let Err(e) = storage.put_bytes(key, data, meta).await {
        tracing::warn!(key = %key, error = %e, "storage write failed; answer not cached");
    }
}

/// Stores a metadata answer behind the answer (the store's write runs in the background, and
/// this process reads it as stored meanwhile); a failing write is logged, and the answer still
/// goes out.
pub(crate) fn store_behind(storage: &Storage, key: &StorageKey, data: Bytes, meta: ObjectMeta) {
    storage.put_bytes_behind(vec![(key.clone(), data, meta)]);
}

/// Points a download answer's three links at TerraPeak's own artifact routes.
fn rewrite_download(
    doc: &mut ProviderDownload,
    r: &ProviderRelease,
    links: &Links,
) -> Result<(), CacheError> {
    let zip = ProviderFile::Zip(
        FileName::try_from(doc.filename.as_str())
            .map_err(|e| CacheError::Internal(e.to_string()))?,
    );
    doc.download_url = links.artifact(&keys::provider_artifact_path(r, &zip));
    doc.shasums_url = links.artifact(&keys::provider_artifact_path(r, &ProviderFile::Sums));
    if doc.signature_url().is_some() {
        doc.shasums_signature_url =
            Some(links.artifact(&keys::provider_artifact_path(r, &ProviderFile::Signature)));
    }
    Ok(())
}

/// For the fuzz targets: an upstream download answer through the parsing and the link
/// rewriting that served ones go through; the links TerraPeak would hand out.
#[doc(hidden)]
pub fn fuzz_download_answer(body: &[u8]) -> Option<Vec<String>> {
    let answered = Url::parse(
        "https://registry.example.com/v1/providers/hashicorp/aws/5.0.0/download/linux/amd64",
    )
    .ok()?;
    let r = ProviderRelease {
        host: Host::try_from("registry.example.com").ok()?,
        name: ProviderName {
            namespace: "hashicorp".try_into().ok()?,
            provider_type: "aws".try_into().ok()?,
        },
        version: "5.0.0".try_into().ok()?,
        platform: crate::registry::Platform {
            os: "linux".try_into().ok()?,
            arch: "amd64".try_into().ok()?,
        },
    };
    let mut doc = parse_download(&answered, body, &r).ok()?;
    rewrite_download(&mut doc, &r, &Links::new("https://tp.example.com", None)).ok()?;
    Some(
        [
            Some(doc.download_url),
            Some(doc.shasums_url),
            doc.shasums_signature_url,
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
}

/// Parses an upstream download answer, makes its links absolute (against the URL that answered)
/// and checks the fields TerraPeak relies on.
fn parse_download(
    answered: &Url,
    body: &[u8],
    r: &ProviderRelease,
) -> Result<ProviderDownload, CacheError> {
    let invalid = |m: String| {
        CacheError::Upstream(UpstreamError::Invalid(format!(
            "download answer for {r}: {m}"
        )))
    };
    let mut doc: ProviderDownload =
        serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    let name = FileName::try_from(doc.filename.as_str()).map_err(|e| invalid(e.to_string()))?;
    if !name.as_str().ends_with(".zip") {
        return Err(invalid(format!("filename {name} is not a zip")));
    }
    if doc.expected_sha256().is_none() {
        return Err(invalid("shasum is not a sha256".into()));
    }
    let absolute = |s: &str| -> Result<String, CacheError> {
        let u = answered
            .join(s.trim())
            .map_err(|e| invalid(format!("{s:?}: {e}")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(invalid(format!("{s:?} is not an http(s) URL")));
        }
        Ok(u.to_string())
    };
    doc.download_url = absolute(&doc.download_url)?;
    doc.shasums_url = absolute(&doc.shasums_url)?;
    if let Some(sig) = doc.signature_url().map(str::to_owned) {
        doc.shasums_signature_url = Some(absolute(&sig)?);
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_like_rfc_9110() {
        let r = |start, end| RangeSpec::From { start, end };
        assert_eq!(r(0, Some(9)).resolve(100).unwrap(), (0, 10));
        assert_eq!(r(90, None).resolve(100).unwrap(), (90, 100));
        assert_eq!(r(90, Some(1000)).resolve(100).unwrap(), (90, 100));
        assert_eq!(RangeSpec::Suffix(10).resolve(100).unwrap(), (90, 100));
        assert_eq!(RangeSpec::Suffix(1000).resolve(100).unwrap(), (0, 100));
        assert!(r(100, None).resolve(100).is_err());
        assert!(RangeSpec::Suffix(0).resolve(100).is_err());
    }

    #[test]
    fn download_links_become_absolute_and_bad_fields_are_refused() {
        let r = ProviderRelease {
            host: "registry.example.com".parse().unwrap(),
            name: ProviderName {
                namespace: "ns".parse().unwrap(),
                provider_type: "t".parse().unwrap(),
            },
            version: "1.0.0".parse().unwrap(),
            platform: crate::registry::Platform {
                os: "linux".parse().unwrap(),
                arch: "amd64".parse().unwrap(),
            },
        };
        let answered =
            Url::parse("https://registry.example.com/v1/providers/ns/t/1.0.0/download/linux/amd64")
                .unwrap();
        let sha = "ab".repeat(32);
        let body = serde_json::json!({
            "filename": "terraform-provider-t_1.0.0_linux_amd64.zip",
            "download_url": "/files/t.zip",
            "shasums_url": "https://cdn.example.net/SUMS",
            "shasums_signature_url": "../sig",
            "shasum": sha,
            "extra_field": 1
        });
        let doc = parse_download(&answered, body.to_string().as_bytes(), &r).unwrap();
        assert_eq!(doc.download_url, "https://registry.example.com/files/t.zip");
        assert_eq!(doc.shasums_url, "https://cdn.example.net/SUMS");
        assert_eq!(
            doc.shasums_signature_url.as_deref(),
            Some("https://registry.example.com/v1/providers/ns/t/1.0.0/download/sig")
        );
        assert_eq!(doc.extra["extra_field"], 1);

        for (field, value) in [
            ("filename", "../../etc/passwd"),
            ("filename", "x.tar.gz"),
            ("shasum", "nothex"),
            ("download_url", "file:///etc/passwd"),
        ] {
            let mut bad = body.clone();
            bad[field] = value.into();
            assert!(
                parse_download(&answered, bad.to_string().as_bytes(), &r).is_err(),
                "{field}={value}"
            );
        }
    }
}
