//! The HTTP edge: routes, thin handlers, and the one mapping from errors to statuses.
//! Handlers extract typed parameters, make one call into the cache, and map the result.

mod access;
mod admin;
mod artifacts;
mod log;
#[doc(hidden)]
pub use log::typical_access_line;
mod mirror;
mod modules;
mod ops;
mod providers;
mod ui;
pub use ui::Ui;

use crate::cache::{Body, Cache, CacheError, RangeSpec, Served};
use crate::metrics::Metrics;
use crate::registry::{Host, NameError};
use crate::upstream::UpstreamError;
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What every handler can reach: one shared record, so the per-request clones axum makes of
/// the state are a single reference count.
#[derive(Clone)]
pub struct AppState(Arc<StateFields>);

impl AppState {
    pub fn new(fields: StateFields) -> AppState {
        AppState(Arc::new(fields))
    }
}

impl std::ops::Deref for AppState {
    type Target = StateFields;

    fn deref(&self) -> &StateFields {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct StateFields {
    pub cache: Arc<Cache>,
    /// `server.domain`, when configured.
    pub public_base: Option<String>,
    /// `https` when TerraPeak terminates TLS.
    pub scheme: &'static str,
    pub listen_addr: SocketAddr,
    /// `server.write_timeout`; zero disables it.
    pub write_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// `metrics.on_main_listener`.
    pub metrics_on_main: bool,
    /// Set once shutdown began: `/readyz` answers 503.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Access control (`auth:`), when configured.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// `storage.max_size` and `cache.evict_unused_after`, for the admin API's totals.
    pub limits: crate::inventory::Limits,
    /// The status page (`ui.enabled`).
    pub ui: Option<Arc<Ui>>,
}

impl AppState {
    /// How answers link to artifacts: the public base, and signed paths when auth is on.
    fn links(&self, headers: &HeaderMap) -> crate::cache::Links {
        let sign = self.auth.clone().map(|auth| -> crate::cache::PathSigner {
            Arc::new(move |path: &str| auth.signer().sign(path, crate::storage::unix_now()))
        });
        crate::cache::Links::new(&self.public_base(headers), sign)
    }

    /// The base URL written into rewritten links: `server.domain`, else the request's `Host`
    /// (validated), else the listen address.
    fn public_base(&self, headers: &HeaderMap) -> String {
        if let Some(base) = &self.public_base {
            return base.trim_end_matches('/').to_owned();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| Host::try_from(h).ok());
        match host {
            Some(h) => format!("{}://{}", self.scheme, h),
            None => format!("{}://{}", self.scheme, self.listen_addr),
        }
    }
}

/// Path parameters by name, so one handler serves both `/v1/...` (the default upstream) and
/// `/r/{host}/v1/...` (a named upstream).
pub struct Params(std::collections::HashMap<String, String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let axum::extract::Path(map) = axum::extract::Path::<
            std::collections::HashMap<String, String>,
        >::from_request_parts(parts, state)
        .await?;
        Ok(Params(map))
    }
}

impl Params {
    fn get(&self, name: &str) -> Result<&str, ApiError> {
        self.0
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("missing {name}")))
    }

    /// The `{host}` segment, or the default upstream when the route has none.
    fn host(&self, state: &AppState) -> Result<Host, ApiError> {
        match self.0.get("host") {
            Some(h) => Ok(Host::try_from(h.as_str())?),
            None => Ok(state.cache.default_host().clone()),
        }
    }
}

/// Longest request path accepted.
const MAX_PATH: usize = 1024;

/// Builds the application. Tests serve it on `127.0.0.1:0`.
/// What the access log of a listener needs.
fn log_context(state: &AppState) -> log::LogContext {
    log::LogContext {
        write_timeout: state.write_timeout,
        metrics: state.metrics.clone(),
        default_host: state.cache.default_host().as_str().into(),
    }
}

/// The access guard, with access control on. Made once per listener and never freed, so
/// requests share it by reference instead of each cloning (and counting) its parts.
fn guard(state: &AppState) -> Option<&'static access::Guard> {
    state.auth.as_ref().map(|auth| {
        &*Box::leak(Box::new(access::Guard {
            auth: auth.clone(),
            default_host: state.cache.default_host().as_str().into(),
            failures: state.metrics.auth_failures.clone(),
        }))
    })
}

pub fn router(state: AppState) -> Router {
    let logging = log_context(&state);
    let mut app = Router::new()
        .route("/.well-known/terraform.json", get(ops::discovery))
        .route("/v1/providers/{ns}/{ty}/versions", get(providers::versions))
        .route(
            "/v1/providers/{ns}/{ty}/{version}/download/{os}/{arch}",
            get(providers::download),
        )
        .route(
            "/artifacts/providers/{host}/{ns}/{ty}/{version}/{os}/{arch}/{file}",
            get(artifacts::provider),
        )
        .route(
            "/v1/modules/{ns}/{name}/{system}/versions",
            get(modules::versions),
        )
        .route(
            "/v1/modules/{ns}/{name}/{system}/{version}/download",
            get(modules::download),
        )
        .route(
            "/artifacts/modules/{host}/{ns}/{name}/{system}/{version}/{file}",
            get(artifacts::module),
        )
        .route(
            "/r/{host}/v1/providers/{ns}/{ty}/versions",
            get(providers::versions),
        )
        .route(
            "/r/{host}/v1/providers/{ns}/{ty}/{version}/download/{os}/{arch}",
            get(providers::download),
        )
        .route(
            "/r/{host}/v1/modules/{ns}/{name}/{system}/versions",
            get(modules::versions),
        )
        .route(
            "/r/{host}/v1/modules/{ns}/{name}/{system}/{version}/download",
            get(modules::download),
        )
        .route("/v1/mirror/{host}/{ns}/{ty}/{file}", get(mirror::document))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics));
    if state.ui.is_some() {
        app = app.merge(ui::routes(false));
    }
    let guard = guard(&state);
    if guard.is_some() {
        // With access control, the admin API is on the main listener too, for the admin scope.
        app = app.merge(admin::routes());
        // Artifact URLs that carry their own signature, for clients that send no token with
        // downloads; the guard checks every route but health and discovery.
        app = app
            .route(
                "/artifacts/s/{exp}/{sig}/providers/{host}/{ns}/{ty}/{version}/{os}/{arch}/{file}",
                get(artifacts::provider),
            )
            .route(
                "/artifacts/s/{exp}/{sig}/modules/{host}/{ns}/{name}/{system}/{version}/{file}",
                get(artifacts::module),
            );
    }
    finish(app, state, guard, logging)
}

/// The route annotation (with the access guard), the fallbacks and the access log around a
/// listener's routes.
fn finish(
    app: Router<AppState>,
    state: AppState,
    guard: Option<&'static access::Guard>,
    logging: log::LogContext,
) -> Router {
    // Made once per listener (a router is built once for each at start) and never freed, so
    // each request borrows it instead of cloning its reference-counted parts: a count shared
    // by every thread, touched per request, costs a cache-line transfer between cores.
    let logging: &'static log::LogContext = Box::leak(Box::new(logging));
    app.route_layer(axum::middleware::from_fn_with_state(
        guard,
        log::annotate_route,
    ))
    .fallback(ops::not_found)
    .method_not_allowed_fallback(ops::method_not_allowed)
    .with_state(state)
    .layer(axum::middleware::from_fn(move |req, next| {
        log::log_request(req, next, logging)
    }))
}

/// The separate admin listener (`admin.addr`): the admin API and the status page, behind the
/// access guard when access control is configured.
pub fn admin_router(state: AppState) -> Router {
    let (logging, guard) = (log_context(&state), guard(&state));
    let mut app = admin::routes();
    if state.ui.is_some() {
        app = app.merge(ui::routes(true));
    }
    finish(app, state, guard, logging)
}

/// The separate metrics listener: `/metrics` and nothing else.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { ops::render_metrics(&metrics) }
        }),
    )
}

/// An error on its way to the client as `{"errors":["..."]}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// For 416: the object's length, for `Content-Range: bytes */len`.
    unsatisfiable_len: Option<u64>,
    /// The class of problem, when this answer is one the status page lists.
    problem: Option<&'static str>,
}

/// An answer the status page lists among recent problems, on its way to the access log.
#[derive(Clone)]
pub(crate) struct ProblemNote {
    pub class: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            unsatisfiable_len: None,
            problem: None,
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        let problem = match &e {
            CacheError::Upstream(UpstreamError::Offline(_)) => Some("offline"),
            CacheError::Upstream(UpstreamError::NotFound(_)) | CacheError::NotFound(_) => None,
            CacheError::Upstream(_) => Some("upstream"),
            CacheError::Integrity(_) => Some("verification"),
            CacheError::Unavailable(_) => Some("unavailable"),
            CacheError::Internal(_) => Some("internal"),
            CacheError::Conflict(_) | CacheError::RangeNotSatisfiable(_) => None,
        };
        let status = match &e {
            CacheError::NotFound(_)
            | CacheError::Upstream(UpstreamError::NotFound(_) | UpstreamError::Offline(_)) => {
                StatusCode::NOT_FOUND
            }
            CacheError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            CacheError::Conflict(_) => StatusCode::CONFLICT,
            CacheError::Upstream(UpstreamError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            CacheError::Upstream(_) | CacheError::Integrity(_) => StatusCode::BAD_GATEWAY,
            CacheError::RangeNotSatisfiable(total) => {
                let mut err = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, e.to_string());
                err.unsatisfiable_len = Some(*total);
                return err;
            }
            CacheError::Internal(_) => {
                tracing::error!(error = %e, "request failed on TerraPeak's side");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut err = ApiError::new(status, e.to_string());
        err.problem = problem;
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let note = self.problem.map(|class| ProblemNote {
            class,
            message: self.message.clone(),
        });
        let body = serde_json::json!({ "errors": [self.message] });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(note) = note {
            resp.extensions_mut().insert(note);
        }
        if let Some(len) = self.unsatisfiable_len
            && let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}"))
        {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        resp
    }
}

/// Turns a cache answer into a response with `X-Cache-Status`, length, ETag and range headers.
fn respond(served: Served) -> Response {
    let status = if served.range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let body = match served.body {
        Body::Empty => axum::body::Body::empty(),
        Body::Bytes(b) => axum::body::Body::from(b),
        Body::Stream(s) => axum::body::Body::from_stream(s),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&served.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Some(len) = served.length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    h.insert(
        "x-cache-status",
        HeaderValue::from_static(served.status.as_str()),
    );
    if let Some(sha) = &served.sha256
        && let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\""))
    {
        h.insert(header::ETAG, v);
    }
    if let Some((start, end, total)) = served.range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// Parses a single-range `Range` header. Anything else (several ranges, other units, bad
/// syntax) is ignored, and the whole object is served, as RFC 9110 allows.
fn parse_range(headers: &HeaderMap) -> Option<RangeSpec> {
    let raw = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = raw.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse().ok().map(RangeSpec::Suffix);
    }
    let start = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        let end: u64 = b.parse().ok()?;
        if end < start {
            return None;
        }
        Some(end)
    };
    Some(RangeSpec::From { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Option<RangeSpec> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h)
    }

    #[test]
    fn single_ranges_parse_and_others_are_ignored() {
        assert_eq!(
            range("bytes=0-99"),
            Some(RangeSpec::From {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(
            range("bytes=100-"),
            Some(RangeSpec::From {
                start: 100,
                end: None
            })
        );
        assert_eq!(range("bytes=-5"), Some(RangeSpec::Suffix(5)));
        for ignored in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
        ] {
            assert_eq!(range(ignored), None, "{ignored}");
        }
    }
}
