//! Talking to upstream registries and the artifact hosts they point to: discovery (cached),
//! timeouts, one retry for idempotent metadata calls, the registry token, an extra CA, and the
//! outbound proxy from the environment (`HTTPS_PROXY`, `NO_PROXY`, handled by reqwest).

use crate::config::{Config, ConfigError};
pub mod git;

use crate::registry::module::is_relative_location;
use crate::registry::{Host, ModuleAddress, Platform, ProviderName, Version};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use std::pin::Pin;
use std::sync::Mutex;
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
    Status { status: u16, url: String },
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error("upstream sent an invalid answer: {0}")]
    Invalid(String),
    #[error("upstream transfer interrupted: {0}")]
    Interrupted(String),
    #[error("{0} keeps failing; TerraPeak is not asking it again for a while")]
    CircuitOpen(String),
}

impl UpstreamError {
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

fn classify(err: reqwest::Error, what: &str) -> UpstreamError {
    if err.is_timeout() {
        UpstreamError::Timeout(what.to_owned())
    } else if err.is_connect() {
        UpstreamError::Connect(format!("{what}: {}", root_cause(&err)))
    } else if let Some(status) = err.status() {
        UpstreamError::Status {
            status: status.as_u16(),
            url: what.to_owned(),
        }
    } else {
        UpstreamError::Connect(format!("{what}: {}", root_cause(&err)))
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
    breaker: Mutex<Breaker>,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
}

/// A circuit breaker over the registry API: after `breaker_threshold` consecutive requests that
/// failed transiently, calls fail at once for `breaker_cooldown`; then one probe goes through,
/// and its outcome closes the circuit or opens it again.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

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
    pub fn all_from_config(config: &Config) -> Result<Vec<Upstream>, ConfigError> {
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
        Ok(config
            .upstream_endpoints()?
            .into_iter()
            .map(|e| Upstream {
                host: e.host,
                base_url: e.base_url,
                token: e.token,
                artifact_token: e.artifact_token,
                client: client.clone(),
                metadata_timeout: config.upstream.metadata_timeout,
                artifact_idle_timeout: config.upstream.artifact_idle_timeout,
                discovery_ttl: config.upstream.discovery_ttl,
                discovery: Mutex::new(None),
                breaker: Mutex::new(Breaker::default()),
                breaker_threshold: config.upstream.breaker_threshold,
                breaker_cooldown: config.upstream.breaker_cooldown,
            })
            .collect())
    }

    /// Bound on each git operation (ls-remote, fetch, archive) for git module sources.
    pub fn git_timeout(&self) -> Duration {
        self.artifact_idle_timeout.max(Duration::from_secs(300))
    }

    /// The host name Terraform knows this registry by.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// GETs registry JSON (sending the token), retrying once on a transient failure.
    /// Returns the final URL (after redirects) and the body.
    async fn get_registry_json(&self, url: &Url) -> Result<Fetched, UpstreamError> {
        self.admit()?;
        let result = self.get_retrying(url, self.token.as_deref()).await;
        self.record(!matches!(&result, Err(e) if e.retryable()));
        result
    }

    /// GETs a small document whole, retrying once on a transient failure (idempotent reads).
    async fn get_retrying(&self, url: &Url, token: Option<&str>) -> Result<Fetched, UpstreamError> {
        match self.get_once(url, token).await {
            Err(e) if e.retryable() => {
                tracing::debug!(url = %url, error = %e, "retrying upstream request");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.get_once(url, token).await
            }
            other => other,
        }
    }

    /// Whether a registry request may go out now (see [`Breaker`]).
    fn admit(&self) -> Result<(), UpstreamError> {
        let mut b = self.breaker.lock().expect("breaker lock");
        if let Some(until) = b.open_until {
            if Instant::now() < until || b.probing {
                return Err(UpstreamError::CircuitOpen(self.host.to_string()));
            }
            b.probing = true;
        }
        Ok(())
    }

    fn record(&self, healthy: bool) {
        if self.breaker_threshold == 0 {
            return;
        }
        let mut b = self.breaker.lock().expect("breaker lock");
        b.probing = false;
        if healthy {
            if b.open_until.take().is_some() {
                tracing::info!(upstream = %self.host, "upstream answers again; circuit closed");
            }
            b.failures = 0;
        } else {
            b.failures = b.failures.saturating_add(1);
            if b.failures >= self.breaker_threshold {
                if b.open_until.is_none() {
                    tracing::warn!(upstream = %self.host, failures = b.failures, cooldown = ?self.breaker_cooldown, "upstream keeps failing; circuit open");
                }
                b.open_until = Some(Instant::now() + self.breaker_cooldown);
            }
        }
    }

    async fn get_once(&self, url: &Url, token: Option<&str>) -> Result<Fetched, UpstreamError> {
        let mut req = self
            .client
            .get(url.clone())
            .timeout(self.metadata_timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| classify(e, url.as_str()))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(UpstreamError::NotFound(url.path().to_owned()));
        }
        if !status.is_success() {
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                url: url.to_string(),
            });
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
        Ok(self
            .get_retrying(url, self.artifact_token.as_deref())
            .await?
            .body)
    }

    /// Starts an artifact download. Waiting for the headers and for each later chunk is bounded
    /// by `upstream.artifact_idle_timeout`.
    pub async fn open_artifact(&self, url: &Url) -> Result<ArtifactResponse, UpstreamError> {
        let idle = self.artifact_idle_timeout;
        // Artifacts get no overall timeout, only idle limits.
        let mut req = self.client.get(url.clone());
        if let Some(token) = &self.artifact_token {
            req = req.bearer_auth(token);
        }
        let send = req.send();
        let resp = tokio::time::timeout(idle, send)
            .await
            .map_err(|_| UpstreamError::Timeout(url.to_string()))?
            .map_err(|e| classify(e, url.as_str()))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(UpstreamError::NotFound(url.path().to_owned()));
        }
        if !status.is_success() {
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                url: url.to_string(),
            });
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
        let body = futures_util::stream::unfold(
            (stream, what, false),
            move |(mut stream, what, done)| async move {
                if done {
                    return None;
                }
                match tokio::time::timeout(idle, stream.next()).await {
                    Err(_) => Some((
                        Err(UpstreamError::Timeout(what.clone())),
                        (stream, what, true),
                    )),
                    Ok(None) => None,
                    Ok(Some(Ok(b))) => Some((Ok(b), (stream, what, false))),
                    Ok(Some(Err(e))) => {
                        let err = if e.is_timeout() {
                            UpstreamError::Timeout(what.clone())
                        } else {
                            UpstreamError::Interrupted(format!("{what}: {}", root_cause(&e)))
                        };
                        Some((Err(err), (stream, what, true)))
                    }
                }
            },
        );
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
