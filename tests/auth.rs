//! Access control: tokens and scopes in front of every registry route, artifact URLs that carry
//! their own signature (no header needed), Basic and bearer credentials on artifact routes, key
//! rotation shared by replicas, private upstreams refused at start, and the hardening of the
//! request edge (one URL per artifact, a capped request head, exactly one Host header).

mod common;

use base64::Engine;
use common::*;
use reqwest::StatusCode;
use std::io::{Read, Write};
use std::time::Duration;
use terrapeak::config::{AuthConfig, Config, Secret, TokenConfig, UpstreamEntry};

const CI_TOKEN: &str = "tok-ci-3f9a1c";
const TOFU_TOKEN: &str = "tok-tofu-77b2";
const PROM_TOKEN: &str = "tok-prom-0d4e";

fn token(name: &str, value: &str, scopes: &[&str]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: Secret::new(value),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn with_auth(c: &mut Config, keys: &[&str]) {
    c.auth = Some(AuthConfig {
        tokens: vec![
            token("ci-fleet", CI_TOKEN, &["read"]),
            token("tofu-only", TOFU_TOKEN, &["read:registry.opentofu.org"]),
            token("prometheus", PROM_TOKEN, &["metrics"]),
        ],
        url_signing_keys: keys.iter().map(|k| Secret::new(*k)).collect(),
        ..Default::default()
    });
}

async fn get(proxy: &Proxy, url: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = proxy.client.get(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// `/artifacts/...` of a signed artifact URL, without its signature.
fn unsigned_path(signed: &str) -> String {
    let (_, rest) = signed.split_once("/artifacts/s/").expect("a signed URL");
    let (_, path) = rest
        .split_once('/')
        .and_then(|(_, r)| r.split_once('/'))
        .unwrap();
    format!("/artifacts/{path}")
}

/// The download answer for 1.0.0 linux_amd64, asked with the CI token.
async fn handed_out(proxy: &Proxy) -> serde_json::Value {
    let resp = get(
        proxy,
        &proxy.url(&format!(
            "/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
        )),
        Some(&bearer(CI_TOKEN)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn registry_routes_need_a_token_that_may_read_the_upstream() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| with_auth(c, &["key-1"])).await;
    let versions = proxy.url(&format!("/v1/providers/{NS}/{TYPE}/versions"));

    let resp = get(&proxy, &versions, None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"terrapeak\""
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    let message = body["errors"][0].as_str().unwrap();
    assert!(message.contains("credentials"), "{message}");
    assert!(message.contains("TF_TOKEN_"), "{message}");

    let resp = get(&proxy, &versions, Some(&bearer(CI_TOKEN))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Basic credentials whose password is a token work too (what ~/.netrc makes clients send).
    let resp = get(&proxy, &versions, Some(&basic("anyone", CI_TOKEN))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get(&proxy, &versions, Some(&bearer("tok-guessed"))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body = resp.text().await.unwrap();
    assert!(!body.contains("tok-guessed"), "{body}");

    // read:<host> reads that host only.
    let resp = get(&proxy, &versions, Some(&bearer(TOFU_TOKEN))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body = resp.text().await.unwrap();
    assert!(body.contains("read:registry.terraform.io"), "{body}");
    assert!(!body.contains(TOFU_TOKEN), "{body}");
    // A metrics token is not a read token, and a read token is not a metrics token.
    let resp = get(&proxy, &versions, Some(&bearer(PROM_TOKEN))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let metrics = proxy.url("/metrics");
    assert_eq!(
        get(&proxy, &metrics, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&proxy, &metrics, Some(&bearer(CI_TOKEN)))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let scrape = get(&proxy, &metrics, Some(&bearer(PROM_TOKEN))).await;
    assert_eq!(scrape.status(), StatusCode::OK);
    let text = scrape.text().await.unwrap();
    for (reason, n) in [
        ("missing_credentials", 2),
        ("unknown_token", 1),
        ("missing_scope", 3),
    ] {
        let line = format!("terrapeak_auth_failures_total{{reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    assert!(!text.contains(CI_TOKEN));
    // Health and discovery stay open.
    for open in ["/healthz", "/readyz", "/.well-known/terraform.json"] {
        assert_eq!(
            get(&proxy, &proxy.url(open), None).await.status(),
            StatusCode::OK,
            "{open}"
        );
    }
}

#[tokio::test]
async fn anonymous_read_opens_one_upstream_and_transparent_routes_follow_their_host() {
    let tf = FakeUpstream::start(FakeOptions::default()).await;
    let tofu = FakeUpstream::start(FakeOptions {
        label: "tofu",
        ..Default::default()
    })
    .await;
    let tofu_url = tofu.registry_url.clone();
    let proxy = Proxy::start(&tf, |c| {
        with_auth(c, &["key-1"]);
        c.upstreams.push(UpstreamEntry {
            host: "registry.opentofu.org".into(),
            base_url: Some(tofu_url),
            ..Default::default()
        });
        c.auth
            .as_mut()
            .unwrap()
            .anonymous_read
            .push("registry.opentofu.org".into());
    })
    .await;
    let tofu_versions = proxy.url(&format!(
        "/r/registry.opentofu.org/v1/providers/{NS}/{TYPE}/versions"
    ));
    let tf_versions = proxy.url(&format!(
        "/r/registry.terraform.io/v1/providers/{NS}/{TYPE}/versions"
    ));
    assert_eq!(
        get(&proxy, &tofu_versions, None).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        get(&proxy, &tf_versions, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&proxy, &tf_versions, Some(&bearer(TOFU_TOKEN)))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let mirror = proxy.url(&format!(
        "/v1/mirror/registry.terraform.io/{NS}/{TYPE}/index.json"
    ));
    assert_eq!(
        get(&proxy, &mirror, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&proxy, &mirror, Some(&bearer(CI_TOKEN))).await.status(),
        StatusCode::OK
    );
    // Anonymous artifacts of the open upstream need no signature either.
    let resp = get(
        &proxy,
        &proxy.url(&format!(
            "/r/registry.opentofu.org/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
        )),
        None,
    )
    .await;
    let doc: serde_json::Value = resp.json().await.unwrap();
    let zip_url = doc["download_url"].as_str().unwrap();
    assert!(zip_url.contains("/artifacts/s/"), "{zip_url}");
    let unsigned = proxy.url(&unsigned_path(zip_url));
    let resp = get(&proxy, &unsigned, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap() == tofu.zip("1.0.0", "linux", "amd64").1);
}

#[tokio::test]
async fn artifact_urls_carry_a_signature_that_works_without_headers_and_only_for_their_artifact() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| with_auth(c, &["key-1"])).await;
    let doc = handed_out(&proxy).await;
    let (zip_url, sums_url, sig_url) = (
        doc["download_url"].as_str().unwrap().to_owned(),
        doc["shasums_url"].as_str().unwrap().to_owned(),
        doc["shasums_signature_url"].as_str().unwrap().to_owned(),
    );
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    for (url, want) in [
        (&zip_url, zip.clone()),
        (&sums_url, up.release("1.0.0").sums.clone()),
        (&sig_url, up.release("1.0.0").sig.clone()),
    ] {
        assert!(url.contains("/artifacts/s/"), "signed in the path: {url}");
        assert!(!url.contains('?'), "never in the query string: {url}");
        let resp = get(&proxy, url, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        assert!(resp.bytes().await.unwrap() == want, "{url}");
    }
    // HEAD works the same (go-getter and Terraform send it first).
    let head = proxy.client.head(&zip_url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);

    // Transplanted: the zip's signature on the SHA256SUMS path.
    let zip_sig: Vec<&str> = zip_url.split('/').collect();
    let sums_parts: Vec<&str> = sums_url.split('/').collect();
    let i = zip_sig.iter().position(|s| *s == "s").unwrap();
    let mut transplanted = sums_parts.clone();
    transplanted[i + 1] = zip_sig[i + 1];
    transplanted[i + 2] = zip_sig[i + 2];
    let transplanted = transplanted.join("/");
    assert_ne!(transplanted, sums_url);
    // Forged: one character of the signature changed.
    let mut forged_sig = zip_sig[i + 2].to_owned();
    let last = forged_sig.pop().unwrap();
    forged_sig.push(if last == 'A' { 'B' } else { 'A' });
    let mut forged = zip_sig.clone();
    forged[i + 2] = &forged_sig;
    let forged = forged.join("/");
    // Stretched: a later expiry with the same signature.
    let mut stretched = zip_sig.clone();
    let later = (zip_sig[i + 1].parse::<u64>().unwrap() + 86_400).to_string();
    stretched[i + 1] = &later;
    let stretched = stretched.join("/");
    for url in [&transplanted, &forged, &stretched] {
        let resp = get(&proxy, url, None).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{url}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["errors"][0].as_str().unwrap().contains("signature"));
    }
    // A token opens a bad or missing signature too: bearer, or Basic as from ~/.netrc.
    assert_eq!(
        get(&proxy, &forged, Some(&bearer(CI_TOKEN))).await.status(),
        StatusCode::OK
    );
    let unsigned = proxy.url(&unsigned_path(&zip_url));
    assert_eq!(
        get(&proxy, &unsigned, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    for credential in [bearer(CI_TOKEN), basic("terrapeak", CI_TOKEN)] {
        let resp = get(&proxy, &unsigned, Some(&credential)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.unwrap() == zip);
    }
    assert_eq!(
        get(&proxy, &unsigned, Some(&bearer(TOFU_TOKEN)))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn an_expired_artifact_url_is_refused() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        with_auth(c, &["key-1"]);
        c.auth.as_mut().unwrap().artifact_url_ttl = Duration::from_secs(1);
    })
    .await;
    let doc = handed_out(&proxy).await;
    let zip_url = doc["download_url"].as_str().unwrap().to_owned();
    assert_eq!(get(&proxy, &zip_url, None).await.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = get(&proxy, &zip_url, None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["errors"][0].as_str().unwrap().contains("expired"));
    // Asking for the download answer again gives a fresh URL.
    let fresh = handed_out(&proxy).await["download_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(get(&proxy, &fresh, None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn replicas_sharing_keys_accept_each_others_urls_and_keys_rotate() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let old = Proxy::start(&up, |c| with_auth(c, &["old-key"])).await;
    // The second replica shares the store (as replicas on one bucket do) and has rotated: a
    // new key signs, the old one still verifies.
    let dir = old.data_dir.path().to_path_buf();
    let rotated = Proxy::start(&up, |c| {
        with_auth(c, &["new-key", "old-key"]);
        c.storage.file.path = dir.clone();
        if let Some(s3) = s3_under_test() {
            s3.configure(c, &dir.file_name().unwrap().to_string_lossy());
        }
    })
    .await;
    let from_old = handed_out(&old).await["download_url"]
        .as_str()
        .unwrap()
        .replace(&old.base, &rotated.base);
    let resp = get(&rotated, &from_old, None).await;
    assert_eq!(resp.status(), StatusCode::OK, "the old key still verifies");
    let from_new = handed_out(&rotated).await["download_url"]
        .as_str()
        .unwrap()
        .replace(&rotated.base, &old.base);
    assert_eq!(
        get(&old, &from_new, None).await.status(),
        StatusCode::FORBIDDEN,
        "a replica without the new key refuses what it signed"
    );
    let new_only = Proxy::start(&up, |c| {
        with_auth(c, &["new-key"]);
        c.storage.file.path = dir.clone();
        if let Some(s3) = s3_under_test() {
            s3.configure(c, &dir.file_name().unwrap().to_string_lossy());
        }
    })
    .await;
    let to_new_only = from_new.replace(&old.base, &new_only.base);
    assert_eq!(
        get(&new_only, &to_new_only, None).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_private_upstream_is_refused_at_start_unless_tokens_guard_it_or_it_is_public() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let private = |c: &mut Config| {
        c.upstreams.push(UpstreamEntry {
            host: "private.example.com".into(),
            base_url: Some(up.registry_url.clone()),
            token: Secret::new("upstream-secret-4411"),
            ..Default::default()
        });
    };
    let mut c = config_for(&up, dir.path());
    private(&mut c);
    let err = terrapeak::server::Server::start(&c)
        .await
        .err()
        .unwrap()
        .to_string();
    for needle in ["private.example.com", "auth.tokens", "public: true"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(!err.contains("upstream-secret-4411"), "{err}");

    with_auth(&mut c, &["k"]);
    c.auth
        .as_mut()
        .unwrap()
        .anonymous_read
        .push("private.example.com".into());
    let err = terrapeak::server::Server::start(&c)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("anonymous_read"), "{err}");

    c.auth.as_mut().unwrap().anonymous_read.clear();
    let server = terrapeak::server::Server::start(&c).await.unwrap();
    server.shutdown(Duration::from_secs(1)).await.unwrap();

    let mut c = config_for(&up, dir.path());
    private(&mut c);
    c.upstreams[0].public = true;
    let server = terrapeak::server::Server::start(&c).await.unwrap();
    server.shutdown(Duration::from_secs(1)).await.unwrap();
}

/// One raw HTTP/1.1 exchange; returns the status line.
fn raw(base: &str, request: &[u8]) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before it has read a large head.
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_artifact_has_one_url_the_request_head_is_capped_and_host_is_required() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, sums_url, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    assert_eq!(
        proxy.client.get(&zip_url).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        proxy.client.get(&sums_url).send().await.unwrap().status(),
        200
    );
    // The same objects under another platform's path: 404, cached or not.
    for url in [
        zip_url.replace("/linux/amd64/", "/con/amd64/"),
        zip_url.replace("/linux/amd64/", "/darwin/arm64/"),
        sums_url.replace("/linux/amd64/", "/lpt1/amd64/"),
        sums_url.replace("/linux/amd64/", "/windows/amd64/"),
    ] {
        let resp = proxy.client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{url}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["errors"].is_array());
    }

    let base = proxy.base.clone();
    tokio::task::spawn_blocking(move || {
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        assert!(raw(&base, big.as_bytes()).contains(" 431 "));
        let fine = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(16 * 1024)
        );
        assert!(raw(&base, fine.as_bytes()).contains(" 200 "));
        let no_host = b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(raw(&base, no_host).contains(" 400 "));
        let two = b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n";
        assert!(raw(&base, two).contains(" 400 "));
        let one = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        assert!(raw(&base, one).contains(" 200 "));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_token_and_no_token_appears_in_any_line() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("ci-token");
    std::fs::write(&token_file, format!("{CI_TOKEN}\n")).unwrap();
    let yaml = format!(
        "server:\n  addr: \"127.0.0.1:0\"\nlog:\n  level: debug\nstorage:\n  file:\n    path: \"{}\"\nupstream:\n  base_url: \"{}\"\nauth:\n  tokens:\n    - name: ci-fleet\n      token_file: \"{}\"\n      scopes: [read]\n  url_signing_keys: [\"signing-key-5e1\"]\n",
        dir.path().join("data").display(),
        up.registry_url,
        token_file.display()
    );
    let cfg = dir.path().join("cfg.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let (mut child, addr, log) = spawn_terrapeak_logged(&cfg);
    let client = reqwest::Client::new();
    let versions = format!("http://{addr}/v1/providers/{NS}/{TYPE}/versions");
    for credential in [
        Some(bearer(CI_TOKEN)),
        None,
        Some(bearer("tok-wrong-8c2")),
        Some(basic("u", CI_TOKEN)),
    ] {
        let mut req = client.get(&versions);
        if let Some(c) = &credential {
            req = req.header("authorization", c);
        }
        let body = req.send().await.unwrap().text().await.unwrap();
        assert!(
            !body.contains(CI_TOKEN) && !body.contains("tok-wrong-8c2"),
            "{body}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let lines = log.lock().unwrap().clone();
    let access: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["target"] == "terrapeak::access"
                && v["path"].as_str().unwrap_or("").contains("/versions")
        })
        .collect();
    let callers: Vec<_> = access
        .iter()
        .map(|v| {
            (
                v["status"].as_u64().unwrap(),
                v["caller"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        callers,
        vec![
            (200, Some("ci-fleet".into())),
            (401, Some("anonymous".into())),
            (401, Some("unknown".into())),
            (200, Some("ci-fleet".into())),
        ]
    );
    for line in &lines {
        for secret in [CI_TOKEN, "tok-wrong-8c2", "signing-key-5e1"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
    }
}
