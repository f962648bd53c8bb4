//! One structured log line per request, written when the response body has ended (or was cut
//! off), with the bytes actually sent. Also: the request id, the path-length limit, and the
//! response write timeout.

use super::{ApiError, MAX_PATH};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const REQUEST_ID: &str = "x-request-id";

/// A client's request id is kept when it is short and printable; otherwise a new one is made.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

pub async fn log_request(req: Request, next: Next, write_timeout: Duration) -> Response {
    let start = Instant::now();
    let id = request_id(&req);
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let entry = Entry {
        method: req.method().to_string(),
        path: req.uri().path().chars().take(MAX_PATH).collect(),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(256)
            .collect(),
        remote,
        id: id.clone(),
        start,
        status: 0,
        cache: String::new(),
        bytes: 0,
        expected: None,
        complete: false,
    };
    let mut resp = if req.uri().path().len() > MAX_PATH {
        ApiError::new(StatusCode::URI_TOO_LONG, "request path is too long").into_response()
    } else {
        next.run(req).await
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let mut entry = entry;
    entry.status = resp.status().as_u16();
    entry.cache = resp
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    entry.expected = resp
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (parts, body) = resp.into_parts();
    let deadline = (!write_timeout.is_zero()).then(|| Box::pin(tokio::time::sleep(write_timeout)));
    Response::from_parts(
        parts,
        Body::new(LoggedBody {
            inner: body,
            entry: Some(entry),
            deadline,
        }),
    )
}

struct Entry {
    method: String,
    path: String,
    user_agent: String,
    remote: String,
    id: String,
    start: Instant,
    status: u16,
    cache: String,
    bytes: u64,
    /// The announced Content-Length, if any.
    expected: Option<u64>,
    complete: bool,
}

impl Entry {
    fn emit(self) {
        let elapsed = self.start.elapsed();
        let reason = StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let outcome = if self.complete { "" } else { " (aborted)" };
        let message = format!(
            "HTTP {} {} - {} ({reason}) - {} bytes in {elapsed:.2?}{outcome}",
            self.method, self.path, self.status, self.bytes
        );
        let elapsed_str = format!("{elapsed:.2?}");
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        let cache = (!self.cache.is_empty()).then_some(self.cache.as_str());
        if self.status >= 500 || !self.complete {
            tracing::warn!(target: "terrapeak::access", method = %self.method, path = %self.path, status = self.status, bytes = self.bytes, elapsed = %elapsed_str, elapsed_ms, remote_addr = %self.remote, user_agent = %self.user_agent, cache_status = cache, request_id = %self.id, complete = self.complete, "{message}");
        } else {
            tracing::info!(target: "terrapeak::access", method = %self.method, path = %self.path, status = self.status, bytes = self.bytes, elapsed = %elapsed_str, elapsed_ms, remote_addr = %self.remote, user_agent = %self.user_agent, cache_status = cache, request_id = %self.id, "{message}");
        }
    }
}

/// Counts the bytes that go out, enforces the write timeout, and logs when done or dropped.
struct LoggedBody {
    inner: Body,
    entry: Option<Entry>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            return Poll::Ready(Some(Err(axum::Error::new("response write timeout"))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(entry)) = (frame.data_ref(), self.entry.as_mut()) {
                    entry.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(mut entry) = self.entry.take() {
                    entry.complete = true;
                    entry.emit();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            // Bodies hyper never polls to the end: HEAD answers, empty bodies, bodies whose
            // announced length went out in full (hyper stops there), and cut-off clients.
            entry.complete = entry.method == "HEAD"
                || http_body::Body::is_end_stream(&self.inner)
                || entry.expected == Some(entry.bytes);
            entry.emit();
        }
    }
}
