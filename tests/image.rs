//! The container image, built from the root Dockerfile by `scripts/image` (the test command
//! does that, then runs this with `TERRAPEAK_TEST_IMAGE` naming it): it starts, its own health
//! check passes, a provider download through it from the fake upstream is a MISS then a HIT,
//! and SIGTERM lets a transfer in flight finish and stops it with exit status 0.
//!
//! Containers use host networking (TerraPeak binds 127.0.0.1 inside); podman runs them.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::Duration;

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman runs")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

/// The download answer for `version` linux_amd64.
async fn download_answer(client: &reqwest::Client, base: &str, version: &str) -> serde_json::Value {
    client
        .get(format!(
            "{base}/v1/providers/{NS}/{TYPE}/{version}/download/linux/amd64"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the container image: scripts/test builds it with scripts/image and runs this"]
async fn the_image_serves_checks_its_health_caches_and_stops_cleanly_on_sigterm() {
    let image = std::env::var("TERRAPEAK_TEST_IMAGE")
        .expect("TERRAPEAK_TEST_IMAGE names the image to test (scripts/test sets it)");
    let up = FakeUpstream::start(FakeOptions {
        padding: 16 << 20,
        ..Default::default()
    })
    .await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let id = podman_ok(&[
        "run",
        "-d",
        "--network",
        "host",
        // No timer for the HEALTHCHECK (podman would need systemd for it); it still runs on
        // demand below.
        "--health-interval",
        "disable",
        "-e",
        &format!("TERRAPEAK_SERVER__ADDR={addr}"),
        "-e",
        &format!("TERRAPEAK_UPSTREAM__BASE_URL={}", up.registry_url),
        &image,
    ]);
    let container = Container(id);
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut up_after = None;
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status() == 200
        {
            up_after = Some(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        up_after.is_some(),
        "the container answers /healthz: {}",
        podman_ok(&["logs", &container.0])
    );
    // The binary's own check, as the image's HEALTHCHECK runs it, and that instruction itself.
    podman_ok(&["exec", &container.0, "terrapeak", "healthcheck"]);
    podman_ok(&["healthcheck", "run", &container.0]);
    let user = podman_ok(&["exec", &container.0, "id", "-u"]);
    assert_eq!(user, "10001", "runs as its own non-root user");
    let git = podman(&["exec", &container.0, "git", "--version"]);
    assert!(
        git.status.success(),
        "git is in the image for git module sources"
    );

    let doc = download_answer(&client, &base, "1.1.0").await;
    let zip_url = doc["download_url"].as_str().unwrap().to_owned();
    let (_, zip) = up.zip("1.1.0", "linux", "amd64");
    for expected in ["MISS", "HIT"] {
        let resp = client.get(&zip_url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(cache_status(&resp).as_deref(), Some(expected));
        assert!(resp.bytes().await.unwrap() == zip);
    }
    assert_eq!(up.hits(&up.zip_path("1.1.0", "linux", "amd64")), 1);

    // A slow cold download (16 MiB at 8 MiB/s) is under way when SIGTERM arrives: it finishes,
    // verified, and the process exits 0.
    let slow = up.zip_path("1.0.0", "linux", "amd64");
    up.set_fault(&slow, Fault::Throttle(8 << 20));
    let doc = download_answer(&client, &base, "1.0.0").await;
    let mut resp = client
        .get(doc["download_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let mut body = resp.chunk().await.unwrap().expect("first bytes").to_vec();
    podman_ok(&["kill", "--signal", "TERM", &container.0]);
    while let Some(chunk) = resp.chunk().await.expect("the transfer in flight finishes") {
        body.extend_from_slice(&chunk);
    }
    let (_, want) = up.zip("1.0.0", "linux", "amd64");
    assert_eq!(Sha256::digest(&body), Sha256::digest(&want));
    // A hang here fails the test; the grace period is 30 s.
    let waited = tokio::task::spawn_blocking({
        let id = container.0.clone();
        move || podman(&["wait", &id])
    });
    let waited = tokio::time::timeout(Duration::from_secs(45), waited)
        .await
        .expect("the container stops after SIGTERM")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&waited.stdout).trim(),
        "0",
        "exit status after SIGTERM: {}",
        podman_ok(&["logs", &container.0])
    );
}
