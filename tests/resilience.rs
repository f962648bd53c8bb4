//! Faults on the artifact path: stampedes, clients leaving, stalled and failing artifact hosts.

mod common;

use common::*;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::mpsc;

/// Streams a response body into a hash, so fifty concurrent 64 MiB downloads cost no memory.
async fn hash_body(mut resp: reqwest::Response) -> Result<(Vec<u8>, u64), reqwest::Error> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((hasher.finalize().to_vec(), len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cold_requests_for_a_64_mib_artifact_share_one_fill_and_stream_before_it_ends() {
    const CLIENTS: usize = 50;
    let GatedZip {
        up,
        proxy,
        zip_url,
        zip,
        zip_path,
        gate,
    } = GatedZip::start(64 << 20).await;
    assert!(zip.len() >= 64 << 20);
    let want = Sha256::digest(&zip).to_vec();

    // Each client reports its first byte, then reads the rest into a hash.
    let (first_byte, mut first_bytes) = mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, first_byte) = (proxy.client.clone(), zip_url.clone(), first_byte.clone());
        clients.push(tokio::spawn(async move {
            let mut resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let mut hasher = Sha256::new();
            let first = resp.chunk().await.unwrap().expect("a first chunk");
            hasher.update(&first);
            first_byte.send(()).unwrap();
            let mut len = first.len() as u64;
            while let Some(chunk) = resp.chunk().await.unwrap() {
                len += chunk.len() as u64;
                hasher.update(&chunk);
            }
            (hasher.finalize().to_vec(), len)
        }));
    }
    // The upstream holds back everything after its first MiB until the gate opens, so the fill
    // cannot finish before then: every client must have bytes while it is still running.
    for n in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(60), first_bytes.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {CLIENTS} clients got a byte during the fill"))
            .unwrap();
    }
    assert_eq!(up.hits(&zip_path), 1);
    gate.notify_one();
    for c in clients {
        let (hash, len) = c.await.unwrap();
        assert_eq!(len, zip.len() as u64);
        assert_eq!(hash, want);
    }
    assert_eq!(up.hits(&zip_path), 1, "one upstream GET for fifty clients");
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert_eq!(hash_body(resp).await.unwrap().0, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_client_that_started_a_fill_leaves_the_others_finish_and_it_is_cached() {
    let GatedZip {
        up,
        proxy,
        zip_url,
        zip,
        zip_path,
        gate,
    } = GatedZip::start(4 << 20).await;
    let want = Sha256::digest(&zip).to_vec();

    let mut leader = proxy.client.get(&zip_url).send().await.unwrap();
    assert!(leader.chunk().await.unwrap().is_some());
    let mut followers = Vec::new();
    for _ in 0..3 {
        let mut resp = proxy.client.get(&zip_url).send().await.unwrap();
        let first = resp.chunk().await.unwrap().expect("a first chunk");
        followers.push((first.to_vec(), resp));
    }
    // The leader hangs up mid-transfer; the upstream then sends the rest.
    drop(leader);
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.notify_one();
    for (mut body, mut resp) in followers {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        assert!(body == zip, "a follower got different bytes");
    }
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert_eq!(hash_body(resp).await.unwrap().0, want);
    assert_eq!(up.hits(&zip_path), 1);
}

#[tokio::test]
async fn a_stalled_artifact_host_ends_in_a_clear_error_and_caches_nothing() {
    let up = FakeUpstream::start(FakeOptions {
        padding: 2 << 20,
        ..Default::default()
    })
    .await;
    let proxy = Proxy::start(&up, |c| {
        c.upstream.artifact_first_byte_timeout = Duration::from_millis(300);
        c.upstream.artifact_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let (_, zip) = up.zip("1.0.0", "linux", "amd64");
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");

    // No response headers in time: 504 before any byte.
    up.set_fault(&zip_path, Fault::Stall(Duration::from_secs(3)));
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["errors"][0].as_str().unwrap().contains("timed out"));

    // Headers, one MiB, then silence: the transfer is cut, never completed with wrong bytes.
    let never = std::sync::Arc::new(tokio::sync::Notify::new());
    up.set_fault(&zip_path, Fault::Gate(1 << 20, never));
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        hash_body(resp).await.is_err(),
        "the stalled transfer is aborted"
    );

    up.clear_faults();
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(
        cache_status(&resp).as_deref(),
        Some("MISS"),
        "nothing was kept"
    );
    assert!(resp.bytes().await.unwrap() == zip);
    assert_eq!(up.hits(&zip_path), 3);
}

#[tokio::test]
async fn a_failing_artifact_host_trips_its_own_circuit_without_touching_cached_artifacts() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |c| {
        c.upstream.breaker_threshold = 2;
        c.upstream.breaker_cooldown = Duration::from_millis(500);
    })
    .await;
    let (cached_url, _, _) = proxy.handed_out("1.0.0", "darwin", "arm64").await;
    let cached = proxy.client.get(&cached_url).send().await.unwrap();
    assert_eq!(cached.status(), StatusCode::OK);
    let cached = cached.bytes().await.unwrap();

    let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
    let zip_path = up.zip_path("1.0.0", "linux", "amd64");
    up.set_fault(&zip_path, Fault::Status(503));
    for _ in 0..2 {
        let resp = proxy.client.get(&zip_url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
    assert_eq!(up.hits(&zip_path), 2, "artifacts are not retried");

    // Open: refused at once without asking the host; cached artifacts and the registry API
    // are unaffected.
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("keeps failing"),
        "{body}"
    );
    assert_eq!(up.hits(&zip_path), 2);
    let resp = proxy.client.get(&cached_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    assert_eq!(resp.bytes().await.unwrap(), cached);
    let (status, _, _) = proxy
        .get_json("/v1/providers/testns/demo/1.1.0/download/linux/amd64")
        .await;
    assert_eq!(status, StatusCode::OK);

    // After the cooldown one probe goes through and the host is used again.
    up.clear_faults();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap(),
        up.zip("1.0.0", "linux", "amd64").1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_artifact_fails_every_waiter_and_the_next_request_refills() {
    let GatedZip {
        up,
        proxy,
        zip_url,
        zip,
        zip_path,
        ..
    } = GatedZip::start(4 << 20).await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.set_fault(&zip_path, Fault::Cut(1 << 20, gate.clone()));
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let mut resp = proxy.client.get(&zip_url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.chunk().await.unwrap().is_some());
        waiters.push(resp);
    }
    gate.notify_one();
    for resp in waiters {
        assert!(
            hash_body(resp).await.is_err(),
            "every waiter sees the transfer fail"
        );
    }
    assert_eq!(proxy.staged_files_settled().await, 0, "no staged garbage");

    up.clear_faults();
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("MISS"));
    assert!(resp.bytes().await.unwrap() == zip);
    assert_eq!(up.hits(&zip_path), 2, "one failed fill, one good one");
}

/// A client that joins a fill after many MiB were written reads the early bytes back from the
/// spool file and the rest from the chunks the fill keeps in memory; the leader reads from
/// memory throughout. Both get every byte, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joining_a_fill_late_gets_every_byte() {
    let GatedZip {
        up,
        proxy,
        zip_url,
        zip,
        zip_path,
        gate,
    } = GatedZip::start(32 << 20).await;
    let want = Sha256::digest(&zip).to_vec();
    let held_at = 12 << 20;
    up.set_fault(&zip_path, Fault::Gate(held_at, gate.clone()));

    let mut leader = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(leader.status(), StatusCode::OK);
    let mut lead = Vec::new();
    // The leader gets (nearly) all the upstream has sent before the gate.
    while lead.len() < held_at - (1 << 20) {
        let chunk = tokio::time::timeout(Duration::from_secs(30), leader.chunk())
            .await
            .expect("the leader gets the bytes sent so far")
            .unwrap()
            .unwrap();
        lead.extend_from_slice(&chunk);
    }
    let late = tokio::spawn(hash_body(proxy.client.get(&zip_url).send().await.unwrap()));
    gate.notify_one();
    while let Some(chunk) = leader.chunk().await.unwrap() {
        lead.extend_from_slice(&chunk);
    }
    assert_eq!(Sha256::digest(&lead).to_vec(), want);
    let (hash, len) = late.await.unwrap().unwrap();
    assert_eq!(len, zip.len() as u64);
    assert_eq!(hash, want);
    assert_eq!(up.hits(&zip_path), 1);
}

/// A client that stops reading a large cached artifact is cut off after `server.write_timeout`
/// instead of holding its connection (and the server's buffers) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let GatedZip {
        proxy,
        zip_url,
        zip,
        gate,
        ..
    } = GatedZip::start_with(32 << 20, |c| {
        c.server.write_timeout = Duration::from_secs(1)
    })
    .await;
    gate.notify_one();
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(hash_body(resp).await.unwrap().1, zip.len() as u64);
    let resp = proxy.client.get(&zip_url).send().await.unwrap();
    assert_eq!(cache_status(&resp).as_deref(), Some("HIT"));
    drop(resp);

    let url = reqwest::Url::parse(&zip_url).unwrap();
    let mut conn = tokio::net::TcpStream::connect(format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap()
    ))
    .await
    .unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        url.path(),
        url.host_str().unwrap()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = conn.read(&mut buf).await.unwrap();
    assert!(got > 0);
    // Stop reading for longer than the write timeout, then take what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the server closed the connection");
    assert!(
        got < zip.len(),
        "the transfer was cut off ({got} of {} bytes)",
        zip.len()
    );
}
