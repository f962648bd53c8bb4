//! The admin API: every route, its scope rules, and a property-based run of the whole API from
//! its OpenAPI document (schemathesis).

mod common;

use common::{FakeOptions, FakeUpstream, NS, Proxy, TYPE};
use reqwest::StatusCode;
use serde_json::Value;
use terrapeak::config::{AuthConfig, Secret, TokenConfig};

const ADMIN_TOKEN: &str = "admin-token-for-tests";
const READ_TOKEN: &str = "read-token-for-tests";
const HOST: &str = "registry.terraform.io";

fn with_auth(c: &mut terrapeak::config::Config) {
    c.auth = Some(AuthConfig {
        tokens: vec![
            TokenConfig {
                name: "ops".into(),
                token: Secret::new(ADMIN_TOKEN),
                scopes: vec!["admin".into()],
                ..Default::default()
            },
            TokenConfig {
                name: "ci".into(),
                token: Secret::new(READ_TOKEN),
                scopes: vec!["read".into()],
                ..Default::default()
            },
        ],
        url_signing_keys: vec![Secret::new("0123456789abcdef0123456789abcdef")],
        ..Default::default()
    });
}

struct Admin {
    base: String,
    token: Option<&'static str>,
    client: reqwest::Client,
}

impl Admin {
    /// The admin listener (`admin.addr`) of `proxy`, without a token.
    fn listener(proxy: &Proxy) -> Admin {
        Admin {
            base: format!(
                "http://{}",
                proxy.server.as_ref().unwrap().admin_addr().unwrap()
            ),
            token: None,
            client: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path).await
    }
}

/// Fetches a provider platform through TerraPeak (answer, then zip) with the read token when
/// access control is on.
async fn fetch_zip(
    proxy: &Proxy,
    token: Option<&str>,
    version: &str,
    os: &str,
    arch: &str,
) -> Option<String> {
    let (status, cache, _) = proxy.fetch_zip(token, version, os, arch).await;
    assert_eq!(status, StatusCode::OK);
    cache
}

async fn settle(proxy: &Proxy, key: &str) {
    for _ in 0..100 {
        if proxy.stored_file(&format!("data/{key}")).exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{key} never stored");
}

fn zip_key(version: &str, os: &str, arch: &str) -> String {
    format!(
        "providers/{HOST}/{NS}/{TYPE}/{version}/terraform-provider-{TYPE}_{version}_{os}_{arch}.zip"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_access_control_the_admin_api_is_only_on_its_own_listener() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.admin.addr = Some("127.0.0.1:0".into())).await;
    let (status, _, body) = proxy.get_json("/admin/v1/stats").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let admin = Admin::listener(&proxy);
    let (status, body) = admin.get("/admin/v1/stats").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Nothing else is served there.
    let (status, _) = admin
        .get(&format!("/v1/providers/{NS}/{TYPE}/versions"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_access_control_every_route_needs_the_admin_scope() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        with_auth(c);
        c.admin.addr = Some("127.0.0.1:0".into());
    })
    .await;
    let admin_listener = format!(
        "http://{}",
        proxy.server.as_ref().unwrap().admin_addr().unwrap()
    );
    let routes = [
        (reqwest::Method::GET, "/admin/v1/openapi.json".to_owned()),
        (reqwest::Method::GET, "/admin/v1/inventory".to_owned()),
        (reqwest::Method::GET, "/admin/v1/stats".to_owned()),
        (
            reqwest::Method::DELETE,
            format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}/1.0.0"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/admin/v1/modules/{HOST}/{NS}/archive/aws/1.0.0"),
        ),
        (
            reqwest::Method::PUT,
            format!("/admin/v1/pins/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/admin/v1/pins/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"),
        ),
        (
            reqwest::Method::PUT,
            format!("/admin/v1/pins/modules/{HOST}/{NS}/archive/aws/1.0.0"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/admin/v1/pins/modules/{HOST}/{NS}/archive/aws/1.0.0"),
        ),
        (
            reqwest::Method::POST,
            format!("/admin/v1/refresh/providers/{HOST}/{NS}/{TYPE}"),
        ),
        (
            reqwest::Method::POST,
            format!("/admin/v1/refresh/modules/{HOST}/{NS}/archive/aws"),
        ),
    ];
    for base in [proxy.base.clone(), admin_listener] {
        for (token, want) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some(READ_TOKEN), StatusCode::FORBIDDEN),
        ] {
            let admin = Admin {
                base: base.clone(),
                token,
                client: reqwest::Client::new(),
            };
            for (method, path) in &routes {
                let (status, body) = admin.call(method.clone(), path).await;
                assert_eq!(status, want, "{method} {base}{path}: {body}");
                assert!(body["errors"][0].is_string(), "{body}");
            }
        }
        let admin = Admin {
            base: base.clone(),
            token: Some(ADMIN_TOKEN),
            client: reqwest::Client::new(),
        };
        for (method, path) in &routes {
            let (status, body) = admin.call(method.clone(), path).await;
            assert!(
                status == StatusCode::OK || status == StatusCode::NOT_FOUND,
                "{method} {path}: {status} {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_stats_purge_pins_and_refresh_do_what_they_say() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, with_auth).await;
    let token = Some(READ_TOKEN);
    for (os, arch) in [("linux", "amd64"), ("darwin", "arm64")] {
        assert_eq!(
            fetch_zip(&proxy, token, "1.0.0", os, arch).await.as_deref(),
            Some("MISS")
        );
        settle(&proxy, &zip_key("1.0.0", os, arch)).await;
    }
    assert_eq!(
        fetch_zip(&proxy, token, "1.0.0", "linux", "amd64")
            .await
            .as_deref(),
        Some("HIT")
    );
    // A module too.
    let loc = proxy
        .client
        .get(proxy.url(&format!("/v1/modules/{NS}/archive/aws/1.0.0/download")))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    let location = loc.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .to_owned();
    proxy
        .client
        .get(&location)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    settle(
        &proxy,
        &format!("modules/{HOST}/{NS}/archive/aws/1.0.0/module.tar.gz"),
    )
    .await;

    let admin = Admin {
        base: proxy.base.clone(),
        token: Some(ADMIN_TOKEN),
        client: reqwest::Client::new(),
    };
    // The inventory: three units, filtered and paged.
    let (status, inv) = admin.get("/admin/v1/inventory").await;
    assert_eq!(status, StatusCode::OK, "{inv}");
    assert_eq!(inv["total"], 3, "{inv}");
    let (_, providers) = admin.get("/admin/v1/inventory?kind=provider").await;
    assert_eq!(providers["total"], 2);
    for item in providers["items"].as_array().unwrap() {
        assert_eq!(item["name"], format!("{NS}/{TYPE}"));
        assert_eq!(item["version"], "1.0.0");
        assert!(item["size"].as_u64().unwrap() > 0);
    }
    let (_, page) = admin
        .get("/admin/v1/inventory?kind=provider&limit=1&offset=1")
        .await;
    assert_eq!(
        (
            page["total"].as_u64(),
            page["items"].as_array().unwrap().len()
        ),
        (Some(2), 1)
    );
    let (status, _) = admin.get("/admin/v1/inventory?kind=nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, modules) = admin
        .get(&format!(
            "/admin/v1/inventory?kind=module&name={NS}/archive"
        ))
        .await;
    assert_eq!(modules["total"], 1, "{modules}");

    // Totals and the hit ratio of what happened above: one zip HIT among the cache's answers.
    let (_, stats) = admin.get("/admin/v1/stats").await;
    assert_eq!(stats["units"], 3, "{stats}");
    let (hits, misses) = (
        stats["hits"].as_u64().unwrap(),
        stats["misses"].as_u64().unwrap(),
    );
    assert!(hits >= 1 && misses >= 4, "{stats}");
    let ratio = stats["hit_ratio"].as_f64().unwrap();
    assert!(
        (ratio - hits as f64 / (hits + misses) as f64).abs() < 1e-9,
        "{stats}"
    );

    // Pins: shown in the inventory, kept by eviction, removable.
    let pin = format!("/admin/v1/pins/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64");
    let (status, body) = admin.call(reqwest::Method::PUT, &pin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, pinned) = admin.get("/admin/v1/inventory?pinned=true").await;
    assert_eq!(pinned["total"], 1, "{pinned}");
    assert_eq!(pinned["items"][0]["platform"], "linux_amd64");
    let cache = proxy.server.as_ref().unwrap().cache().clone();
    let limits = terrapeak::inventory::Limits {
        max_size: Some(1),
        unused_after: None,
    };
    let report = cache.gc(limits, false, false).await.unwrap();
    let gone: Vec<String> = report.evicted.iter().map(|e| e.unit.label()).collect();
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(
        proxy
            .stored_file(&format!("data/{}", zip_key("1.0.0", "linux", "amd64")))
            .exists()
    );
    assert!(
        !proxy
            .stored_file(&format!("data/{}", zip_key("1.0.0", "darwin", "arm64")))
            .exists()
    );
    let (status, _) = admin.call(reqwest::Method::DELETE, &pin).await;
    assert_eq!(status, StatusCode::OK);
    let (_, pinned) = admin.get("/admin/v1/inventory?pinned=true").await;
    assert_eq!(pinned["total"], 0);

    // Purge one platform: gone, and fetched again on the next request.
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    let before = up.hits(&zip_path);
    let (status, report) = admin
        .call(
            reqwest::Method::DELETE,
            &format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        report["removed"][0],
        format!("{HOST}/{NS}/{TYPE} 1.0.0 linux_amd64")
    );
    assert!(
        !proxy
            .stored_file(&format!("data/{}", zip_key("1.0.0", "linux", "amd64")))
            .exists()
    );
    // Nothing left to match: a 404.
    let (status, _) = admin
        .call(
            reqwest::Method::DELETE,
            &format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The last platform took SHA256SUMS and its signature with it.
    assert!(
        !proxy
            .stored_file(&format!(
                "data/providers/{HOST}/{NS}/{TYPE}/1.0.0/SHA256SUMS"
            ))
            .exists()
    );
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_eq!(
        fetch_zip(&proxy, token, "1.0.0", "linux", "amd64")
            .await
            .as_deref(),
        Some("MISS")
    );
    assert_eq!(up.hits(&zip_path), before + 1);
    settle(&proxy, &zip_key("1.0.0", "linux", "amd64")).await;

    // Purge a whole provider: its version list goes too.
    let (status, _) = admin
        .call(
            reqwest::Method::DELETE,
            &format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !proxy
            .stored_file(&format!("data/providers/{HOST}/{NS}/{TYPE}/versions.json"))
            .exists()
    );
    // A module version (evicted above: fetched again first, download answer then archive).
    proxy
        .client
        .get(proxy.url(&format!("/v1/modules/{NS}/archive/aws/1.0.0/download")))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    proxy
        .client
        .get(&location)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    settle(
        &proxy,
        &format!("modules/{HOST}/{NS}/archive/aws/1.0.0/module.tar.gz"),
    )
    .await;
    let (status, report) = admin
        .call(
            reqwest::Method::DELETE,
            &format!("/admin/v1/modules/{HOST}/{NS}/archive/aws/1.0.0"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, inv) = admin.get("/admin/v1/inventory").await;
    assert_eq!(inv["total"], 0, "{inv}");

    // Refresh: the version list is fetched from upstream now, although it is fresh.
    let versions = format!("/v1/providers/{NS}/{TYPE}/versions");
    let before = up.hits(&versions);
    let (status, body) = admin
        .call(
            reqwest::Method::POST,
            &format!("/admin/v1/refresh/providers/{HOST}/{NS}/{TYPE}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["document"]["versions"].is_array(), "{body}");
    let (status, _) = admin
        .call(
            reqwest::Method::POST,
            &format!("/admin/v1/refresh/providers/{HOST}/{NS}/{TYPE}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.hits(&versions), before + 2);
    // An upstream TerraPeak does not know, and bad names.
    let (status, _) = admin
        .call(
            reqwest::Method::POST,
            &format!("/admin/v1/refresh/providers/example.com/{NS}/{TYPE}"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = admin
        .call(
            reqwest::Method::PUT,
            &format!("/admin/v1/pins/providers/{HOST}/{NS}/{TYPE}/latest/linux/amd64"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_terrapeak_refuses_refreshes() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.cache.offline = true;
        c.admin.addr = Some("127.0.0.1:0".into());
    })
    .await;
    let admin = Admin::listener(&proxy);
    let (status, body) = admin
        .call(
            reqwest::Method::POST,
            &format!("/admin/v1/refresh/providers/{HOST}/{NS}/{TYPE}"),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(up.total_hits(), 0);
}

/// schemathesis from `SCHEMATHESIS_BIN`, the venv `scripts/test` makes, or the PATH.
fn schemathesis() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("SCHEMATHESIS_BIN") {
        return p.into();
    }
    let venv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/st-venv/bin/schemathesis");
    if venv.is_file() {
        return venv;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("schemathesis"))
                .find(|p| p.is_file())
        })
        .expect(
            "schemathesis is needed: set SCHEMATHESIS_BIN or run scripts/test, which installs it",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_api_keeps_to_its_openapi_document() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        with_auth(c);
        c.admin.addr = Some("127.0.0.1:0".into());
    })
    .await;
    // Something stored, so the inventory and purges have data.
    fetch_zip(&proxy, Some(READ_TOKEN), "1.0.0", "linux", "amd64").await;
    settle(&proxy, &zip_key("1.0.0", "linux", "amd64")).await;
    let base = format!(
        "http://{}",
        proxy.server.as_ref().unwrap().admin_addr().unwrap()
    );
    let bin = schemathesis();
    let work = tempfile::tempdir().unwrap();
    // A path past TerraPeak's limit is refused with 414 URI Too Long, which is a rejection too.
    std::fs::write(
        work.path().join("schemathesis.toml"),
        "[checks.negative_data_rejection]\nexpected-statuses = [400, 401, 403, 404, 405, 406, 409, 414, 415, 422, 428, 429]\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(bin)
        .current_dir(work.path())
        .args([
            "run",
            &format!("{base}/admin/v1/openapi.json"),
            "--checks",
            "all",
            "--max-examples",
            "25",
            "--workers",
            "2",
            "--seed",
            "1",
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        ])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("12 passed") || report.contains("passed"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_right_after_a_fill_is_not_served_from_that_fill() {
    // A finished fill lingers a few seconds for late joiners; a purge must not leave its copy
    // answering as a hit.
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.admin.addr = Some("127.0.0.1:0".into())).await;
    assert_eq!(
        fetch_zip(&proxy, None, "1.0.0", "linux", "amd64")
            .await
            .as_deref(),
        Some("MISS")
    );
    settle(&proxy, &zip_key("1.0.0", "linux", "amd64")).await;
    let admin = Admin::listener(&proxy);
    let (status, body) = admin
        .call(
            reqwest::Method::DELETE,
            &format!("/admin/v1/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        fetch_zip(&proxy, None, "1.0.0", "linux", "amd64")
            .await
            .as_deref(),
        Some("MISS")
    );
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 2);
}
