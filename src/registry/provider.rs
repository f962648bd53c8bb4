//! Provider registry protocol documents: the version list, the download answer, SHA256SUMS.
//!
//! Documents are parsed into their protocol shape before anything is stored; fields this version
//! of TerraPeak does not know are kept in `extra` and written back unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// `GET /v1/providers/{ns}/{type}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProviderVersions {
    pub versions: Vec<ProviderVersionEntry>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProviderVersionEntry {
    pub version: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /v1/providers/{ns}/{type}/{version}/download/{os}/{arch}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProviderDownload {
    pub filename: String,
    pub download_url: String,
    pub shasums_url: String,
    /// Absent or empty for keyless upstreams (many OpenTofu providers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shasums_signature_url: Option<String>,
    pub shasum: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_keys: Option<SigningKeys>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SigningKeys {
    #[serde(default)]
    pub gpg_public_keys: Vec<GpgPublicKey>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GpgPublicKey {
    pub ascii_armor: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ProviderDownload {
    /// The signature URL, treating an empty string as none.
    pub fn signature_url(&self) -> Option<&str> {
        self.shasums_signature_url
            .as_deref()
            .filter(|s| !s.trim().is_empty())
    }

    /// The ASCII-armored public keys the upstream vouches for.
    pub fn armored_keys(&self) -> Vec<&str> {
        self.signing_keys
            .iter()
            .flat_map(|k| k.gpg_public_keys.iter())
            .map(|k| k.ascii_armor.as_str())
            .filter(|k| !k.trim().is_empty())
            .collect()
    }

    /// The expected sha256 of the zip, lower-case hex, if the field is well formed.
    pub fn expected_sha256(&self) -> Option<[u8; 32]> {
        parse_sha256_hex(&self.shasum)
    }
}

/// Parses 64 hex digits into a digest.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

/// A parsed SHA256SUMS file: file name to digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Sums {
    entries: HashMap<String, [u8; 32]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SumsError {
    #[error("SHA256SUMS line {0} is malformed")]
    Malformed(usize),
    #[error("SHA256SUMS names {0:?} twice with different hashes")]
    Conflict(String),
    #[error("SHA256SUMS is empty")]
    Empty,
}

impl Sha256Sums {
    /// Parses the `sha256sum` format: `<64 hex>  <file name>` per line (`*` binary marker allowed).
    pub fn parse(data: &[u8]) -> Result<Self, SumsError> {
        let text = std::str::from_utf8(data).map_err(|_| SumsError::Malformed(1))?;
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let (hash, name) = line
                .split_once(char::is_whitespace)
                .ok_or(SumsError::Malformed(i + 1))?;
            let name = name.trim_start().trim_start_matches('*');
            let digest = parse_sha256_hex(hash).ok_or(SumsError::Malformed(i + 1))?;
            if name.is_empty() {
                return Err(SumsError::Malformed(i + 1));
            }
            if let Some(prev) = entries.insert(name.to_owned(), digest)
                && prev != digest
            {
                return Err(SumsError::Conflict(name.to_owned()));
            }
        }
        if entries.is_empty() {
            return Err(SumsError::Empty);
        }
        Ok(Sha256Sums { entries })
    }

    pub fn get(&self, file_name: &str) -> Option<&[u8; 32]> {
        self.entries.get(file_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const H2: &str = "ABCDEF0000000000000000000000000000000000000000000000000000000002";

    #[test]
    fn sums_parse_the_sha256sum_format() {
        let text = format!("{H1}  p_1.0.0_linux_amd64.zip\n{H2} *p_1.0.0_darwin_arm64.zip\r\n\n");
        let sums = Sha256Sums::parse(text.as_bytes()).unwrap();
        assert_eq!(sums.get("p_1.0.0_linux_amd64.zip").unwrap()[31], 1);
        assert_eq!(sums.get("p_1.0.0_darwin_arm64.zip").unwrap()[0], 0xab);
        assert!(sums.get("p_1.0.0_windows_amd64.zip").is_none());
    }

    #[test]
    fn sums_refuse_garbage() {
        assert_eq!(Sha256Sums::parse(b""), Err(SumsError::Empty));
        assert_eq!(
            Sha256Sums::parse(b"nothex  file.zip\n"),
            Err(SumsError::Malformed(1))
        );
        assert!(Sha256Sums::parse(format!("{H1}\n").as_bytes()).is_err());
        let conflict = format!("{H1}  a.zip\n{H2}  a.zip\n");
        assert!(matches!(
            Sha256Sums::parse(conflict.as_bytes()),
            Err(SumsError::Conflict(_))
        ));
    }

    #[test]
    fn download_keeps_unknown_fields_and_round_trips() {
        let json = serde_json::json!({
            "protocols": ["5.0"], "os": "linux", "arch": "amd64",
            "filename": "f.zip", "download_url": "https://x/f.zip",
            "shasums_url": "https://x/S", "shasums_signature_url": "",
            "shasum": H1, "signing_keys": {"gpg_public_keys": [{"key_id": "A", "ascii_armor": "K"}]},
            "future_field": {"x": 1}
        });
        let d: ProviderDownload = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(d.signature_url(), None);
        assert_eq!(d.armored_keys(), vec!["K"]);
        assert_eq!(d.expected_sha256().unwrap()[31], 1);
        let back = serde_json::to_value(&d).unwrap();
        assert_eq!(back, json);
    }

    #[test]
    fn download_without_required_fields_is_refused() {
        let json = serde_json::json!({"filename": "f.zip"});
        assert!(serde_json::from_value::<ProviderDownload>(json).is_err());
    }
}
