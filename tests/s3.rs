//! The S3 backend against a real S3 server (s3s-fs): replicas sharing a bucket, a store that
//! goes away and comes back, and large artifacts through multipart uploads.

mod common;

use common::s3::S3Server;
use common::*;
use sha2::Digest;

#[tokio::test]
async fn storage_round_trip_on_s3() {
    let server = S3Server::start();
    let mut config = terrapeak::config::Config::default();
    server.configure(&mut config, "unit");
    let dir = tempfile::tempdir().unwrap();
    let storage = terrapeak::storage::Storage::s3(&config.storage.minio, dir.path())
        .await
        .unwrap();
    let key = terrapeak::storage::StorageKey::from_segments(["a", "b.json"]);
    let meta =
        terrapeak::storage::ObjectMeta::new(2, sha2::Sha256::digest(b"hi").into(), "text/plain");
    storage.put_bytes(&key, b"hi", &meta).await.unwrap();
    let _ = FakeOptions::default();
}
