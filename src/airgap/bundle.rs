//! The bundle format `export` writes and `import` reads, and the offline verification of its
//! contents. No I/O here: the commands feed entries in, this decides.
//!
//! A bundle is a tar file (optionally gzip-compressed). Its first entry is `manifest.json`:
//! the format, the TerraPeak version that wrote it, the upstream hosts its objects came from,
//! and one record per object (path, size, sha256, sidecar). Every other entry is one object,
//! `objects/<storage key>`, in the manifest's order.

use crate::registry::provider::{ProviderDownload, Sha256Sums};
use crate::registry::signature::verify_detached;
use crate::storage::{ObjectMeta, StorageKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const FORMAT: &str = "terrapeak-bundle/1";
pub const MANIFEST_NAME: &str = "manifest.json";
pub const OBJECTS_DIR: &str = "objects/";
/// A manifest larger than this is refused before it is read (about two million entries).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Objects kept in memory during verification: documents, SHA256SUMS and signatures.
const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub terrapeak_version: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The upstream registry hosts the objects are filed under.
    pub source_hosts: Vec<String>,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The tar path: `objects/<key>`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The sidecar the object is published with.
    pub meta: ObjectMeta,
}

/// Why a bundle was refused, naming the entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{entry}: {reason}")]
pub struct Refusal {
    pub entry: String,
    pub reason: String,
}

pub fn refuse(entry: &str, reason: impl Into<String>) -> Refusal {
    // Keep the message short whatever the bundle holds.
    let mut entry: String = entry.chars().take(300).collect();
    if entry.chars().any(char::is_control) {
        entry = entry.escape_debug().to_string();
    }
    Refusal {
        entry,
        reason: reason.into(),
    }
}

impl Manifest {
    /// Checks the manifest on its own: format, and every entry's path and sizes. Returns the
    /// storage key of each entry, in order.
    pub fn check(&self) -> Result<Vec<StorageKey>, Refusal> {
        if self.format != FORMAT {
            return Err(refuse(
                MANIFEST_NAME,
                format!("format {:?} is not {FORMAT}", self.format),
            ));
        }
        let mut seen = BTreeSet::new();
        self.entries
            .iter()
            .map(|e| {
                let key = entry_key(&e.path)?;
                if e.size != e.meta.size || !e.sha256.eq_ignore_ascii_case(&e.meta.sha256) {
                    return Err(refuse(&e.path, "size or sha256 disagrees with its sidecar"));
                }
                if crate::registry::provider::parse_sha256_hex(&e.sha256).is_none() {
                    return Err(refuse(&e.path, "sha256 is not 64 hex digits"));
                }
                if !seen.insert(key.clone()) {
                    return Err(refuse(&e.path, "listed twice"));
                }
                Ok(key)
            })
            .collect()
    }
}

/// The storage key of an object entry's path; refuses anything that could land outside the
/// store's provider and module folders.
pub fn entry_key(path: &str) -> Result<StorageKey, Refusal> {
    let rest = path
        .strip_prefix(OBJECTS_DIR)
        .ok_or_else(|| refuse(path, "not under objects/"))?;
    let key = StorageKey::parse(rest)
        .ok_or_else(|| refuse(path, "path climbs out or is not a plain storage key"))?;
    match rest.split('/').next() {
        Some("providers") if rest.split('/').count() >= 5 => Ok(key),
        Some("modules") if rest.split('/').count() >= 6 => Ok(key),
        _ => Err(refuse(path, "not a provider or module object")),
    }
}

/// What the verifier keeps of one object.
enum Held {
    /// Documents: kept whole (small).
    Bytes(Vec<u8>),
    /// Artifacts: only their hash.
    Hashed,
}

/// Collects every entry of a bundle (after its bytes were checked against the manifest), then
/// checks what ties them together, offline: each SHA256SUMS against its signature and the
/// release's signing keys, and each provider zip against SHA256SUMS and its download answer.
#[derive(Default)]
pub struct Verifier {
    objects: BTreeMap<StorageKey, (String, Held)>,
}

/// Whether an object is a document the verifier needs whole.
pub fn is_document(key: &StorageKey, size: u64) -> bool {
    let leaf = key.leaf();
    size <= MAX_DOCUMENT_BYTES
        && (leaf.ends_with(".json") || leaf == "SHA256SUMS" || leaf == "SHA256SUMS.sig")
}

impl Verifier {
    /// One entry whose size and sha256 matched the manifest; `bytes` for documents.
    pub fn add(&mut self, key: StorageKey, sha256: &str, bytes: Option<Vec<u8>>) {
        let held = match bytes {
            Some(b) => Held::Bytes(b),
            None => Held::Hashed,
        };
        self.objects
            .insert(key, (sha256.to_ascii_lowercase(), held));
    }

    fn bytes(&self, key: &StorageKey) -> Option<&[u8]> {
        match self.objects.get(key) {
            Some((_, Held::Bytes(b))) => Some(b),
            _ => None,
        }
    }

    /// Checks every provider release in the bundle. Returns the entries that must not be
    /// published: download answers whose zip the bundle lacks, and module locations and git
    /// resolutions whose archive it lacks. Published, they would send a TerraPeak that is not
    /// sealed to URLs the bundle named, not an upstream.
    pub fn finish(&self) -> Result<BTreeSet<StorageKey>, Refusal> {
        let path_of = |k: &StorageKey| format!("{OBJECTS_DIR}{k}");
        // Download answers by version folder: providers/{host}/{ns}/{type}/{version}.
        let mut docs: BTreeMap<String, Vec<(StorageKey, ProviderDownload)>> = BTreeMap::new();
        for key in self.objects.keys() {
            if !key.as_str().starts_with("providers/") || !key.parent().ends_with("/download") {
                continue;
            }
            let bytes = self
                .bytes(key)
                .ok_or_else(|| refuse(&path_of(key), "download answer too large"))?;
            let doc: ProviderDownload = serde_json::from_slice(bytes)
                .map_err(|e| refuse(&path_of(key), format!("not a download answer: {e}")))?;
            let version_dir = key.parent().trim_end_matches("/download").to_owned();
            docs.entry(version_dir)
                .or_default()
                .push((key.clone(), doc));
        }
        // Each SHA256SUMS: signed by a key of its release, when the release names keys.
        let mut sums: BTreeMap<String, Sha256Sums> = BTreeMap::new();
        for key in self.objects.keys() {
            if !key.as_str().starts_with("providers/") || key.leaf() != "SHA256SUMS" {
                continue;
            }
            let dir = key.parent().to_owned();
            let data = self
                .bytes(key)
                .ok_or_else(|| refuse(&path_of(key), "SHA256SUMS too large"))?;
            let parsed =
                Sha256Sums::parse(data).map_err(|e| refuse(&path_of(key), e.to_string()))?;
            let release_docs = docs.get(&dir).map(Vec::as_slice).unwrap_or_default();
            if release_docs.is_empty() {
                return Err(refuse(
                    &path_of(key),
                    "no download answer of this release in the bundle",
                ));
            }
            let armored: Vec<&str> = release_docs
                .iter()
                .flat_map(|(_, d)| d.armored_keys())
                .collect();
            let signed = release_docs
                .iter()
                .any(|(_, d)| d.signature_url().is_some());
            let sig_key = StorageKey::parse(&format!("{dir}/SHA256SUMS.sig")).expect("valid");
            match (self.bytes(&sig_key), signed) {
                (Some(sig), _) => {
                    verify_detached(data, sig, &armored).map_err(|e| {
                        refuse(
                            &path_of(&sig_key),
                            format!("does not verify SHA256SUMS: {e}"),
                        )
                    })?;
                }
                (None, true) => {
                    return Err(refuse(
                        &path_of(key),
                        "the release is signed but the bundle holds no SHA256SUMS.sig",
                    ));
                }
                (None, false) => {}
            }
            sums.insert(dir, parsed);
        }
        // Each zip: named by a download answer of its release, with the answer's shasum and the
        // hash SHA256SUMS gives it.
        for (key, (sha256, _)) in &self.objects {
            if !key.as_str().starts_with("providers/") || !key.leaf().ends_with(".zip") {
                continue;
            }
            let dir = key.parent();
            let doc = docs
                .get(dir)
                .and_then(|d| d.iter().find(|(_, d)| d.filename == key.leaf()))
                .map(|(_, d)| d)
                .ok_or_else(|| {
                    refuse(
                        &path_of(key),
                        "no download answer in the bundle names this zip",
                    )
                })?;
            if !doc.shasum.trim().eq_ignore_ascii_case(sha256) {
                return Err(refuse(
                    &path_of(key),
                    "sha256 differs from the registry's shasum",
                ));
            }
            let listed = sums
                .get(dir)
                .ok_or_else(|| refuse(&path_of(key), "no verified SHA256SUMS for this zip"))?
                .get(key.leaf())
                .map(hex::encode);
            if listed.as_deref() != Some(sha256.as_str()) {
                return Err(refuse(
                    &path_of(key),
                    "SHA256SUMS does not list this zip with its sha256",
                ));
            }
        }
        let mut unusable = BTreeSet::new();
        for (dir, release_docs) in &docs {
            for (key, doc) in release_docs {
                let zip = StorageKey::parse(&format!("{dir}/{}", doc.filename));
                if zip.is_none_or(|z| !self.objects.contains_key(&z)) {
                    unusable.insert(key.clone());
                }
            }
        }
        let archived: BTreeSet<&str> = self
            .objects
            .keys()
            .filter(|k| {
                k.as_str().starts_with("modules/") && crate::cache::is_archive_leaf(k.leaf())
            })
            .map(|k| k.parent())
            .collect();
        for key in self.objects.keys() {
            if key.as_str().starts_with("modules/")
                && matches!(key.leaf(), "location.json" | "git-ref.json")
                && !archived.contains(key.parent())
            {
                unusable.insert(key.clone());
            }
        }
        Ok(unusable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_in_the_provider_and_module_folders() {
        assert!(entry_key("objects/providers/h.io/ns/t/1.0.0/SHA256SUMS").is_ok());
        assert!(entry_key("objects/modules/h.io/ns/n/aws/1.0.0/module.tar.gz").is_ok());
        for bad in [
            "objects/providers/h.io/ns/t/../../../../etc/passwd",
            "objects/../providers/h.io/ns/t/1.0.0/x",
            "/etc/passwd",
            "objects//providers/h.io/ns/t/1.0.0/x",
            "objects/providers/h.io/ns/t/1.0.0/a\\b",
            "objects/_probe/x/y/z/w/v",
            "objects/providers/x",
            "providers/h.io/ns/t/1.0.0/x",
        ] {
            assert!(entry_key(bad).is_err(), "{bad}");
        }
    }
}
