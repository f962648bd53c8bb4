//! The status page at `/ui/`: its data against the metrics and the store, its access rules, its
//! headers, and (with Chromium) the pages themselves in a real browser.

mod common;

use common::{FakeOptions, FakeUpstream, NS, Proxy, Scrape, TYPE};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use terrapeak::config::{AuthConfig, Secret, TokenConfig};

const ADMIN_TOKEN: &str = "admin-token-for-ui-tests";
const READ_TOKEN: &str = "read-token-for-ui-tests";
const METRICS_TOKEN: &str = "metrics-token-for-ui-tests";
const HOST: &str = "registry.terraform.io";

fn with_auth(c: &mut terrapeak::config::Config) {
    let token = |name: &str, token: &str, scope: &str| TokenConfig {
        name: name.into(),
        token: Secret::new(token),
        scopes: vec![scope.into()],
        ..Default::default()
    };
    c.auth = Some(AuthConfig {
        tokens: vec![
            token("ops", ADMIN_TOKEN, "admin"),
            token("ci", READ_TOKEN, "read"),
            token("prometheus", METRICS_TOKEN, "metrics"),
        ],
        url_signing_keys: vec![Secret::new("0123456789abcdef0123456789abcdef")],
        ..Default::default()
    });
}

async fn json(proxy: &Proxy, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let resp = proxy.get_as(path, token).await;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Asks for a module's download and then its archive, so it is stored.
async fn fetch_module(proxy: &Proxy, token: Option<&str>, name: &str) {
    let resp = proxy
        .get_as(
            &format!("/v1/modules/{NS}/{name}/aws/1.0.0/download"),
            token,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let location = resp.headers()["x-terraform-get"]
        .to_str()
        .unwrap()
        .to_owned();
    let archive = proxy.get_as(&location, token).await;
    assert_eq!(archive.status(), StatusCode::OK, "{location}");
    archive.bytes().await.unwrap();
}

/// Waits until the status page lists `n` units.
async fn units_listed(proxy: &Proxy, token: Option<&str>, n: u64) -> Value {
    for _ in 0..100 {
        let (status, body) = json(proxy, "/ui/api/units", token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["total"] == n {
            return body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the store never held {n} units");
}

/// A unit's record, once its `field` is known (over S3 an artifact's upload may finish a
/// moment after the client had every byte).
async fn record(proxy: &Proxy, path: &str, field: &str) -> (StatusCode, Value) {
    let mut answer = (StatusCode::NOT_FOUND, Value::Null);
    for _ in 0..100 {
        answer = json(proxy, path, None).await;
        if !answer.1["verification"][field].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_open_with_a_strict_policy_and_its_data_needs_read_or_admin() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, with_auth).await;
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/assets/app.js", "text/javascript"),
        ("/ui/assets/app.css", "text/css"),
        ("/ui/assets/icon.svg", "image/svg+xml"),
    ] {
        let resp = proxy.get_as(path, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for rule in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(rule), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    // No inline script or style in the shell: everything comes from the assets.
    let html = proxy.get_as("/ui/", None).await.text().await.unwrap();
    assert!(!html.contains("<script>") && !html.contains("<style") && !html.contains(" style="));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
        .get(proxy.url("/ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers()["location"], "/ui/");
    let (status, body) = json(&proxy, "/ui/assets/nosuch.js", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["errors"][0].is_string());

    // The data: 401 without a token, 403 for a token without read or admin.
    for path in [
        "/ui/api/overview",
        "/ui/api/units",
        "/ui/api/problems",
        "/ui/api/units/providers/registry.terraform.io/testns/demo/1.0.0/linux_amd64",
    ] {
        let (status, body) = json(&proxy, path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let (status, body) = json(&proxy, path, Some(METRICS_TOKEN)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(
            body["errors"][0]
                .as_str()
                .unwrap()
                .contains("read or admin"),
            "{body}"
        );
    }
    for token in [READ_TOKEN, ADMIN_TOKEN] {
        let (status, body) = json(&proxy, "/ui/api/overview", Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The session says whose token it is and whether the actions are theirs.
    let (_, s) = json(&proxy, "/ui/api/session", None).await;
    assert_eq!(
        (s["auth"].clone(), s["admin"].clone()),
        (true.into(), false.into())
    );
    let (_, s) = json(&proxy, "/ui/api/session", Some(READ_TOKEN)).await;
    assert_eq!(
        (s["caller"].clone(), s["admin"].clone()),
        ("ci".into(), false.into())
    );
    let (_, s) = json(&proxy, "/ui/api/session", Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (s["caller"].clone(), s["admin"].clone()),
        ("ops".into(), true.into())
    );
    // No token appears in what the page is given.
    let (_, o) = json(&proxy, "/ui/api/overview", Some(ADMIN_TOKEN)).await;
    let text = o.to_string();
    for secret in [ADMIN_TOKEN, READ_TOKEN, METRICS_TOKEN] {
        assert!(!text.contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_what_the_metrics_count() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (_, first, zip) = proxy.fetch_zip(None, "1.0.0", "linux", "amd64").await;
    assert_eq!(first.as_deref(), Some("MISS"));
    let (_, again, _) = proxy.fetch_zip(None, "1.0.0", "linux", "amd64").await;
    assert_eq!(again.as_deref(), Some("HIT"));
    proxy.fetch_zip(None, "1.1.0", "linux", "amd64").await;
    let (status, o) = json(&proxy, "/ui/api/overview", None).await;
    assert_eq!(status, StatusCode::OK, "{o}");
    let m = Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    let hits = m.sum("terrapeak_cache_results_total", &[("result", "hit")]);
    let misses = m.sum("terrapeak_cache_results_total", &[("result", "miss")]);
    assert!(hits >= 2.0 && misses >= 4.0, "hits {hits} misses {misses}");
    let s = &o["since_start"];
    assert_eq!(s["hits"].as_f64(), Some(hits));
    assert_eq!(s["misses"].as_f64(), Some(misses));
    assert_eq!(s["hit_ratio"].as_f64(), Some(hits / (hits + misses)));
    let saved = m.value("terrapeak_sent_bytes_total", &[("source", "cache")]);
    assert!(saved >= zip.len() as f64);
    assert_eq!(s["bytes_from_cache"].as_f64(), Some(saved));
    let up_requests = m.sum("terrapeak_upstream_requests_total", &[("upstream", HOST)]);
    let row = o["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["host"] == HOST)
        .unwrap();
    assert_eq!(row["requests_total"].as_f64(), Some(up_requests));
    assert_eq!(row["circuit_open"], false);
    assert_eq!(row["errors_total"], 0);
    assert!(row["latency_ms"]["api"].as_f64().unwrap() > 0.0, "{row}");
    // The last hour reaches back to the first sample, taken at start.
    assert_eq!(o["last_hour"]["hits"].as_f64(), Some(hits));
    assert!(o["last_minute"]["requests_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(
        o["store"]["backend"],
        if common::s3_under_test().is_some() {
            "s3"
        } else {
            "file"
        }
    );
    assert_eq!(o["store"]["ready"], true);
    assert_eq!(o["fills"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_progress_is_shown_with_its_progress() {
    let gated = common::GatedZip::start(4 << 20).await;
    let proxy = &gated.proxy;
    let url = gated.zip_url.clone();
    let client = proxy.client.clone();
    let download = tokio::spawn(async move {
        let resp = client.get(url).send().await.unwrap();
        resp.bytes().await.map(|b| b.len())
    });
    let mut fill = Value::Null;
    for _ in 0..200 {
        let (_, o) = json(proxy, "/ui/api/overview", None).await;
        if let Some(f) = o["fills"].as_array().and_then(|f| f.first())
            && f["written"].as_u64().unwrap_or(0) > 0
        {
            fill = f.clone();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(fill["key"].as_str().unwrap().ends_with(".zip"), "{fill}");
    assert_eq!(
        fill["total"].as_u64(),
        Some(gated.zip.len() as u64),
        "{fill}"
    );
    assert!(fill["written"].as_u64().unwrap() < gated.zip.len() as u64);
    gated.gate.notify_one();
    assert_eq!(download.await.unwrap().unwrap(), gated.zip.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_record_shows_how_its_zip_was_verified() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (_, _, zip) = proxy.fetch_zip(None, "1.0.0", "linux", "amd64").await;
    units_listed(&proxy, None, 1).await;
    let (status, r) = record(
        &proxy,
        &format!("/ui/api/units/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux_amd64"),
        "stored_sha256",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let sha = hex::encode(Sha256::digest(&zip));
    let v = &r["verification"];
    assert_eq!(v["stored_sha256"], sha.as_str());
    assert_eq!(v["registry_shasum"], sha.as_str());
    assert_eq!(v["sha256sums_entry"], sha.as_str());
    assert_eq!(v["agrees"], true);
    assert_eq!(v["unsigned"], false);
    // The fingerprint of the key that verified SHA256SUMS, and the key the registry offered.
    let signer = v["signed_by"].as_str().unwrap();
    assert!(
        signer.len() == 40 && signer.chars().all(|c| c.is_ascii_hexdigit()),
        "{v}"
    );
    assert_eq!(v["signing_key_ids"], serde_json::json!(["TESTKEY"]));
    let (zip_name, _) = up.zip("1.0.0", "linux", "amd64");
    assert_eq!(v["filename"], zip_name.as_str());
    assert!(
        v["origin_url"]
            .as_str()
            .unwrap()
            .ends_with(&up.zip_path("1.0.0", "linux", "amd64")),
        "{v}"
    );
    assert!(v["fetched_at"].as_u64().unwrap() > 1_700_000_000);
    assert!(r["objects"].as_array().unwrap().len() >= 2, "{r}");
    // Unknown units and bad names are clear 4xx answers.
    let (status, body) = json(
        &proxy,
        &format!("/ui/api/units/providers/{HOST}/{NS}/{TYPE}/9.9.9/linux_amd64"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["errors"][0].as_str().unwrap().contains("not stored"));
    let (status, _) = json(
        &proxy,
        &format!("/ui/api/units/providers/{HOST}/{NS}/..%2F/1.0.0/linux_amd64"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_module_record_names_the_commit_it_was_packed_from() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    fetch_module(&proxy, None, "gittag").await;
    units_listed(&proxy, None, 1).await;
    let (status, r) = record(
        &proxy,
        &format!("/ui/api/units/modules/{HOST}/{NS}/gittag/aws/1.0.0"),
        "git_commit",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let v = &r["verification"];
    assert_eq!(v["git_commit"], up.modules().tag_commit.as_str(), "{v}");
    assert_eq!(v["source"]["kind"], "git");
    assert!(
        v["source"]["url"]
            .as_str()
            .unwrap()
            .contains("/git/repo.git")
    );
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_keep_what_the_client_was_told() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    up.set_fault(
        &up.zip_path("1.0.0", "linux", "amd64"),
        common::Fault::Status(500),
    );
    let (status, _, body) = proxy.fetch_zip(None, "1.0.0", "linux", "amd64").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let told: Value = serde_json::from_slice(&body).unwrap();
    let told = told["errors"][0].as_str().unwrap();
    // A verification refused mid-transfer: the client sees a cut, the page the reason.
    up.set_fault(
        &up.zip_path("1.1.0", "linux", "amd64"),
        common::Fault::FlipByte,
    );
    let (_, doc) = json(
        &proxy,
        &format!("/v1/providers/{NS}/{TYPE}/1.1.0/download/linux/amd64"),
        None,
    )
    .await;
    // Cut mid-body (no status to tell), or refused with a 502 when the (small) fill was found
    // bad before its headers left: either way the client never holds the corrupted zip.
    let (cut, told_status) = match proxy
        .client
        .get(doc["download_url"].as_str().unwrap())
        .send()
        .await
    {
        Ok(resp) if resp.status() == StatusCode::BAD_GATEWAY => (true, Value::from(502)),
        Ok(resp) => (
            resp.status() == StatusCode::OK && resp.bytes().await.is_err(),
            Value::Null,
        ),
        // The transfer was cut before its headers left.
        Err(_) => (true, Value::Null),
    };
    assert!(cut, "a corrupted zip never arrives complete");
    // An ordinary 404 is not a problem.
    let (status, _) = json(&proxy, &format!("/v1/providers/{NS}/nosuch/versions"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut items = Vec::new();
    for _ in 0..100 {
        let (_, p) = json(&proxy, "/ui/api/problems", None).await;
        items = p["items"].as_array().unwrap().clone();
        if items.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(items.len(), 2, "{items:?}");
    // Newest first: the refused verification, then the upstream failure.
    assert_eq!(items[0]["class"], "verification", "{items:?}");
    assert_eq!(items[0]["status"], told_status, "{items:?}");
    assert!(
        items[0]["message"].as_str().unwrap().contains("sha256"),
        "{items:?}"
    );
    assert_eq!(items[1]["class"], "upstream");
    assert_eq!(items[1]["status"], 502);
    assert_eq!(items[1]["message"], told);
    assert_eq!(items[1]["upstream"], HOST);
    assert!(
        items[1]["path"]
            .as_str()
            .unwrap()
            .starts_with("/artifacts/providers/")
    );
    let (_, o) = json(&proxy, "/ui/api/overview", None).await;
    assert_eq!(o["problems_total"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_narrows_by_words_kind_upstream_and_pin() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.admin.addr = Some("127.0.0.1:0".into())).await;
    proxy.fetch_zip(None, "1.0.0", "linux", "amd64").await;
    proxy.fetch_zip(None, "1.1.0", "linux", "amd64").await;
    proxy.fetch_zip(None, "1.1.0", "darwin", "arm64").await;
    fetch_module(&proxy, None, "archive").await;
    units_listed(&proxy, None, 4).await;
    let names = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                format!(
                    "{} {} {}",
                    u["name"].as_str().unwrap(),
                    u["version"].as_str().unwrap(),
                    u["platform"].as_str().unwrap_or("-")
                )
            })
            .collect()
    };
    let (_, all) = json(&proxy, "/ui/api/units", None).await;
    assert_eq!(all["hosts"], serde_json::json!([HOST]));
    // Newest version first within a name.
    assert_eq!(
        names(&all),
        vec![
            format!("{NS}/archive/aws 1.0.0 -"),
            format!("{NS}/{TYPE} 1.1.0 darwin_arm64"),
            format!("{NS}/{TYPE} 1.1.0 linux_amd64"),
            format!("{NS}/{TYPE} 1.0.0 linux_amd64"),
        ]
    );
    let (_, r) = json(&proxy, "/ui/api/units?q=DEMO%201.1.0%20linux", None).await;
    assert_eq!(names(&r), vec![format!("{NS}/{TYPE} 1.1.0 linux_amd64")]);
    let (_, r) = json(&proxy, "/ui/api/units?kind=module", None).await;
    assert_eq!(names(&r), vec![format!("{NS}/archive/aws 1.0.0 -")]);
    let (_, r) = json(&proxy, "/ui/api/units?host=other.example.com", None).await;
    assert_eq!(r["total"], 0);
    let (_, r) = json(&proxy, "/ui/api/units?limit=1&offset=1", None).await;
    assert_eq!((r["total"].clone(), names(&r).len()), (4.into(), 1));
    // A pin made through the admin API shows.
    let admin = format!(
        "http://{}",
        proxy.server.as_ref().unwrap().admin_addr().unwrap()
    );
    let pin = proxy
        .client
        .put(format!(
            "{admin}/admin/v1/pins/providers/{HOST}/{NS}/{TYPE}/1.0.0/linux/amd64"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(pin.status(), StatusCode::OK);
    let (_, r) = json(&proxy, "/ui/api/units?pinned=true", None).await;
    assert_eq!(names(&r), vec![format!("{NS}/{TYPE} 1.0.0 linux_amd64")]);
    for bad in ["kind=thing", "limit=0", "limit=100000", "colour=red"] {
        let (status, body) = json(&proxy, &format!("/ui/api/units?{bad}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["errors"][0].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_access_control_the_actions_are_for_the_admin_listener_only() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.admin.addr = Some("127.0.0.1:0".into())).await;
    let (_, s) = json(&proxy, "/ui/api/session", None).await;
    assert_eq!(
        (s["auth"].clone(), s["admin"].clone()),
        (false.into(), false.into())
    );
    let admin = format!(
        "http://{}",
        proxy.server.as_ref().unwrap().admin_addr().unwrap()
    );
    let (_, s) = json(&proxy, &format!("{admin}/ui/api/session"), None).await;
    assert_eq!(s["admin"], true);
    let page = proxy.get_as(&format!("{admin}/ui/"), None).await;
    assert_eq!(page.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ui_enabled_false_there_is_no_page() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| c.ui.enabled = false).await;
    for path in ["/ui/", "/ui/assets/app.js", "/ui/api/overview"] {
        let (status, body) = json(&proxy, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (status, _) = json(&proxy, &format!("/v1/providers/{NS}/{TYPE}/versions"), None).await;
    assert_eq!(status, StatusCode::OK);
}

/// Where the browser test writes its screenshots.
fn screenshot_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and playwright-core: scripts/test installs them and runs this"]
async fn the_pages_in_a_real_browser() {
    let chromium = std::env::var("TERRAPEAK_TEST_CHROMIUM")
        .expect("TERRAPEAK_TEST_CHROMIUM names the browser (scripts/test sets it)");
    let playwright = std::env::var("TERRAPEAK_TEST_PLAYWRIGHT")
        .expect("TERRAPEAK_TEST_PLAYWRIGHT names playwright-core (scripts/test sets it)");
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, with_auth).await;
    let t = Some(READ_TOKEN);
    // The known sequence: a miss and a hit of one zip, another version, a git module, and
    // one upstream failure.
    let (_, _, zip) = proxy.fetch_zip(t, "1.0.0", "linux", "amd64").await;
    proxy.fetch_zip(t, "1.0.0", "linux", "amd64").await;
    proxy.fetch_zip(t, "1.1.0", "linux", "amd64").await;
    fetch_module(&proxy, t, "gittag").await;
    up.set_fault(
        &up.zip_path("1.1.0", "darwin", "arm64"),
        common::Fault::Status(503),
    );
    let (status, _, body) = proxy.fetch_zip(t, "1.1.0", "darwin", "arm64").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let told: Value = serde_json::from_slice(&body).unwrap();
    // Four units: the failed platform's download answer is stored too.
    units_listed(&proxy, t, 4).await;
    let scrape = {
        let resp = proxy.get_as("/metrics", Some(ADMIN_TOKEN)).await;
        let text = resp.text().await.unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    };
    let sum = |metric: &str, label: (&str, &str)| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let hits = sum("terrapeak_cache_results_total", ("result", "hit"));
    let misses = sum("terrapeak_cache_results_total", ("result", "miss"));
    let expect = serde_json::json!({
        "host": HOST,
        "hit_ratio": hits / (hits + misses),
        "bytes_from_cache": sum("terrapeak_sent_bytes_total", ("source", "cache")),
        "upstream_requests": sum("terrapeak_upstream_requests_total", ("upstream", HOST)),
        "search": format!("{TYPE} 1.1.0"),
        "search_finds": format!("provider:{HOST}/{NS}/{TYPE} 1.1.0 linux_amd64"),
        "provider_path": format!("{HOST}/{NS}/{TYPE}/1.0.0/linux_amd64"),
        "zip_sha256": hex::encode(Sha256::digest(&zip)),
        "module_path": format!("{HOST}/{NS}/gittag/aws/1.0.0"),
        "module_commit": up.modules().tag_commit,
        "problem_message": told["errors"][0],
        "purge_search": TYPE,
        "purge_unit": format!("provider:{HOST}/{NS}/{TYPE} 1.0.0 linux_amd64"),
    });
    let out = screenshot_dir();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/ui.cjs");
    let run = tokio::process::Command::new("node")
        .arg(script)
        .env("TERRAPEAK_TEST_CHROMIUM", &chromium)
        .env("TERRAPEAK_TEST_PLAYWRIGHT", &playwright)
        .env("TP_BASE", &proxy.base)
        .env("TP_READ_TOKEN", READ_TOKEN)
        .env("TP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("TP_EXPECT", expect.to_string())
        .env("TP_OUT", &out)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for name in [
        "signin",
        "overview",
        "browse",
        "provider",
        "module",
        "problems",
        "browse-admin",
        "browse-after-purge",
    ] {
        let shot = out.join(format!("{name}.png"));
        let bytes = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{name}");
    }
    assert!(summary["requests"].as_u64().unwrap() > 10, "{summary}");
    // The purge the admin made is real: the next request for that zip is a miss again.
    let zip_hits_before = up.hits(&up.zip_path("1.0.0", "linux", "amd64"));
    let (status, cache, again) = proxy.fetch_zip(t, "1.0.0", "linux", "amd64").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cache.as_deref(), Some("MISS"));
    assert_eq!(again, zip);
    assert_eq!(
        up.hits(&up.zip_path("1.0.0", "linux", "amd64")),
        zip_hits_before + 1
    );
}
