//! Modules: version lists under the TTL policy, download answers rewritten to TerraPeak's own
//! archive, and archives filled from http(s) or from git (a ref resolved to a commit, the tree
//! at that commit packed as `.tar.gz`). Archives are kept forever, with their sha256 recorded at
//! fill time and checked again on every read from storage.

use super::fill::{FillSource, FillSpec};
use super::keys::{self, ModuleRelease};
use super::{Body, Cache, CacheError, CacheStatus, RangeSpec, Served, Want, store_behind};
use crate::registry::module::{ModuleSource, ModuleVersions};
use crate::registry::{Host, ModuleAddress};
use crate::storage::ObjectMeta;
use crate::upstream::UpstreamError;
use crate::upstream::git::Resolved;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io;
use url::Url;

pub(crate) const LOCATION: &str = "location.json";
const GIT_REF: &str = "git-ref.json";

/// A git ref's resolution as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRef {
    commit: String,
    is_branch: bool,
    #[serde(default)]
    ref_name: Option<String>,
}

/// Where a module download answer sends the client.
pub struct ModuleAnswer {
    pub status: CacheStatus,
    /// The `X-Terraform-Get` value.
    pub location: String,
}

impl Cache {
    /// The module version list.
    pub async fn module_versions(
        &self,
        host: &Host,
        module: &ModuleAddress,
    ) -> Result<Served, CacheError> {
        self.module_versions_with(host, module, false).await
    }

    /// Fetches the module version list from upstream now (the stored one stays if the
    /// upstream fails). Not in sealed mode.
    pub async fn refresh_module_versions(
        &self,
        host: &Host,
        module: &ModuleAddress,
    ) -> Result<Served, CacheError> {
        self.module_versions_with(host, module, true).await
    }

    async fn module_versions_with(
        &self,
        host: &Host,
        module: &ModuleAddress,
        force: bool,
    ) -> Result<Served, CacheError> {
        let upstream = self.upstream(host)?;
        if self.offline {
            if force {
                return Err(self.sealed_refresh());
            }
            return self.sealed_module_versions(host, module).await;
        }
        let (what, module) = (format!("module {module}"), module.clone());
        self.version_list(
            keys::module_versions(host, &module),
            what,
            force,
            async move {
                let body = upstream.module_versions(&module).await?;
                let doc: ModuleVersions = serde_json::from_slice(&body).map_err(|e| {
                    UpstreamError::Invalid(format!("version list for {module}: {e}"))
                })?;
                Ok(serde_json::to_vec(&doc).expect("serializes"))
            },
        )
        .await
    }

    /// Where the module's code lives, as the upstream said (cached forever: a released module
    /// version does not move).
    async fn module_source(
        &self,
        r: &ModuleRelease,
    ) -> Result<(CacheStatus, ModuleSource), CacheError> {
        let upstream = self.upstream(&r.host)?;
        let release = r.clone();
        self.immutable_doc(keys::module_file(r, LOCATION), format!("module {r}"), async move {
            let location = upstream.module_location(&release.module, &release.version).await?;
            let source = ModuleSource::parse(&location)
                .map_err(|e| UpstreamError::Invalid(format!("module {release}: {e}")))?;
            if let ModuleSource::PassThrough { location } = &source {
                tracing::warn!(module = %release, location = %location, "module source cannot be cached by TerraPeak; passing it through unchanged");
            }
            Ok((source, location))
        })
        .await
    }

    /// The module download answer: TerraPeak's archive URL (with the source's `//subdir`), or
    /// the upstream's location unchanged for sources TerraPeak cannot fetch.
    pub async fn module_download(
        &self,
        r: &ModuleRelease,
        links: &super::Links,
    ) -> Result<ModuleAnswer, CacheError> {
        self.upstream(&r.host)?;
        let (status, source) = self.module_source(r).await?;
        let location = match (&source, source.served_as()) {
            (ModuleSource::PassThrough { location }, _) => location.clone(),
            (_, Some(kind)) => {
                let mut url = links.artifact(&keys::module_artifact_path(r, kind.file_name()));
                if let Some(sub) = source.subdir() {
                    url.push_str("//");
                    url.push_str(sub);
                }
                url
            }
            (_, None) => {
                return Err(CacheError::Internal(
                    "cacheable source without a format".into(),
                ));
            }
        };
        Ok(ModuleAnswer { status, location })
    }

    /// A module archive this TerraPeak handed out.
    pub async fn module_artifact(
        &self,
        r: &ModuleRelease,
        file: &str,
        want: Want,
        range: Option<RangeSpec>,
    ) -> Result<Served, CacheError> {
        let upstream = self.upstream(&r.host)?;
        let not_handed_out = || {
            CacheError::NotFound(format!(
                "no archive of module {r} was handed out by this TerraPeak"
            ))
        };
        let source: ModuleSource = match self.read_small(&keys::module_file(r, LOCATION)).await {
            Some((_, data)) => {
                serde_json::from_slice(&data).map_err(|e| CacheError::Internal(e.to_string()))?
            }
            // While the store fails, the location may never have been kept: ask the registry
            // again, as the client's download call did.
            None if self.answers_may_be_unkept() => self.module_source(r).await?.1,
            None => return Err(not_handed_out()),
        };
        let kind = source.served_as().ok_or_else(not_handed_out)?;
        if file != kind.file_name() {
            return Err(not_handed_out());
        }
        let (key, fill_source) = match &source {
            ModuleSource::Archive { url, .. } => {
                let url = Url::parse(url).map_err(|e| CacheError::Internal(e.to_string()))?;
                (
                    keys::module_file(r, kind.file_name()),
                    FillSource::Http(url),
                )
            }
            ModuleSource::Git { url, reference, .. } => {
                let resolved = self.resolve_git_ref(r, url, reference.as_deref()).await?;
                let key = keys::module_file(r, &format!("git-{}.tar.gz", resolved.commit));
                (
                    key,
                    FillSource::Git {
                        url: url.clone(),
                        resolved,
                    },
                )
            }
            ModuleSource::PassThrough { .. } => return Err(not_handed_out()),
        };
        if let Some(served) = self
            .serve_stored(&key, want, range, CacheStatus::Hit)
            .await?
        {
            return Ok(verify_on_read(served));
        }
        let mut extra = serde_json::Map::new();
        if let FillSource::Git { resolved, .. } = &fill_source {
            extra.insert("git_commit".into(), resolved.commit.clone().into());
            if let Some(r) = &resolved.ref_name {
                extra.insert("git_ref".into(), r.clone().into());
            }
        }
        let spec = FillSpec {
            key,
            source: fill_source,
            expected_sha256: None,
            content_type: kind.content_type().into(),
            extra,
        };
        // A finished fill serves the published file's bytes: check them as the store's are.
        self.serve_fill(upstream, spec, want, range)
            .await
            .map(verify_on_read)
    }

    /// Resolves a module's git ref to a commit. Tags and commit ids resolve once and are kept;
    /// a branch is resolved again once the version-list TTL has passed, and its last resolution
    /// is used while the git host cannot answer.
    async fn resolve_git_ref(
        &self,
        r: &ModuleRelease,
        url: &str,
        reference: Option<&str>,
    ) -> Result<Resolved, CacheError> {
        let key = keys::module_file(r, GIT_REF);
        let stored: Option<(std::sync::Arc<ObjectMeta>, StoredRef)> = self
            .read_small(&key)
            .await
            .and_then(|(meta, data)| Some((meta, serde_json::from_slice(&data).ok()?)));
        if let Some((meta, s)) = &stored
            && (!s.is_branch || self.offline || meta.age_secs() < self.versions_ttl.as_secs())
        {
            return Ok(Resolved {
                commit: s.commit.clone(),
                is_branch: s.is_branch,
                ref_name: s.ref_name.clone(),
            });
        }
        if self.offline && stored.is_none() {
            return Err(self.sealed_miss("module", &format!("the git source of module {r}")));
        }
        // Concurrent cold requests share one resolution, kept before any of them goes on.
        let upstream = self.upstream(&r.host)?;
        let storage = self.storage.clone();
        let (owned_url, owned_ref, owned_key) =
            (url.to_owned(), reference.map(str::to_owned), key.clone());
        // Never resolved before: the fetch that resolves it also serves the archive that
        // follows. Resolved before (a branch past its TTL): `ls-remote`, which fetches nothing
        // when the branch has not moved.
        let cold = stored.is_none();
        let work = async move {
            let resolved = if cold {
                upstream
                    .git_resolve_by_fetch(&owned_url, owned_ref.as_deref(), &storage.spool_dir())
                    .await
            } else {
                upstream
                    .git_resolve(&owned_url, owned_ref.as_deref(), &storage.spool_dir())
                    .await
            }
            .map_err(CacheError::Upstream)?;
            let record = StoredRef {
                commit: resolved.commit.clone(),
                is_branch: resolved.is_branch,
                ref_name: resolved.ref_name.clone(),
            };
            let data = serde_json::to_vec(&record).expect("serializes");
            let mut meta = ObjectMeta::new(
                data.len() as u64,
                Sha256::digest(&data).into(),
                "application/json",
            );
            meta.origin_url = Some(owned_url);
            store_behind(&storage, &owned_key, Bytes::from(data), meta);
            Ok(resolved)
        };
        match self
            .git_flights
            .run(key.as_str(), work, Err(super::panicked()))
            .await
        {
            Ok(resolved) => Ok(resolved),
            Err(e) => match stored {
                Some((_, s)) => {
                    tracing::warn!(module = %r, error = %e, "git host failed; using the last resolution of the branch");
                    Ok(Resolved {
                        commit: s.commit,
                        is_branch: s.is_branch,
                        ref_name: s.ref_name,
                    })
                }
                None => Err(e),
            },
        }
    }
}

/// Wraps a whole stored body so its bytes are hashed as they go out: the final chunk is held
/// back until the hash matches what was recorded at fill time, so damaged storage ends in an
/// aborted transfer rather than wrong bytes.
fn verify_on_read(mut served: Served) -> Served {
    let (Some(expected), None) = (served.sha256.clone(), served.range) else {
        return served;
    };
    let Body::Stream(inner) = std::mem::replace(&mut served.body, Body::Empty) else {
        return served;
    };
    let state = (inner, Sha256::new(), None::<Bytes>, false);
    let stream = futures_util::stream::unfold(
        state,
        move |(mut inner, mut hasher, mut pending, done)| {
            let expected = expected.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    match inner.next().await {
                        Some(Ok(chunk)) => {
                            hasher.update(&chunk);
                            if let Some(prev) = pending.replace(chunk) {
                                return Some((Ok(prev), (inner, hasher, pending, false)));
                            }
                        }
                        Some(Err(e)) => return Some((Err(e), (inner, hasher, pending, true))),
                        None => {
                            let actual = hex::encode(hasher.clone().finalize());
                            if actual != expected {
                                tracing::error!(expected = %expected, actual = %actual, "stored module archive does not match its recorded sha256");
                                let err =
                                    io::Error::other("stored archive failed its integrity check");
                                return Some((Err(err), (inner, hasher, None, true)));
                            }
                            return pending
                                .take()
                                .map(|last| (Ok(last), (inner, hasher, None, true)));
                        }
                    }
                }
            }
        },
    );
    served.body = Body::Stream(stream.boxed());
    served
}
