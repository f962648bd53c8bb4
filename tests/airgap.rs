//! Air-gapped networks: `warm` on a connected TerraPeak, `export` a bundle, `import` it into a
//! sealed TerraPeak (`cache.offline`) that never contacts an upstream, and serve from it.
//! Tampered bundles are refused and leave nothing behind.

mod common;

use common::{FakeOptions, FakeUpstream, NS, Proxy, Scrape, TYPE, config_for};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use terrapeak::airgap::{self, SelectionArgs, bundle, export, import, progress::Progress, warm};
use terrapeak::config::Config;

const MANIFEST: &str = "providers:
  - source: testns/demo
    version: '~> 1.0'
    platforms: [linux_amd64, darwin_arm64]
modules:
  - source: testns/nestedprovider/aws
    version: '1.0.0'
  - source: testns/gittag/aws
";

/// Runs the binary with `config` (written to a file; the S3 keys, which a written
/// configuration masks, go in the environment).
fn run(dir: &Path, config: &Config, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let cfg = write(dir, "cfg.yml", &serde_yaml::to_string(config).unwrap());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_terrapeak"));
    cmd.args(args).arg("-c").arg(cfg);
    let s3 = &config.storage.minio;
    if let (Some(a), Some(k)) = (s3.access_key.expose(), s3.secret_key.expose()) {
        cmd.env("TERRAPEAK_STORAGE__MINIO__ACCESS_KEY", a)
            .env("TERRAPEAK_STORAGE__MINIO__SECRET_KEY", k);
    }
    cmd.output().unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn warm_with(config: &Config, select: SelectionArgs) -> warm::WarmReport {
    let cache = airgap::open(config).await.unwrap();
    let selection = select.read().unwrap();
    let report = warm::warm(
        &cache,
        selection,
        warm::Options { jobs: 3, pin: true },
        &Progress::new(false),
    )
    .await;
    cache.storage().discard_spool().await;
    report
}

fn manifest_select(dir: &Path, text: &str) -> SelectionArgs {
    SelectionArgs {
        manifests: vec![write(dir, "warm.yaml", text)],
        ..Default::default()
    }
}

/// Connected side: warms the manifest into `data` and exports everything to `bundle`.
async fn connected_bundle(upstream: &FakeUpstream, work: &Path, data: &Path, bundle: &Path) {
    let config = config_for(upstream, data);
    let report = warm_with(&config, manifest_select(work, MANIFEST)).await;
    assert_eq!(report.failed(), 0, "{:#?}", report.items);
    let cache = airgap::open(&config).await.unwrap();
    let keys = airgap::everything(&cache).await.unwrap();
    export::write_bundle(cache.storage(), keys, bundle, export::Compression::Gzip)
        .await
        .unwrap();
}

/// The sealed side's configuration: a fresh store, offline, and an upstream nobody listens on.
fn sealed_config(upstream: &FakeUpstream, data: &Path) -> Config {
    let mut config = config_for(upstream, data);
    config.upstream.base_url = Some("http://127.0.0.1:9".into());
    config.cache.offline = true;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reports_every_item_follows_nested_modules_and_pins() {
    let upstream = FakeUpstream::start(FakeOptions::default()).await;
    let work = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = config_for(&upstream, data.path());
    let report = warm_with(&config, manifest_select(work.path(), MANIFEST)).await;
    let items: Vec<(String, warm::Outcome)> = report
        .items
        .iter()
        .map(|i| (i.item.clone(), i.outcome))
        .collect();
    use warm::Outcome::Fetched;
    let host = "registry.terraform.io";
    for want in [
        format!("{host}/{NS}/nestedprovider/aws 1.0.0"),
        format!("{host}/{NS}/gittag/aws 1.0.0"),
        // Called by the nested module through its local module.
        format!("{host}/{NS}/archive/aws 1.0.0"),
        // `~> 1.0` from the manifest: the newest, 1.1.0, on its two platforms.
        format!("{host}/{NS}/{TYPE} 1.1.0 linux_amd64"),
        format!("{host}/{NS}/{TYPE} 1.1.0 darwin_arm64"),
        // `>= 1.0, < 1.1` from the nested module, on this machine's platform.
        format!("{host}/{NS}/{TYPE} 1.0.0 {}", warm::this_platform()),
    ] {
        assert!(
            items.contains(&(want.clone(), Fetched)),
            "{want} in {items:#?}"
        );
    }
    assert_eq!(items.len(), 6, "{items:#?}");
    assert!(report.items.iter().all(|i| i.pinned));
    let pins = airgap::open(&config).await.unwrap();
    let pins = pins.storage().list("pins").await.unwrap();
    assert_eq!(pins.len(), 6, "{pins:?}");

    // Again: everything is present, nothing is fetched from upstream.
    let before = upstream.total_hits();
    let again = warm_with(&config, manifest_select(work.path(), MANIFEST)).await;
    assert!(
        again
            .items
            .iter()
            .all(|i| i.outcome == warm::Outcome::Present),
        "{:#?}",
        again.items
    );
    let zip_path = upstream.zip_path("1.1.0", "linux", "amd64");
    assert_eq!(upstream.hits(&zip_path), 1);
    // Version lists are still fresh: no upstream request at all.
    assert_eq!(upstream.total_hits(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_item_does_not_stop_the_others_and_the_status_says_so() {
    let upstream = FakeUpstream::start(FakeOptions::default()).await;
    let work = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = config_for(&upstream, data.path());
    let manifest = "providers:
  - source: testns/demo
    version: '9.0.0'
  - source: testns/nosuch
  - source: testns/demo
    version: '1.0.0'
    platforms: [windows_amd64]
modules:
  - source: testns/ssh/aws
  - source: testns/archive/aws
";
    // Through the binary: the exit status and the JSON report.
    let m = write(work.path(), "m.yaml", manifest);
    let out = run(
        work.path(),
        &config,
        &[
            "warm".as_ref(),
            "--json".as_ref(),
            "--manifest".as_ref(),
            m.as_os_str(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = report["items"].as_array().unwrap();
    let outcome = |needle: &str| {
        items
            .iter()
            .find(|i| i["item"].as_str().unwrap().contains(needle))
            .map(|i| {
                (
                    i["outcome"].as_str().unwrap().to_owned(),
                    i["error"].clone(),
                )
            })
            .unwrap_or_else(|| panic!("{needle} not in {items:#?}"))
    };
    assert_eq!(outcome("demo 1.0.0 windows_amd64").0, "fetched");
    assert_eq!(outcome("archive/aws 1.0.0").0, "fetched");
    let (o, e) = outcome("nosuch");
    assert_eq!(o, "failed");
    assert!(e.as_str().unwrap().contains("not found"), "{e}");
    let (o, e) = outcome("demo (");
    assert_eq!(o, "failed");
    assert!(e.as_str().unwrap().contains("no version meets"), "{e}");
    let (o, e) = outcome("ssh/aws");
    assert_eq!(o, "failed");
    assert!(e.as_str().unwrap().contains("cannot be cached"), "{e}");
    assert_eq!(items.len(), 5);
    // The windows zip went through the same verification as serving and is stored.
    let (_, zip) = upstream.zip("1.0.0", "windows", "amd64");
    let stored = Proxy::start_in(&upstream, data, |_| {}).await;
    let (url, _, _) = stored.handed_out("1.0.0", "windows", "amd64").await;
    let got = reqwest::get(&url).await.unwrap();
    assert_eq!(common::cache_status(&got).as_deref(), Some("HIT"));
    assert_eq!(got.bytes().await.unwrap(), zip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_terrapeak_serves_an_imported_bundle_and_never_asks_upstream() {
    let upstream = FakeUpstream::start(FakeOptions::default()).await;
    let work = tempfile::tempdir().unwrap();
    let connected = tempfile::tempdir().unwrap();
    let bundle_path = work.path().join("enclave.tar.gz");
    // Only 1.0.0 goes across, although upstream has 1.1.0.
    let config = config_for(&upstream, connected.path());
    let report = warm_with(
        &config,
        manifest_select(
            work.path(),
            "providers:\n  - source: testns/demo\n    version: '1.0.0'\n    platforms: [linux_amd64, darwin_arm64]\nmodules:\n  - source: testns/gittag/aws\n  - source: testns/archive/aws\n",
        ),
    )
    .await;
    assert_eq!(report.failed(), 0, "{:#?}", report.items);
    let out = run(
        work.path(),
        &config,
        &[
            "export".as_ref(),
            "--all".as_ref(),
            "--compress".as_ref(),
            "gzip".as_ref(),
            "--out".as_ref(),
            bundle_path.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("exported"));

    let sealed_dir = tempfile::tempdir().unwrap();
    let sealed = sealed_config(&upstream, sealed_dir.path());
    let cache = airgap::open(&sealed).await.unwrap();
    let first = import::import_bundle(cache.storage(), &bundle_path)
        .await
        .unwrap();
    assert!(first.imported > 5, "{first:?}");
    assert_eq!(first.already_present, 0);
    // Importing twice is harmless.
    let second = import::import_bundle(cache.storage(), &bundle_path)
        .await
        .unwrap();
    assert_eq!(
        (second.imported, second.already_present),
        (0, first.imported)
    );

    let hits_before = upstream.total_hits();
    let proxy = Proxy::start_in(&upstream, sealed_dir, |c| {
        c.upstream.base_url = Some("http://127.0.0.1:9".into());
        c.cache.offline = true;
    })
    .await;
    // The version list lists what the enclave has: 1.0.0, two platforms.
    let (status, _, doc) = proxy
        .get_json(&format!("/v1/providers/{NS}/{TYPE}/versions"))
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let versions = doc["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{doc}");
    assert_eq!(versions[0]["version"], "1.0.0");
    let mut platforms: Vec<String> = versions[0]["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}_{}",
                p["os"].as_str().unwrap(),
                p["arch"].as_str().unwrap()
            )
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["darwin_arm64", "linux_amd64"]);
    // The bytes are the upstream's, verified on both sides.
    let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = upstream.zip("1.0.0", "linux", "amd64");
    assert_eq!(
        reqwest::get(&zip_url).await.unwrap().bytes().await.unwrap(),
        zip
    );
    let release = upstream.release("1.0.0");
    assert_eq!(
        reqwest::get(&sums_url)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        release.sums
    );
    assert_eq!(
        reqwest::get(sig_url.unwrap())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        release.sig
    );
    // Mirror protocol too.
    let (status, _, index) = proxy
        .get_json(&format!(
            "/v1/mirror/registry.terraform.io/{NS}/{TYPE}/index.json"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(index["versions"].as_object().unwrap().len(), 1, "{index}");
    // Modules: an archive and a git source, both as the connected side packed them.
    for name in ["archive", "gittag"] {
        let (status, _, doc) = proxy
            .get_json(&format!("/v1/modules/{NS}/{name}/aws/versions"))
            .await;
        assert_eq!(status, StatusCode::OK, "{name}: {doc}");
        let resp = proxy
            .get(&format!("/v1/modules/{NS}/{name}/aws/1.0.0/download"))
            .await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{name}");
        let location = resp.headers()["x-terraform-get"]
            .to_str()
            .unwrap()
            .to_owned();
        let archive = reqwest::get(&location).await.unwrap();
        assert_eq!(archive.status(), StatusCode::OK, "{name}");
        assert!(!archive.bytes().await.unwrap().is_empty());
    }
    // What the enclave lacks is a 404 that says what to do, counted in the metrics.
    for path in [
        format!("/v1/providers/{NS}/{TYPE}/1.1.0/download/linux/amd64"),
        format!("/v1/providers/{NS}/{TYPE}/1.0.0/download/windows/amd64"),
        format!("/v1/providers/{NS}/other/versions"),
    ] {
        let (status, _, doc) = proxy.get_json(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {doc}");
        let msg = doc["errors"][0].as_str().unwrap();
        assert!(
            msg.contains("sealed") && msg.contains("terrapeak import"),
            "{msg}"
        );
    }
    let (status, _, _) = proxy
        .get_json(&format!("/v1/modules/{NS}/gitsha/aws/versions"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let scrape = Scrape::of(&reqwest::Client::new(), &proxy.url("/metrics")).await;
    assert_eq!(
        scrape.value("terrapeak_offline_misses_total", &[("kind", "provider")]),
        3.0
    );
    assert_eq!(
        scrape.value("terrapeak_offline_misses_total", &[("kind", "module")]),
        1.0
    );
    // The fake upstream saw nothing from the sealed side.
    assert_eq!(upstream.total_hits(), hits_before);
}

/// A bundle's entries: path and bytes.
type Entries = Vec<(String, Vec<u8>)>;

/// A bundle's entries, read whole (test bundles are small).
fn read_entries(path: &Path) -> Entries {
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (path, data)
        })
        .collect()
}

/// Writes entries as an uncompressed tar; a name with `..` goes in raw (the tar crate would
/// refuse it), so it must fit the header's 100 bytes.
fn write_entries(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        if name.contains("..") {
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            tar.append(&header, &data[..]).unwrap();
        } else {
            tar.append_data(&mut header, name, &data[..]).unwrap();
        }
    }
    tar.finish().unwrap();
}

/// Rewrites the manifest after `edit` changed entries, so only the change under test is wrong.
fn with_manifest(entries: &mut [(String, Vec<u8>)], edit: impl Fn(&mut bundle::Manifest)) {
    let mut manifest: bundle::Manifest = serde_json::from_slice(&entries[0].1).unwrap();
    edit(&mut manifest);
    entries[0].1 = serde_json::to_vec(&manifest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_bundles_are_refused_naming_the_entry_and_leave_nothing_behind() {
    let upstream = FakeUpstream::start(FakeOptions::default()).await;
    let work = tempfile::tempdir().unwrap();
    let connected = tempfile::tempdir().unwrap();
    let good = work.path().join("good.tar.gz");
    connected_bundle(&upstream, work.path(), connected.path(), &good).await;
    let entries = read_entries(&good);
    let find = |suffix: &str| {
        entries
            .iter()
            .position(|(p, _)| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix}"))
    };
    let zip = find("_linux_amd64.zip");
    let sig = find("1.1.0/SHA256SUMS.sig");

    let mut cases: Vec<(&str, Entries, String)> = Vec::new();
    // One flipped byte in a zip.
    let mut flipped = entries.clone();
    let mid = flipped[zip].1.len() / 2;
    flipped[zip].1[mid] ^= 1;
    cases.push(("flipped byte", flipped, entries[zip].0.clone()));
    // A signature swapped for another key's valid signature of the same SHA256SUMS, with the
    // manifest updated to match: only the signature check can catch it.
    let mut swapped = entries.clone();
    let foreign = upstream.release("1.1.0").foreign_sig.to_vec();
    swapped[sig].1 = foreign.clone();
    let sig_path = entries[sig].0.clone();
    with_manifest(&mut swapped, |m| {
        let e = m.entries.iter_mut().find(|e| e.path == sig_path).unwrap();
        e.size = foreign.len() as u64;
        e.sha256 = hex::encode(Sha256::digest(&foreign));
        e.meta.size = e.size;
        e.meta.sha256 = e.sha256.clone();
    });
    cases.push(("swapped signature", swapped, sig_path.clone()));
    // An entry path that climbs out of the store.
    let mut climbing = entries.clone();
    let evil = "objects/providers/../../../../tmp/terrapeak-evil".to_owned();
    let victim = climbing[zip].0.clone();
    climbing[zip].0 = evil.clone();
    with_manifest(&mut climbing, |m| {
        m.entries
            .iter_mut()
            .find(|e| e.path == victim)
            .unwrap()
            .path = evil.clone();
    });
    cases.push(("climbing path", climbing, evil));

    for (what, entries, naming) in cases {
        let path = work.path().join(format!("{what}.tar"));
        write_entries(&path, &entries);
        assert_refused(&upstream, &path, &naming, what).await;
    }
    // A truncated tail, compressed as exported.
    let raw = std::fs::read(&good).unwrap();
    let cut = work.path().join("truncated.tar.gz");
    std::fs::write(&cut, &raw[..raw.len() * 2 / 3]).unwrap();
    assert_refused(&upstream, &cut, "objects/", "truncated tail").await;
    assert!(!Path::new("/tmp/terrapeak-evil").exists());

    // A bundle without one zip imports, but without the download answer that points to it: a
    // TerraPeak that is not sealed would otherwise fetch from a URL the bundle named.
    let mut partial = entries.clone();
    let dropped = partial.remove(zip).0;
    with_manifest(&mut partial, |m| m.entries.retain(|e| e.path != dropped));
    let path = work.path().join("partial.tar");
    write_entries(&path, &partial);
    let dir = tempfile::tempdir().unwrap();
    let cache = airgap::open(&sealed_config(&upstream, dir.path()))
        .await
        .unwrap();
    let report = import::import_bundle(cache.storage(), &path).await.unwrap();
    assert_eq!(report.skipped, 1, "{report:?}");
    let doc = dropped
        .trim_start_matches("objects/")
        .rsplit_once('/')
        .unwrap()
        .0
        .to_owned()
        + "/download/linux_amd64.json";
    let stored = airgap::everything(&cache).await.unwrap();
    assert!(
        !stored.iter().any(|k| k.as_str() == doc),
        "{doc} in {stored:?}"
    );
    assert_eq!(
        stored.len(),
        partial.len() - 2,
        "all but the manifest and the answer"
    );
}

async fn assert_refused(upstream: &FakeUpstream, bundle: &Path, naming: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = sealed_config(upstream, dir.path());
    let cache = airgap::open(&config).await.unwrap();
    let err = import::import_bundle(cache.storage(), bundle)
        .await
        .expect_err(what)
        .to_string();
    assert!(
        err.contains("refused") && err.contains(naming),
        "{what}: {err}"
    );
    let left = airgap::everything(&cache).await.unwrap();
    assert!(left.is_empty(), "{what}: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_mirror_export_has_terraforms_packed_layout() {
    let upstream = FakeUpstream::start(FakeOptions::default()).await;
    let work = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = config_for(&upstream, data.path());
    let m = write(
        work.path(),
        "m.yaml",
        "providers:\n  - source: testns/demo\n    version: '1.0.0'\n    platforms: [linux_amd64, darwin_arm64]\n",
    );
    let mirror = work.path().join("mirror");
    let out = run(
        work.path(),
        &config,
        &[
            "export".as_ref(),
            "--format".as_ref(),
            "filesystem-mirror".as_ref(),
            "--manifest".as_ref(),
            m.as_os_str(),
            mirror.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (os, arch) in [("linux", "amd64"), ("darwin", "arm64")] {
        let file = mirror.join(format!(
            "registry.terraform.io/{NS}/{TYPE}/terraform-provider-{TYPE}_1.0.0_{os}_{arch}.zip"
        ));
        assert_eq!(
            std::fs::read(&file).unwrap(),
            upstream.zip("1.0.0", os, arch).1,
            "{}",
            file.display()
        );
    }
    let files: Vec<_> = walk(&mirror);
    assert_eq!(files.len(), 2, "{files:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
