//! Git module sources over http(s), through the `git` command (as Terraform itself does):
//! resolve a ref to a commit, fetch that one commit shallowly, and stream the tree at it as a
//! deterministic `.tar.gz` without `.git`.
//!
//! Only the http and https transports are allowed, no credential helper or prompt is consulted,
//! and the user's and system's git configuration are ignored.

use super::{ArtifactResponse, UpstreamError};
use bytes::Bytes;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// A ref resolved against the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub commit: String,
    /// A branch moves; tags and commits do not.
    pub is_branch: bool,
    /// The full ref name to fetch, when the ref was a name.
    pub ref_name: Option<String>,
}

fn git() -> Command {
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "protocol.allow=never",
        "-c",
        "protocol.http.allow=always",
        "-c",
        "protocol.https.allow=always",
        "-c",
        "credential.helper=",
        "-c",
        "core.askPass=",
    ])
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null")
    .env_remove("GIT_DIR")
    .stdin(Stdio::null())
    .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command, what: &str, timeout: Duration) -> Result<Vec<u8>, UpstreamError> {
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| UpstreamError::Timeout(what.to_owned()))?
        .map_err(|e| UpstreamError::Connect(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(UpstreamError::Connect(format!("{what}: {}", line.trim())));
    }
    Ok(out.stdout)
}

fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves `reference` (a tag, a branch, a full ref name or a commit id; the remote's HEAD when
/// absent) to a commit, preferring tags over branches as git does.
pub async fn resolve(
    url: &str,
    reference: Option<&str>,
    timeout: Duration,
) -> Result<Resolved, UpstreamError> {
    if let Some(r) = reference
        && is_commit_id(r)
    {
        return Ok(Resolved {
            commit: r.to_ascii_lowercase(),
            is_branch: false,
            ref_name: None,
        });
    }
    let wanted = reference.unwrap_or("HEAD");
    let mut cmd = git();
    cmd.args(["ls-remote", "--", url]);
    let out = run(cmd, &format!("git ls-remote {url}"), timeout).await?;
    let text = String::from_utf8_lossy(&out);
    let refs: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, name)| (sha.trim(), name.trim()))
        .collect();
    let find = |name: &str| {
        refs.iter()
            .find(|(_, n)| *n == name)
            .map(|(sha, _)| sha.to_string())
    };
    let tag = format!("refs/tags/{wanted}");
    let head = format!("refs/heads/{wanted}");
    let found = if let Some(sha) = find(&format!("{tag}^{{}}")).or_else(|| find(&tag)) {
        Some((sha, false, tag))
    } else if let Some(sha) = find(&head) {
        Some((sha, true, head))
    } else {
        find(wanted).map(|sha| (sha, !wanted.starts_with("refs/tags/"), wanted.to_owned()))
    };
    match found {
        Some((commit, is_branch, ref_name)) if is_commit_id(&commit) => Ok(Resolved {
            commit: commit.to_ascii_lowercase(),
            is_branch,
            ref_name: Some(ref_name),
        }),
        _ => Err(UpstreamError::NotFound(format!(
            "git ref {wanted} in {url}"
        ))),
    }
}

/// Removes a scratch directory when dropped.
struct Scratch(PathBuf);

/// An empty bare repository under `work_root` (three entries; made here, not by `git init`).
fn scratch_repo(work_root: &Path) -> Result<Scratch, UpstreamError> {
    let dir = work_root.join(format!("git-{}", uuid::Uuid::new_v4().simple()));
    let scratch = Scratch(dir.clone());
    let made: std::io::Result<()> = (|| {
        std::fs::create_dir_all(dir.join("objects"))?;
        std::fs::create_dir_all(dir.join("refs"))?;
        std::fs::write(dir.join("HEAD"), "ref: refs/heads/main\n")
    })();
    made.map_err(|e| UpstreamError::Connect(format!("cannot make a scratch repository: {e}")))?;
    Ok(scratch)
}

/// `git fetch --depth 1` of `want` into `dir`; what FETCH_HEAD says came, peeled to a commit
/// (an annotated tag names its tag object there).
async fn shallow_fetch(
    dir: &Path,
    url: &str,
    want: &str,
    timeout: Duration,
) -> Result<(String, String), UpstreamError> {
    let mut cmd = git();
    cmd.arg("-C")
        .arg(dir)
        .args(["fetch", "-q", "--no-tags", "--depth", "1", "--", url, want]);
    run(cmd, &format!("git fetch {url} {want}"), timeout).await?;
    let head = std::fs::read_to_string(dir.join("FETCH_HEAD")).unwrap_or_default();
    let line = head.lines().next().unwrap_or_default().to_owned();
    let sha = line.get(..40).unwrap_or_default().to_ascii_lowercase();
    Ok((sha, line))
}

async fn peel(dir: &Path, timeout: Duration) -> Result<String, UpstreamError> {
    let mut cmd = git();
    cmd.arg("-C")
        .arg(dir)
        .args(["rev-parse", "FETCH_HEAD^{commit}"]);
    let out = run(cmd, "git rev-parse", timeout).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_ascii_lowercase())
}

/// Fetches `resolved.commit` (by its ref name when it has one) into a new scratch repository.
async fn fetch_commit(
    url: &str,
    resolved: &Resolved,
    work_root: &Path,
    timeout: Duration,
) -> Result<(PathBuf, Scratch), UpstreamError> {
    let scratch = scratch_repo(work_root)?;
    let dir = scratch.0.clone();
    let want = resolved
        .ref_name
        .clone()
        .unwrap_or_else(|| resolved.commit.clone());
    let (mut fetched, _) = shallow_fetch(&dir, url, &want, timeout).await?;
    if fetched != resolved.commit {
        fetched = peel(&dir, timeout).await?;
    }
    if fetched != resolved.commit {
        return Err(UpstreamError::Invalid(format!(
            "{url}: {want} is now {fetched}, not {}",
            resolved.commit
        )));
    }
    Ok((dir, scratch))
}

/// How long a fetch made to resolve a ref is kept for the archive that usually follows.
const FETCHED_KEEP: Duration = Duration::from_secs(60);

/// Fetches made by [`resolve_by_fetch`]: url, commit, when, and the repository.
static FETCHED: std::sync::Mutex<Vec<(String, String, std::time::Instant, Scratch)>> =
    std::sync::Mutex::new(Vec::new());

fn take_fetched(url: &str, commit: &str) -> Option<Scratch> {
    let mut kept = FETCHED.lock().expect("fetched lock");
    kept.retain(|(_, _, at, _)| at.elapsed() < FETCHED_KEEP);
    let i = kept
        .iter()
        .position(|(u, c, _, _)| u == url && c == commit)?;
    Some(kept.swap_remove(i).3)
}

/// Resolves `reference` by fetching it (one exchange with the git host instead of an
/// `ls-remote` and then a fetch), for a ref never resolved before; the fetched repository is
/// kept for a minute for [`archive`] of that commit.
pub async fn resolve_by_fetch(
    url: &str,
    reference: Option<&str>,
    work_root: &Path,
    timeout: Duration,
) -> Result<Resolved, UpstreamError> {
    if reference.is_some_and(is_commit_id) {
        return resolve(url, reference, timeout).await;
    }
    let wanted = reference.unwrap_or("HEAD");
    let scratch = scratch_repo(work_root)?;
    let dir = scratch.0.clone();
    let (sha, line) = match shallow_fetch(&dir, url, wanted, timeout).await {
        Ok(found) => found,
        Err(UpstreamError::Connect(msg)) if msg.contains("couldn't find remote ref") => {
            return Err(UpstreamError::NotFound(format!(
                "git ref {wanted} in {url}"
            )));
        }
        Err(e) => return Err(e),
    };
    // FETCH_HEAD: `<sha>\t\ttag 'v1'`, `branch 'main'`, or the ref as asked, then ` of <url>`.
    let desc = line.splitn(3, '\t').nth(2).unwrap_or_default();
    let named = |kind: &str| {
        desc.strip_prefix(kind)
            .and_then(|r| r.split('\'').next())
            .map(str::to_owned)
    };
    let (is_branch, ref_name) = if let Some(tag) = named("tag '") {
        (false, format!("refs/tags/{tag}"))
    } else if let Some(branch) = named("branch '") {
        (true, format!("refs/heads/{branch}"))
    } else {
        (!wanted.starts_with("refs/tags/"), wanted.to_owned())
    };
    let commit = if is_branch && is_commit_id(&sha) {
        sha
    } else {
        peel(&dir, timeout).await?
    };
    if !is_commit_id(&commit) {
        return Err(UpstreamError::Invalid(format!(
            "{url}: {wanted} did not resolve to a commit"
        )));
    }
    let mut kept = FETCHED.lock().expect("fetched lock");
    kept.retain(|(_, _, at, _)| at.elapsed() < FETCHED_KEEP);
    kept.push((
        url.to_owned(),
        commit.clone(),
        std::time::Instant::now(),
        scratch,
    ));
    Ok(Resolved {
        commit,
        is_branch,
        ref_name: Some(ref_name),
    })
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fetches `resolved.commit` from `url` into a scratch repository under `work_root` and streams
/// `git archive` of it, gzipped with a fixed header so the same tree gives the same bytes.
pub async fn archive(
    url: &str,
    resolved: &Resolved,
    work_root: &Path,
    timeout: Duration,
) -> Result<ArtifactResponse, UpstreamError> {
    let (dir, scratch) = match take_fetched(url, &resolved.commit) {
        Some(scratch) => (scratch.0.clone(), scratch),
        None => fetch_commit(url, resolved, work_root, timeout).await?,
    };

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, UpstreamError>>(4);
    let commit = resolved.commit.clone();
    let what = format!("git archive {url} {commit}");
    tokio::task::spawn_blocking(move || {
        let _scratch = scratch;
        let result = pack(&dir, &commit, &tx, timeout);
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(UpstreamError::Invalid(format!("{what}: {e}"))));
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(ArtifactResponse {
        content_length: None,
        content_type: Some("application/gzip".into()),
        etag: None,
        last_modified: None,
        body: Box::pin(body),
    })
}

/// Sends gzip output in chunks over the channel as `git archive` produces the tar stream.
struct ChannelWriter<'a> {
    tx: &'a tokio::sync::mpsc::Sender<Result<Bytes, UpstreamError>>,
}

impl Write for ChannelWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("reader went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn pack(
    dir: &Path,
    commit: &str,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, UpstreamError>>,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut child = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["archive", "--format=tar", commit])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = std::time::Instant::now();
    let mut stdout = child.stdout.take().expect("piped");
    let writer = std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter { tx });
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(writer, flate2::Compression::default());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if started.elapsed() > timeout {
            let _ = child.kill();
            return Err(std::io::Error::other("timed out"));
        }
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        gz.write_all(&buf[..n])?;
    }
    let status = child.wait()?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(std::io::Error::other(format!(
            "exit {status}: {}",
            err.trim()
        )));
    }
    gz.finish()?.flush()?;
    Ok(())
}
