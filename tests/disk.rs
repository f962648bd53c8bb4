//! A full, filling or read-only disk under the cache directory: every client still gets every
//! verified byte, cached objects keep being served, readiness reports the degraded store
//! without taking the replica out of rotation, and caching resumes once there is room.
//!
//! The cache directory is a small tmpfs (see `common::disk`). With `TERRAPEAK_TEST_STORAGE=s3`
//! the store is a bucket and the small disk holds only the spool.

mod common;

use common::disk::SmallDisk;
use common::*;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;

async fn hash_body(mut resp: reqwest::Response) -> (Vec<u8>, u64) {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await.expect("the whole body arrives") {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (hasher.finalize().to_vec(), len)
}

fn zip_key(version: &str, os: &str, arch: &str) -> String {
    type_zip_key(TYPE, version, os, arch)
}

fn type_zip_key(ty: &str, version: &str, os: &str, arch: &str) -> String {
    format!(
        "providers/registry.terraform.io/{NS}/{ty}/{version}/terraform-provider-{ty}_{version}_{os}_{arch}.zip"
    )
}

/// Whether the bytes of `key` are kept (its sidecar is written last).
fn is_stored(proxy: &Proxy, key: &str) -> bool {
    proxy.stored_file(&format!("meta/{key}.json")).exists()
}

/// Waits until no spool file is left and none is still held open: a fill's task removes its
/// file once it ends (on S3 once its upload, which clients do not wait for, is done), and the
/// space comes back when the last reader closes it, which may be a moment after the client has
/// its bytes. A minute at most.
async fn wait_for_empty_staging(disk: &SmallDisk) {
    for _ in 0..1200 {
        if disk.staged().is_empty() && disk.held_open().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "spool files left behind: {:?}, still open: {:?}",
        disk.staged(),
        disk.held_open()
    );
}

/// Asks until the answer is a HIT (an S3 upload may end after the client has its bytes) and
/// returns its body.
async fn wait_for_hit(proxy: &Proxy, url: &str) -> bytes::Bytes {
    for _ in 0..600 {
        let resp = proxy.client.get(url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        if cache_status(&resp).as_deref() == Some("HIT") {
            return resp.bytes().await.unwrap();
        }
        resp.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never became a HIT");
}

async fn get_ok(proxy: &Proxy, url: &str) -> (Option<String>, bytes::Bytes) {
    let resp = proxy.client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    (cache_status(&resp), resp.bytes().await.unwrap())
}

/// `/readyz` while the disk is full or read-only: 200 with a degraded body naming `reason`,
/// 503 when a working store is required; and the degraded metric is set.
async fn assert_ready_but_degraded(proxy: &Proxy, reason: &str) {
    if let Err(e) = ready_but_degraded(proxy, reason).await {
        panic!("{e}");
    }
}

/// What `/readyz` and the metrics must say while the store cannot write for `reason`.
async fn ready_but_degraded(proxy: &Proxy, reason: &str) -> Result<(), String> {
    let (status, _, body) = proxy.get_json("/readyz").await;
    let degraded = body["store"]["degraded"].as_array();
    if status != StatusCode::OK
        || body["status"] != "degraded"
        || body["store"]["writable"] != false
        || body["store"]["readable"] != true
        || !degraded.is_some_and(|d| d.iter().any(|d| d["reason"] == reason))
    {
        return Err(format!("/readyz: {status} {body}"));
    }
    let (status, _, body) = proxy.get_json("/readyz?store=required").await;
    if status != StatusCode::SERVICE_UNAVAILABLE
        || !body["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains(reason))
    {
        return Err(format!("/readyz?store=required: {status} {body}"));
    }
    let m = Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    let gauge = m.value("terrapeak_storage_degraded", &[("reason", reason)]);
    if gauge != 1.0 {
        return Err(format!(
            "terrapeak_storage_degraded{{reason={reason}}} is {gauge}"
        ));
    }
    Ok(())
}

/// Fills the disk and asserts that TerraPeak reports it full, with the disk full all along.
/// Under load the space of a spool file that was removed and closed can reach the filesystem's
/// free count a moment later, after the test's fill (seen in CI): then the checks are made
/// again, until no space came back while they ran.
async fn assert_degraded_while_full(proxy: &Proxy, disk: &SmallDisk) {
    let mut last = String::new();
    for _ in 0..100 {
        disk.fill();
        let checked = ready_but_degraded(proxy, "no_space").await;
        let came_back = disk.fill();
        match checked {
            Ok(()) if came_back == 0 => return,
            Err(e) if came_back == 0 => panic!("{e}"),
            Ok(()) => last = format!("{came_back} bytes came back"),
            Err(e) => last = format!("{e} ({came_back} bytes came back)"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("free space kept coming back on the full disk: {last}");
}

async fn assert_ready(proxy: &Proxy) {
    let (status, _, body) = proxy.get_json("/readyz?store=required").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    let m = Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    for reason in ["no_space", "read_only", "io", "store"] {
        assert_eq!(
            m.value("terrapeak_storage_degraded", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_larger_than_the_free_space_passes_through_to_every_joined_client_then_is_kept()
{
    const CLIENTS: usize = 20;
    let up = FakeUpstream::start(FakeOptions {
        padding: 64 << 20,
        ..Default::default()
    })
    .await;
    let (disk, dir) = SmallDisk::mount(20 * MIB);
    let proxy = Proxy::start_in(&up, dir, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    assert!(zip.len() as u64 > 64 * MIB);
    let want = Sha256::digest(&zip).to_vec();
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    // The upstream sends its first MiB, then waits until every client has joined.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.set_fault(&zip_path, Fault::Gate(MIB as usize, gate.clone()));

    let (answered, mut answers) = mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, answered) = (proxy.client.clone(), zip_url.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            answered.send(cache_status(&resp)).unwrap();
            hash_body(resp).await
        }));
    }
    for _ in 0..CLIENTS {
        let status = tokio::time::timeout(Duration::from_secs(30), answers.recv())
            .await
            .expect("every client gets its headers while the upstream holds back")
            .unwrap();
        assert_eq!(status.as_deref(), Some("PASS"), "announced as not kept");
    }
    gate.notify_one();
    for client in clients {
        let (sha, len) = client.await.unwrap();
        assert_eq!(len, zip.len() as u64);
        assert_eq!(sha, want, "every client got the verified bytes");
    }
    assert_eq!(up.hits(&zip_path), 1, "one upstream download for all");
    wait_for_empty_staging(&disk).await;
    assert!(!is_stored(&proxy, &zip_key("1.0.0", "linux", "amd64")));

    // Room again: the next request keeps it, the one after is served from the cache.
    disk.resize(256 * MIB);
    up.clear_faults();
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    assert_eq!(hash_body(resp).await.0, want);
    let hit = wait_for_hit(&proxy, &zip_url).await;
    assert!(hit == zip);
    assert_eq!(up.hits(&zip_path), 2);
    wait_for_empty_staging(&disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_filling_up_mid_fill_still_delivers_every_verified_byte_to_fast_and_slow_clients()
{
    let up = FakeUpstream::start(FakeOptions {
        padding: 32 << 20,
        ..Default::default()
    })
    .await;
    let (disk, dir) = SmallDisk::mount(64 * MIB);
    let proxy = Proxy::start_in(&up, dir, |_| {}).await;
    let (zip_url, sums_url, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    let want = Sha256::digest(&zip).to_vec();
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    up.set_fault(&zip_path, Fault::Throttle(16 * MIB));

    // One client reads as fast as it can and says when it has 4 MiB; one lags behind.
    let (progress, mut at_4_mib) = mpsc::unbounded_channel();
    let fast = {
        let (client, url) = (proxy.client.clone(), zip_url.clone());
        tokio::spawn(async move {
            let mut resp = client.get(url).send().await.unwrap();
            assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
            let (mut hasher, mut len, mut told) = (Sha256::new(), 0u64, false);
            while let Some(chunk) = resp.chunk().await.expect("the whole body arrives") {
                len += chunk.len() as u64;
                hasher.update(&chunk);
                if len >= 4 * MIB && !told {
                    progress.send(()).unwrap();
                    told = true;
                }
            }
            (hasher.finalize().to_vec(), len)
        })
    };
    let slow = {
        let (client, url) = (proxy.client.clone(), zip_url.clone());
        tokio::spawn(async move {
            let mut resp = client.get(url).send().await.unwrap();
            let (mut hasher, mut len, mut n) = (Sha256::new(), 0u64, 0u32);
            while let Some(chunk) = resp.chunk().await.expect("the whole body arrives") {
                len += chunk.len() as u64;
                hasher.update(&chunk);
                n += 1;
                if n.is_multiple_of(16) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (hasher.finalize().to_vec(), len)
        })
    };
    tokio::time::timeout(Duration::from_secs(30), at_4_mib.recv())
        .await
        .expect("the fill streams")
        .unwrap();
    // Blocks this worker for a moment; the fill runs on the other.
    assert!(disk.fill() > 0);
    for client in [fast, slow] {
        let (sha, len) = client.await.unwrap();
        assert_eq!(len, zip.len() as u64);
        assert_eq!(sha, want, "every byte, verified");
    }
    assert_eq!(up.hits(&zip_path), 1);
    wait_for_empty_staging(&disk).await;
    assert!(!is_stored(&proxy, &zip_key("1.0.0", "linux", "amd64")));

    // Full again (the spool file's space came back once it was removed and closed): still
    // ready, saying why; what is cached is still served.
    assert_degraded_while_full(&proxy, &disk).await;
    let (_, sums) = get_ok(&proxy, &sums_url).await;
    assert!(sums == up.release("1.0.0").sums);

    // Room again: kept, then a HIT.
    disk.unfill();
    assert_ready(&proxy).await;
    up.clear_faults();
    let (status, data) = get_ok(&proxy, &zip_url).await;
    assert_eq!(status.as_deref(), Some("MISS"));
    assert!(data == zip);
    assert!(wait_for_hit(&proxy, &zip_url).await == zip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_turns_read_only_keeps_serving_hits_and_passes_misses_through() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let (disk, dir) = SmallDisk::mount(32 * MIB);
    let proxy = Proxy::start_in(&up, dir, |_| {}).await;
    let versions = format!("/v1/providers/{NS}/{TYPE}/versions");
    assert_eq!(proxy.get_json(&versions).await.0, StatusCode::OK);
    let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    assert_eq!(get_ok(&proxy, &zip_url).await.1, zip);
    assert!(wait_for_hit(&proxy, &zip_url).await == zip);
    let file_store = s3_under_test().is_none();

    disk.set_read_only(true);
    // Hits: the cached zip, its sums and signature, the version list.
    for _ in 0..3 {
        let (status, data) = get_ok(&proxy, &zip_url).await;
        assert_eq!(status.as_deref(), Some("HIT"));
        assert!(data == zip);
    }
    assert!(get_ok(&proxy, &sums_url).await.1 == up.release("1.0.0").sums);
    assert!(get_ok(&proxy, sig_url.as_ref().unwrap()).await.1 == up.release("1.0.0").sig);
    let (status, _, doc) = proxy.get_json(&versions).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["versions"].as_array().unwrap().len() == 2, "{doc}");

    // Misses: another version end to end, and another platform of the cached one. The
    // metadata cannot be kept in a read-only cache directory but is served all the same.
    for (version, os, arch) in [("1.1.0", "linux", "amd64"), ("1.0.0", "darwin", "arm64")] {
        let (status, cache, doc) = proxy
            .get_json(&format!(
                "/v1/providers/{NS}/{TYPE}/{version}/download/{os}/{arch}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        if file_store {
            assert_eq!(cache.as_deref(), Some("PASS"));
        }
        let url = doc["download_url"].as_str().unwrap();
        let (status, data) = get_ok(&proxy, url).await;
        assert_eq!(status.as_deref(), Some("PASS"), "{url}");
        assert!(data == up.zip(version, os, arch).1, "{url}");
        let (_, sums) = get_ok(&proxy, doc["shasums_url"].as_str().unwrap()).await;
        assert!(sums == up.release(version).sums);
        assert!(!is_stored(&proxy, &zip_key(version, os, arch)));
    }
    assert_ready_but_degraded(&proxy, "read_only").await;

    disk.set_read_only(false);
    assert_ready(&proxy).await;
    let (other_url, _, _) = proxy.handed_out("1.1.0", "linux", "amd64").await;
    let (status, data) = get_ok(&proxy, &other_url).await;
    assert_eq!(status.as_deref(), Some("MISS"));
    assert!(data == up.zip("1.1.0", "linux", "amd64").1);
    assert!(wait_for_hit(&proxy, &other_url).await == up.zip("1.1.0", "linux", "amd64").1);
    wait_for_empty_staging(&disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_disk_completely_full_metadata_artifacts_and_modules_are_still_served() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let (disk, dir) = SmallDisk::mount(32 * MIB);
    let proxy = Proxy::start_in(&up, dir, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    assert_eq!(get_ok(&proxy, &zip_url).await.1, zip);
    assert!(wait_for_hit(&proxy, &zip_url).await == zip);
    disk.fill();

    assert!(get_ok(&proxy, &zip_url).await.1 == zip);
    // A provider version never seen: list, download answer, sums, signature and zip.
    let (status, _, list) = proxy
        .get_json(&format!("/v1/providers/{NS}/{TYPE}/versions"))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let (cold_url, sums_url, sig_url) = proxy.handed_out("1.1.0", "linux", "amd64").await;
    let (status, data) = get_ok(&proxy, &cold_url).await;
    assert_eq!(status.as_deref(), Some("PASS"));
    assert!(data == up.zip("1.1.0", "linux", "amd64").1);
    assert!(get_ok(&proxy, &sums_url).await.1 == up.release("1.1.0").sums);
    assert!(get_ok(&proxy, sig_url.as_ref().unwrap()).await.1 == up.release("1.1.0").sig);
    // A module: its version list, its download location and its archive.
    let (status, _, doc) = proxy
        .get_json(&format!("/v1/modules/{NS}/archive/aws/versions"))
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let resp = proxy
        .get(&format!("/v1/modules/{NS}/archive/aws/1.0.0/download"))
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let location = resp.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .to_owned();
    let (status, archive) = get_ok(&proxy, &location).await;
    assert_eq!(status.as_deref(), Some("PASS"));
    assert!(archive == up.modules().tar_gz);

    wait_for_empty_staging(&disk).await;
    assert_degraded_while_full(&proxy, &disk).await;
    disk.unfill();
    assert_ready(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_eviction_on_a_fill_short_of_space_evicts_the_least_recently_used_first_and_is_kept() {
    if s3_under_test().is_some() {
        // Over S3 the small disk holds only the spool; evicting from the bucket frees none of it.
        return;
    }
    let up = FakeUpstream::start(FakeOptions {
        padding: 12 << 20,
        pad_every_type: true,
        extra_types: vec!["alpha", "beta"],
        ..Default::default()
    })
    .await;
    let (_disk, dir) = SmallDisk::mount(40 * MIB);
    // A limit far above the disk: eviction is on, and the disk is what runs out.
    let proxy = Proxy::start_in(&up, dir, |c| c.storage.max_size = Some(1 << 30)).await;
    let fetch = |ty: &'static str| {
        let proxy = &proxy;
        async move {
            let (status, _, doc) = proxy
                .get_json(&format!(
                    "/v1/providers/{NS}/{ty}/1.0.0/download/linux/amd64"
                ))
                .await;
            assert_eq!(status, StatusCode::OK, "{doc}");
            let resp = proxy
                .client
                .get(doc["download_url"].as_str().unwrap())
                .send()
                .await
                .unwrap();
            let status = cache_status(&resp);
            let (sha, _) = hash_body(resp).await;
            (status, sha)
        }
    };
    for ty in ["demo", "alpha"] {
        assert_eq!(fetch(ty).await.0.as_deref(), Some("MISS"));
        let key = type_zip_key(ty, "1.0.0", "linux", "amd64");
        for _ in 0..200 {
            if is_stored(&proxy, &key) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(is_stored(&proxy, &key), "{ty} kept");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // A finished fill keeps its file open for a few seconds for late joiners, and an evicted
    // file's space comes back only once it is closed: let those end.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // beta does not fit beside both: demo, the least recently used, makes room, and beta is
    // kept rather than passed through.
    let (status, _) = fetch("beta").await;
    assert_eq!(status.as_deref(), Some("MISS"), "kept, not passed through");
    let beta = type_zip_key("beta", "1.0.0", "linux", "amd64");
    for _ in 0..200 {
        if is_stored(&proxy, &beta) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(is_stored(&proxy, &beta));
    assert!(!is_stored(
        &proxy,
        &type_zip_key("demo", "1.0.0", "linux", "amd64")
    ));
    assert!(is_stored(
        &proxy,
        &type_zip_key("alpha", "1.0.0", "linux", "amd64")
    ));
    let m = Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    assert!(m.value("terrapeak_evictions_total", &[("reason", "size")]) >= 1.0);
}
