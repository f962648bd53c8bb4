//! The `terrapeak` binary as an operator runs it: `check-config`, `--version`, and a process
//! killed with SIGKILL in the middle of a fill.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_terrapeak");

fn write_config(dir: &std::path::Path, yaml: &str) -> std::path::PathBuf {
    let path = dir.join("cfg.yml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn terrapeak(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("TERRAPEAK_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn check_config_loads_a_seed_config_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        r#"
server:
  addr: ":8081"
  read_timeout: 30
  write_timeout: 30
  idle_timeout: 120
  domain: "https://terrapeak.example.com"
log:
  level: "info"
terraform:
  registry_url: "https://registry.terraform.io"
storage:
  minio:
    enabled: false
    endpoint: "minio.internal:9000"
    region: "us-east-1"
    access_key: "AKIAEXAMPLEKEY"
    secret_key: "very-secret-value"
    bucket: "terrapeak-cache"
    skip_ssl_verify: false
  file:
    path: "./registry"
upstream:
  token: "registry-token-value"
"#,
    );
    // A registry token makes the upstream private: without access control (or `public: true`)
    // TerraPeak refuses to serve it to anyone, and says both ways out.
    let out = terrapeak(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in ["registry.terraform.io", "auth.tokens", "public: true"] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(!stderr.contains("registry-token-value"), "{stderr}");
    let seed = std::fs::read_to_string(&cfg).unwrap();
    let cfg = write_config(dir.path(), &format!("{seed}  public: true\n"));
    let out = terrapeak(&["check-config", "--config", cfg.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("addr: :8081"), "{stdout}");
    assert!(
        stdout.contains("domain: https://terrapeak.example.com"),
        "{stdout}"
    );
    for secret in [
        "AKIAEXAMPLEKEY",
        "very-secret-value",
        "registry-token-value",
    ] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
    assert!(stdout.contains("********"));
}

#[test]
fn check_config_names_the_offending_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "server:\n  addr: \"127.0.0.1:1\"\n  listen_backlog: 5\n",
    );
    let out = terrapeak(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_backlog"), "{stderr}");

    let cfg = write_config(dir.path(), "cache:\n  versions_ttl: soonish\n");
    let out = terrapeak(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("versions_ttl"));

    let out = Command::new(BIN)
        .args(["check-config"])
        .env("TERRAPEAK_SERVER__ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.addr"));
}

/// `check-config` reads the files a start would read (token and signing key files, the TLS
/// certificate, key and client CA, the upstream CA) and fails naming the one that would stop the server; what
/// the files hold is never printed.
#[test]
fn check_config_reads_the_secret_and_tls_files_a_start_needs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls = TestTls::new();
    std::fs::write(d.join("ci-token"), "tok-cli-files-71c2\n").unwrap();
    std::fs::write(d.join("signing-key"), "key-cli-files-39ad\n").unwrap();
    std::fs::write(d.join("empty"), "\n").unwrap();
    let config = |token_file: &str, key_file: &str, cert: &str, ca: &str| {
        format!(
            "storage:\n  file:\n    path: \"{data}\"\nserver:\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n    client_ca_file: \"{ca}\"\n    client_auth: optional\nauth:\n  tokens:\n    - name: ci\n      token_file: \"{token_file}\"\n      scopes: [read]\n  url_signing_key_files: [\"{key_file}\"]\n",
            data = d.join("data").display(),
            token_file = d.join(token_file).display(),
            key_file = d.join(key_file).display(),
            cert = tls.path(cert).display(),
            key = tls.path("key.pem").display(),
            ca = tls.path(ca).display(),
        )
    };
    let run = |yaml: String| {
        let cfg = write_config(d, &yaml);
        let out = terrapeak(&["check-config", "--config", cfg.to_str().unwrap()]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("tok-cli-files"), "{text}");
        assert!(!text.contains("key-cli-files"), "{text}");
        (out.status.code(), text)
    };
    let (code, text) = run(config("ci-token", "signing-key", "cert.pem", "ca.pem"));
    assert_eq!(code, Some(0), "{text}");

    for (yaml, names) in [
        (
            config("missing", "signing-key", "cert.pem", "ca.pem"),
            "auth.tokens[].token_file",
        ),
        (
            config("empty", "signing-key", "cert.pem", "ca.pem"),
            "is empty",
        ),
        (
            config("ci-token", "missing", "cert.pem", "ca.pem"),
            "auth.url_signing_key_files",
        ),
        // A certificate file without a certificate, and a CA file without a CA.
        (
            config("ci-token", "signing-key", "key.pem", "ca.pem"),
            "key.pem",
        ),
        (
            config("ci-token", "signing-key", "cert.pem", "key.pem"),
            "no CA certificate",
        ),
        (
            config("ci-token", "signing-key", "cert.pem", "ca.pem")
                + &format!(
                    "upstream:\n  ca_file: \"{}\"\n",
                    d.join("missing").display()
                ),
            "upstream.ca_file",
        ),
    ] {
        let (code, text) = run(yaml);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains(names), "names {names}: {text}");
    }
}

#[test]
fn version_flag_prints_the_version() {
    let out = terrapeak(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// The binary serving a fake upstream whose linux_amd64 zip (3 MiB) stops after 1 MiB until
/// the gate opens.
struct GatedRun {
    up: FakeUpstream,
    gate: std::sync::Arc<tokio::sync::Notify>,
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    client: reqwest::Client,
}

impl GatedRun {
    async fn new() -> GatedRun {
        let up = FakeUpstream::start(FakeOptions {
            padding: 2 << 20,
            ..Default::default()
        })
        .await;
        let gate = std::sync::Arc::new(tokio::sync::Notify::new());
        up.set_fault(
            &up.zip_path("1.0.0", "linux", "amd64"),
            Fault::Gate(1 << 20, gate.clone()),
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            &format!(
                "server:\n  addr: \"127.0.0.1:0\"\nlog:\n  level: info\nstorage:\n  file:\n    path: \"{}\"\nupstream:\n  base_url: \"{}\"\n",
                dir.path().join("data").display(),
                up.registry_url
            ),
        );
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        GatedRun {
            up,
            gate,
            dir,
            cfg,
            client,
        }
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// The zip URL TerraPeak at `base` hands out.
    async fn zip_url(&self, base: &str) -> String {
        let doc: serde_json::Value = self
            .client
            .get(format!(
                "{base}/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        doc["download_url"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_fill_leaves_nothing_a_restart_would_serve() {
    let run = GatedRun::new().await;
    let (zip_name, zip) = run.up.zip("1.0.0", "linux", "amd64");
    let (mut child, addr) = spawn_terrapeak(&run.cfg);
    let base = format!("http://{addr}");
    let zip_url = run.zip_url(&base).await;
    let mut resp = run.client.get(&zip_url).send().await.unwrap();
    let first = resp.chunk().await.unwrap().expect("the fill is streaming");
    assert!(!first.is_empty());

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut received = first.len();
    let cut = loop {
        match resp.chunk().await {
            Ok(Some(c)) => received += c.len(),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(
        cut && received < zip.len(),
        "the transfer was cut, not completed"
    );
    let data = run.data();
    // The fill's spool file, and perhaps one of a small object being written behind its answer.
    assert!(
        std::fs::read_dir(data.join("staging")).unwrap().count() >= 1,
        "the killed fill left its spool file behind"
    );
    let release_dir = "providers/registry.terraform.io/testns/demo/1.0.0";
    assert!(
        !data
            .join("meta")
            .join(release_dir)
            .join(format!("{zip_name}.json"))
            .exists()
    );
    assert!(!data.join("data").join(release_dir).join(&zip_name).exists());

    run.up.clear_faults();
    run.gate.notify_waiters();
    let (mut child, addr) = spawn_terrapeak(&run.cfg);
    let zip_url = zip_url.replace(&base, &format!("http://{addr}"));
    assert_eq!(
        std::fs::read_dir(data.join("staging")).unwrap().count(),
        0,
        "staging cleared on start"
    );
    let resp = run.client.get(&zip_url).send().await.unwrap();
    assert_eq!(
        cache_status(&resp).as_deref(),
        Some("MISS"),
        "the partial fill was never published"
    );
    assert_eq!(resp.bytes().await.unwrap(), zip);
    let resp = run.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert_eq!(resp.bytes().await.unwrap(), zip);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_a_transfer_in_flight_finish() {
    let run = GatedRun::new().await;
    let (_, zip) = run.up.zip("1.0.0", "linux", "amd64");
    let (mut child, addr) = spawn_terrapeak(&run.cfg);
    let base = format!("http://{addr}");
    let zip_url = run.zip_url(&base).await;
    let mut resp = run.client.get(&zip_url).send().await.unwrap();
    let mut received = resp.chunk().await.unwrap().unwrap().to_vec();

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // New connections are refused while the transfer in flight goes on.
    let mut refused = false;
    for _ in 0..50 {
        let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
        if fresh.get(format!("{base}/healthz")).send().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener closed on SIGTERM");
    run.gate.notify_waiters();
    run.gate.notify_one();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received, zip, "the transfer in flight completed");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "clean exit: {exit}");
    assert_eq!(
        std::fs::read_dir(run.data().join("staging"))
            .unwrap()
            .count(),
        0,
        "no staged garbage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_from_the_config_appears_in_any_log_line_or_in_check_config() {
    use common::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let server = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let (registry_token, artifact_token) = ("tok-registry-7c1f", "tok-artifact-9e2d");
    let yaml = format!(
        "server:\n  addr: \"127.0.0.1:0\"\nlog:\n  level: debug\nupstream:\n  base_url: \"{url}\"\n  token: \"{registry_token}\"\n  public: true\nupstreams:\n  - host: registry.terraform.io\n    base_url: \"{url}\"\n    token: \"{registry_token}\"\n    artifact_token: \"{artifact_token}\"\n    public: true\n{storage}",
        url = up.registry_url,
        storage = server.yaml("secrets", &dir.path().join("spool"))
    );
    let cfg = write_config(dir.path(), &yaml);
    let (mut child, addr, log) = spawn_terrapeak_logged(&cfg);
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = async |path: &str| client.get(format!("{base}{path}")).send().await.unwrap();
    let download = format!("/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64");
    let doc: serde_json::Value = get(&download).await.json().await.unwrap();
    let zip = doc["download_url"].as_str().unwrap().replace(&base, "");
    assert_eq!(get(&zip).await.status(), 200);
    // The tokens went where they belong.
    let auth = up.authorizations();
    assert!(
        auth.iter()
            .any(|(_, a)| a.as_deref() == Some(&format!("Bearer {registry_token}")))
    );
    assert!(
        auth.iter()
            .any(|(_, a)| a.as_deref() == Some(&format!("Bearer {artifact_token}")))
    );
    // Failures write warnings and errors: a store that is down, upstream errors, bad requests.
    server.stop();
    for path in [
        format!("/v1/providers/{NS}/{TYPE}/versions"),
        "/readyz".to_owned(),
        format!("/v1/providers/{NS}/nope/versions"),
        zip.clone(),
        "/v1/providers/..%2F/x/versions".to_owned(),
    ] {
        get(&path).await;
    }
    up.set_fault(&up.zip_path("1.1.0", "linux", "amd64"), Fault::Status(500));
    let doc: serde_json::Value = get(&download.replace("1.0.0", "1.1.0"))
        .await
        .json()
        .await
        .unwrap();
    get(&doc["download_url"].as_str().unwrap().replace(&base, "")).await;
    server.restart();
    get("/readyz").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let lines = log.lock().unwrap().clone();
    assert!(lines.len() > 20, "the debug log was captured");
    assert!(
        lines.iter().any(|l| l.contains("storage failed")),
        "the outage was logged"
    );
    for secret in [registry_token, artifact_token, ACCESS_KEY, SECRET_KEY] {
        for line in &lines {
            assert!(
                !line.contains(secret),
                "{secret} leaked into the log: {line}"
            );
        }
    }
    let out = terrapeak(&["check-config", "--config", cfg.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    for secret in [registry_token, artifact_token, ACCESS_KEY, SECRET_KEY] {
        assert!(
            !shown.contains(secret),
            "{secret} shown by check-config:\n{shown}"
        );
    }
}

/// A `terrapeak` process in front of `up` with the file store in `dir` and `log.level`, and every
/// line it logs.
fn spawn_logging(
    up: &FakeUpstream,
    dir: &std::path::Path,
    level: &str,
) -> (
    std::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let yaml = format!(
        "server:\n  addr: \"127.0.0.1:0\"\nlog:\n  level: \"{level}\"\nstorage:\n  file:\n    path: \"{}\"\nupstream:\n  base_url: \"{}\"\n",
        dir.join("data").display(),
        up.registry_url
    );
    spawn_terrapeak_logged(&write_config(dir, &yaml))
}

/// The access-log lines among `log`.
fn access_lines(log: &std::sync::Mutex<Vec<String>>) -> Vec<serde_json::Value> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "terrapeak::access")
        .collect()
}

/// One JSON line per request, with what an operator searches for: the request id the client
/// sent (echoed in the response), the path, status, bytes sent, cache status, upstream and the
/// Terraform version from the user agent; a response cut short is a warning marked incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_json_line_per_request() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, log) = spawn_logging(&up, dir.path(), "info");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let path = format!("/v1/providers/{NS}/{TYPE}/versions");
    let mut sizes = Vec::new();
    for (i, id) in ["req-one", "req-two"].iter().enumerate() {
        let resp = client
            .get(format!("http://{addr}{path}"))
            .header("user-agent", "Terraform/1.11.4 (+https://www.terraform.io)")
            .header("x-request-id", *id)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-request-id"], *id);
        assert_eq!(
            resp.headers()["x-cache-status"],
            if i == 0 { "MISS" } else { "HIT" }
        );
        sizes.push(resp.bytes().await.unwrap().len() as u64);
    }
    // No client id: one is made up and sent back.
    let resp = client
        .get(format!("http://{addr}/v1/providers/{NS}/nope/versions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let made_up = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made_up.len(), 36, "{made_up}");

    // The log goes out in batches at least every 100 ms.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..100 {
        lines = access_lines(&log);
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for (i, (line, id)) in lines.iter().zip(["req-one", "req-two"]).enumerate() {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], path.as_str());
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes"], sizes[i]);
        assert_eq!(line["request_id"], id);
        assert_eq!(line["terraform_version"], "1.11.4");
        assert_eq!(line["upstream"], "registry.terraform.io");
        assert_eq!(line["cache_status"], if i == 0 { "MISS" } else { "HIT" });
        assert!(line["elapsed_ms"].as_f64().unwrap() >= 0.0);
        assert!(
            line["remote_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        let message = line["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "HTTP GET {path} - 200 (OK) - {} bytes in ",
                sizes[i]
            )),
            "{message}"
        );
        let ts = line["timestamp"].as_str().unwrap();
        assert!(
            ts.starts_with("20") && ts.ends_with('Z') && ts.len() == 27,
            "{ts}"
        );
    }
    assert_eq!(lines[2]["status"], 404);
    assert_eq!(lines[2]["request_id"], made_up.as_str());
    assert!(lines[2].get("terraform_version").is_none());
}

/// `log.level` is a filter: `info,terrapeak::access=warn` keeps the server's own messages and
/// logs only the requests that failed or were cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_follows_the_log_filter() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, log) = spawn_logging(&up, dir.path(), "info,terrapeak::access=warn");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let ok = client
        .get(format!("http://{addr}/v1/providers/{NS}/{TYPE}/versions"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    up.set_fault(
        &format!("/v1/providers/{NS}/broken/versions"),
        Fault::Status(500),
    );
    let failed = client
        .get(format!("http://{addr}/v1/providers/{NS}/broken/versions"))
        .send()
        .await
        .unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    for _ in 0..100 {
        if !access_lines(&log).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give a line for the successful request time to show up, if it were (wrongly) written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["level"], "WARN");
    assert_eq!(
        lines[0]["path"],
        format!("/v1/providers/{NS}/broken/versions")
    );
}

/// The service-link variables Kubernetes gives every pod for a Service named `terrapeak`.
const SERVICE_LINKS: &[(&str, &str)] = &[
    ("TERRAPEAK_PORT", "tcp://10.96.0.12:8081"),
    ("TERRAPEAK_SERVICE_HOST", "10.96.0.12"),
    ("TERRAPEAK_SERVICE_PORT", "8081"),
    ("TERRAPEAK_SERVICE_PORT_HTTP", "8081"),
    ("TERRAPEAK_PORT_8081_TCP", "tcp://10.96.0.12:8081"),
    ("TERRAPEAK_PORT_8081_TCP_PROTO", "tcp"),
    ("TERRAPEAK_PORT_8081_TCP_PORT", "8081"),
    ("TERRAPEAK_PORT_8081_TCP_ADDR", "10.96.0.12"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_service_links_stop_neither_serve_nor_check_config_but_a_misspelt_key_does() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "server:\n  addr: \"127.0.0.1:0\"\nstorage:\n  file:\n    path: \"{}\"\nupstream:\n  base_url: \"{}\"\n",
        dir.path().join("data").display(),
        up.registry_url
    );
    let cfg = write_config(dir.path(), &yaml);
    let out = Command::new(BIN)
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .envs(SERVICE_LINKS.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let env: Vec<_> = SERVICE_LINKS.iter().map(|(k, v)| (*k, Some(*v))).collect();
    let (mut child, addr, _) = spawn_terrapeak_env(&cfg, &env);
    let resp = reqwest::get(format!("http://{addr}/v1/providers/{NS}/{TYPE}/versions"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The image's health check.
    let health = terrapeak(&["healthcheck", "--url", &format!("http://{addr}/healthz")]);
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let health = terrapeak(&["healthcheck", "--url", &format!("http://{addr}/healthz")]);
    assert!(!health.status.success(), "nothing answers any more");

    let out = Command::new(BIN)
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .envs(SERVICE_LINKS.iter().copied())
        .env("TERRAPEAK_SERVER__ADRR", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adrr"), "{stderr}");
}

#[test]
fn healthcheck_asks_the_configured_listen_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    // Nothing listens there: the check fails and says where it asked.
    let out = Command::new(BIN)
        .args(["healthcheck", "--timeout", "2s"])
        .env("TERRAPEAK_SERVER__ADDR", addr.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("http://{addr}/healthz")),
        "{stderr}"
    );
}

/// Upstream TLS trusts the platform's roots: `SSL_CERT_FILE` alone (no `upstream.ca_file`) is
/// enough to reach an upstream whose certificate a private CA issued. The upstream here is a
/// second TerraPeak serving HTTPS with a test CA in front of the fake registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_cert_file_alone_makes_a_private_ca_upstream_trusted() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let (tls, front) = start_tls_proxy(&up, |_| {}).await;
    assert!(front.base.starts_with("https://"));
    let ca = tls.path("ca.pem");
    let versions = format!("/v1/providers/{NS}/{TYPE}/versions");
    let with_ca: [(&str, Option<&str>); 2] = [
        ("SSL_CERT_FILE", Some(ca.to_str().unwrap())),
        ("SSL_CERT_DIR", None),
    ];
    let without: [(&str, Option<&str>); 2] = [("SSL_CERT_FILE", None), ("SSL_CERT_DIR", None)];
    for (trusted, env) in [(true, with_ca), (false, without)] {
        // A cache of its own each time, so nothing is served from the first run.
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "server:\n  addr: \"127.0.0.1:0\"\nstorage:\n  file:\n    path: \"{}\"\nupstream:\n  base_url: \"{}\"\n  metadata_retries: 0\n",
            dir.path().join("data").display(),
            front.base
        );
        let cfg = write_config(dir.path(), &yaml);
        let (mut child, addr, _) = spawn_terrapeak_env(&cfg, &env);
        let resp = reqwest::get(format!("http://{addr}{versions}"))
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        if trusted {
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("1.1.0"), "{body}");
        } else {
            assert_eq!(status, 502, "{body}");
        }
    }
}
