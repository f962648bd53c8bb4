//! Discovery, health, readiness and the fallbacks.

use super::{ApiError, AppState};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// `GET /.well-known/terraform.json`: the services TerraPeak answers in registry mode.
pub async fn discovery() -> Json<serde_json::Value> {
    Json(json!({ "providers.v1": "/v1/providers/", "modules.v1": "/v1/modules/" }))
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz[?store=required]`: whether this replica can answer requests. A degraded store
/// (full, read-only or failing) does not stop it: cached objects are still served and
/// everything else passes through, so it stays ready and says what is wrong in the body. With
/// `store=required` a degraded store makes it not ready, for operators who want such a replica
/// out of rotation.
pub async fn readyz(State(state): State<AppState>, Query(query): Query<ReadyQuery>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let store_required = match query.store.as_deref() {
        None | Some("optional") => false,
        Some("required") => true,
        Some(other) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("store={other}: expected required or optional"),
            )
            .into_response();
        }
    };
    let report = state.cache.store_report().await;
    let degraded = !report.degraded.is_empty();
    let body = json!({
        "status": if degraded { "degraded" } else { "ready" },
        "store": report,
    });
    if degraded && store_required {
        let why: Vec<String> = report
            .degraded
            .iter()
            .map(|d| {
                format!(
                    "storage {}s fail ({}): {}",
                    d.side.as_str(),
                    d.reason.as_str(),
                    d.error
                )
            })
            .collect();
        let mut body = body;
        body["errors"] = json!(why);
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(body).into_response()
}

#[derive(serde::Deserialize)]
pub struct ReadyQuery {
    store: Option<String>,
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// `GET /metrics` on the main listener (unless `metrics.on_main_listener` is off).
pub async fn metrics(State(state): State<AppState>) -> Response {
    if !state.metrics_on_main {
        return not_found().await.into_response();
    }
    render_metrics(&state.metrics)
}

/// The Prometheus text exposition.
pub fn render_metrics(metrics: &crate::metrics::Metrics) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        metrics.render(),
    )
        .into_response()
}
