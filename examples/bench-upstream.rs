//! The fake upstream registry of the test suite as a standalone process, for `scripts/bench`:
//! a registry API and an artifact host on loopback, five providers (`testns/demo` plus four
//! more), modules (archives and git), and a control listener that reports request counts (`/hits`, `/git-hits`)
//! and moves the artifact host download answers name (`/artifacts-base?url=`).
//!
//! `BENCH_PADDING` sets the size of `testns/demo` 1.0.0 linux_amd64 (bytes of filler) and
//! `BENCH_THROTTLE` the artifact host's bandwidth for it (bytes per second, 0 = unlimited).
//! `BENCH_TYPES=N` serves N provider types (`demo`, then `t01`...) instead of five, and
//! `BENCH_PAD_EVERY_TYPE=1` pads every type's 1.0.0 linux_amd64 zip, not only `demo`'s.
//! `BENCH_FILES_DIR=dir` writes `demo` 1.0.0 linux_amd64's zip, SHA256SUMS and signature under
//! `dir/files/`, and `BENCH_ARTIFACTS_BASE=url` makes download answers point there instead (an
//! nginx serving that directory with sendfile: an origin as fast as this machine allows).
//! Prints one JSON line with the addresses, then serves until killed.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use axum::extract::{Query, State};
use common::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let padding = env_u64("BENCH_PADDING", 64 << 20) as usize;
    let throttle = env_u64("BENCH_THROTTLE", 0);
    let extra_types: Vec<&'static str> = match env_u64("BENCH_TYPES", 0) {
        0 => vec!["alpha", "beta", "gamma", "delta"],
        n => (1..n)
            .map(|i| &*Box::leak(format!("t{i:02}").into_boxed_str()))
            .collect(),
    };
    let types: Vec<&str> = std::iter::once(TYPE)
        .chain(extra_types.iter().copied())
        .collect();
    let up = Arc::new(
        FakeUpstream::start(FakeOptions {
            padding,
            extra_types: extra_types.clone(),
            pad_every_type: env_u64("BENCH_PAD_EVERY_TYPE", 0) == 1,
            ..Default::default()
        })
        .await,
    );
    let (zip_name, zip) = up.zip("1.0.0", "linux", "amd64");
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    if throttle > 0 {
        up.set_fault(&zip_path, Fault::Throttle(throttle));
    }
    if let Ok(dir) = std::env::var("BENCH_FILES_DIR") {
        let files = std::path::Path::new(&dir).join("files");
        std::fs::create_dir_all(&files).unwrap();
        let release = up.release("1.0.0");
        std::fs::write(files.join(&zip_name), &zip).unwrap();
        std::fs::write(files.join(&release.sums_name), &release.sums).unwrap();
        std::fs::write(
            files.join(format!("{}.sig", release.sums_name)),
            &release.sig,
        )
        .unwrap();
    }
    if let Ok(base) = std::env::var("BENCH_ARTIFACTS_BASE") {
        up.set_artifacts_base(&base);
    }
    let control =
        axum::Router::new()
            .route(
                "/hits",
                axum::routing::get(
                    |State(up): State<Arc<FakeUpstream>>,
                     Query(q): Query<HashMap<String, String>>| async move {
                        match q.get("path") {
                            Some(p) => up.hits(p).to_string(),
                            None => up.total_hits().to_string(),
                        }
                    },
                ),
            )
            // Where download answers and module sources point from now on (`?url=`).
            .route(
                "/artifacts-base",
                axum::routing::get(
                    |State(up): State<Arc<FakeUpstream>>,
                     Query(q): Query<HashMap<String, String>>| async move {
                        match q.get("url") {
                            Some(url) => {
                                up.set_artifacts_base(url);
                                url.clone()
                            }
                            None => String::new(),
                        }
                    },
                ),
            )
            .route(
                "/git-hits",
                axum::routing::get(|State(up): State<Arc<FakeUpstream>>| async move {
                    up.git_hits().to_string()
                }),
            )
            .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = listener.local_addr().unwrap();
    println!(
        "{}",
        serde_json::json!({
            "registry": up.registry_url,
            "artifacts": up.artifacts_url,
            "control": format!("http://{control_addr}"),
            "namespace": NS,
            "types": types,
            "zip_path": zip_path,
            "zip_name": zip_name,
            "zip_size": zip.len(),
            "zip_sha256": hex::encode(Sha256::digest(&zip)),
        })
    );
    axum::serve(listener, control).await.unwrap();
}
