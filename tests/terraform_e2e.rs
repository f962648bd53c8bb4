//! End to end with the real Terraform CLI: `terraform init` through TerraPeak over TLS (a test CA
//! made here), in registry mode, against the fake upstream.
//!
//! The CLI comes from `TERRAFORM_BIN`, else `terraform` on the PATH; the access-control test also
//! runs an older Terraform from `TERRAFORM_OLD_BIN`. `scripts/test` provides both on any machine;
//! without them these tests fail rather than pass vacuously.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn terraform_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TERRAFORM_BIN") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("terraform"))
                .find(|p| p.is_file())
        })
        .expect(
            "the Terraform CLI is needed: set TERRAFORM_BIN or run scripts/test, which installs it",
        )
}

/// An older Terraform CLI beside [`terraform_bin`], for the tests that run with both: from
/// `TERRAFORM_OLD_BIN` (`scripts/test` installs Terraform 1.0.3 there).
fn old_terraform_bin() -> PathBuf {
    std::env::var_os("TERRAFORM_OLD_BIN").map(PathBuf::from).expect(
        "a second, older Terraform CLI is needed: set TERRAFORM_OLD_BIN or run scripts/test, which installs Terraform 1.0.3",
    )
}

/// What `terraform version` says, first line.
fn cli_version(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("version")
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", bin.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// What `terrapeak client-config --mode MODE --config CFG` prints, as an operator runs it.
fn printed_cli_config(cfg: &Path, mode: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_terrapeak"))
        .args([
            "client-config",
            "--mode",
            mode,
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env_remove("TERRAPEAK_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct InitRun {
    success: bool,
    output: String,
    lock_file: String,
}

/// Runs `terraform init` in a fresh directory with its own CLI configuration and home, so no
/// implicit local mirror or plugin cache can bypass TerraPeak.
async fn terraform_init(workdir: &Path, main_tf: &str, ca: &Path) -> InitRun {
    terraform_init_with(workdir, main_tf, ca, "disable_checkpoint = true\n").await
}

/// `terraform init` with the given CLI configuration file content.
async fn terraform_init_with(
    workdir: &Path,
    main_tf: &str,
    ca: &Path,
    cli_config: &str,
) -> InitRun {
    terraform_init_using(&terraform_bin(), workdir, main_tf, ca, cli_config).await
}

/// `terraform init` by the CLI at `bin`, with the given CLI configuration file content.
async fn terraform_init_using(
    bin: &Path,
    workdir: &Path,
    main_tf: &str,
    ca: &Path,
    cli_config: &str,
) -> InitRun {
    std::fs::create_dir_all(workdir).unwrap();
    std::fs::write(workdir.join("main.tf"), main_tf).unwrap();
    std::fs::write(workdir.join("terraform.rc"), cli_config).unwrap();
    let (success, output) =
        terraform_using(bin, workdir, &["init", "-input=false", "-no-color"], ca).await;
    InitRun {
        success,
        output,
        lock_file: std::fs::read_to_string(workdir.join(".terraform.lock.hcl")).unwrap_or_default(),
    }
}

/// Runs one Terraform command in `workdir`; returns success and the combined output.
async fn terraform(workdir: &Path, args: &[&str], ca: &Path) -> (bool, String) {
    terraform_using(&terraform_bin(), workdir, args, ca).await
}

/// Runs one command of the Terraform CLI at `bin` in `workdir`.
async fn terraform_using(bin: &Path, workdir: &Path, args: &[&str], ca: &Path) -> (bool, String) {
    let home = workdir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cli_config = workdir.join("terraform.rc");
    if !cli_config.exists() {
        std::fs::write(&cli_config, "disable_checkpoint = true\n").unwrap();
    }
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .current_dir(workdir)
        .env("HOME", &home)
        .env("TF_CLI_CONFIG_FILE", &cli_config)
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .env("SSL_CERT_FILE", ca)
        .env_remove("TF_PLUGIN_CACHE_DIR")
        .env_remove("TF_CLI_ARGS")
        .env_remove("TF_CLI_ARGS_init")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("terraform finished in time")
        .expect("terraform runs");
    let output = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), output)
}

fn hashes_with_prefix(lock_file: &str, prefix: &str) -> BTreeSet<String> {
    lock_file
        .split('"')
        .filter(|s| s.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_init_through_terrapeak_over_tls_then_again_from_the_cache() {
    let up = FakeUpstream::start(FakeOptions {
        signing: Signing::Eddsa,
        ..Default::default()
    })
    .await;
    let (tls, proxy) = start_tls_proxy(&up, |_| {}).await;
    assert!(proxy.base.starts_with("https://"));
    let host = proxy.base.trim_start_matches("https://").to_owned();
    let main_tf = format!(
        r#"terraform {{
  required_providers {{
    demo = {{
      source  = "{host}/{NS}/{TYPE}"
      version = "1.0.0"
    }}
  }}
}}
"#
    );
    let work = tempfile::tempdir().unwrap();

    let first = terraform_init(&work.path().join("first"), &main_tf, &tls.path("ca.pem")).await;
    assert!(first.success, "terraform init failed:\n{}", first.output);

    // Every platform in SHA256SUMS is in the lock file as a zh: hash: the CLI checked the
    // signature on what TerraPeak served and trusted the whole file.
    let expected: BTreeSet<String> = String::from_utf8(up.release("1.0.0").sums.to_vec())
        .unwrap()
        .lines()
        .map(|l| format!("zh:{}", l.split_whitespace().next().unwrap()))
        .collect();
    assert_eq!(expected.len(), PLATFORMS.len());
    assert_eq!(
        hashes_with_prefix(&first.lock_file, "zh:"),
        expected,
        "{}",
        first.lock_file
    );
    assert_eq!(
        hashes_with_prefix(&first.lock_file, "h1:").len(),
        1,
        "{}",
        first.lock_file
    );
    assert!(
        first
            .lock_file
            .contains(&format!("provider \"{host}/{NS}/{TYPE}\"")),
        "{}",
        first.lock_file
    );

    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    assert_eq!(up.hits(&zip_path), 1);
    let artifact_hits =
        up.hits(&zip_path) + up.hits(&up.sums_path("1.0.0")) + up.hits(&up.sig_path("1.0.0"));

    let second = terraform_init(&work.path().join("second"), &main_tf, &tls.path("ca.pem")).await;
    assert!(
        second.success,
        "second terraform init failed:\n{}",
        second.output
    );
    assert_eq!(
        hashes_with_prefix(&second.lock_file, "zh:"),
        hashes_with_prefix(&first.lock_file, "zh:")
    );
    assert_eq!(
        up.hits(&zip_path) + up.hits(&up.sums_path("1.0.0")) + up.hits(&up.sig_path("1.0.0")),
        artifact_hits,
        "the second init downloaded nothing from the artifact host"
    );
    assert!(
        second.output.contains("Installed testns/demo") || second.output.contains("Installing"),
        "{}",
        second.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_from_archives_and_git_initialise_and_apply_then_work_with_upstream_down() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let (tls, proxy) = start_tls_proxy(&up, |_| {}).await;
    let host = proxy.base.trim_start_matches("https://").to_owned();
    let main_tf = format!(
        r#"
module "archive" {{
  source  = "{host}/{NS}/archive/aws"
  version = "1.0.0"
}}
module "git" {{
  source  = "{host}/{NS}/gittag/aws"
  version = "1.0.0"
}}
module "located_subdir" {{
  source  = "{host}/{NS}/gitsub/aws"
  version = "1.0.0"
}}
module "user_subdir" {{
  source  = "{host}/{NS}/gittag/aws//modules/sub"
  version = "1.0.0"
}}
output "archive" {{ value = module.archive.greeting }}
output "git" {{ value = module.git.greeting }}
output "located_subdir" {{ value = module.located_subdir.sub }}
output "user_subdir" {{ value = module.user_subdir.sub }}
"#
    );
    let work = tempfile::tempdir().unwrap();
    let ca = tls.path("ca.pem");
    let first = work.path().join("first");
    let init = terraform_init(&first, &main_tf, &ca).await;
    assert!(init.success, "terraform init failed:\n{}", init.output);
    let (ok, out) = terraform(
        &first,
        &["apply", "-auto-approve", "-input=false", "-no-color"],
        &ca,
    )
    .await;
    assert!(ok, "terraform apply failed:\n{out}");
    for expected in [
        "archive = \"hello from the tag\"",
        "git = \"hello from the tag\"",
        "located_subdir = \"hello from the subdirectory\"",
        "user_subdir = \"hello from the subdirectory\"",
    ] {
        assert!(out.contains(expected), "{expected} missing from:\n{out}");
    }

    // The registry, its artifact host and the git server are all down now.
    up.set_down(true);
    let before = up.total_hits();
    let second = work.path().join("second");
    let init = terraform_init(&second, &main_tf, &ca).await;
    assert!(
        init.success,
        "second terraform init failed:\n{}",
        init.output
    );
    let (ok, out) = terraform(
        &second,
        &["apply", "-auto-approve", "-input=false", "-no-color"],
        &ca,
    )
    .await;
    assert!(ok && out.contains("git = \"hello from the tag\""), "{out}");
    assert_eq!(
        up.total_hits(),
        before,
        "nothing was asked of the upstreams"
    );
}

/// Offline: after a warm-up, the registry hangs. Version lists past their TTL are served STALE at
/// once, the background refreshes time out and open the circuit, and from then on an init asks
/// the upstream nothing. The times are printed for the operations notes, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_keeps_working_against_a_hung_upstream_and_the_open_circuit_asks_it_nothing() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let (tls, proxy) = start_tls_proxy(&up, |c| {
        c.cache.versions_ttl = Duration::from_secs(1);
        c.upstream.metadata_timeout = Duration::from_secs(2);
        c.upstream.breaker_threshold = 2;
        c.upstream.breaker_cooldown = Duration::from_secs(300);
    })
    .await;
    let host = proxy.base.trim_start_matches("https://").to_owned();
    let main_tf = format!(
        r#"terraform {{
  required_providers {{
    demo = {{
      source  = "{host}/{NS}/{TYPE}"
      version = ">= 1.0.0"
    }}
  }}
}}
module "archive" {{
  source  = "{host}/{NS}/archive/aws"
  version = ">= 1.0.0"
}}
"#
    );
    let work = tempfile::tempdir().unwrap();
    let ca = tls.path("ca.pem");
    let timed_init = |name: &'static str| {
        let (dir, main_tf, ca) = (work.path().join(name), main_tf.clone(), ca.clone());
        async move {
            let started = std::time::Instant::now();
            let run = terraform_init(&dir, &main_tf, &ca).await;
            assert!(run.success, "{name} init failed:\n{}", run.output);
            (started.elapsed(), run)
        }
    };
    timed_init("cold").await;
    let (warm, warm_run) = timed_init("warm").await;

    // Past the TTL, the upstream stops answering at all.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set_stalled(true);
    let (offline, offline_run) = timed_init("offline").await;
    assert_eq!(offline_run.lock_file, warm_run.lock_file);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let resp = client
        .get(proxy.url(&format!("/v1/providers/{NS}/{TYPE}/versions")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    assert_eq!(cache_status(&resp).as_deref(), Some("STALE"));

    // The refreshes started by that init time out and open the circuit.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = up.total_hits();
    assert!(before > 0);
    let (open, _) = timed_init("circuit-open").await;
    assert_eq!(
        up.total_hits(),
        before,
        "an open circuit asks the upstream nothing"
    );
    eprintln!(
        "init times: warm {warm:.2?}, hung upstream {offline:.2?}, hung upstream with the circuit open {open:.2?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_with_the_printed_cli_config_keeps_sources_and_lock_files_unchanged() {
    let tf = FakeUpstream::start(FakeOptions {
        signing: Signing::Rsa,
        ..Default::default()
    })
    .await;
    let tofu = FakeUpstream::start(FakeOptions {
        signing: Signing::Eddsa,
        label: "from opentofu",
        ..Default::default()
    })
    .await;
    let tofu_url = tofu.registry_url.clone();
    let (tls, proxy) = start_tls_proxy(&tf, |c| {
        c.upstreams.push(terrapeak::config::UpstreamEntry {
            host: "registry.opentofu.org".into(),
            base_url: Some(tofu_url),
            ..Default::default()
        })
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    // What an operator would run against the same configuration file.
    let cfg = work.path().join("terrapeak.yml");
    std::fs::write(
        &cfg,
        format!(
            "server:\n  domain: \"{}\"\nupstream:\n  base_url: \"{}\"\nupstreams:\n  - host: registry.opentofu.org\n    base_url: \"{}\"\n",
            proxy.base, tf.registry_url, tofu.registry_url
        ),
    )
    .unwrap();
    let cli_config = printed_cli_config(&cfg, "transparent");

    // Providers and modules in separate configurations: init would start the synthetic
    // provider to read its schema if the same configuration also had modules.
    let providers_tf = format!(
        r#"
terraform {{
  required_providers {{
    demo = {{
      source  = "{NS}/{TYPE}"
      version = "1.0.0"
    }}
    demo2 = {{
      source  = "registry.opentofu.org/{NS}/{TYPE}"
      version = "1.0.0"
    }}
  }}
}}
"#
    );
    let modules_tf = format!(
        r#"
module "git" {{
  source  = "{NS}/gittag/aws"
  version = "1.0.0"
}}
output "git" {{ value = module.git.greeting }}
"#
    );
    let ca = tls.path("ca.pem");
    let init = terraform_init_with(&work.path().join("p1"), &providers_tf, &ca, &cli_config).await;
    assert!(
        init.success,
        "terraform init failed:\n{}\n{cli_config}",
        init.output
    );
    assert!(
        init.lock_file
            .contains(&format!("provider \"registry.terraform.io/{NS}/{TYPE}\"")),
        "provider identity unchanged:\n{}",
        init.lock_file
    );
    assert!(
        init.lock_file
            .contains(&format!("provider \"registry.opentofu.org/{NS}/{TYPE}\"")),
        "{}",
        init.lock_file
    );
    assert_eq!(
        hashes_with_prefix(&init.lock_file, "zh:").len(),
        2 * PLATFORMS.len(),
        "two upstreams with different bytes: every platform of each"
    );
    assert_eq!(tofu.hits(&tofu.zip_path("1.0.0", "linux", "amd64")), 1);
    let m1 = work.path().join("m1");
    let init = terraform_init_with(&m1, &modules_tf, &ca, &cli_config).await;
    assert!(init.success, "terraform init failed:\n{}", init.output);
    let (ok, out) = terraform(
        &m1,
        &["apply", "-auto-approve", "-input=false", "-no-color"],
        &ca,
    )
    .await;
    assert!(ok && out.contains("git = \"hello from the tag\""), "{out}");

    tf.set_down(true);
    tofu.set_down(true);
    let before = tf.total_hits() + tofu.total_hits();
    for (dir, main_tf) in [("p2", &providers_tf), ("m2", &modules_tf)] {
        let init = terraform_init_with(&work.path().join(dir), main_tf, &ca, &cli_config).await;
        assert!(init.success, "second init failed:\n{}", init.output);
    }
    assert_eq!(
        tf.total_hits() + tofu.total_hits(),
        before,
        "served from cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_mirror_mode_with_the_printed_cli_config_and_h1_agrees_with_terraform() {
    let tf = FakeUpstream::start(FakeOptions::default()).await;
    let (tls, proxy) = start_tls_proxy(&tf, |_| {}).await;
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("terrapeak.yml");
    std::fs::write(
        &cfg,
        format!(
            "server:\n  domain: \"{}\"\nupstream:\n  base_url: \"{}\"\n",
            proxy.base, tf.registry_url
        ),
    )
    .unwrap();
    let cli_config = printed_cli_config(&cfg, "mirror");
    let main_tf = format!(
        "terraform {{\n  required_providers {{\n    demo = {{\n      source  = \"{NS}/{TYPE}\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n"
    );
    let ca = tls.path("ca.pem");
    let init = terraform_init_with(&work.path().join("first"), &main_tf, &ca, &cli_config).await;
    assert!(
        init.success,
        "terraform init failed:\n{}\n{cli_config}",
        init.output
    );
    assert!(
        init.lock_file
            .contains(&format!("provider \"registry.terraform.io/{NS}/{TYPE}\""))
    );
    let terraform_h1 = hashes_with_prefix(&init.lock_file, "h1:");
    assert_eq!(terraform_h1.len(), 1, "{}", init.lock_file);

    let ca_cert = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .no_proxy()
        .build()
        .unwrap();
    let doc: serde_json::Value = client
        .get(proxy.url(&format!(
            "/v1/mirror/registry.terraform.io/{NS}/{TYPE}/1.0.0.json"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ours = doc["archives"]["linux_amd64"]["hashes"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        Some(&ours),
        terraform_h1.iter().next(),
        "TerraPeak's h1: is the one Terraform computes"
    );

    tf.set_down(true);
    let before = tf.total_hits();
    let init = terraform_init_with(&work.path().join("second"), &main_tf, &ca, &cli_config).await;
    assert!(init.success, "second init failed:\n{}", init.output);
    assert_eq!(tf.total_hits(), before, "served from cache");
}

/// Replaces the elided token in a CLI configuration `client-config` printed.
fn with_token(cli_config: &str, token: &str) -> String {
    cli_config.replace("token = \"…\"", &format!("token = \"{token}\""))
}

/// With access control on, `terraform init` works in all three modes with the credentials
/// block `client-config` prints, and fails without it: the artifact URLs in the answers carry
/// signatures, so the downloads (which Terraform sends no token with) need nothing more. Run
/// with two Terraform versions: the suite's CLI and an older one (`TERRAFORM_OLD_BIN`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_access_control_init_works_in_every_mode_with_a_token_and_fails_without() {
    const TOKEN: &str = "tok-e2e-5a9c7d";
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let auth = || terrapeak::config::AuthConfig {
        tokens: vec![terrapeak::config::TokenConfig {
            name: "e2e".into(),
            token: terrapeak::config::Secret::new(TOKEN),
            scopes: vec!["read".into()],
            ..Default::default()
        }],
        url_signing_keys: vec![terrapeak::config::Secret::new("e2e-signing-key")],
        ..Default::default()
    };
    let (tls, proxy) = start_tls_proxy(&up, |c| c.auth = Some(auth())).await;
    let host = proxy.base.trim_start_matches("https://").to_owned();
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("terrapeak.yml");
    std::fs::write(
        &cfg,
        format!(
            "server:\n  domain: \"{}\"\nupstream:\n  base_url: \"{}\"\nauth:\n  tokens:\n    - name: e2e\n      token: \"{TOKEN}\"\n      scopes: [read]\n",
            proxy.base, up.registry_url
        ),
    )
    .unwrap();
    let ca = tls.path("ca.pem");
    let provider = |source: &str| {
        format!(
            "terraform {{\n  required_providers {{\n    demo = {{\n      source  = \"{source}\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n"
        )
    };
    let module = format!(
        "module \"m\" {{\n  source  = \"{host}/{NS}/archive/aws\"\n  version = \"1.0.0\"\n}}\n"
    );
    let cases = [
        ("registry", provider(&format!("{host}/{NS}/{TYPE}"))),
        ("registry", module),
        ("transparent", provider(&format!("{NS}/{TYPE}"))),
        ("mirror", provider(&format!("{NS}/{TYPE}"))),
    ];
    let clis = [terraform_bin(), old_terraform_bin()];
    let versions: Vec<String> = clis.iter().map(|b| cli_version(b)).collect();
    assert_ne!(versions[0], versions[1], "two different Terraform versions");
    for (i, (mode, main_tf)) in cases.iter().enumerate() {
        let printed = printed_cli_config(&cfg, mode);
        assert!(printed.contains("credentials \""), "{printed}");
        assert!(!printed.contains(TOKEN), "the token is elided:\n{printed}");
        for (bin, version) in clis.iter().zip(&versions) {
            let run = format!("{i}-{}", version.replace(' ', "_"));
            let without = terraform_init_using(
                bin,
                &work.path().join(format!("without-{run}")),
                main_tf,
                &ca,
                &printed
                    .replace("credentials \"", "# credentials \"")
                    .replace("  token = \"…\"\n}", "#}"),
            )
            .await;
            assert!(
                !without.success,
                "{version}, {mode}: init without a token failed:\n{}",
                without.output
            );
            // Terraform prints its own words for TerraPeak's 401, not the body.
            let refused = [
                "requires authentication",
                "401 Unauthorized",
                "authentication credentials",
            ];
            assert!(
                refused.iter().any(|r| without.output.contains(r)),
                "{version}, {mode}: the refusal is visible:\n{}",
                without.output
            );
            let with = terraform_init_using(
                bin,
                &work.path().join(format!("with-{run}")),
                main_tf,
                &ca,
                &with_token(&printed, TOKEN),
            )
            .await;
            assert!(
                with.success,
                "{version}, {mode}: init with the token:\n{}\n{printed}",
                with.output
            );
        }
    }
    // What the artifact host saw came through TerraPeak's signed URLs: one fetch of the zip.
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 1);

    // The answers Terraform followed: every link is signed in its path and opens without a
    // header; the same link with its signature altered does not.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let answer = |path: String| {
        let request = client.get(proxy.url(&path)).bearer_auth(TOKEN);
        async move { request.send().await.unwrap() }
    };
    let download: serde_json::Value = answer(format!(
        "/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
    ))
    .await
    .json()
    .await
    .unwrap();
    let mirror_path = format!("/v1/mirror/registry.terraform.io/{NS}/{TYPE}/1.0.0.json");
    let mirror: serde_json::Value = answer(mirror_path.clone()).await.json().await.unwrap();
    let module_path = format!("/v1/modules/{NS}/archive/aws/1.0.0/download");
    let module = answer(module_path.clone()).await;
    // Relative links are relative to the answer they are in.
    let base = |path: &str| reqwest::Url::parse(&proxy.url(path)).unwrap();
    let download_base = base(&format!(
        "/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64"
    ));
    let mut links: Vec<reqwest::Url> = ["download_url", "shasums_url", "shasums_signature_url"]
        .iter()
        .map(|k| download_base.join(download[k].as_str().unwrap()).unwrap())
        .collect();
    let archive = mirror["archives"]["linux_amd64"]["url"].as_str().unwrap();
    links.push(base(&mirror_path).join(archive).unwrap());
    let location = module.headers()["x-terraform-get"].to_str().unwrap();
    links.push(base(&module_path).join(location).unwrap());
    for url in links {
        assert!(
            url.path().contains("/artifacts/s/"),
            "signed in the path: {url}"
        );
        assert_eq!(url.query(), None, "nothing in the query string: {url}");
        let resp = client.get(url.clone()).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK, "{url}");
        let signature = url.path_segments().unwrap().nth(3).unwrap().to_owned();
        let mut forged = signature.clone().into_bytes();
        forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
        let forged = url
            .as_str()
            .replacen(&signature, std::str::from_utf8(&forged).unwrap(), 1);
        let resp = client.get(&forged).send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN, "{forged}");
    }
}

/// Runs the `terrapeak` binary with a configuration file; panics with its output on failure.
fn terrapeak_cmd(cfg: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_terrapeak"))
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env_remove("TERRAPEAK_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "terrapeak {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The air gap end to end: a connected TerraPeak's `terraform init` writes the lock files; a
/// `warm` from a lock file and a root module (two platforms, an archive module, a git module,
/// a nested registry module) fills a fresh store, which is exported; sealed TerraPeaks (one on
/// a directory, one on S3) import the bundle and serve `terraform init` in transparent and
/// registry mode with no upstream, writing the connected side's lock files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_fed_by_a_bundle_initialises_like_the_connected_side() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let work = tempfile::tempdir().unwrap();
    let (tls, connected) = start_tls_proxy(&up, |_| {}).await;
    let ca = tls.path("ca.pem");
    let cfg_for = |name: &str, yaml: String| {
        let p = work.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    };
    let transparent = |base: &str, name: &str| {
        printed_cli_config(
            &cfg_for(name, format!("server:\n  domain: \"{base}\"\n")),
            "transparent",
        )
    };
    let providers_tf = format!(
        "terraform {{\n  required_providers {{\n    demo = {{\n      source  = \"{NS}/{TYPE}\"\n      version = \"1.0.0\"\n    }}\n  }}\n}}\n"
    );
    let modules_tf = format!(
        "module \"nested\" {{\n  source  = \"{NS}/nested/aws\"\n  version = \"1.0.0\"\n}}\nmodule \"git\" {{\n  source  = \"{NS}/gittag/aws\"\n  version = \"1.0.0\"\n}}\noutput \"git\" {{ value = module.git.greeting }}\noutput \"nested\" {{ value = module.nested.nested }}\n"
    );

    // Connected: the lock files Terraform writes through TerraPeak.
    let cli = transparent(&connected.base, "connected.yml");
    let p = terraform_init_with(&work.path().join("conn-p"), &providers_tf, &ca, &cli).await;
    assert!(p.success, "{}", p.output);
    let m = terraform_init_with(&work.path().join("conn-m"), &modules_tf, &ca, &cli).await;
    assert!(m.success, "{}", m.output);

    // Warm a fresh store from the lock file and the root module, then export it.
    let warm_dir = work.path().join("warm-store");
    let warm_cfg = cfg_for(
        "warm.yml",
        format!(
            "storage:\n  file:\n    path: \"{}\"\nupstream:\n  base_url: \"{}\"\n",
            warm_dir.display(),
            up.registry_url
        ),
    );
    let lock = work.path().join("conn-p/.terraform.lock.hcl");
    let report = terrapeak_cmd(
        &warm_cfg,
        &[
            "warm",
            "--lock-file",
            lock.to_str().unwrap(),
            "--root",
            work.path().join("conn-m").to_str().unwrap(),
            "--platform",
            "linux_amd64",
            "--platform",
            "darwin_arm64",
        ],
    );
    assert!(report.contains(", 0 failed"), "{report}");
    for item in [
        format!("{NS}/{TYPE} 1.0.0 windows_amd64"),
        format!("{NS}/{TYPE} 1.0.0 darwin_arm64"),
        format!("{NS}/nested/aws 1.0.0"),
        format!("{NS}/archive/aws 1.0.0"),
        format!("{NS}/gittag/aws 1.0.0"),
    ] {
        assert!(report.contains(&item), "{item} in {report}");
    }
    let bundle = work.path().join("enclave.tar");
    terrapeak_cmd(
        &warm_cfg,
        &["export", "--all", "--out", bundle.to_str().unwrap()],
    );

    // Sealed, on a directory and on S3: import, then serve with no reachable upstream.
    let s3 = common::s3::S3Server::shared();
    for on_s3 in [false, true] {
        let store = tempfile::tempdir().unwrap();
        let prefix = format!("sealed-{}", uuid_like(store.path()));
        let storage = if on_s3 {
            s3.yaml(&prefix, store.path())
        } else {
            format!(
                "storage:\n  file:\n    path: \"{}\"\n",
                store.path().display()
            )
        };
        let sealed_cfg = format!(
            "cache:\n  offline: true\nupstream:\n  base_url: \"http://127.0.0.1:9\"\n{storage}"
        );
        let import_cfg = cfg_for("sealed.yml", sealed_cfg);
        let imported = terrapeak_cmd(&import_cfg, &["import", bundle.to_str().unwrap()]);
        assert!(imported.contains("imported"), "{imported}");
        let hits_before = up.total_hits();
        let git_before = up.git_hits();
        let tls = TestTls::new();
        let sealed = Proxy::start_in(&up, store, |c| {
            c.server.tls.cert_file = Some(tls.path("cert.pem"));
            c.server.tls.key_file = Some(tls.path("key.pem"));
            c.upstream.base_url = Some("http://127.0.0.1:9".into());
            c.cache.offline = true;
            if on_s3 {
                s3.configure(c, &prefix);
            } else {
                c.storage.minio.enabled = false;
            }
        })
        .await;
        let ca = tls.path("ca.pem");
        let tag = if on_s3 { "s3" } else { "dir" };
        let cli = transparent(&sealed.base, &format!("sealed-{tag}.yml"));
        let sp = terraform_init_with(
            &work.path().join(format!("{tag}-p")),
            &providers_tf,
            &ca,
            &cli,
        )
        .await;
        assert!(sp.success, "{tag}: {}", sp.output);
        assert_eq!(
            sp.lock_file, p.lock_file,
            "{tag}: the connected side's lock file"
        );
        let smd = work.path().join(format!("{tag}-m"));
        let sm = terraform_init_with(&smd, &modules_tf, &ca, &cli).await;
        assert!(sm.success, "{tag}: {}", sm.output);
        assert_eq!(sm.lock_file, m.lock_file, "{tag}");
        let (ok, out) = terraform(
            &smd,
            &["apply", "-auto-approve", "-input=false", "-no-color"],
            &ca,
        )
        .await;
        assert!(
            ok && out.contains("git = \"hello from the tag\""),
            "{tag}: {out}"
        );

        // Registry mode: `~> 1.0` resolves to the 1.0.0 the enclave holds, although upstream
        // has 1.1.0.
        let host = sealed.base.trim_start_matches("https://").to_owned();
        let registry_tf = format!(
            "terraform {{\n  required_providers {{\n    demo = {{\n      source  = \"{host}/{NS}/{TYPE}\"\n      version = \"~> 1.0\"\n    }}\n  }}\n}}\n"
        );
        let r = terraform_init(&work.path().join(format!("{tag}-r")), &registry_tf, &ca).await;
        assert!(r.success, "{tag}: {}", r.output);
        assert!(
            r.lock_file.contains("version     = \"1.0.0\""),
            "{}",
            r.lock_file
        );
        assert_eq!(
            hashes_with_prefix(&r.lock_file, "zh:"),
            hashes_with_prefix(&p.lock_file, "zh:"),
            "{tag}: the same release, signed as upstream signed it"
        );
        assert_eq!(
            up.total_hits(),
            hits_before,
            "{tag}: the sealed side asked upstream"
        );
        assert_eq!(
            up.git_hits(),
            git_before,
            "{tag}: the sealed side asked the git host"
        );
    }
}

/// A name unique to a temporary directory.
fn uuid_like(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().replace('.', "")
}
