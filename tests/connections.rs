//! Black-box tests of the plain-HTTP listener: idle keep-alive connections parked while many
//! are open (hyper's buffers given back) keep working, and nothing a client sent is lost.

mod common;

use common::*;
use std::time::Duration;
use terrapeak::listener::PARK_ABOVE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn versions_path() -> String {
    format!("/v1/providers/{NS}/{TYPE}/versions")
}

fn addr(proxy: &Proxy) -> String {
    proxy.base.trim_start_matches("http://").to_owned()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: terrapeak.test\r\n\r\n").into_bytes()
}

/// Reads one response (head and a `Content-Length` body): status and body.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (u16, Vec<u8>) {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(pending[..end].to_vec()).unwrap();
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            let start = end + 4;
            while pending.len() < start + length {
                read_more(stream, pending).await;
            }
            let body = pending[start..start + length].to_vec();
            pending.drain(..start + length);
            return (status, body);
        }
        read_more(stream, pending).await;
    }
}

async fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut buf = [0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert!(n > 0, "the connection closed before the whole answer");
    pending.extend_from_slice(&buf[..n]);
}

async fn gauge(proxy: &Proxy, name: &str) -> f64 {
    Scrape::of(&proxy.client, &proxy.url("/metrics"))
        .await
        .value(name, &[])
}

/// Waits until `name` reaches at least `want`; its last value.
async fn gauge_reaches(proxy: &Proxy, name: &str, want: f64) -> f64 {
    let mut value = 0.0;
    for _ in 0..200 {
        value = gauge(proxy, name).await;
        if value >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    value
}

#[tokio::test]
async fn crowded_idle_connections_are_parked_and_serve_their_next_requests() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let (status, _, expected) = proxy.get_json(&versions_path()).await;
    assert_eq!(status, 200);
    let expected = serde_json::to_vec(&expected).unwrap();

    // More connections than the parking threshold, all open before any request.
    let count = PARK_ABOVE + 64;
    let mut conns = Vec::new();
    for _ in 0..count {
        conns.push((TcpStream::connect(addr(&proxy)).await.unwrap(), Vec::new()));
    }
    // Accepted by the server (the connection threads accept on their own time), so the
    // first answers already see a crowd.
    gauge_reaches(&proxy, "terrapeak_http_connections_open", count as f64).await;
    for round in 0..3 {
        for (stream, pending) in &mut conns {
            stream.write_all(&get(&versions_path())).await.unwrap();
            let (status, body) = read_response(stream, pending).await;
            assert_eq!(status, 200, "round {round}");
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
                serde_json::from_slice::<serde_json::Value>(&expected).unwrap()
            );
        }
        // Every one of them is idle now and parked (so may the client's own pooled ones be).
        let parked = gauge_reaches(&proxy, "terrapeak_http_connections_parked", count as f64).await;
        assert!(parked >= count as f64, "round {round}: {parked} parked");
        assert!(gauge(&proxy, "terrapeak_http_connections_open").await > count as f64);
    }
    assert_eq!(up.hits(&versions_path()), 1);

    // Two requests in one write, and a head split across writes with a pause between: nothing
    // the client sent is lost to parking.
    let (stream, pending) = &mut conns[0];
    let mut two = get(&versions_path());
    two.extend(get("/.well-known/terraform.json"));
    stream.write_all(&two).await.unwrap();
    assert_eq!(read_response(stream, pending).await.0, 200);
    let (status, body) = read_response(stream, pending).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().contains("providers.v1"));

    let request = get(&versions_path());
    let (first, rest) = request.split_at(20);
    stream.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(rest).await.unwrap();
    assert_eq!(read_response(stream, pending).await.0, 200);

    // A whole request and the start of the next in one write, the rest of it later.
    let mut one_and_a_half = get(&versions_path());
    one_and_a_half.extend_from_slice(first);
    stream.write_all(&one_and_a_half).await.unwrap();
    assert_eq!(read_response(stream, pending).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(rest).await.unwrap();
    assert_eq!(read_response(stream, pending).await.0, 200);

    // A request with a body whose head and body come in separate writes, answered without
    // reading the body: hyper may close the connection after the answer, but the body is never
    // taken for the next request.
    let (stream, pending) = &mut conns[1];
    stream
        .write_all(
            b"POST /v1/providers/x/y/versions HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"hello").await.unwrap();
    let (status, _) = read_response(stream, pending).await;
    assert!((400..500).contains(&status), "{status}");
    if stream.write_all(&get(&versions_path())).await.is_ok() {
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer or the end within 10 s")
            .unwrap_or(0);
        if n > 0 {
            assert!(
                buf.starts_with(b"HTTP/1.1 200 "),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }

    // Closed connections are counted out.
    conns.clear();
    let mut open = f64::MAX;
    for _ in 0..200 {
        open = gauge(&proxy, "terrapeak_http_connections_open").await;
        if open <= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(open <= 2.0, "{open} connections still counted open");
    assert_eq!(
        gauge(&proxy, "terrapeak_http_connections_parked").await,
        0.0
    );
}

#[tokio::test]
async fn a_parked_connection_is_closed_after_the_read_timeout_and_at_shutdown() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let mut proxy = Proxy::start(&up, |c| c.server.read_timeout = Duration::from_secs(1)).await;
    let mut conns = Vec::new();
    for _ in 0..PARK_ABOVE + 4 {
        conns.push((TcpStream::connect(addr(&proxy)).await.unwrap(), Vec::new()));
    }
    gauge_reaches(
        &proxy,
        "terrapeak_http_connections_open",
        conns.len() as f64,
    )
    .await;
    for (stream, pending) in &mut conns {
        stream.write_all(&get("/healthz")).await.unwrap();
        assert_eq!(read_response(stream, pending).await.0, 200);
    }
    let parked = gauge_reaches(
        &proxy,
        "terrapeak_http_connections_parked",
        conns.len() as f64,
    )
    .await;
    assert!(parked >= conns.len() as f64, "{parked} parked");

    // Idle past server.read_timeout: closed by TerraPeak (the client reads the end).
    let (stream, _) = &mut conns[0];
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // A fresh parked connection closes as soon as the server stops.
    let mut late = TcpStream::connect(addr(&proxy)).await.unwrap();
    let mut pending = Vec::new();
    late.write_all(&get("/healthz")).await.unwrap();
    assert_eq!(read_response(&mut late, &mut pending).await.0, 200);
    let stop = proxy
        .server
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(30));
    let stopped = tokio::time::timeout(Duration::from_secs(5), stop).await;
    assert!(stopped.is_ok(), "the server waited on idle connections");
    let n = tokio::time::timeout(Duration::from_secs(5), late.read(&mut buf))
        .await
        .expect("closed at shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client
        .get(proxy.url(&versions_path()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let doc: serde_json::Value = resp.json().await.unwrap();
    assert!(doc["versions"].as_array().is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn a_request_whose_first_bytes_come_alone_is_served_as_http1() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let proxy = Proxy::start(&up, |_| {}).await;
    // `P` and then `PR` could still be the HTTP/2 preface; the rest says HTTP/1.
    for split in [1, 2] {
        let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
        let request =
            b"PUT /v1/providers/x/y/versions HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n";
        stream.write_all(&request[..split]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        stream.write_all(&request[split..]).await.unwrap();
        let (status, _) = read_response(&mut stream, &mut Vec::new()).await;
        assert!((400..500).contains(&status), "{status}");
    }
}

/// Connections served on the shared runtime (`server.connection_threads: 0`), on one thread
/// and on several: concurrent clients of a cold artifact share its fill (which runs on the
/// shared runtime whichever thread asked), every one gets its bytes, and shutdown publishes
/// the fill and closes the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_number_of_connection_threads_serves_fills_and_stops_cleanly() {
    let up = FakeUpstream::start(FakeOptions::default()).await;
    let (_, expected) = up.zip("1.0.0", "linux", "amd64");
    for threads in [0, 1, 4] {
        let mut proxy = Proxy::start(&up, |c| c.server.connection_threads = Some(threads)).await;
        let (zip_url, _, _) = proxy.handed_out("1.0.0", "linux", "amd64").await;
        let clients: Vec<_> = (0..12)
            .map(|_| {
                let url = zip_url.clone();
                // A client of its own each: a connection of its own each.
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                tokio::spawn(async move { client.get(&url).send().await?.bytes().await })
            })
            .collect();
        for c in clients {
            assert_eq!(c.await.unwrap().unwrap(), expected, "threads {threads}");
        }
        let address = addr(&proxy);
        proxy
            .server
            .take()
            .unwrap()
            .shutdown(Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            TcpStream::connect(&address).await.is_err(),
            "threads {threads}: the listener is closed"
        );
        let again = terrapeak::server::Server::start(&config_for(&up, proxy.data_dir.path()))
            .await
            .unwrap();
        let resp = proxy
            .client
            .get(zip_url.replace(&proxy.base, &again.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            cache_status(&resp).as_deref(),
            Some("HIT"),
            "threads {threads}"
        );
        assert_eq!(resp.bytes().await.unwrap(), expected);
    }
    assert_eq!(up.hits(&up.zip_path("1.0.0", "linux", "amd64")), 3);
}
