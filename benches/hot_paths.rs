//! Microbenchmarks of the paths `scripts/bench` showed to matter on a cache hit: a small object
//! from the in-memory layer in front of the store, a cached file streamed from disk, an access-log
//! line formatted and written through the buffered writer, and the per-request metric updates.
//!
//! `cargo bench --bench hot_paths`

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use terrapeak::metrics::Metrics;
use terrapeak::storage::{ObjectMeta, Storage, StorageKey};
use tracing_subscriber::fmt::MakeWriter;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn meta_for(data: &[u8], content_type: &str) -> ObjectMeta {
    ObjectMeta::new(data.len() as u64, Sha256::digest(data).into(), content_type)
}

fn storage_hits(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let storage = rt
        .block_on(Storage::local(dir.path(), Arc::new(Metrics::new())))
        .unwrap();
    let key = StorageKey::from_segments([
        "providers",
        "registry.terraform.io",
        "hashicorp",
        "aws",
        "versions.json",
    ]);
    let doc = Bytes::from(vec![b'x'; 16 * 1024]);
    rt.block_on(storage.put_bytes(&key, &doc, &meta_for(&doc, "application/json")))
        .unwrap();
    c.bench_function("version list from the in-memory layer", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(storage.get_bytes(&key).await.unwrap().unwrap()) })
    });

    let zip_key = StorageKey::from_segments(["providers", "x", "provider.zip"]);
    let zip = vec![7u8; 8 << 20];
    let spool = storage.spool_dir().join("bench-zip");
    std::fs::write(&spool, &zip).unwrap();
    rt.block_on(storage.publish_file(&zip_key, &spool, &meta_for(&zip, "application/zip")))
        .unwrap();
    let mut group = c.benchmark_group("cached file");
    group.throughput(Throughput::Bytes(zip.len() as u64));
    group.bench_function("8 MiB streamed from the file store", |b| {
        b.to_async(&rt).iter(|| async {
            let stored = storage.open(&zip_key).await.unwrap().unwrap();
            let size = stored.meta.size;
            let mut stream = stored.stream(0, size).await.unwrap();
            let mut n = 0;
            while let Some(chunk) = stream.next().await {
                n += chunk.unwrap().len();
            }
            assert_eq!(n as u64, size);
        })
    });
    group.finish();
}

fn access_log(c: &mut Criterion) {
    let (writer, _guard) = terrapeak::log_writer::buffered(std::io::sink());
    let line = format!(
        "{{\"message\":\"HTTP GET /v1/providers/hashicorp/aws/versions - 200\",\"padding\":\"{}\"}}\n",
        "x".repeat(300)
    );
    c.bench_function("access log line through the buffered writer", |b| {
        b.iter(|| {
            let mut w = writer.make_writer();
            w.write_all(line.as_bytes()).unwrap();
        })
    });
    let mut out = Vec::with_capacity(1024);
    c.bench_function("access log line formatted as JSON", |b| {
        b.iter(|| {
            out.clear();
            terrapeak::http::typical_access_line(&mut out);
            black_box(&out);
        })
    });
}

fn request_metrics(c: &mut Criterion) {
    let m = Metrics::new();
    c.bench_function("per-request metric updates", |b| {
        b.iter(|| {
            m.http_requests
                .with_label_values(&["/v1/providers/:ns/:ty/versions", "GET", "2xx"])
                .inc();
            m.http_duration
                .with_label_values(&["/v1/providers/:ns/:ty/versions"])
                .observe(black_box(0.0004));
            m.cache_results
                .with_label_values(&["version_list", "hit"])
                .inc();
            m.sent_bytes
                .with_label_values(&["cache"])
                .inc_by(black_box(1024));
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = storage_hits, access_log, request_metrics
}
criterion_main!(benches);
