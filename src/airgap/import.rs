//! `terrapeak import`: a bundle into the configured store. Two passes over the file: the first
//! checks every entry against the manifest and verifies every provider release offline
//! (signatures, SHA256SUMS, the registry's shasums) without writing anything; the second
//! publishes the entries one by one, each staged, checked again and published atomically. A
//! refused bundle leaves nothing behind; an interrupted import leaves only complete objects.

use super::bundle::{self, MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, Refusal, Verifier, refuse};
use crate::storage::{Storage, StorageKey};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use tokio::runtime::Handle;

/// Objects up to this size are written whole; larger ones go through a spool file.
const SMALL_OBJECT: u64 = 1 << 20;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImportReport {
    /// Objects published by this import.
    pub imported: usize,
    /// Objects the store already held, byte for byte.
    pub already_present: usize,
    /// Download answers and module locations left out because the bundle lacks the artifact
    /// they point to.
    pub skipped: usize,
    /// Objects the store holds with other bytes: the stored ones stay (what was served once is
    /// served identically forever).
    pub kept_existing: Vec<String>,
    pub bytes: u64,
    pub source_hosts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("bundle refused, nothing was imported: {0}")]
    Refused(Refusal),
    #[error("import stopped at {entry}: {reason} (the objects before it were imported complete)")]
    Interrupted { entry: String, reason: String },
    #[error("{0}")]
    Io(String),
}

/// Imports the bundle at `path` into `storage`.
pub async fn import_bundle(storage: &Storage, path: &Path) -> Result<ImportReport, ImportError> {
    let path = path.to_owned();
    let storage = storage.clone();
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || {
        let (manifest, keys, skip) = verify(&path).map_err(ImportError::Refused)?;
        publish(&handle, &storage, &path, &manifest, &keys, &skip)
    })
    .await
    .map_err(|e| ImportError::Io(e.to_string()))?
}

fn open(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, Refusal> {
    let file = std::fs::File::open(path)
        .map_err(|e| refuse(&path.display().to_string(), e.to_string()))?;
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let gzip = reader
        .fill_buf()
        .map(|b| b.starts_with(&[0x1f, 0x8b]))
        .map_err(|e| refuse(&path.display().to_string(), e.to_string()))?;
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    Ok(tar::Archive::new(reader))
}

type Entries<'a> = tar::Entries<'a, Box<dyn Read>>;

fn read_manifest(entries: &mut Entries<'_>) -> Result<(Manifest, Vec<StorageKey>), Refusal> {
    let mut first = match entries.next() {
        None => return Err(refuse(MANIFEST_NAME, "the bundle is empty")),
        Some(Err(e)) => return Err(refuse(MANIFEST_NAME, format!("not a bundle: {e}"))),
        Some(Ok(e)) => e,
    };
    let path = String::from_utf8_lossy(&first.path_bytes()).into_owned();
    if path != MANIFEST_NAME {
        return Err(refuse(
            &path,
            "the bundle does not start with manifest.json",
        ));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(refuse(MANIFEST_NAME, "too large"));
    }
    let mut raw = Vec::with_capacity(first.size() as usize);
    first
        .read_to_end(&mut raw)
        .map_err(|e| refuse(MANIFEST_NAME, format!("truncated: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| refuse(MANIFEST_NAME, format!("not a bundle manifest: {e}")))?;
    let keys = manifest.check()?;
    Ok((manifest, keys))
}

/// The next entry, which must be `expected`.
fn next_entry<'a>(
    entries: &mut Entries<'a>,
    expected: &bundle::Entry,
) -> Result<tar::Entry<'a, Box<dyn Read>>, Refusal> {
    let entry = match entries.next() {
        None => {
            return Err(refuse(
                &expected.path,
                "the bundle ends before this entry (truncated)",
            ));
        }
        Some(Err(e)) => return Err(refuse(&expected.path, format!("unreadable: {e}"))),
        Some(Ok(e)) => e,
    };
    let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if path != expected.path {
        return Err(refuse(
            &path,
            format!("the manifest lists {} here", expected.path),
        ));
    }
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(refuse(&path, "not a regular file"));
    }
    if entry.size() != expected.size {
        return Err(refuse(
            &path,
            format!(
                "{} bytes, the manifest says {}",
                entry.size(),
                expected.size
            ),
        ));
    }
    Ok(entry)
}

/// Reads an entry whole into `sink`, hashing it; refuses short reads and a hash that is not
/// the manifest's.
fn copy_checked(
    entry: &mut impl Read,
    expected: &bundle::Entry,
    mut sink: impl Write,
) -> Result<(), Refusal> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| refuse(&expected.path, format!("truncated: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n])
            .map_err(|e| refuse(&expected.path, format!("cannot stage: {e}")))?;
        total += n as u64;
    }
    if total != expected.size {
        return Err(refuse(
            &expected.path,
            format!("truncated: {total} of {} bytes", expected.size),
        ));
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(&expected.sha256) {
        return Err(refuse(
            &expected.path,
            format!("sha256 {actual} is not the manifest's {}", expected.sha256),
        ));
    }
    Ok(())
}

/// Pass one: every entry against the manifest, then every release offline. Writes nothing.
fn verify(path: &Path) -> Result<(Manifest, Vec<StorageKey>, BTreeSet<StorageKey>), Refusal> {
    let mut archive = open(path)?;
    let mut entries = archive
        .entries()
        .map_err(|e| refuse(MANIFEST_NAME, format!("not a bundle: {e}")))?;
    let (manifest, keys) = read_manifest(&mut entries)?;
    let mut verifier = Verifier::default();
    for (expected, key) in manifest.entries.iter().zip(&keys) {
        let mut entry = next_entry(&mut entries, expected)?;
        if bundle::is_document(key, expected.size) {
            let mut bytes = Vec::with_capacity(expected.size as usize);
            copy_checked(&mut entry, expected, &mut bytes)?;
            verifier.add(key.clone(), &expected.sha256, Some(bytes));
        } else {
            copy_checked(&mut entry, expected, io::sink())?;
            verifier.add(key.clone(), &expected.sha256, None);
        }
    }
    match entries.next() {
        None => {}
        Some(Ok(extra)) => {
            let path = String::from_utf8_lossy(&extra.path_bytes()).into_owned();
            return Err(refuse(&path, "not in the manifest"));
        }
        Some(Err(e)) => return Err(refuse("end of bundle", format!("unreadable: {e}"))),
    }
    let skip = verifier.finish()?;
    Ok((manifest, keys, skip))
}

/// Pass two: publish each entry the store does not hold yet.
fn publish(
    handle: &Handle,
    storage: &Storage,
    path: &Path,
    manifest: &Manifest,
    keys: &[StorageKey],
    skip: &BTreeSet<StorageKey>,
) -> Result<ImportReport, ImportError> {
    let interrupted = |r: Refusal| ImportError::Interrupted {
        entry: r.entry,
        reason: r.reason,
    };
    let mut report = ImportReport {
        source_hosts: manifest.source_hosts.clone(),
        ..Default::default()
    };
    let mut archive = open(path).map_err(interrupted)?;
    let mut entries = archive
        .entries()
        .map_err(|e| ImportError::Io(e.to_string()))?;
    read_manifest(&mut entries).map_err(interrupted)?;
    for (expected, key) in manifest.entries.iter().zip(keys) {
        let mut entry = next_entry(&mut entries, expected).map_err(interrupted)?;
        if skip.contains(key) {
            report.skipped += 1;
            continue;
        }
        let existing = handle
            .block_on(storage.meta(key))
            .map_err(|e| interrupted(refuse(&expected.path, e.to_string())))?;
        match existing {
            Some(m) if m.sha256.eq_ignore_ascii_case(&expected.sha256) => {
                report.already_present += 1;
                continue;
            }
            // A version list is the one mutable object: a newer one replaces an older one.
            Some(m) if key.leaf() == "versions.json" && m.fetched_at < expected.meta.fetched_at => {
            }
            Some(_) => {
                tracing::warn!(key = %key, "the store holds other bytes under this key; keeping them");
                report.kept_existing.push(key.to_string());
                continue;
            }
            None => {}
        }
        if expected.size <= SMALL_OBJECT {
            let mut bytes = Vec::with_capacity(expected.size as usize);
            copy_checked(&mut entry, expected, &mut bytes).map_err(interrupted)?;
            handle
                .block_on(storage.put_bytes(key, &bytes, &expected.meta))
                .map_err(|e| interrupted(refuse(&expected.path, e.to_string())))?;
        } else {
            let spool = spool_path(storage);
            let staged = (|| {
                let file = std::fs::File::create_new(&spool)
                    .map_err(|e| refuse(&expected.path, format!("cannot stage: {e}")))?;
                let mut out = io::BufWriter::with_capacity(1 << 20, file);
                copy_checked(&mut entry, expected, &mut out)?;
                let file = out
                    .into_inner()
                    .map_err(|e| refuse(&expected.path, format!("cannot stage: {e}")))?;
                file.sync_all()
                    .map_err(|e| refuse(&expected.path, format!("cannot stage: {e}")))
            })();
            if let Err(r) = staged {
                let _ = std::fs::remove_file(&spool);
                return Err(interrupted(r));
            }
            handle
                .block_on(storage.publish_file(key, &spool, &expected.meta))
                .map_err(|e| interrupted(refuse(&expected.path, e.to_string())))?;
        }
        report.imported += 1;
        report.bytes += expected.size;
    }
    Ok(report)
}

fn spool_path(storage: &Storage) -> PathBuf {
    storage
        .spool_dir()
        .join(format!("import-{}", uuid::Uuid::new_v4().simple()))
}
