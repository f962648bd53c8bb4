//! Building the S3 client from `storage.minio.*` and the standard AWS sources of credentials.

use crate::config::MinioConfig;
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Two handles on one bucket: one for streamed bodies (connect and idle limits only) and one for
/// small objects (a whole-request limit). Both retry once, briefly: a store that does not answer
/// is passed by (TerraPeak serves from upstream), not waited for.
pub(super) struct S3Handles {
    pub bulk: Arc<dyn ObjectStore>,
    pub small: Arc<dyn ObjectStore>,
}

pub(super) fn build(cfg: &MinioConfig) -> Result<S3Handles, String> {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 1,
        retry_timeout: cfg.request_timeout,
    };
    // Plain HTTP only towards an `http://` endpoint (from the file, or from the environment when
    // the file names none), or when `AWS_ALLOW_HTTP=true`.
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let endpoint = match cfg.endpoint.trim() {
        "" => {
            let from_env = env("AWS_ENDPOINT_URL");
            if from_env.is_empty() {
                env("AWS_ENDPOINT")
            } else {
                from_env
            }
        }
        configured => configured.to_owned(),
    };
    let allow_http = endpoint.starts_with("http://") || env("AWS_ALLOW_HTTP") == "true";
    let base = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(cfg.connect_timeout)
        .with_allow_invalid_certificates(cfg.skip_ssl_verify)
        .with_pool_idle_timeout(Duration::from_secs(60));
    let bulk = base
        .clone()
        .with_timeout_disabled()
        .with_read_timeout(cfg.request_timeout);
    let small = base.with_timeout(cfg.request_timeout);
    let builder = builder(cfg)?.with_retry(retry);
    let wrap = |store: object_store::aws::AmazonS3| -> Arc<dyn ObjectStore> {
        let prefix = cfg.prefix.trim_matches('/');
        if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        }
    };
    let make = |options: ClientOptions| {
        builder
            .clone()
            .with_http_connector(SharedRuntimeConnector)
            .with_client_options(options)
            .build()
            .map_err(|e| format!("S3 store: {e}"))
    };
    Ok(S3Handles {
        bulk: wrap(make(bulk)?),
        small: wrap(make(small)?),
    })
}

/// object_store's reqwest client, with every request sent from the shared runtime (see
/// [`crate::runtime::on_shared`]), so that the pooled connections live as long as the process
/// and not as long as the connection thread whose client asked first. Bodies are not copied
/// across: a streamed read keeps the backpressure of the connection it comes from.
#[derive(Debug)]
struct SharedRuntimeConnector;

impl HttpConnector for SharedRuntimeConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(OnShared(client)))
    }
}

#[derive(Debug)]
struct OnShared(HttpClient);

#[async_trait::async_trait]
impl HttpService for OnShared {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let client = self.0.clone();
        crate::runtime::on_shared(async move { client.execute(req).await })
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e))?
    }
}

fn builder(cfg: &MinioConfig) -> Result<AmazonS3Builder, String> {
    // The standard AWS_* variables first; the configuration file wins where it says something.
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(cfg.bucket.trim())
        .with_virtual_hosted_style_request(cfg.virtual_hosted_style);
    if !cfg.region.trim().is_empty() {
        b = b.with_region(cfg.region.trim());
    } else if std::env::var_os("AWS_REGION").is_none()
        && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        b = b.with_region("us-east-1");
    }
    let endpoint = cfg.endpoint.trim();
    if !endpoint.is_empty() {
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            // The original's `host:port` form: TLS, as `skip_ssl_verify` implies.
            format!("https://{endpoint}")
        };
        // Plain HTTP is allowed by the client options in `build` for `http://` endpoints.
        b = b.with_endpoint(url);
    }
    match (cfg.access_key.expose(), cfg.secret_key.expose()) {
        (Some(key), Some(secret)) => {
            b = b.with_access_key_id(key).with_secret_access_key(secret);
            if let Some(token) = cfg.session_token.expose() {
                b = b.with_token(token);
            }
        }
        _ if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() => {}
        _ => {
            if let Some(creds) = profile_credentials(cfg.profile.as_deref())? {
                b = b
                    .with_access_key_id(creds.key)
                    .with_secret_access_key(creds.secret);
                if let Some(token) = creds.token {
                    b = b.with_token(token);
                }
            }
            // Otherwise object_store uses web identity or instance credentials.
        }
    }
    Ok(b)
}

struct ProfileCredentials {
    key: String,
    secret: String,
    token: Option<String>,
}

/// Static keys from the shared credentials file, for the configured profile, `AWS_PROFILE`, or
/// `default`. A missing file or profile is not an error unless a profile was named.
fn profile_credentials(configured: Option<&str>) -> Result<Option<ProfileCredentials>, String> {
    let env_profile = std::env::var("AWS_PROFILE").ok();
    let named = configured.or(env_profile.as_deref());
    let profile = named.unwrap_or("default");
    let path = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".aws").join("credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(_) if named.is_none() => return Ok(None),
        Err(e) => return Err(format!("AWS profile {profile}: {}: {e}", path.display())),
    };
    match parse_profile(&text, profile) {
        Some(c) => Ok(Some(c)),
        None if named.is_none() => Ok(None),
        None => Err(format!(
            "AWS profile {profile} has no aws_access_key_id and aws_secret_access_key in {}",
            path.display()
        )),
    }
}

/// Reads one `[profile]` section of an INI-style credentials file.
fn parse_profile(text: &str, profile: &str) -> Option<ProfileCredentials> {
    let mut in_section = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            in_section = name == profile || name.strip_prefix("profile ") == Some(profile);
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(ProfileCredentials {
        key: key?,
        secret: secret?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_read_from_their_own_section() {
        let text = "[default]\naws_access_key_id = AK1\naws_secret_access_key = SK1\n\n\
                    # comment\n[ci]\naws_access_key_id=AK2\naws_secret_access_key=SK2\naws_session_token = T2\n";
        let d = parse_profile(text, "default").unwrap();
        assert_eq!(
            (d.key.as_str(), d.secret.as_str(), d.token),
            ("AK1", "SK1", None)
        );
        let ci = parse_profile(text, "ci").unwrap();
        assert_eq!((ci.key.as_str(), ci.token.as_deref()), ("AK2", Some("T2")));
        assert!(parse_profile(text, "other").is_none());
        assert!(parse_profile("[x]\naws_access_key_id=only\n", "x").is_none());
    }
}
