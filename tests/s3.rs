//! The S3 backend against a real S3 server (s3s-fs, signatures enforced): TerraPeak processes
//! sharing one bucket, a store that goes away mid-run and comes back, and a large artifact
//! through multipart uploads with bounded memory.

mod common;

use common::s3::{BUCKET, S3Server};
use common::*;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

/// A `terrapeak` process on the S3 server under `prefix`, in front of `up`.
struct Replica {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn start(server: &S3Server, prefix: &str, up: &FakeUpstream) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "server:\n  addr: \"127.0.0.1:0\"\nlog:\n  level: info\nupstream:\n  base_url: \"{}\"\n{}",
            up.registry_url,
            server.yaml(prefix, &dir.path().join("spool"))
        );
        let cfg = dir.path().join("cfg.yml");
        std::fs::write(&cfg, yaml).unwrap();
        let (child, addr) = spawn_terrapeak(&cfg);
        Replica {
            child,
            base: format!("http://{addr}"),
            _dir: dir,
        }
    }

    /// Peak resident memory of the process so far, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn zip_url(client: &reqwest::Client, base: &str) -> String {
    let resp = client
        .get(format!(
            "{base}/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: serde_json::Value = resp.json().await.unwrap();
    doc["download_url"].as_str().unwrap().to_owned()
}

/// Short, because s3s-fs keeps per-upload metadata in a file named after the whole key, and
/// file names stop at 255 bytes.
fn unique_prefix(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_by_one_replica_is_a_hit_for_another_that_asks_the_upstream_nothing() {
    let server = S3Server::start();
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let prefix = unique_prefix("shared");
    let (a, b) = (
        Replica::start(&server, &prefix, &up),
        Replica::start(&server, &prefix, &up),
    );
    let client = client();
    let versions = format!("/v1/providers/{NS}/{TYPE}/versions");
    let resp = client
        .get(format!("{}{versions}", a.base))
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    let url = zip_url(&client, &a.base).await;
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    let zip = resp.bytes().await.unwrap();
    assert!(zip == up.zip("1.0.0", "linux", "amd64").1);
    // Let A's publish (after its client got the bytes) land.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = up.total_hits();
    let resp = client
        .get(format!("{}{versions}", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    let url_b = zip_url(&client, &b.base).await;
    assert_eq!(url_b.replace(&b.base, ""), url.replace(&a.base, ""));
    for method in [reqwest::Method::HEAD, reqwest::Method::GET] {
        let resp = client.request(method, &url_b).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
        assert_eq!(
            resp.headers()["content-length"],
            zip.len().to_string().as_str()
        );
        let body = resp.bytes().await.unwrap();
        assert!(body.is_empty() || body == zip);
    }
    assert_eq!(
        up.total_hits(),
        before,
        "the second replica asked the upstream nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_filling_one_key_at_once_both_end_with_the_same_verified_object() {
    let server = S3Server::start();
    let up = FakeUpstream::start(FakeOptions {
        padding: 20 << 20,
        ..Default::default()
    })
    .await;
    let prefix = unique_prefix("race");
    let (a, b) = (
        Replica::start(&server, &prefix, &up),
        Replica::start(&server, &prefix, &up),
    );
    let client = client();
    let (url_a, url_b) = (
        zip_url(&client, &a.base).await,
        zip_url(&client, &b.base).await,
    );
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    let gate = Arc::new(tokio::sync::Notify::new());
    up.set_fault(&zip_path, Fault::Gate(1 << 20, gate.clone()));
    let (ra, rb) = (
        client.get(&url_a).send().await.unwrap(),
        client.get(&url_b).send().await.unwrap(),
    );
    // Both fills are under way; the upstream finishes both together.
    while up.hits(&zip_path) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.notify_waiters();
    let (ba, bb) = tokio::join!(ra.bytes(), rb.bytes());
    let zip = up.zip("1.0.0", "linux", "amd64").1;
    assert!(ba.unwrap() == zip && bb.unwrap() == zip);

    // Each replica publishes; whichever upload lands last, the object is whole and verified.
    let key = format!(
        "providers/registry.terraform.io/{NS}/{TYPE}/1.0.0/{}",
        up.zip("1.0.0", "linux", "amd64").0
    );
    let under = server.root.join(BUCKET).join(&prefix);
    let (data, meta) = (
        under.join(format!("data/{key}")),
        under.join(format!("meta/{key}.json")),
    );
    for _ in 0..200 {
        if meta.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta).expect("a sidecar was published")).unwrap();
    assert!(
        std::fs::read(&data).unwrap() == zip,
        "the stored object is complete and right"
    );
    assert_eq!(sidecar["sha256"], hex::encode(Sha256::digest(&zip)));
    assert_eq!(sidecar["size"], zip.len());
    for url in [&url_a, &url_b] {
        let resp = client.get(url).send().await.unwrap();
        assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
        assert!(resp.bytes().await.unwrap() == zip);
    }
    assert_eq!(up.hits(&zip_path), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_requests_pass_through_and_fills_resume_when_it_returns() {
    let server = S3Server::start();
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let prefix = unique_prefix("outage");
    let proxy = Proxy::start(&up, |c| server.configure(c, &prefix)).await;
    let versions = format!("/v1/providers/{NS}/{TYPE}/versions");
    assert_eq!(proxy.get_json(&versions).await.1.as_deref(), Some("MISS"));
    assert_eq!(proxy.get_json("/readyz").await.0, StatusCode::OK);
    let stored_before = server.object_count(&prefix);

    server.stop();
    // What was read lately is still served from memory.
    let (status, cache, _) = proxy.get_json(&versions).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("HIT")));
    // Anything else comes from the upstream, marked PASS.
    let modules = format!("/v1/modules/{NS}/archive/aws/versions");
    let (status, cache, doc) = proxy.get_json(&modules).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("PASS")));
    assert!(doc["modules"].is_array(), "{doc}");
    // A cold provider end to end: download answer, sums, signature and zip, all verified.
    let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    for (url, want) in [
        (&zip_url, zip.clone()),
        (&sums_url, up.release("1.0.0").sums.clone()),
        (sig_url.as_ref().unwrap(), up.release("1.0.0").sig.clone()),
    ] {
        let resp = proxy.client.get(url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        assert_eq!(cache_status(&resp).as_deref(), Some("PASS"), "{url}");
        assert!(resp.bytes().await.unwrap() == want, "{url}");
    }
    // Still ready (it serves), saying the store is degraded; not ready when a store is required.
    let (status, _, body) = proxy.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["store"]["writable"], false, "{body}");
    assert!(
        body["store"]["degraded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["side"] == "write" && d["reason"] == "store"),
        "{body}"
    );
    let (status, _, body) = proxy.get_json("/readyz?store=required").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["errors"][0].as_str().unwrap().contains("storage"));
    assert_eq!(
        server.object_count(&prefix),
        stored_before,
        "nothing was written"
    );

    server.restart();
    let (status, _, body) = proxy.get_json("/readyz?store=required").await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &"ready".into()));
    // As on every `terraform init`: the download answer, then the artifact.
    assert_eq!(proxy.handed_out("1.0.0", "linux", "amd64").await.0, zip_url);
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(
        cache_status(&resp).as_deref(),
        Some("MISS"),
        "the fill runs again"
    );
    assert!(resp.bytes().await.unwrap() == zip);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert!(resp.bytes().await.unwrap() == zip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_96_mib_artifact_goes_through_s3_in_parts_with_flat_memory() {
    let server = S3Server::start();
    let up = FakeUpstream::start(FakeOptions {
        padding: 96 << 20,
        ..Default::default()
    })
    .await;
    let replica = Replica::start(&server, &unique_prefix("large"), &up);
    let client = client();
    let url = zip_url(&client, &replica.base).await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    let want = Sha256::digest(&zip).to_vec();
    for expected in ["MISS", "HIT"] {
        let mut resp = client.get(&url).send().await.unwrap();
        assert_eq!(cache_status(&resp).as_deref(), Some(expected));
        let mut hasher = Sha256::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            hasher.update(&chunk);
        }
        assert_eq!(hasher.finalize().to_vec(), want);
        // Wait for the multipart upload to complete before the warm read.
        for _ in 0..100 {
            let head = client.head(&url).send().await.unwrap();
            if cache_status(&head).as_deref() == Some("HIT") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let peak_mib = replica.peak_rss_kib() / 1024;
    eprintln!(
        "peak RSS of TerraPeak after a cold and a warm 96 MiB artifact over S3: {peak_mib} MiB"
    );
    assert!(
        peak_mib < 80,
        "memory must not grow with the artifact: peak RSS {peak_mib} MiB"
    );
}

/// Files under `dir` whose name ends with `suffix`.
fn files_ending(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                found.extend(files_ending(&p, suffix));
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_that_fails_is_aborted_and_nothing_is_kept() {
    let server = S3Server::start();
    let up = FakeUpstream::start(FakeOptions {
        padding: 24 << 20,
        ..Default::default()
    })
    .await;
    let prefix = unique_prefix("abort");
    let proxy = Proxy::start(&up, |c| server.configure(c, &prefix)).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    let stored = || files_ending(&server.root.join(BUCKET).join(&prefix), ".zip");

    server.fail_part_uploads(true);
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.bytes().await.unwrap() == zip,
        "the client gets every verified byte whatever the store does"
    );
    for _ in 0..100 {
        if server.aborted_uploads() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.aborted_uploads(), 1, "the failed upload was aborted");
    assert_eq!(server.open_uploads(), 0, "no upload is left open");
    assert!(stored().is_empty(), "nothing was published: {:?}", stored());

    // Once the store takes parts again, the next request fills and keeps the artifact (a
    // request may meet the store's short pause after the failure and pass through first).
    server.fail_part_uploads(false);
    for _ in 0..100 {
        let resp = proxy.client.get(&zip_url).send().await.unwrap();
        assert!(resp.bytes().await.unwrap() == zip);
        if !stored().is_empty() && server.open_uploads() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stored().len(),
        1,
        "the artifact was kept once the store worked"
    );
    assert_eq!(server.open_uploads(), 0);
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert!(resp.bytes().await.unwrap() == zip);
    assert!(up.hits(&zip_path) >= 2, "the failed fill kept nothing");
}
