//! Several upstreams at once, and transparent mode: the registry protocol of one named upstream
//! under `/r/{host}/`, from one cache that never mixes hosts.

mod common;

use axum::http::StatusCode;
use common::*;
use terrapeak::config::{Secret, UpstreamEntry};

async fn two_upstreams() -> (FakeUpstream, FakeUpstream, Proxy) {
    let tf = FakeUpstream::start(FakeOptions {
        label: "from terraform",
        ..Default::default()
    })
    .await;
    let tofu = FakeUpstream::start(FakeOptions {
        label: "from opentofu",
        signing: Signing::Keyless,
        ..Default::default()
    })
    .await;
    let tofu_url = tofu.registry_url.clone();
    let proxy = Proxy::start(&tf, |c| {
        c.upstreams.push(UpstreamEntry {
            host: "registry.opentofu.org".into(),
            base_url: Some(tofu_url),
            token: Secret::new("api-secret"),
            artifact_token: Secret::new("artifact-secret"),
            public: true,
        })
    })
    .await;
    (tf, tofu, proxy)
}

#[tokio::test]
async fn each_front_door_serves_the_bytes_of_its_own_upstream() {
    let (tf, tofu, proxy) = two_upstreams().await;
    assert_ne!(
        tf.zip("1.0.0", "linux", "amd64").1,
        tofu.zip("1.0.0", "linux", "amd64").1
    );
    let doors = [
        ("", "registry.terraform.io", &tf),
        ("/r/registry.terraform.io", "registry.terraform.io", &tf),
        ("/r/registry.opentofu.org", "registry.opentofu.org", &tofu),
    ];
    for (prefix, host, fake) in doors {
        let (status, _, versions) = proxy
            .get_json(&format!("{prefix}/v1/providers/{NS}/{TYPE}/versions"))
            .await;
        assert_eq!(status, StatusCode::OK, "{prefix}: {versions}");
        assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
        let (status, _, doc) = proxy
            .get_json(&format!(
                "{prefix}/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{prefix}: {doc}");
        let zip_url = doc["download_url"].as_str().unwrap();
        assert!(
            zip_url.contains(&format!("/artifacts/providers/{host}/")),
            "{zip_url}"
        );
        let got = proxy
            .client
            .get(zip_url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(got, fake.zip("1.0.0", "linux", "amd64").1, "{prefix}");

        let resp = proxy
            .get(&format!(
                "{prefix}/v1/modules/{NS}/gittag/aws/1.0.0/download"
            ))
            .await;
        assert_eq!(resp.status(), 204, "{prefix}");
        let loc = resp.headers()["x-terraform-get"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            loc.contains(&format!("/artifacts/modules/{host}/")),
            "{loc}"
        );
    }
    assert_eq!(
        tf.hits(&tf.zip_path("1.0.0", "linux", "amd64")),
        1,
        "the two terraform doors share one cache entry"
    );
    assert_eq!(tofu.hits(&tofu.zip_path("1.0.0", "linux", "amd64")), 1);
}

#[tokio::test]
async fn hosts_that_are_not_configured_are_refused_without_any_request() {
    let (tf, tofu, proxy) = two_upstreams().await;
    for path in [
        format!("/r/evil.example.com/v1/providers/{NS}/{TYPE}/versions"),
        format!("/r/127.0.0.1:1/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"),
        format!("/r/evil.example.com/v1/modules/{NS}/gittag/aws/versions"),
        format!("/r/..%2F/v1/providers/{NS}/{TYPE}/versions"),
    ] {
        let resp = proxy.get(&path).await;
        assert!(resp.status().is_client_error(), "{path}: {}", resp.status());
    }
    assert_eq!(tf.total_hits() + tofu.total_hits(), 0);
}

#[tokio::test]
async fn mirror_answers_list_every_platform_with_zh_cold_and_h1_after_a_download() {
    let (tf, tofu, proxy) = two_upstreams().await;
    for (host, fake) in [
        ("registry.terraform.io", &tf),
        ("registry.opentofu.org", &tofu),
    ] {
        let resp = proxy
            .get(&format!("/v1/mirror/{host}/{NS}/{TYPE}/index.json"))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let index: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            index,
            serde_json::json!({"versions": {"1.0.0": {}, "1.1.0": {}}})
        );

        let (status, _, doc) = proxy
            .get_json(&format!("/v1/mirror/{host}/{NS}/{TYPE}/1.0.0.json"))
            .await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        let archives = doc["archives"].as_object().unwrap();
        assert_eq!(archives.len(), PLATFORMS.len(), "{doc}");
        for (os, arch) in PLATFORMS {
            let (_, zip) = fake.zip("1.0.0", os, arch);
            let entry = &archives[&format!("{os}_{arch}")];
            let zh = format!(
                "zh:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&zip))
            );
            assert_eq!(
                entry["hashes"],
                serde_json::json!([zh]),
                "{host} {os}_{arch}: cold answer has zh: only"
            );
            assert!(
                entry["url"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("/artifacts/providers/{host}/"))
            );
        }
        assert_eq!(
            fake.hits(&fake.zip_path("1.0.0", "linux", "amd64")),
            0,
            "a cold mirror answer never waits for a zip"
        );

        let url = archives["linux_amd64"]["url"].as_str().unwrap().to_owned();
        let zip = proxy
            .client
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(zip, fake.zip("1.0.0", "linux", "amd64").1);
        // Once the zip is kept (an S3 upload may finish after the client has its bytes).
        let mut doc = serde_json::Value::Null;
        for _ in 0..100 {
            doc = proxy
                .get_json(&format!("/v1/mirror/{host}/{NS}/{TYPE}/1.0.0.json"))
                .await
                .2;
            if doc["archives"]["linux_amd64"]["hashes"]
                .as_array()
                .unwrap()
                .len()
                == 2
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let hashes = doc["archives"]["linux_amd64"]["hashes"].as_array().unwrap();
        assert_eq!(hashes.len(), 2, "{doc}");
        assert!(hashes[0].as_str().unwrap().starts_with("h1:"), "{doc}");
        assert_eq!(
            doc["archives"]["darwin_arm64"]["hashes"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
    let resp = proxy
        .get(&format!(
            "/v1/mirror/registry.terraform.io/{NS}/{TYPE}/9.9.9.json"
        ))
        .await;
    assert_eq!(resp.status(), 404);
    let resp = proxy
        .get(&format!(
            "/v1/mirror/evil.example.com/{NS}/{TYPE}/index.json"
        ))
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn registry_tokens_go_to_the_registry_and_artifact_tokens_to_artifact_hosts_only() {
    let (tf, tofu, proxy) = two_upstreams().await;
    let (status, _, doc) = proxy
        .get_json(&format!(
            "/r/registry.opentofu.org/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let zip = proxy
        .client
        .get(doc["download_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), 200);
    zip.bytes().await.unwrap();
    let seen = tofu.authorizations();
    assert!(!seen.is_empty());
    for (path, auth) in seen {
        let expected = if path.starts_with("/files/") {
            "Bearer artifact-secret"
        } else {
            "Bearer api-secret"
        };
        assert_eq!(auth.as_deref(), Some(expected), "{path}");
    }
    assert!(
        tf.authorizations().iter().all(|(_, a)| a.is_none()),
        "no token configured for the other upstream"
    );
}
