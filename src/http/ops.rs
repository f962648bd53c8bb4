//! Discovery, health, readiness and the fallbacks.

use super::{ApiError, AppState};
use axum::Json;
use axum::extract::State;
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

/// `GET /readyz`: the store answers a write and a read.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.cache.probe_storage().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage not ready: {e}"),
        )
        .into_response(),
    }
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
