//! `terrapeak warm`: fills the cache ahead of need through the same cache code the server
//! serves with (one verification path), item by item, and says how each went.

use super::progress::Progress;
use crate::cache::{
    Body, Cache, CacheError, CacheStatus, Links, ModuleRelease, ProviderFile, ProviderRelease,
    Want, keys,
};
use crate::registry::constraints::Constraints;
use crate::registry::module::ModuleVersions;
use crate::registry::provider::{ProviderDownload, ProviderVersions};
use crate::registry::selection::{self, ModuleNeeds, WantedModule, WantedProvider};
use crate::registry::{FileName, Host, ModuleAddress, Platform, Version};
use crate::storage::StorageKey;
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The base of the links the cache writes into answers during a warm; never sent anywhere.
const LINK_BASE: &str = "http://terrapeak.invalid";
/// How long a warm waits at the end for fills still publishing.
const PUBLISH_WAIT: Duration = Duration::from_secs(600);
/// Local module folders followed from one root, at most.
const MAX_LOCAL_MODULES: usize = 1000;
/// `.tf` bytes read from one module archive, at most.
const MAX_TF_BYTES: u64 = 64 << 20;

/// What to warm.
#[derive(Debug, Default)]
pub struct Selection {
    /// Providers named one by one (lock files, manifests): each resolved on its own.
    pub providers: Vec<WantedProvider>,
    /// Providers that modules require: one per provider, their constraints combined, as
    /// Terraform combines them.
    pub module_providers: Vec<WantedProvider>,
    pub modules: Vec<WantedModule>,
    /// Platforms for providers that name none (and have no lock-file hashes).
    pub default_platforms: Vec<Platform>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty() && self.modules.is_empty()
    }

    /// Adds a lock file's providers.
    pub fn add_lock_file(&mut self, path: &Path) -> Result<(), String> {
        let text = read_text(path)?;
        let found =
            selection::lock_file(&path.display().to_string(), &text).map_err(|e| e.to_string())?;
        self.providers.extend(found);
        Ok(())
    }

    /// Adds a manifest's providers and modules.
    pub fn add_manifest(&mut self, path: &Path) -> Result<(), String> {
        let text = read_text(path)?;
        let (p, m) =
            selection::manifest(&path.display().to_string(), &text).map_err(|e| e.to_string())?;
        self.providers.extend(p);
        self.modules.extend(m);
        Ok(())
    }

    /// Adds what a Terraform root module asks for: its `.tf` files and those of the local
    /// modules it calls (`source = "./..."`).
    pub fn add_root(&mut self, dir: &Path) -> Result<(), String> {
        let mut queue = VecDeque::from([dir.to_path_buf()]);
        let mut seen = HashSet::new();
        while let Some(dir) = queue.pop_front() {
            let canonical = dir
                .canonicalize()
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            if !seen.insert(canonical) {
                continue;
            }
            if seen.len() > MAX_LOCAL_MODULES {
                return Err(format!("{}: too many local modules", dir.display()));
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "tf") && p.is_file())
                .collect();
            files.sort();
            let mut needs = ModuleNeeds::default();
            for file in files {
                let text = read_text(&file)?;
                selection::tf_file(&file.display().to_string(), &text, &mut needs)
                    .map_err(|e| e.to_string())?;
            }
            self.module_providers.extend(needs.providers);
            self.modules.extend(needs.modules);
            queue.extend(needs.local_modules.iter().map(|l| dir.join(l)));
        }
        Ok(())
    }
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// How one item went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Downloaded, verified and kept now.
    Fetched,
    /// The store had it already.
    Present,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub kind: &'static str,
    /// `host/namespace/type version os_arch` or `host/namespace/name/system version`.
    pub item: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct WarmReport {
    pub items: Vec<Item>,
    /// Every stored object of the items that are in the store now (for `export`).
    #[serde(skip)]
    pub keys: BTreeSet<StorageKey>,
}

impl WarmReport {
    pub fn failed(&self) -> usize {
        self.items
            .iter()
            .filter(|i| i.outcome == Outcome::Failed)
            .count()
    }

    fn fail(&mut self, kind: &'static str, item: String, error: impl ToString) {
        self.items.push(Item {
            kind,
            item,
            outcome: Outcome::Failed,
            error: Some(error.to_string()),
            pinned: false,
        });
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub jobs: usize,
    pub pin: bool,
}

/// Warms everything `selection` asks for. Modules first (their archives may ask for more
/// modules and providers), then providers, `jobs` items at a time.
pub async fn warm(
    cache: &Arc<Cache>,
    selection: Selection,
    opts: Options,
    progress: &Progress,
) -> WarmReport {
    let mut report = WarmReport::default();
    let jobs = opts.jobs.max(1);
    let mut module_providers = selection.module_providers;

    // Modules, breadth first through the registry modules each archive calls.
    let mut queue: Vec<WantedModule> = selection.modules;
    let mut seen: HashSet<(Host, ModuleAddress, String)> = HashSet::new();
    let mut module_checks = Vec::new();
    while !queue.is_empty() {
        let wave = std::mem::take(&mut queue);
        progress.grow(wave.len());
        let results: Vec<_> = futures_util::stream::iter(wave)
            .map(|want| {
                let cache = cache.clone();
                async move { warm_module(&cache, want, opts.pin).await }
            })
            .buffer_unordered(jobs)
            .collect()
            .await;
        for (item, keys, needs) in results {
            progress.done(&item);
            let is_new = match &item.outcome {
                Outcome::Failed => true,
                _ => seen.insert(needs.id.clone()),
            };
            if is_new {
                if item.outcome != Outcome::Failed {
                    module_checks.push((report.items.len(), keys.clone()));
                }
                report.keys.extend(keys);
                report.items.push(item);
                module_providers.extend(needs.providers);
                queue.extend(needs.modules);
            }
        }
    }

    // Providers: one entry per provider, constraints from every module combined.
    let mut merged: BTreeMap<(String, String), WantedProvider> = BTreeMap::new();
    for p in module_providers {
        let id = (p.host.to_string(), p.name.to_string());
        match merged.get_mut(&id) {
            Some(m) => {
                m.constraints = std::mem::take(&mut m.constraints).and(&p.constraints);
                for pl in p.platforms {
                    if !m.platforms.contains(&pl) {
                        m.platforms.push(pl);
                    }
                }
                m.zh_hashes.extend(p.zh_hashes);
            }
            None => {
                merged.insert(id, p);
            }
        }
    }
    let mut releases = Vec::new();
    let mut planned = HashSet::new();
    for want in selection.providers.into_iter().chain(merged.into_values()) {
        match plan_provider(cache, &want, &selection.default_platforms).await {
            Ok(rs) => releases.extend(rs.into_iter().filter(|r| planned.insert(r.to_string()))),
            Err(e) => {
                progress.grow(1);
                let item = format!(
                    "{}/{} ({})",
                    want.host,
                    want.name,
                    describe(&want.constraints)
                );
                report.fail("provider", item.clone(), e);
                progress.done(report.items.last().expect("just pushed"));
            }
        }
    }
    progress.grow(releases.len());
    let results: Vec<_> = futures_util::stream::iter(releases)
        .map(|r| {
            let cache = cache.clone();
            async move { warm_provider(&cache, r, opts.pin).await }
        })
        .buffer_unordered(jobs)
        .collect()
        .await;
    let mut checks = Vec::new();
    for (item, keys) in results {
        progress.done(&item);
        if item.outcome != Outcome::Failed {
            checks.push((report.items.len(), keys.clone()));
        }
        report.keys.extend(keys);
        report.items.push(item);
    }

    // Fills publish after their last byte went out: wait for them, then make sure each item
    // is really in the store.
    cache.finish_fills(PUBLISH_WAIT).await;
    for (index, keys) in checks {
        for key in keys.iter().filter(|k| k.leaf().ends_with(".zip")) {
            if !matches!(cache.storage().meta(key).await, Ok(Some(_))) {
                let item = &mut report.items[index];
                item.outcome = Outcome::Failed;
                item.error = Some("verified, but the store did not keep it".into());
            }
        }
    }
    for (index, keys) in module_checks {
        let folder = keys[0].parent();
        let stored = cache.storage().list(folder).await.unwrap_or_default();
        if !stored
            .iter()
            .any(|k| crate::cache::is_archive_leaf(k.leaf()))
        {
            let item = &mut report.items[index];
            item.outcome = Outcome::Failed;
            item.error = Some("served, but the store did not keep its archive".into());
        }
        report.keys.extend(stored);
    }
    report
}

fn describe(c: &Constraints) -> String {
    c.to_string()
}

/// The releases (one per platform) a wanted provider resolves to.
async fn plan_provider(
    cache: &Cache,
    want: &WantedProvider,
    default_platforms: &[Platform],
) -> Result<Vec<ProviderRelease>, String> {
    let served = cache
        .provider_versions(&want.host, &want.name)
        .await
        .map_err(|e| e.to_string())?;
    let Body::Bytes(data) = served.body else {
        return Err("version list is not in memory".into());
    };
    let doc: ProviderVersions = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
    let version = want
        .constraints
        .newest(doc.versions.iter().map(|v| v.version.as_str()))
        .ok_or_else(|| "no version meets the constraints".to_owned())?;
    let entry = doc
        .versions
        .iter()
        .find(|v| {
            crate::registry::constraints::SemVer::parse(&v.version).as_ref() == Some(&version)
        })
        .expect("chosen from this list");
    let version = Version::try_from(entry.version.as_str()).map_err(|e| e.to_string())?;
    let offered: Vec<Platform> = entry
        .extra
        .get("platforms")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Platform::parse(&format!(
                "{}_{}",
                p.get("os")?.as_str()?,
                p.get("arch")?.as_str()?
            ))
            .ok()
        })
        .collect();
    let release = |platform: Platform| ProviderRelease {
        host: want.host.clone(),
        name: want.name.clone(),
        version: version.clone(),
        platform,
    };
    if !want.zh_hashes.is_empty() {
        // The lock file's zh: hashes are the zips' sha256: the platforms are those whose
        // download answer carries one of them.
        let wanted: HashSet<&str> = want.zh_hashes.iter().map(String::as_str).collect();
        let links = Links::new(LINK_BASE, None);
        let mut out = Vec::new();
        for platform in offered {
            let r = release(platform);
            let served = cache
                .provider_download(&r, &links)
                .await
                .map_err(|e| format!("{r}: {e}"))?;
            let Body::Bytes(data) = served.body else {
                continue;
            };
            let doc: ProviderDownload = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
            if wanted.contains(doc.shasum.trim().to_ascii_lowercase().as_str()) {
                out.push(r);
            }
        }
        if out.is_empty() {
            return Err(format!(
                "{version}: no platform has a zip with the lock file's zh: hashes"
            ));
        }
        return Ok(out);
    }
    let platforms = if want.platforms.is_empty() {
        default_platforms
    } else {
        &want.platforms
    };
    Ok(platforms.iter().cloned().map(release).collect())
}

/// Drains a served body; returns the bytes read.
async fn drain(body: Body, mut to: Option<&mut tokio::fs::File>) -> Result<u64, String> {
    let n = match body {
        Body::Empty => 0,
        Body::Bytes(b) => {
            if let Some(f) = to.as_mut() {
                tokio::io::AsyncWriteExt::write_all(*f, &b)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            b.len() as u64
        }
        Body::Stream(mut s) => {
            let mut n = 0;
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                if let Some(f) = to.as_mut() {
                    tokio::io::AsyncWriteExt::write_all(*f, &chunk)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                n += chunk.len() as u64;
            }
            n
        }
    };
    // Tokio's file writes in the background: the last one may still be on its way to the file
    // (which is read next, from another thread) until flush says it has landed.
    if let Some(f) = to {
        tokio::io::AsyncWriteExt::flush(f)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}

fn outcome_of(status: CacheStatus) -> Result<Outcome, String> {
    match status {
        CacheStatus::Hit => Ok(Outcome::Present),
        CacheStatus::Miss | CacheStatus::Stale => Ok(Outcome::Fetched),
        CacheStatus::Pass => Err("served, but the store is failing and did not keep it".into()),
    }
}

async fn warm_provider(cache: &Cache, r: ProviderRelease, pin: bool) -> (Item, Vec<StorageKey>) {
    let item = r.to_string();
    let result: Result<(Outcome, Vec<StorageKey>), String> = async {
        let links = Links::new(LINK_BASE, None);
        let served = cache
            .provider_download(&r, &links)
            .await
            .map_err(|e| e.to_string())?;
        let Body::Bytes(data) = served.body else {
            return Err("download answer is not in memory".into());
        };
        let doc: ProviderDownload = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
        let zip = FileName::try_from(doc.filename.as_str()).map_err(|e| e.to_string())?;
        let file = ProviderFile::Zip(zip.clone());
        let served = cache
            .provider_artifact(&r, &file, Want::Body, None)
            .await
            .map_err(|e: CacheError| e.to_string())?;
        let outcome = outcome_of(served.status)?;
        drain(served.body, None).await?;
        let mut keys = vec![
            keys::provider_versions(&r.host, &r.name),
            keys::provider_download(&r),
            keys::provider_file(&r, &file),
            keys::provider_file(&r, &ProviderFile::Sums),
        ];
        if doc.signature_url().is_some() {
            keys.push(keys::provider_file(&r, &ProviderFile::Signature));
        }
        let h1 = keys::provider_h1(&r, &zip);
        if matches!(cache.storage().meta(&h1).await, Ok(Some(_))) {
            keys.push(h1);
        }
        if pin {
            write_pin(cache, &keys::provider_pin(&r)).await?;
        }
        Ok((outcome, keys))
    }
    .await;
    settle("provider", item, pin, result)
}

/// An item's report from how it went.
fn settle(
    kind: &'static str,
    item: String,
    pin: bool,
    result: Result<(Outcome, Vec<StorageKey>), String>,
) -> (Item, Vec<StorageKey>) {
    match result {
        Ok((outcome, keys)) => (
            Item {
                kind,
                item,
                outcome,
                error: None,
                pinned: pin,
            },
            keys,
        ),
        Err(e) => (
            Item {
                kind,
                item,
                outcome: Outcome::Failed,
                error: Some(e),
                pinned: false,
            },
            Vec::new(),
        ),
    }
}

/// Stores a pin mark: eviction keeps pinned units, on every replica.
async fn write_pin(cache: &Cache, key: &StorageKey) -> Result<(), String> {
    cache
        .set_pin(key, true, "warm")
        .await
        .map_err(|e| format!("pin not stored: {e}"))
}

/// What a module's archive asked for, and which module version it was.
struct Found {
    id: (Host, ModuleAddress, String),
    providers: Vec<WantedProvider>,
    modules: Vec<WantedModule>,
}

async fn warm_module(
    cache: &Cache,
    want: WantedModule,
    pin: bool,
) -> (Item, Vec<StorageKey>, Found) {
    let mut found = Found {
        id: (want.host.clone(), want.module.clone(), String::new()),
        providers: Vec::new(),
        modules: Vec::new(),
    };
    let mut label = format!(
        "{}/{} ({})",
        want.host,
        want.module,
        describe(&want.constraints)
    );
    let result: Result<(Outcome, Vec<StorageKey>), String> = async {
        let served = cache
            .module_versions(&want.host, &want.module)
            .await
            .map_err(|e| e.to_string())?;
        let Body::Bytes(data) = served.body else {
            return Err("version list is not in memory".into());
        };
        let doc: ModuleVersions = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
        let listed: Vec<&str> = doc
            .modules
            .iter()
            .flat_map(|m| m.versions.iter().map(|v| v.version.as_str()))
            .collect();
        let chosen = want
            .constraints
            .newest(listed.iter().copied())
            .ok_or_else(|| "no version meets the constraints".to_owned())?;
        let version_str = listed
            .iter()
            .find(|v| crate::registry::constraints::SemVer::parse(v).as_ref() == Some(&chosen))
            .expect("chosen from this list");
        let version = Version::try_from(*version_str).map_err(|e| e.to_string())?;
        let r = ModuleRelease {
            host: want.host.clone(),
            module: want.module.clone(),
            version,
        };
        label = r.to_string();
        found.id.2 = r.version.to_string();
        let links = Links::new(LINK_BASE, None);
        let answer = cache
            .module_download(&r, &links)
            .await
            .map_err(|e| e.to_string())?;
        let ours = format!(
            "{LINK_BASE}/artifacts/{}",
            keys::module_artifact_path(&r, "")
        );
        let rest = answer.location.strip_prefix(&ours).ok_or_else(|| {
            format!(
                "its source {} cannot be cached by TerraPeak",
                answer.location
            )
        })?;
        let (file, subdir) = match rest.split_once("//") {
            Some((f, s)) => (f.to_owned(), Some(s.to_owned())),
            None => (rest.to_owned(), None),
        };
        let served = cache
            .module_artifact(&r, &file, Want::Body, None)
            .await
            .map_err(|e| e.to_string())?;
        let outcome = outcome_of(served.status)?;
        let spool = cache
            .storage()
            .spool_dir()
            .join(format!("warm-{}", uuid::Uuid::new_v4().simple()));
        let mut out = tokio::fs::File::create_new(&spool)
            .await
            .map_err(|e| e.to_string())?;
        let drained = drain(served.body, Some(&mut out)).await;
        drop(out);
        let needs = match drained {
            Ok(_) => {
                let path = spool.clone();
                let zip = file.ends_with(".zip");
                tokio::task::spawn_blocking(move || archive_needs(&path, zip, subdir.as_deref()))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            }
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&spool).await;
        let needs = needs?;
        found.providers = needs.providers;
        found.modules = needs.modules;
        // The rest of this module version's objects (git resolution, archive) are listed once
        // its fill has published.
        let keys = vec![
            keys::module_file(&r, "location.json"),
            keys::module_versions(&r.host, &r.module),
        ];
        if pin {
            write_pin(cache, &keys::module_pin(&r)).await?;
        }
        Ok((outcome, keys))
    }
    .await;
    let (item, keys) = settle("module", label, pin, result);
    (item, keys, found)
}

/// The registry modules and providers a module archive's `.tf` files ask for: those in the
/// module's folder (`subdir`, `*` for the single top folder) and in the local modules it calls.
fn archive_needs(path: &Path, zip: bool, subdir: Option<&str>) -> Result<ModuleNeeds, String> {
    let files = if zip {
        zip_tf_files(path)?
    } else {
        tar_gz_tf_files(path)?
    };
    let mut dir = subdir.unwrap_or("").trim_matches('/').to_owned();
    if dir == "*" || dir.starts_with("*/") {
        let tops: BTreeSet<&str> = files
            .keys()
            .filter_map(|d| d.split('/').next())
            .filter(|d| !d.is_empty())
            .collect();
        let top = tops.into_iter().next().unwrap_or("").to_owned();
        dir = format!("{top}{}", &dir[1..]);
    }
    let mut out = ModuleNeeds::default();
    let mut queue = VecDeque::from([dir]);
    let mut seen = HashSet::new();
    while let Some(dir) = queue.pop_front() {
        if !seen.insert(dir.clone()) || seen.len() > MAX_LOCAL_MODULES {
            continue;
        }
        let mut needs = ModuleNeeds::default();
        for (name, text) in files.get(&dir).into_iter().flatten() {
            // A file TerraPeak cannot read does not stop the warm; Terraform will say more.
            if let Err(e) = selection::tf_file(name, text, &mut needs) {
                tracing::warn!(file = %name, error = %e, "cannot read a module file; its dependencies are not warmed");
            }
        }
        out.providers.extend(needs.providers);
        out.modules.extend(needs.modules);
        for local in needs.local_modules {
            queue.push_back(join_archive_path(&dir, &local));
        }
    }
    Ok(out)
}

/// `dir` joined with a relative `./x` or `../x`, inside the archive.
fn join_archive_path(dir: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for seg in rel.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

type TfFiles = BTreeMap<String, Vec<(String, String)>>;

fn add_tf(files: &mut TfFiles, total: &mut u64, path: &str, text: String) -> Result<(), String> {
    *total += text.len() as u64;
    if *total > MAX_TF_BYTES {
        return Err("the archive holds too many .tf bytes".into());
    }
    let path = path.trim_start_matches("./");
    let (dir, _) = path.rsplit_once('/').unwrap_or(("", path));
    files
        .entry(dir.to_owned())
        .or_default()
        .push((path.to_owned(), text));
    Ok(())
}

fn tar_gz_tf_files(path: &Path) -> Result<TfFiles, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut files = TfFiles::new();
    let mut total = 0;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if !name.ends_with(".tf") || entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let mut text = String::new();
        if entry.read_to_string(&mut text).is_ok() {
            add_tf(&mut files, &mut total, &name, text)?;
        }
    }
    Ok(files)
}

fn zip_tf_files(path: &Path) -> Result<TfFiles, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| e.to_string())?;
    let mut files = TfFiles::new();
    let mut total = 0;
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).map_err(|e| e.to_string())?;
        let Ok(name) = f.name().map(|n| n.into_owned()) else {
            continue;
        };
        if !name.ends_with(".tf") || !f.is_file() {
            continue;
        }
        let mut text = String::new();
        if f.read_to_string(&mut text).is_ok() {
            add_tf(&mut files, &mut total, &name, text)?;
        }
    }
    Ok(files)
}

/// The platform this TerraPeak runs on, as Terraform names it: warmed for providers that name
/// no platform.
pub fn this_platform() -> Platform {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        other => other,
    };
    Platform::parse(&format!("{os}_{arch}"))
        .unwrap_or_else(|_| Platform::parse("linux_amd64").expect("a valid platform"))
}
