//! One structured log line per request, written when the response body has ended (or was cut
//! off), with the bytes actually sent. Also: the request id, the path-length limit, and the
//! response write timeout.

use super::{ApiError, MAX_PATH};
use crate::metrics::Metrics;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
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
        .unwrap_or_else(new_request_id)
}

/// A version-4-shaped UUID from a per-process random seed and a counter, mixed by splitmix64 (a
/// bijection, so ids never repeat within a process): unique and unpredictable enough for
/// correlating logs, without a system call per request.
fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let hi = mix(seed ^ n);
    let lo = mix(hi ^ seed.rotate_left(32));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hi.to_be_bytes());
    bytes[8..].copy_from_slice(&lo.to_be_bytes());
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// What the access log and the request metrics need besides the request.
#[derive(Clone)]
pub struct LogContext {
    pub write_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// The upstream of routes without a `{host}` (registry mode).
    pub default_host: Arc<str>,
}

/// The matched route, learned after routing (see [`annotate_route`]).
#[derive(Clone)]
struct RouteInfo {
    /// The route's metric label (see [`route_label`]).
    template: Arc<str>,
    /// What kind of cached object the route serves, for the cache metrics.
    kind: Option<&'static str>,
    /// The `{host}` segment, when the route has one.
    host: Option<Arc<str>>,
}

/// `/v1/providers/{ns}/{ty}/versions` as the label `/v1/providers/:ns/:ty/versions` (braces in
/// label values trip some scrapers), made once per route: the router's templates are a fixed set.
fn route_label(template: &str) -> Arc<str> {
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};
    static LABELS: OnceLock<RwLock<HashMap<String, Arc<str>>>> = OnceLock::new();
    let labels = LABELS.get_or_init(Default::default);
    if let Some(label) = labels.read().expect("labels lock").get(template) {
        return label.clone();
    }
    let label: Arc<str> = template.replace('{', ":").replace('}', "").into();
    labels
        .write()
        .expect("labels lock")
        .insert(template.to_owned(), label.clone());
    label
}

/// Runs after routing: records the route template, the kind of object and the upstream host on
/// the response, for [`log_request`].
pub async fn annotate_route(
    matched: MatchedPath,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let template = matched.as_str();
    // Parameters that are not valid UTF-8 are the handler's to reject.
    let param = |name: &str| {
        params.as_ref().ok().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        })
    };
    let info = RouteInfo {
        kind: cache_kind(template, param("file").as_deref()),
        host: param("host").map(Arc::from),
        template: route_label(template),
    };
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(info);
    resp
}

/// The kind of cached object a route serves (a fixed set of label values), from the route's
/// template as axum writes it (`{param}`).
fn cache_kind(template: &str, file: Option<&str>) -> Option<&'static str> {
    if template.starts_with("/v1/mirror/") {
        Some("mirror_json")
    } else if template.starts_with("/artifacts/providers/") {
        let file = file.unwrap_or_default();
        Some(if file.ends_with(".zip") {
            "provider_zip"
        } else if file.ends_with(".sig") {
            "signature"
        } else {
            "sums"
        })
    } else if template.starts_with("/artifacts/modules/") {
        Some("module_archive")
    } else if template.ends_with("/versions") {
        Some("version_list")
    } else if template.ends_with("/download/{os}/{arch}") || template.ends_with("/download") {
        Some("download_json")
    } else {
        None
    }
}

/// `Terraform/1.11.4 (+https://www.terraform.io)` → `1.11.4`; OpenTofu's `OpenTofu/1.8.0` too.
fn terraform_version(user_agent: &str) -> Option<&str> {
    let product = user_agent.split_whitespace().next()?;
    let (name, version) = product.split_once('/')?;
    (name.eq_ignore_ascii_case("terraform") || name.eq_ignore_ascii_case("opentofu"))
        .then_some(version)
        .filter(|v| v.len() <= 32)
}

pub async fn log_request(req: Request, next: Next, ctx: LogContext) -> Response {
    let write_timeout = ctx.write_timeout;
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
        route: None,
        upstream: None,
        ctx,
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
    if let Some(info) = resp.extensions_mut().remove::<RouteInfo>() {
        if info.kind.is_some() {
            entry.upstream = Some(
                info.host
                    .clone()
                    .unwrap_or_else(|| entry.ctx.default_host.clone()),
            );
        }
        entry.route = Some(info);
    }
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
    route: Option<RouteInfo>,
    /// The upstream registry a cacheable route belongs to.
    upstream: Option<Arc<str>>,
    ctx: LogContext,
}

impl Entry {
    /// Counts the request in the metrics. Labels come from fixed sets only: the route template
    /// (or `unmatched`), the method (or `other`), the status class, the kind and the result.
    fn count(&self, elapsed: Duration) {
        let m = &self.ctx.metrics;
        let route = self.route.as_ref().map_or("unmatched", |r| &*r.template);
        let method = match self.method.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "OPTIONS" | "PATCH" => {
                self.method.as_str()
            }
            _ => "other",
        };
        let class = match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        m.http_requests
            .with_label_values(&[route, method, class])
            .inc();
        m.http_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        let result = match self.cache.as_str() {
            "HIT" => Some("hit"),
            "MISS" => Some("miss"),
            "STALE" => Some("stale"),
            "PASS" => Some("pass"),
            _ => None,
        };
        if let (Some(kind), Some(result)) = (self.route.as_ref().and_then(|r| r.kind), result) {
            m.cache_results.with_label_values(&[kind, result]).inc();
        }
        let source = match result {
            Some("hit" | "stale") => "cache",
            Some(_) => "upstream",
            None => "none",
        };
        m.sent_bytes.with_label_values(&[source]).inc_by(self.bytes);
    }

    fn emit(self) {
        let elapsed = self.start.elapsed();
        self.count(elapsed);
        let terraform_version = terraform_version(&self.user_agent);
        let upstream = self.upstream.as_deref();
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
            tracing::warn!(target: "terrapeak::access", method = %self.method, path = %self.path, status = self.status, bytes = self.bytes, elapsed = %elapsed_str, elapsed_ms, remote_addr = %self.remote, user_agent = %self.user_agent, terraform_version, upstream, cache_status = cache, request_id = %self.id, complete = self.complete, "{message}");
        } else {
            tracing::info!(target: "terrapeak::access", method = %self.method, path = %self.path, status = self.status, bytes = self.bytes, elapsed = %elapsed_str, elapsed_ms, remote_addr = %self.remote, user_agent = %self.user_agent, terraform_version, upstream, cache_status = cache, request_id = %self.id, "{message}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_v4_uuids() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4);
        }
    }

    #[test]
    fn terraform_and_opentofu_versions_come_from_the_user_agent() {
        assert_eq!(
            terraform_version("Terraform/1.11.4 (+https://www.terraform.io)"),
            Some("1.11.4")
        );
        assert_eq!(terraform_version("OpenTofu/1.8.0"), Some("1.8.0"));
        assert_eq!(terraform_version("curl/8.0"), None);
        assert_eq!(terraform_version(""), None);
    }

    #[test]
    fn kinds_come_from_the_route_and_the_file_name() {
        let art = "/artifacts/providers/{host}/{ns}/{ty}/{version}/{os}/{arch}/{file}";
        assert_eq!(
            cache_kind(art, Some("x_1.0.0_linux_amd64.zip")),
            Some("provider_zip")
        );
        assert_eq!(cache_kind(art, Some("x_1.0.0_SHA256SUMS")), Some("sums"));
        assert_eq!(
            cache_kind(art, Some("x_1.0.0_SHA256SUMS.sig")),
            Some("signature")
        );
        assert_eq!(
            cache_kind("/r/{host}/v1/providers/{ns}/{ty}/versions", None),
            Some("version_list")
        );
        assert_eq!(
            cache_kind("/v1/modules/{ns}/{name}/{system}/{version}/download", None),
            Some("download_json")
        );
        assert_eq!(
            cache_kind("/v1/mirror/{host}/{ns}/{ty}/{file}", Some("index.json")),
            Some("mirror_json")
        );
        assert_eq!(cache_kind("/healthz", None), None);
    }
}
