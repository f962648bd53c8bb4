//! `/metrics` as Prometheus scrapes it: exact counts after a scripted sequence, a fixed number of
//! series whatever the paths, and the separate listener.

mod common;

use common::*;
use reqwest::StatusCode;
use std::collections::HashMap;
use std::time::Duration;

const VERSIONS_ROUTE: &str = "/v1/providers/:ns/:ty/versions";
const DOWNLOAD_ROUTE: &str = "/v1/providers/:ns/:ty/:version/download/:os/:arch";
const UPSTREAM: &str = "registry.terraform.io";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_miss_a_hit_a_stale_serve_and_an_upstream_error_the_counters_are_exact() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.cache.versions_ttl = Duration::ZERO;
        c.upstream.retry_backoff = Duration::from_millis(10);
    })
    .await;
    let versions = format!("/v1/providers/{NS}/{TYPE}/versions");
    let download = format!("/v1/providers/{NS}/{TYPE}/1.0.0/download/linux/amd64");
    let mut sent = HashMap::from([("cache", 0u64), ("upstream", 0u64)]);
    let mut get = async |path: &str, expect: Option<&str>| {
        let resp = proxy.get(path).await;
        let cache = cache_status(&resp);
        assert_eq!(cache.as_deref(), expect, "{path}");
        let len = resp.bytes().await.unwrap().len() as u64;
        match cache.as_deref() {
            Some("HIT" | "STALE") => *sent.get_mut("cache").unwrap() += len,
            Some(_) => *sent.get_mut("upstream").unwrap() += len,
            None => {}
        }
    };
    get(&versions, Some("MISS")).await;
    get(&versions, Some("STALE")).await;
    get(&download, Some("MISS")).await;
    get(&download, Some("HIT")).await;
    up.set_fault(
        &format!("/v1/modules/{NS}/archive/aws/versions"),
        Fault::Status(500),
    );
    get(&format!("/v1/modules/{NS}/archive/aws/versions"), None).await;
    // The stale serve started one background refresh; let it land.
    while up.hits(&versions) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let m = Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    let req = |route: &str, status: &str| {
        m.value(
            "terrapeak_http_requests_total",
            &[("route", route), ("method", "GET"), ("status", status)],
        )
    };
    assert_eq!(req(VERSIONS_ROUTE, "2xx"), 2.0);
    assert_eq!(req(DOWNLOAD_ROUTE, "2xx"), 2.0);
    assert_eq!(req("/v1/modules/:ns/:name/:system/versions", "5xx"), 1.0);
    let result = |kind: &str, result: &str| {
        m.value(
            "terrapeak_cache_results_total",
            &[("kind", kind), ("result", result)],
        )
    };
    assert_eq!(result("version_list", "miss"), 1.0);
    assert_eq!(result("version_list", "stale"), 1.0);
    assert_eq!(result("version_list", "hit"), 0.0);
    assert_eq!(result("download_json", "miss"), 1.0);
    assert_eq!(result("download_json", "hit"), 1.0);
    for source in ["cache", "upstream"] {
        assert_eq!(
            m.value("terrapeak_sent_bytes_total", &[("source", source)]),
            sent[source] as f64,
            "{source}"
        );
    }
    // Discovery, versions, its refresh, the download answer, and the module list three times
    // (two retries), all against the one configured upstream.
    let api = [("upstream", UPSTREAM), ("kind", "api")];
    assert_eq!(m.value("terrapeak_upstream_requests_total", &api), 7.0);
    assert_eq!(
        m.value(
            "terrapeak_upstream_errors_total",
            &[
                ("upstream", UPSTREAM),
                ("kind", "api"),
                ("class", "server_error")
            ]
        ),
        3.0
    );
    assert_eq!(
        m.value("terrapeak_upstream_request_duration_seconds_count", &api),
        7.0
    );
    assert_eq!(
        m.value("terrapeak_upstream_circuit_open", &[("upstream", UPSTREAM)]),
        0.0
    );
    assert_eq!(m.value("terrapeak_fills_in_progress", &[]), 0.0);
    assert_eq!(m.value("terrapeak_fill_readers", &[]), 0.0);
    assert_eq!(
        m.value(
            "terrapeak_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(m.value("terrapeak_process_resident_memory_bytes", &[]) > 0.0);
    let backend = if s3_under_test().is_some() {
        "s3"
    } else {
        "file"
    };
    assert!(
        m.value(
            "terrapeak_storage_operations_total",
            &[("backend", backend), ("operation", "write")]
        ) >= 3.0
    );
    assert_eq!(
        m.value(
            "terrapeak_storage_errors_total",
            &[("backend", backend), ("operation", "write")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_distinct_paths_add_no_series() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let paths = |i: usize| {
        vec![
            format!("/v1/providers/ns{i}/t{i}/versions"),
            format!("/v1/providers/{NS}/{TYPE}/9.{i}.0/download/linux/amd64"),
            format!(
                "/artifacts/providers/registry.terraform.io/{NS}/{TYPE}/1.{i}.0/linux/amd64/f{i}.zip"
            ),
            format!("/r/host{i}.example.com/v1/modules/ns/n{i}/aws/versions"),
            format!("/v1/mirror/registry.terraform.io/ns{i}/t/index.json"),
            format!("/no/such/route/{i}"),
            format!("/v1/providers/bad%20name{i}/t/versions"),
        ]
    };
    let send = async |i: usize| {
        for path in paths(i) {
            let status = proxy.get(&path).await.status();
            assert!(status.is_client_error(), "{path}: {status}");
        }
    };
    send(0).await;
    Scrape::of(&proxy.client, &proxy.url("/metrics")).await;
    let before = Scrape::of(&proxy.client, &proxy.url("/metrics"))
        .await
        .series();
    for i in 1..=1000 {
        send(i).await;
    }
    let after = Scrape::of(&proxy.client, &proxy.url("/metrics"))
        .await
        .series();
    assert_eq!(after, before, "the set of series did not grow");
    for s in &after {
        assert!(
            !s.contains("ns1") && !s.contains("host1") && !s.contains("9.1"),
            "{s}"
        );
    }
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.metrics.addr = Some("127.0.0.1:0".into());
        c.metrics.on_main_listener = false;
    })
    .await;
    assert_eq!(proxy.get("/metrics").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(proxy.get("/healthz").await.status(), StatusCode::OK);
    let addr = proxy.server.as_ref().unwrap().metrics_addr().unwrap();
    let m = Scrape::of(&proxy.client, &format!("http://{addr}/metrics")).await;
    assert_eq!(
        m.value(
            "terrapeak_http_requests_total",
            &[("route", "/healthz"), ("method", "GET"), ("status", "2xx")]
        ),
        1.0
    );
}

/// A fill keeps its latest chunks in memory for the clients reading along, and none once every
/// byte is on file. A finished fill lingers a few seconds for late joiners; it used to keep
/// the last 4 MiB of its artifact in memory meanwhile, so a fleet's cold start held that much
/// for every artifact it had just fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_holds_chunks_in_memory_while_it_runs_and_none_once_done() {
    const MIB: usize = 1 << 20;
    let up = FakeUpstream::start(FakeOptions {
        padding: 8 << 20,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    up.set_fault(
        &up.zip_path("1.0.0", "linux", "amd64"),
        Fault::Throttle(8 * MIB as u64),
    );
    let held = async || {
        Scrape::of(&proxy.client, &proxy.url("/metrics"))
            .await
            .value("terrapeak_fill_memory_bytes", &[])
    };
    assert_eq!(held().await, 0.0);
    let mut resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    let (mut body, mut while_running) = (Vec::new(), None);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
        if while_running.is_none() && body.len() >= MIB {
            while_running = Some(held().await);
        }
    }
    assert!(body == zip);
    let while_running = while_running.unwrap();
    assert!(
        while_running > 0.0 && while_running <= (8 * MIB) as f64,
        "{while_running}"
    );
    // The last bytes reach a client only after the fill has every byte on file.
    assert_eq!(held().await, 0.0);
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 1);
}
