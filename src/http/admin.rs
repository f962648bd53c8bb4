//! The admin API under `/admin/v1/`: the inventory, totals, purging, pins and version-list
//! refreshes, described by the OpenAPI 3.1 document at `/admin/v1/openapi.json`. With access
//! control it needs the `admin` scope (the guard checks it); without, it is served only on the
//! separate `admin.addr` listener.

use super::{ApiError, AppState, Params};
use crate::cache::{ModuleRelease, ProviderRelease, Purge, keys};
use crate::inventory::{Kind, Unit};
use crate::registry::{Host, ModuleAddress, Platform, ProviderName};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

/// The OpenAPI 3.1 document of this API.
const OPENAPI: &str = include_str!("admin-openapi.json");

/// Inventory pages hold at most this many units.
const MAX_LIMIT: usize = 1000;

/// The admin routes, for the main listener (with access control) and the admin listener.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/admin/v1/openapi.json", get(openapi))
        .route("/admin/v1/inventory", get(inventory))
        .route("/admin/v1/stats", get(stats))
        .route(
            "/admin/v1/providers/{host}/{ns}/{ty}",
            delete(purge_provider),
        )
        .route(
            "/admin/v1/providers/{host}/{ns}/{ty}/{version}",
            delete(purge_provider),
        )
        .route(
            "/admin/v1/providers/{host}/{ns}/{ty}/{version}/{os}/{arch}",
            delete(purge_provider),
        )
        .route(
            "/admin/v1/modules/{host}/{ns}/{name}/{system}/{version}",
            delete(purge_module),
        )
        .route(
            "/admin/v1/pins/providers/{host}/{ns}/{ty}/{version}/{os}/{arch}",
            put(pin_provider).delete(unpin_provider),
        )
        .route(
            "/admin/v1/pins/modules/{host}/{ns}/{name}/{system}/{version}",
            put(pin_module).delete(unpin_module),
        )
        .route(
            "/admin/v1/refresh/providers/{host}/{ns}/{ty}",
            post(refresh_provider),
        )
        .route(
            "/admin/v1/refresh/modules/{host}/{ns}/{name}/{system}",
            post(refresh_module),
        )
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryQuery {
    kind: Option<String>,
    host: Option<String>,
    /// `namespace/type` or `namespace/name/system`, or a prefix of it.
    name: Option<String>,
    version: Option<String>,
    pinned: Option<bool>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `kind=`: `provider`, `module`, or any (absent).
pub(super) fn parse_kind(kind: Option<&str>) -> Result<Option<Kind>, ApiError> {
    match kind {
        None => Ok(None),
        Some("provider") => Ok(Some(Kind::Provider)),
        Some("module") => Ok(Some(Kind::Module)),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("kind={other}: expected provider or module"),
        )),
    }
}

/// `limit=`: 100 when absent, else 1 to `max`.
pub(super) fn parse_limit(limit: Option<usize>, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {max}"),
        ));
    }
    Ok(limit)
}

fn unit_json(u: &Unit) -> Value {
    serde_json::to_value(u).expect("serializes")
}

/// `GET /admin/v1/inventory`: stored units, filtered and paged.
async fn inventory(
    State(state): State<AppState>,
    query: Result<Query<InventoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let kind = parse_kind(q.kind.as_deref())?;
    let limit = parse_limit(q.limit, MAX_LIMIT)?;
    let offset = q.offset.unwrap_or(0);
    let inv = state.cache.inventory().await?;
    let matching: Vec<&Unit> = inv
        .units
        .iter()
        .filter(|u| kind.is_none_or(|k| u.kind == k))
        .filter(|u| {
            q.host
                .as_ref()
                .is_none_or(|h| u.host.eq_ignore_ascii_case(h))
        })
        .filter(|u| {
            q.name
                .as_ref()
                .is_none_or(|n| u.name.starts_with(n.as_str()))
        })
        .filter(|u| q.version.as_ref().is_none_or(|v| &u.version == v))
        .filter(|u| q.pinned.is_none_or(|p| u.pinned == p))
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|u| unit_json(u))
        .collect();
    Ok(Json(json!({
        "total": matching.len(),
        "offset": offset,
        "limit": limit,
        "items": items,
    }))
    .into_response())
}

/// `GET /admin/v1/stats`: what is stored, the limits, and how well the cache does.
async fn stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let inv = state.cache.inventory().await?;
    let results = &state.metrics.cache_results;
    let count = |result: &str| -> u64 {
        crate::metrics::CACHE_KINDS
            .iter()
            .map(|k| results.with_label_values(&[k, result]).get())
            .sum()
    };
    let (hits, misses) = (count("hit") + count("stale"), count("miss") + count("pass"));
    let evictions = &state.metrics.evictions;
    Ok(Json(json!({
        "stored_bytes": inv.stored_bytes(),
        "objects": inv.objects(),
        "units": inv.units.len(),
        "pinned_units": inv.units.iter().filter(|u| u.pinned).count(),
        "max_size": state.limits.max_size,
        "evict_unused_after_secs": state.limits.unused_after.map(|d| d.as_secs()),
        "offline": state.cache.sealed(),
        "hits": hits,
        "misses": misses,
        "hit_ratio": if hits + misses == 0 { Value::Null } else { json!(hits as f64 / (hits + misses) as f64) },
        "evictions": {
            "size": evictions.with_label_values(&["size"]).get(),
            "unused": evictions.with_label_values(&["unused"]).get(),
        },
    }))
    .into_response())
}

fn host(p: &Params) -> Result<Host, ApiError> {
    Ok(Host::try_from(p.get("host")?)?)
}

fn provider_name(p: &Params) -> Result<ProviderName, ApiError> {
    super::providers::provider_name(p)
}

pub(super) fn module_address(p: &Params) -> Result<ModuleAddress, ApiError> {
    Ok(ModuleAddress {
        namespace: p.get("ns")?.try_into()?,
        name: p.get("name")?.try_into()?,
        system: p.get("system")?.try_into()?,
    })
}

fn provider_release(p: &Params) -> Result<ProviderRelease, ApiError> {
    Ok(ProviderRelease {
        host: host(p)?,
        name: provider_name(p)?,
        version: p.get("version")?.try_into()?,
        platform: Platform {
            os: p.get("os")?.try_into()?,
            arch: p.get("arch")?.try_into()?,
        },
    })
}

fn module_release(p: &Params) -> Result<ModuleRelease, ApiError> {
    Ok(ModuleRelease {
        host: host(p)?,
        module: module_address(p)?,
        version: p.get("version")?.try_into()?,
    })
}

async fn run_purge(state: &AppState, what: Purge) -> Result<Response, ApiError> {
    match state.cache.purge(&what).await? {
        Some(report) => Ok(Json(report).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "nothing stored matches",
        )),
    }
}

/// `DELETE /admin/v1/providers/{host}/{ns}/{type}[/{version}[/{os}/{arch}]]`
async fn purge_provider(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let host = host(&p)?;
    let name = provider_name(&p)?;
    let version = match p.0.get("version") {
        Some(v) => Some(crate::registry::Version::try_from(v.as_str())?.to_string()),
        None => None,
    };
    let platform = match (p.0.get("os"), p.0.get("arch")) {
        (Some(_), Some(_)) => Some(provider_release(&p)?.platform.to_string()),
        _ => None,
    };
    run_purge(
        &state,
        Purge::Provider {
            host: host.to_string(),
            name: name.to_string(),
            version,
            platform,
        },
    )
    .await
}

/// `DELETE /admin/v1/modules/{host}/{ns}/{name}/{system}/{version}`
async fn purge_module(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let r = module_release(&p)?;
    run_purge(
        &state,
        Purge::Module {
            host: r.host.to_string(),
            name: r.module.to_string(),
            version: r.version.to_string(),
        },
    )
    .await
}

async fn set_pin(
    state: &AppState,
    key: crate::storage::StorageKey,
    label: String,
    pinned: bool,
) -> Result<Response, ApiError> {
    state.cache.set_pin(&key, pinned, "admin").await?;
    Ok(Json(json!({ "unit": label, "pinned": pinned })).into_response())
}

/// `PUT /admin/v1/pins/providers/{host}/{ns}/{type}/{version}/{os}/{arch}`: pins a unit,
/// stored or not yet.
async fn pin_provider(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let r = provider_release(&p)?;
    set_pin(&state, keys::provider_pin(&r), r.to_string(), true).await
}

/// `DELETE /admin/v1/pins/providers/...`
async fn unpin_provider(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let r = provider_release(&p)?;
    set_pin(&state, keys::provider_pin(&r), r.to_string(), false).await
}

/// `PUT /admin/v1/pins/modules/{host}/{ns}/{name}/{system}/{version}`
async fn pin_module(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let r = module_release(&p)?;
    set_pin(&state, keys::module_pin(&r), r.to_string(), true).await
}

/// `DELETE /admin/v1/pins/modules/...`
async fn unpin_module(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let r = module_release(&p)?;
    set_pin(&state, keys::module_pin(&r), r.to_string(), false).await
}

/// `POST /admin/v1/refresh/providers/{host}/{ns}/{type}`: the version list from upstream now.
async fn refresh_provider(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let served = state
        .cache
        .refresh_provider_versions(&host(&p)?, &provider_name(&p)?)
        .await?;
    Ok(refreshed(served))
}

/// `POST /admin/v1/refresh/modules/{host}/{ns}/{name}/{system}`
async fn refresh_module(State(state): State<AppState>, p: Params) -> Result<Response, ApiError> {
    let served = state
        .cache
        .refresh_module_versions(&host(&p)?, &module_address(&p)?)
        .await?;
    Ok(refreshed(served))
}

fn refreshed(served: crate::cache::Served) -> Response {
    let versions = match &served.body {
        crate::cache::Body::Bytes(b) => serde_json::from_slice::<Value>(b).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    Json(json!({ "refreshed": true, "document": versions })).into_response()
}
