//! Module fixtures: a real git repository served by `git http-backend` (as CGI behind the fake
//! upstream), and archives of it.

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct ModuleFixture {
    pub dir: tempfile::TempDir,
    /// First commit (addressed by id).
    pub first_commit: String,
    /// The commit tagged `v1.0.0` (annotated).
    pub tag_commit: String,
    /// The head of branch `main`.
    pub branch_commit: String,
    pub tar_gz: Bytes,
    /// A module in `wrapper/` that calls the registry module `testns/archive/aws` (through a
    /// local module).
    pub nested_tar_gz: Bytes,
    /// The same, also requiring the provider `testns/demo >= 1.0, < 1.1`.
    pub nested_provider_tar_gz: Bytes,
    pub zip: Bytes,
}

fn git(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn commit(work: &Path, greeting: &str) -> String {
    std::fs::write(
        work.join("main.tf"),
        format!("output \"greeting\" {{\n  value = \"{greeting}\"\n}}\n"),
    )
    .unwrap();
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", greeting]);
    String::from_utf8(git(work, &["rev-parse", "HEAD"]))
        .unwrap()
        .trim()
        .to_owned()
}

/// A nested module's archive: `wrapper/main.tf` calls `./inner`, whose `main.tf` calls the
/// registry module `testns/archive/aws`; with `provider`, `wrapper/` also requires the provider
/// `testns/demo >= 1.0, < 1.1` (Terraform would then start the synthetic provider during init,
/// so the end-to-end tests use the one without).
fn nested_tar_gz(provider: bool) -> Bytes {
    let required = if provider {
        "terraform {\n  required_providers {\n    demo = {\n      source  = \"testns/demo\"\n      version = \">= 1.0, < 1.1\"\n    }\n  }\n}\n"
    } else {
        ""
    };
    let wrapper = format!(
        "{required}module \"inner\" {{\n  source = \"./inner\"\n}}\noutput \"nested\" {{\n  value = module.inner.archive\n}}\n"
    );
    let files = [
        ("wrapper/main.tf", wrapper.as_str()),
        (
            "wrapper/inner/main.tf",
            "module \"archive\" {\n  source  = \"testns/archive/aws\"\n  version = \"1.0.0\"\n}\noutput \"archive\" {\n  value = module.archive.greeting\n}\n",
        ),
    ];
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (path, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        tar.append_data(&mut header, path, text.as_bytes()).unwrap();
    }
    Bytes::from(tar.into_inner().unwrap().finish().unwrap())
}

impl ModuleFixture {
    pub fn new() -> ModuleFixture {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("modules/sub")).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(
            work.join("modules/sub/main.tf"),
            "output \"sub\" {\n  value = \"hello from the subdirectory\"\n}\n",
        )
        .unwrap();
        let first_commit = commit(&work, "hello from the first commit");
        let tag_commit = commit(&work, "hello from the tag");
        git(&work, &["tag", "-a", "v1.0.0", "-m", "release"]);
        let branch_commit = commit(&work, "hello from the branch");
        let tar_gz = Bytes::from(git(&work, &["archive", "--format=tar.gz", "v1.0.0"]));
        let zip = Bytes::from(git(&work, &["archive", "--format=zip", "v1.0.0"]));
        let bare = dir.path().join("repo.git");
        let out = Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(&bare)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .status()
            .unwrap();
        assert!(out.success());
        git(&bare, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
        git(&bare, &["config", "http.receivepack", "false"]);
        ModuleFixture {
            dir,
            first_commit,
            tag_commit,
            branch_commit,
            tar_gz,
            nested_tar_gz: nested_tar_gz(false),
            nested_provider_tar_gz: nested_tar_gz(true),
            zip,
        }
    }

    pub fn project_root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Adds a commit to `main` in the served repository (the branch moves).
    pub fn advance_branch(&self, greeting: &str) -> String {
        let work = self.dir.path().join("work");
        let sha = commit(&work, greeting);
        git(
            &work,
            &[
                "push",
                "-q",
                self.dir.path().join("repo.git").to_str().unwrap(),
                "main",
            ],
        );
        sha
    }
}

/// Serves one request through `git http-backend` as CGI.
pub fn git_cgi(
    root: &Path,
    method: &Method,
    path_info: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let mut child = Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("git http-backend runs");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return Response::builder().status(500).body(Body::empty()).unwrap();
    };
    let head = String::from_utf8_lossy(&raw[..at]).to_string();
    let mut resp = Response::builder().status(StatusCode::OK);
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("status") {
            let code: u16 = v
                .split_whitespace()
                .next()
                .unwrap_or("500")
                .parse()
                .unwrap_or(500);
            resp = resp.status(code);
        } else {
            resp = resp.header(k, v);
        }
    }
    resp.body(Body::from(raw[at + sep..].to_vec())).unwrap()
}
