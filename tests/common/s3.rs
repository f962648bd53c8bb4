//! A real S3 server for tests: `s3s-fs` (S3 over a directory, signatures enforced) on
//! 127.0.0.1, running on its own thread so it outlives any one test runtime, and able to stop
//! (refusing connections) and come back on the same port.

use hyper_util::rt::{TokioExecutor, TokioIo};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::task::JoinHandle;

pub const ACCESS_KEY: &str = "AKIATERRAPEAKTEST";
pub const SECRET_KEY: &str = "terrapeak-test-secret-key";
pub const BUCKET: &str = "terrapeak-test";

pub struct S3Server {
    pub endpoint: String,
    addr: SocketAddr,
    /// The directory s3s-fs keeps objects in: `root/<bucket>/<key>`.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Handle,
    accept: Mutex<Option<JoinHandle<()>>>,
    /// While set, every multipart part upload fails with a 500.
    fail_parts: Arc<AtomicBool>,
    /// Multipart uploads aborted by the client.
    aborts: Arc<AtomicUsize>,
}

/// A runtime on a thread of its own, alive for the whole test process.
fn server_runtime() -> tokio::runtime::Handle {
    static RT: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv().unwrap()
    })
    .clone()
}

impl S3Server {
    pub fn start() -> Arc<S3Server> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(S3Server {
            endpoint: format!("http://{addr}"),
            addr,
            root,
            _dir: dir,
            rt: server_runtime(),
            accept: Mutex::new(None),
            fail_parts: Arc::default(),
            aborts: Arc::default(),
        });
        server.serve(listener);
        server
    }

    /// A process-wide server shared by every TerraPeak of one test binary (each under its own
    /// key prefix).
    pub fn shared() -> Arc<S3Server> {
        static SHARED: OnceLock<Arc<S3Server>> = OnceLock::new();
        SHARED.get_or_init(S3Server::start).clone()
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let root = self.root.clone();
        let (fail_parts, aborts) = (self.fail_parts.clone(), self.aborts.clone());
        let task = self.rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let fs = s3s_fs::FileSystem::new(&root).unwrap();
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            let s3 = builder.build();
            // Faults and observations around the S3 API: failing part uploads, counting aborts.
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let (s3, fail_parts, aborts) = (s3.clone(), fail_parts.clone(), aborts.clone());
                async move {
                    let query = req.uri().query().unwrap_or_default();
                    let part = req.method() == hyper::Method::PUT && query.contains("partNumber=");
                    if part && fail_parts.load(Ordering::SeqCst) {
                        return Ok(hyper::Response::builder()
                            .status(500)
                            .body(s3s::Body::from("injected part failure".to_owned()))
                            .unwrap());
                    }
                    let abort =
                        req.method() == hyper::Method::DELETE && query.contains("uploadId=");
                    let resp = hyper::service::Service::call(&s3, req).await;
                    // Counted once done, so a test that sees the count sees the upload gone.
                    if abort && resp.as_ref().is_ok_and(|r| r.status().is_success()) {
                        aborts.fetch_add(1, Ordering::SeqCst);
                    }
                    resp
                }
            });
            // Connections live in this set: stopping the server drops them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                connections.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// Stops listening and cuts every open connection.
    pub fn stop(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        // Wait until the port refuses connections.
        for _ in 0..100 {
            if std::net::TcpStream::connect(self.addr).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the S3 server did not stop");
    }

    /// Makes every multipart part upload fail (or succeed again).
    pub fn fail_part_uploads(&self, fail: bool) {
        self.fail_parts.store(fail, Ordering::SeqCst);
    }

    /// How many multipart uploads clients aborted (counted once the abort is done).
    pub fn aborted_uploads(&self) -> usize {
        self.aborts.load(Ordering::SeqCst)
    }

    /// Multipart uploads begun and neither completed nor aborted (s3s-fs keeps a record of
    /// each at the top of its directory).
    pub fn open_uploads(&self) -> usize {
        std::fs::read_dir(&self.root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
            .count()
    }

    /// Serves again on the same port.
    pub fn restart(&self) {
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        self.serve(listener);
    }

    /// Objects stored under `prefix` (any TerraPeak key layout), for assertions.
    pub fn object_count(&self, prefix: &str) -> usize {
        fn walk(dir: &std::path::Path, n: &mut usize) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, n);
                    } else {
                        *n += 1;
                    }
                }
            }
        }
        let mut n = 0;
        walk(&self.root.join(BUCKET).join(prefix), &mut n);
        n
    }

    /// The `storage:` section of a configuration file for this server, under `prefix`, spooling
    /// in `spool`.
    pub fn yaml(&self, prefix: &str, spool: &std::path::Path) -> String {
        format!(
            "storage:\n  file:\n    path: \"{}\"\n  minio:\n    enabled: true\n    endpoint: \"{}\"\n    region: us-east-1\n    access_key: \"{ACCESS_KEY}\"\n    secret_key: \"{SECRET_KEY}\"\n    bucket: \"{BUCKET}\"\n    prefix: \"{prefix}\"\n",
            spool.display(),
            self.endpoint
        )
    }

    /// Points a configuration at this server, under `prefix`. With
    /// `TERRAPEAK_TEST_S3_ENDPOINT` (and `_REGION`, `_ACCESS_KEY`, `_SECRET_KEY`, `_BUCKET`) set,
    /// at that store instead (for running the providers, transparent, resilience and metrics
    /// suites against Garage, MinIO or AWS by hand).
    pub fn configure(&self, config: &mut terrapeak::config::Config, prefix: &str) {
        let s3 = &mut config.storage.minio;
        s3.enabled = true;
        s3.endpoint = self.endpoint.clone();
        s3.region = "us-east-1".into();
        s3.access_key = terrapeak::config::Secret::new(ACCESS_KEY);
        s3.secret_key = terrapeak::config::Secret::new(SECRET_KEY);
        s3.bucket = BUCKET.into();
        if let Ok(endpoint) = std::env::var("TERRAPEAK_TEST_S3_ENDPOINT") {
            let var = |name: &str| std::env::var(format!("TERRAPEAK_TEST_S3_{name}")).unwrap();
            s3.endpoint = endpoint;
            s3.region = var("REGION");
            s3.access_key = terrapeak::config::Secret::new(var("ACCESS_KEY"));
            s3.secret_key = terrapeak::config::Secret::new(var("SECRET_KEY"));
            s3.bucket = var("BUCKET");
        }
        s3.prefix = prefix.into();
        s3.request_timeout = std::time::Duration::from_secs(3);
        s3.connect_timeout = std::time::Duration::from_secs(1);
    }
}
