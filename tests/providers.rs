//! Black-box tests of the provider registry protocol: a real TerraPeak on `127.0.0.1:0` against
//! a fake upstream whose artifacts live on a second listener.

mod common;

use axum::http::StatusCode;
use common::*;
use std::time::Duration;

fn versions_path() -> String {
    format!("/v1/providers/{NS}/{TYPE}/versions")
}

fn download_path(v: &str, os: &str, arch: &str) -> String {
    format!("/v1/providers/{NS}/{TYPE}/{v}/download/{os}/{arch}")
}

#[tokio::test]
async fn version_list_is_a_miss_then_a_hit_without_asking_upstream() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let upstream_path = versions_path();

    let (status, cache, doc) = proxy.get_json(&versions_path()).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("MISS")));
    let versions: Vec<&str> = doc["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.0.0", "1.1.0"]);
    assert_eq!(doc["versions"][0]["protocols"][0], "5.0");
    assert_eq!(doc["id"], "testns/demo", "unknown fields pass through");

    let (status, cache, again) = proxy.get_json(&versions_path()).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("HIT")));
    assert_eq!(again, doc);
    assert_eq!(up.hits(&upstream_path), 1);
    assert_eq!(
        up.hits("/.well-known/terraform.json"),
        1,
        "discovery is cached"
    );
}

#[tokio::test]
async fn download_answer_points_at_terrapeak_and_keeps_every_other_field() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (status, cache, doc) = proxy
        .get_json(&download_path("1.0.0", "linux", "amd64"))
        .await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("MISS")));
    let (name, zip) = up.zip("1.0.0", "linux", "amd64");
    let prefix = format!(
        "{}/artifacts/providers/registry.terraform.io/{NS}/{TYPE}/1.0.0/linux/amd64/",
        proxy.base
    );
    assert_eq!(doc["download_url"], format!("{prefix}{name}"));
    assert_eq!(doc["shasums_url"], format!("{prefix}SHA256SUMS"));
    assert_eq!(
        doc["shasums_signature_url"],
        format!("{prefix}SHA256SUMS.sig")
    );
    assert_eq!(
        doc["shasum"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&zip))
    );
    assert_eq!(doc["filename"], name);
    assert_eq!(doc["x_custom"]["kept"], true);
    assert_eq!(doc["protocols"][0], "5.0");
    assert_eq!(
        doc["signing_keys"]["gpg_public_keys"][0]["key_id"],
        "TESTKEY"
    );

    let (_, cache, again) = proxy
        .get_json(&download_path("1.0.0", "linux", "amd64"))
        .await;
    assert_eq!(cache.as_deref(), Some("HIT"));
    assert_eq!(again, doc);
    assert_eq!(up.hits(&download_path("1.0.0", "linux", "amd64")), 1);
}

#[tokio::test]
async fn server_domain_is_written_into_links() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.server.domain = Some("https://tp.example.com/".into())
    })
    .await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    assert!(
        zip_url.starts_with("https://tp.example.com/artifacts/providers/"),
        "{zip_url}"
    );
}

#[tokio::test]
async fn artifacts_are_fetched_once_then_served_from_the_cache_byte_for_byte() {
    for signing in [Signing::Rsa, Signing::Eddsa] {
        let up = FakeUpstream::start(FakeOptions {
            signing,
            ..Default::default()
        })
        .await;
        let proxy = Proxy::start(&up, |_| {}).await;
        let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "linux", "amd64").await;
        let (_, zip) = up.zip("1.0.0", "linux", "amd64");
        let release = up.release("1.0.0");

        let resp = proxy.client.get(&zip_url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
        assert_eq!(resp.headers()["content-type"], "application/zip");
        assert_eq!(resp.bytes().await.unwrap(), zip, "{signing:?}");

        for _ in 0..2 {
            let resp = proxy.client.get(&zip_url).send().await.unwrap();
            assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
            assert_eq!(
                resp.headers()["content-length"],
                zip.len().to_string().as_str()
            );
            assert_eq!(resp.bytes().await.unwrap(), zip);
        }
        let sums = proxy.client.get(&sums_url).send().await.unwrap();
        assert_eq!(
            cache_status(&sums).as_deref(),
            Some("HIT"),
            "SHA256SUMS was verified and kept during the zip fill"
        );
        assert_eq!(sums.bytes().await.unwrap(), release.sums);
        let sig = proxy.client.get(sig_url.unwrap()).send().await.unwrap();
        assert_eq!(sig.bytes().await.unwrap(), release.sig);

        assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 1);
        assert_eq!(up.hits(&up.sums_path("1.0.0")), 1);
        assert_eq!(up.hits(&up.sig_path("1.0.0")), 1);
        assert_eq!(proxy.staged_files_settled().await, 0);
    }
}

#[tokio::test]
async fn keyless_upstreams_are_checked_by_hash_and_served() {
    let up = FakeUpstream::start(FakeOptions {
        signing: Signing::Keyless,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "darwin", "arm64").await;
    assert_eq!(sig_url, None);
    let (_, zip) = up.zip("1.0.0", "darwin", "arm64");
    assert_eq!(
        proxy
            .client
            .get(&zip_url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        zip
    );
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert_eq!(
        proxy
            .client
            .get(&sums_url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        up.release("1.0.0").sums
    );
    let sig = sums_url.replace("SHA256SUMS", "SHA256SUMS.sig");
    assert_eq!(proxy.client.get(&sig).send().await.unwrap().status(), 404);
}

/// Runs a failing fill, then checks that nothing was kept: the next good request is a MISS that
/// fetches again and gets the right bytes.
async fn assert_failed_fill_leaves_nothing(fault: Fault, expect_error_status: Option<u16>) {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    up.set_fault(&zip_path, fault);

    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    match expect_error_status {
        Some(status) => {
            assert_eq!(resp.status(), status);
            let body: serde_json::Value = resp.json().await.unwrap();
            assert!(body["errors"][0].is_string(), "{body}");
        }
        // Whether the failure shows before the headers go out is a race: either a clean 502,
        // or a 200 whose body is cut off. Never a complete body.
        None if resp.status() == 502 => {
            let body: serde_json::Value = resp.json().await.unwrap();
            assert!(body["errors"][0].is_string(), "{body}");
        }
        None => {
            assert_eq!(resp.status(), 200);
            let body = resp.bytes().await;
            assert!(
                body.is_err(),
                "a bad body must end in an aborted transfer, got {} bytes",
                body.map(|b| b.len()).unwrap_or(0)
            );
        }
    }
    assert_eq!(proxy.staged_files_settled().await, 0, "no staged garbage");

    up.clear_faults();
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(
        cache_status(&resp).as_deref(),
        Some("MISS"),
        "nothing was cached by the failed fill"
    );
    assert_eq!(resp.bytes().await.unwrap(), zip);
    assert_eq!(up.hits(&zip_path), 2);
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
}

#[tokio::test]
async fn truncated_upstream_body_is_aborted_and_not_cached() {
    assert_failed_fill_leaves_nothing(Fault::Truncate, None).await;
}

#[tokio::test]
async fn flipped_bytes_are_aborted_and_not_cached() {
    // The fixture zip is small: nothing of it goes out before it is verified, so the answer
    // is a clean 502, never a cut connection.
    assert_failed_fill_leaves_nothing(Fault::FlipByte, Some(502)).await;
}

#[tokio::test]
async fn upstream_artifact_errors_map_to_gateway_errors_and_are_not_cached() {
    assert_failed_fill_leaves_nothing(Fault::Status(500), Some(502)).await;
    assert_failed_fill_leaves_nothing(Fault::Status(404), Some(404)).await;
}

#[tokio::test]
async fn a_signature_by_an_unlisted_key_refuses_the_release_until_upstream_is_fixed() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    // Before the download answer: serving it fetches the SHA256SUMS and signature at once.
    let sig_path = up.sig_path("1.0.0");
    up.set_fault(
        &sig_path,
        Fault::Body(up.release("1.0.0").foreign_sig.clone()),
    );
    let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "linux", "amd64").await;

    for url in [&zip_url, &sums_url, sig_url.as_ref().unwrap()] {
        let resp = proxy.client.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 502, "{url}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(
            body["errors"][0].as_str().unwrap().contains("not signed"),
            "{body}"
        );
    }
    assert_eq!(
        up.hits(&up.zip_path("1.0.0", "linux", "amd64")),
        0,
        "no zip download for an unverified release"
    );

    up.clear_faults();
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    assert_eq!(
        resp.bytes().await.unwrap(),
        up.zip("1.0.0", "linux", "amd64").1
    );
    let sig = proxy
        .client
        .get(sig_url.unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sig, up.release("1.0.0").sig);
}

#[tokio::test]
async fn tampered_sums_are_refused() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let mut sums = up.release("1.0.0").sums.to_vec();
    sums[0] = if sums[0] == b'0' { b'1' } else { b'0' };
    // Before the download answer, which fetches the SHA256SUMS at once.
    up.set_fault(&up.sums_path("1.0.0"), Fault::Body(sums.into()));
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    assert_eq!(
        proxy.client.get(&zip_url).send().await.unwrap().status(),
        502
    );
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 0);
}

#[tokio::test]
async fn head_and_ranges_on_cold_and_warm_artifacts() {
    let up = FakeUpstream::start(FakeOptions {
        padding: 200_000,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    let len = zip.len();

    let head = proxy.client.head(&zip_url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], len.to_string().as_str());
    assert_eq!(head.headers()["accept-ranges"], "bytes");
    assert!(head.bytes().await.unwrap().is_empty());

    // A range while the object may still be filling, then once it is cached.
    for expect in ["MISS", "HIT"] {
        let resp = proxy
            .client
            .get(&zip_url)
            .header("range", "bytes=100-199")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206);
        let status = cache_status(&resp).unwrap();
        assert!(
            status == expect || (expect == "MISS" && status == "HIT"),
            "{status}"
        );
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes 100-199/{len}").as_str()
        );
        assert_eq!(resp.bytes().await.unwrap(), zip.slice(100..200));
    }
    let resp = proxy
        .client
        .get(&zip_url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), zip.slice(len - 10..));
    let resp = proxy
        .client
        .get(&zip_url)
        .header("range", format!("bytes={len}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{len}").as_str()
    );
    let head = proxy.client.head(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&head).as_deref(), Some("HIT"));
    assert_eq!(head.headers()["content-length"], len.to_string().as_str());
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 1);
}

#[tokio::test]
async fn the_first_client_receives_bytes_while_the_fill_is_still_running() {
    let GatedZip {
        proxy,
        zip_url,
        zip,
        gate,
        ..
    } = GatedZip::start(2 << 20).await;

    let mut resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(
        resp.headers()["content-length"],
        zip.len().to_string().as_str()
    );
    let mut received = Vec::new();
    // The upstream is holding back its second half; the client must already see the first.
    while received.len() < 512 * 1024 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("bytes arrive before the upstream finished")
            .unwrap()
            .unwrap();
        received.extend_from_slice(&chunk);
    }
    assert!(received.len() < zip.len());
    gate.notify_one();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received, zip);
}

/// Waits until the upstream served a release's SHA256SUMS and signature once each.
async fn wait_for_prefetch(up: &FakeUpstream, version: &str) {
    for _ in 0..200 {
        if up.hits(&up.sums_path(version)) == 1 && up.hits(&up.sig_path(version)) == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("SHA256SUMS and its signature were not prefetched");
}

#[tokio::test]
async fn a_download_answer_prefetches_sha256sums_and_its_signature() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, sums_url, sig_url) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    // Fetched, verified and kept without being asked for.
    wait_for_prefetch(&up, "1.0.0").await;
    // Kept once its sidecar is written (after its bytes).
    let sums_key =
        format!("meta/providers/registry.terraform.io/{NS}/{TYPE}/1.0.0/SHA256SUMS.json");
    for _ in 0..200 {
        if proxy.stored_file(&sums_key).exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(proxy.stored_file(&sums_key).exists(), "{sums_key} kept");
    let release = up.release("1.0.0");
    for (url, want) in [(sums_url, &release.sums), (sig_url.unwrap(), &release.sig)] {
        let resp = proxy.client.get(&url).send().await.unwrap();
        assert_eq!(cache_status(&resp).as_deref(), Some("HIT"), "{url}");
        assert_eq!(&resp.bytes().await.unwrap(), want);
    }
    // The zip's fill uses them: no second fetch.
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    assert_eq!(
        proxy
            .client
            .get(&zip_url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        zip
    );
    assert_eq!(up.hits(&up.sums_path("1.0.0")), 1);
    assert_eq!(up.hits(&up.sig_path("1.0.0")), 1);
    // Another platform of the same release: its answer is fetched, the sums are not again.
    proxy.handed_out("1.0.0", "darwin", "arm64").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(up.hits(&up.sums_path("1.0.0")), 1);
}

#[tokio::test]
async fn probes_for_foreign_hosts_traversal_and_unknown_files_get_4xx_and_touch_nothing() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    // The answer's SHA256SUMS and signature are prefetched: let that finish first.
    wait_for_prefetch(&up, "1.0.0").await;
    let before = up.total_hits();
    let art = format!("/artifacts/providers/registry.terraform.io/{NS}/{TYPE}/1.0.0/linux/amd64");
    let long = "a".repeat(5000);
    let probes = [
        // Hosts TerraPeak never learned from an upstream.
        format!("/artifacts/providers/evil.example.com/{NS}/{TYPE}/1.0.0/linux/amd64/x.zip"),
        format!("/artifacts/providers/127.0.0.1:1/{NS}/{TYPE}/1.0.0/linux/amd64/SHA256SUMS"),
        format!("/artifacts/providers/user@evil.example.com/{NS}/{TYPE}/1.0.0/linux/amd64/x.zip"),
        // Traversal, encoded separators, NUL.
        format!("{art}/..%2F..%2F..%2Fetc%2Fpasswd"),
        format!("{art}/%2e%2e"),
        format!(
            "/artifacts/providers/registry.terraform.io/{NS}/..%2F..%2Fdata/1.0.0/linux/amd64/x.zip"
        ),
        format!("{art}/x%00.zip"),
        format!("/v1/providers/..%2F..%2Fetc/{TYPE}/versions"),
        format!("/v1/providers/{NS}/{TYPE}/..%2F1.0.0/download/linux/amd64"),
        format!("/v1/providers/{NS}/{TYPE}/1.0.0/download/linux%2F..%2F../amd64"),
        "/artifacts/../../etc/passwd".to_owned(),
        format!("/{long}"),
        // Well-formed names that were never handed out.
        format!("{art}/terraform-provider-other_1.0.0_linux_amd64.zip"),
        format!(
            "/artifacts/providers/registry.terraform.io/{NS}/{TYPE}/1.1.0/linux/amd64/SHA256SUMS"
        ),
        format!(
            "/artifacts/providers/registry.terraform.io/{NS}/{TYPE}/1.0.0/linux/arm64/SHA256SUMS"
        ),
        "/artifacts/anything".to_owned(),
    ];
    for probe in &probes {
        let resp = proxy.client.get(proxy.url(probe)).send().await.unwrap();
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{probe}: {status}");
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        assert!(body["errors"][0].is_string(), "{probe}: {body}");
    }
    assert_eq!(up.total_hits(), before, "no probe reached the upstream");
    // The real artifact still works afterwards.
    assert_eq!(
        proxy.client.get(&zip_url).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn upstream_failures_map_to_clear_statuses_and_are_never_cached() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.upstream.metadata_timeout = Duration::from_millis(500);
        c.upstream.retry_backoff = Duration::from_millis(10);
    })
    .await;

    let (status, _, body) = proxy
        .get_json(&format!("/v1/providers/{NS}/nope/versions"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["errors"][0].is_string());
    let (status, _, _) = proxy
        .get_json(&download_path("9.9.9", "linux", "amd64"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    up.set_fault(&versions_path(), Fault::Status(500));
    let (status, _, body) = proxy.get_json(&versions_path()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body["errors"][0].as_str().unwrap().contains("500"));
    assert_eq!(up.hits(&versions_path()), 3, "two retries for metadata");

    up.set_fault(&versions_path(), Fault::Status(429));
    assert_eq!(
        proxy.get_json(&versions_path()).await.0,
        StatusCode::BAD_GATEWAY
    );

    up.set_fault(&versions_path(), Fault::Stall(Duration::from_secs(3)));
    let (status, _, body) = proxy.get_json(&versions_path()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");

    up.clear_faults();
    let (status, cache, _) = proxy.get_json(&versions_path()).await;
    assert_eq!(
        (status, cache.as_deref()),
        (StatusCode::OK, Some("MISS")),
        "errors were not cached"
    );
}

#[tokio::test]
async fn expired_version_lists_are_served_at_once_and_refreshed_in_the_background() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.cache.versions_ttl = Duration::ZERO).await;
    let (_, cache, doc) = proxy.get_json(&versions_path()).await;
    assert_eq!(cache.as_deref(), Some("MISS"));

    // Past the TTL the upstream stalls: the client still gets its answer at once.
    up.set_fault(&versions_path(), Fault::Stall(Duration::from_secs(2)));
    let started = std::time::Instant::now();
    let (status, cache, stale) = proxy.get_json(&versions_path()).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("STALE")));
    assert_eq!(stale, doc);
    let (_, cache, _) = proxy.get_json(&versions_path()).await;
    assert_eq!(cache.as_deref(), Some("STALE"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "nobody waited for the refresh"
    );
    // Both requests share one background refresh.
    for _ in 0..100 {
        if up.hits(&versions_path()) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(up.hits(&versions_path()), 2);

    // An upstream that fails keeps the stale copy in service.
    for code in [500, 429, 503] {
        up.set_fault(&versions_path(), Fault::Status(code));
        let (status, cache, stale) = proxy.get_json(&versions_path()).await;
        assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("STALE")));
        assert_eq!(stale, doc);
    }
}

#[tokio::test]
async fn max_stale_bounds_how_old_a_served_version_list_may_be() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.cache.versions_ttl = Duration::ZERO;
        c.cache.max_stale = Some(Duration::ZERO);
    })
    .await;
    assert_eq!(proxy.get_json(&versions_path()).await.0, StatusCode::OK);
    up.set_fault(&versions_path(), Fault::Status(503));
    let (status, _, body) = proxy.get_json(&versions_path()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
}

#[tokio::test]
async fn a_restarted_terrapeak_serves_what_the_previous_one_cached() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let mut proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let zip = proxy
        .client
        .get(&zip_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    proxy
        .server
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1))
        .await
        .unwrap();

    let config = config_for(&up, proxy.data_dir.path());
    let server = terrapeak::server::Server::start(&config).await.unwrap();
    let zip_url = zip_url.replace(&proxy.base, &server.base_url());
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert_eq!(resp.bytes().await.unwrap(), zip);
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 1);
}

#[tokio::test]
async fn discovery_health_and_request_ids() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (status, _, doc) = proxy.get_json("/.well-known/terraform.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["providers.v1"], "/v1/providers/");
    assert_eq!(proxy.get_json("/healthz").await.0, StatusCode::OK);
    assert_eq!(proxy.get_json("/readyz").await.0, StatusCode::OK);

    let resp = proxy
        .client
        .get(proxy.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let resp = proxy.get("/healthz").await;
    assert_eq!(resp.headers()["x-request-id"].len(), 36, "a generated id");
    let resp = proxy
        .client
        .post(proxy.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_share_one_upstream_download() {
    let GatedZip {
        up,
        proxy,
        zip_url,
        zip,
        zip_path,
        gate,
    } = GatedZip::start(4 << 20).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (client, url) = (proxy.client.clone(), zip_url.clone());
        clients.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().bytes().await.unwrap()
        }));
    }
    // Let every client join the fill while the upstream holds back, then release it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.notify_one();
    for c in clients {
        assert_eq!(c.await.unwrap(), zip);
    }
    assert_eq!(
        up.hits(&zip_path),
        1,
        "one upstream download for all twenty clients"
    );
}

#[tokio::test]
async fn a_failing_upstream_trips_the_circuit_then_one_probe_closes_it() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.upstream.breaker_threshold = 3;
        c.upstream.breaker_cooldown = Duration::from_millis(600);
        c.upstream.retry_backoff = Duration::from_millis(10);
    })
    .await;
    // Discovery once, while the upstream is healthy.
    assert_eq!(proxy.get_json(&versions_path()).await.0, StatusCode::OK);
    let download = download_path("1.0.0", "linux", "amd64");
    up.set_fault(&download, Fault::Status(503));
    for _ in 0..3 {
        assert_eq!(proxy.get_json(&download).await.0, StatusCode::BAD_GATEWAY);
    }
    let asked = up.hits(&download);
    assert_eq!(asked, 9, "three requests, two retries each");

    // Open: answered at once, without asking the upstream.
    let (status, _, body) = proxy.get_json(&download).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("keeps failing"),
        "{body}"
    );
    assert_eq!(up.hits(&download), asked);
    // Cached answers are unaffected.
    assert_eq!(proxy.get_json(&versions_path()).await.0, StatusCode::OK);

    // After the cooldown one probe goes through; it succeeds and the circuit closes.
    up.clear_faults();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, cache, _) = proxy.get_json(&download).await;
    assert_eq!((status, cache.as_deref()), (StatusCode::OK, Some("MISS")));
    assert_eq!(
        proxy
            .get_json(&download_path("1.1.0", "linux", "amd64"))
            .await
            .0,
        StatusCode::OK
    );
}
