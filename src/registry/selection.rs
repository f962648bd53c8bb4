//! What `warm` and `export` should bring in, read from the user's own files: a dependency lock
//! file (`.terraform.lock.hcl`), the `.tf` files of a Terraform module (`required_providers`
//! and `module` blocks), or a YAML manifest. No I/O: callers pass file contents.

use super::constraints::{ConstraintError, Constraints};
use super::{Host, ModuleAddress, NameError, Platform, ProviderName};
use hcl::{Body, Expression, ObjectKey};
use serde::Deserialize;

/// Where Terraform looks for providers and modules whose source names no host.
pub const DEFAULT_HOST: &str = "registry.terraform.io";

/// A provider to bring in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedProvider {
    pub host: Host,
    pub name: ProviderName,
    pub constraints: Constraints,
    /// Platforms named for this provider (lock-file hashes are matched later, against the
    /// registry's answers).
    pub platforms: Vec<Platform>,
    /// `zh:` hashes from a lock file (hex): the platforms whose zips these are.
    pub zh_hashes: Vec<String>,
}

/// A registry module to bring in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedModule {
    pub host: Host,
    pub module: ModuleAddress,
    pub constraints: Constraints,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {source}")]
    Name {
        file: String,
        #[source]
        source: NameError,
    },
    #[error("{file}: {source}")]
    Constraint {
        file: String,
        #[source]
        source: ConstraintError,
    },
}

fn parse_err(file: &str, message: impl Into<String>) -> SelectionError {
    SelectionError::Parse {
        file: file.to_owned(),
        message: message.into(),
    }
}

/// `hashicorp/aws` or `registry.example.com/acme/thing`.
pub fn provider_source(source: &str) -> Result<(Host, ProviderName), NameError> {
    let parts: Vec<&str> = source.trim().split('/').collect();
    let (host, ns, ty) = match parts[..] {
        [ns, ty] => (DEFAULT_HOST, ns, ty),
        [host, ns, ty] => (host, ns, ty),
        _ => (DEFAULT_HOST, "", source),
    };
    Ok((
        Host::try_from(host)?,
        ProviderName {
            namespace: ns.try_into()?,
            provider_type: ty.try_into()?,
        },
    ))
}

/// A module registry source (`ns/name/system` or `host/ns/name/system`, with an optional
/// `//subdir`); `None` for every other kind of source (local paths, git, http, s3 ...).
pub fn module_source(source: &str) -> Option<(Host, ModuleAddress)> {
    let source = source.trim();
    if source.starts_with("./") || source.starts_with("../") || source.contains("::") {
        return None;
    }
    if source.contains("://") {
        return None;
    }
    let path = match source.find("//") {
        Some(i) => &source[..i],
        None => source,
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (host, ns, name, system) = match parts[..] {
        [ns, name, system] => (DEFAULT_HOST, ns, name, system),
        [host, ns, name, system] => (host, ns, name, system),
        _ => return None,
    };
    // go-getter's shorthands are never registry hosts.
    if ["github.com", "bitbucket.org"].contains(&host.to_ascii_lowercase().as_str()) {
        return None;
    }
    Some((
        Host::try_from(host).ok()?,
        ModuleAddress {
            namespace: ns.try_into().ok()?,
            name: name.try_into().ok()?,
            system: system.try_into().ok()?,
        },
    ))
}

fn string(expr: &Expression) -> Option<&str> {
    match expr {
        Expression::String(s) => Some(s),
        _ => None,
    }
}

fn key_name(k: &ObjectKey) -> Option<&str> {
    match k {
        ObjectKey::Identifier(i) => Some(i.as_str()),
        ObjectKey::Expression(e) => string(e),
        _ => None,
    }
}

/// Providers from a dependency lock file: exact versions, with their `zh:` hashes.
pub fn lock_file(file: &str, text: &str) -> Result<Vec<WantedProvider>, SelectionError> {
    let body: Body = hcl::parse(text).map_err(|e| parse_err(file, e.to_string()))?;
    let mut out = Vec::new();
    for block in body.blocks().filter(|b| b.identifier() == "provider") {
        let source = block
            .labels()
            .first()
            .map(|l| l.as_str())
            .ok_or_else(|| parse_err(file, "a provider block without its source"))?;
        let (host, name) = provider_source(source).map_err(|source| SelectionError::Name {
            file: file.to_owned(),
            source,
        })?;
        let mut version = None;
        let mut zh_hashes = Vec::new();
        for attr in block.body().attributes() {
            match attr.key() {
                "version" => version = string(attr.expr()).map(str::to_owned),
                "hashes" => {
                    if let Expression::Array(items) = attr.expr() {
                        zh_hashes.extend(
                            items
                                .iter()
                                .filter_map(string)
                                .filter_map(|h| h.strip_prefix("zh:"))
                                .map(str::to_ascii_lowercase),
                        );
                    }
                }
                _ => {}
            }
        }
        let version =
            version.ok_or_else(|| parse_err(file, format!("provider {source} has no version")))?;
        let constraints = Constraints::parse(&format!("= {version}")).map_err(|source| {
            SelectionError::Constraint {
                file: file.to_owned(),
                source,
            }
        })?;
        out.push(WantedProvider {
            host,
            name,
            constraints,
            platforms: Vec::new(),
            zh_hashes,
        });
    }
    Ok(out)
}

/// What one module's `.tf` files ask for.
#[derive(Debug, Default)]
pub struct ModuleNeeds {
    pub providers: Vec<WantedProvider>,
    pub modules: Vec<WantedModule>,
    /// `source` values that are local paths (`./x`, `../x`): read those folders too.
    pub local_modules: Vec<String>,
}

/// `required_providers` and `module` blocks of one `.tf` file.
pub fn tf_file(file: &str, text: &str, needs: &mut ModuleNeeds) -> Result<(), SelectionError> {
    let body: Body = hcl::parse(text).map_err(|e| parse_err(file, e.to_string()))?;
    let constraint = |s: &str| {
        Constraints::parse(s).map_err(|source| SelectionError::Constraint {
            file: file.to_owned(),
            source,
        })
    };
    for block in body.blocks() {
        match block.identifier() {
            "terraform" => {
                for req in block
                    .body()
                    .blocks()
                    .filter(|b| b.identifier() == "required_providers")
                {
                    for attr in req.body().attributes() {
                        let local = attr.key();
                        let (source, version) = match attr.expr() {
                            Expression::Object(o) => {
                                let mut source = None;
                                let mut version = None;
                                for (k, v) in o.iter() {
                                    match key_name(k) {
                                        Some("source") => source = string(v),
                                        Some("version") => version = string(v),
                                        _ => {}
                                    }
                                }
                                (source.map(str::to_owned), version.unwrap_or(""))
                            }
                            // The old form: `aws = "~> 5.0"`.
                            Expression::String(v) => (None, v.as_str()),
                            _ => continue,
                        };
                        let source = source.unwrap_or_else(|| format!("hashicorp/{local}"));
                        let (host, name) =
                            provider_source(&source).map_err(|source| SelectionError::Name {
                                file: file.to_owned(),
                                source,
                            })?;
                        needs.providers.push(WantedProvider {
                            host,
                            name,
                            constraints: constraint(version)?,
                            platforms: Vec::new(),
                            zh_hashes: Vec::new(),
                        });
                    }
                }
            }
            "module" => {
                let attrs: Vec<_> = block.body().attributes().collect();
                let get = |k: &str| {
                    attrs
                        .iter()
                        .find(|a| a.key() == k)
                        .and_then(|a| string(a.expr()))
                };
                let Some(source) = get("source") else {
                    continue;
                };
                if source.starts_with("./") || source.starts_with("../") {
                    needs.local_modules.push(source.to_owned());
                } else if let Some((host, module)) = module_source(source) {
                    needs.modules.push(WantedModule {
                        host,
                        module,
                        constraints: constraint(get("version").unwrap_or(""))?,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The YAML manifest `warm --manifest` reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    providers: Vec<ManifestProvider>,
    #[serde(default)]
    modules: Vec<ManifestModule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestProvider {
    source: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    platforms: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestModule {
    source: String,
    #[serde(default)]
    version: String,
}

/// Providers and modules from a manifest:
///
/// ```yaml
/// providers:
///   - source: hashicorp/aws
///     version: "~> 5.0"
///     platforms: [linux_amd64, darwin_arm64]
/// modules:
///   - source: terraform-aws-modules/vpc/aws
///     version: "~> 5.0"
/// ```
pub fn manifest(
    file: &str,
    text: &str,
) -> Result<(Vec<WantedProvider>, Vec<WantedModule>), SelectionError> {
    let doc: ManifestFile =
        serde_yaml::from_str(text).map_err(|e| parse_err(file, e.to_string()))?;
    let name_err = |source| SelectionError::Name {
        file: file.to_owned(),
        source,
    };
    let constraint = |s: &str| {
        Constraints::parse(s).map_err(|source| SelectionError::Constraint {
            file: file.to_owned(),
            source,
        })
    };
    let mut providers = Vec::new();
    for p in doc.providers {
        let (host, name) = provider_source(&p.source).map_err(name_err)?;
        let platforms = p
            .platforms
            .iter()
            .map(|s| Platform::parse(s))
            .collect::<Result<_, _>>()
            .map_err(name_err)?;
        providers.push(WantedProvider {
            host,
            name,
            constraints: constraint(&p.version)?,
            platforms,
            zh_hashes: Vec::new(),
        });
    }
    let mut modules = Vec::new();
    for m in doc.modules {
        let (host, module) = module_source(&m.source).ok_or_else(|| {
            parse_err(
                file,
                format!("{:?} is not a module registry source", m.source),
            )
        })?;
        modules.push(WantedModule {
            host,
            module,
            constraints: constraint(&m.version)?,
        });
    }
    Ok((providers, modules))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"
# This file is maintained automatically by "terraform init".
provider "registry.terraform.io/hashicorp/aws" {
  version     = "5.31.0"
  constraints = "~> 5.0"
  hashes = [
    "h1:ltxyuBWIy9cq0kIKDJH1jeWJy/y7XJLjS4QrsQK4plA=",
    "zh:0cdb9c2083bf0902442384f7309367791e4640581652dda456f2d6d7abf0de8d",
    "zh:0fd8bdd8ad7a6c4ee5ba6a1ea4e1d4cc49e9b2e1d4b2aab6e6be38f8e2b7a2d4",
  ]
}

provider "127.0.0.1:8443/acme/thing" {
  version = "1.0.0"
}
"#;

    #[test]
    fn lock_files_give_exact_versions_and_zh_hashes() {
        let got = lock_file("x.lock.hcl", LOCK).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].host.as_str(), "registry.terraform.io");
        assert_eq!(got[0].name.to_string(), "hashicorp/aws");
        assert_eq!(got[0].zh_hashes.len(), 2);
        assert_eq!(
            got[0]
                .constraints
                .newest(["5.30.0", "5.31.0", "5.32.0"])
                .unwrap()
                .to_string(),
            "5.31.0"
        );
        assert_eq!(got[1].host.as_str(), "127.0.0.1:8443");
        assert!(lock_file("x", "provider {").is_err());
    }

    #[test]
    fn tf_files_give_required_providers_and_registry_modules() {
        let tf = r#"
terraform {
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 6.0"
    }
    random = "~> 3.1"
    thing = { source = "registry.example.com/acme/thing" }
  }
}
module "vpc" {
  source  = "terraform-aws-modules/vpc/aws"
  version = "~> 5.0"
}
module "sub" {
  source  = "registry.example.com/acme/net/aws//modules/subnet"
  version = "1.2.3"
}
module "local" { source = "./modules/x" }
module "git" { source = "git::https://example.com/x.git?ref=v1" }
module "gh" { source = "github.com/acme/x" }
"#;
        let mut needs = ModuleNeeds::default();
        tf_file("main.tf", tf, &mut needs).unwrap();
        let names: Vec<String> = needs
            .providers
            .iter()
            .map(|p| format!("{}/{}", p.host, p.name))
            .collect();
        assert_eq!(
            names,
            [
                "registry.terraform.io/hashicorp/aws",
                "registry.terraform.io/hashicorp/random",
                "registry.example.com/acme/thing"
            ]
        );
        let modules: Vec<String> = needs
            .modules
            .iter()
            .map(|m| format!("{}/{}", m.host, m.module))
            .collect();
        assert_eq!(
            modules,
            [
                "registry.terraform.io/terraform-aws-modules/vpc/aws",
                "registry.example.com/acme/net/aws"
            ]
        );
        assert_eq!(needs.local_modules, ["./modules/x"]);
    }

    #[test]
    fn manifests_name_platforms_and_refuse_unknown_keys() {
        let (p, m) = manifest(
            "m.yaml",
            "providers:\n  - source: hashicorp/aws\n    version: '~> 5.0'\n    platforms: [linux_amd64, darwin_arm64]\nmodules:\n  - source: acme/net/aws\n",
        )
        .unwrap();
        assert_eq!(p[0].platforms.len(), 2);
        assert_eq!(m[0].module.to_string(), "acme/net/aws");
        assert!(manifest("m.yaml", "providers:\n  - source: a/b\n    verison: '1'\n").is_err());
        assert!(manifest("m.yaml", "modules:\n  - source: ./local\n").is_err());
    }
}
