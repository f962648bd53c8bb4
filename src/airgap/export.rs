//! `terrapeak export`: stored objects into one streamed bundle file, or into Terraform's own
//! filesystem-mirror layout.

use super::bundle::{Entry, FORMAT, MANIFEST_NAME, Manifest, OBJECTS_DIR};
use crate::registry::provider::ProviderDownload;
use crate::storage::{Storage, StorageKey, unix_now};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tokio::runtime::Handle;

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub objects: usize,
    pub bytes: u64,
    pub source_hosts: Vec<String>,
}

/// Bundle compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Gzip,
}

/// Orders keys so that, within each release, the documents come before the artifacts they
/// describe (download answers, signature, SHA256SUMS, then zips).
pub fn bundle_order(keys: &mut [StorageKey]) {
    fn rank(k: &StorageKey) -> u8 {
        match k.leaf() {
            _ if k.parent().ends_with("/download") => 0,
            "versions.json" | "location.json" | "git-ref.json" => 0,
            "SHA256SUMS.sig" => 1,
            "SHA256SUMS" => 2,
            _ => 3,
        }
    }
    keys.sort_by(|a, b| {
        let dir = |k: &StorageKey| k.parent().trim_end_matches("/download").to_owned();
        dir(a)
            .cmp(&dir(b))
            .then(rank(a).cmp(&rank(b)))
            .then(a.cmp(b))
    });
}

/// Writes `keys` (with their sidecars) into a bundle at `out`: written to a temporary file
/// beside it and renamed into place when complete, so a failed export leaves no bundle.
pub async fn write_bundle(
    storage: &Storage,
    mut keys: Vec<StorageKey>,
    out: &Path,
    compression: Compression,
) -> Result<ExportReport, String> {
    bundle_order(&mut keys);
    let mut entries = Vec::with_capacity(keys.len());
    let mut hosts = BTreeSet::new();
    for key in &keys {
        let meta = storage
            .meta(key)
            .await
            .map_err(|e| format!("{key}: {e}"))?
            .ok_or_else(|| format!("{key}: not stored"))?;
        if let Some(host) = key.as_str().split('/').nth(1) {
            hosts.insert(host.to_owned());
        }
        entries.push(Entry {
            path: format!("{OBJECTS_DIR}{key}"),
            size: meta.size,
            sha256: meta.sha256.clone(),
            meta,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        terrapeak_version: env!("CARGO_PKG_VERSION").into(),
        created_at: unix_now(),
        source_hosts: hosts.into_iter().collect(),
        entries,
    };
    let report = ExportReport {
        objects: manifest.entries.len(),
        bytes: manifest.entries.iter().map(|e| e.size).sum(),
        source_hosts: manifest.source_hosts.clone(),
    };
    let tmp = temp_beside(out);
    let storage = storage.clone();
    let handle = Handle::current();
    let tmp_for_task = tmp.clone();
    let written = tokio::task::spawn_blocking(move || {
        write_tar(&handle, &storage, &manifest, &tmp_for_task, compression)
    })
    .await
    .map_err(|e| e.to_string())?;
    match written.and_then(|()| std::fs::rename(&tmp, out).map_err(|e| e.to_string())) {
        Ok(()) => Ok(report),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn temp_beside(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    out.with_file_name(format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple()))
}

fn write_tar(
    handle: &Handle,
    storage: &Storage,
    manifest: &Manifest,
    path: &Path,
    compression: Compression,
) -> Result<(), String> {
    let file = std::fs::File::create_new(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let buffered = io::BufWriter::with_capacity(1 << 20, file);
    let sink = match compression {
        Compression::None => Sink::Plain(buffered),
        Compression::Gzip => Sink::Gzip(Box::new(flate2::write::GzEncoder::new(
            buffered,
            flate2::Compression::fast(),
        ))),
    };
    let mut tar = tar::Builder::new(sink);
    tar.mode(tar::HeaderMode::Deterministic);
    let json = serde_json::to_vec(manifest).map_err(|e| e.to_string())?;
    append(&mut tar, MANIFEST_NAME, json.len() as u64, &json[..])?;
    for entry in &manifest.entries {
        let key = super::bundle::entry_key(&entry.path).map_err(|e| e.to_string())?;
        let stream = handle.block_on(async {
            let obj = storage
                .open(&key)
                .await
                .map_err(|e| format!("{key}: {e}"))?
                .ok_or_else(|| format!("{key}: vanished from the store during the export"))?;
            obj.stream(0, entry.size)
                .await
                .map_err(|e| format!("{key}: {e}"))
        })?;
        let mut reader = StreamReader {
            handle,
            stream,
            chunk: Bytes::new(),
            hasher: Sha256::new(),
        };
        append(&mut tar, &entry.path, entry.size, &mut reader)?;
        let actual = hex::encode(reader.hasher.finalize());
        if actual != entry.sha256 {
            return Err(format!(
                "{key}: stored bytes do not match their sidecar's sha256; not exported"
            ));
        }
    }
    let sink = tar.into_inner().map_err(|e| e.to_string())?;
    sink.finish()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The bundle file, compressed or not.
enum Sink {
    Plain(io::BufWriter<std::fs::File>),
    Gzip(Box<flate2::write::GzEncoder<io::BufWriter<std::fs::File>>>),
}

impl Sink {
    /// Writes what is buffered (and the gzip trailer) and syncs the file.
    fn finish(self) -> io::Result<()> {
        let buffered = match self {
            Sink::Plain(b) => b,
            Sink::Gzip(g) => g.finish()?,
        };
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
        }
    }
}

fn append<W: Write, R: Read>(
    tar: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    data: R,
) -> Result<(), String> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(0);
    tar.append_data(&mut header, path, data)
        .map_err(|e| format!("{path}: {e}"))
}

/// A stored object's byte stream as a blocking reader, hashing what it reads.
struct StreamReader<'a> {
    handle: &'a Handle,
    stream: BoxStream<'static, io::Result<Bytes>>,
    chunk: Bytes,
    hasher: Sha256,
}

impl Read for StreamReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                Some(chunk) => self.chunk = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.hasher.update(&buf[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// Writes the provider zips among `keys` into `dir` in Terraform's packed filesystem-mirror
/// layout: `{host}/{namespace}/{type}/terraform-provider-{type}_{version}_{os}_{arch}.zip`.
/// Each zip is written to a temporary name and renamed when complete.
pub async fn write_filesystem_mirror(
    storage: &Storage,
    keys: &[StorageKey],
    dir: &Path,
) -> Result<ExportReport, String> {
    let mut report = ExportReport {
        objects: 0,
        bytes: 0,
        source_hosts: Vec::new(),
    };
    let mut hosts = BTreeSet::new();
    for key in keys {
        // providers/{host}/{ns}/{type}/{version}/download/{os}_{arch}.json
        let parts: Vec<&str> = key.as_str().split('/').collect();
        let [
            "providers",
            host,
            ns,
            provider_type,
            version,
            "download",
            platform,
        ] = parts[..]
        else {
            continue;
        };
        let Some((_, doc)) = storage.get_bytes(key).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let doc: ProviderDownload =
            serde_json::from_slice(&doc).map_err(|e| format!("{key}: {e}"))?;
        let zip_key = StorageKey::parse(&format!(
            "{}/{}",
            key.parent().trim_end_matches("/download"),
            doc.filename
        ))
        .ok_or_else(|| format!("{key}: unusable file name {:?}", doc.filename))?;
        let Some(obj) = storage.open(&zip_key).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let platform = platform.trim_end_matches(".json");
        let folder = dir.join(host).join(ns).join(provider_type);
        tokio::fs::create_dir_all(&folder)
            .await
            .map_err(|e| format!("{}: {e}", folder.display()))?;
        let target = folder.join(format!(
            "terraform-provider-{provider_type}_{version}_{platform}.zip"
        ));
        let tmp = temp_beside(&target);
        let expected = obj.meta.sha256.clone();
        let size = obj.meta.size;
        let result = async {
            let mut out = tokio::fs::File::create_new(&tmp)
                .await
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            let mut stream = obj.stream(0, size).await.map_err(|e| e.to_string())?;
            let mut hasher = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| format!("{zip_key}: {e}"))?;
                hasher.update(&chunk);
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                    .await
                    .map_err(|e| format!("{}: {e}", tmp.display()))?;
            }
            tokio::io::AsyncWriteExt::flush(&mut out)
                .await
                .map_err(|e| e.to_string())?;
            out.sync_all().await.map_err(|e| e.to_string())?;
            if hex::encode(hasher.finalize()) != expected {
                return Err(format!("{zip_key}: stored bytes do not match their sha256"));
            }
            tokio::fs::rename(&tmp, &target)
                .await
                .map_err(|e| format!("{}: {e}", target.display()))
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        hosts.insert(host.to_owned());
        report.objects += 1;
        report.bytes += size;
    }
    report.source_hosts = hosts.into_iter().collect();
    Ok(report)
}
