//! Configuration: typed, documented and strict.
//!
//! Sources, later ones winning: built-in defaults, the YAML file, `TERRAPEAK_*` environment
//! variables (`TERRAPEAK_SERVER__ADDR` sets `server.addr`), then command-line flags. Every key of
//! the original TerraPeak `cfg.yml` is accepted with its meaning; an unknown key is an error that
//! names it.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub terraform: TerraformConfig,
    pub storage: StorageConfig,
    pub cache: CacheConfig,
    pub upstream: UpstreamConfig,
    /// More upstream registries (transparent and mirror modes), or per-host settings for the
    /// default one.
    pub upstreams: Vec<UpstreamEntry>,
    /// Access control. Without this section anyone who can reach TerraPeak reads everything
    /// it can reach (and no upstream may have a token unless it is marked `public`).
    pub auth: Option<AuthConfig>,
    pub admin: AdminConfig,
    pub ui: UiConfig,
}

/// `ui.*`: the status page at `/ui/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Serve the status page on the main listener (and on `admin.addr`). Default true.
    pub enabled: bool,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig { enabled: true }
    }
}

/// `admin.*`: the admin API (`/admin/v1/`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin API (plain HTTP, nothing else) on this address, e.g. `127.0.0.1:9092`.
    /// Without access control this is the only place it is served; with it, the main listener
    /// serves it too, to tokens with the `admin` scope (required on this listener as well).
    pub addr: Option<String>,
}

/// `auth.*`: tokens in front of TerraPeak.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The tokens clients may send (`credentials "host" { token = ... }`, `TF_TOKEN_<host>`,
    /// or as the password of Basic credentials from `~/.netrc`).
    pub tokens: Vec<TokenConfig>,
    /// Upstream hosts anyone may read without a token.
    pub anonymous_read: Vec<String>,
    /// Keys for the signatures in artifact URLs: the first signs, every one verifies, so a new
    /// key goes first and the old one stays until URLs it signed have expired. Replicas behind
    /// one load balancer need the same keys. Default: a key made at start for this process.
    pub url_signing_keys: Vec<Secret>,
    /// Files holding one signing key each, after `url_signing_keys`.
    pub url_signing_key_files: Vec<PathBuf>,
    /// How long a signed artifact URL works. Default 1 h.
    #[serde(with = "duration")]
    pub artifact_url_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            anonymous_read: Vec::new(),
            url_signing_keys: Vec::new(),
            url_signing_key_files: Vec::new(),
            artifact_url_ttl: Duration::from_secs(3600),
        }
    }
}

/// `auth.tokens[]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Shown in logs and metrics instead of the token.
    pub name: String,
    /// The token itself (masked everywhere), or
    pub token: Secret,
    /// a file that holds it (a mounted secret).
    pub token_file: Option<PathBuf>,
    /// `read`, `read:<upstream host>`, `admin`, `metrics`.
    pub scopes: Vec<String>,
}

/// `upstreams[]`: one registry, keyed by the host name Terraform knows it by.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamEntry {
    /// The registry's host name as in provider sources (`registry.opentofu.org`).
    pub host: String,
    /// Where to reach it instead of `https://{host}`.
    pub base_url: Option<String>,
    /// Bearer token for its discovery and API endpoints. Never sent to artifact hosts.
    pub token: Secret,
    /// Bearer token for the artifact hosts its answers point to (zips, SHA256SUMS, module
    /// archives), for private registries whose downloads need one.
    pub artifact_token: Secret,
    /// An upstream with a token is private: TerraPeak refuses to start while anyone could
    /// read it without a token of their own. `true` says its content may be served to anyone.
    pub public: bool,
}

/// One upstream registry as the rest of TerraPeak needs it.
#[derive(Debug, Clone)]
pub struct UpstreamEndpoint {
    pub host: crate::registry::Host,
    pub base_url: url::Url,
    pub token: Option<String>,
    pub artifact_token: Option<String>,
    /// Has a token and is not marked `public`.
    pub private: bool,
}

/// `server.*`: the listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address. Default `127.0.0.1:8081`. The Go form `:8081` means every interface.
    pub addr: String,
    /// Time allowed to receive a request's headers. Seconds or a duration (`30s`). Default 30 s.
    #[serde(with = "duration")]
    pub read_timeout: Duration,
    /// Longest time a response may stall (no progress sending to the client) before the
    /// connection is dropped. Default 5 min. `0` disables it.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// How long an idle keep-alive connection is kept. Default 120 s.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Public base URL written into rewritten links (`https://terrapeak.example.com`). Default:
    /// taken from each request's `Host` header, or else the listen address.
    pub domain: Option<String>,
    /// TLS termination; plain HTTP when unset.
    pub tls: TlsConfig,
    /// Threads that accept and serve plain-HTTP connections, each with a runtime of its own
    /// (nginx's one worker per core). Default: one per CPU. `0` serves them on the shared
    /// runtime's worker threads. TLS connections are always served there.
    pub connection_threads: Option<usize>,
}

impl ServerConfig {
    /// `connection_threads`, its default resolved.
    pub fn connection_threads(&self) -> usize {
        self.connection_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:8081".into(),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            domain: None,
            tls: TlsConfig::default(),
            connection_threads: None,
        }
    }
}

/// `server.tls.*`: certificate and key in PEM files. Both or neither.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM bundle of the CAs whose client certificates TerraPeak verifies (mutual TLS). With
    /// `auth` on, a verified certificate is an identity with the `read` scope, logged by its
    /// subject.
    pub client_ca_file: Option<PathBuf>,
    /// `required` (no certificate, no connection; the default) or `optional` (clients without
    /// one may still send a token).
    pub client_auth: ClientAuth,
}

/// `server.tls.client_auth`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

/// `metrics.*`: the Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` on the main listener. Default true.
    pub on_main_listener: bool,
    /// Also serve `/metrics` (plain HTTP, nothing else) on this address, e.g. `127.0.0.1:9091`.
    pub addr: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            on_main_listener: true,
            addr: None,
        }
    }
}

/// `log.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `trace`, `debug`, `info`, `warn` or `error`, or a tracing filter. Default `info`.
    pub level: String,
    /// `json` (one object per line), `text`, or `auto`: text when stdout is a terminal, JSON
    /// otherwise. Default `auto`.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

impl LogFormat {
    /// `auto` settled: readable text for a person at a terminal, JSON for everything else.
    pub fn resolve(self, stdout_is_terminal: bool) -> LogFormat {
        match self {
            LogFormat::Auto if stdout_is_terminal => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// `terraform.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerraformConfig {
    /// The default upstream registry. Its host name (`registry.terraform.io`) is the name the
    /// cache files its objects under. Default `https://registry.terraform.io`.
    pub registry_url: String,
}

impl Default for TerraformConfig {
    fn default() -> Self {
        TerraformConfig {
            registry_url: "https://registry.terraform.io".into(),
        }
    }
}

/// `storage.*`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    #[serde(alias = "s3")]
    pub minio: MinioConfig,
    pub file: FileConfig,
    /// The most the store may hold (`50GiB`, `500MB`, or bytes); past it the least recently
    /// used units are evicted. Unset: without limit.
    #[serde(default, with = "opt_size", skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
}

/// `storage.minio.*` (also accepted as `storage.s3`): the S3-compatible backend (MinIO, Garage,
/// Ceph, AWS S3). The first seven keys are the original TerraPeak's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinioConfig {
    /// Use S3-compatible storage instead of the local directory. Default false.
    pub enabled: bool,
    /// `host:port` (HTTPS) or a full `http://` / `https://` URL. Empty: AWS S3 for `region`
    /// (or `AWS_ENDPOINT_URL`).
    pub endpoint: String,
    /// Default `us-east-1` (or `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: String,
    /// Empty: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, then the
    /// shared credentials file profile, then the instance or web-identity credentials.
    pub access_key: Secret,
    pub secret_key: Secret,
    pub session_token: Secret,
    /// Profile in `~/.aws/credentials` (or `AWS_SHARED_CREDENTIALS_FILE`). Default: `AWS_PROFILE`,
    /// else `default`.
    pub profile: Option<String>,
    pub bucket: String,
    /// Skip TLS certificate verification towards the endpoint (still TLS).
    pub skip_ssl_verify: bool,
    /// Key prefix, so one bucket can hold several caches (`team-a/`). Default none.
    pub prefix: String,
    /// `https://bucket.endpoint/key` instead of `https://endpoint/bucket/key`. Default false
    /// (path-style, what MinIO and Garage expect).
    pub virtual_hosted_style: bool,
    /// Connect timeout towards the store. Default 3 s.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Whole-request limit for sidecars and small objects, the idle limit between chunks of
    /// streamed reads and of the answers to upload requests, and the retry window. Default 10 s.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
}

impl Default for MinioConfig {
    fn default() -> Self {
        MinioConfig {
            enabled: false,
            endpoint: String::new(),
            region: String::new(),
            access_key: Secret::default(),
            secret_key: Secret::default(),
            session_token: Secret::default(),
            profile: None,
            bucket: String::new(),
            skip_ssl_verify: false,
            prefix: String::new(),
            virtual_hosted_style: false,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// `storage.file.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Cache directory. Default `./terrapeak-data`.
    pub path: PathBuf,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            path: PathBuf::from("./terrapeak-data"),
        }
    }
}

/// `cache.*`: freshness policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a version list is served without asking upstream. Default 10 min.
    #[serde(with = "duration")]
    pub versions_ttl: Duration,
    /// How long past `versions_ttl` a version list may still be served (while it is refreshed
    /// in the background, or while the upstream fails). Unset: without limit.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_stale: Option<Duration>,
    /// How long an upstream 404 is remembered. Default 1 min.
    #[serde(with = "duration")]
    pub negative_ttl: Duration,
    /// Sealed mode: never contact an upstream registry or git host. Everything is served from
    /// the store (filled by `terrapeak import`), version lists list only what is stored, and
    /// anything else is a 404 that says what is missing. Default false.
    pub offline: bool,
    /// Units (a provider platform, a module version) not read for this long are evicted
    /// (`90d`). Unset: never for want of use.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub evict_unused_after: Option<Duration>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            versions_ttl: Duration::from_secs(600),
            max_stale: None,
            negative_ttl: Duration::from_secs(60),
            offline: false,
            evict_unused_after: None,
        }
    }
}

/// `upstream.*`: how the default upstream registry is reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Where to reach the default registry instead of `terraform.registry_url` (an internal
    /// mirror, a test server). Objects are still filed under `registry_url`'s host.
    pub base_url: Option<String>,
    /// Bearer token sent to the registry's discovery and API endpoints (never to artifact hosts).
    pub token: Secret,
    /// With a token, the default upstream is private unless this says its content may be
    /// served to anyone (see `upstreams[].public`). Default false.
    pub public: bool,
    /// Extra PEM CA bundle trusted for upstream TLS, besides the built-in web roots and the
    /// platform's (the OS store, `SSL_CERT_FILE`, `SSL_CERT_DIR`).
    pub ca_file: Option<PathBuf>,
    /// TCP and TLS connect timeout. Default 5 s.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Budget for one registry JSON, SHA256SUMS or signature request, retries included. Kept
    /// under Terraform's own 10 s so a slow upstream becomes a clear error. Default 8 s.
    #[serde(with = "duration")]
    pub metadata_timeout: Duration,
    /// Retries of a registry JSON request after a transient failure (connect error, timeout,
    /// 5xx, 429), each after an exponential, jittered backoff starting at `retry_backoff`.
    /// Artifacts are never retried mid-transfer. Default 2.
    pub metadata_retries: u32,
    /// First backoff before a metadata retry; it doubles with each retry. A `Retry-After` of
    /// up to 2 s from the upstream is honoured instead. Default 200 ms.
    #[serde(with = "duration")]
    pub retry_backoff: Duration,
    /// Longest wait for an artifact host's response headers once connected. Default 30 s.
    #[serde(with = "duration")]
    pub artifact_first_byte_timeout: Duration,
    /// Longest wait for the next bytes of an artifact download. Default 60 s.
    #[serde(with = "duration")]
    pub artifact_idle_timeout: Duration,
    /// How long a discovery document is trusted. Default 1 h.
    #[serde(with = "duration")]
    pub discovery_ttl: Duration,
    /// Consecutive transiently failed requests (connect errors, timeouts, 5xx, 429) to one
    /// registry API or one artifact host after which TerraPeak stops asking it for
    /// `breaker_cooldown` and answers from the cache at once. Default 5; `0` disables it.
    pub breaker_threshold: u32,
    /// How long an open circuit stays open before one probe request is let through. Default 30 s.
    #[serde(with = "duration")]
    pub breaker_cooldown: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: None,
            token: Secret::default(),
            public: false,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            metadata_timeout: Duration::from_secs(8),
            metadata_retries: 2,
            retry_backoff: Duration::from_millis(200),
            artifact_first_byte_timeout: Duration::from_secs(30),
            artifact_idle_timeout: Duration::from_secs(60),
            discovery_ttl: Duration::from_secs(3600),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// `ip:port`, or `:port` (the Go form) for every interface.
fn parse_listen_addr(key: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    let addr = raw.trim();
    let addr = match addr.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => addr.to_owned(),
    };
    addr.parse()
        .map_err(|_| invalid(key, format!("{addr:?} is not an ip:port address")))
}

/// A string that never shows itself in output or logs.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> Option<&str> {
        (!self.0.is_empty()).then_some(self.0.as_str())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"********\""
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "********" })
    }
}

/// Durations as seconds (the original TerraPeak's integers) or humantime strings (`10m`).
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => match t.trim().parse::<u64>() {
                Ok(n) => Ok(Duration::from_secs(n)),
                Err(_) => humantime::parse_duration(t.trim()).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid duration {t:?} ({e}); use seconds or a value like 30s, 10m"
                    ))
                }),
            },
        }
    }
}

/// Optional durations, with the same forms as `duration`.
mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "duration")] Duration);
        Option::<Wrapped>::deserialize(d).map(|o| o.map(|w| w.0))
    }
}

/// Sizes in bytes, or with a unit: `500MB`, `50GiB`, `1TB` (decimal and binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}; use bytes or a value like 500MB, 50GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("invalid size unit {other:?} in {text:?}")),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {text:?}"));
    }
    Ok(bytes as u64)
}

/// Optional sizes, as [`parse_size`] reads them (or plain integers).
mod opt_size {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Bytes(n)) => Ok(Some(n)),
            Some(Raw::Text(t)) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Settings given as command-line flags; each overrides the same key from every other source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub addr: Option<String>,
    pub domain: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub registry_url: Option<String>,
    pub log_level: Option<String>,
    /// `--offline`: sealed mode (cache.offline).
    pub offline: bool,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Environment variables that configure the binary rather than a config key.
const NON_KEY_VARS: &[&str] = &["config"];

/// Whether a `TERRAPEAK_*` variable (prefix removed) is meant as a configuration key: it names a
/// key path (`SERVER__ADDR`, with `__` between the parts), or a top-level section by itself.
/// Anything else with the prefix, such as the service links Kubernetes injects for a Service
/// named `terrapeak` (`TERRAPEAK_PORT`, `TERRAPEAK_SERVICE_HOST`,
/// `TERRAPEAK_PORT_8081_TCP_ADDR`), is not TerraPeak's and is ignored; a misspelt key path still
/// fails and names the key.
fn names_a_key(name: &str, sections: &[String]) -> bool {
    name.contains("__") || sections.iter().any(|s| s.eq_ignore_ascii_case(name))
}

impl Config {
    /// The top-level sections (`server`, `storage`, ...), from the type itself.
    fn sections() -> Vec<String> {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Loads defaults, then `path` (if any), then `TERRAPEAK_*` variables, then `overrides`, and
    /// validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(path, Env::prefixed("TERRAPEAK_"), overrides)
    }

    fn load_from(
        path: Option<&Path>,
        env: Env,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("{} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Yaml::file_exact(path));
        }
        let sections = Config::sections();
        figment = figment.merge(
            env.ignore(NON_KEY_VARS)
                .filter(move |name| names_a_key(name.as_str(), &sections))
                .split("__"),
        );
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.addr {
            self.server.addr = v.clone();
        }
        if let Some(v) = &o.domain {
            self.server.domain = Some(v.clone());
        }
        if let Some(v) = &o.data_dir {
            self.storage.file.path = v.clone();
        }
        if let Some(v) = &o.registry_url {
            self.terraform.registry_url = v.clone();
        }
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if o.offline {
            self.cache.offline = true;
        }
    }

    /// Checks every value that can be checked without the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.metrics_addr()?;
        self.admin_addr()?;
        if let Some(domain) = &self.server.domain {
            let url =
                url::Url::parse(domain).map_err(|e| invalid("server.domain", e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(invalid(
                    "server.domain",
                    "must be an http:// or https:// base URL",
                ));
            }
        }
        match (&self.server.tls.cert_file, &self.server.tls.key_file) {
            (None, None) => {}
            (Some(c), Some(k)) => {
                for (key, p) in [("server.tls.cert_file", c), ("server.tls.key_file", k)] {
                    if !p.is_file() {
                        return Err(invalid(
                            key,
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
            (Some(_), None) => {
                return Err(invalid(
                    "server.tls.key_file",
                    "set cert_file and key_file together",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "server.tls.cert_file",
                    "set cert_file and key_file together",
                ));
            }
        }
        if let Some(ca) = &self.server.tls.client_ca_file {
            if self.server.tls.cert_file.is_none() {
                return Err(invalid(
                    "server.tls.client_ca_file",
                    "client certificates need TLS: set server.tls.cert_file and key_file",
                ));
            }
            if !ca.is_file() {
                return Err(invalid(
                    "server.tls.client_ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        self.registry_url()?;
        self.check_private_upstreams()?;
        if let Some(ca) = &self.upstream.ca_file
            && !ca.is_file()
        {
            return Err(invalid(
                "upstream.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        let s3 = &self.storage.minio;
        if s3.enabled {
            if s3.bucket.trim().is_empty() {
                return Err(invalid("storage.minio.bucket", "must be set when enabled"));
            }
            if s3.access_key.expose().is_some() != s3.secret_key.expose().is_some() {
                return Err(invalid(
                    "storage.minio.access_key",
                    "access_key and secret_key go together",
                ));
            }
            if s3.request_timeout.is_zero() || s3.connect_timeout.is_zero() {
                return Err(invalid(
                    "storage.minio.request_timeout",
                    "timeouts must be greater than zero",
                ));
            }
        }
        if self.storage.file.path.as_os_str().is_empty() {
            return Err(invalid("storage.file.path", "must not be empty"));
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.metadata_timeout", self.upstream.metadata_timeout),
            (
                "upstream.artifact_idle_timeout",
                self.upstream.artifact_idle_timeout,
            ),
            (
                "upstream.artifact_first_byte_timeout",
                self.upstream.artifact_first_byte_timeout,
            ),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        Ok(())
    }

    /// The socket address to bind.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_listen_addr("server.addr", &self.server.addr)
    }

    /// The separate metrics listener's address, when configured.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.admin
            .addr
            .as_deref()
            .filter(|a| !a.trim().is_empty())
            .map(|a| parse_listen_addr("admin.addr", a))
            .transpose()
    }

    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.metrics
            .addr
            .as_deref()
            .filter(|a| !a.trim().is_empty())
            .map(|a| parse_listen_addr("metrics.addr", a))
            .transpose()
    }

    /// The default upstream registry's URL, `https://` assumed when no scheme is given.
    pub fn registry_url(&self) -> Result<url::Url, ConfigError> {
        let raw = self.terraform.registry_url.trim();
        let raw = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("https://{raw}")
        };
        parse_http_url(&raw).map_err(|m| invalid("terraform.registry_url", m))
    }

    /// Every configured upstream, the default (`terraform.registry_url`) first. An `upstreams`
    /// entry for the default's host overrides its base URL and token.
    /// An upstream with a token of its own serves what anonymous clients must not see: refuse
    /// a configuration that would let them.
    fn check_private_upstreams(&self) -> Result<(), ConfigError> {
        for e in self.upstream_endpoints()?.iter().filter(|e| e.private) {
            let why = match &self.auth {
                None => "there is no auth section, so anyone who reaches TerraPeak could read it"
                    .to_owned(),
                Some(a)
                    if a.anonymous_read
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(e.host.as_str())) =>
                {
                    "auth.anonymous_read lists it, so anyone could read it".to_owned()
                }
                Some(_) => continue,
            };
            return Err(invalid(
                "upstreams[].public",
                format!(
                    "upstream {} has a token, so what TerraPeak fetches with it is private, but {why}. Add auth.tokens (and leave {} out of auth.anonymous_read), or mark the upstream public: true",
                    e.host, e.host
                ),
            ));
        }
        if let Some(a) = &self.auth {
            for t in &a.tokens {
                if t.name.trim().is_empty() {
                    return Err(invalid("auth.tokens[].name", "every token needs a name"));
                }
                if t.token.expose().is_some() == t.token_file.is_some() {
                    return Err(invalid(
                        "auth.tokens[].token",
                        format!("token {}: set token or token_file (one of them)", t.name),
                    ));
                }
                for scope in &t.scopes {
                    scope
                        .parse::<crate::auth::Scope>()
                        .map_err(|m| invalid("auth.tokens[].scopes", m))?;
                }
            }
            if a.artifact_url_ttl.is_zero() {
                return Err(invalid("auth.artifact_url_ttl", "must be longer than 0"));
            }
        }
        Ok(())
    }

    pub fn upstream_endpoints(&self) -> Result<Vec<UpstreamEndpoint>, ConfigError> {
        use crate::registry::Host;
        let registry_url = self.registry_url()?;
        let default_host = Host::of_url(&registry_url)
            .map_err(|e| invalid("terraform.registry_url", e.to_string()))?;
        let mut out = vec![UpstreamEndpoint {
            host: default_host,
            base_url: match &self.upstream.base_url {
                Some(b) => parse_http_url(b).map_err(|m| invalid("upstream.base_url", m))?,
                None => registry_url,
            },
            token: self.upstream.token.expose().map(str::to_owned),
            artifact_token: None,
            private: self.upstream.token.expose().is_some() && !self.upstream.public,
        }];
        for entry in &self.upstreams {
            let host = Host::try_from(entry.host.as_str())
                .map_err(|e| invalid("upstreams[].host", e.to_string()))?;
            let base_url = match &entry.base_url {
                Some(b) => parse_http_url(b).map_err(|m| invalid("upstreams[].base_url", m))?,
                None => parse_http_url(&format!("https://{host}"))
                    .map_err(|m| invalid("upstreams[].host", m))?,
            };
            let endpoint = UpstreamEndpoint {
                host,
                base_url,
                token: entry.token.expose().map(str::to_owned),
                artifact_token: entry.artifact_token.expose().map(str::to_owned),
                private: (entry.token.expose().is_some()
                    || entry.artifact_token.expose().is_some())
                    && !entry.public,
            };
            match out.iter().position(|e| e.host == endpoint.host) {
                Some(0) => out[0] = endpoint,
                Some(_) => {
                    return Err(invalid(
                        "upstreams[].host",
                        format!("{} is configured twice", endpoint.host),
                    ));
                }
                None => out.push(endpoint),
            }
        }
        Ok(out)
    }

    /// The configuration as YAML, secrets masked.
    pub fn to_masked_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("the configuration serializes")
    }
}

fn parse_http_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{raw:?} must be an http:// or https:// URL"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("50GiB"), Ok(50 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("1024"), Ok(1024));
        for bad in ["", "GiB", "10 parsecs", "0", "-5MB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let c: Config =
            serde_yaml::from_str("storage:\n  max_size: 2GiB\ncache:\n  evict_unused_after: 90d\n")
                .unwrap();
        assert_eq!(c.storage.max_size, Some(2 << 30));
        assert_eq!(
            c.cache.evict_unused_after,
            Some(std::time::Duration::from_secs(90 * 86400))
        );
    }
    use std::io::Write;

    fn load_yaml(yaml: &str) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(yaml.as_bytes()).unwrap();
        // A prefix no variable has, so the machine's environment cannot leak in.
        Config::load_from(
            Some(file.path()),
            Env::prefixed("TPTEST_NONE_"),
            &Overrides::default(),
        )
    }

    const SEED_CFG: &str = r#"
server:
  addr: ":8081"
  read_timeout: 30
  write_timeout: 30
  idle_timeout: 120
  domain: "https://terrapeak.example.com"
log:
  level: "debug"
terraform:
  registry_url: "https://registry.terraform.io"
storage:
  minio:
    enabled: false
    endpoint: "minio:9000"
    region: "us-east-1"
    access_key: "minioadmin"
    secret_key: "supersecret"
    bucket: "terrapeak-cache"
    skip_ssl_verify: false
  file:
    path: "./registry"
"#;

    #[test]
    fn seed_config_loads_unchanged() {
        let c = load_yaml(SEED_CFG).unwrap();
        assert_eq!(c.listen_addr().unwrap().to_string(), "0.0.0.0:8081");
        assert_eq!(c.server.write_timeout, Duration::from_secs(30));
        assert_eq!(
            c.server.domain.as_deref(),
            Some("https://terrapeak.example.com")
        );
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.storage.file.path, PathBuf::from("./registry"));
        assert_eq!(c.storage.minio.secret_key.expose(), Some("supersecret"));
        assert_eq!(
            c.registry_url().unwrap().host_str(),
            Some("registry.terraform.io")
        );
    }

    #[test]
    fn defaults_run_without_a_file() {
        let c =
            Config::load_from(None, Env::prefixed("TPTEST_NONE_"), &Overrides::default()).unwrap();
        assert_eq!(c.listen_addr().unwrap().to_string(), "127.0.0.1:8081");
        assert_eq!(c.storage.file.path, PathBuf::from("./terrapeak-data"));
        assert_eq!(c.cache.versions_ttl, Duration::from_secs(600));
    }

    #[test]
    fn unknown_key_fails_naming_it() {
        let err = load_yaml("server:\n  adr: \":1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("adr"), "{err}");
        let err = load_yaml("bogus_section: 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus_section"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn environment_overrides_file_and_flags_override_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "cfg.yml",
                "server:\n  addr: \"127.0.0.1:1000\"\ncache:\n  versions_ttl: 5m\n",
            )?;
            jail.set_env("TERRAPEAK_SERVER__ADDR", "127.0.0.1:2000");
            jail.set_env("TERRAPEAK_CACHE__NEGATIVE_TTL", "30");
            jail.set_env("TERRAPEAK_CACHE__MAX_STALE", "1h");
            jail.set_env("TERRAPEAK_CONFIG", "cfg.yml");
            let c = Config::load(Some(Path::new("cfg.yml")), &Overrides::default()).unwrap();
            assert_eq!(c.server.addr, "127.0.0.1:2000");
            assert_eq!(c.cache.versions_ttl, Duration::from_secs(300));
            assert_eq!(c.cache.negative_ttl, Duration::from_secs(30));
            assert_eq!(c.cache.max_stale, Some(Duration::from_secs(3600)));
            let o = Overrides {
                addr: Some("127.0.0.1:3000".into()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("cfg.yml")), &o).unwrap();
            assert_eq!(c.server.addr, "127.0.0.1:3000");
            // Kubernetes service links for a Service named `terrapeak` are not keys.
            for (k, v) in [
                ("TERRAPEAK_PORT", "tcp://10.96.0.12:8081"),
                ("TERRAPEAK_SERVICE_HOST", "10.96.0.12"),
                ("TERRAPEAK_SERVICE_PORT", "8081"),
                ("TERRAPEAK_SERVICE_PORT_HTTP", "8081"),
                ("TERRAPEAK_PORT_8081_TCP", "tcp://10.96.0.12:8081"),
                ("TERRAPEAK_PORT_8081_TCP_PROTO", "tcp"),
                ("TERRAPEAK_PORT_8081_TCP_PORT", "8081"),
                ("TERRAPEAK_PORT_8081_TCP_ADDR", "10.96.0.12"),
            ] {
                jail.set_env(k, v);
            }
            let c = Config::load(Some(Path::new("cfg.yml")), &o).unwrap();
            assert_eq!(c.server.addr, "127.0.0.1:3000");
            jail.set_env("TERRAPEAK_SERVER__ADRR", "127.0.0.1:1");
            let err = Config::load(Some(Path::new("cfg.yml")), &o)
                .unwrap_err()
                .to_string();
            assert!(err.contains("adrr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn auto_log_format_is_text_on_a_terminal_and_json_elsewhere() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
        assert_eq!(Config::default().log.format, LogFormat::Auto);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("server:\n  addr: \"nonsense\"\n", "server.addr"),
            ("server:\n  domain: \"ftp://x\"\n", "server.domain"),
            (
                "server:\n  tls:\n    cert_file: /nonexistent\n",
                "server.tls.key_file",
            ),
            ("log:\n  level: \"[[[\"\n", "log.level"),
            (
                "upstream:\n  metadata_timeout: 0\n",
                "upstream.metadata_timeout",
            ),
            ("upstream:\n  connect_timeout: soon\n", "connect_timeout"),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn secrets_are_masked_in_output() {
        let c = load_yaml(SEED_CFG).unwrap();
        let shown = c.to_masked_yaml();
        assert!(!shown.contains("supersecret"), "{shown}");
        assert!(!shown.contains("minioadmin"), "{shown}");
        assert!(shown.contains("********"));
        assert!(!format!("{c:?}").contains("supersecret"));
    }
}
