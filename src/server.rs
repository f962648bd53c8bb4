//! Wiring: build the layers from the configuration, bind, serve (TLS when configured), and shut
//! down gracefully.

use crate::cache::Cache;
use crate::config::{Config, ConfigError};
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::upstream::Upstream;
use axum_server::Handle;
use axum_server::accept::NoDelayAcceptor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the cache directory {path}: {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set up the S3 store: {0}")]
    S3(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load the TLS certificate or key: {0}")]
    Tls(std::io::Error),
}

/// Reads every file the configuration names for secrets and TLS (token files, signing key
/// files, the certificate, key and client CA, `upstream.ca_file`), as a start would, without
/// starting anything: `check-config` fails on what would stop the server.
pub fn check_files(config: &Config) -> Result<(), StartError> {
    Upstream::all_from_config(config, Arc::new(Metrics::new()))?;
    if let Some(auth) = &config.auth {
        crate::auth::Auth::from_config(auth)?;
    }
    let tls = &config.server.tls;
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        crate::tls::listener_config(cert, key, tls.client_ca_file.as_deref(), tls.client_auth)
            .map_err(StartError::Tls)?;
    }
    Ok(())
}

/// A running TerraPeak.
pub struct Server {
    local_addr: SocketAddr,
    scheme: &'static str,
    stop: Stop,
    task: JoinHandle<std::io::Result<()>>,
    cache: Arc<Cache>,
    /// Set once shutdown began, so `/readyz` takes this replica out of rotation.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The separate metrics listener, when configured.
    metrics_listener: Option<(SocketAddr, JoinHandle<()>)>,
    /// Eviction passes and access-record flushes.
    housekeeping: JoinHandle<()>,
    /// Samples of the cache counters, for the status page's recent figures.
    sampler: JoinHandle<()>,
    /// The separate admin listener, when configured.
    admin_listener: Option<(SocketAddr, JoinHandle<()>)>,
    replica: String,
}

/// How the main listener is asked to stop: axum-server's handle for TLS, TerraPeak's own
/// listener for plain HTTP.
#[derive(Clone)]
enum Stop {
    Tls(Handle<SocketAddr>),
    Plain(crate::listener::Shutdown),
}

impl Stop {
    /// No new connections; transfers in flight get `grace` to finish.
    fn begin(&self, grace: Duration) {
        match self {
            Stop::Tls(handle) => handle.graceful_shutdown(Some(grace)),
            Stop::Plain(shutdown) => shutdown.begin(Some(grace)),
        }
    }
}

/// How often access records are flushed (reads are kept at hour granularity, so most flushes
/// write nothing).
const ACCESS_FLUSH_EVERY: Duration = Duration::from_secs(600);
/// How often a live process rewrites its access record even without new reads, so that it
/// never looks abandoned.
const ACCESS_TOUCH_EVERY: Duration = Duration::from_secs(6 * 3600);
/// An access record nobody wrote for this long is a gone process's: another folds it into its
/// own and removes it (four times the touch interval: a store failing writes for hours does
/// not cost a live replica its record, and if it did, the replica writes it again whole).
const ACCESS_RECORD_ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How often a TerraPeak without limits counts what it stores (for the metrics).
const COUNT_EVERY: Duration = Duration::from_secs(600);
/// The least rest between two inventory passes.
const PASS_REST: Duration = Duration::from_millis(200);
/// How often the inventory is counted (and eviction runs) without a publish to prompt it.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);

/// This process's name for its access record: the host name (a pod's name) and a random
/// suffix, so processes sharing a host or a bucket never overwrite each other's record.
fn replica_name() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    if name.is_empty() || name == "." || name == ".." {
        suffix
    } else {
        format!("{name}-{}", &suffix[..8])
    }
}

/// Eviction after publishes (and once a minute), and access-record flushes.
async fn housekeeping(cache: Arc<Cache>, limits: crate::inventory::Limits, replica: String) {
    let bounded = limits.max_size.is_some() || limits.unused_after.is_some();
    let published = cache.storage().published();
    let mut last_flush = tokio::time::Instant::now();
    let mut last_touch = last_flush;
    let mut last_count: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = published.notified() => {}
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
        let started = tokio::time::Instant::now();
        let pass = if bounded && !cache.sealed() {
            Some(cache.gc(limits, false, false).await.map(|_| ()))
        } else if last_count.is_none_or(|at| at.elapsed() >= COUNT_EVERY) {
            // Without limits the pass only counts what is stored, for the metrics: rarely.
            last_count = Some(started);
            Some(cache.inventory().await.map(|_| ()))
        } else {
            None
        };
        if let Some(Err(e)) = pass {
            tracing::warn!(error = %e, "inventory pass failed; trying again later");
        }
        // A pass lists the whole store: on a large one, rest four times as long as it took,
        // so a burst of publishes costs at most a fifth of a core.
        tokio::time::sleep(started.elapsed().saturating_mul(4).max(PASS_REST)).await;
        if last_flush.elapsed() >= ACCESS_FLUSH_EVERY {
            last_flush = tokio::time::Instant::now();
            let touch = last_touch.elapsed() >= ACCESS_TOUCH_EVERY;
            match cache.storage().flush_access(&replica, touch).await {
                Ok(wrote) => {
                    if wrote {
                        last_touch = last_flush;
                    }
                    if let Err(e) = cache
                        .storage()
                        .compact_access(&replica, ACCESS_RECORD_ABANDONED_AFTER)
                        .await
                    {
                        tracing::warn!(error = %e, "access records not compacted; trying again later");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "access record not written; trying again later")
                }
            }
        }
    }
}

/// Samples the counters the status page's history keeps, from now on.
async fn sample_counters(metrics: Arc<Metrics>) {
    let mut every = tokio::time::interval(crate::status::SAMPLE_EVERY);
    loop {
        every.tick().await;
        metrics
            .history
            .sample(std::time::Instant::now(), metrics.status_counters());
    }
}

/// How long a stopping server waits, after the last response, for fills still publishing their
/// verified bytes to the store.
const PUBLISH_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` (plain HTTP) on a listener of its own beside the main one: the metrics or the
/// admin API.
async fn serve_beside(
    addr: SocketAddr,
    what: &'static str,
    app: axum::Router,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    tracing::info!(addr = %bound, "{what} listening");
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    Ok((
        bound,
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }),
    ))
}

/// Installs the process-wide TLS crypto provider (ring) once.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The store, the upstreams and the cache policy from the configuration: what the server
/// serves from, and what `warm`, `export` and `import` drive.
/// `spool` is the folder under `storage.file.path` that fills spool to: the server's
/// ([`crate::storage::SERVER_SPOOL`], emptied here) or a command's own.
pub async fn open_cache(
    config: &Config,
    spool: &str,
) -> Result<(Arc<Cache>, Arc<Metrics>), StartError> {
    install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let path = &config.storage.file.path;
    let storage = if config.storage.minio.enabled {
        Storage::s3_in(&config.storage.minio, path, spool, metrics.clone())
            .await
            .map_err(StartError::S3)?
    } else {
        Storage::local_in(path, spool, metrics.clone())
            .await
            .map_err(|source| StartError::Storage {
                path: path.display().to_string(),
                source,
            })?
    };
    let upstreams = Upstream::all_from_config(config, metrics.clone())?;
    let cache = Arc::new(
        Cache::new(
            storage,
            upstreams,
            config.cache.versions_ttl,
            config.cache.max_stale,
            config.cache.negative_ttl,
            metrics.clone(),
        )
        .with_offline(config.cache.offline),
    );
    Ok((cache, metrics))
}

impl Server {
    /// Builds every layer, binds the listener and starts serving in the background.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        install_crypto_provider();
        config.validate()?;
        let (cache, metrics) = open_cache(config, crate::storage::SERVER_SPOOL).await?;
        let metrics_listener = match config.metrics_addr()? {
            Some(addr) => Some(
                serve_beside(
                    addr,
                    "metrics",
                    crate::http::metrics_router(metrics.clone()),
                )
                .await?,
            ),
            None => None,
        };

        let addr = config.listen_addr()?;
        let listener = bind_listener(addr).map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let tls_files = &config.server.tls;
        let tls = match (&tls_files.cert_file, &tls_files.key_file) {
            (Some(cert), Some(key)) => Some(
                crate::tls::listener_config(
                    cert,
                    key,
                    tls_files.client_ca_file.as_deref(),
                    tls_files.client_auth,
                )
                .map_err(StartError::Tls)?,
            ),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let auth = match &config.auth {
            Some(a) => Some(Arc::new(crate::auth::Auth::from_config(a)?)),
            None => None,
        };
        let state = AppState::new(crate::http::StateFields {
            auth,
            draining: draining.clone(),
            cache: cache.clone(),
            public_base: config.server.domain.clone(),
            scheme,
            listen_addr: local_addr,
            write_timeout: config.server.write_timeout,
            metrics: metrics.clone(),
            metrics_on_main: config.metrics.on_main_listener,
            limits: crate::inventory::Limits {
                max_size: config.storage.max_size,
                unused_after: config.cache.evict_unused_after,
            },
            ui: config
                .ui
                .enabled
                .then(|| Arc::new(crate::http::Ui::default())),
        });
        let admin_listener = match config.admin_addr()? {
            Some(addr) => Some(
                serve_beside(addr, "admin API", crate::http::admin_router(state.clone())).await?,
            ),
            None => None,
        };
        let router = router(state);
        let bind_err = |source| StartError::Bind { addr, source };
        let read_timeout = config.server.read_timeout;
        let idle_timeout = config.server.idle_timeout;
        let (stop, task) = match tls {
            Some(tls) => {
                let handle: Handle<SocketAddr> = Handle::new();
                let mut server = axum_server::from_tcp_rustls(listener, tls)
                    .map_err(bind_err)?
                    .map(|tls| tls.acceptor(NoDelayAcceptor::new()))
                    .handle(handle.clone());
                tune(server.http_builder(), read_timeout, idle_timeout);
                let app = router.into_make_service_with_connect_info::<SocketAddr>();
                (Stop::Tls(handle), tokio::spawn(server.serve(app)))
            }
            None => {
                listener.set_nonblocking(true).map_err(bind_err)?;
                let shutdown = crate::listener::Shutdown::default();
                let shutdown_in = shutdown.clone();
                let options = crate::listener::Options {
                    read_timeout,
                    idle_timeout,
                    max_request_head: MAX_REQUEST_HEAD,
                    park_above: crate::listener::PARK_ABOVE,
                    threads: config.server.connection_threads(),
                };
                let metrics = metrics.clone();
                let serve = async move {
                    crate::listener::serve(listener, router, options, shutdown_in, &metrics).await
                };
                (Stop::Plain(shutdown), tokio::spawn(serve))
            }
        };
        let limits = crate::inventory::Limits {
            max_size: config.storage.max_size,
            unused_after: config.cache.evict_unused_after,
        };
        let replica = replica_name();
        if (limits.max_size.is_some() || limits.unused_after.is_some()) && !cache.sealed() {
            // A fill short of disk space evicts first (a weak link: the store lives in the cache).
            let weak = Arc::downgrade(&cache);
            cache.storage().set_room_hook(Arc::new(move |bytes| {
                let weak = weak.clone();
                futures_util::StreamExt::boxed(futures_util::stream::once(async move {
                    match weak.upgrade() {
                        Some(cache) => cache.make_room(bytes).await,
                        None => false,
                    }
                }))
            }));
        }
        let housekeeping = tokio::spawn(housekeeping(cache.clone(), limits, replica.clone()));
        let sampler = tokio::spawn(sample_counters(metrics.clone()));
        tracing::info!(addr = %local_addr, scheme, "TerraPeak listening");
        Ok(Server {
            housekeeping,
            sampler,
            admin_listener,
            replica,
            local_addr,
            scheme,
            stop,
            task,
            cache,
            draining,
            metrics_listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The separate admin listener's address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.as_ref().map(|(a, _)| *a)
    }

    /// The separate metrics listener's address, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(a, _)| *a)
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }

    /// Stops accepting and lets transfers in flight finish within `grace`.
    pub async fn shutdown(self, grace: Duration) -> std::io::Result<()> {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop.begin(grace);
        self.wait().await
    }

    /// Waits until the server stops (after a shutdown was requested through a signal).
    pub async fn wait(self) -> std::io::Result<()> {
        let served = match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Some((_, task)) = &self.metrics_listener {
            task.abort();
        }
        if let Some((_, task)) = &self.admin_listener {
            task.abort();
        }
        // Clients may have all their bytes before the store has them: let publishing finish.
        if !self.cache.finish_fills(PUBLISH_GRACE).await {
            tracing::warn!(
                "fills still running at exit; their spool files are removed at the next start"
            );
        }
        self.housekeeping.abort();
        self.sampler.abort();
        if let Err(e) = self
            .cache
            .storage()
            .flush_access(&self.replica, false)
            .await
        {
            tracing::warn!(error = %e, "access record not written at exit");
        }
        served
    }

    /// The cache this server serves from (for tests and embedding).
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Shuts down gracefully on SIGTERM or SIGINT.
    pub async fn run_until_signalled(self, grace: Duration) -> std::io::Result<()> {
        let stop = self.stop.clone();
        let draining = self.draining.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(grace = ?grace, "shutting down: no new connections, finishing transfers");
            stop.begin(grace);
        });
        self.wait().await
    }
}

/// Connections waiting to be accepted; a burst of thousands of clients (a CI fleet starting at
/// once) must not meet refused connections. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

/// Binds the main listener with a deep accept queue.
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// The largest request head accepted: Terraform's requests are well under 2 KiB.
const MAX_REQUEST_HEAD: usize = 32 * 1024;

fn tune(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    read_timeout: Duration,
    idle_timeout: Duration,
) {
    let mut http1 = builder.http1();
    http1.timer(hyper_util::rt::TokioTimer::new());
    // A request head (line and headers) larger than this is answered 431.
    http1.max_buf_size(MAX_REQUEST_HEAD);
    if !read_timeout.is_zero() {
        http1.header_read_timeout(read_timeout);
    }
    let mut http2 = builder.http2();
    http2.timer(hyper_util::rt::TokioTimer::new());
    http2.max_header_list_size(MAX_REQUEST_HEAD as u32);
    if !idle_timeout.is_zero() {
        http2.keep_alive_interval(Some(idle_timeout));
        http2.keep_alive_timeout(Duration::from_secs(20));
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
