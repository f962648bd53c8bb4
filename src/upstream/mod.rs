//! Talking to upstream registries and the artifact hosts they point to: discovery (cached),
//! timeouts, one retry for idempotent metadata calls, the registry token, an extra CA, and the
//! outbound proxy from the environment (`HTTPS_PROXY`, `NO_PROXY`, handled by reqwest).

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
pub mod git;

use crate::registry::module::is_relative_location;
use crate::registry::{Host, ModuleAddress, Platform, ProviderName, Version};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use url::Url;

/// Why an upstream call failed. The class decides the client's status and whether to retry.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("{0} not found upstream")]
    NotFound(String),
    #[error("upstream timed out: {0}")]
    Timeout(String),
    #[error("upstream answered {status} for {url}")]
    Status {
        status: u16,
        url: String,
        /// The upstream's `Retry-After`, when it gave one in seconds.
        retry_after: Option<Duration>,
    },
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error("upstream sent an invalid answer: {0}")]
    Invalid(String),
    #[error("upstream transfer interrupted: {0}")]
    Interrupted(String),
    #[error("{0} keeps failing; TerraPeak is not asking it again for a while")]
    CircuitOpen(String),
    /// Sealed mode (`cache.offline`): no upstream or git host is ever contacted.
    #[error("{0}: not contacted, this TerraPeak is sealed (cache.offline)")]
    Offline(String),
}

impl UpstreamError {
    /// The error class used as a metric label.
    pub fn class(&self) -> &'static str {
        match self {
            UpstreamError::NotFound(_) => "not_found",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Status { status: 429, .. } => "rate_limited",
            UpstreamError::Status { status, .. } if *status >= 500 => "server_error",
            UpstreamError::Status { .. } => "client_error",
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Invalid(_) => "invalid",
            UpstreamError::Interrupted(_) => "interrupted",
            UpstreamError::CircuitOpen(_) => "circuit_open",
            UpstreamError::Offline(_) => "offline",
        }
    }

    /// Transient failures worth one more try for idempotent metadata.
    fn retryable(&self) -> bool {
        match self {
            UpstreamError::Timeout(_)
            | UpstreamError::Connect(_)
            | UpstreamError::Interrupted(_) => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Sends a request from the shared runtime (see [`crate::runtime::on_shared`]): the connection
/// it opens is pooled for every later request, which may come after connection threads ended.
async fn send(
    req: reqwest::RequestBuilder,
    url: &Url,
) -> Result<Result<reqwest::Response, reqwest::Error>, UpstreamError> {
    crate::runtime::on_shared(req.send())
        .await
        .map_err(|e| UpstreamError::Interrupted(format!("{url}: {e}")))
}

fn classify(err: reqwest::Error, what: &str) -> UpstreamError {
    if err.is_timeout() {
        UpstreamError::Timeout(what.to_owned())
    } else if err.is_connect() {
        UpstreamError::Connect(format!("{what}: {}", root_cause(&err)))
    } else if let Some(status) = err.status() {
        UpstreamError::Status {
            status: status.as_u16(),
            url: what.to_owned(),
            retry_after: None,
        }
    } else {
        UpstreamError::Connect(format!("{what}: {}", root_cause(&err)))
    }
}

fn status_error(resp: &reqwest::Response, url: &Url) -> UpstreamError {
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    UpstreamError::Status {
        status: resp.status().as_u16(),
        url: url.to_string(),
        retry_after,
    }
}

/// Longest `Retry-After` TerraPeak waits for before retrying metadata; longer ones end the
/// attempt (the stale copy or an error is served instead).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);
/// A retry is not started unless at least this much of the metadata budget (or a fifth of
/// it, if that is less) is left.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);

/// `base * 2^attempt`, scaled by a random factor in [0.5, 1.5) so that many replicas do not
/// retry in lockstep.
fn backoff(base: Duration, attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.5 + (random % 1000) as f64 / 1000.0;
    base.saturating_mul(1u32 << attempt.min(10)).mul_f64(factor)
}

fn log_breaker(change: Option<&str>, remote: &str, kind: &str) {
    match change {
        Some("open") => {
            tracing::warn!(remote, kind, "upstream keeps failing; circuit open")
        }
        Some(_) => tracing::info!(remote, kind, "upstream answers again; circuit closed"),
        None => {}
    }
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A registry answer read whole.
struct Fetched {
    /// The URL that answered, after redirects.
    url: Url,
    /// The `X-Terraform-Get` header, for module downloads.
    terraform_get: Option<String>,
    body: Bytes,
}

/// The services an upstream's `/.well-known/terraform.json` names.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub providers_v1: Option<Url>,
    pub modules_v1: Option<Url>,
}

/// A streaming artifact body.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// An artifact response whose body has not been read yet.
pub struct ArtifactResponse {
    pub content_length: Option<u64>,
    pub content_type: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub body: ByteStream,
}

/// Largest registry JSON, SHA256SUMS or signature TerraPeak accepts.
pub const MAX_METADATA_BYTES: usize = 8 << 20;

/// One upstream registry.
pub struct Upstream {
    host: Host,
    base_url: Url,
    token: Option<String>,
    artifact_token: Option<String>,
    /// Shared by every upstream: one connection pool, TLS roots and proxy settings.
    client: reqwest::Client,
    metadata_timeout: Duration,
    artifact_idle_timeout: Duration,
    discovery_ttl: Duration,
    discovery: Mutex<Option<(Instant, Discovery)>>,
    metadata_retries: u32,
    retry_backoff: Duration,
    artifact_first_byte_timeout: Duration,
    breaker: Mutex<Breaker>,
    artifact_breakers: Arc<ArtifactBreakers>,
    breaker_policy: BreakerPolicy,
    metrics: Arc<Metrics>,
    /// Sealed mode: every call fails at once with [`UpstreamError::Offline`], before any DNS.
    offline: bool,
    /// What git trusts for https module sources (shared by every upstream, like `client`).
    git_trust: Arc<git::Trust>,
}

/// A circuit breaker over one remote (a registry API or an artifact host): after `threshold`
/// consecutive transient failures, calls fail at once for `cooldown`; then one probe goes
/// through, and its outcome closes the circuit or opens it again.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Settings shared by every breaker.
#[derive(Debug, Clone, Copy)]
struct BreakerPolicy {
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Whether a request may go out now.
    fn admit(&mut self) -> bool {
        if let Some(until) = self.open_until {
            if Instant::now() < until || self.probing {
                return false;
            }
            self.probing = true;
        }
        true
    }

    /// Records an outcome; returns the state change worth logging, if any.
    fn record(&mut self, healthy: bool, policy: BreakerPolicy) -> Option<&'static str> {
        if policy.threshold == 0 {
            return None;
        }
        self.probing = false;
        if healthy {
            self.failures = 0;
            return self.open_until.take().map(|_| "closed");
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures >= policy.threshold {
            let was_open = self.open_until.is_some();
            self.open_until = Some(Instant::now() + policy.cooldown);
            return (!was_open).then_some("open");
        }
        None
    }
}

/// Breakers for artifact hosts, keyed by `host:port`, shared by every upstream (several
/// registries may point at the same release host).
#[derive(Debug, Default)]
struct ArtifactBreakers(Mutex<HashMap<String, Breaker>>);

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("base_url", &self.base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Every configured upstream registry, the default first. They share one HTTP client
    /// (connection pool, TLS roots, proxy settings).
    pub fn all_from_config(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Vec<Upstream>, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.upstream.connect_timeout)
            .user_agent(concat!("TerraPeak/", env!("CARGO_PKG_VERSION")))
            .use_rustls_tls();
        if let Some(ca) = &config.upstream.ca_file {
            let pem = std::fs::read(ca).map_err(|e| invalid("upstream.ca_file", e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| invalid("upstream.ca_file", e.to_string()))?;
            if certs.is_empty() {
                return Err(invalid(
                    "upstream.ca_file",
                    "no certificate in the file".into(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| invalid("upstream", e.to_string()))?;
        let git_trust = Arc::new(
            git::Trust::new(config.upstream.ca_file.as_deref())
                .map_err(|e| invalid("upstream.ca_file", e.to_string()))?,
        );
        let artifact_breakers = Arc::new(ArtifactBreakers::default());
        let u = &config.upstream;
        Ok(config
            .upstream_endpoints()?
            .into_iter()
            .inspect(|e| {
                metrics
                    .upstream_circuit_open
                    .with_label_values(&[e.host.as_str()])
                    .set(0);
            })
            .map(|e| Upstream {
                host: e.host,
                base_url: e.base_url,
                token: e.token,
                artifact_token: e.artifact_token,
                client: client.clone(),
                metadata_timeout: u.metadata_timeout,
                artifact_idle_timeout: u.artifact_idle_timeout,
                discovery_ttl: u.discovery_ttl,
                discovery: Mutex::new(None),
                metadata_retries: u.metadata_retries,
                retry_backoff: u.retry_backoff,
                artifact_first_byte_timeout: u.artifact_first_byte_timeout,
                breaker: Mutex::new(Breaker::default()),
                artifact_breakers: artifact_breakers.clone(),
                breaker_policy: BreakerPolicy {
                    threshold: u.breaker_threshold,
                    cooldown: u.breaker_cooldown,
                },
                metrics: metrics.clone(),
                offline: config.cache.offline,
                git_trust: git_trust.clone(),
            })
            .collect())
    }

    /// How git commands for git module sources run: each operation (ls-remote, fetch,
    /// archive) bounded, and trusting what this client trusts over https.
    fn git_options(&self, work_root: &std::path::Path) -> git::Options {
        git::Options {
            timeout: self.artifact_idle_timeout.max(Duration::from_secs(300)),
            trust: self.git_trust.clone(),
            work_root: work_root.to_owned(),
        }
    }

    /// The host name Terraform knows this registry by.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// GETs registry JSON (sending the token) through the upstream's breaker, retrying
    /// transient failures. Returns the final URL (after redirects) and the body.
    async fn get_registry_json(&self, url: &Url) -> Result<Fetched, UpstreamError> {
        if !self.breaker.lock().expect("breaker lock").admit() {
            let e = UpstreamError::CircuitOpen(self.host.to_string());
            self.count_error("api", &e);
            return Err(e);
        }
        let result = self.get_retrying(url, self.token.as_deref(), "api").await;
        let healthy = !matches!(&result, Err(e) if e.retryable());
        let change = self
            .breaker
            .lock()
            .expect("breaker lock")
            .record(healthy, self.breaker_policy);
        if let Some(state) = change {
            self.metrics
                .upstream_circuit_open
                .with_label_values(&[self.host.as_str()])
                .set(i64::from(state == "open"));
        }
        log_breaker(change, self.host.as_str(), "registry API");
        result
    }

    /// GETs a small document whole. Transient failures are retried after a jittered
    /// exponential backoff (or the upstream's short `Retry-After`); all attempts together stay
    /// within `metadata_timeout`, so a client waiting on TerraPeak gets a clear answer before
    /// its own timeout.
    async fn get_retrying(
        &self,
        url: &Url,
        token: Option<&str>,
        kind: &'static str,
    ) -> Result<Fetched, UpstreamError> {
        let deadline = Instant::now() + self.metadata_timeout;
        let mut attempt = 0u32;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let started = Instant::now();
            let result = self.get_once(url, token, left).await;
            self.observe(kind, started, result.as_ref().err());
            let err = match result {
                Err(e) if e.retryable() && attempt < self.metadata_retries => e,
                other => return other,
            };
            let delay = match &err {
                UpstreamError::Status {
                    retry_after: Some(after),
                    ..
                } if *after <= MAX_RETRY_AFTER => *after,
                _ => backoff(self.retry_backoff, attempt),
            };
            let min_attempt = MIN_ATTEMPT.min(self.metadata_timeout / 5);
            if Instant::now() + delay + min_attempt >= deadline {
                return Err(err);
            }
            attempt += 1;
            tracing::debug!(url = %url, error = %err, attempt, ?delay, "retrying upstream request");
            tokio::time::sleep(delay).await;
        }
    }

    /// Runs an artifact-host request through that host's breaker.
    async fn through_artifact_breaker<T>(
        &self,
        url: &Url,
        call: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        let key = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        );
        let admitted = self
            .artifact_breakers
            .0
            .lock()
            .expect("breaker lock")
            .entry(key.clone())
            .or_default()
            .admit();
        if !admitted {
            return Err(UpstreamError::CircuitOpen(key));
        }
        let result = call.await;
        let healthy = !matches!(&result, Err(e) if e.retryable());
        let change = self
            .artifact_breakers
            .0
            .lock()
            .expect("breaker lock")
            .entry(key.clone())
            .or_default()
            .record(healthy, self.breaker_policy);
        match change {
            Some("open") => self.metrics.artifact_host_circuits_open.inc(),
            Some(_) => self.metrics.artifact_host_circuits_open.dec(),
            None => {}
        }
        log_breaker(change, &key, "artifact host");
        result
    }

    /// Counts one upstream request of `kind` (api, artifact, git) and its outcome.
    pub fn observe(&self, kind: &str, started: Instant, error: Option<&UpstreamError>) {
        if let Some(e @ UpstreamError::CircuitOpen(_)) = error {
            // Nothing went out.
            self.count_error(kind, e);
            return;
        }
        let labels = [self.host.as_str(), kind];
        self.metrics
            .upstream_requests
            .with_label_values(&labels)
            .inc();
        self.metrics
            .upstream_duration
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
        if let Some(e) = error {
            self.count_error(kind, e);
        }
    }

    fn count_error(&self, kind: &str, e: &UpstreamError) {
        self.metrics
            .upstream_errors
            .with_label_values(&[self.host.as_str(), kind, e.class()])
            .inc();
    }

    /// In sealed mode, every network call stops here.
    fn refuse_when_sealed(&self, what: &str) -> Result<(), UpstreamError> {
        if self.offline {
            Err(UpstreamError::Offline(what.to_owned()))
        } else {
            Ok(())
        }
    }

    /// [`git::resolve`], counted as a git request of this upstream.
    pub async fn git_resolve(
        &self,
        url: &str,
        reference: Option<&str>,
        work_root: &std::path::Path,
    ) -> Result<git::Resolved, UpstreamError> {
        self.refuse_when_sealed(url)?;
        let started = Instant::now();
        let result = git::resolve(url, reference, &self.git_options(work_root)).await;
        self.observe("git", started, result.as_ref().err());
        result
    }

    /// [`git::resolve_by_fetch`], counted as a git request of this upstream.
    pub async fn git_resolve_by_fetch(
        &self,
        url: &str,
        reference: Option<&str>,
        work_root: &std::path::Path,
    ) -> Result<git::Resolved, UpstreamError> {
        self.refuse_when_sealed(url)?;
        let started = Instant::now();
        let result = git::resolve_by_fetch(url, reference, &self.git_options(work_root)).await;
        self.observe("git", started, result.as_ref().err());
        result
    }

    /// [`git::archive`], counted as a git request of this upstream.
    pub async fn git_archive(
        &self,
        url: &str,
        resolved: &git::Resolved,
        work_root: &std::path::Path,
    ) -> Result<ArtifactResponse, UpstreamError> {
        self.refuse_when_sealed(url)?;
        let started = Instant::now();
        let result = git::archive(url, resolved, &self.git_options(work_root)).await;
        self.observe("git", started, result.as_ref().err());
        result
    }

    async fn get_once(
        &self,
        url: &Url,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Fetched, UpstreamError> {
        self.refuse_when_sealed(url.as_str())?;
        if timeout.is_zero() {
            return Err(UpstreamError::Timeout(url.to_string()));
        }
        let mut req = self
            .client
            .get(url.clone())
            .timeout(timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = send(req, url)
            .await?
            .map_err(|e| classify(e, url.as_str()))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(UpstreamError::NotFound(url.path().to_owned()));
        }
        if !status.is_success() {
            return Err(status_error(&resp, url));
        }
        let final_url = resp.url().clone();
        let terraform_get = resp
            .headers()
            .get("x-terraform-get")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_METADATA_BYTES as u64)
        {
            return Err(UpstreamError::Invalid(format!("{url} is too large")));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify(e, url.as_str()))?;
            if body.len() + chunk.len() > MAX_METADATA_BYTES {
                return Err(UpstreamError::Invalid(format!("{url} is too large")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            url: final_url,
            terraform_get,
            body: Bytes::from(body),
        })
    }

    /// The upstream's service URLs, from its discovery document (cached for the configured TTL;
    /// the last good copy is used while the upstream cannot answer).
    pub async fn discover(&self) -> Result<Discovery, UpstreamError> {
        let cached = self.discovery.lock().expect("discovery lock").clone();
        if let Some((at, d)) = &cached
            && at.elapsed() < self.discovery_ttl
        {
            return Ok(d.clone());
        }
        let url = self
            .base_url
            .join("/.well-known/terraform.json")
            .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
        let fetched = self.get_registry_json(&url).await.and_then(|f| {
            let url = f.url;
            let doc: serde_json::Value = serde_json::from_slice(&f.body)
                .map_err(|e| UpstreamError::Invalid(format!("discovery document: {e}")))?;
            let service = |name: &str| -> Result<Option<Url>, UpstreamError> {
                let Some(v) = doc.get(name) else {
                    return Ok(None);
                };
                let s = v.as_str().ok_or_else(|| {
                    UpstreamError::Invalid(format!("discovery {name} is not a string"))
                })?;
                let mut u = url
                    .join(s)
                    .map_err(|e| UpstreamError::Invalid(format!("discovery {name}: {e}")))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(UpstreamError::Invalid(format!(
                        "discovery {name} is not an http(s) URL"
                    )));
                }
                if !u.path().ends_with('/') {
                    u.set_path(&format!("{}/", u.path()));
                }
                Ok(Some(u))
            };
            Ok(Discovery {
                providers_v1: service("providers.v1")?,
                modules_v1: service("modules.v1")?,
            })
        });
        match fetched {
            Ok(d) => {
                *self.discovery.lock().expect("discovery lock") = Some((Instant::now(), d.clone()));
                Ok(d)
            }
            Err(e) => match cached {
                Some((_, d)) => {
                    tracing::warn!(upstream = %self.host, error = %e, "discovery failed; using the last good document");
                    Ok(d)
                }
                None => Err(e),
            },
        }
    }

    async fn providers_base(&self) -> Result<Url, UpstreamError> {
        self.discover().await?.providers_v1.ok_or_else(|| {
            UpstreamError::Invalid(format!("{} offers no providers.v1 service", self.host))
        })
    }

    /// `GET {providers.v1}{ns}/{type}/versions`.
    pub async fn provider_versions(&self, p: &ProviderName) -> Result<Bytes, UpstreamError> {
        let url = join(
            &self.providers_base().await?,
            &format!("{}/{}/versions", p.namespace, p.provider_type),
        )?;
        Ok(self.get_registry_json(&url).await?.body)
    }

    /// `GET {providers.v1}{ns}/{type}/{version}/download/{os}/{arch}`. Returns the URL that
    /// answered, against which relative links in the body resolve.
    pub async fn provider_download(
        &self,
        p: &ProviderName,
        version: &Version,
        platform: &Platform,
    ) -> Result<(Url, Bytes), UpstreamError> {
        let url = join(
            &self.providers_base().await?,
            &format!(
                "{}/{}/{}/download/{}/{}",
                p.namespace, p.provider_type, version, platform.os, platform.arch
            ),
        )?;
        let f = self.get_registry_json(&url).await?;
        Ok((f.url, f.body))
    }

    async fn modules_base(&self) -> Result<Url, UpstreamError> {
        self.discover().await?.modules_v1.ok_or_else(|| {
            UpstreamError::Invalid(format!("{} offers no modules.v1 service", self.host))
        })
    }

    /// `GET {modules.v1}{ns}/{name}/{system}/versions`.
    pub async fn module_versions(&self, m: &ModuleAddress) -> Result<Bytes, UpstreamError> {
        let url = join(&self.modules_base().await?, &format!("{m}/versions"))?;
        Ok(self.get_registry_json(&url).await?.body)
    }

    /// `GET {modules.v1}{ns}/{name}/{system}/{version}/download`: the module's location, from
    /// `X-Terraform-Get` or (OpenTofu-style registries) a JSON `{"location": ...}` body, with the
    /// relative forms resolved against the URL that answered.
    pub async fn module_location(
        &self,
        m: &ModuleAddress,
        version: &Version,
    ) -> Result<String, UpstreamError> {
        let url = join(
            &self.modules_base().await?,
            &format!("{m}/{version}/download"),
        )?;
        let f = self.get_registry_json(&url).await?;
        let location = match f.terraform_get.filter(|l| !l.trim().is_empty()) {
            Some(l) => l,
            None => serde_json::from_slice::<serde_json::Value>(&f.body)
                .ok()
                .and_then(|v| v.get("location")?.as_str().map(str::to_owned))
                .ok_or_else(|| {
                    UpstreamError::Invalid(format!(
                        "module download for {m} {version} names no location"
                    ))
                })?,
        };
        let location = location.trim().to_owned();
        if is_relative_location(&location) {
            return f
                .url
                .join(&location)
                .map(|u| u.to_string())
                .map_err(|e| UpstreamError::Invalid(format!("module location {location:?}: {e}")));
        }
        Ok(location)
    }

    /// GETs a small artifact (SHA256SUMS, a signature) whole. Artifact hosts never get the
    /// registry's token, only the artifact token when one is configured.
    pub async fn fetch_small(&self, url: &Url) -> Result<Bytes, UpstreamError> {
        let fetch = self.get_retrying(url, self.artifact_token.as_deref(), "artifact");
        Ok(self.through_artifact_breaker(url, fetch).await?.body)
    }

    /// Starts an artifact download through the host's breaker. Connecting is bounded by
    /// `upstream.connect_timeout`, the wait for the response headers by
    /// `artifact_first_byte_timeout`, and each later wait for bytes by `artifact_idle_timeout`.
    pub async fn open_artifact(&self, url: &Url) -> Result<ArtifactResponse, UpstreamError> {
        let started = Instant::now();
        let result = self
            .through_artifact_breaker(url, self.open_artifact_unguarded(url))
            .await;
        self.observe("artifact", started, result.as_ref().err());
        result
    }

    async fn open_artifact_unguarded(&self, url: &Url) -> Result<ArtifactResponse, UpstreamError> {
        self.refuse_when_sealed(url.as_str())?;
        let idle = self.artifact_idle_timeout;
        // Artifacts get no overall timeout, only idle limits.
        let mut req = self.client.get(url.clone());
        if let Some(token) = &self.artifact_token {
            req = req.bearer_auth(token);
        }
        let resp = tokio::time::timeout(self.artifact_first_byte_timeout, send(req, url))
            .await
            .map_err(|_| UpstreamError::Timeout(url.to_string()))??
            .map_err(|e| classify(e, url.as_str()))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(UpstreamError::NotFound(url.path().to_owned()));
        }
        if !status.is_success() {
            return Err(status_error(&resp, url));
        }
        let header = |name: reqwest::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let etag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED);
        let content_length = resp.content_length();
        let what = url.to_string();
        let stream = resp.bytes_stream();
        let errors = self.metrics.upstream_errors.clone();
        let host = self.host.to_string();
        let body =
            futures_util::stream::unfold((stream, what, false), move |(mut stream, what, done)| {
                let (errors, host) = (errors.clone(), host.clone());
                async move {
                    if done {
                        return None;
                    }
                    let err = match tokio::time::timeout(idle, stream.next()).await {
                        Err(_) => UpstreamError::Timeout(what.clone()),
                        Ok(None) => return None,
                        Ok(Some(Ok(b))) => return Some((Ok(b), (stream, what, false))),
                        Ok(Some(Err(e))) if e.is_timeout() => UpstreamError::Timeout(what.clone()),
                        Ok(Some(Err(e))) => {
                            UpstreamError::Interrupted(format!("{what}: {}", root_cause(&e)))
                        }
                    };
                    errors
                        .with_label_values(&[host.as_str(), "artifact", err.class()])
                        .inc();
                    Some((Err(err), (stream, what, true)))
                }
            });
        Ok(ArtifactResponse {
            content_length,
            content_type,
            etag,
            last_modified,
            body: Box::pin(body),
        })
    }
}

fn join(base: &Url, rest: &str) -> Result<Url, UpstreamError> {
    base.join(rest)
        .map_err(|e| UpstreamError::Invalid(format!("cannot build upstream URL: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BreakerPolicy = BreakerPolicy {
        threshold: 3,
        cooldown: Duration::from_millis(50),
    };

    #[test]
    fn breaker_opens_after_the_threshold_and_one_probe_decides() {
        let mut b = Breaker::default();
        for _ in 0..2 {
            assert!(b.admit());
            assert_eq!(b.record(false, POLICY), None);
        }
        assert!(b.admit());
        assert_eq!(b.record(false, POLICY), Some("open"));
        assert!(!b.admit(), "open: fail fast");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.admit(), "the probe");
        assert!(!b.admit(), "only one probe at a time");
        assert_eq!(b.record(false, POLICY), None, "a failed probe re-opens");
        assert!(!b.admit());
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.admit());
        assert_eq!(b.record(true, POLICY), Some("closed"));
        assert!(b.admit() && b.admit());
    }

    #[test]
    fn a_success_resets_the_count_and_threshold_zero_disables() {
        let mut b = Breaker::default();
        b.record(false, POLICY);
        b.record(false, POLICY);
        b.record(true, POLICY);
        b.record(false, POLICY);
        b.record(false, POLICY);
        assert!(b.admit());
        let off = BreakerPolicy {
            threshold: 0,
            ..POLICY
        };
        for _ in 0..100 {
            b.record(false, off);
        }
        assert!(b.admit());
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        let base = Duration::from_millis(100);
        for attempt in 0..4 {
            let d = backoff(base, attempt);
            let nominal = base * (1 << attempt);
            assert!(d >= nominal / 2 && d < nominal * 3 / 2, "{attempt}: {d:?}");
        }
    }
}
