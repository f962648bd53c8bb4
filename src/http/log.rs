//! One structured log line per request, written when the response body has ended (or was cut
//! off), with the bytes actually sent. Also: the request id, the path-length limit, and the
//! response write timeout.

use super::{ApiError, MAX_PATH};
use crate::metrics::Metrics;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const REQUEST_ID: &str = "x-request-id";

/// Bodies up to this size are written without a write-timeout timer (see [`log_request`]).
const SMALL_BODY: u64 = 4 << 10;

/// A client's request id is kept when it is short and printable; otherwise a new one is made.
fn request_id(req: &Request) -> HeaderValue {
    req.headers()
        .get(REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// A version-4-shaped UUID from a per-process random seed and a counter, mixed by splitmix64 (a
/// bijection, so ids never repeat within a process): unique and unpredictable enough for
/// correlating logs, without a system call per request.
fn new_request_id() -> HeaderValue {
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
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

/// What the access log and the request metrics need besides the request.
#[derive(Clone)]
pub struct LogContext {
    pub write_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// The upstream of routes without a `{host}` (registry mode).
    pub default_host: Arc<str>,
}

thread_local! {
    static HANDLES: std::cell::RefCell<Handles> = std::cell::RefCell::new(Handles::default());
}

/// The request metrics' handles, found once per thread for each metric and label set.
/// `with_label_values` hashes the labels and takes the vector's lock, and the handle it
/// returns is a reference count every thread shares; per request that is several cache lines
/// passed between cores. Labels are `'static` strings from fixed sets, keyed by where they are
/// (a label spelled at two places only takes two entries for one handle), with the address of
/// the vector, so listeners with metrics of their own (tests run several) never mix.
#[derive(Default)]
struct Handles {
    counters: std::collections::HashMap<(usize, LabelKeys), prometheus::IntCounter>,
    histograms: std::collections::HashMap<(usize, LabelKeys), prometheus::Histogram>,
}

/// Up to three `'static` labels by address and length.
type LabelKeys = [(usize, usize); 3];

fn label_keys(labels: &[&'static str]) -> LabelKeys {
    debug_assert!(
        labels.len() <= 3,
        "the request metrics have at most three labels"
    );
    let mut keys = [(0, 0); 3];
    for (k, l) in keys.iter_mut().zip(labels) {
        *k = (l.as_ptr() as usize, l.len());
    }
    keys
}

impl Handles {
    fn counter(
        &mut self,
        vec: &'static prometheus::IntCounterVec,
        labels: &[&'static str],
    ) -> &prometheus::IntCounter {
        handle(&mut self.counters, vec, labels)
    }

    fn histogram(
        &mut self,
        vec: &'static prometheus::HistogramVec,
        labels: &[&'static str],
    ) -> &prometheus::Histogram {
        handle(&mut self.histograms, vec, labels)
    }
}

/// The handle of `vec` for `labels` from `kept`, asked of the vector the first time only.
fn handle<'a, B: prometheus::core::MetricVecBuilder>(
    kept: &'a mut std::collections::HashMap<(usize, LabelKeys), B::M>,
    vec: &'static prometheus::core::MetricVec<B>,
    labels: &[&'static str],
) -> &'a B::M {
    let key = (std::ptr::from_ref(vec) as usize, label_keys(labels));
    kept.entry(key)
        .or_insert_with(|| vec.with_label_values(labels))
}

/// The matched route, learned after routing (see [`annotate_route`]).
#[derive(Clone)]
struct RouteInfo {
    /// The route's metric label (see [`route_label`]).
    template: &'static str,
    /// What kind of cached object the route serves, for the cache metrics.
    kind: Option<&'static str>,
    /// The `{host}` segment, when the route has one.
    host: Option<Arc<str>>,
    /// With access control on: the token's name, `anonymous`, or `unknown`.
    caller: Option<Cow<'static, str>>,
}

/// `/v1/providers/{ns}/{ty}/versions` as the label `/v1/providers/:ns/:ty/versions` (braces in
/// label values trip some scrapers), made once per route: the router's templates are a fixed set,
/// so each label is made once for the process. Each thread keeps its own lookup, so the hit path
/// takes no lock and touches no counter shared between threads.
fn route_label(template: &str) -> &'static str {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static LABELS: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    thread_local! {
        static SEEN: RefCell<HashMap<String, &'static str>> = RefCell::new(HashMap::new());
    }
    if let Some(label) = SEEN.with_borrow(|seen| seen.get(template).copied()) {
        return label;
    }
    let label = *LABELS
        .get_or_init(Default::default)
        .lock()
        .expect("labels lock")
        .entry(template.to_owned())
        .or_insert_with(|| Box::leak(template.replace('{', ":").replace('}', "").into_boxed_str()));
    SEEN.with_borrow_mut(|seen| seen.insert(template.to_owned(), label));
    label
}

/// One path parameter of the matched route. Parameters that are not valid UTF-8 are the
/// handler's to reject.
pub(super) fn path_param<'a>(
    params: &'a Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    name: &str,
) -> Option<&'a str> {
    params
        .as_ref()
        .ok()
        .and_then(|p| p.iter().find(|(k, _)| *k == name).map(|(_, v)| v))
}

/// Runs after routing: records the route template, the kind of object, the upstream host and
/// (with access control on) the caller on the response, for [`log_request`]; with access
/// control on, it refuses what the caller may not have (see [`super::access`]).
pub async fn annotate_route(
    State(guard): State<Option<&'static super::access::Guard>>,
    matched: MatchedPath,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let template = matched.as_str();
    let param = |name: &str| path_param(&params, name);
    let mut info = RouteInfo {
        kind: cache_kind(template, param("file")),
        host: param("host").map(Arc::from),
        template: route_label(template),
        caller: None,
    };
    if let Some(g) = guard {
        match super::access::check(g, template, &params, &req) {
            Ok(caller) => info.caller = caller,
            Err((refusal, caller)) => {
                info.caller = Some(caller);
                let mut refused = super::access::refuse(&refusal);
                refused.extensions_mut().insert(info);
                return refused;
            }
        }
    }
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(info);
    resp
}

/// The kind of cached object a route serves (a fixed set of label values), from the route's
/// template as axum writes it (`{param}`).
fn cache_kind(template: &str, file: Option<&str>) -> Option<&'static str> {
    // Signed artifact routes are the unsigned ones behind `/s/{exp}/{sig}`.
    let template = match template.strip_prefix("/artifacts/s/{exp}/{sig}") {
        Some(rest) => return cache_kind(&format!("/artifacts{rest}"), file),
        None => template,
    };
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

pub async fn log_request(req: Request, next: Next, ctx: &'static LogContext) -> Response {
    let write_timeout = ctx.write_timeout;
    let start = Instant::now();
    let id = request_id(&req);
    let entry = Entry {
        method: req.method().clone(),
        uri: req.uri().clone(),
        user_agent: req.headers().get(header::USER_AGENT).cloned(),
        remote: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0),
        id: id.clone(),
        start,
        status: 0,
        cache: None,
        bytes: 0,
        expected: None,
        complete: false,
        route: None,
        upstream: None,
        caller: None,
        ctx,
    };
    let mut resp = if req.uri().path().len() > MAX_PATH {
        ApiError::new(StatusCode::URI_TOO_LONG, "request path is too long").into_response()
    } else if req.version() == axum::http::Version::HTTP_11
        && req.headers().get_all(header::HOST).iter().count() != 1
    {
        // RFC 9112 section 3.2: exactly one Host header, or 400.
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request needs exactly one Host header",
        )
        .into_response()
    } else {
        next.run(req).await
    };
    resp.headers_mut().insert(REQUEST_ID, id);
    let mut entry = entry;
    entry.status = resp.status().as_u16();
    entry.cache = resp.headers().get("x-cache-status").cloned();
    if let Some(mut info) = resp.extensions_mut().remove::<RouteInfo>() {
        entry.caller = info.caller.take();
        if info.kind.is_some() {
            entry.upstream = Some(match info.host.take() {
                Some(host) => UpstreamName::Named(host),
                None => UpstreamName::Default(&entry.ctx.default_host),
            });
        }
        entry.route = Some(info);
    }
    if let Some(note) = resp.extensions_mut().remove::<super::ProblemNote>() {
        entry.ctx.metrics.problems.record(crate::status::Problem {
            at: crate::storage::unix_now(),
            class: note.class,
            status: Some(entry.status),
            path: entry.uri.path().to_owned(),
            upstream: entry.upstream.as_ref().map(|u| u.as_str().to_owned()),
            message: note.message,
        });
    }
    entry.expected = resp
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (parts, body) = resp.into_parts();
    // A body this small goes into the socket's send buffer at once (the kernel never shrinks it
    // below about 4.5 KiB), so it cannot stall: no timer for it (most answers are this small).
    let fits_send_buffer = http_body::Body::size_hint(&body)
        .exact()
        .is_some_and(|n| n <= SMALL_BODY);
    let deadline = (!write_timeout.is_zero() && !fits_send_buffer)
        .then(|| Box::pin(tokio::time::sleep(write_timeout)));
    Response::from_parts(
        parts,
        Body::new(LoggedBody {
            inner: body,
            entry: Some(entry),
            deadline,
        }),
    )
}

/// The upstream a request's route belongs to: the route's `{host}`, or the default upstream
/// (borrowed from the listener's [`LogContext`], which lives as long as the process).
enum UpstreamName {
    Named(Arc<str>),
    Default(&'static str),
}

impl UpstreamName {
    fn as_str(&self) -> &str {
        match self {
            UpstreamName::Named(host) => host,
            UpstreamName::Default(host) => host,
        }
    }
}

struct Entry {
    method: Method,
    uri: Uri,
    user_agent: Option<HeaderValue>,
    remote: Option<SocketAddr>,
    id: HeaderValue,
    start: Instant,
    status: u16,
    cache: Option<HeaderValue>,
    bytes: u64,
    /// The announced Content-Length, if any.
    expected: Option<u64>,
    complete: bool,
    route: Option<RouteInfo>,
    /// The upstream registry a cacheable route belongs to.
    upstream: Option<UpstreamName>,
    /// With access control on: the token's name, or `anonymous`.
    caller: Option<Cow<'static, str>>,
    /// Made once per listener and never freed (see [`super::finish`]): no reference count
    /// shared between threads is touched per request.
    ctx: &'static LogContext,
}

/// The first `max` characters of `s`.
fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// One access-log line's values, borrowed from the [`Entry`].
struct Line<'a> {
    warn: bool,
    message: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: u64,
    elapsed: &'a str,
    elapsed_ms: f64,
    remote_addr: &'a str,
    user_agent: &'a str,
    terraform_version: Option<&'a str>,
    upstream: Option<&'a str>,
    cache_status: Option<&'a str>,
    caller: Option<&'a str>,
    request_id: &'a str,
    complete: bool,
}

impl Line<'_> {
    /// Through `tracing` (text format, tests, and whenever no JSON sink is set).
    fn to_tracing(&self) {
        let Line {
            message,
            method,
            path,
            status,
            bytes,
            elapsed,
            elapsed_ms,
            remote_addr,
            user_agent,
            terraform_version,
            upstream,
            cache_status,
            caller,
            request_id,
            complete,
            ..
        } = *self;
        if self.warn {
            tracing::warn!(target: ACCESS_TARGET, method, path, status, bytes, elapsed, elapsed_ms, remote_addr, user_agent, terraform_version, upstream, cache_status, caller, request_id, complete, "{message}");
        } else {
            tracing::info!(target: ACCESS_TARGET, method, path, status, bytes, elapsed, elapsed_ms, remote_addr, user_agent, terraform_version, upstream, cache_status, caller, request_id, "{message}");
        }
    }

    /// The same line as `tracing`'s JSON format writes it (flattened fields), into `out`.
    fn write_json(&self, now: std::time::SystemTime, out: &mut Vec<u8>) {
        use std::io::Write;
        let string = |out: &mut Vec<u8>, s: &str| {
            serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
        };
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_rfc3339_micros(now, out);
        out.extend_from_slice(if self.warn {
            b"\",\"level\":\"WARN\",\"message\":"
        } else {
            b"\",\"level\":\"INFO\",\"message\":"
        });
        string(out, self.message);
        out.extend_from_slice(b",\"method\":");
        string(out, self.method);
        out.extend_from_slice(b",\"path\":");
        string(out, self.path);
        let _ = write!(
            out,
            ",\"status\":{},\"bytes\":{},\"elapsed\":",
            self.status, self.bytes
        );
        string(out, self.elapsed);
        out.extend_from_slice(b",\"elapsed_ms\":");
        serde_json::to_writer(&mut *out, &self.elapsed_ms).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"remote_addr\":");
        string(out, self.remote_addr);
        out.extend_from_slice(b",\"user_agent\":");
        string(out, self.user_agent);
        for (name, value) in [
            (&b",\"terraform_version\":"[..], self.terraform_version),
            (b",\"upstream\":", self.upstream),
            (b",\"cache_status\":", self.cache_status),
            (b",\"caller\":", self.caller),
        ] {
            if let Some(v) = value {
                out.extend_from_slice(name);
                string(out, v);
            }
        }
        out.extend_from_slice(b",\"request_id\":");
        string(out, self.request_id);
        if self.warn {
            let _ = write!(out, ",\"complete\":{}", self.complete);
        }
        out.extend_from_slice(b",\"target\":\"terrapeak::access\"}\n");
    }
}

const ACCESS_TARGET: &str = "terrapeak::access";

/// Writes the access-log line of a typical request (a cached version list sent to Terraform)
/// into `out`, as every request's line is written; for the criterion benchmarks.
#[doc(hidden)]
pub fn typical_access_line(out: &mut Vec<u8>) {
    Line {
        warn: false,
        message: "HTTP GET /v1/providers/hashicorp/aws/versions - 200 (OK) - 343 bytes in 6.05\u{b5}s",
        method: "GET",
        path: "/v1/providers/hashicorp/aws/versions",
        status: 200,
        bytes: 343,
        elapsed: "6.05\u{b5}s",
        elapsed_ms: 0.00605,
        remote_addr: "10.1.2.3:47826",
        user_agent: "Terraform/1.11.4 (+https://www.terraform.io)",
        terraform_version: Some("1.11.4"),
        upstream: Some("registry.terraform.io"),
        cache_status: Some("HIT"),
        caller: None,
        request_id: "d8af5a79-ba18-42af-823f-87fbc49e0f18",
        complete: true,
    }
    .write_json(std::time::SystemTime::now(), out);
}

/// `2026-11-26T22:39:31.492671Z`, as `tracing-subscriber` writes its timestamps.
fn write_rfc3339_micros(t: std::time::SystemTime, out: &mut Vec<u8>) {
    // `2026-11-26T22:39:31.` changes once a second: made once per second per thread.
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        prefix = second_prefix(secs);
        SECOND.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    let mut micros = since.subsec_micros();
    let mut digits = [b'0'; 7];
    for d in digits[..6].iter_mut().rev() {
        *d = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    digits[6] = b'Z';
    out.extend_from_slice(&digits);
}

/// `2026-11-26T22:39:31.` for `secs` since the epoch.
fn second_prefix(secs: u64) -> [u8; 20] {
    use std::io::Write;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    // Years past 9999 do not fit; they are written as 9999.
    let year = (yoe + era * 400 + i64::from(month <= 2)).min(9999);
    let mut prefix = [0u8; 20];
    let _ = write!(
        &mut prefix[..],
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
    );
    prefix
}

impl Entry {
    /// Counts the request in the metrics. Labels come from fixed sets only: the route template
    /// (or `unmatched`), the method (or `other`), the status class, the kind and the result.
    fn count(&self, elapsed: Duration) {
        let route = self.route.as_ref().map_or("unmatched", |r| r.template);
        let method = match self.method.as_str() {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "POST" => "POST",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            "OPTIONS" => "OPTIONS",
            "PATCH" => "PATCH",
            _ => "other",
        };
        let class = match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let result = match self.cache.as_ref().map(HeaderValue::as_bytes) {
            Some(b"HIT") => Some("hit"),
            Some(b"MISS") => Some("miss"),
            Some(b"STALE") => Some("stale"),
            Some(b"PASS") => Some("pass"),
            _ => None,
        };
        let source = match result {
            Some("hit" | "stale") => "cache",
            Some(_) => "upstream",
            None => "none",
        };
        let kind = self.route.as_ref().and_then(|r| r.kind);
        let m: &'static Metrics = &self.ctx.metrics;
        HANDLES.with_borrow_mut(|h| {
            h.counter(&m.http_requests, &[route, method, class]).inc();
            h.histogram(&m.http_duration, &[route])
                .observe(elapsed.as_secs_f64());
            if let (Some(kind), Some(result)) = (kind, result) {
                h.counter(&m.cache_results, &[kind, result]).inc();
            }
            h.counter(&m.sent_bytes, &[source]).inc_by(self.bytes);
        });
    }

    fn emit(self) {
        let elapsed = self.start.elapsed();
        self.count(elapsed);
        let warn = self.status >= 500 || !self.complete;
        let enabled = if warn {
            tracing::enabled!(target: ACCESS_TARGET, tracing::Level::WARN)
        } else {
            tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
        };
        if !enabled {
            return;
        }
        let user_agent = clip(
            self.user_agent
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            256,
        );
        let path = clip(self.uri.path(), MAX_PATH);
        let reason = StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let outcome = if self.complete { "" } else { " (aborted)" };
        // The message, the elapsed time (part of the message) and the client address, written
        // into one reused buffer; the JSON line into another.
        thread_local! {
            static SCRATCH: std::cell::RefCell<(String, Vec<u8>)> =
                std::cell::RefCell::new((String::with_capacity(256), Vec::with_capacity(1024)));
        }
        SCRATCH.with_borrow_mut(|(text, out)| {
            use std::fmt::Write;
            text.clear();
            let _ = write!(
                text,
                "HTTP {} {path} - {} ({reason}) - {} bytes in ",
                self.method, self.status, self.bytes
            );
            let elapsed_at = text.len();
            let _ = write!(text, "{elapsed:.2?}");
            let elapsed_end = text.len();
            text.push_str(outcome);
            let message_end = text.len();
            if let Some(addr) = self.remote {
                let _ = write!(text, "{addr}");
            }
            let line = Line {
                warn,
                message: &text[..message_end],
                method: self.method.as_str(),
                path,
                status: self.status,
                bytes: self.bytes,
                elapsed: &text[elapsed_at..elapsed_end],
                elapsed_ms: elapsed.as_secs_f64() * 1000.0,
                remote_addr: &text[message_end..],
                user_agent,
                terraform_version: terraform_version(user_agent),
                upstream: self.upstream.as_ref().map(UpstreamName::as_str),
                cache_status: self
                    .cache
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty()),
                caller: self.caller.as_deref(),
                request_id: self.id.to_str().unwrap_or(""),
                complete: self.complete,
            };
            match crate::log_writer::json_access_sink() {
                Some(sink) => {
                    out.clear();
                    line.write_json(std::time::SystemTime::now(), out);
                    sink.append(out);
                }
                None => line.to_tracing(),
            }
        });
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
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| new_request_id().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4);
        }
    }

    fn sample(warn: bool) -> Line<'static> {
        Line {
            warn,
            message: "HTTP GET /v1/providers/a/b/versions - 200 (OK) - 343 bytes in 6.05\u{b5}s",
            method: "GET",
            path: "/v1/providers/a/\"b\\/versions",
            status: if warn { 502 } else { 200 },
            bytes: 343,
            elapsed: "6.05\u{b5}s",
            elapsed_ms: 0.0056890000000000005,
            remote_addr: "127.0.0.1:47826",
            user_agent: "Terraform/1.11.4 (+https://www.terraform.io)",
            terraform_version: Some("1.11.4"),
            upstream: if warn {
                None
            } else {
                Some("registry.terraform.io")
            },
            cache_status: Some("HIT"),
            caller: if warn { Some("ci-fleet") } else { None },
            request_id: "d8af5a79-ba18-42af-823f-87fbc49e0f18",
            complete: !warn,
        }
    }

    /// What `tracing`'s JSON format (as the binary sets it up) writes for `line`.
    fn through_tracing(line: &Line) -> serde_json::Value {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || line.to_tracing());
        let bytes = buf.0.lock().unwrap().clone();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn json_access_lines_match_what_tracing_writes() {
        for warn in [false, true] {
            let line = sample(warn);
            let mut ours = Vec::new();
            line.write_json(std::time::SystemTime::now(), &mut ours);
            assert_eq!(ours.last(), Some(&b'\n'));
            assert_eq!(ours.iter().filter(|b| **b == b'\n').count(), 1);
            let mut ours: serde_json::Value = serde_json::from_slice(&ours).unwrap();
            let mut theirs = through_tracing(&line);
            for v in [&mut ours, &mut theirs] {
                let ts = v.as_object_mut().unwrap().remove("timestamp").unwrap();
                assert_eq!(
                    ts.as_str().unwrap().len(),
                    "2026-11-26T22:39:31.492671Z".len()
                );
            }
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut out = Vec::new();
            write_rfc3339_micros(
                std::time::UNIX_EPOCH + Duration::new(secs, micros * 1000),
                &mut out,
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_732_771, 492_671), "2026-11-26T22:39:31.492671Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        // The per-second prefix is remade when the second changes.
        assert_eq!(at(4_107_542_399, 5), "2100-02-28T23:59:59.000005Z");
        assert_eq!(at(4_107_542_400, 5), "2100-03-01T00:00:00.000005Z");
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
