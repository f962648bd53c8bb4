//! Git module sources over http(s), through the `git` command (as Terraform itself does):
//! resolve a ref to a commit, fetch that one commit shallowly, and stream the tree at it as a
//! deterministic `.tar.gz` without `.git`.
//!
//! Only the http and https transports are allowed, no credential helper or prompt is consulted,
//! and the user's and system's git configuration are ignored. Over https, git trusts what
//! TerraPeak's own HTTP client trusts: `upstream.ca_file` and `SSL_CERT_FILE` / `SSL_CERT_DIR`
//! besides the system's roots (see [`Trust`]).

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

/// The CA certificates git is given for https remotes, so a git host behind a private CA works
/// whenever its registry does: git's libcurl reads neither `upstream.ca_file` nor
/// `SSL_CERT_FILE`, and its one CA file setting replaces the system bundle rather than adding to
/// it. Passed as `GIT_SSL_CAINFO` / `GIT_SSL_CAPATH`, which win over any git configuration.
#[derive(Debug, Default)]
pub struct Trust {
    /// `SSL_CERT_FILE` as it is, or, with `upstream.ca_file`, a bundle of that file and the
    /// roots it adds to (written on first use).
    ca_info: Option<CaInfo>,
    /// `SSL_CERT_DIR`.
    ca_path: Option<PathBuf>,
}

#[derive(Debug)]
enum CaInfo {
    File(PathBuf),
    Bundle {
        pem: Vec<u8>,
        written: std::sync::OnceLock<Result<PathBuf, String>>,
    },
}

/// Where the system's CA bundle usually is (Debian and Ubuntu, Fedora and RHEL, Alpine, macOS).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/openssl/cert.pem",
];

impl Trust {
    /// From `upstream.ca_file` (already checked to hold certificates) and the environment. A
    /// `GIT_SSL_CAINFO` or `GIT_SSL_CAPATH` already set is what git is meant to trust: it is
    /// left to git, and `upstream.ca_file` is added to it.
    pub fn new(ca_file: Option<&Path>) -> std::io::Result<Trust> {
        let env_path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let git_file = env_path("GIT_SSL_CAINFO");
        let cert_file = env_path("SSL_CERT_FILE");
        let ca_info = match ca_file {
            None if git_file.is_some() => None,
            None => cert_file.map(CaInfo::File),
            Some(extra) => {
                let mut pem = std::fs::read(extra)?;
                let roots = git_file.or(cert_file).or_else(|| {
                    SYSTEM_BUNDLES
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.is_file())
                });
                if let Some(roots) = roots {
                    pem.push(b'\n');
                    pem.extend(std::fs::read(roots)?);
                }
                Some(CaInfo::Bundle {
                    pem,
                    written: std::sync::OnceLock::new(),
                })
            }
        };
        let ca_path = match env_path("GIT_SSL_CAPATH") {
            Some(_) => None,
            None => env_path("SSL_CERT_DIR"),
        };
        Ok(Trust { ca_info, ca_path })
    }

    /// The environment for git; a bundle is written once, into `work_root` (the store's spool,
    /// which only TerraPeak writes to and which is emptied at every start; not a shared
    /// temporary directory, where another user could have made the file first and change it).
    fn apply(&self, cmd: &mut Command, work_root: &Path) -> Result<(), UpstreamError> {
        let file = match &self.ca_info {
            None => None,
            Some(CaInfo::File(path)) => Some(path.clone()),
            Some(CaInfo::Bundle { pem, written }) => Some(
                written
                    .get_or_init(|| write_bundle(pem, work_root))
                    .clone()
                    .map_err(UpstreamError::Connect)?,
            ),
        };
        if let Some(file) = file {
            cmd.env("GIT_SSL_CAINFO", file);
        }
        if let Some(dir) = &self.ca_path {
            cmd.env("GIT_SSL_CAPATH", dir);
        }
        Ok(())
    }
}

fn write_bundle(pem: &[u8], work_root: &Path) -> Result<PathBuf, String> {
    let path = work_root.join(format!("git-ca-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, pem).map_err(|e| {
        format!(
            "cannot write the CA bundle for git to {}: {e}",
            path.display()
        )
    })?;
    Ok(path)
}

/// How git commands run: their time limit, what they trust over https, and the folder of the
/// store's own (its spool) where scratch repositories and the CA bundle go.
#[derive(Debug, Clone)]
pub struct Options {
    pub timeout: Duration,
    pub trust: std::sync::Arc<Trust>,
    pub work_root: PathBuf,
}

fn git(opts: &Options) -> Result<Command, UpstreamError> {
    let mut cmd = Command::new("git");
    opts.trust.apply(&mut cmd, &opts.work_root)?;
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
        // A scratch repository lives for one archive: no background maintenance after a fetch.
        "-c",
        "maintenance.auto=false",
        "-c",
        "gc.auto=0",
    ])
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null")
    .env_remove("GIT_DIR")
    .stdin(Stdio::null())
    .kill_on_drop(true);
    Ok(cmd)
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
    opts: &Options,
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
    let mut cmd = git(opts)?;
    cmd.args(["ls-remote", "--", url]);
    let out = run(cmd, &format!("git ls-remote {url}"), opts.timeout).await?;
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
    opts: &Options,
) -> Result<(String, String), UpstreamError> {
    let mut cmd = git(opts)?;
    cmd.arg("-C")
        .arg(dir)
        .args(["fetch", "-q", "--no-tags", "--depth", "1", "--", url, want]);
    run(cmd, &format!("git fetch {url} {want}"), opts.timeout).await?;
    let head = std::fs::read_to_string(dir.join("FETCH_HEAD")).unwrap_or_default();
    let line = head.lines().next().unwrap_or_default().to_owned();
    let sha = line.get(..40).unwrap_or_default().to_ascii_lowercase();
    Ok((sha, line))
}

/// The commit `sha` names in the scratch repository: itself for a commit, the tagged commit for
/// an annotated tag, read straight from the loose object a small fetch leaves (no `git`
/// process); `git rev-parse` when the object is packed or is a tag of something else.
async fn peel_fetched(dir: &Path, sha: &str, opts: &Options) -> Result<String, UpstreamError> {
    match loose_commit(dir, sha) {
        Some(commit) => Ok(commit),
        None => peel(dir, opts).await,
    }
}

fn loose_commit(dir: &Path, sha: &str) -> Option<String> {
    if !is_commit_id(sha) {
        return None;
    }
    let path = dir.join("objects").join(&sha[..2]).join(&sha[2..]);
    let file = std::fs::File::open(path).ok()?;
    // A tag object is a few hundred bytes; read no more than a small one could be.
    let mut object = Vec::new();
    flate2::read::ZlibDecoder::new(file)
        .take(64 * 1024)
        .read_to_end(&mut object)
        .ok()?;
    let nul = object.iter().position(|&b| b == 0)?;
    let (header, body) = (&object[..nul], &object[nul + 1..]);
    if header.starts_with(b"commit ") {
        return Some(sha.to_owned());
    }
    if !header.starts_with(b"tag ") {
        return None;
    }
    let body = std::str::from_utf8(body).ok()?;
    let mut lines = body.lines();
    let target = lines.next()?.strip_prefix("object ")?;
    let kind = lines.next()?.strip_prefix("type ")?;
    (kind == "commit" && is_commit_id(target)).then(|| target.to_ascii_lowercase())
}

async fn peel(dir: &Path, opts: &Options) -> Result<String, UpstreamError> {
    let mut cmd = git(opts)?;
    cmd.arg("-C")
        .arg(dir)
        .args(["rev-parse", "FETCH_HEAD^{commit}"]);
    let out = run(cmd, "git rev-parse", opts.timeout).await?;
    Ok(String::from_utf8_lossy(&out).trim().to_ascii_lowercase())
}

/// Fetches `resolved.commit` (by its ref name when it has one) into a new scratch repository.
async fn fetch_commit(
    url: &str,
    resolved: &Resolved,
    opts: &Options,
) -> Result<Scratch, UpstreamError> {
    let scratch = scratch_repo(&opts.work_root)?;
    let dir = scratch.0.clone();
    let want = resolved
        .ref_name
        .clone()
        .unwrap_or_else(|| resolved.commit.clone());
    let (mut fetched, _) = shallow_fetch(&dir, url, &want, opts).await?;
    if fetched != resolved.commit {
        fetched = peel_fetched(&dir, &fetched, opts).await?;
    }
    if fetched != resolved.commit {
        return Err(UpstreamError::Invalid(format!(
            "{url}: {want} is now {fetched}, not {}",
            resolved.commit
        )));
    }
    Ok(scratch)
}

/// How long a fetched repository is kept: for the archive that usually follows a resolution,
/// and for other module versions whose source is the same repository at the same ref (several
/// registry modules in one repository, told apart by their `//subdir`). Terraform fetches such
/// a repository once per `init`; so does TerraPeak.
const FETCHED_KEEP: Duration = Duration::from_secs(60);

/// A repository fetched in the last [`FETCHED_KEEP`], under one store's spool (`root`).
struct Fetched {
    root: PathBuf,
    url: String,
    /// The ref as a module source asked for it, when it was fetched to resolve that.
    asked: Option<String>,
    resolved: Resolved,
    at: std::time::Instant,
    repo: std::sync::Arc<Scratch>,
}

static FETCHED: std::sync::Mutex<Vec<Fetched>> = std::sync::Mutex::new(Vec::new());

/// The kept fetches, those past [`FETCHED_KEEP`] dropped (their folders removed unless an
/// archive is still reading one).
fn fetched() -> std::sync::MutexGuard<'static, Vec<Fetched>> {
    let mut kept = FETCHED.lock().expect("fetched lock");
    kept.retain(|f| f.at.elapsed() < FETCHED_KEEP);
    kept
}

/// Keeps a fetched repository, and makes sure it is let go once its time is up even if no
/// other git work comes.
fn keep(entry: Fetched) {
    fetched().push(entry);
    crate::runtime::spawn(async {
        tokio::time::sleep(FETCHED_KEEP + Duration::from_secs(1)).await;
        drop(fetched());
    });
}

fn recent_resolution(root: &Path, url: &str, asked: &str) -> Option<Resolved> {
    fetched()
        .iter()
        .find(|f| f.root == root && f.url == url && f.asked.as_deref() == Some(asked))
        .map(|f| f.resolved.clone())
}

fn recent_repo(root: &Path, url: &str, commit: &str) -> Option<std::sync::Arc<Scratch>> {
    fetched()
        .iter()
        .find(|f| f.root == root && f.url == url && f.resolved.commit == commit)
        .map(|f| f.repo.clone())
}

/// Resolves `reference` by fetching it (one exchange with the git host instead of an
/// `ls-remote` and then a fetch), for a ref never resolved before; the fetched repository is
/// kept for a minute for [`archive`] of that commit. The same repository and ref resolved in
/// that minute (another module version with that source) is answered from it.
pub async fn resolve_by_fetch(
    url: &str,
    reference: Option<&str>,
    opts: &Options,
) -> Result<Resolved, UpstreamError> {
    let work_root = opts.work_root.as_path();
    if reference.is_some_and(is_commit_id) {
        return resolve(url, reference, opts).await;
    }
    let wanted = reference.unwrap_or("HEAD");
    if let Some(resolved) = recent_resolution(work_root, url, wanted) {
        return Ok(resolved);
    }
    let scratch = scratch_repo(work_root)?;
    let dir = scratch.0.clone();
    let (sha, line) = match shallow_fetch(&dir, url, wanted, opts).await {
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
        peel_fetched(&dir, &sha, opts).await?
    };
    if !is_commit_id(&commit) {
        return Err(UpstreamError::Invalid(format!(
            "{url}: {wanted} did not resolve to a commit"
        )));
    }
    let resolved = Resolved {
        commit,
        is_branch,
        ref_name: Some(ref_name),
    };
    keep(Fetched {
        root: work_root.to_owned(),
        url: url.to_owned(),
        asked: Some(wanted.to_owned()),
        resolved: resolved.clone(),
        at: std::time::Instant::now(),
        repo: std::sync::Arc::new(scratch),
    });
    Ok(resolved)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fetches `resolved.commit` from `url` into a scratch repository under the work root (unless one
/// fetched in the last minute has it) and streams `git archive` of it, gzipped with a fixed
/// header so the same tree gives the same bytes.
pub async fn archive(
    url: &str,
    resolved: &Resolved,
    opts: &Options,
) -> Result<ArtifactResponse, UpstreamError> {
    let work_root = opts.work_root.as_path();
    let scratch = match recent_repo(work_root, url, &resolved.commit) {
        Some(repo) => repo,
        None => {
            let repo = std::sync::Arc::new(fetch_commit(url, resolved, opts).await?);
            keep(Fetched {
                root: work_root.to_owned(),
                url: url.to_owned(),
                asked: None,
                resolved: resolved.clone(),
                at: std::time::Instant::now(),
                repo: repo.clone(),
            });
            repo
        }
    };
    let dir = scratch.0.clone();
    let timeout = opts.timeout;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_loose(dir: &Path, sha: &str, object: &[u8]) {
        let folder = dir.join("objects").join(&sha[..2]);
        std::fs::create_dir_all(&folder).unwrap();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(object).unwrap();
        std::fs::write(folder.join(&sha[2..]), z.finish().unwrap()).unwrap();
    }

    #[test]
    fn annotated_tags_and_commits_are_peeled_from_loose_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (tag, commit, tree_tag) = (
            "1111111111111111111111111111111111111111",
            "2222222222222222222222222222222222222222",
            "3333333333333333333333333333333333333333",
        );
        let body = format!(
            "object {}\ntype commit\ntag v1\ntagger T <t@e> 0 +0000\n\nv1\n",
            commit.to_uppercase()
        );
        write_loose(
            dir.path(),
            tag,
            format!("tag {}\0{body}", body.len()).as_bytes(),
        );
        write_loose(dir.path(), commit, b"commit 10\0tree 0000\n");
        let body = format!("object {commit}\ntype tree\ntag t\n");
        write_loose(
            dir.path(),
            tree_tag,
            format!("tag {}\0{body}", body.len()).as_bytes(),
        );

        assert_eq!(loose_commit(dir.path(), tag).as_deref(), Some(commit));
        assert_eq!(loose_commit(dir.path(), commit).as_deref(), Some(commit));
        // A tag of a tree, a packed object and a name that is no object id are left to git.
        assert_eq!(loose_commit(dir.path(), tree_tag), None);
        assert_eq!(
            loose_commit(dir.path(), "4444444444444444444444444444444444444444"),
            None
        );
        assert_eq!(loose_commit(dir.path(), "../../etc/passwd"), None);
    }
}
