//! The status page at `/ui/`: a small static front end embedded in the binary (no CDN, no
//! external font, works in an air-gapped network) and the JSON it reads under `/ui/api/`.
//! The shell and assets are open; the data needs `read` or `admin` when access control is on
//! (the page asks for a token and keeps it for the browser session). Actions (purge, pin,
//! refresh) go through the admin API and are offered only to visitors who may use it.

use super::{ApiError, AppState, Params};
use crate::inventory::{Inventory, Kind, Unit};
use crate::registry::Host;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use prometheus::core::Collector;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const ICON: &str = include_str!("ui/icon.svg");

/// Every page and asset: scripts, styles and data only from TerraPeak itself, nothing inline,
/// no frames, no forms posting anywhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How long a listing of the store serves the browse page while this process changed nothing
/// in it (other replicas' changes show within this time).
const INVENTORY_MEMO: Duration = Duration::from_secs(5);

/// Units a browse page returns at most.
const MAX_LIMIT: usize = 500;

/// The status page's own state.
pub struct Ui {
    started: Instant,
    started_at: u64,
    /// The last listing: when, at which count of the store's changes, and what it held.
    inventory: tokio::sync::Mutex<Option<(Instant, u64, Arc<Inventory>)>>,
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            started: Instant::now(),
            started_at: crate::storage::unix_now(),
            inventory: tokio::sync::Mutex::new(None),
        }
    }
}

impl Ui {
    /// The store's units: the last listing while this process has not written or deleted
    /// anything since and it is under [`INVENTORY_MEMO`] old, else a new one.
    async fn inventory(&self, state: &AppState) -> Result<Arc<Inventory>, ApiError> {
        let mut memo = self.inventory.lock().await;
        let changes = state.cache.storage().changes();
        if let Some((at, seen, inv)) = memo.as_ref()
            && *seen == changes
            && at.elapsed() < INVENTORY_MEMO
        {
            return Ok(inv.clone());
        }
        let inv = Arc::new(state.cache.inventory().await?);
        *memo = Some((Instant::now(), changes, inv.clone()));
        Ok(inv)
    }
}

/// The status page's routes; `admin_listener` tells whether they are served on `admin.addr`.
pub fn routes(admin_listener: bool) -> axum::Router<AppState> {
    axum::Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route("/ui/assets/{file}", get(assets))
        .route(
            "/ui/api/session",
            get(move |state: State<AppState>, headers: HeaderMap| {
                session(state, headers, admin_listener)
            }),
        )
        .route("/ui/api/overview", get(overview))
        .route("/ui/api/units", get(units))
        .route(
            "/ui/api/units/providers/{host}/{ns}/{ty}/{version}/{platform}",
            get(provider_unit),
        )
        .route(
            "/ui/api/units/modules/{host}/{ns}/{name}/{system}/{version}",
            get(module_unit),
        )
        .route("/ui/api/problems", get(problems))
}

/// The headers every status page answer carries.
fn secure(mut resp: Response, cache: &'static str) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secure(
        ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        "no-cache",
    )
}

async fn assets(p: Params) -> Result<Response, ApiError> {
    match p.get("file")? {
        "app.js" => Ok(asset("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(asset("text/css; charset=utf-8", APP_CSS)),
        "icon.svg" => Ok(asset("image/svg+xml", ICON)),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "no such asset")),
    }
}

fn data(v: Value) -> Response {
    secure(Json(v).into_response(), "no-store")
}

/// `GET /ui/api/session`: who the visitor is and whether the actions are theirs to use.
async fn session(
    State(state): State<AppState>,
    headers: HeaderMap,
    admin_listener: bool,
) -> Response {
    let (caller, admin) = match &state.auth {
        Some(auth) => match auth.identify(&headers) {
            Ok(c) => {
                let admin = auth.may_administer(&c).is_ok();
                (Some(c.name().to_string()), admin)
            }
            Err(_) => (None, false),
        },
        // Without access control the admin API is only on the admin listener.
        None => (None, admin_listener),
    };
    data(json!({
        "auth": state.auth.is_some(),
        "caller": caller,
        "admin": admin,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

fn ratio(hits: u64, misses: u64) -> Value {
    if hits + misses == 0 {
        Value::Null
    } else {
        json!(hits as f64 / (hits + misses) as f64)
    }
}

/// Label values of one series, by name.
fn labels(m: &prometheus::proto::Metric) -> BTreeMap<String, String> {
    m.get_label()
        .iter()
        .map(|l| (l.name().to_owned(), l.value().to_owned()))
        .collect()
}

/// Per configured upstream: requests and errors by kind and class, mean latency, circuit.
fn upstreams(state: &AppState) -> Vec<Value> {
    let m = &state.metrics;
    let mut rows: BTreeMap<String, Value> = state
        .cache
        .upstream_hosts()
        .iter()
        .map(|h| {
            (
                h.to_string(),
                json!({
                    "host": h.to_string(),
                    "default": h == state.cache.default_host(),
                    "requests": {},
                    "errors": {},
                    "errors_total": 0,
                    "requests_total": 0,
                    "latency_ms": {},
                    "circuit_open": false,
                }),
            )
        })
        .collect();
    for family in m.upstream_requests.collect() {
        for s in family.get_metric() {
            let l = labels(s);
            if let (Some(u), Some(k)) = (l.get("upstream"), l.get("kind"))
                && let Some(row) = rows.get_mut(u)
            {
                let n = s.get_counter().get_value() as u64;
                row["requests"][k] = n.into();
                row["requests_total"] = (row["requests_total"].as_u64().unwrap_or(0) + n).into();
            }
        }
    }
    for family in m.upstream_errors.collect() {
        for s in family.get_metric() {
            let l = labels(s);
            if let (Some(u), Some(c)) = (l.get("upstream"), l.get("class"))
                && let Some(row) = rows.get_mut(u)
            {
                let n = s.get_counter().get_value() as u64;
                let before = row["errors"][c].as_u64().unwrap_or(0);
                row["errors"][c] = (before + n).into();
                row["errors_total"] = (row["errors_total"].as_u64().unwrap_or(0) + n).into();
            }
        }
    }
    for family in m.upstream_duration.collect() {
        for s in family.get_metric() {
            let l = labels(s);
            let h = s.get_histogram();
            if let (Some(u), Some(k)) = (l.get("upstream"), l.get("kind"))
                && let Some(row) = rows.get_mut(u)
                && h.get_sample_count() > 0
            {
                row["latency_ms"][k] =
                    json!(h.get_sample_sum() * 1000.0 / h.get_sample_count() as f64);
            }
        }
    }
    for (host, row) in rows.iter_mut() {
        row["circuit_open"] = (m.upstream_circuit_open.with_label_values(&[host]).get() > 0).into();
    }
    rows.into_values().collect()
}

/// `GET /ui/api/overview`: how the cache does, the store, the upstreams, fills under way.
async fn overview(State(state): State<AppState>) -> Result<Response, ApiError> {
    let ui = state.ui.clone().ok_or_else(no_ui)?;
    let m = &state.metrics;
    let now = Instant::now();
    let c = m.status_counters();
    let window = |span: Duration| {
        m.history.window(now, c, span).map(|w| {
            json!({
                "seconds": w.seconds,
                "requests": w.counts.requests,
                "hits": w.counts.hits,
                "misses": w.counts.misses,
                "hit_ratio": ratio(w.counts.hits, w.counts.misses),
                "bytes_from_cache": w.counts.bytes_from_cache,
                "bytes_from_upstream": w.counts.bytes_from_upstream,
                "requests_per_second": if w.seconds > 0.0 {
                    json!(w.counts.requests as f64 / w.seconds)
                } else {
                    Value::Null
                },
            })
        })
    };
    let storage = state.cache.storage();
    let degraded: Vec<Value> = storage
        .degradations()
        .iter()
        .map(|d| {
            json!({
                "side": d.side.as_str(),
                "reason": d.reason.as_str(),
                "error": d.error,
            })
        })
        .collect();
    let ready = degraded.is_empty() && !state.draining.load(std::sync::atomic::Ordering::Relaxed);
    Ok(data(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": ui.started_at,
        "uptime_seconds": ui.started.elapsed().as_secs(),
        "since_start": {
            "requests": c.requests,
            "hits": c.hits,
            "misses": c.misses,
            "hit_ratio": ratio(c.hits, c.misses),
            "bytes_from_cache": c.bytes_from_cache,
            "bytes_from_upstream": c.bytes_from_upstream,
        },
        "last_hour": window(Duration::from_secs(3600)),
        "last_minute": window(Duration::from_secs(60)),
        "store": {
            "backend": storage.backend().as_str(),
            "ready": ready,
            "readable": storage.readable(),
            "writable": storage.can_keep_artifacts(),
            "degraded": degraded,
            "stored_bytes": m.cache_stored_bytes.get(),
            "objects": m.cache_objects.get(),
            "max_size": state.limits.max_size,
            "evict_unused_after_secs": state.limits.unused_after.map(|d| d.as_secs()),
            "offline": state.cache.sealed(),
        },
        "upstreams": upstreams(&state),
        "artifact_host_circuits_open": m.artifact_host_circuits_open.get(),
        "fills": state.cache.fills_in_progress(),
        "problems_total": m.problems.total(),
    })))
}

fn no_ui() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "the status page is off (ui.enabled)")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitsQuery {
    /// Words that must all appear in `host/name version platform`, in any case.
    q: Option<String>,
    kind: Option<String>,
    host: Option<String>,
    pinned: Option<bool>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `GET /ui/api/units`: stored units, searched, newest access first.
async fn units(
    State(state): State<AppState>,
    query: Result<Query<UnitsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let ui = state.ui.clone().ok_or_else(no_ui)?;
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    // The page's form sends an empty kind for "all".
    let kind = super::admin::parse_kind(q.kind.as_deref().filter(|k| !k.is_empty()))?;
    let limit = super::admin::parse_limit(q.limit, MAX_LIMIT)?;
    let words: Vec<String> =
        q.q.as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_lowercase)
            .collect();
    let inv = ui.inventory(&state).await?;
    let mut matching: Vec<&Unit> = inv
        .units
        .iter()
        .filter(|u| kind.is_none_or(|k| u.kind == k))
        .filter(|u| {
            q.host
                .as_deref()
                .filter(|h| !h.is_empty())
                .is_none_or(|h| u.host.eq_ignore_ascii_case(h))
        })
        .filter(|u| q.pinned.is_none_or(|p| u.pinned == p))
        .filter(|u| {
            let label = u.label().to_lowercase();
            words.iter().all(|w| label.contains(w.as_str()))
        })
        .collect();
    matching.sort_by(|a, b| {
        (&a.host, &a.name, a.kind)
            .cmp(&(&b.host, &b.name, b.kind))
            .then_with(|| version_order(&b.version, &a.version))
            .then_with(|| a.platform.cmp(&b.platform))
    });
    let hosts: std::collections::BTreeSet<&str> =
        inv.units.iter().map(|u| u.host.as_str()).collect();
    let offset = q.offset.unwrap_or(0);
    Ok(data(json!({
        "total": matching.len(),
        "offset": offset,
        "limit": limit,
        "hosts": hosts,
        "items": matching.iter().skip(offset).take(limit).collect::<Vec<_>>(),
    })))
}

/// Newer versions first where both parse; text order otherwise.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (
        crate::registry::Version::try_from(a),
        crate::registry::Version::try_from(b),
    ) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

async fn unit_detail(
    state: &AppState,
    find: impl Fn(&Unit) -> bool,
    what: String,
) -> Result<Response, ApiError> {
    let ui = state.ui.clone().ok_or_else(no_ui)?;
    let inv = ui.inventory(state).await?;
    let unit = inv
        .units
        .iter()
        .find(|u| find(u))
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("{what} is not stored")))?;
    Ok(data(state.cache.unit_record(&unit).await?))
}

/// `GET /ui/api/units/providers/{host}/{ns}/{type}/{version}/{os}_{arch}`
async fn provider_unit(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let host = Host::try_from(p.get("host")?)?.to_string();
    let name = super::providers::provider_name(&p)?.to_string();
    let version = crate::registry::Version::try_from(p.get("version")?)?.to_string();
    let platform = p.get("platform")?.to_owned();
    let what = format!("{host}/{name} {version} {platform}");
    unit_detail(
        &state,
        |u| {
            u.kind == Kind::Provider
                && u.host.eq_ignore_ascii_case(&host)
                && u.name == name
                && u.version == version
                && u.platform.as_deref() == Some(platform.as_str())
        },
        what,
    )
    .await
}

/// `GET /ui/api/units/modules/{host}/{ns}/{name}/{system}/{version}`
async fn module_unit(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let host = Host::try_from(p.get("host")?)?.to_string();
    let name = super::admin::module_address(&p)?.to_string();
    let version = crate::registry::Version::try_from(p.get("version")?)?.to_string();
    let what = format!("{host}/{name} {version}");
    unit_detail(
        &state,
        |u| {
            u.kind == Kind::Module
                && u.host.eq_ignore_ascii_case(&host)
                && u.name == name
                && u.version == version
        },
        what,
    )
    .await
}

/// `GET /ui/api/problems`: the latest upstream failures, refused verifications and sealed
/// misses, newest first, with what the client was told.
async fn problems(State(state): State<AppState>) -> Response {
    data(json!({
        "total": state.metrics.problems.total(),
        "items": state.metrics.problems.latest(100),
    }))
}
