//! Access control, an edge concern: who the caller is (a bearer token, Basic credentials whose
//! password is a token, or nobody) and whether it may read an upstream, scrape the metrics, or
//! fetch an artifact. The `http` layer asks; the cache never sees a token.
//!
//! Scopes: `read` (every upstream), `read:<upstream host>`, `admin` (everything), `metrics`.
//! Upstream hosts in `auth.anonymous_read` may be read without a token. Artifact URLs carry a
//! signature of their own (see [`signing`]), since clients send no token with downloads.

pub mod signing;

use crate::config::{AuthConfig, ConfigError};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Read,
    ReadHost(String),
    Admin,
    Metrics,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            "metrics" => Ok(Scope::Metrics),
            _ => match s.strip_prefix("read:") {
                Some(host) if !host.is_empty() => {
                    crate::registry::Host::try_from(host).map_err(|e| format!("scope {s}: {e}"))?;
                    Ok(Scope::ReadHost(host.to_ascii_lowercase()))
                }
                _ => Err(format!(
                    "unknown scope {s:?}; use read, read:<upstream host>, admin or metrics"
                )),
            },
        }
    }
}

struct Token {
    name: &'static str,
    digest: [u8; 32],
    scopes: Vec<Scope>,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    /// A configured token, by its index and name.
    Token(usize, &'static str),
    /// A client certificate the listener verified (mutual TLS), by its subject. It reads
    /// every upstream.
    Certificate(String),
}

impl Caller {
    /// For the access log: the token's name, never the token. A token's name is borrowed for
    /// the life of the process, so naming the caller of a request copies and counts nothing.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            Caller::Anonymous => Cow::Borrowed("anonymous"),
            Caller::Token(_, name) => Cow::Borrowed(name),
            Caller::Certificate(subject) => Cow::Owned(subject.clone()),
        }
    }
}

/// Why a request was refused. The message says what to configure; it never holds a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credential came, and the resource needs one (401).
    Missing(String),
    /// A credential came that matches no configured token (401).
    UnknownToken,
    /// The token lacks the scope (403).
    Forbidden(String),
    /// A signed artifact URL that does not hold (403).
    Signature(signing::SignatureError),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Missing(_) | Refusal::UnknownToken => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) | Refusal::Signature(_) => StatusCode::FORBIDDEN,
        }
    }

    /// `terrapeak_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing(_) => "missing_credentials",
            Refusal::UnknownToken => "unknown_token",
            Refusal::Forbidden(_) => "missing_scope",
            Refusal::Signature(signing::SignatureError::Expired) => "expired_signature",
            Refusal::Signature(_) => "bad_signature",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Missing(what) => format!(
                "{what} needs a TerraPeak token: add a credentials block for this host to the Terraform CLI configuration (or set TF_TOKEN_<host>), or ask for the upstream to be listed in auth.anonymous_read"
            ),
            Refusal::UnknownToken => {
                "the token sent is not one of this TerraPeak's (auth.tokens); check the credentials block or TF_TOKEN_<host>".into()
            }
            Refusal::Forbidden(why) => why.clone(),
            Refusal::Signature(e) => format!(
                "{}: this artifact URL is not one TerraPeak handed out, or it is too old; ask for the download answer again (or send a token)",
                e.as_str()
            ),
        }
    }
}

/// The access rules from `auth:`.
pub struct Auth {
    tokens: Vec<Token>,
    /// What a verified client certificate may do: read.
    certificate_scope: Scope,
    anonymous_read: Vec<String>,
    signer: signing::Signer,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("anonymous_read", &self.anonymous_read)
            .finish_non_exhaustive()
    }
}

fn read_secret_file(key: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key,
        message: format!("{}: {e}", path.display()),
    })?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            message: format!("{} is empty", path.display()),
        });
    }
    Ok(text)
}

impl Auth {
    /// Reads the tokens and signing keys (files included). Without a signing key, one is made
    /// for this process: its URLs then work only on this replica and only until it restarts.
    pub fn from_config(config: &AuthConfig) -> Result<Auth, ConfigError> {
        let mut tokens = Vec::new();
        for t in &config.tokens {
            let secret = match (t.token.expose(), &t.token_file) {
                (Some(s), None) => s.to_owned(),
                (None, Some(path)) => read_secret_file("auth.tokens[].token_file", path)?,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "auth.tokens[].token",
                        message: format!("token {}: set token or token_file, not both", t.name),
                    });
                }
            };
            let scopes = t
                .scopes
                .iter()
                .map(|s| s.parse())
                .collect::<Result<Vec<Scope>, String>>()
                .map_err(|message| ConfigError::Invalid {
                    key: "auth.tokens[].scopes",
                    message,
                })?;
            tokens.push(Token {
                // Kept for the life of the process (configuration is read once at start).
                name: Box::leak(t.name.clone().into_boxed_str()),
                digest: Sha256::digest(secret.as_bytes()).into(),
                scopes,
            });
        }
        let mut keys: Vec<Vec<u8>> = config
            .url_signing_keys
            .iter()
            .filter_map(|k| k.expose().map(|k| k.as_bytes().to_vec()))
            .collect();
        for path in &config.url_signing_key_files {
            keys.push(read_secret_file("auth.url_signing_key_files", path)?.into_bytes());
        }
        if keys.is_empty() {
            tracing::warn!(
                "auth.url_signing_keys is not set: artifact URLs are signed with a key made for this process, so other replicas and restarts do not accept them"
            );
            keys.push(
                [
                    uuid::Uuid::new_v4().into_bytes(),
                    uuid::Uuid::new_v4().into_bytes(),
                ]
                .concat(),
            );
        }
        Ok(Auth {
            tokens,
            certificate_scope: Scope::Read,
            anonymous_read: config
                .anonymous_read
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            signer: signing::Signer::new(keys, config.artifact_url_ttl.as_secs().max(1)),
        })
    }

    pub fn signer(&self) -> &signing::Signer {
        &self.signer
    }

    /// The caller, from `Authorization: Bearer <token>` or `Basic` credentials whose password
    /// is a token (what `~/.netrc` makes clients send). A credential that matches no token is
    /// refused rather than treated as anonymous.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Caller::Anonymous);
        };
        let value = value.to_str().map_err(|_| Refusal::UnknownToken)?;
        let (scheme, rest) = value.split_once(' ').ok_or(Refusal::UnknownToken)?;
        let digest: [u8; 32] = if scheme.eq_ignore_ascii_case("bearer") {
            Sha256::digest(rest.trim().as_bytes()).into()
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| Refusal::UnknownToken)?;
            let decoded = String::from_utf8(decoded).map_err(|_| Refusal::UnknownToken)?;
            let (_, password) = decoded.split_once(':').ok_or(Refusal::UnknownToken)?;
            Sha256::digest(password.as_bytes()).into()
        } else {
            return Err(Refusal::UnknownToken);
        };
        // Every token is compared, in constant time, so timing tells nothing about which
        // (or whether one) matched.
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(i);
            }
        }
        match found {
            Some(i) => Ok(Caller::Token(i, self.tokens[i].name)),
            None => Err(Refusal::UnknownToken),
        }
    }

    fn scopes(&self, caller: &Caller) -> &[Scope] {
        match caller {
            Caller::Anonymous => &[],
            Caller::Token(i, _) => &self.tokens[*i].scopes,
            Caller::Certificate(_) => std::slice::from_ref(&self.certificate_scope),
        }
    }

    /// Whether `caller` may read what TerraPeak serves for the upstream `host`.
    pub fn may_read(&self, caller: &Caller, host: &str) -> Result<(), Refusal> {
        if self
            .anonymous_read
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            return Ok(());
        }
        let allowed = self.scopes(caller).iter().any(|s| match s {
            Scope::Read | Scope::Admin => true,
            Scope::ReadHost(h) => h.eq_ignore_ascii_case(host),
            Scope::Metrics => false,
        });
        match (allowed, caller) {
            (true, _) => Ok(()),
            (false, Caller::Anonymous) => Err(Refusal::Missing(format!("reading {host}"))),
            (false, named) => Err(Refusal::Forbidden(format!(
                "token {} may not read {host}: give it the scope read or read:{host}",
                named.name()
            ))),
        }
    }

    /// Whether `caller` may see the status page's data (`/ui/api/`): what is stored from every
    /// upstream and how they fare, so `read` (every upstream) or `admin`.
    pub fn may_view_status(&self, caller: &Caller) -> Result<(), Refusal> {
        let allowed = self
            .scopes(caller)
            .iter()
            .any(|s| matches!(s, Scope::Read | Scope::Admin));
        match (allowed, caller) {
            (true, _) => Ok(()),
            (false, Caller::Anonymous) => Err(Refusal::Missing("the status page".into())),
            (false, named) => Err(Refusal::Forbidden(format!(
                "{} may not see the status page: give it a token with the scope read or admin",
                named.name()
            ))),
        }
    }

    /// Whether `caller` may use the admin API.
    pub fn may_administer(&self, caller: &Caller) -> Result<(), Refusal> {
        let allowed = self
            .scopes(caller)
            .iter()
            .any(|s| matches!(s, Scope::Admin));
        match (allowed, caller) {
            (true, _) => Ok(()),
            (false, Caller::Anonymous) => Err(Refusal::Missing("the admin API".into())),
            (false, named) => Err(Refusal::Forbidden(format!(
                "{} may not use the admin API: give it a token with the scope admin",
                named.name()
            ))),
        }
    }

    /// Whether `caller` may scrape `/metrics` on the main listener.
    pub fn may_scrape(&self, caller: &Caller) -> Result<(), Refusal> {
        let allowed = self
            .scopes(caller)
            .iter()
            .any(|s| matches!(s, Scope::Metrics | Scope::Admin));
        match (allowed, caller) {
            (true, _) => Ok(()),
            (false, Caller::Anonymous) => Err(Refusal::Missing("/metrics".into())),
            (false, named) => Err(Refusal::Forbidden(format!(
                "{} may not read /metrics: give it a token with the scope metrics (or use the metrics.addr listener)",
                named.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TokenConfig};

    fn auth() -> Auth {
        let config = AuthConfig {
            tokens: vec![
                TokenConfig {
                    name: "ci-fleet".into(),
                    token: Secret::new("tok-ci"),
                    scopes: vec!["read".into()],
                    ..Default::default()
                },
                TokenConfig {
                    name: "tofu-only".into(),
                    token: Secret::new("tok-tofu"),
                    scopes: vec!["read:registry.opentofu.org".into()],
                    ..Default::default()
                },
                TokenConfig {
                    name: "prom".into(),
                    token: Secret::new("tok-prom"),
                    scopes: vec!["metrics".into()],
                    ..Default::default()
                },
            ],
            anonymous_read: vec!["Public.Example.Com".into()],
            url_signing_keys: vec![Secret::new("k")],
            ..Default::default()
        };
        Auth::from_config(&config).unwrap()
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn bearer_and_basic_credentials_name_their_token() {
        let a = auth();
        assert_eq!(a.identify(&HeaderMap::new()), Ok(Caller::Anonymous));
        let ci = a.identify(&headers("Bearer tok-ci")).unwrap();
        assert_eq!(&*ci.name(), "ci-fleet");
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:tok-tofu");
        let tofu = a.identify(&headers(&format!("Basic {basic}"))).unwrap();
        assert_eq!(&*tofu.name(), "tofu-only");
        for bad in [
            "Bearer nope",
            "Bearer",
            "Basic !!!",
            "Token tok-ci",
            "Bearer tok-ci2",
        ] {
            assert_eq!(
                a.identify(&headers(bad)),
                Err(Refusal::UnknownToken),
                "{bad}"
            );
        }
    }

    #[test]
    fn scopes_decide_what_a_token_reads() {
        let a = auth();
        let ci = a.identify(&headers("Bearer tok-ci")).unwrap();
        let tofu = a.identify(&headers("Bearer tok-tofu")).unwrap();
        let prom = a.identify(&headers("Bearer tok-prom")).unwrap();
        assert!(a.may_read(&ci, "registry.terraform.io").is_ok());
        assert!(a.may_read(&tofu, "registry.opentofu.org").is_ok());
        let refused = a.may_read(&tofu, "registry.terraform.io").unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refused.message().contains("read:registry.terraform.io"));
        assert!(!refused.message().contains("tok-"));
        let anonymous = a
            .may_read(&Caller::Anonymous, "registry.terraform.io")
            .unwrap_err();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
        assert!(a.may_read(&Caller::Anonymous, "public.example.com").is_ok());
        assert!(a.may_read(&prom, "registry.terraform.io").is_err());
        assert!(a.may_scrape(&prom).is_ok());
        assert_eq!(
            a.may_scrape(&ci).unwrap_err().status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            a.may_scrape(&Caller::Anonymous).unwrap_err().status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn scopes_parse_or_name_the_mistake() {
        assert_eq!("read".parse(), Ok(Scope::Read));
        assert_eq!(
            "read:Registry.OpenTofu.org".parse(),
            Ok(Scope::ReadHost("registry.opentofu.org".into()))
        );
        assert!("write".parse::<Scope>().unwrap_err().contains("write"));
        assert!("read:".parse::<Scope>().is_err());
        assert!("read:../x".parse::<Scope>().is_err());
    }
}
