//! A bounded cache: `storage.max_size` evicts the least recently used units, keeps pinned ones
//! and never breaks a download in progress; `terrapeak gc --dry-run` changes nothing.

mod common;

use common::{FakeOptions, FakeUpstream, NS, Proxy, Scrape, cache_status, config_for};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;
use terrapeak::airgap::{self, SelectionArgs, progress::Progress, warm};

const TYPES: [&str; 5] = ["demo", "alpha", "beta", "gamma", "delta"];
const UNIT: u64 = 256 << 10;

async fn upstream() -> FakeUpstream {
    upstream_of(UNIT).await
}

/// Zips of about `unit` bytes.
async fn upstream_of(unit: u64) -> FakeUpstream {
    FakeUpstream::start(FakeOptions {
        padding: unit as usize,
        pad_every_type: true,
        extra_types: TYPES[1..].to_vec(),
        ..Default::default()
    })
    .await
}

fn zip_key(ty: &str) -> String {
    format!(
        "providers/registry.terraform.io/{NS}/{ty}/1.0.0/terraform-provider-{ty}_1.0.0_linux_amd64.zip"
    )
}

fn stored(proxy: &Proxy, ty: &str) -> bool {
    proxy.stored_file(&format!("data/{}", zip_key(ty))).exists()
}

/// The URL TerraPeak hands out for a type's linux_amd64 zip.
async fn zip_url(proxy: &Proxy, ty: &str) -> String {
    let (status, _, doc) = proxy
        .get_json(&format!(
            "/v1/providers/{NS}/{ty}/1.0.0/download/linux/amd64"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    doc["download_url"].as_str().unwrap().to_owned()
}

/// Downloads a type's zip whole; returns its cache status and sha256.
async fn download(proxy: &Proxy, ty: &str) -> (Option<String>, String) {
    let url = zip_url(proxy, ty).await;
    let resp = proxy.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let status = cache_status(&resp);
    let body = resp.bytes().await.unwrap();
    (status, hex::encode(Sha256::digest(&body)))
}

/// Downloads until the zip is a HIT (kept), then waits a second so the next unit's times differ.
async fn fill(proxy: &Proxy, ty: &str) {
    download(proxy, ty).await;
    for _ in 0..100 {
        if stored(proxy, ty) {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{ty} was never kept");
}

/// Bytes under the store's `data/`.
fn data_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| {
                        let p = e.path();
                        if p.is_dir() {
                            walk(&p)
                        } else {
                            p.metadata().map(|m| m.len()).unwrap_or(0)
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("data"))
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_size_the_least_recently_used_units_go_and_pinned_ones_stay() {
    let up = upstream().await;
    let data = tempfile::tempdir().unwrap();
    // Pin alpha with `warm --pin` before the server starts.
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("pin.yaml");
    std::fs::write(
        &manifest,
        format!("providers:\n  - source: {NS}/alpha\n    version: '1.0.0'\n    platforms: [linux_amd64]\n"),
    )
    .unwrap();
    let config = config_for(&up, data.path());
    let cache = airgap::open(&config).await.unwrap();
    let select = SelectionArgs {
        manifests: vec![manifest],
        ..Default::default()
    };
    let report = warm::warm(
        &cache,
        select.read().unwrap(),
        warm::Options { jobs: 1, pin: true },
        &Progress::new(false),
    )
    .await;
    assert_eq!(report.failed(), 0, "{:#?}", report.items);
    drop(cache);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Room for three units.
    let max = 3 * UNIT + 60_000;
    let proxy = Proxy::start_in(&up, data, |c| c.storage.max_size = Some(max)).await;
    for ty in ["demo", "beta", "gamma"] {
        fill(&proxy, ty).await;
    }
    // Four units now: over the limit, so the least recently used unpinned one (demo) went.
    until("demo evicted", || !stored(&proxy, "demo")).await;
    assert!(stored(&proxy, "alpha") && stored(&proxy, "beta") && stored(&proxy, "gamma"));
    // beta is read again: now gamma is the least recently used.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(download(&proxy, "beta").await.0.as_deref(), Some("HIT"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fill(&proxy, "delta").await;
    until("gamma evicted", || !stored(&proxy, "gamma")).await;
    for ty in ["alpha", "beta", "delta"] {
        assert!(stored(&proxy, ty), "{ty} stays");
    }
    let on_disk = data_bytes(proxy.data_dir.path());
    if common::s3_under_test().is_none() {
        assert!(on_disk <= max + UNIT, "{on_disk} bytes stored, limit {max}");
    }
    let scrape = Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    assert_eq!(
        scrape.value("terrapeak_evictions_total", &[("reason", "size")]),
        2.0
    );
    let stored_bytes = scrape.value("terrapeak_cache_stored_bytes", &[]);
    assert!(
        stored_bytes > 0.0 && stored_bytes <= (max + UNIT) as f64,
        "{stored_bytes}"
    );
    // An evicted unit is fetched again on the next request.
    let (status, sha) = download(&proxy, "demo").await;
    assert_eq!(status.as_deref(), Some("MISS"));
    assert_eq!(sha, hex::encode(Sha256::digest(up_zip(&up, "demo"))));
}

/// The upstream's bytes of demo's linux_amd64 zip (the fake exposes only `demo`'s).
fn up_zip(up: &FakeUpstream, ty: &str) -> bytes::Bytes {
    assert_eq!(ty, "demo");
    up.zip("1.0.0", "linux", "amd64").1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_being_downloaded_is_not_evicted_and_the_download_gets_every_byte() {
    // Large enough that the server is still reading the file while the client waits (socket
    // buffers hold a few MiB).
    const BIG: u64 = 32 << 20;
    let up = upstream_of(BIG).await;
    // Room for one unit only.
    let proxy = Proxy::start(&up, |c| c.storage.max_size = Some(BIG + 60_000)).await;
    fill(&proxy, "demo").await;
    let want = hex::encode(Sha256::digest(up_zip(&up, "demo")));
    // A slow reader of demo: the first chunk, then it waits.
    let url = zip_url(&proxy, "demo").await;
    let mut resp = proxy.client.get(&url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    let mut hasher = Sha256::new();
    hasher.update(resp.chunk().await.unwrap().unwrap());
    // Another unit: over the limit, but demo is being read; it stays.
    fill(&proxy, "alpha").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stored(&proxy, "demo"), "a unit being read stays");
    // And a `terrapeak gc` from another process, which cannot know, removes it under the
    // reader: the reader still gets every byte.
    let cfg = proxy.data_dir.path().join("gc.yml");
    let mut config = config_for(&up, proxy.data_dir.path());
    config.storage.max_size = Some(1);
    std::fs::write(&cfg, serde_yaml::to_string(&config).unwrap()).unwrap();
    let mut gc = std::process::Command::new(env!("CARGO_BIN_EXE_terrapeak"));
    gc.args(["gc", "-c"]).arg(&cfg);
    if let (Some(a), Some(k)) = (
        config.storage.minio.access_key.expose(),
        config.storage.minio.secret_key.expose(),
    ) {
        gc.env("TERRAPEAK_STORAGE__MINIO__ACCESS_KEY", a)
            .env("TERRAPEAK_STORAGE__MINIO__SECRET_KEY", k);
    }
    let out = tokio::task::spawn_blocking(move || gc.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stored(&proxy, "demo"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    while let Some(chunk) = resp.chunk().await.expect("the whole body arrives") {
        hasher.update(&chunk);
    }
    assert_eq!(hex::encode(hasher.finalize()), want, "every byte, verified");
    // Gone from the store, so it is fetched again (once the finished fill, which serves from
    // its own file handle for a few seconds after publishing, is gone too).
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let (status, sha) = download(&proxy, "demo").await;
        assert_eq!(sha, want);
        statuses.push(status.unwrap_or_default());
        if stored(&proxy, "demo") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(stored(&proxy, "demo"), "kept again: {statuses:?}");
    assert!(statuses.contains(&"MISS".to_owned()), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_dry_run_changes_nothing_and_says_what_it_would_evict() {
    let up = upstream().await;
    let proxy = Proxy::start(&up, |_| {}).await;
    for ty in ["demo", "alpha"] {
        fill(&proxy, ty).await;
    }
    let listing = |dir: &Path| {
        let mut out = Vec::new();
        fn walk(p: &Path, out: &mut Vec<(String, u64)>) {
            for e in std::fs::read_dir(p).unwrap().filter_map(Result::ok) {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push((p.display().to_string(), p.metadata().unwrap().len()));
                }
            }
        }
        walk(&dir.join("data"), &mut out);
        walk(&dir.join("meta"), &mut out);
        out.sort();
        out
    };
    let before = listing(proxy.data_dir.path());
    let cfg = proxy.data_dir.path().join("gc.yml");
    let mut config = config_for(&up, proxy.data_dir.path());
    config.storage.max_size = Some(1);
    std::fs::write(&cfg, serde_yaml::to_string(&config).unwrap()).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_terrapeak"))
            .args(["gc", "--dry-run", "-c"])
            .arg(&cfg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "would evict registry.terraform.io/{NS}/demo 1.0.0 linux_amd64"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("would evict 2 unit(s)"), "{stdout}");
    assert_eq!(
        listing(proxy.data_dir.path()),
        before,
        "a dry run changes nothing"
    );
    assert!(stored(&proxy, "demo") && stored(&proxy, "alpha"));
}

/// Two replicas on one bucket (the S3 server under test, whatever `TERRAPEAK_TEST_STORAGE`).
async fn replica(up: &FakeUpstream, prefix: &str) -> Proxy {
    let s3 = common::s3::S3Server::shared();
    let prefix = prefix.to_owned();
    Proxy::start(up, move |c| s3.configure(c, &prefix)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_s3_replicas_share_reads_evict_without_breaking_each_other_and_rebuild_after_restart()
{
    const BIG: u64 = 16 << 20;
    let up = upstream_of(BIG).await;
    let prefix = format!("replicas-{}", std::process::id());
    let a = replica(&up, &prefix).await;
    let b = replica(&up, &prefix).await;
    let is_stored = |ty: &str| {
        let server = common::s3::S3Server::shared();
        server
            .root
            .join(common::s3::BUCKET)
            .join(&prefix)
            .join("data")
            .join(zip_key(ty))
            .exists()
    };
    // demo first, then alpha: demo is the older unit.
    for ty in ["demo", "alpha"] {
        download(&a, ty).await;
        until("kept", || is_stored(ty)).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // Replica B reads demo and flushes its reads; A has read neither since.
    assert_eq!(download(&b, "demo").await.0.as_deref(), Some("HIT"));
    let b_cache = b.server.as_ref().unwrap().cache().clone();
    assert!(
        b_cache
            .storage()
            .flush_access("replica-b", false)
            .await
            .unwrap()
    );
    // A evicts down to one unit: B's read makes alpha the least recently used.
    let a_cache = a.server.as_ref().unwrap().cache().clone();
    let limits = terrapeak::inventory::Limits {
        max_size: Some(BIG + 100_000),
        unused_after: None,
    };
    let report = a_cache.gc(limits, false, false).await.unwrap();
    let gone: Vec<String> = report.evicted.iter().map(|e| e.unit.label()).collect();
    assert_eq!(
        gone,
        [format!(
            "registry.terraform.io/{NS}/alpha 1.0.0 linux_amd64"
        )]
    );
    assert!(is_stored("demo") && !is_stored("alpha"));

    // B streams demo slowly while A evicts it: B's client still gets every byte.
    let want = hex::encode(Sha256::digest(up_zip(&up, "demo")));
    let url = zip_url(&b, "demo").await;
    let mut resp = b.client.get(&url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    let mut hasher = Sha256::new();
    hasher.update(resp.chunk().await.unwrap().unwrap());
    let all = terrapeak::inventory::Limits {
        max_size: Some(1),
        unused_after: None,
    };
    let report = a_cache.gc(all, false, false).await.unwrap();
    assert_eq!(report.evicted.len(), 1);
    assert!(!is_stored("demo"));
    while let Some(chunk) = resp.chunk().await.expect("the whole body arrives") {
        hasher.update(&chunk);
    }
    assert_eq!(hex::encode(hasher.finalize()), want, "every byte, verified");

    // A restart rebuilds the inventory from the bucket, reads included.
    download(&b, "demo").await;
    until("kept again", || is_stored("demo")).await;
    // Within the hour of B's first recorded read, nothing new to write.
    assert!(
        !b_cache
            .storage()
            .flush_access("replica-b", false)
            .await
            .unwrap()
    );
    drop(a);
    let a2 = replica(&up, &prefix).await;
    let inv = a2
        .server
        .as_ref()
        .unwrap()
        .cache()
        .inventory()
        .await
        .unwrap();
    let units: Vec<String> = inv.units.iter().map(|u| u.label()).collect();
    assert_eq!(
        units,
        [format!("registry.terraform.io/{NS}/demo 1.0.0 linux_amd64")]
    );
    assert!(
        inv.units[0].last_access.is_some(),
        "B's reads are in the bucket"
    );
}
