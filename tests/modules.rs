//! Black-box tests of module caching: archives over http(s) (absolute, relative, and from a JSON
//! `location` body) and git sources served by a real `git http-backend`, by tag, branch, commit
//! and with a `//subdir`.

mod common;

use axum::http::StatusCode;
use common::*;
use std::io::Read;
use std::time::Duration;

/// The tar stream inside a `.tar.gz`.
fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn download_location(proxy: &Proxy, name: &str) -> (StatusCode, Option<String>, String) {
    let resp = proxy
        .client
        .get(proxy.url(&format!("/v1/modules/{NS}/{name}/aws/1.0.0/download")))
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let cache = cache_status(&resp);
    let loc = resp
        .headers()
        .get("x-terraform-get")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cache, loc)
}

#[tokio::test]
async fn every_cacheable_kind_of_module_source_is_served_from_cache_the_second_time() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let fixture = up.modules();
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("archive", "module.tar.gz", None),
        ("relative", "module.tar.gz", None),
        ("jsonloc", "module.zip", None),
        ("gittag", "module.tar.gz", None),
        ("gitbranch", "module.tar.gz", None),
        ("gitsha", "module.tar.gz", None),
        ("gitsub", "module.tar.gz", Some("modules/sub")),
    ];
    for (name, file, subdir) in cases {
        let (status, cache, _) = proxy
            .get_json(&format!("/v1/modules/{NS}/{name}/aws/versions"))
            .await;
        assert_eq!(
            (status, cache.as_deref()),
            (StatusCode::OK, Some("MISS")),
            "{name}"
        );

        let (status, cache, location) = download_location(&proxy, name).await;
        assert_eq!(
            (status, cache.as_deref()),
            (StatusCode::NO_CONTENT, Some("MISS")),
            "{name}"
        );
        let archive_url = format!(
            "{}/artifacts/modules/registry.terraform.io/{NS}/{name}/aws/1.0.0/{file}",
            proxy.base
        );
        let expected_location = match subdir {
            Some(s) => format!("{archive_url}//{s}"),
            None => archive_url.clone(),
        };
        assert_eq!(location, expected_location, "{name}");

        // go-getter asks HEAD first and trusts its length, also on a cold archive.
        let cold_head = proxy.client.head(&archive_url).send().await.unwrap();
        assert_eq!(cold_head.status(), 200, "{name}");
        let cold_len = cold_head.headers()["content-length"]
            .to_str()
            .unwrap()
            .to_owned();
        let resp = proxy.client.get(&archive_url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        let first = resp.bytes().await.unwrap();
        assert_eq!(
            cold_len,
            first.len().to_string(),
            "{name}: HEAD told the true length"
        );
        match *name {
            "archive" | "relative" => assert_eq!(first, fixture.tar_gz, "{name}"),
            "jsonloc" => assert_eq!(first, fixture.zip, "{name}"),
            _ => {
                let tar = gunzip(&first);
                let greeting = match *name {
                    "gitbranch" => "hello from the branch",
                    "gitsha" => "hello from the first commit",
                    _ => "hello from the tag",
                };
                assert!(contains(&tar, greeting), "{name}: wrong tree");
                assert!(contains(&tar, "hello from the subdirectory"), "{name}");
                assert!(!contains(&tar, ".git/"), "{name}: no .git in the archive");
            }
        }

        let before = up.total_hits();
        let (_, cache, again) = download_location(&proxy, name).await;
        assert_eq!(
            (cache.as_deref(), again),
            (Some("HIT"), expected_location),
            "{name}"
        );
        let resp = proxy.client.get(&archive_url).send().await.unwrap();
        assert_eq!(cache_status(&resp).as_deref(), Some("HIT"), "{name}");
        assert_eq!(
            resp.bytes().await.unwrap(),
            first,
            "{name}: same bytes every time"
        );
        let head = proxy.client.head(&archive_url).send().await.unwrap();
        assert_eq!(
            head.headers()["content-length"],
            first.len().to_string().as_str()
        );
        assert_eq!(
            up.total_hits(),
            before,
            "{name}: upstream and git server saw nothing new"
        );
    }
}

/// A git host behind a private CA: git trusts `upstream.ca_file` as TerraPeak's own HTTP client
/// does (git's libcurl reads neither that file nor `SSL_CERT_FILE` by itself). Without the CA,
/// the fill fails cleanly and caches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_host_behind_a_private_ca_is_trusted_through_upstream_ca_file() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let tls = TestTls::new();
    let https = up.serve_artifacts_tls(&tls).await;
    for trusted in [false, true] {
        let proxy = Proxy::start(&up, |c| {
            if trusted {
                c.upstream.ca_file = Some(tls.path("ca.pem"));
            }
        })
        .await;
        for (name, greeting) in [("gittag", Some("hello from the tag")), ("archive", None)] {
            let (status, _, location) = download_location(&proxy, name).await;
            assert_eq!(status, StatusCode::NO_CONTENT, "{name}");
            let resp = proxy.client.get(&location).send().await.unwrap();
            let status = resp.status();
            let body = resp.bytes().await.unwrap();
            if !trusted {
                assert_eq!(status, 502, "{name}: {}", String::from_utf8_lossy(&body));
                continue;
            }
            assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
            match greeting {
                Some(g) => assert!(contains(&gunzip(&body), g), "{name}: wrong tree"),
                None => assert_eq!(body, up.modules().tar_gz, "{name}"),
            }
        }
        if !trusted {
            let dir = proxy.stored_file(&format!(
                "data/modules/registry.terraform.io/{NS}/gittag/aws/1.0.0"
            ));
            let kept: Vec<String> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                kept.iter().all(|f| !f.ends_with(".tar.gz")),
                "no archive kept: {kept:?}"
            );
            assert_eq!(proxy.staged_files_settled().await, 0);
        }
    }
    assert!(up.git_hits() > 0, "the git host at {https} was asked");
}

#[tokio::test]
async fn sources_terrapeak_cannot_fetch_pass_through_unchanged() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (status, _, location) = download_location(&proxy, "ssh").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        location,
        "git::ssh://git@git.example.invalid/repo.git?ref=v1.0.0"
    );
    let resp = proxy
        .get(&format!(
            "/artifacts/modules/registry.terraform.io/{NS}/ssh/aws/1.0.0/module.tar.gz"
        ))
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_branch_is_keyed_by_its_resolved_commit_and_survives_a_git_outage() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.cache.versions_ttl = Duration::ZERO).await;
    let (_, _, location) = download_location(&proxy, "gitbranch").await;
    let tar = gunzip(
        &proxy
            .client
            .get(&location)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    );
    assert!(contains(&tar, "hello from the branch"));

    up.modules().advance_branch("hello from the moved branch");
    let resp = proxy.client.get(&location).send().await.unwrap();
    assert_eq!(
        cache_status(&resp).as_deref(),
        Some("MISS"),
        "a new commit is a new archive"
    );
    assert!(contains(
        &gunzip(&resp.bytes().await.unwrap()),
        "hello from the moved branch"
    ));

    // The git server refuses everything now: the last resolution and its archive still serve.
    for path in ["/git/repo.git/info/refs", "/git/repo.git/git-upload-pack"] {
        up.set_fault(path, Fault::Status(503));
    }
    let resp = proxy.client.get(&location).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert!(contains(
        &gunzip(&resp.bytes().await.unwrap()),
        "hello from the moved branch"
    ));
}

#[tokio::test]
async fn a_truncated_module_archive_is_not_cached() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (_, _, location) = download_location(&proxy, "archive").await;
    up.set_fault("/mods/module.tar.gz", Fault::Truncate);
    let resp = proxy.client.get(&location).send().await.unwrap();
    if resp.status() == 200 {
        assert!(resp.bytes().await.is_err(), "aborted, never complete");
    } else {
        assert_eq!(resp.status(), 502);
    }
    up.clear_faults();
    let resp = proxy.client.get(&location).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    assert_eq!(resp.bytes().await.unwrap(), up.modules().tar_gz);
}

#[tokio::test]
async fn a_damaged_stored_archive_is_never_served_as_good() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (_, _, location) = download_location(&proxy, "archive").await;
    let good = proxy
        .client
        .get(&location)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let key = format!("modules/registry.terraform.io/{NS}/archive/aws/1.0.0/module.tar.gz");
    let stored = proxy.stored_file(&format!("data/{key}"));
    // Kept once its sidecar is (an S3 upload may end after the client has its bytes).
    let sidecar = proxy.stored_file(&format!("meta/{key}.json"));
    for _ in 0..100 {
        if sidecar.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut bytes = std::fs::read(&stored).unwrap();
    assert_eq!(bytes, good);
    bytes[10] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    // Small archives fit in one chunk, so the abort may come before the headers.
    let outcome = match proxy.client.get(&location).send().await {
        Ok(resp) => resp.bytes().await.map(|b| b.len()),
        Err(e) => Err(e),
    };
    assert!(
        outcome.is_err(),
        "the damaged copy ends in an aborted transfer: {outcome:?}"
    );
}

#[tokio::test]
async fn unknown_modules_and_bad_names_are_clean_errors() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (status, _, body) = proxy
        .get_json(&format!("/v1/modules/{NS}/nosuch/aws/1.0.0/download"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    for probe in [
        format!("/v1/modules/{NS}/..%2Fx/aws/versions"),
        format!("/v1/modules/{NS}/archive/aws/1.0/download"),
        format!("/artifacts/modules/registry.terraform.io/{NS}/archive/aws/1.0.0/module.zip"),
        format!("/artifacts/modules/evil.example.com/{NS}/archive/aws/1.0.0/module.tar.gz"),
    ] {
        let resp = proxy.get(&probe).await;
        assert!(
            resp.status().is_client_error(),
            "{probe}: {}",
            resp.status()
        );
    }
}

#[tokio::test]
async fn a_git_failure_on_a_cold_module_is_a_clear_error_and_caches_nothing() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (_, _, location) = download_location(&proxy, "gittag").await;
    for path in ["/git/repo.git/info/refs", "/git/repo.git/git-upload-pack"] {
        up.set_fault(path, Fault::Status(500));
    }
    let resp = proxy.client.get(&location).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["errors"][0].as_str().unwrap().contains("git"),
        "{body}"
    );
    assert_eq!(proxy.staged_files_settled().await, 0);

    up.clear_faults();
    let resp = proxy.client.get(&location).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    assert!(contains(
        &gunzip(&resp.bytes().await.unwrap()),
        "hello from the tag"
    ));
}

/// `gittag` and `gitsub` are two registry modules in one repository at one tag (the second in a
/// `//subdir`): as Terraform does in one `init`, TerraPeak fetches the repository once for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_sharing_a_repository_and_ref_share_one_fetch() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let mut archives = Vec::new();
    let mut costs = Vec::new();
    for name in ["gittag", "gitsub"] {
        let before = up.git_hits();
        let (status, _, location) = download_location(&proxy, name).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{name}");
        let archive = location.split("//modules").next().unwrap().to_owned();
        let resp = proxy.client.get(&archive).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(cache_status(&resp).as_deref(), Some("MISS"), "{name}");
        archives.push(resp.bytes().await.unwrap());
        costs.push(up.git_hits() - before);
    }
    assert!(costs[0] >= 2, "a fetch of the tag: {costs:?}");
    assert_eq!(
        costs[1], 0,
        "the second module's fill asked the git host nothing"
    );
    assert_eq!(archives[0], archives[1], "one tree, the same bytes");
    let tar = gunzip(&archives[1]);
    assert!(contains(&tar, "hello from the tag"));
    assert!(contains(&tar, "hello from the subdirectory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_cold_requests_for_one_git_module_asks_the_git_host_once() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    // What one client costs the git host: one ref resolution and one shallow fetch.
    let single = Proxy::start(&up, |_| {}).await;
    let before = up.git_hits();
    let (_, _, location) = download_location(&single, "gittag").await;
    let one = single.client.get(&location).send().await.unwrap();
    assert_eq!(one.status(), 200);
    let expected = one.bytes().await.unwrap();
    let cost = up.git_hits() - before;
    assert!(cost >= 2, "a resolution and a fetch, at least: {cost}");

    // Sixteen clients of a fresh TerraPeak at once: the same cost, the same bytes.
    let fleet = std::sync::Arc::new(Proxy::start(&up, |_| {}).await);
    let before = up.git_hits();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                let (status, _, location) = download_location(&fleet, "gittag").await;
                assert_eq!(status, StatusCode::NO_CONTENT);
                let resp = fleet.client.get(&location).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap()
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), expected);
    }
    assert_eq!(
        up.git_hits() - before,
        cost,
        "sixteen concurrent cold requests cost the git host what one does"
    );
}
