//! Module registry protocol documents and the go-getter source addresses a module download
//! answer points to.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;

/// `GET /v1/modules/{ns}/{name}/{system}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModuleVersions {
    pub modules: Vec<ModuleVersionsEntry>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModuleVersionsEntry {
    pub versions: Vec<ModuleVersionEntry>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModuleVersionEntry {
    pub version: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Archive formats go-getter unpacks, by the extension TerraPeak serves them under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveKind {
    TarGz,
    Zip,
    TarXz,
    TarBz2,
}

impl ArchiveKind {
    /// The file name TerraPeak serves the archive under; go-getter picks the format from it.
    pub fn file_name(self) -> &'static str {
        match self {
            ArchiveKind::TarGz => "module.tar.gz",
            ArchiveKind::Zip => "module.zip",
            ArchiveKind::TarXz => "module.tar.xz",
            ArchiveKind::TarBz2 => "module.tar.bz2",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ArchiveKind::TarGz => "application/gzip",
            ArchiveKind::Zip => "application/zip",
            ArchiveKind::TarXz => "application/x-xz",
            ArchiveKind::TarBz2 => "application/x-bzip2",
        }
    }

    fn from_name(name: &str) -> Option<ArchiveKind> {
        let name = name.to_ascii_lowercase();
        [
            (".tar.gz", ArchiveKind::TarGz),
            (".tgz", ArchiveKind::TarGz),
            (".zip", ArchiveKind::Zip),
            (".tar.xz", ArchiveKind::TarXz),
            (".txz", ArchiveKind::TarXz),
            (".tar.bz2", ArchiveKind::TarBz2),
            (".tbz2", ArchiveKind::TarBz2),
        ]
        .into_iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(_, kind)| kind)
    }

    fn from_param(value: &str) -> Option<ArchiveKind> {
        ArchiveKind::from_name(&format!("x.{value}"))
    }
}

/// Where a module's code lives, as TerraPeak understands it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ModuleSource {
    /// An http(s) archive.
    Archive {
        url: String,
        archive: ArchiveKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subdir: Option<String>,
    },
    /// A git repository over http(s), at a ref (tag, branch or commit; the default branch when
    /// absent).
    Git {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subdir: Option<String>,
    },
    /// A source TerraPeak cannot fetch (ssh, s3, gcs, hg, ...): handed to the client unchanged.
    PassThrough { location: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid module location {location:?}: {reason}")]
pub struct SourceError {
    pub location: String,
    pub reason: &'static str,
}

/// Splits go-getter's `//subdir` off a source: `https://h/p.tgz//a/b?x=1` gives
/// (`https://h/p.tgz?x=1`, `a/b`).
fn split_subdir(src: &str) -> (String, Option<String>) {
    let after_scheme = src.find("://").map_or(0, |i| i + 3);
    let Some(rel) = src[after_scheme..].find("//") else {
        return (src.to_owned(), None);
    };
    let at = after_scheme + rel;
    let (base, rest) = (&src[..at], &src[at + 2..]);
    let (subdir, query) = match rest.split_once('?') {
        Some((s, q)) => (s, Some(q)),
        None => (rest, None),
    };
    let source = match query {
        Some(q) => format!("{base}?{q}"),
        None => base.to_owned(),
    };
    let subdir = subdir.trim_matches('/');
    (source, (!subdir.is_empty()).then(|| subdir.to_owned()))
}

fn valid_subdir(s: &str) -> bool {
    s.len() <= 512
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'*'))
        })
}

impl ModuleSource {
    /// Classifies an absolute go-getter source address (relative ones must be resolved first).
    pub fn parse(location: &str) -> Result<ModuleSource, SourceError> {
        let err = |reason| SourceError {
            location: location.chars().take(200).collect(),
            reason,
        };
        let trimmed = location.trim();
        let pass = || ModuleSource::PassThrough {
            location: trimmed.to_owned(),
        };
        let (getter, rest) = match trimmed.split_once("::") {
            Some((g, r)) if !g.is_empty() && g.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                (Some(g.to_ascii_lowercase()), r)
            }
            _ => (None, trimmed),
        };
        let (source, subdir) = split_subdir(rest);
        if let Some(s) = &subdir
            && !valid_subdir(s)
        {
            return Err(err("bad subdirectory"));
        }
        let Ok(mut url) = Url::parse(&source) else {
            return Ok(pass());
        };
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Ok(pass());
        }
        if !url.username().is_empty() || url.password().is_some() {
            // Credentials in a URL belong to the client's own configuration, not to a cache.
            return Ok(pass());
        }
        let mut params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        match getter.as_deref() {
            Some("git") => {
                let reference = params
                    .iter()
                    .find(|(k, _)| k == "ref")
                    .map(|(_, v)| v.clone())
                    .filter(|v| !v.is_empty());
                if params.iter().any(|(k, _)| k == "sshkey") {
                    return Ok(pass());
                }
                if let Some(r) = &reference
                    && (r.starts_with('-') || r.contains("..") || r.len() > 256)
                {
                    return Err(err("bad git ref"));
                }
                params.retain(|(k, _)| k != "ref" && k != "depth");
                set_query(&mut url, &params);
                Ok(ModuleSource::Git {
                    url: url.to_string(),
                    reference,
                    subdir,
                })
            }
            None | Some("http") | Some("https") => {
                let from_param = params
                    .iter()
                    .find(|(k, _)| k == "archive")
                    .map(|(_, v)| ArchiveKind::from_param(v));
                let archive = match from_param {
                    Some(Some(kind)) => {
                        params.retain(|(k, _)| k != "archive");
                        set_query(&mut url, &params);
                        Some(kind)
                    }
                    Some(None) => None,
                    None => ArchiveKind::from_name(url.path()),
                };
                match archive {
                    Some(archive) => Ok(ModuleSource::Archive {
                        url: url.to_string(),
                        archive,
                        subdir,
                    }),
                    None => Ok(pass()),
                }
            }
            Some(_) => Ok(pass()),
        }
    }

    pub fn subdir(&self) -> Option<&str> {
        match self {
            ModuleSource::Archive { subdir, .. } | ModuleSource::Git { subdir, .. } => {
                subdir.as_deref()
            }
            ModuleSource::PassThrough { .. } => None,
        }
    }

    /// The archive format TerraPeak serves this module in, if it caches it.
    pub fn served_as(&self) -> Option<ArchiveKind> {
        match self {
            ModuleSource::Archive { archive, .. } => Some(*archive),
            ModuleSource::Git { .. } => Some(ArchiveKind::TarGz),
            ModuleSource::PassThrough { .. } => None,
        }
    }
}

fn set_query(url: &mut Url, params: &[(String, String)]) {
    if params.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(params);
    }
}

/// Whether a location must be resolved against the URL that answered: go-getter accepts a
/// relative `X-Terraform-Get` only when it starts with `/`, `./` or `../`.
pub fn is_relative_location(location: &str) -> bool {
    location.starts_with('/') || location.starts_with("./") || location.starts_with("../")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_registry_git_locations_parse() {
        let s = ModuleSource::parse(
            "git::https://github.com/terraform-aws-modules/terraform-aws-vpc?ref=v5.1.0",
        )
        .unwrap();
        assert_eq!(
            s,
            ModuleSource::Git {
                url: "https://github.com/terraform-aws-modules/terraform-aws-vpc".into(),
                reference: Some("v5.1.0".into()),
                subdir: None,
            }
        );
        let s = ModuleSource::parse(
            "git::https://example.com/org/repo.git//modules/vpc?ref=abc&depth=1",
        )
        .unwrap();
        assert_eq!(
            s,
            ModuleSource::Git {
                url: "https://example.com/org/repo.git".into(),
                reference: Some("abc".into()),
                subdir: Some("modules/vpc".into()),
            }
        );
    }

    #[test]
    fn archives_are_recognised_by_extension_or_archive_param() {
        let s = ModuleSource::parse("https://cdn.example.com/m/1.0.0.tar.gz").unwrap();
        assert_eq!(s.served_as(), Some(ArchiveKind::TarGz));
        let s = ModuleSource::parse("https://cdn.example.com/m.zip//sub/dir").unwrap();
        assert_eq!(s.served_as(), Some(ArchiveKind::Zip));
        assert_eq!(s.subdir(), Some("sub/dir"));
        let s =
            ModuleSource::parse("https://api.example.com/download?archive=tgz&token=1").unwrap();
        assert_eq!(
            s,
            ModuleSource::Archive {
                url: "https://api.example.com/download?token=1".into(),
                archive: ArchiveKind::TarGz,
                subdir: None
            }
        );
        let s = ModuleSource::parse("https://codeload.github.com/o/r/tar.gz/v1?archive=tar.gz//*")
            .unwrap();
        assert_eq!(s.subdir(), Some("*"));
        assert_eq!(s.served_as(), Some(ArchiveKind::TarGz));
    }

    #[test]
    fn sources_terrapeak_cannot_fetch_pass_through() {
        for loc in [
            "git::ssh://git@github.com/org/repo.git?ref=v1",
            "git@github.com:org/repo.git",
            "s3::https://s3.amazonaws.com/bucket/m.zip",
            "gcs::https://www.googleapis.com/storage/v1/bucket/m.zip",
            "hg::https://example.com/repo",
            "https://example.com/not-an-archive",
            "github.com/org/repo",
            "git::https://user:pw@example.com/r.git",
            "git::file:///etc",
        ] {
            assert!(
                matches!(
                    ModuleSource::parse(loc).unwrap(),
                    ModuleSource::PassThrough { .. }
                ),
                "{loc}"
            );
        }
    }

    #[test]
    fn hostile_subdirs_and_refs_are_refused() {
        assert!(ModuleSource::parse("https://x.example.com/m.zip//../../etc").is_err());
        assert!(
            ModuleSource::parse("git::https://x.example.com/r.git?ref=--upload-pack=evil").is_err()
        );
    }

    #[test]
    fn relative_locations_are_the_three_go_getter_forms() {
        for rel in ["/a.tgz", "./a.tgz", "../a.tgz"] {
            assert!(is_relative_location(rel));
        }
        for abs in ["https://x/a.tgz", "git::https://x/r", "a.tgz"] {
            assert!(!is_relative_location(abs));
        }
    }

    #[test]
    fn version_lists_keep_unknown_fields() {
        let json = serde_json::json!({"modules": [{"source": "ns/n/s", "versions": [{"version": "1.0.0", "submodules": []}]}], "meta": {}});
        let v: ModuleVersions = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(v.modules[0].versions[0].version, "1.0.0");
        assert_eq!(serde_json::to_value(&v).unwrap(), json);
    }
}
