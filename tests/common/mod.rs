//! Test harness: a fake upstream registry (API on one listener, artifacts on another, as the
//! real ones are) that counts hits and misbehaves on demand, signed provider fixtures made at
//! test time, and a TerraPeak started on `127.0.0.1:0` against it.

#![allow(dead_code)]

pub mod disk;
pub mod modules;
pub mod s3;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use pgp::composed::{Deserializable, DetachedSignature, SignedSecretKey};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::Password;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use terrapeak::config::Config;
use terrapeak::server::Server;
use tokio::sync::Notify;

pub const NS: &str = "testns";
pub const TYPE: &str = "demo";
pub const PLATFORMS: &[(&str, &str)] = &[
    ("linux", "amd64"),
    ("darwin", "arm64"),
    ("windows", "amd64"),
];

pub fn fixture_key(name: &str) -> String {
    let path = format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Signs `data` with a fixture secret key; returns a binary detached signature.
pub fn sign(secret_name: &str, data: &[u8]) -> Bytes {
    let (key, _) =
        SignedSecretKey::from_armor_single(Cursor::new(fixture_key(secret_name))).unwrap();
    let sig = DetachedSignature::sign_binary_data(
        rand::thread_rng(),
        &key.primary_key,
        &Password::empty(),
        HashAlgorithm::Sha256,
        data,
    )
    .unwrap();
    Bytes::from(pgp::ser::Serialize::to_bytes(&sig).unwrap())
}

/// A provider zip as Terraform expects it: one executable named after the provider, plus
/// `padding` bytes of incompressible filler to make it as large as a test needs.
pub fn provider_zip(ty: &str, version: &str, os: &str, padding: usize, label: &str) -> Bytes {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o755);
    let exe = if os == "windows" {
        format!("terraform-provider-{ty}_v{version}.exe")
    } else {
        format!("terraform-provider-{ty}_v{version}")
    };
    w.start_file(exe, opts).unwrap();
    w.write_all(format!("#!/bin/sh\necho demo provider {version} {os} {label}\n").as_bytes())
        .unwrap();
    if padding > 0 {
        w.start_file("padding.bin", opts).unwrap();
        // Incompressible filler from a xorshift generator seeded by the release.
        let seed = Sha256::digest(format!("{version}{os}").as_bytes());
        let mut x = u64::from_le_bytes(seed[..8].try_into().unwrap()) | 1;
        let mut filler = Vec::with_capacity(padding + 8);
        while filler.len() < padding {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            filler.extend_from_slice(&x.to_le_bytes());
        }
        w.write_all(&filler[..padding]).unwrap();
    }
    Bytes::from(w.finish().unwrap().into_inner())
}

/// How the fake registry signs its releases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signing {
    Rsa,
    Eddsa,
    /// No signature URL and no keys, as many OpenTofu providers.
    Keyless,
}

#[derive(Clone, Debug)]
pub struct FakeOptions {
    pub versions: Vec<&'static str>,
    pub signing: Signing,
    /// Filler bytes in the 1.0.0 linux_amd64 zip of `TYPE`.
    pub padding: usize,
    /// Written into every zip, so two fakes serve different bytes for the same release.
    pub label: &'static str,
    /// More provider types in the namespace besides `TYPE`, with the same versions.
    pub extra_types: Vec<&'static str>,
    /// Pad the 1.0.0 linux_amd64 zip of every type, not only `TYPE`'s.
    pub pad_every_type: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            versions: vec!["1.0.0", "1.1.0"],
            signing: Signing::Rsa,
            padding: 0,
            label: "",
            extra_types: Vec::new(),
            pad_every_type: false,
        }
    }
}

/// One provider version's files.
pub struct Release {
    pub zips: BTreeMap<(String, String), (String, Bytes)>,
    pub sums_name: String,
    pub sums: Bytes,
    pub sig: Bytes,
    /// A valid signature of the same SHA256SUMS by a key the registry does not list.
    pub foreign_sig: Bytes,
}

/// Ways the fake can misbehave for one path.
#[derive(Clone)]
pub enum Fault {
    Status(u16),
    /// Announce the full length, send half, then cut the connection.
    Truncate,
    /// Same length, one byte changed.
    FlipByte,
    /// Serve these bytes instead.
    Body(Bytes),
    /// Wait this long before answering.
    Stall(Duration),
    /// Send the first `n` bytes, then wait for the gate before sending the rest.
    Gate(usize, Arc<Notify>),
    /// Send the first `n` bytes, wait for the gate, then cut the connection: the upstream dies
    /// mid-transfer.
    Cut(usize, Arc<Notify>),
    /// Send at most this many bytes per second, like a remote host over the internet.
    Throttle(u64),
}

struct FakeState {
    opts: FakeOptions,
    /// Releases by provider type, then version.
    providers: BTreeMap<String, BTreeMap<String, Release>>,
    public_key: String,
    artifacts_base: Mutex<String>,
    pub modules: modules::ModuleFixture,
    hits: Mutex<HashMap<String, usize>>,
    down: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
    /// The Authorization header of each request, by path.
    auth: Mutex<Vec<(String, Option<String>)>>,
    faults: Mutex<HashMap<String, Fault>>,
}

pub struct FakeUpstream {
    pub registry_url: String,
    pub artifacts_url: String,
    state: Arc<FakeState>,
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

impl FakeUpstream {
    pub async fn start(opts: FakeOptions) -> FakeUpstream {
        let (secret, public) = match opts.signing {
            Signing::Rsa | Signing::Keyless => ("rsa.secret.asc", "rsa.public.asc"),
            Signing::Eddsa => ("eddsa.secret.asc", "eddsa.public.asc"),
        };
        let mut providers = BTreeMap::new();
        for ty in std::iter::once(TYPE).chain(opts.extra_types.iter().copied()) {
            let mut releases = BTreeMap::new();
            for v in &opts.versions {
                let mut zips = BTreeMap::new();
                let mut sums = String::new();
                for (os, arch) in PLATFORMS {
                    let name = format!("terraform-provider-{ty}_{v}_{os}_{arch}.zip");
                    let padded_type = ty == TYPE || opts.pad_every_type;
                    let padding = if padded_type && (*v, *os) == ("1.0.0", "linux") {
                        opts.padding
                    } else {
                        0
                    };
                    let zip = provider_zip(ty, v, os, padding, opts.label);
                    sums.push_str(&format!("{}  {name}\n", hex::encode(Sha256::digest(&zip))));
                    zips.insert((os.to_string(), arch.to_string()), (name, zip));
                }
                let sums = Bytes::from(sums);
                releases.insert(
                    v.to_string(),
                    Release {
                        zips,
                        sums_name: format!("terraform-provider-{ty}_{v}_SHA256SUMS"),
                        sig: sign(secret, &sums),
                        foreign_sig: sign("other.secret.asc", &sums),
                        sums,
                    },
                );
            }
            providers.insert(ty.to_owned(), releases);
        }
        let state = Arc::new(FakeState {
            opts,
            providers,
            public_key: fixture_key(public),
            artifacts_base: Mutex::new(String::new()),
            modules: modules::ModuleFixture::new(),
            hits: Mutex::new(HashMap::new()),
            down: std::sync::atomic::AtomicBool::new(false),
            stalled: std::sync::atomic::AtomicBool::new(false),
            auth: Mutex::new(Vec::new()),
            faults: Mutex::new(HashMap::new()),
        });
        let artifacts = serve(
            Router::new()
                .fallback(artifact_handler)
                .with_state(state.clone()),
        )
        .await;
        let registry = serve(
            Router::new()
                .fallback(registry_handler)
                .with_state(state.clone()),
        )
        .await;
        *state.artifacts_base.lock().unwrap() = format!("http://{artifacts}");
        FakeUpstream {
            registry_url: format!("http://{registry}"),
            artifacts_url: format!("http://{artifacts}"),
            state,
        }
    }

    /// Serves the artifact host (archives, zips and the git repository) over HTTPS too, with
    /// `tls`'s certificate, and makes download answers and module sources point there.
    pub async fn serve_artifacts_tls(&self, tls: &TestTls) -> String {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(
            tls.path("cert.pem"),
            tls.path("key.pem"),
        )
        .await
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .fallback(artifact_handler)
            .with_state(self.state.clone());
        let server = axum_server::from_tcp_rustls(listener, config).unwrap();
        tokio::spawn(async move {
            server.serve(app.into_make_service()).await.unwrap();
        });
        self.set_artifacts_base(&base);
        base
    }

    /// Makes download answers point at another artifact host (an nginx serving the files, in
    /// `scripts/bench`).
    pub fn set_artifacts_base(&self, base: &str) {
        *self.state.artifacts_base.lock().unwrap() = base.trim_end_matches('/').to_owned();
    }

    pub fn release(&self, version: &str) -> &Release {
        &self.state.providers[TYPE][version]
    }

    pub fn zip(&self, version: &str, os: &str, arch: &str) -> (String, Bytes) {
        self.release(version).zips[&(os.to_owned(), arch.to_owned())].clone()
    }

    /// The fake's own path for a zip, for hit counts and faults.
    pub fn zip_path(&self, version: &str, os: &str, arch: &str) -> String {
        format!("/files/{}", self.zip(version, os, arch).0)
    }

    pub fn sums_path(&self, version: &str) -> String {
        format!("/files/{}", self.release(version).sums_name)
    }

    pub fn sig_path(&self, version: &str) -> String {
        format!("/files/{}.sig", self.release(version).sums_name)
    }

    pub fn modules(&self) -> &modules::ModuleFixture {
        &self.state.modules
    }

    /// Requests the git server has seen.
    pub fn git_hits(&self) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with("/git/"))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn hits(&self, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Every request either listener has seen.
    pub fn total_hits(&self) -> usize {
        self.state.hits.lock().unwrap().values().sum()
    }

    /// (path, Authorization header) of every request so far.
    pub fn authorizations(&self) -> Vec<(String, Option<String>)> {
        self.state.auth.lock().unwrap().clone()
    }

    /// Every request to either listener (and the git server) fails with 503 while down.
    pub fn set_down(&self, down: bool) {
        self.state
            .down
            .store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every request is counted and then never answered while stalled: a hung upstream.
    pub fn set_stalled(&self, stalled: bool) {
        self.state
            .stalled
            .store(stalled, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.state
            .faults
            .lock()
            .unwrap()
            .insert(path.to_owned(), fault);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }
}

fn json(value: serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        serde_json::json!({"errors": ["Not Found"]}).to_string(),
    )
        .into_response()
}

/// Counts the hit and applies a fault that replaces the whole answer, if any.
async fn before(state: &FakeState, path: &str) -> (Option<Fault>, Option<Response>) {
    *state
        .hits
        .lock()
        .unwrap()
        .entry(path.to_owned())
        .or_default() += 1;
    if state.stalled.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if state.down.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            None,
            Some((StatusCode::SERVICE_UNAVAILABLE, "down").into_response()),
        );
    }
    let fault = state.faults.lock().unwrap().get(path).cloned();
    match fault {
        Some(Fault::Status(code)) => (
            None,
            Some((StatusCode::from_u16(code).unwrap(), "injected failure").into_response()),
        ),
        Some(Fault::Stall(d)) => {
            tokio::time::sleep(d).await;
            (None, None)
        }
        other => (other, None),
    }
}

fn record_auth(state: &FakeState, path: &str, req: &Request) {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state.auth.lock().unwrap().push((path.to_owned(), auth));
}

async fn registry_handler(State(state): State<Arc<FakeState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    record_auth(&state, &path, &req);
    let (_, early) = before(&state, &path).await;
    if let Some(resp) = early {
        return resp;
    }
    if path == "/.well-known/terraform.json" {
        return json(
            serde_json::json!({"providers.v1": "/v1/providers/", "modules.v1": "/v1/modules/"}),
        );
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "providers", ns, ty, "versions"]
            if *ns == NS && state.providers.contains_key(*ty) =>
        {
            let versions: Vec<_> = state.providers[*ty]
                .keys()
                .map(|v| {
                    serde_json::json!({
                        "version": v,
                        "protocols": ["5.0"],
                        "platforms": PLATFORMS.iter().map(|(os, arch)| serde_json::json!({"os": os, "arch": arch})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json(
                serde_json::json!({"id": format!("{NS}/{ty}"), "versions": versions, "warnings": null}),
            )
        }
        ["v1", "providers", ns, ty, v, "download", os, arch]
            if *ns == NS && state.providers.contains_key(*ty) =>
        {
            let Some(release) = state.providers[*ty].get(*v) else {
                return not_found();
            };
            let Some((name, zip)) = release.zips.get(&(os.to_string(), arch.to_string())) else {
                return not_found();
            };
            let base = state.artifacts_base.lock().unwrap().clone();
            let mut doc = serde_json::json!({
                "protocols": ["5.0"],
                "os": os,
                "arch": arch,
                "filename": name,
                "download_url": format!("{base}/files/{name}"),
                "shasums_url": format!("{base}/files/{}", release.sums_name),
                "shasum": hex::encode(Sha256::digest(zip)),
                "x_custom": {"kept": true},
            });
            if state.opts.signing != Signing::Keyless {
                doc["shasums_signature_url"] =
                    format!("{base}/files/{}.sig", release.sums_name).into();
                doc["signing_keys"] = serde_json::json!({"gpg_public_keys": [{
                    "key_id": "TESTKEY",
                    "ascii_armor": state.public_key,
                    "trust_signature": "",
                    "source": "Test",
                    "source_url": null
                }]});
            }
            json(doc)
        }
        ["v1", "modules", ns, name, "aws", "versions"] if *ns == NS => json(serde_json::json!({
            "modules": [{"source": format!("{NS}/{name}/aws"), "versions": [{"version": "1.0.0", "submodules": []}]}]
        })),
        ["v1", "modules", ns, name, "aws", "1.0.0", "download"] if *ns == NS => {
            let art = state.artifacts_base.lock().unwrap().clone();
            let m = &state.modules;
            let location = match *name {
                "archive" => format!("{art}/mods/module.tar.gz"),
                // Calls `archive` from the registry and needs the provider: a nested module.
                "nested" => format!("{art}/mods/nested.tar.gz//wrapper"),
                "nestedprovider" => format!("{art}/mods/nested-provider.tar.gz//wrapper"),
                "relative" => "./pkg.tgz".to_owned(),
                "jsonloc" => {
                    return json(serde_json::json!({"location": format!("{art}/mods/module.zip")}));
                }
                "gittag" => format!("git::{art}/git/repo.git?ref=v1.0.0"),
                "gitbranch" => format!("git::{art}/git/repo.git?ref=main"),
                "gitsha" => format!("git::{art}/git/repo.git?ref={}", m.first_commit),
                "gitsub" => format!("git::{art}/git/repo.git//modules/sub?ref=v1.0.0"),
                "ssh" => "git::ssh://git@git.example.invalid/repo.git?ref=v1.0.0".to_owned(),
                _ => return not_found(),
            };
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .header("x-terraform-get", location)
                .body(Body::empty())
                .unwrap()
        }
        ["v1", "modules", ns, "relative", "aws", "1.0.0", "pkg.tgz"] if *ns == NS => {
            Response::new(Body::from(state.modules.tar_gz.clone()))
        }
        _ => not_found(),
    }
}

async fn artifact_handler(State(state): State<Arc<FakeState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    record_auth(&state, &path, &req);
    let (fault, early) = before(&state, &path).await;
    if let Some(resp) = early {
        return resp;
    }
    if let Some(info) = path.strip_prefix("/git") {
        let (method, headers, query) = (
            req.method().clone(),
            req.headers().clone(),
            req.uri().query().unwrap_or("").to_owned(),
        );
        let body = axum::body::to_bytes(req.into_body(), 64 << 20)
            .await
            .unwrap_or_default();
        let root = state.modules.project_root();
        let info = info.to_owned();
        return tokio::task::spawn_blocking(move || {
            modules::git_cgi(&root, &method, &info, &query, &headers, body)
        })
        .await
        .unwrap();
    }
    let mut body = match path.as_str() {
        "/mods/module.tar.gz" => Some(state.modules.tar_gz.clone()),
        "/mods/module.zip" => Some(state.modules.zip.clone()),
        "/mods/nested.tar.gz" => Some(state.modules.nested_tar_gz.clone()),
        "/mods/nested-provider.tar.gz" => Some(state.modules.nested_provider_tar_gz.clone()),
        _ => None,
    };
    let name = path.strip_prefix("/files/").unwrap_or_default();
    for release in state.providers.values().flat_map(|r| r.values()) {
        if name == release.sums_name {
            body = Some(release.sums.clone());
        } else if name.strip_suffix(".sig") == Some(release.sums_name.as_str()) {
            body = Some(release.sig.clone());
        } else if let Some((_, zip)) = release.zips.values().find(|(n, _)| n == name) {
            body = Some(zip.clone());
        }
    }
    let Some(body) = body else {
        return not_found();
    };
    let len = body.len();
    match fault {
        Some(Fault::Body(b)) => Response::new(Body::from(b)),
        Some(Fault::FlipByte) => {
            let mut v = body.to_vec();
            let i = v.len() / 2;
            v[i] ^= 0xff;
            Response::new(Body::from(v))
        }
        Some(Fault::Truncate) => {
            let half = body.slice(..len / 2);
            let stream = futures_util::stream::iter(vec![
                Ok::<Bytes, std::io::Error>(half),
                Err(std::io::Error::other("injected disconnect")),
            ]);
            let mut resp = Response::new(Body::from_stream(stream));
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, len.into());
            resp
        }
        Some(fault @ (Fault::Gate(n, _) | Fault::Cut(n, _))) => {
            let (first, rest) = (body.slice(..n.min(len)), body.slice(n.min(len)..));
            let (gate, cut) = match fault {
                Fault::Gate(_, gate) => (gate, false),
                Fault::Cut(_, gate) => (gate, true),
                _ => unreachable!(),
            };
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let (first, rest, gate) = (first.clone(), rest.clone(), gate.clone());
                async move {
                    match step {
                        0 => Some((Ok::<Bytes, std::io::Error>(first), 1)),
                        1 => {
                            gate.notified().await;
                            if cut {
                                return Some((Err(std::io::Error::other("upstream died")), 2));
                            }
                            Some((Ok(rest), 2))
                        }
                        _ => None,
                    }
                }
            });
            let mut resp = Response::new(Body::from_stream(stream));
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, len.into());
            resp
        }
        Some(Fault::Throttle(rate)) => {
            const CHUNK: usize = 64 * 1024;
            let started = tokio::time::Instant::now();
            let stream = futures_util::stream::unfold(0usize, move |sent| {
                let body = body.clone();
                async move {
                    if sent >= body.len() {
                        return None;
                    }
                    let due = started + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
                    tokio::time::sleep_until(due).await;
                    let end = (sent + CHUNK).min(body.len());
                    Some((Ok::<Bytes, std::io::Error>(body.slice(sent..end)), end))
                }
            });
            let mut resp = Response::new(Body::from_stream(stream));
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, len.into());
            resp
        }
        _ => Response::new(Body::from(body)),
    }
}

/// A TerraPeak under test, with its own cache directory.
pub struct Proxy {
    pub server: Option<Server>,
    pub base: String,
    pub data_dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

/// Whether this run keeps the cache in S3 (`TERRAPEAK_TEST_STORAGE=s3`, an in-process s3s-fs
/// server) instead of the cache directory. The black-box suites run both ways.
pub fn s3_under_test() -> Option<Arc<s3::S3Server>> {
    match std::env::var("TERRAPEAK_TEST_STORAGE").as_deref() {
        Ok("s3") => Some(s3::S3Server::shared()),
        Ok("file") | Err(_) => None,
        Ok(other) => panic!("TERRAPEAK_TEST_STORAGE={other}: expected file or s3"),
    }
}

/// The S3 key prefix of the TerraPeak whose cache directory is `data_dir`.
fn s3_prefix(data_dir: &std::path::Path) -> String {
    data_dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// A configuration pointing the default upstream (`registry.terraform.io`) at the fake. The
/// store is the cache directory, or the S3 server under test with a prefix of its own.
pub fn config_for(upstream: &FakeUpstream, data_dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.addr = "127.0.0.1:0".into();
    config.storage.file.path = data_dir.to_path_buf();
    config.upstream.base_url = Some(upstream.registry_url.clone());
    config.log.level = "warn".into();
    if let Some(server) = s3_under_test() {
        server.configure(&mut config, &s3_prefix(data_dir));
    }
    config
}

impl Proxy {
    pub async fn start(upstream: &FakeUpstream, tweak: impl FnOnce(&mut Config)) -> Proxy {
        Proxy::start_in(upstream, tempfile::tempdir().unwrap(), tweak).await
    }

    /// [`Proxy::start`] with a cache directory the test made (a small filesystem, say).
    pub async fn start_in(
        upstream: &FakeUpstream,
        data_dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> Proxy {
        let mut config = config_for(upstream, data_dir.path());
        tweak(&mut config);
        let server = Server::start(&config).await.expect("TerraPeak starts");
        Proxy {
            base: server.base_url(),
            server: Some(server),
            data_dir,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// A GET of `path` (or of a whole URL), with `token` as a bearer credential when given.
    pub async fn get_as(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            self.url(path)
        };
        let mut req = self.client.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// Fetches one provider platform as a client with `token` would, the download answer
    /// (which must be 200) and then the zip: the zip's status, cache status and bytes.
    pub async fn fetch_zip(
        &self,
        token: Option<&str>,
        version: &str,
        os: &str,
        arch: &str,
    ) -> (StatusCode, Option<String>, Bytes) {
        let answer = self
            .get_as(
                &format!("/v1/providers/{NS}/{TYPE}/{version}/download/{os}/{arch}"),
                token,
            )
            .await;
        assert_eq!(answer.status().as_u16(), 200, "download answer");
        let doc: serde_json::Value = answer.json().await.unwrap();
        let resp = self
            .get_as(doc["download_url"].as_str().unwrap(), token)
            .await;
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let cache = cache_status(&resp);
        (status, cache, resp.bytes().await.unwrap())
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Option<String>, serde_json::Value) {
        let resp = self.get(path).await;
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let cache = cache_status(&resp);
        let body = resp.json().await.unwrap_or(serde_json::Value::Null);
        (status, cache, body)
    }

    /// Asks for the download answer and returns the rewritten zip, sums and signature URLs.
    pub async fn handed_out(
        &self,
        version: &str,
        os: &str,
        arch: &str,
    ) -> (String, String, Option<String>) {
        let (status, _, doc) = self
            .get_json(&format!(
                "/v1/providers/{NS}/{TYPE}/{version}/download/{os}/{arch}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        (
            doc["download_url"].as_str().unwrap().to_owned(),
            doc["shasums_url"].as_str().unwrap().to_owned(),
            doc["shasums_signature_url"].as_str().map(str::to_owned),
        )
    }

    /// Where the stored bytes of `key` (`data/...`) sit on disk, in the cache directory or in
    /// the S3 server's directory.
    pub fn stored_file(&self, key: &str) -> std::path::PathBuf {
        match s3_under_test() {
            Some(server) => server
                .root
                .join(s3::BUCKET)
                .join(s3_prefix(self.data_dir.path()))
                .join(key),
            None => self.data_dir.path().join(key),
        }
    }

    /// Files under the cache directory's `staging/` (fills in progress or left behind).
    pub fn staged_files(&self) -> usize {
        std::fs::read_dir(self.data_dir.path().join("staging"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The files left in `staging/` once the proxy has had a second to finish what it still
    /// had in hand: a failed fill's clean-up, and the small writes that run behind their
    /// answers (a SHA256SUMS served before it is on disk). Anything still there was left behind.
    pub async fn staged_files_settled(&self) -> usize {
        for _ in 0..50 {
            if self.staged_files() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.staged_files()
    }
}

pub fn cache_status(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A fake upstream whose 1.0.0 linux_amd64 zip (carrying `padding` filler bytes) stops after
/// 1 MiB until `gate` opens, and a TerraPeak in front of it that has handed that zip out.
pub struct GatedZip {
    pub up: FakeUpstream,
    pub proxy: Proxy,
    pub zip_url: String,
    pub zip: Bytes,
    pub zip_path: String,
    pub gate: Arc<Notify>,
}

impl GatedZip {
    pub async fn start(padding: usize) -> GatedZip {
        GatedZip::start_with(padding, |_| {}).await
    }

    pub async fn start_with(padding: usize, tweak: impl FnOnce(&mut Config)) -> GatedZip {
        let up = FakeUpstream::start(FakeOptions {
            padding,
            ..Default::default()
        })
        .await;
        let proxy = Proxy::start(&up, tweak).await;
        let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
        let (_, zip) = up.zip("1.0.0", "linux", "amd64");
        let zip_path = up.zip_path("1.0.0", "linux", "amd64");
        let gate = Arc::new(Notify::new());
        up.set_fault(&zip_path, Fault::Gate(1 << 20, gate.clone()));
        GatedZip {
            up,
            proxy,
            zip_url,
            zip,
            zip_path,
            gate,
        }
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1 and localhost, written as PEM files.
pub struct TestTls {
    dir: tempfile::TempDir,
}

impl TestTls {
    pub fn new() -> TestTls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "TerraPeak test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&server_key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), server_key.serialize_pem()).unwrap();
        TestTls { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A TerraPeak serving HTTPS with a fresh test CA.
pub async fn start_tls_proxy(
    up: &FakeUpstream,
    tweak: impl FnOnce(&mut terrapeak::config::Config),
) -> (TestTls, Proxy) {
    let tls = TestTls::new();
    let proxy = Proxy::start(up, |c| {
        c.server.tls.cert_file = Some(tls.path("cert.pem"));
        c.server.tls.key_file = Some(tls.path("key.pem"));
        tweak(c);
    })
    .await;
    (tls, proxy)
}

/// Starts the `terrapeak` binary with a configuration file and waits for its "listening" log
/// line; returns the child and its address.
pub fn spawn_terrapeak(cfg: &std::path::Path) -> (std::process::Child, String) {
    let (child, addr, _) = spawn_terrapeak_logged(cfg);
    (child, addr)
}

/// [`spawn_terrapeak`], also returning every log line the process writes.
pub fn spawn_terrapeak_logged(
    cfg: &std::path::Path,
) -> (std::process::Child, String, Arc<Mutex<Vec<String>>>) {
    spawn_terrapeak_env(cfg, &[])
}

/// [`spawn_terrapeak_logged`] with environment variables set (`Some`) or removed (`None`).
pub fn spawn_terrapeak_env(
    cfg: &std::path::Path,
    env: &[(&str, Option<&str>)],
) -> (std::process::Child, String, Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader};
    // Set by cargo for integration tests (not for the bench example, which never calls this).
    let bin = match option_env!("CARGO_BIN_EXE_terrapeak") {
        Some(bin) => bin,
        None => panic!("the terrapeak binary is only known to integration tests"),
    };
    let mut command = std::process::Command::new(bin);
    command
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env_remove("TERRAPEAK_CONFIG");
    for (k, v) in env {
        match v {
            Some(v) => command.env(k, v),
            None => command.env_remove(k),
        };
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    // stderr (panics, anything outside the log) is kept too.
    let stderr = child.stderr.take().unwrap();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("terrapeak stderr: {line}");
            kept.lock().unwrap().push(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("server logs before exiting").unwrap();
        log.lock().unwrap().push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "TerraPeak listening" {
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe; warnings go to the
    // test's output.
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("\"level\":\"WARN\"") || line.contains("\"level\":\"ERROR\"") {
                eprintln!("terrapeak: {line}");
            }
            kept.lock().unwrap().push(line);
        }
    });
    (child, addr, log)
}

/// Parses a scrape with a Prometheus text-format parser.
pub struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    pub async fn of(client: &reqwest::Client, url: &str) -> Scrape {
        let resp = client.get(url).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let text = resp.text().await.unwrap();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).expect("a valid Prometheus text exposition"))
    }

    /// The sum of every sample of `metric` whose labels include `labels`.
    pub fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("{metric} is not a plain value"),
            })
            .sum()
    }

    /// The value of the one sample of `metric` whose labels include `labels`; 0 when none.
    pub fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<_> = self
            .0
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert!(
            matching.len() <= 1,
            "{metric} {labels:?} matches several series"
        );
        matching.first().map_or(0.0, |s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{metric} is not a plain value"),
        })
    }

    /// Every series, as `metric{labels}`.
    pub fn series(&self) -> std::collections::BTreeSet<String> {
        self.0
            .samples
            .iter()
            .map(|s| {
                let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                format!("{}{{{}}}", s.metric, labels.join(","))
            })
            .collect()
    }
}
