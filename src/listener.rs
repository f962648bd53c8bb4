//! The plain-HTTP listener: accepts connections, serves HTTP/1.1 (and HTTP/2 with prior
//! knowledge) with hyper, and parks idle keep-alive connections.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the whole life of an HTTP/1
//! connection, with no setting to release them, so 10,000 clients holding keep-alive
//! connections (a CI fleet between two steps) would cost about 200 MiB. When more than
//! [`PARK_ABOVE`] connections are open, a connection whose response is fully sent and whose
//! client sent nothing more is *parked*: the transport tells hyper the client is done (without
//! closing the socket), hyper finishes and gives its buffers back, and the connection waits
//! for the next request with nothing but the socket; when bytes arrive a fresh hyper connection
//! takes over. Below the threshold nothing is parked, so a few busy clients never pay for
//! setting hyper up again per request.
//!
//! A connection is parked only when nothing is in flight (the last response body was
//! dropped by hyper and everything was flushed), no byte arrived since the last request began,
//! the last bytes read ended a request head (`\r\n\r\n`), so hyper holds no partial
//! request, and no request on it had a body (hyper may still be reading one it was answered
//! without). A parked connection waits at most `server.read_timeout` (what hyper allows an idle
//! keep-alive connection), and closes at once when the server shuts down.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::ConnectInfo;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Idle HTTP/1 connections are parked only while more than this many connections are open:
/// below it hyper's buffers (16 KiB a connection) are cheap and kept for the next request.
pub const PARK_ABOVE: usize = 256;

/// HTTP/2 with prior knowledge starts with this preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Asks the listener and its connections to stop.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// No new connections; idle ones close, busy ones close after their response.
    graceful: CancellationToken,
    /// Every connection closes now.
    hard: CancellationToken,
}

impl Shutdown {
    /// Stops accepting, lets responses in flight finish for up to `grace`, then closes the rest.
    pub fn begin(&self, grace: Option<Duration>) {
        self.graceful.cancel();
        match grace {
            Some(grace) => {
                let hard = self.hard.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    hard.cancel();
                });
            }
            None => self.hard.cancel(),
        }
    }
}

/// How connections are served.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Time allowed for a request head, and for an idle keep-alive connection (zero: no limit).
    pub read_timeout: Duration,
    /// HTTP/2 keep-alive ping interval (zero: none).
    pub idle_timeout: Duration,
    /// The largest request head.
    pub max_request_head: usize,
    /// Park idle HTTP/1 connections while more than this many are open.
    pub park_above: usize,
    /// Threads that accept and serve connections, each with a single-threaded runtime of its
    /// own (see [`crate::runtime`]); zero serves them on the shared runtime.
    pub threads: usize,
}

struct Shared {
    router: Router,
    options: Options,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    shutdown: Shutdown,
    /// Connections open now.
    open: IntGauge,
    parked: IntGauge,
}

/// Serves `router` on `listener` (non-blocking) until `shutdown` is asked for and the
/// connections are done: on [`Options::threads`] connection threads that each accept from the
/// listener, or on the shared runtime.
pub async fn serve(
    listener: std::net::TcpListener,
    router: Router,
    options: Options,
    shutdown: Shutdown,
    metrics: &Metrics,
) -> io::Result<()> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new());
    // A request head (line and headers) larger than this is answered 431.
    http1.max_buf_size(options.max_request_head);
    if !options.read_timeout.is_zero() {
        http1.header_read_timeout(options.read_timeout);
    }
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    http2.max_header_list_size(options.max_request_head as u32);
    if !options.idle_timeout.is_zero() {
        http2.keep_alive_interval(Some(options.idle_timeout));
        http2.keep_alive_timeout(Duration::from_secs(20));
    }
    let shared = Arc::new(Shared {
        router,
        options,
        http1,
        http2,
        shutdown: shutdown.clone(),
        open: metrics.http_connections_open.clone(),
        parked: metrics.http_connections_parked.clone(),
    });
    let spawn = |stream, peer, shared: &Arc<Shared>, tracker: &TaskTracker| {
        tracker.spawn(serve_connection(stream, peer, shared.clone()));
    };
    if options.threads == 0 {
        return accept_loop(TcpListener::from_std(listener)?, shared, spawn).await;
    }
    // Every connection thread accepts from the one socket, so a connection goes to whichever
    // thread is free first (nginx's workers share their listening socket the same way).
    let runtime = tokio::runtime::Handle::current();
    let mut threads = Vec::new();
    for i in 0..options.threads {
        let listener = listener.try_clone()?;
        let (shared, runtime) = (shared.clone(), runtime.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("terrapeak-conn-{i}"))
            .spawn(move || {
                let _ = tx.send(connection_thread(listener, shared, runtime, spawn));
            })?;
        threads.push(rx);
    }
    drop(listener);
    let mut result = Ok(());
    for done in threads {
        let served = done
            .await
            .unwrap_or_else(|_| Err(io::Error::other("a connection thread panicked")));
        result = result.and(served);
    }
    result
}

/// One connection thread: its own single-threaded runtime, accepting from its copy of the
/// listener until shutdown, then serving what it has until that is done (or shutdown turns
/// hard).
fn connection_thread(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    spawn: impl Fn(TcpStream, SocketAddr, &Arc<Shared>, &TaskTracker),
) -> io::Result<()> {
    crate::runtime::enter_connection_thread(runtime);
    let local = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Reads of the stored files its connections send, file opens through `tokio::fs`.
        .max_blocking_threads(16)
        .build()?;
    local
        .block_on(async move { accept_loop(TcpListener::from_std(listener)?, shared, spawn).await })
}

/// Accepts until shutdown, giving each connection to `serve`; then waits for the connections
/// `serve` tracked to finish (or for shutdown to turn hard).
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    serve: impl Fn(TcpStream, SocketAddr, &Arc<Shared>, &TaskTracker),
) -> io::Result<()> {
    let shutdown = shared.shutdown.clone();
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.graceful.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Small answers go out at once (Nagle would hold a TLS record or a short body).
        let _ = stream.set_nodelay(true);
        serve(stream, peer, &shared, &tracker);
    }
    drop(listener);
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = shutdown.hard.cancelled() => {}
    }
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts a connection (open, parked) for as long as it is one.
struct Counted<'a>(&'a IntGauge);

impl<'a> Counted<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Waits for the client's next bytes without holding a buffer; false when the connection
/// should close instead (idle too long, an error, or the server stopping).
async fn await_request(stream: &TcpStream, shared: &Shared) -> bool {
    let ready = async {
        if shared.options.read_timeout.is_zero() {
            stream.readable().await.is_ok()
        } else {
            matches!(
                tokio::time::timeout(shared.options.read_timeout, stream.readable()).await,
                Ok(Ok(()))
            )
        }
    };
    tokio::select! {
        biased;
        _ = shared.shutdown.graceful.cancelled() => false,
        ready = ready => ready,
    }
}

/// Whether the client opened with the HTTP/2 preface (peeked, nothing consumed). Its first
/// three bytes decide (`PRI` starts no HTTP/1 request); a client that sent fewer is asked
/// again every few milliseconds, for as long as a request head may take.
async fn is_h2(stream: &TcpStream, patience: Duration) -> io::Result<bool> {
    let mut head = [0u8; 3];
    let started = tokio::time::Instant::now();
    loop {
        let n = stream.peek(&mut head).await?;
        if n == 0 || head[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == head.len() {
            return Ok(true);
        }
        // The bytes already there keep the socket readable: wait by time, not readiness.
        if started.elapsed() > patience {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _open = Counted::new(&shared.open);
    if !await_request(&stream, &shared).await {
        return;
    }
    let patience = match shared.options.read_timeout {
        t if t.is_zero() => Duration::from_secs(30),
        t => t,
    };
    match is_h2(&stream, patience).await {
        Ok(true) => return serve_h2(stream, peer, &shared).await,
        Ok(false) => {}
        Err(_) => return,
    }
    loop {
        match serve_h1(stream, peer, &shared).await {
            Some(parked) => stream = parked,
            None => return,
        }
        let parked = Counted::new(&shared.parked);
        if !await_request(&stream, &shared).await {
            return;
        }
        drop(parked);
    }
}

async fn serve_h2(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let service = Service::new(shared.router.clone(), peer, None);
    let conn = shared.http2.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.hard.cancelled() => return,
            _ = shared.shutdown.graceful.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = conn.as_mut() => return,
        }
    }
}

/// Serves HTTP/1 requests until the client leaves (None) or the connection is parked (its
/// socket back, for the next request).
async fn serve_h1(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> Option<TcpStream> {
    let state = Arc::new(ConnState::default());
    let io = ParkingIo {
        stream,
        state: state.clone(),
        open: shared.open.clone(),
        park_above: shared.options.park_above,
    };
    let service = Service::new(shared.router.clone(), peer, Some(state.clone()));
    // Boxed: only a connection being served holds hyper's state, not a parked one.
    let mut conn = Box::pin(shared.http1.serve_connection(TokioIo::new(io), service));
    let mut draining = false;
    let served = loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.hard.cancelled() => return None,
            _ = shared.shutdown.graceful.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            served = std::future::poll_fn(|cx| conn.as_mut().poll_without_shutdown(cx)) => {
                break served;
            }
        }
    };
    if served.is_err() {
        return None;
    }
    let parts = Pin::into_inner(conn).into_parts();
    let mut stream = parts.io.into_inner().stream;
    if draining || !state.parked.load(Ordering::Relaxed) || !parts.read_buf.is_empty() {
        // Done (the client closed or asked to, or the server is stopping): end the stream as
        // hyper would, then close. (Held bytes are not expected: a connection holding part of
        // a request is never parked.)
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::shutdown(&mut stream),
        )
        .await;
        return None;
    }
    Some(stream)
}

/// What the transport and the service know about one hyper connection.
#[derive(Default)]
struct ConnState {
    /// Requests whose response body hyper has not finished with.
    in_flight: AtomicUsize,
    /// Bytes were read since the last request began (a body, or the start of another request).
    read_since_request: AtomicBool,
    /// The last bytes read did not end a request head.
    partial: AtomicBool,
    /// A request came with a body: hyper may still be reading or discarding it after the
    /// response, so this hyper connection is never parked.
    had_body: AtomicBool,
    /// Bytes were written and not yet flushed.
    unflushed: AtomicBool,
    /// The transport told hyper the client was done, to park the connection.
    parked: AtomicBool,
}

impl ConnState {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && !self.read_since_request.load(Ordering::Relaxed)
            && !self.partial.load(Ordering::Relaxed)
            && !self.had_body.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
    }
}

/// The socket as hyper sees it: reads and writes pass straight through; a read that would
/// wait on an idle connection, while many are open, ends the stream instead (see the module
/// documentation).
struct ParkingIo {
    stream: TcpStream,
    state: Arc<ConnState>,
    open: IntGauge,
    park_above: usize,
}

impl AsyncRead for ParkingIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.parked.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.state.read_since_request.store(true, Ordering::Relaxed);
                    this.state
                        .partial
                        .store(!read.ends_with(b"\r\n\r\n"), Ordering::Relaxed);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.open.get() > this.park_above as i64 && this.state.idle() => {
                this.state.parked.store(true, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for ParkingIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            this.state.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One request in flight on a connection, until its response body is done with.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(state: Arc<ConnState>, body: &Incoming) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        if !body.is_end_stream() {
            state.had_body.store(true, Ordering::Relaxed);
        }
        state.read_since_request.store(false, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The router as hyper calls it: the peer's address in the request (as `axum::serve` puts it),
/// and, on HTTP/1, the request counted in flight until its body is done.
#[derive(Clone)]
struct Service {
    router: Router,
    peer: ConnectInfo<SocketAddr>,
    state: Option<Arc<ConnState>>,
}

impl Service {
    fn new(router: Router, peer: SocketAddr, state: Option<Arc<ConnState>>) -> Self {
        Service {
            router,
            peer: ConnectInfo(peer),
            state,
        }
    }
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<hyper::Response<Tracked>, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for Service {
    type Response = hyper::Response<Tracked>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = self
            .state
            .clone()
            .map(|state| InFlight::begin(state, req.body()));
        req.extensions_mut().insert(self.peer);
        let answer = tower_service::Service::call(&mut self.router.clone(), req);
        Box::pin(async move {
            let Ok(response) = answer.await;
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request counted in flight until hyper drops it.
struct Tracked {
    body: axum::body::Body,
    _in_flight: Option<InFlight>,
}

impl Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
