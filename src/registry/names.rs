//! Validated path segments: every name that can reach a storage key or an upstream URL.
//!
//! Each newtype parses or refuses. A value that exists is safe to use as one path segment: it
//! cannot climb out of a folder, name another host, or smuggle a separator.

use std::fmt;

/// Why a path segment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn refuse(kind: &'static str, value: &str, reason: &'static str) -> NameError {
    // Keep error messages short whatever the client sent.
    let mut value: String = value.chars().take(80).collect();
    if value.len() >= 80 {
        value.push('…');
    }
    NameError {
        kind,
        value,
        reason,
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                let check: fn(&str) -> Result<String, &'static str> = $check;
                check(&value).map($name).map_err(|reason| refuse($kind, &value, reason))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(value: &str) -> Result<Self, NameError> {
                Self::try_from(value.to_owned())
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                Self::try_from(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

fn ascii_only(s: &str, max: usize, allowed: impl Fn(u8) -> bool) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > max {
        return Err("too long");
    }
    if !s.bytes().all(allowed) {
        return Err("contains a character that is not allowed");
    }
    Ok(())
}

fn alnum_start(s: &str) -> Result<(), &'static str> {
    match s.as_bytes().first() {
        Some(b) if b.is_ascii_alphanumeric() => Ok(()),
        _ => Err("must start with a letter or digit"),
    }
}

name_type!(
    /// A provider or module namespace (`hashicorp`, `my_org`). Letters, digits, `-` and `_`;
    /// compared case-insensitively, so it is kept in lower case.
    Namespace,
    "namespace",
    |s| {
        ascii_only(s, 64, |b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')?;
        alnum_start(s)?;
        Ok(s.to_ascii_lowercase())
    }
);

name_type!(
    /// A provider type (`aws`, `google-beta`). Letters, digits and `-`, kept in lower case.
    ProviderType,
    "provider type",
    |s| {
        ascii_only(s, 64, |b| b.is_ascii_alphanumeric() || b == b'-')?;
        alnum_start(s)?;
        Ok(s.to_ascii_lowercase())
    }
);

name_type!(
    /// A module name (`vpc`, `consul_cluster`). Letters, digits, `-` and `_`, kept in lower case.
    ModuleName,
    "module name",
    |s| {
        ascii_only(s, 64, |b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')?;
        alnum_start(s)?;
        Ok(s.to_ascii_lowercase())
    }
);

name_type!(
    /// A module's target system (`aws`, `azurerm`). Letters and digits, kept in lower case.
    TargetSystem,
    "target system",
    |s| {
        ascii_only(s, 64, |b| b.is_ascii_alphanumeric())?;
        Ok(s.to_ascii_lowercase())
    }
);

name_type!(
    /// A semantic version as registries publish them: `1.2.3`, `1.2.3-beta.1`, `1.2.3+build`.
    Version,
    "version",
    |s| {
        ascii_only(s, 128, |b| {
            b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'+'
        })?;
        let core_end = s.find(['-', '+']).unwrap_or(s.len());
        let core: Vec<&str> = s[..core_end].split('.').collect();
        if core.len() != 3
            || core
                .iter()
                .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err("not a semantic version");
        }
        let rest = &s[core_end..];
        if rest.split(['-', '+', '.']).skip(1).any(str::is_empty) {
            return Err("not a semantic version");
        }
        Ok(s.to_owned())
    }
);

name_type!(
    /// A target operating system (`linux`, `darwin`, `windows`).
    Os,
    "os",
    |s| {
        ascii_only(s, 32, |b| b.is_ascii_lowercase() || b.is_ascii_digit())?;
        Ok(s.to_owned())
    }
);

name_type!(
    /// A target architecture (`amd64`, `arm64`, `386`).
    Arch,
    "arch",
    |s| {
        ascii_only(s, 32, |b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
        })?;
        alnum_start(s)?;
        Ok(s.to_owned())
    }
);

name_type!(
    /// A file name an upstream gave for an artifact (`terraform-provider-aws_5.0.0_linux_amd64.zip`).
    /// One segment: no separators, no leading dot.
    FileName,
    "file name",
    |s| {
        ascii_only(s, 255, |b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+')
        })?;
        alnum_start(s)?;
        Ok(s.to_owned())
    }
);

name_type!(
    /// A registry host as Terraform names it: a DNS name or IPv4 address, with an optional port,
    /// in lower case (`registry.terraform.io`, `127.0.0.1:8443`).
    Host,
    "host",
    |s| {
        ascii_only(s, 253, |b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':')
        })?;
        let (name, port) = match s.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (s, None),
        };
        if let Some(port) = port
            && (port.is_empty() || port.len() > 5 || port.parse::<u16>().is_err())
        {
            return Err("bad port");
        }
        if name.is_empty()
            || name
                .split('.')
                .any(|l| l.is_empty() || l.len() > 63 || l.starts_with('-') || l.ends_with('-'))
        {
            return Err("not a host name");
        }
        Ok(s.to_ascii_lowercase())
    }
);

impl Host {
    /// The host of an absolute URL, with its port when it is not the scheme's default.
    pub fn of_url(url: &url::Url) -> Result<Host, NameError> {
        let host = url
            .host_str()
            .ok_or_else(|| refuse("host", url.as_str(), "URL has no host"))?;
        match url.port() {
            Some(port) => Host::try_from(format!("{host}:{port}")),
            None => Host::try_from(host),
        }
    }
}

/// A provider address under one upstream registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderName {
    pub namespace: Namespace,
    pub provider_type: ProviderType,
}

impl fmt::Display for ProviderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.provider_type)
    }
}

/// A module address under one upstream registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModuleAddress {
    pub namespace: Namespace,
    pub name: ModuleName,
    pub system: TargetSystem,
}

impl fmt::Display for ModuleAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.name, self.system)
    }
}

/// A platform a provider is built for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: Os,
    pub arch: Arch,
}

impl Platform {
    /// Parses `{os}_{arch}` (`linux_amd64`).
    pub fn parse(s: &str) -> Result<Platform, NameError> {
        let (os, arch) = s
            .split_once('_')
            .ok_or_else(|| refuse("platform", s, "must be os_arch"))?;
        Ok(Platform {
            os: Os::try_from(os)?,
            arch: Arch::try_from(arch)?,
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.os, self.arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_accept_registry_names_and_fold_case() {
        for ok in ["hashicorp", "my_org", "terraform-aws-modules", "A1"] {
            assert!(Namespace::try_from(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            Namespace::try_from("HashiCorp").unwrap().as_str(),
            "hashicorp"
        );
    }

    #[test]
    fn provider_types_accept_dashes_but_not_underscores() {
        assert!(ProviderType::try_from("google-beta").is_ok());
        assert!(ProviderType::try_from("aws").is_ok());
        assert!(ProviderType::try_from("my_provider").is_err());
    }

    #[test]
    fn traversal_and_separators_are_refused_everywhere() {
        let bad = [
            "..", ".", "../etc", "a/b", "a\\b", "a%2fb", "a\0b", "", " ", "-lead", "_lead",
        ];
        for b in bad {
            assert!(Namespace::try_from(b).is_err(), "namespace {b:?}");
            assert!(ProviderType::try_from(b).is_err(), "type {b:?}");
            assert!(Os::try_from(b).is_err(), "os {b:?}");
            assert!(FileName::try_from(b).is_err(), "file {b:?}");
            assert!(Host::try_from(b).is_err(), "host {b:?}");
            assert!(ModuleName::try_from(b).is_err(), "module {b:?}");
            assert!(TargetSystem::try_from(b).is_err(), "system {b:?}");
        }
        assert!(Namespace::try_from("a".repeat(65)).is_err());
        assert!(FileName::try_from(".hidden").is_err());
    }

    #[test]
    fn versions_are_semantic() {
        for ok in ["1.2.3", "0.0.1-beta.1", "5.0.0+ent", "10.20.30-rc1+b.2"] {
            assert!(Version::try_from(ok).is_ok(), "{ok}");
        }
        for bad in [
            "1.2", "1.2.3.4", "v1.2.3", "1..3", "1.2.3-", "../1.2.3", "1.2.x",
        ] {
            assert!(Version::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_take_ports_and_refuse_userinfo_and_paths() {
        assert_eq!(
            Host::try_from("Registry.Terraform.io").unwrap().as_str(),
            "registry.terraform.io"
        );
        assert!(Host::try_from("127.0.0.1:8443").is_ok());
        for bad in [
            "user@host",
            "host/path",
            "host:",
            "host:99999",
            "a..b",
            "host:1:2",
            "-a.com",
        ] {
            assert!(Host::try_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_of_url_keeps_non_default_ports() {
        let u = url::Url::parse("https://example.com:8443/x").unwrap();
        assert_eq!(Host::of_url(&u).unwrap().as_str(), "example.com:8443");
        let u = url::Url::parse("https://example.com/x").unwrap();
        assert_eq!(Host::of_url(&u).unwrap().as_str(), "example.com");
    }
}
