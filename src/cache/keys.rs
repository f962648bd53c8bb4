//! The one place storage keys and TerraPeak's own artifact paths are built. Every segment is a
//! validated name from `registry`, so no key can leave its folder.

use crate::registry::{FileName, Host, ModuleAddress, Platform, ProviderName, Version};
use crate::storage::StorageKey;
use std::fmt;

/// One provider release for one platform, under one upstream registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderRelease {
    pub host: Host,
    pub name: ProviderName,
    pub version: Version,
    pub platform: Platform,
}

impl fmt::Display for ProviderRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {} {}",
            self.host, self.name, self.version, self.platform
        )
    }
}

/// The artifacts a provider download answer points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderFile {
    Zip(FileName),
    Sums,
    Signature,
}

pub const SUMS_NAME: &str = "SHA256SUMS";
pub const SIGNATURE_NAME: &str = "SHA256SUMS.sig";

impl ProviderFile {
    /// Parses the last segment of an artifact path.
    pub fn parse(name: &str) -> Result<ProviderFile, crate::registry::NameError> {
        match name {
            SUMS_NAME => Ok(ProviderFile::Sums),
            SIGNATURE_NAME => Ok(ProviderFile::Signature),
            other => FileName::try_from(other).map(ProviderFile::Zip),
        }
    }

    fn segment(&self) -> &str {
        match self {
            ProviderFile::Zip(f) => f.as_str(),
            ProviderFile::Sums => SUMS_NAME,
            ProviderFile::Signature => SIGNATURE_NAME,
        }
    }
}

fn provider_prefix(host: &Host, name: &ProviderName) -> [String; 4] {
    [
        "providers".to_owned(),
        host.to_string(),
        name.namespace.to_string(),
        name.provider_type.to_string(),
    ]
}

/// `providers/{host}/{ns}/{type}/versions.json`
pub fn provider_versions(host: &Host, name: &ProviderName) -> StorageKey {
    let p = provider_prefix(host, name);
    StorageKey::from_segments(p.iter().map(String::as_str).chain(["versions.json"]))
}

/// `providers/{host}/{ns}/{type}/{version}/download/{os}_{arch}.json`
pub fn provider_download(r: &ProviderRelease) -> StorageKey {
    let p = provider_prefix(&r.host, &r.name);
    let leaf = format!("{}.json", r.platform);
    StorageKey::from_segments(p.iter().map(String::as_str).chain([
        r.version.as_str(),
        "download",
        leaf.as_str(),
    ]))
}

/// `providers/{host}/{ns}/{type}/{version}/{file}`. SHA256SUMS and its signature are shared by
/// every platform of a version; zips are named by the upstream's file name.
pub fn provider_file(r: &ProviderRelease, file: &ProviderFile) -> StorageKey {
    let p = provider_prefix(&r.host, &r.name);
    StorageKey::from_segments(
        p.iter()
            .map(String::as_str)
            .chain([r.version.as_str(), file.segment()]),
    )
}

/// `providers/{host}/{ns}/{type}/{version}/{zip file}.h1`: the zip's dirhash, once computed.
pub fn provider_h1(r: &ProviderRelease, zip: &FileName) -> StorageKey {
    let p = provider_prefix(&r.host, &r.name);
    let leaf = format!("{zip}.h1");
    StorageKey::from_segments(
        p.iter()
            .map(String::as_str)
            .chain([r.version.as_str(), leaf.as_str()]),
    )
}

/// The path of TerraPeak's own URL for an artifact, after `/artifacts/`:
/// `providers/{host}/{ns}/{type}/{version}/{os}/{arch}/{file}`.
pub fn provider_artifact_path(r: &ProviderRelease, file: &ProviderFile) -> String {
    format!(
        "providers/{}/{}/{}/{}/{}/{}/{}",
        r.host,
        r.name.namespace,
        r.name.provider_type,
        r.version,
        r.platform.os,
        r.platform.arch,
        file.segment()
    )
}

/// `pins/providers/{host}/{ns}/{type}/{version}/{os}_{arch}`: a pin mark on one platform of a
/// provider version. Pins live in the store, so every replica honours them.
pub fn provider_pin(r: &ProviderRelease) -> StorageKey {
    let p = provider_prefix(&r.host, &r.name);
    let leaf = r.platform.to_string();
    StorageKey::from_segments(
        ["pins"]
            .into_iter()
            .chain(p.iter().map(String::as_str))
            .chain([r.version.as_str(), leaf.as_str()]),
    )
}

/// One module version under one upstream registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModuleRelease {
    pub host: Host,
    pub module: ModuleAddress,
    pub version: Version,
}

impl fmt::Display for ModuleRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}", self.host, self.module, self.version)
    }
}

fn module_segments(host: &Host, m: &ModuleAddress) -> [String; 5] {
    [
        "modules".to_owned(),
        host.to_string(),
        m.namespace.to_string(),
        m.name.to_string(),
        m.system.to_string(),
    ]
}

/// `modules/{host}/{ns}/{name}/{system}/versions.json`
pub fn module_versions(host: &Host, m: &ModuleAddress) -> StorageKey {
    let p = module_segments(host, m);
    StorageKey::from_segments(p.iter().map(String::as_str).chain(["versions.json"]))
}

/// `modules/{host}/{ns}/{name}/{system}/{version}/{leaf}`: the location answer
/// (`location.json`), a git ref's resolution (`git-ref.json`), an archive (`module.tar.gz`), or
/// the archive of one git commit (`git-{commit}.tar.gz`). `leaf` is built here or is a fixed name.
pub fn module_file(r: &ModuleRelease, leaf: &str) -> StorageKey {
    let p = module_segments(&r.host, &r.module);
    StorageKey::from_segments(
        p.iter()
            .map(String::as_str)
            .chain([r.version.as_str(), leaf]),
    )
}

/// `pins/modules/{host}/{ns}/{name}/{system}/{version}`: a pin mark on a module version.
pub fn module_pin(r: &ModuleRelease) -> StorageKey {
    let p = module_segments(&r.host, &r.module);
    StorageKey::from_segments(
        ["pins"]
            .into_iter()
            .chain(p.iter().map(String::as_str))
            .chain([r.version.as_str()]),
    )
}

/// The path of TerraPeak's own URL for a module archive, after `/artifacts/`:
/// `modules/{host}/{ns}/{name}/{system}/{version}/{file}`.
pub fn module_artifact_path(r: &ModuleRelease, file: &str) -> String {
    format!(
        "modules/{}/{}/{}/{}/{}/{file}",
        r.host, r.module.namespace, r.module.name, r.module.system, r.version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> ProviderRelease {
        ProviderRelease {
            host: "registry.terraform.io".parse().unwrap(),
            name: ProviderName {
                namespace: "hashicorp".parse().unwrap(),
                provider_type: "google-beta".parse().unwrap(),
            },
            version: "5.1.0".parse().unwrap(),
            platform: Platform {
                os: "linux".parse().unwrap(),
                arch: "amd64".parse().unwrap(),
            },
        }
    }

    #[test]
    fn keys_are_filed_by_upstream_host() {
        let r = release();
        assert_eq!(
            provider_download(&r).as_str(),
            "providers/registry.terraform.io/hashicorp/google-beta/5.1.0/download/linux_amd64.json"
        );
        assert_eq!(
            provider_file(&r, &ProviderFile::Sums).as_str(),
            "providers/registry.terraform.io/hashicorp/google-beta/5.1.0/SHA256SUMS"
        );
        assert_eq!(
            provider_versions(&r.host, &r.name).as_str(),
            "providers/registry.terraform.io/hashicorp/google-beta/versions.json"
        );
    }

    #[test]
    fn artifact_urls_round_trip_through_parse() {
        let r = release();
        let zip =
            ProviderFile::parse("terraform-provider-google-beta_5.1.0_linux_amd64.zip").unwrap();
        let links = super::super::Links::new("https://tp.example.com/", None);
        assert_eq!(
            links.artifact(&provider_artifact_path(&r, &zip)),
            "https://tp.example.com/artifacts/providers/registry.terraform.io/hashicorp/google-beta/5.1.0/linux/amd64/terraform-provider-google-beta_5.1.0_linux_amd64.zip"
        );
        let signed = super::super::Links::new(
            "https://tp.example.com",
            Some(std::sync::Arc::new(|path: &str| {
                format!("s/9/{}", path.len())
            })),
        );
        assert_eq!(
            signed.artifact("modules/x"),
            "https://tp.example.com/artifacts/s/9/9/modules/x"
        );
        assert_eq!(
            ProviderFile::parse("SHA256SUMS.sig").unwrap(),
            ProviderFile::Signature
        );
        assert!(ProviderFile::parse("../x").is_err());
    }
}
